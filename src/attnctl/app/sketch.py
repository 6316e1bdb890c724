"""From what a person gives the page to a layout: the painted canvas as a flat-colour sketch, the colours found on it,
typed boxes, and the layout data that `attnctl generate --layout` reads. No web framework here: the page calls these
and shows their UsageErrors."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..layout import MAX_PIXELS, Layout

WHITE = (255, 255, 255)
# none lies near a mix of two others or of one and white, so that edges blended between them are told apart
BRUSH_COLOURS = ("#e6194b", "#0082c8", "#3cb44b", "#ffe119", "#911eb4", "#46f0f0", "#f032e6", "#000000")
MAX_COLOURS = len(BRUSH_COLOURS)  # one phrase box per colour on the page
MIN_SHARE = 0.002  # a colour covering less of the sketch is noise, not a region
BLEND_DISTANCE = 16.0  # RGB distance within which a colour counts as a mix of two more common ones


def hex_colour(rgb) -> str:
    """An (r, g, b) colour as "#rrggbb"."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def flat_sketch(image: np.ndarray | None) -> np.ndarray | None:
    """A canvas (H×W×3 or ×4, uint8) as a sketch of flat colours: transparent pixels are white (background); the
    colours of regions are those, from the most common, that cover at least MIN_SHARE of the canvas and are not a mix
    of two more common ones (a brush's soft edge or a resized upload blends neighbours); every other pixel takes the
    nearest region colour or white. None for no canvas."""
    if image is None:
        return None
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise UsageError(f"the sketch must be an RGB or RGBA image, not an array of shape {image.shape} "
                         f"({image.dtype})")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise UsageError(f"the sketch is {image.shape[1]}×{image.shape[0]} pixels, more than the {MAX_PIXELS:,} a "
                         "layout reads; 1024×1024 is plenty")
    rgb = image[..., :3].copy()
    if image.shape[-1] == 4:
        rgb[image[..., 3] < 128] = WHITE
    colours, inverse, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True, return_counts=True)
    palette = [np.array(WHITE, dtype=np.float64)]
    for i in np.argsort(-counts, kind="stable"):
        colour = colours[i].astype(np.float64)
        if counts[i] < MIN_SHARE * counts.sum():
            break
        if not any(np.array_equal(colour, p) for p in palette) and not _is_blend(colour, palette):
            palette.append(colour)
    palette = np.stack(palette)
    distance = ((colours[:, None, :].astype(np.float64) - palette[None]) ** 2).sum(-1)
    snapped = palette[distance.argmin(1)].astype(np.uint8)  # each distinct colour to its nearest kept one
    return snapped[inverse.reshape(-1)].reshape(rgb.shape)


def _is_blend(colour: np.ndarray, palette: list[np.ndarray]) -> bool:
    """Whether `colour` lies within BLEND_DISTANCE of the segment between two palette colours."""
    for i, a in enumerate(palette):
        for b in palette[i + 1 :]:
            d = b - a
            t = np.clip(np.dot(colour - a, d) / np.dot(d, d), 0.0, 1.0)
            if np.linalg.norm(colour - (a + t * d)) < BLEND_DISTANCE:
                return True
    return False


def sketch_colours(sketch: np.ndarray | None) -> list[tuple[str, float]]:
    """The sketch's colours other than white, largest first, each with its share of the pixels."""
    if sketch is None:
        return []
    colours, counts = np.unique(sketch.reshape(-1, 3), axis=0, return_counts=True)
    found = [(hex_colour(c), float(n / counts.sum())) for c, n in zip(colours, counts) if tuple(c) != WHITE]
    found.sort(key=lambda item: -item[1])
    if len(found) > MAX_COLOURS:
        raise UsageError(f"the sketch has {len(found)} colours besides white; the page takes at most {MAX_COLOURS} "
                         "(one per object): paint with the brush's colours, or flatten the sketch's colours")
    return found


def parse_boxes(text: str) -> list[dict]:
    """Typed boxes, one per line: `phrase: x0, y0, x1, y1` (fractions of the image, origin top left)."""
    regions = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        phrase, colon, numbers = line.rpartition(":")
        try:
            box = [float(x) for x in numbers.replace(",", " ").split()]
        except ValueError:
            box = []
        if not colon or not phrase.strip() or len(box) != 4:
            raise UsageError(f"box line {number} ({line.strip()!r}): write a box as `phrase: x0, y0, x1, y1` with "
                             "fractions of the image, e.g. `a red circle: 0.05, 0.25, 0.45, 0.75`")
        regions.append({"phrase": phrase.strip(), "box": box})
    return regions


def layout_data(prompt: str, background: str, colours: list[str], phrases: list[str], boxes: str,
                sketch_name: str = "sketch.png") -> dict:
    """The layout JSON of the page: a region per sketch colour (its phrase from the box beside it) and per typed
    box. A colour without a phrase is refused (its object would silently become background)."""
    regions = []
    for colour, phrase in zip(colours, phrases):
        if not (phrase or "").strip():
            raise UsageError(f"colour {colour} has no phrase: type the words of the prompt that name what is painted "
                             "in it (e.g. \"a red balloon\"), or paint over it in white")
        regions.append({"phrase": phrase.strip(), "color": colour})
    regions += parse_boxes(boxes)
    if not regions:
        raise UsageError("the layout has no regions: paint each object in its own colour (or upload a sketch), or "
                         "type boxes, and give each its phrase")
    data = {"prompt": (prompt or "").strip(), "background": (background or "").strip(), "regions": regions}
    if colours:
        data["sketch"] = sketch_name
    return data


def page_layout(prompt: str, background: str, sketch: np.ndarray | None, phrases: list[str], boxes: str) -> Layout:
    """The page's layout, checked as `attnctl generate --layout` checks a file (UsageError with the same message)."""
    colours = [c for c, _ in sketch_colours(sketch)]
    data = layout_data(prompt, background, colours, phrases[: len(colours)], boxes)
    return Layout.from_dict(data, where="layout", sketch=sketch if colours else None)
