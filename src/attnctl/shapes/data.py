"""The shapes world: seeded scenes of flat-coloured shapes on white, with exact truth.

A scene is a list of :class:`ShapeObject` (colour, shape, box) drawn on a white square canvas.
Everything is a pure function of a seed: ``sample_scene(seed)`` and ``render(scene)`` give the
same pixels, masks and caption on every machine.

Captions use a tiny fixed vocabulary::

    a red circle
    a red circle and a blue square
    a red circle to the left of a blue square      (also: to the right of / above / below)
    a red circle and a blue square and a green triangle

Training scenes hold one, two or three objects (:data:`TRAIN_COUNTS`). Two sets of combinations are
never shown in training, so that evaluation can ask for unseen ones: the unordered pairs of
:data:`HELDOUT_PAIRS` (never together in one scene, also not inside a triple) and the triples of
:data:`HELDOUT_TRIPLES` (each of their pairs is seen, the three together never).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64

#: Named colours (RGB, 0-255). Chosen far apart in hue and away from white.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 200, 20),
    "purple": (150, 40, 180),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
BACKGROUND = (255, 255, 255)

#: Every word a caption can contain.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "and"] + list(COLOURS) + list(SHAPES) + [w for r in RELATIONS for w in r.split()]
    )
)

#: Probabilities of one, two and three objects in a training scene. Models trained on 15% pairs and no
#: triples could not draw two objects at all; real models see many multi-object images.
TRAIN_COUNTS: tuple[float, float, float] = (0.3, 0.5, 0.2)


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape. ``box`` is (x0, y0, x1, y1) in pixels, half-open, on the canvas."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """The object as captions name it: "COLOUR SHAPE"."""
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        """The centre (x, y) of ``box``, in pixels."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Scene:
    """The objects on one canvas of ``size`` pixels, drawn in order, and the relation the caption states, if any."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # relation of objects[0] to objects[1], if the caption states one
    size: int = IMAGE_SIZE

    @property
    def caption(self) -> str:
        """The scene's caption (:func:`caption_for`)."""
        return caption_for(self.objects, self.relation)


@dataclass
class Rendered:
    """Pixels and truth of a scene. ``masks[i]`` is the boolean region of ``scene.objects[i]``."""

    scene: Scene
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def caption(self) -> str:
        """The caption of ``scene``."""
        return self.scene.caption

    def to_pil(self):
        """``image`` as a PIL image."""
        from PIL import Image

        return Image.fromarray(self.image)


