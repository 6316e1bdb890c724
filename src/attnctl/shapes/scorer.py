"""Exact scoring of shapes-world images: colour segmentation + shape classification.

``score_image(image, expected)`` finds every flat-coloured blob in the image (pixels assigned to the
nearest palette colour, white and off-palette pixels dropped, 4-connected components, specks
removed), classifies each blob's shape from its silhouette, and matches the expected objects to
blobs. Per expected object it reports whether its shape is there (``present``), whether a blob of
that shape has the expected colour (``bound``), and, when a region is given, the IoU of the matched
blob with it and the share of the blob inside it. ``count`` is the number of blobs in the image.

It is written for the generator in :mod:`attnctl.shapes.data` and tolerates the mild blur, noise
and colour drift of images sampled from a small generative model.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .data import PALETTE, SHAPES

_NAMES = list(PALETTE)
_REFS = np.array([(255, 255, 255)] + [PALETTE[c] for c in _NAMES], dtype=np.float32)

#: A pixel farther than this (RGB Euclidean) from white and from every palette colour is "other".
MAX_COLOUR_DISTANCE = 110.0
#: Blobs smaller than this fraction of the image are specks (edge fringes, noise) and ignored.
MIN_AREA_FRACTION = 0.012


@dataclass
class Blob:
    """One connected region of pixels of one palette colour, with the shape its silhouette was classified as."""

    colour: str
    shape: str  # one of SHAPES, or "other" for a blob that matches no shape
    mask: np.ndarray  # (H, W) bool
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (half-open)
    features: dict = field(default_factory=dict)

    @property
    def centroid(self) -> tuple[float, float]:
        """The mean (x, y) of the blob's pixels, at pixel centres."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@dataclass
class ObjectScore:
    """How one expected object fared in an image (see the module docstring)."""

    colour: str
    shape: str
    present: bool  # a blob of the expected shape was matched to this object
    bound: bool  # ... and it has the expected colour
    colour_present: bool  # some blob has the expected colour (any shape)
    matched: Blob | None = None
    iou: float | None = None  # IoU of the matched blob with the given region
    inside_fraction: float | None = None  # share of the matched blob's pixels inside the region

    @property
    def inside(self) -> bool | None:
        """Whether at least half of the matched blob lies in the given region; None without a region."""
        return None if self.inside_fraction is None else self.inside_fraction >= 0.5

    @property
    def correct(self) -> bool:
        """Bound, and inside its region when one was given."""
        return self.bound and (self.inside is None or bool(self.inside))


@dataclass
class SceneScore:
    """The scores of the expected objects of one image, and every blob found in it."""

    objects: list[ObjectScore]
    blobs: list[Blob]

    @property
    def count(self) -> int:
        """The number of blobs in the image."""
        return len(self.blobs)

    @property
    def all_bound(self) -> bool:
        """Whether every expected object was matched to a blob of its shape and its colour."""
        return all(o.bound for o in self.objects)

    @property
    def exact(self) -> bool:
        """Every object correct and nothing else in the image."""
        return all(o.correct for o in self.objects) and self.count == len(self.objects)


# ----------------------------------------------------------------------------------------------


