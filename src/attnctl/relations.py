"""Layouts from the words of a prompt: the spatial relation it states, turned into one box per object, so that a
layout method runs without a drawing (`Layout.from_prompt`, `--auto-layout`).

Understood (case-insensitive; each object is the words between the markers, e.g. "a red circle"):
- two objects: "A to the left of B", "A to the right of B", "A above B", "A below B" (also "on top of", "under",
  "beneath"): A and B each get the half of the image the relation names;
- two or three objects in a stated order: "A and B from left to right", "A, B and C from left to right" (or "A and
  B and C ..."; also "from right to left", "from top to bottom", "from bottom to top"): halves or thirds, in order.
A trailing period is ignored. Anything else is refused with these patterns named: a layout is never guessed.
"""

from __future__ import annotations

import re

from .errors import UsageError

Box = tuple[float, float, float, float]
HALVES: dict[str, Box] = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
                          "bottom": (0.0, 0.5, 1.0, 1.0)}
# the relation words and the halves (first object, second object) they give
RELATION_SIDES: dict[str, tuple[str, str]] = {
    "to the left of": ("left", "right"), "to the right of": ("right", "left"), "above": ("top", "bottom"),
    "below": ("bottom", "top"), "on top of": ("top", "bottom"), "under": ("bottom", "top"),
    "beneath": ("bottom", "top")}
ORDERS = ("left to right", "right to left", "top to bottom", "bottom to top")
PATTERNS = ('"A to the left of B" (or to the right of, above, below)',
            '"A and B from left to right" / "A, B and C from left to right" (or right to left, top to bottom, bottom '
            'to top)')

_RELATION = re.compile(r"^(?P<a>.+?)\s+(?P<rel>" + "|".join(sorted(map(re.escape, RELATION_SIDES), key=len,
                                                                     reverse=True)) + r")\s+(?P<b>.+)$")
_ORDER = re.compile(r"^(?P<objects>.+?),?\s+from\s+(?P<order>" + "|".join(ORDERS) + r")$")
_SEPARATOR = re.compile(r"\s*,\s*and\s+|\s*,\s*|\s+and\s+", re.IGNORECASE)


def strips(n: int, order: str) -> list[Box]:
    """`n` equal strips of the image in `order` (one of ORDERS): columns for left/right, rows for top/bottom."""
    edges = [i / n for i in range(n + 1)]
    columns = order in ("left to right", "right to left")
    boxes = [(a, 0.0, b, 1.0) if columns else (0.0, a, 1.0, b) for a, b in zip(edges, edges[1:])]
    return boxes[::-1] if order in ("right to left", "bottom to top") else boxes


def boxes_from_prompt(prompt: str) -> list[tuple[str, Box]]:
    """(phrase, box) per object of the relation `prompt` states, the phrases verbatim from the prompt; a UsageError
    naming the patterns understood for any other prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("an automatic layout needs a prompt that states where things are: " + "; ".join(PATTERNS))
    text = prompt.strip().rstrip(".").strip()
    lowered = text.lower()
    order = _ORDER.match(lowered)
    if order:
        spans = _spans(text, order.start("objects"), order.end("objects"))
        if len(spans) in (2, 3) and all(spans):
            return list(zip(spans, strips(len(spans), order.group("order"))))
    relation = _RELATION.match(lowered)
    if relation and not _SEPARATOR.search(lowered[relation.start("a"):relation.end("a")]):
        first, second = RELATION_SIDES[relation.group("rel")]
        a = text[relation.start("a"):relation.end("a")].strip()
        b = text[relation.start("b"):relation.end("b")].strip()
        return [(a, HALVES[first]), (b, HALVES[second])]
    raise UsageError(f"cannot read a layout from the prompt {prompt!r}: the patterns understood are "
                     + "; ".join(PATTERNS) + ". Draw or type the boxes instead (--layout L.json)")


def _spans(text: str, start: int, end: int) -> list[str]:
    """The objects of "A, B and C" in text[start:end], verbatim."""
    part = text[start:end]
    return [p.strip() for p in _SEPARATOR.split(part)]
