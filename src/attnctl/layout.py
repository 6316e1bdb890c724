"""Layouts: a prompt, one region per instance (box, mask or sketch colour) and a background, rasterised to any token
grid, and bound to the prompt's tokens with each token's role.

A layout file is JSON:

    {"prompt": "a red dog and a grey cat on the grass",
     "background": "the grass",
     "regions": [{"phrase": "a red dog", "box": [0.05, 0.3, 0.48, 0.95]},
                 {"phrase": "a grey cat", "box": [0.52, 0.3, 0.95, 0.95], "attribute": "grey"}]}

A region gives its `phrase` (a verbatim part of the prompt, case-insensitive) and exactly one of
- `box`: [x0, y0, x1, y1] as fractions of the image width and height (origin top left);
- `mask`: a PNG path, relative to the JSON file; pixels brighter than half are inside (any size: it is resampled);
- `color`: "#rrggbb" or [r, g, b], a flat colour of the `sketch` PNG named at the top level (white = background).
Optional per region: `attribute` (the attribute words, a string or list of strings within the phrase; "" for none)
overrides the parser (`attnctl.roles`); `occurrence` (1-based) picks which appearance of a repeated phrase is meant.
Without it the n-th region naming a phrase binds to its n-th free appearance ("a dog ... a dog": region 1 → the first,
region 2 → the second). The background region is every pixel outside the regions; `background` is its phrase ("" for
none).

Rasterising: at a grid of h×w tokens each cell gets the label (0 = background, i = region i) that covers most of it; a
region that covers no cell's majority still gets its best-covered cell, so small regions survive coarse grids.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import roles as role_lib
from .errors import UsageError
from .text import phrase_spans

log = logging.getLogger(__name__)

_REGION_KEYS = {"phrase", "box", "mask", "color", "attribute", "occurrence"}
_TOP_KEYS = {"prompt", "background", "regions", "sketch"}
_CHECK_GRID = 512  # overlaps between boxes / masks of different sizes are checked at this resolution

@dataclass
class Region:
    """One region of a layout: its `phrase` and where it goes (a `box` as fractions of the image, or a `mask`;
    `color` for a sketch colour), and optionally its `attribute` words and which `occurrence` of the phrase it is."""

    phrase: str
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None  # bool (H, W): a mask file, or the pixels of a sketch colour
    color: tuple[int, int, int] | None = None
    attribute: str | list[str] | None = None  # None: found by the role parser
    occurrence: int | None = None

    def extent(self) -> tuple[float, float, float, float]:
        """The region's box, or the bounding box of its mask, as fractions of the image (x0, y0, x1, y1)."""
        if self.box is not None:
            return tuple(self.box)
        ys, xs = np.nonzero(self.mask)
        h, w = self.mask.shape
        return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h

    def coverage(self, grid: tuple[int, int]) -> torch.Tensor:
        """Fraction of each cell of an h×w grid that lies inside the region, float64 (h, w)."""
        h, w = grid
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            return torch.outer(_interval_cover(y0, y1, h), _interval_cover(x0, x1, w))
        m = torch.from_numpy(self.mask.astype(np.float64))[None, None]
        return F.adaptive_avg_pool2d(m, (h, w))[0, 0]


@dataclass
class RegionTokens:
    """Token positions (in the attention's text sequence) of one region's phrase, split by role."""

    phrase: list[int]
    instance: list[int]
    attribute: list[int]


@dataclass
class BoundLayout:
    """A layout bound to one prompt's tokens: per region the token roles, and the background phrase's tokens."""

    regions: list[RegionTokens]
    background: list[int]
    spans: list[tuple[int, int]]  # character span of each region's phrase in the prompt


