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
    "shapes": ["--steps", "1", "--batch", "2", "--scenes", "8", "--minutes", "0.3"],
    "app": [],  # the page is built; its server's launch is recorded instead of serving (below)
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
    launches = []
    if args[0] == "app":
        import gradio

        monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kw: launches.append(kw))
    code, out, err = cli(*args, *QUICK[args[0]])
    if args[0] == "app":  # served on this machine only, never through a public link
        assert code == 0 and [(kw["server_name"], kw["share"]) for kw in launches] == [("127.0.0.1", False)], err
        return
    if any(d in f" {line} " for d in DOWNLOADS):
        assert code == 2 and "not available" in err and "download" in err, err
        return
    assert code == 0, err
    assert out or any(tmp_path.rglob("*.png")) or any(tmp_path.rglob("*.json"))
