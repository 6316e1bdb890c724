"""Sampling settings are declared once (`attnctl.sampling.SamplingConfig`): each bad value gets the same message from
the command line (generate, and eval/tune for the flags they take), the page, the Python API and a model folder's
attnctl.json."""

import html
import json

import pytest

from attnctl.errors import UsageError
from attnctl.run import Request
from attnctl.sampling import FOLDER_SETTINGS, SamplingConfig

# (field, value, the message every front end gives)
BAD = [
    ("seed", -1, "--seed must be between 0 and 18446744073709551615, not -1"),
    ("steps", 1001, "--steps must be between 1 and 1000, not 1001"),
    ("guidance", float("nan"), "--guidance must be a finite number, not nan"),
    ("guidance", 1e308, "--guidance must be between 0 and 100, not 1e+308"),
    ("guidance", -2.0, "--guidance must be between 0 and 100, not -2.0"),
    ("height", 4, "--height must be between 8 and 4096, not 4"),
    ("width", 5000, "--width must be between 8 and 4096, not 5000"),
    ("num_images", 65, "--num-images must be between 1 and 64, not 65"),
    ("max_sequence_length", 0, "--max-sequence-length must be between 1 and 512, not 0"),
]
PAGE_FIELDS = ("seed", "steps", "guidance", "height", "width")  # the page sets device and dtype at launch
RUN_FLAGS = {"eval": ("steps", "guidance"), "tune": ("steps",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("name, value, message", BAD)
def test_the_api_refuses_with_the_flags_message(name, value, message):
    with pytest.raises(UsageError) as caught:
        SamplingConfig(**{name: value})
    assert str(caught.value) == message


@pytest.mark.parametrize("name, value, message", BAD)
def test_the_command_line_refuses_with_the_same_message(name, value, message, cli, tmp_path):
    runs = [["generate", "--method", "none", "--model", "random:sd15-tiny", "--prompt", "a cat"]]
    runs += [[command, "--quick"] if command == "eval" else [command, "--method", "ast"]
             for command, names in RUN_FLAGS.items() if name in names]
    for words in runs:
        code, out, err = cli(*words, f"{_flag(name)}={value}", "--out", tmp_path / "out")
        assert code == 2 and err.strip() == f"attnctl: error: {message}", (words, err)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value, message", [b for b in BAD if b[0] in PAGE_FIELDS])
def test_the_page_refuses_with_the_same_message(name, value, message):
    from attnctl.app import Page

    page = Page(method="none")
    try:
        values = {"method": "none", "prompt": "a cat", "targets": "", "model": "", "seed": 0, "steps": 0,
                  "height": 0, "width": 0, "guidance": "", "sketch": None, "background": "", "boxes": "",
                  "phrases": []}
        values[name] = str(value) if name == "guidance" else value  # the page's guidance is a text field
        with pytest.raises(UsageError) as caught:
            page.request(values)
        assert str(caught.value) == message
    finally:
        page.close()


@pytest.mark.parametrize("name, value, message", [b for b in BAD if b[0] in FOLDER_SETTINGS.values()])
def test_a_model_folder_is_refused_with_the_same_message(name, value, message, tmp_path):
    from attnctl.models import sampling_defaults

    key = next(k for k, v in FOLDER_SETTINGS.items() if v == name)
    (tmp_path / "attnctl.json").write_text(json.dumps({key: value}))
    with pytest.raises(UsageError) as caught:
        sampling_defaults(str(tmp_path))
    assert str(caught.value).endswith(f"attnctl.json (the model folder's recommended settings): {key}: {message}")


def test_the_request_renders_the_command_that_makes_it():
    """What the page shows: a command line rendered from the typed request (values starting with "-" kept as
    values), which the command line reads back into the same request."""
    from attnctl.cli import build_parser
    from attnctl.cli.generate import request_of

    request = Request(method="regulation", prompt="-a red cat", targets=["cat"], options={"strength": 2.0},
                      sampling=SamplingConfig(seed=3, steps=4, guidance=2.5), maps=True, seed_grid=2)
    words = request.arguments(out="o")
    assert words == ["generate", "--method", "regulation", "--prompt=-a red cat", "--targets", "cat", "--seed", "3",
                     "--steps", "4", "--guidance", "2.5", "--strength", "2.0", "--maps", "--seed-grid", "2", "--out",
                     "o"]
    again = request_of(build_parser().parse_args(words))
    assert (again.method, again.prompt, again.targets, again.options, again.sampling, again.maps, again.seed_grid) == (
        request.method, request.prompt, request.targets, request.options, request.sampling, True, 2)


@pytest.mark.parametrize("given, message", [
    (dict(method=None), "--method None is not one of none, regulation"),
    (dict(options=5), "options must map a method's option names to values"),
    (dict(options={"strength": "x"}), "--strength must be a number, not 'x'"),
    (dict(options={"nonsense": 1}), "unknown RegulationConfig option(s) nonsense"),
    (dict(layout="layout.json"), "layout must be an attnctl.Layout"),
    (dict(model=3), "model must be a model spec"),
    (dict(maps="yes"), "maps must be True or False"),
    (dict(seeds=[-1]), "seeds must be a list of 1 to 64 generator seeds"),
    (dict(seeds=[]), "seeds must be a list of 1 to 64 generator seeds"),
    (dict(sampling={"steps": 3}), "sampling must be a SamplingConfig, not dict"),
    (dict(targets=5), "--targets must be a list of words of the prompt"),
    (dict(seed_grid=2, method="none"), "--seed-grid compares a method with the plain pipeline"),
    (dict(prompt=""), "--prompt is required with --method regulation"),
])
def test_a_request_checks_its_values_when_made(given, message):
    with pytest.raises(UsageError) as caught:
        Request(**{"prompt": "a cat", **given})
    assert message in str(caught.value)


@pytest.mark.parametrize("name, value, message", [
    ("seed", "abc", "seed must be a whole number, not 'abc'"),
    ("steps", float("nan"), "steps must be a whole number, not nan"),
    ("steps", 2.5, "steps must be a whole number, not 2.5"),
    ("guidance", "lots", "guidance must be a number (1 or less turns guidance off), not 'lots'"),
])
def test_the_page_shows_a_message_for_values_that_are_not_numbers(name, value, message):
    from attnctl.app import Page

    page = Page(method="none")
    try:
        values = {"method": "none", "prompt": "a cat", "targets": "", "model": "", "seed": 0, "steps": 0,
                  "height": 0, "width": 0, "guidance": "", "sketch": None, "background": "", "boxes": "",
                  "phrases": [""] * 8, name: value}
        shown = page.check(values)[0]
        assert message in html.unescape(shown), shown
        assert page.check({**values, name: 3.0 if name == "guidance" else 1})[0].count("error") == 0
    finally:
        page.close()
