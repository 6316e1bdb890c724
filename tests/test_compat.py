"""attnctl next to other things a user does with a pipeline: a second `apply` inside the first, processors changed
while attached, processors attnctl cannot reproduce, `torch.compile`, and calling the pipeline twice."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Capture, UsageError
from attnctl.control import Session

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red dog and a grey cat"


def denoiser_of(name, pipe):
    return pipe.unet if name in ("unet", "sdxl") else pipe.transformer


def pipeline_state(denoiser):
    """What attaching may change: the processor objects, an instance `forward`, the diffusers hook registry."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    return (dict(denoiser.attn_processors), denoiser.__dict__.get("forward"),
            None if registry is None else list(registry.hooks))


def captured(pipe, capture, steps=2, prompt=PROMPT):
    with attnctl.apply(pipe, capture, prompt=prompt):
        image = run(pipe, prompt, **call_kwargs("unet", steps=steps))
    return image, capture.maps()


def assert_same_maps(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- 1. a second apply on the same pipeline -------------------------------------------------------------------------
@pytest.mark.parametrize("disjoint", [False, True], ids=["same-sites", "disjoint-sites"])
def test_nested_apply_is_refused_and_the_outer_session_keeps_working(disjoint):
    pipe = tiny_pipe("unet")
    before = pipeline_state(pipe.unet)
    first, second = (s.name for s in Session(pipe, []).sites[:2])
    outer_sites, inner_sites = ([first], [second]) if disjoint else (None, None)
    image, maps = captured(pipe, Capture(["dog"], sites=outer_sites))

    outer = Capture(["dog"], sites=outer_sites)
    with attnctl.apply(pipe, outer, prompt=PROMPT):
        during = pipeline_state(pipe.unet)
        with pytest.raises(UsageError, match=r"already attached to this pipeline; put all controllers in one apply"):
            with attnctl.apply(pipe, Capture(["cat"], sites=inner_sites), prompt=PROMPT):
                pass
        assert pipeline_state(pipe.unet) == during  # the refused apply changed nothing
        again = run(pipe, PROMPT, **call_kwargs("unet", steps=2))
    assert np.array_equal(again, image)
    assert_same_maps(outer.maps(), maps)
    assert pipeline_state(pipe.unet) == before
