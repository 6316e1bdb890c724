"""The shapes world: a synthetic text-to-image task with exactly known truth.

* :mod:`.data`    seeded scenes of flat-coloured shapes, captions, masks, the held-out split
* :mod:`.scorer`  exact detector: colour segmentation + shape classification + matching
* :mod:`.models`  configs/builders of the tiny pipelines and their small CLIP BPE vocabulary
* :mod:`.train`   training from scratch (``attnctl shapes train``; its flags in :mod:`attnctl.cli.shapes`)

The trained pipelines ship in ``attnctl/builtin/shapes-unet`` (StableDiffusionPipeline) and
``attnctl/builtin/shapes-mmdit`` (StableDiffusion3Pipeline); load them as ``builtin:shapes-unet`` /
``builtin:shapes-mmdit`` (:func:`attnctl.models.load_pipeline`).
"""

from __future__ import annotations

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

__all__ = [
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
    "caption_for",
    "relation_holds",
    "render",
    "sample_scene",
    "score_image",
]
