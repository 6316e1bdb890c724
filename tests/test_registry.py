"""The method registry (issue 30): every front end takes its methods from `methods.registry.METHODS`, so a method
added there (one line, beside its own module) is offered by the command line, eval, the page and the docs' table."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attnctl
from attnctl.config import build, check, comma_list, option
from attnctl.control import Controller
from attnctl.defaults import DEFAULT_MODEL
from attnctl.methods import registry
from attnctl.methods.registry import METHODS, Method
from attnctl.methods.targets import TARGETS_HELP

PROMPT = "a red circle and a blue square"


@dataclass
class ToyConfig:
    """A toy method's options: the target words (shared --targets flag) and how much to scale cross-attention."""

    targets: list | None = option(None, TARGETS_HELP, parse=comma_list, flag="--targets")
    gain: float = option(1.0, "factor on every cross-attention output", low=0, high=10)

    cli_prefix = "toy-"

    def __post_init__(self):
        check(self)


class Toy(Controller):
    """Scales each cross-attention output by `gain`; counts the calls it changed."""

    calls = 0

    def __init__(self, config: ToyConfig | None = None, **options):
        self.config = build(ToyConfig, config, **options)

    def wants(self, site):
        return site.kind == "cross"

    def __call__(self, call):
        call.set_output(call.output() * self.config.gain)
        Toy.calls += 1


@pytest.fixture
def toy(monkeypatch):
    """The toy method registered as a new method is: one line in METHODS."""
    monkeypatch.setitem(METHODS, "toy", Method("toy", Toy, ToyConfig, "targets", ("cross",), DEFAULT_MODEL,
                                               "scales cross-attention (a test's toy)"))
    Toy.calls = 0
    return METHODS["toy"]


def test_the_readme_methods_table_is_the_registry_rendered():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert registry.methods_table() in readme, "paste registry.methods_table() into the README"


def test_the_package_exports_every_method_and_config():
    for m in METHODS.values():
        for cls in (m.controller, m.config):
            assert getattr(attnctl, cls.__name__) is cls and cls.__name__ in attnctl.__all__


def test_an_unknown_method_names_the_methods():
    with pytest.raises(attnctl.UsageError, match="unknown method 'regulaton'; the methods are regulation, ast, "):
        registry.method("regulaton")


def test_a_registered_method_runs_from_the_command_line_with_its_generated_flags(toy, cli, tmp_path):
    code, out, err = cli("generate", "--help")
    assert "--toy-gain" in out and "toy" in out.split("--method")[1].split("}")[0]
    runs = {}
    for method, extra in (("toy", ["--toy-gain", "0.5", "--targets", "circle"]), ("none", [])):
        code, _, err = cli("generate", "--method", method, "--prompt", PROMPT, "--steps", "2", *extra,
                           "--out", tmp_path / method)
        assert code == 0, err
        runs[method] = np.asarray(Image.open(tmp_path / method / "image.png"))
    assert Toy.calls > 0 and not np.array_equal(runs["toy"], runs["none"])
    code, _, err = cli("generate", "--method", "toy", "--prompt", PROMPT, "--toy-gain", "11", "--out", tmp_path / "x")
    assert code == 2 and "gain (--toy-gain) must be" in err, err
    code, _, err = cli("generate", "--method", "none", "--prompt", PROMPT, "--toy-gain", "2", "--out", tmp_path / "y")
    assert code == 2 and "--toy-gain belong to --method toy, not --method none" in err, err


def test_a_registered_method_is_an_eval_arm_and_a_page_choice(toy, cli, tmp_path):
    from attnctl.app import Page, jobs

    code, out, err = cli("eval", "--methods", "none,toy", "--quick", "--prompts", "1", "--steps", "1",
                         "--no-attention", "--categories", "seen_pairs", "--out", tmp_path)
    assert code == 0, err
    assert "toy (shapes-unet)" in out and Toy.calls > 0
    page = Page(method="toy")
    try:
        assert [flag for flag, _ in jobs.method_fields("toy")] == ["--toy-gain"]  # --targets is shown once
    finally:
        page.close()