def caption_for(objects, relation: str | None = None) -> str:
    """The caption of ``objects``: one phrase "a COLOUR SHAPE" each, joined by ``relation`` for a pair that has
    one, else by "and"."""
    phrases = [f"a {o.colour} {o.shape}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2 and relation is not None:
        return f"{phrases[0]} {relation} {phrases[1]}"
    return " and ".join(phrases)


# ----------------------------------------------------------------------------------------------
# Geometry


def shape_mask(shape: str, box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` filling ``box`` (pixel centres inside the shape)."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    w, h = x1 - x0, y1 - y0
    if shape == "square":
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if shape == "circle":
        cx, cy, r = x0 + w / 2.0, y0 + h / 2.0, min(w, h) / 2.0
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "triangle":
        # Upright isosceles triangle: apex at top centre, base along the bottom edge of the box.
        cx = x0 + w / 2.0
        inside_y = (ys >= y0) & (ys < y1)
        half = (ys - y0) / h * (w / 2.0)
        return inside_y & (np.abs(xs - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene) -> Rendered:
    """The scene's pixels on white and each object's mask, objects drawn in order (a later one covers an earlier
    one, whose mask keeps only what stays visible)."""
    size = scene.size
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = []
    for obj in scene.objects:
        m = shape_mask(obj.shape, obj.box, size)
        image[m] = PALETTE[obj.colour]
        masks.append(m)
    # Later objects paint over earlier ones; masks keep the visible part only.
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            masks[i] = masks[i] & ~masks[j]
    return Rendered(scene=scene, image=image, masks=masks)


def relation_between(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> str | None:
    """The relation of box ``a`` to box ``b`` if they are cleanly separated along one axis."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    horiz = ax1 <= bx0 or bx1 <= ax0
    vert = ay1 <= by0 or by1 <= ay0
    if horiz and not vert:
        return "to the left of" if ax1 <= bx0 else "to the right of"
    if vert and not horiz:
        return "above" if ay1 <= by0 else "below"
    if horiz and vert:  # diagonal: use the axis with the larger gap
        gx = max(bx0 - ax1, ax0 - bx1)
        gy = max(by0 - ay1, ay0 - by1)
        if gx >= gy:
            return "to the left of" if ax1 <= bx0 else "to the right of"
        return "above" if ay1 <= by0 else "below"
    return None


# ----------------------------------------------------------------------------------------------
# Sampling


ALL_OBJECTS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _pair_key(a: tuple[str, str], b: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    return tuple(sorted([a, b]))  # type: ignore[return-value]


#: Unordered pairs of (colour, shape) never shown together in training (about one in five of the
#: pairs of two different objects; a fixed, hash-based choice so it never changes).
HELDOUT_PAIRS: frozenset = frozenset(
    _pair_key(a, b)
    for a, b in itertools.combinations(ALL_OBJECTS, 2)
    if _stable_hash(f"{a[0]} {a[1]}|{b[0]} {b[1]}") % 5 == 0
)


def is_heldout_pair(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether the (colour, shape) objects ``a`` and ``b`` are never together in a training scene (either order)."""
    return _pair_key(a, b) in HELDOUT_PAIRS


def _distinct_attributes(objects) -> bool:
    return len({o[0] for o in objects}) == len(objects) == len({o[1] for o in objects})


#: Unordered triples of three colours and three shapes whose pairs are all seen in training but which
#: never appear together (about one in three such triples; fixed by a hash). Triples that contain a
#: held-out pair are unseen as well.
HELDOUT_TRIPLES: frozenset = frozenset(
    tuple(sorted(t))
    for t in itertools.combinations(ALL_OBJECTS, 3)
    if _distinct_attributes(t)
    and not any(is_heldout_pair(a, b) for a, b in itertools.combinations(t, 2))
    and _stable_hash("|".join(f"{c} {s}" for c, s in sorted(t))) % 3 == 0
)


def is_heldout_triple(objects) -> bool:
    """Whether three objects never appear together in training: a held-out triple, or one with a held-out pair."""
    return tuple(sorted(objects)) in HELDOUT_TRIPLES or any(
        is_heldout_pair(a, b) for a, b in itertools.combinations(objects, 2))


def _random_box(rng: np.random.Generator, side: int, size: int, shape: str) -> tuple[int, int, int, int]:
    x0 = int(rng.integers(2, size - side - 1))
    y0 = int(rng.integers(2, size - side - 1))
    return (x0, y0, x0 + side, y0 + side)


def _gap_ok(a, b, gap: int) -> bool:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def sample_scene(
    seed: int,
    n_objects: int | None = None,
    split: str = "train",
    size: int = IMAGE_SIZE,
    counts: tuple[float, ...] = TRAIN_COUNTS,
    relation_fraction: float = 0.5,
) -> Scene:
    """A random scene, fully determined by ``seed`` (and the other arguments).

    ``split="train"`` never produces a held-out pair or triple; ``split="heldout"`` produces only
    held-out ones (with ``n_objects`` 2 or 3); ``split="any"`` draws from everything. With
    ``n_objects=None`` the count is drawn from ``counts`` (probabilities of 1, 2, 3 objects). A
    relation is stated for pairs only, in ``relation_fraction`` of them.
    """
    rng = np.random.default_rng([seed, 0x5A4E])
    if n_objects is None:
        n_objects = 1 + int(rng.choice(len(counts), p=np.asarray(counts) / sum(counts)))
    if n_objects not in (1, 2, 3):
        raise ValueError("n_objects must be 1, 2 or 3")
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"unknown split {split!r}")
    if n_objects == 1:
        colour, shape = ALL_OBJECTS[int(rng.integers(len(ALL_OBJECTS)))]
        side = int(rng.integers(round(size * 0.28), round(size * 0.56) + 1))
        return Scene((ShapeObject(colour, shape, _random_box(rng, side, size, shape)),), None, size)

    # Different objects (they differ in colour or shape, so captions are unambiguous).
    unseen = is_heldout_pair if n_objects == 2 else (lambda *objs: is_heldout_triple(objs))
    while True:
        picks = [ALL_OBJECTS[int(i)] for i in rng.choice(len(ALL_OBJECTS), size=n_objects, replace=False)]
        if split == "any" or (split == "heldout") == unseen(*picks):
            break
    low, high = (0.22, 0.38) if n_objects == 2 else (0.2, 0.3)
    while True:
        sides = rng.integers(round(size * low), round(size * high) + 1, size=n_objects)
        boxes = [_random_box(rng, int(s), size, "") for s in sides]
        if all(_gap_ok(a, b, gap=max(2, size // 16)) for a, b in itertools.combinations(boxes, 2)):
            break
    objs = tuple(ShapeObject(c, s, box) for (c, s), box in zip(picks, boxes))
    relation = None
    if n_objects == 2 and rng.random() < relation_fraction:
        relation = relation_between(boxes[0], boxes[1])
    return Scene(objs, relation, size)


def make_batch(seeds, **kwargs) -> list[Rendered]:
    """The rendered scenes of ``seeds``; ``kwargs`` go to :func:`sample_scene`."""
    return [render(sample_scene(int(s), **kwargs)) for s in seeds]


def images_to_array(rendered: list[Rendered]) -> np.ndarray:
    """(N, 3, H, W) float32 in [-1, 1], the range diffusers VAEs use."""
    arr = np.stack([r.image for r in rendered]).astype(np.float32) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2).copy()