@dataclass
class Layout:
    """Where each phrase of the prompt goes: regions (box, mask or sketch colour) and the background phrase.

        layout = Layout.load("examples/two_animals.json")     # or Layout.from_dict({...})
        layout.labels((16, 16))                                # region index per cell of a 16x16 token grid
    """

    prompt: str
    regions: list[Region]
    background: str = ""
    sketch_path: str | None = None
    _labels: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _validate(self)

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> Layout:
        """A layout from its JSON file, whose mask and sketch paths are relative to its folder; a UsageError naming the
        file where it cannot be read or parsed."""
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"a layout file is given by its path, not {type(path).__name__}")
        path = Path(path)
        try:
            if path.is_dir():
                raise UsageError(f"layout {path} is a folder; give the layout's JSON file")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"layout file {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise UsageError(f"layout file {path} is not valid JSON text: {err}") from None
        except ValueError as err:  # a NUL or a lone surrogate in the path
            raise UsageError(f"layout path {str(path)!r} is not a usable file name: {err}") from None
        except OSError as err:
            raise UsageError(f"layout file {path} cannot be read: {err.strerror}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # also: numbers past Python's digit limit, nesting too deep
            raise UsageError(f"layout file {path} is not valid JSON text: {err}") from None
        return cls.from_dict(data, base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, base=".", where: str = "layout", sketch: np.ndarray | None = None) -> Layout:
        """A layout from its JSON data; paths are relative to `base`. `sketch` (uint8 RGB, H×W×3), if given, is the
        pixels of the data's 'sketch', which is then not read from its file (the app checks a canvas this way)."""
        if not isinstance(data, dict):
            raise UsageError(f"{where}: a layout is a JSON object with prompt, background and regions")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown, key=str)}; a layout has {sorted(_TOP_KEYS)}")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        regions_data = data.get("regions")
        if not isinstance(regions_data, list) or not regions_data:
            raise UsageError(f"{where}: 'regions' must be a non-empty list of regions")
        base = Path(base)
        if data.get("sketch") is not None:
            if not isinstance(data["sketch"], str) or not data["sketch"].strip():
                raise UsageError(f"{where}: 'sketch' must be the path of a PNG (relative to the layout), not "
                                 f"{data['sketch']!r}")
            if sketch is None:
                sketch = _read_rgb(base / data["sketch"], f"{where}: sketch")
        else:
            sketch = None
        regions = [_region_from_dict(r, i + 1, base, sketch, data.get("sketch"), where)
                   for i, r in enumerate(regions_data)]
        background = data.get("background", "")
        if not isinstance(background, str):
            raise UsageError(f"{where}: 'background' must be a string (the background's phrase, or \"\")")
        if sketch is not None:
            _warn_unclaimed_colours(sketch, regions, data["sketch"])
        return cls(prompt=prompt, regions=regions, background=background, sketch_path=data.get("sketch"))

    @classmethod
    def from_prompt(cls, prompt: str, background: str = "") -> Layout:
        """The layout the prompt's words state ("a red circle to the left of a blue square", "a, b and c from left
        to right"): one box per object, as `attnctl.relations` reads them; a UsageError naming the patterns
        understood for a prompt that states none."""
        from .relations import boxes_from_prompt

        regions = [{"phrase": phrase, "box": list(box)} for phrase, box in boxes_from_prompt(prompt)]
        return cls.from_dict({"prompt": prompt, "background": background, "regions": regions},
                             where="the prompt's layout")

    # --- rasterising ------------------------------------------------------------------------------------------
    def labels(self, grid: tuple[int, int]) -> torch.Tensor:
        """Region label of every cell of an h×w grid, long (h, w): 0 = background, i = region i (1-based)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid not in self._labels:
            self._labels[grid] = _rasterise(self, grid)
        return self._labels[grid]

    def masks(self, grid: tuple[int, int]) -> torch.Tensor:
        """bool (1 + regions, h, w): the background's cells, then each region's."""
        lab = self.labels(grid)
        return torch.stack([lab == i for i in range(len(self.regions) + 1)])

    # --- binding to tokens ------------------------------------------------------------------------------------
    def bind(self, tokens, parser: str = "auto") -> BoundLayout:
        """Token positions of every region's phrase and roles, and of the background phrase, in `tokens`
        (an `attnctl.tokens.PromptTokens`)."""
        lowered = tokens.prompt.lower()
        claimed: list[tuple[int, int]] = []
        order = sorted(range(len(self.regions)), key=lambda i: self.regions[i].occurrence is None)
        spans: dict[int, tuple[int, int]] = {}
        for i in order:
            r = self.regions[i]
            spans[i], occurrence = _claim(lowered, r.phrase, r.occurrence, claimed, f"region {i + 1}", tokens.prompt)
            tokens.phrase_positions(r.phrase, occurrence)  # raises if cut from the prompt
        bound = []
        for i, r in enumerate(self.regions):
            start, end = spans[i]
            phrase_text = tokens.prompt[start:end]
            phrase_pos = tokens.span_positions(start, end)
            if r.attribute is not None:
                attr_spans = role_lib.explicit_spans(phrase_text, r.attribute, f"region {i + 1} ({r.phrase!r})")
            else:
                attr_spans = role_lib.attribute_spans(phrase_text, parser)
            attr = sorted({p for a, b in attr_spans for p in tokens.span_positions(start + a, start + b)})
            instance = [p for p in phrase_pos if p not in attr]
            bound.append(RegionTokens(phrase=phrase_pos, instance=instance, attribute=attr))
        background = []
        if self.background.strip():
            b_span, occurrence = _claim(lowered, self.background, None, claimed, "the background", tokens.prompt)
            tokens.phrase_positions(self.background, occurrence)
            background = tokens.span_positions(*b_span)
        return BoundLayout(regions=bound, background=background, spans=[spans[i] for i in range(len(self.regions))])

    def to_dict(self) -> dict:
        """The layout as JSON-able data (boxes and colours as given; masks are not serialised)."""
        out = {"prompt": self.prompt, "background": self.background, "regions": []}
        for r in self.regions:
            d = {"phrase": r.phrase}
            if r.box is not None:
                d["box"] = list(r.box)
            elif r.color is not None:
                d["color"] = "#{:02x}{:02x}{:02x}".format(*r.color)
            else:
                d["mask"] = "<array>"
            if r.attribute is not None:
                d["attribute"] = r.attribute
            out["regions"].append(d)
        if self.sketch_path:
            out["sketch"] = self.sketch_path
        return out


def load_layout(layout) -> Layout:
    """A `Layout` from a Layout, a dict or a path to a JSON file."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, dict):
        return Layout.from_dict(layout)
    if isinstance(layout, (str, Path)):
        return Layout.load(layout)
    raise UsageError(f"a layout is a Layout, a dict or a JSON file path, not {type(layout).__name__}")