def to_rgb_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8/float array (0-255 or 0-1) or (3, H, W) tensor -> (H, W, 3) float32 0-255."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    elif hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if arr.dtype.kind == "f" and arr.max() <= 1.0 + 1e-6 and np.asarray(image).dtype != np.uint8:
        arr = arr * 255.0
    return arr


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: -1 background (white) or other, else index into the palette colour names."""
    d = np.linalg.norm(rgb[:, :, None, :] - _REFS[None, None], axis=-1)  # (H, W, 1 + colours)
    best = d.argmin(-1)
    labels = best - 1
    labels[d.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pix = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pix))
    return comps


#: A blob is called a shape only if its silhouette overlaps that shape's template this well (IoU).
MIN_TEMPLATE_IOU = 0.70
#: ... and its box is no more elongated than this (every generated shape has a square box).
MAX_ASPECT = 1.45


def shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal silhouettes filling an h x w box: ellipse, rectangle, upright isosceles triangle."""
    ys, xs = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w], dtype=np.float64).reshape(2, 1, 1)
    return {
        "circle": (xs - 0.5) ** 2 + (ys - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(xs - 0.5) <= ys / 2.0,
    }


def shape_features(mask: np.ndarray, box: tuple[int, int, int, int]) -> dict:
    """The fill, aspect (width / height) and IoU with each shape template of ``mask`` cropped to ``box``."""
    x0, y0, x1, y1 = box
    m = mask[y0:y1, x0:x1]
    h, w = m.shape
    feats = {"fill": float(m.mean()), "aspect": w / max(h, 1)}
    for name, t in shape_templates(h, w).items():
        feats["iou_" + name] = float((m & t).sum() / max(1, (m | t).sum()))
    return feats


def classify_shape(f: dict) -> str:
    """The best-matching template, or "other" for irregular or elongated blobs."""
    best = max(SHAPES, key=lambda s: f["iou_" + s])
    if f["iou_" + best] < MIN_TEMPLATE_IOU or not (1 / MAX_ASPECT <= f["aspect"] <= MAX_ASPECT):
        return "other"
    return best


def find_blobs(image, min_area_fraction: float = MIN_AREA_FRACTION) -> list[Blob]:
    """Every blob of a palette colour in ``image`` at least ``min_area_fraction`` of it, its shape classified."""
    rgb = to_rgb_array(image)
    labels = colour_labels(rgb)
    h, w = labels.shape
    min_area = max(4, int(round(min_area_fraction * h * w)))
    blobs = []
    for ci, name in enumerate(_NAMES):
        for pix in connected_components(labels == ci):
            if len(pix) < min_area:
                continue
            mask = np.zeros((h, w), dtype=bool)
            mask[pix[:, 0], pix[:, 1]] = True
            box = (int(pix[:, 1].min()), int(pix[:, 0].min()), int(pix[:, 1].max()) + 1, int(pix[:, 0].max()) + 1)
            feats = shape_features(mask, box)
            blobs.append(Blob(name, classify_shape(feats), mask, len(pix), box, feats))
    return blobs


def region_mask(region, shape: tuple[int, int]) -> np.ndarray | None:
    """A region given as a boolean mask (any size; resized by nearest) or a box (x0, y0, x1, y1).

    Box coordinates are pixels of the scored image; if all four are <= 1 they are fractions of it.
    """
    if region is None:
        return None
    h, w = shape
    arr = np.asarray(region)
    if arr.ndim == 2:
        if arr.shape != (h, w):
            yi = (np.arange(h) * arr.shape[0] // h)
            xi = (np.arange(w) * arr.shape[1] // w)
            arr = arr[yi][:, xi]
        return arr.astype(bool)
    x0, y0, x1, y1 = [float(v) for v in arr.reshape(-1)]
    if max(x0, y0, x1, y1) <= 1.0:
        x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _parse_expected(obj):
    """(colour, shape), (colour, shape, region), a dict, or anything with .colour/.shape(/.box)."""
    if isinstance(obj, dict):
        return obj["colour"], obj["shape"], obj.get("region", obj.get("mask", obj.get("box")))
    if hasattr(obj, "colour") and hasattr(obj, "shape"):
        return obj.colour, obj.shape, getattr(obj, "box", None)
    obj = tuple(obj)
    return obj[0], obj[1], (obj[2] if len(obj) > 2 else None)


def score_image(image, expected, min_area_fraction: float = MIN_AREA_FRACTION) -> SceneScore:
    """Score ``image`` against the expected objects (see the module docstring)."""
    rgb = to_rgb_array(image)
    blobs = find_blobs(rgb, min_area_fraction)
    exp = [_parse_expected(o) for o in expected]
    for c, s, _ in exp:
        if c not in PALETTE or s not in SHAPES:
            raise ValueError(f"unknown object {c!r} {s!r}; colours {list(PALETTE)}, shapes {list(SHAPES)}")
    regions = [region_mask(r, rgb.shape[:2]) for _, _, r in exp]

    # Greedy matching, best pairs first: colour+shape > shape > colour; ties by overlap with the region.
    cands = []
    for i, (c, s, _) in enumerate(exp):
        for j, b in enumerate(blobs):
            level = 2 * (b.shape == s) + (b.colour == c) + (b.shape == s and b.colour == c)
            if level == 0:
                continue
            overlap = 0.0 if regions[i] is None else float((b.mask & regions[i]).sum()) / b.area
            cands.append((level, overlap, b.area, i, j))
    cands.sort(key=lambda t: (-t[0], -t[1], -t[2]))
    match: dict[int, int] = {}
    used: set[int] = set()
    for level, _, _, i, j in cands:
        if i in match or j in used or level < 2:  # colour alone is not a match
            continue
        match[i] = j
        used.add(j)

    scores = []
    for i, (c, s, _) in enumerate(exp):
        b = blobs[match[i]] if i in match else None
        iou = inside = None
        if regions[i] is not None:
            if b is None:
                iou, inside = 0.0, 0.0
            else:
                inter = float((b.mask & regions[i]).sum())
                iou = inter / float((b.mask | regions[i]).sum())
                inside = inter / b.area
        scores.append(ObjectScore(
            colour=c, shape=s, present=b is not None, bound=b is not None and b.colour == c,
            colour_present=any(bb.colour == c for bb in blobs), matched=b, iou=iou, inside_fraction=inside,
        ))
    return SceneScore(scores, blobs)


def relation_holds(a: ObjectScore, b: ObjectScore, relation: str) -> bool:
    """Whether matched object ``a`` stands in ``relation`` ("to the left of", ...) to ``b``."""
    if a.matched is None or b.matched is None:
        return False
    (ax, ay), (bx, by) = a.matched.centroid, b.matched.centroid
    dx, dy = bx - ax, by - ay
    if relation == "to the left of":
        return dx > 0 and abs(dx) >= abs(dy)
    if relation == "to the right of":
        return dx < 0 and abs(dx) >= abs(dy)
    if relation == "above":
        return dy > 0 and abs(dy) >= abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) >= abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def objects_of_prompt(prompt: str) -> list[tuple[str, str]] | None:
    """The (colour, shape) objects a shapes-world prompt names ("a red circle and a blue square", "a red circle, a
    blue square and a green triangle"), in order; None unless every phrase between "and"s and commas is "a COLOUR
    SHAPE" (a prompt the exact scorer can judge)."""
    from .data import COLOURS, SHAPES

    objects = []
    for phrase in re.split(r"\s*,\s*and\s+|\s*,\s*|\s+and\s+", prompt.lower().strip()):
        words = phrase.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            return None
        objects.append((words[1], words[2]))
    return objects or None


def judged(image, objects: list[tuple[str, str]], boxes=None) -> str:
    """One image's outcome in words: "missing: ...", "mis-bound: ..." (a shape present in another colour), with
    `boxes` (one per object, fractions of the image) "outside its box: ...", else "all bound" ("all placed" with
    boxes)."""
    scored = score_image(image, [(c, s, box) for (c, s), box in zip(objects, boxes or [(0.0, 0.0, 1.0, 1.0)] *
                                                                     len(objects))])
    missing = [f"{o.colour} {o.shape}" for o in scored.objects if not o.present]
    if missing:
        return "missing: " + ", ".join(missing)
    wrong = [f"{o.colour} {o.shape}" for o in scored.objects if not o.bound]
    if wrong:
        return "mis-bound: " + ", ".join(wrong)
    if boxes is None:
        return "all bound"
    outside = [f"{o.colour} {o.shape}" for o in scored.objects if not o.inside]
    return "outside its box: " + ", ".join(outside) if outside else "all placed"
