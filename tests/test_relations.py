"""Layouts read from a prompt's relation words (`Layout.from_prompt`, `--auto-layout`; issue 28): the boxes each
pattern gives, the phrases verbatim, and a clear refusal naming the patterns for every other prompt."""

import pytest

from attnctl.errors import UsageError
from attnctl.layout import Layout
from attnctl.methods.registry import layout_methods, listing
from attnctl.relations import boxes_from_prompt

L, R, T, B = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
COLUMNS = [(0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0)]
ROWS = [(0.0, 0.0, 1.0, 1 / 3), (0.0, 1 / 3, 1.0, 2 / 3), (0.0, 2 / 3, 1.0, 1.0)]

READ = [
    ("a red circle to the left of a blue square", [("a red circle", L), ("a blue square", R)]),
    ("a red circle to the right of a blue square", [("a red circle", R), ("a blue square", L)]),
    ("A Red Circle above a blue square.", [("A Red Circle", T), ("a blue square", B)]),
    ("a red circle below a blue square", [("a red circle", B), ("a blue square", T)]),
    ("a cat on top of a dog", [("a cat", T), ("a dog", B)]),
    ("a cat beneath a table", [("a cat", B), ("a table", T)]),
    ("a red circle and a blue square from right to left", [("a red circle", R), ("a blue square", L)]),
    ("a red circle, a blue square and a green triangle from left to right",
     [("a red circle", COLUMNS[0]), ("a blue square", COLUMNS[1]), ("a green triangle", COLUMNS[2])]),
    ("a red circle, a blue square, and a green triangle from right to left",
     [("a red circle", COLUMNS[2]), ("a blue square", COLUMNS[1]), ("a green triangle", COLUMNS[0])]),
    ("a red circle and a blue square and a green triangle from top to bottom",
     [("a red circle", ROWS[0]), ("a blue square", ROWS[1]), ("a green triangle", ROWS[2])]),
    ("a thundercloud above a house", [("a thundercloud", T), ("a house", B)]),  # "under" only as a word
]


@pytest.mark.parametrize("prompt, expected", READ, ids=[p for p, _ in READ])
def test_each_pattern_gives_its_boxes_with_the_phrases_verbatim(prompt, expected):
    assert boxes_from_prompt(prompt) == expected
    layout = Layout.from_prompt(prompt)
    assert layout.prompt == prompt and layout.background == ""
    assert [(r.phrase, tuple(r.box)) for r in layout.regions] == expected


REFUSED = ["a red circle and a blue square", "a cat and a dog to the left of a bird", "",
           "a, b, c and d from left to right", "a cat from left to right", "a cat next to a dog",
           "to the left of a dog"]


@pytest.mark.parametrize("prompt", REFUSED)
def test_a_prompt_without_a_readable_relation_is_refused_naming_the_patterns(prompt):
    with pytest.raises(UsageError, match=r'"A to the left of B" .*"A, B and C from left to right"'):
        Layout.from_prompt(prompt)


def test_auto_layout_on_the_command_line(cli, tmp_path):
    prompt = "a red circle to the right of a blue square"
    code, out, err = cli("generate", "--method", "layout-modulation", "--auto-layout", "--prompt", prompt,
                         "--steps", "2", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "image_layout.png").exists()
    for args, message in (
            (["--method", "ast", "--auto-layout", "--prompt", "a red circle and a blue square"],
             "cannot read a layout from the prompt 'a red circle and a blue square': the patterns understood are"),
            (["--method", "ast", "--auto-layout"], "--auto-layout reads the layout from --prompt"),
            (["--method", "regulation", "--auto-layout", "--prompt", prompt],
             f"--auto-layout applies to --method {listing(layout_methods())} only, not --method regulation"),
            (["--method", "ast", "--prompt", prompt], "or pass --auto-layout to read the layout from the prompt")):
        code, _, err = cli("generate", *args, "--out", tmp_path / "x")
        assert code == 2 and message in err and "Traceback" not in err, err
    code, _, err = cli("generate", "--method", "ast", "--auto-layout", "--layout", "x.json", "--out", tmp_path / "y")
    assert code == 2 and "not allowed with argument" in err, err