# --- internals ------------------------------------------------------------------------------------------------

def _interval_cover(a: float, b: float, n: int) -> torch.Tensor:
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    return ((torch.minimum(edges[1:], torch.tensor(b)) - torch.maximum(edges[:-1], torch.tensor(a))).clamp(min=0) * n)


MAX_PIXELS = 4096 * 4096  # a sketch or mask is rasterised to the token grid (64x64 for FLUX at 1024²)


def _read_rgb(path: Path, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UsageError(f"{what}: {path} is {im.width}×{im.height} pixels, more than the {MAX_PIXELS:,} a "
                                 "layout reads; it only sets regions on the token grid, so draw it at most "
                                 "4096×4096 (1024×1024 is plenty)")
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"{what}: file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        # OSError: a folder, not an image, a truncated one; ValueError: a NUL in the path, a mode PIL cannot convert
        raise UsageError(f"{what}: cannot read {str(path)!r} as an image ({err})") from None


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # JSON's true and false are not numbers here


def _box(box, at: str) -> tuple[float, float, float, float]:
    """A region's box as four floats, checked to be four numbers (their range is checked by `_validate`)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(x) for x in box)):
        raise UsageError(f"{at}: 'box' must be [x0, y0, x1, y1] as fractions of the image, not {box!r}")
    try:
        return tuple(float(x) for x in box)
    except OverflowError:  # an integer beyond float's range
        raise UsageError(f"{at}: box {list(box)} must lie within [0, 1] (fractions of the image)") from None


def _parse_color(value, where: str) -> tuple[int, int, int]:
    if (isinstance(value, str) and value.startswith("#") and len(value) == 7
            and all(c in string.hexdigits for c in value[1:])):
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(c, numbers.Integral) and
                                                                    not isinstance(c, bool) and 0 <= c <= 255
                                                                    for c in value):
        return tuple(int(c) for c in value)
    raise UsageError(f"{where}: colour {value!r} must be \"#rrggbb\" or [r, g, b] with 0..255 integers")


def _region_from_dict(d, index: int, base: Path, sketch, sketch_name, where: str) -> Region:
    at = f"{where}: region {index}"
    if not isinstance(d, dict):
        raise UsageError(f"{at} must be an object with a phrase and one of box, mask, color")
    unknown = set(d) - _REGION_KEYS
    if unknown:
        raise UsageError(f"{at}: unknown key(s) {sorted(unknown, key=str)}; a region has {sorted(_REGION_KEYS)}")
    phrase = d.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise UsageError(f"{at}: 'phrase' must be a non-empty string (a verbatim part of the prompt)")
    at = f"{at} ({phrase!r})"
    given = [k for k in ("box", "mask", "color") if d.get(k) is not None]
    if len(given) != 1:
        raise UsageError(f"{at}: give exactly one of box, mask, color (got {given or 'none'})")
    region = Region(phrase=phrase, attribute=d.get("attribute"), occurrence=d.get("occurrence"))
    if "box" in given:
        region.box = _box(d["box"], at)
    elif "mask" in given:
        if not isinstance(d["mask"], str) or not d["mask"].strip():
            raise UsageError(f"{at}: 'mask' must be the path of a PNG (relative to the layout), not {d['mask']!r}")
        rgb = _read_rgb(base / d["mask"], f"{at}: mask")
        region.mask = rgb.astype(np.float32).mean(-1) >= 127.5
    else:
        if sketch is None:
            raise UsageError(f"{at}: a region given by 'color' needs a 'sketch' PNG at the top level of the layout")
        color = _parse_color(d["color"], at)
        if color == (255, 255, 255):
            raise UsageError(f"{at}: white is the sketch's background; give the region another colour")
        region.color = color
        region.mask = np.all(sketch == np.array(color, dtype=sketch.dtype), axis=-1)
        if not region.mask.any():
            raise UsageError(f"{at}: colour {_hex(color)} does not occur in the sketch {sketch_name}; "
                             f"its colours are: {_sketch_colors(sketch)}")
    return region


def _hex(c) -> str:
    return "#{:02x}{:02x}{:02x}".format(*tuple(c))


def _warn_unclaimed_colours(sketch: np.ndarray, regions, name: str, share: float = 0.005) -> None:
    """A sketch colour that no region names is background; say so when it covers a visible part of the sketch
    (anti-aliased edges, below `share` of the pixels, are expected)."""
    claimed = np.zeros(sketch.shape[:2], dtype=bool)
    for r in regions:
        if r.mask is not None and r.mask.shape == claimed.shape:
            claimed |= r.mask
    rest = sketch[~claimed & ~np.all(sketch == 255, axis=-1)]
    if not len(rest):
        return
    colours, counts = np.unique(rest, axis=0, return_counts=True)
    big = [f"{_hex(c)} ({n / claimed.size:.0%})" for c, n in zip(colours, counts) if n >= share * claimed.size]
    if big:
        log.warning("sketch %s: colour(s) %s belong to no region and count as background; give each object's "
                    "colour a region (\"color\": ...) or paint it white", name, ", ".join(big))


def _sketch_colors(sketch: np.ndarray, most: int = 12) -> str:
    colors, counts = np.unique(sketch.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)[:most]
    total = counts.sum()
    return ", ".join(f"{_hex(colors[i])} ({100 * counts[i] / total:.1f}%)"
                     + (" = background" if tuple(colors[i]) == (255, 255, 255) else "")
                     for i in order)


def _check_types(layout: Layout) -> None:
    """The fields of a Layout built directly (`Layout(prompt, regions, ...)`) are what `from_dict` makes."""
    if not isinstance(layout.prompt, str) or not layout.prompt.strip():
        raise UsageError(f"a layout's prompt must be a non-empty string, not {layout.prompt!r}")
    if not isinstance(layout.background, str):
        raise UsageError(f"a layout's background must be a string (the background's phrase, or \"\"), not "
                         f"{layout.background!r}")
    if layout.sketch_path is not None and not isinstance(layout.sketch_path, str):
        raise UsageError(f"a layout's sketch_path is the sketch's file name or None, not {layout.sketch_path!r}")
    if not isinstance(layout.regions, (list, tuple)) or not layout.regions:
        raise UsageError("a layout's regions must be a non-empty list of Region objects (or use Layout.from_dict)")
    for i, r in enumerate(layout.regions, start=1):
        if not isinstance(r, Region):
            raise UsageError(f"region {i} must be a Region object, not {type(r).__name__} (or use Layout.from_dict)")
        if not isinstance(r.phrase, str) or not r.phrase.strip():
            raise UsageError(f"region {i}: its phrase must be a non-empty string (a verbatim part of the prompt), not "
                             f"{r.phrase!r}")
        at = f"region {i} ({r.phrase!r})"
        if r.box is not None and r.mask is not None:
            raise UsageError(f"{at}: give the region a box or a mask, not both")
        if r.box is not None:
            r.box = _box(r.box, at)
        if r.mask is not None and not (isinstance(r.mask, np.ndarray) and r.mask.dtype == bool and r.mask.ndim == 2):
            raise UsageError(f"{at}: the region's mask must be a 2-D numpy array of bools (height × width)")
        if r.color is not None:
            r.color = _parse_color(r.color, at)
        if r.occurrence is not None and (isinstance(r.occurrence, bool) or not isinstance(r.occurrence, int)
                                         or r.occurrence < 1):
            raise UsageError(f"{at}: 'occurrence' must be an integer >= 1, not {r.occurrence!r}")
        if r.attribute is not None and not (isinstance(r.attribute, str) or isinstance(r.attribute, (list, tuple))
                                            and all(isinstance(a, str) for a in r.attribute)):
            raise UsageError(f"{at}: 'attribute' must be a string or a list of strings (the attribute words within "
                             f"the phrase; \"\" for none), not {r.attribute!r}")


def _validate(layout: Layout) -> None:
    _check_types(layout)
    lowered = layout.prompt.lower()
    for i, r in enumerate(layout.regions, start=1):
        at = f"region {i} ({r.phrase!r})"
        if r.phrase.strip().lower() not in lowered:
            raise UsageError(f"{at}: the phrase is not part of the prompt {layout.prompt!r}; each region's phrase "
                             "must appear in the prompt verbatim (case does not matter). The prompt's words are: "
                             f"{', '.join(layout.prompt.split())}")
        if r.box is not None:
            x0, y0, x1, y1 = r.box
            if not all(0.0 <= v <= 1.0 for v in r.box):
                raise UsageError(f"{at}: box {list(r.box)} must lie within [0, 1] (fractions of the image)")
            if x1 <= x0 or y1 <= y0:
                raise UsageError(f"{at}: box {list(r.box)} is empty; write it as [x0, y0, x1, y1] with x0 < x1, "
                                 "y0 < y1")
        elif r.mask is None:
            raise UsageError(f"{at}: give the region a box, a mask or a sketch colour")
        elif not r.mask.any():
            raise UsageError(f"{at}: the region's mask is empty (no pixel is inside)")
        if r.attribute is not None:
            role_lib.explicit_spans(r.phrase, r.attribute, at)
    if layout.background.strip() and layout.background.strip().lower() not in lowered:
        raise UsageError(f"the background phrase {layout.background!r} is not part of the prompt {layout.prompt!r}")
    # overlaps, checked at the masks' own size when they share one, else on a fine grid
    sizes = {r.mask.shape for r in layout.regions if r.mask is not None}
    grid = next(iter(sizes)) if len(sizes) == 1 else (_CHECK_GRID, _CHECK_GRID)
    covers = [r.coverage(grid) for r in layout.regions]
    for i in range(len(covers)):
        for j in range(i + 1, len(covers)):
            shared = (covers[i] + covers[j] - 1).clamp(min=0).sum().item() / (grid[0] * grid[1])
            if shared > 1e-6:
                a, b = layout.regions[i], layout.regions[j]
                raise UsageError(
                    f"regions {i + 1} ({a.phrase!r}) and {j + 1} ({b.phrase!r}) overlap ({100 * shared:.2f}% of the "
                    "image): AST gives every pixel to one region, so regions must not overlap"
                )


def _rasterise(layout: Layout, grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    for i, r in enumerate(layout.regions):
        if r.mask is not None and abs(r.mask.shape[1] / r.mask.shape[0] - w / h) > 0.02 * w / h:
            raise UsageError(f"region {i + 1} ({r.phrase!r}): its mask or sketch is {r.mask.shape[1]}×"
                             f"{r.mask.shape[0]} but the image's token grid is {w}×{h}; draw it at the image's "
                             "aspect ratio (it would be stretched)")
    cover = torch.stack([r.coverage(grid) for r in layout.regions])  # (R, h, w)
    background = (1 - cover.sum(0)).clamp(min=0)
    scores = torch.cat([cover, background[None]])  # regions first: a tie goes to the region
    best = scores.argmax(0)
    labels = torch.where(best == len(layout.regions), torch.zeros_like(best), best + 1)
    for i in range(len(layout.regions)):
        if (labels == i + 1).any():
            continue
        flat = cover[i].flatten()
        order = torch.argsort(flat, descending=True, stable=True)
        placed = False
        for cell in order[: max(1, int((flat > 0).sum()))].tolist():
            owner = int(labels.flatten()[cell])
            if flat[cell] > 0 and (owner == 0 or int((labels == owner).sum()) > 1):
                labels.view(-1)[cell] = i + 1
                placed = True
                break
        if not placed:
            raise UsageError(f"region {i + 1} ({layout.regions[i].phrase!r}) is too small to get a cell of the "
                             f"{h}x{w} token grid; enlarge it or generate at a higher resolution")
    return labels


def _claim(lowered: str, phrase: str, occurrence, claimed: list, what: str, prompt: str) -> tuple[tuple[int, int], int]:
    """The character span of `phrase`'s chosen appearance in the prompt, and its 1-based occurrence number."""
    matches = phrase_spans(lowered, phrase)
    if not matches:
        raise UsageError(f"{what}: phrase {phrase!r} is not part of the prompt {prompt!r}")
    if occurrence is not None:
        if occurrence > len(matches):
            raise UsageError(f"{what}: asked for occurrence {occurrence} of {phrase!r}, but the prompt has it "
                             f"{len(matches)} time(s)")
        span = matches[occurrence - 1]
        if any(a < span[1] and span[0] < b for a, b in claimed):
            raise UsageError(f"{what}: occurrence {occurrence} of {phrase!r} is already another region's phrase")
        claimed.append(span)
        return span, occurrence
    for n, span in enumerate(matches, start=1):
        if not any(a < span[1] and span[0] < b for a, b in claimed):
            claimed.append(span)
            return span, n
    raise UsageError(
        f"{what}: phrase {phrase!r} appears {len(matches)} time(s) in the prompt but every appearance is already "
        "another region's (or the background's) phrase; repeat it in the prompt once per region, or set "
        "'occurrence'"
    )
