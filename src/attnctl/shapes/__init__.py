"""The shapes world: a synthetic text-to-image task with exactly known truth.

* :mod:`.data`    seeded scenes of flat-coloured shapes, captions, masks, the held-out split
* :mod:`.scorer`  exact detector: colour segmentation + shape classification + matching
* :mod:`.models`  configs/builders of the tiny pipelines and their small CLIP BPE vocabulary
* :mod:`.train`   training from scratch (``python -m attnctl.shapes.train``)
* :mod:`.cli`     ``attnctl shapes train``

The trained pipelines ship in ``attnctl/builtin/shapes-unet`` (StableDiffusionPipeline) and
``attnctl/builtin/shapes-mmdit`` (StableDiffusion3Pipeline); :func:`builtin_model_path` finds them
and :func:`load_builtin` loads them.
"""

from __future__ import annotations

from pathlib import Path

from .data import (
    COLOURS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    RELATIONS,
    SHAPES,
    Rendered,
    Scene,
    ShapeObject,
    caption_for,
    render,
    sample_scene,
)
from .scorer import ObjectScore, SceneScore, relation_holds, score_image

BUILTIN_MODELS = {"shapes-unet": "StableDiffusionPipeline", "shapes-mmdit": "StableDiffusion3Pipeline"}


def builtin_model_path(name: str) -> Path:
    """Folder of a shipped shapes-world pipeline ("shapes-unet" or "shapes-mmdit")."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    return Path(__file__).resolve().parent.parent / "builtin" / name


def load_builtin(name: str, **kwargs):
    """Load a shipped shapes-world pipeline on CPU in float32.

    ``shapes-mmdit`` has no T5: it is loaded with ``text_encoder_3=None, tokenizer_3=None``, as
    diffusers requires for SD3 pipelines saved without one.
    """
    import diffusers

    cls = getattr(diffusers, BUILTIN_MODELS[name])
    if name == "shapes-mmdit":
        kwargs.setdefault("text_encoder_3", None)
        kwargs.setdefault("tokenizer_3", None)
    return cls.from_pretrained(builtin_model_path(name), **kwargs)


__all__ = [
    "BUILTIN_MODELS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "IMAGE_SIZE",
    "ObjectScore",
    "PALETTE",
    "RELATIONS",
    "Rendered",
    "SHAPES",
    "Scene",
    "SceneScore",
    "ShapeObject",
    "builtin_model_path",
    "load_builtin",
    "caption_for",
    "relation_holds",
    "render",
    "sample_scene",
    "score_image",
]
