"""What diffusers users routinely combine with a pipeline, with attnctl attached: Capture leaves the image bit for bit
what the combination gives alone, a method changes it, and the pipeline is restored exactly afterwards."""

import contextlib

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Capture, Regulation

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red dog and a grey cat"


@contextlib.contextmanager
def lora(pipe):
    """A random LoRA on the UNet's attention projections (peft, the route `load_lora_weights` takes), at scale 0.5
    through `cross_attention_kwargs`."""
    from peft import LoraConfig

    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="random")
    try:
        yield pipe, dict(cross_attention_kwargs={"scale": 0.5})
    finally:
        pipe.unet.unload_lora()  # removes the peft layers too (delete_adapters leaves them)


@contextlib.contextmanager
def controlnet(pipe):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(4)
    net = ControlNetModel.from_unet(pipe.unet)
    for p in net.controlnet_down_blocks.parameters():  # from_unet zero-initialises these: make the control matter
        p.data.normal_(0, 0.3)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    yield StableDiffusionControlNetPipeline(**pipe.components, controlnet=net), dict(image=control)


@contextlib.contextmanager
def step_callback(pipe):
    def cut_guidance(pipe, step, timestep, tensors):  # the CFG-cutoff idiom: stop guidance after the first step
        if step == 0:
            pipe._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    yield pipe, dict(callback_on_step_end=cut_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"])


@contextlib.contextmanager
def bfloat16(pipe):
    pipe.to(torch.bfloat16)
    try:
        yield pipe, {}
    finally:
        pipe.to(torch.float32)


@contextlib.contextmanager
def vae_slicing(pipe):
    pipe.vae.enable_slicing()
    try:
        yield pipe, dict(num_images_per_prompt=2)
    finally:
        pipe.vae.disable_slicing()


COMBINATIONS = {"lora": lora, "controlnet": controlnet, "callback_on_step_end": step_callback,
                "bfloat16": bfloat16, "vae_slicing": vae_slicing}


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_capture_is_bit_identical_and_regulation_edits_under(combination):
    base = tiny_pipe("unet")
    with COMBINATIONS[combination](base) as (pipe, extra):
        before, weights = processors(pipe), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        kwargs = call_kwargs("unet", steps=2, height=256, width=256, output_type="latent", **extra)
        alone = run(pipe, PROMPT, **kwargs)
        capture = Capture(["dog"])
        with attnctl.apply(pipe, capture, prompt=PROMPT):
            captured = run(pipe, PROMPT, **kwargs)
        with attnctl.apply(pipe, Regulation(["dog", "cat"], edit_steps=2, iterations=2), prompt=PROMPT):
            regulated = run(pipe, PROMPT, **kwargs)
        again = run(pipe, PROMPT, **kwargs)
        assert processors(pipe) == before and same_weights(pipe.unet.state_dict(), weights)
    assert torch.equal(captured, alone) and torch.equal(again, alone)
    assert capture.maps() and all(torch.isfinite(m.float()).all() for m in capture.maps().values())
    assert (regulated.float() - alone.float()).abs().max() > 1e-3


def test_two_controllers_in_one_apply_give_what_each_gives():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2, height=256, width=256, output_type="latent")
    regulation = dict(targets=["dog", "cat"], edit_steps=2, iterations=2)
    with attnctl.apply(pipe, Regulation(**regulation), prompt=PROMPT):
        alone = run(pipe, PROMPT, **kwargs)
    capture = Capture(["dog"])
    with attnctl.apply(pipe, capture, Regulation(**regulation), prompt=PROMPT):
        together = run(pipe, PROMPT, **kwargs)
    assert torch.equal(together, alone)
    np.testing.assert_array_less(0, [float(m.max()) for m in capture.maps().values()])
