"""Attend-and-Excite's arithmetic against diffusers' own pipeline functions (the oracle), on random maps."""

import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
    GaussianSmoothing,
    StableDiffusionAttendAndExcitePipeline,
)

from attnctl.methods.attend_excite_math import max_attention_per_token, neglect_loss, smoothing_kernel

REFERENCE = StableDiffusionAttendAndExcitePipeline
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside diffusers' GaussianSmoothing


def test_kernel_is_the_reference_smoothing():
    assert torch.allclose(smoothing_kernel(), GaussianSmoothing().weight, rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed, sharpness", [(0, 1.0), (1, 8.0), (2, 30.0)])
def test_max_attention_and_loss_equal_the_reference(seed, sharpness):
    g = torch.Generator().manual_seed(seed)
    maps = torch.softmax(torch.randn(16, 16, 77, generator=g) * sharpness, dim=-1)
    indices = [2, 5, 9]
    want = REFERENCE._compute_max_attention_per_index(maps.clone(), indices)  # it scales its input in place
    got = max_attention_per_token(maps, indices)
    assert torch.allclose(got, torch.stack(want), rtol=0, atol=1e-6)
    assert abs(float(neglect_loss(got)) - float(REFERENCE._compute_loss(want))) < 1e-6


def test_loss_is_zero_when_every_target_is_fully_attended():
    assert float(neglect_loss(torch.tensor([1.0, 1.2]))) == 0.0
    assert float(neglect_loss(torch.tensor([0.9, 0.3]))) == pytest.approx(0.7)
