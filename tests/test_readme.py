"""Every `attnctl ...` line of the README's code blocks runs as written, with settings that make it quick appended
(fewer steps, prompts, scenes); lines naming a model that must be downloaded fail cleanly (exit 2, the fix named)."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Appended to each sub-command so that it finishes in seconds; everything else is the README's own line.
QUICK = {
    "sites": [],
    "maps": ["--steps", "1"],
    "generate": ["--steps", "1"],
    "analyze": ["--steps", "1"],
    "bench": [],
    "eval": ["--quick", "--prompts", "1", "--steps", "1", "--no-attention"],
    "tune": ["--prompts", "1", "--seeds", "1", "--steps", "1"],
    "shapes": ["--steps", "1", "--batch", "2", "--scenes", "8", "--minutes", "0.3"],
    "app": [],  # started as users start it, on a free port instead of the README's (below)
}
DOWNLOADS = ("black-forest-labs/", " M ")  # hub ids, and the placeholder for "your model"


def readme_commands() -> list[str]:
    lines, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside and line.startswith("attnctl "):
            lines.append(line.split("  #")[0].strip())
    return list(dict.fromkeys(lines))


def test_the_readme_has_commands_of_every_sub_command():
    assert {shlex.split(c)[1] for c in readme_commands()} == set(QUICK)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_runs_as_written(line, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs (out/..., ./shapes-unet-run) land here
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.setenv("ATTNCTL_PROGRESS", "0")
    args = shlex.split(re.sub(r"\s\[[^]]*\]", "", line))[1:]  # without the optional flags shown as [--x]
    if "--steps" in args:  # the README's own step count gives way to the quick one
        del args[args.index("--steps"):args.index("--steps") + 2]
    if args[0] == "app":
        _serve_the_page(args[1:])
        return
    code, out, err = cli(*args, *QUICK[args[0]])
    if any(d in f" {line} " for d in DOWNLOADS):
        assert code == 2 and "not available" in err and "download" in err, err
        return
    assert code == 0, err
    assert out or any(tmp_path.rglob("*.png")) or any(tmp_path.rglob("*.json"))


def _serve_the_page(args: list[str]) -> None:
    """`attnctl app ARGS` through its console script, on a free port of the loopback address (its default), answers
    with the page."""
    import urllib.request

    from conftest import served_app

    if "--port" in args:
        del args[args.index("--port"):args.index("--port") + 2]
    with served_app(*args) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b"attnctl" in answer.read()
