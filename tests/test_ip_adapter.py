"""IP-Adapter loaded (random weights) on a UNet and on FLUX.1: attnctl's processors compute what diffusers' IP-Adapter
processors compute, bit for bit, with the image-prompt tokens outside the text sequence the methods see."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl import AST, Capture, Regulation

from conftest import call_kwargs, denoiser_of, run, tiny_pipe

PROMPT = "a red dog and a grey cat"
EMBED_DIM = 8


def load_random_ip_adapter(pipe, name):
    """What `pipe.load_ip_adapter` sets up, with random weights: IP-Adapter processors on the cross-attention
    (UNet) or double-block (FLUX) sites, and the image projection. Returns the processors it replaced."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    denoiser = denoiser_of(name, pipe)
    saved = dict(denoiser.attn_processors)
    generator = torch.manual_seed(1)
    processors = {}
    for key, processor in saved.items():
        module = denoiser.get_submodule(key[: -len(".processor")])
        if name == "unet" and key.endswith("attn2.processor"):
            processors[key] = IPAdapterAttnProcessor2_0(module.inner_dim, module.cross_attention_dim, scale=0.8)
        elif name == "flux" and key.startswith("transformer_blocks."):
            processors[key] = FluxIPAdapterAttnProcessor(module.inner_dim, denoiser.config.joint_attention_dim,
                                                         scale=0.8)
        else:
            processors[key] = processor
    for processor in processors.values():
        for p in getattr(processor, "parameters", list)():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    denoiser.set_attn_processor(dict(processors))
    dim = denoiser.config.cross_attention_dim if name == "unet" else denoiser.config.joint_attention_dim
    denoiser.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=EMBED_DIM, cross_attention_dim=dim, num_image_text_embeds=4)])
    if name == "unet":
        denoiser.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return saved


def unload(pipe, name, saved):
    denoiser = denoiser_of(name, pipe)
    denoiser.set_attn_processor(dict(saved))
    denoiser.encoder_hid_proj = None
    if name == "unet":
        denoiser.register_to_config(encoder_hid_dim_type=None)


def image_prompt(name, **extra):
    embeds = torch.randn(1, 1, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    if name == "unet":  # under CFG the pipeline splits the embeddings into the negative and the positive half
        return dict(ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])], **extra)
    return dict(ip_adapter_image_embeds=[embeds], negative_ip_adapter_image_embeds=[torch.zeros_like(embeds)],
                **extra)


@pytest.fixture(params=["unet", "flux"])
def with_ip_adapter(request):
    name = request.param
    pipe = tiny_pipe(name)
    plain_image = run(pipe, PROMPT, **call_kwargs(name))
    saved = load_random_ip_adapter(pipe, name)
    try:
        yield name, pipe, plain_image
    finally:
        unload(pipe, name, saved)
    assert np.array_equal(run(pipe, PROMPT, **call_kwargs(name)), plain_image)


def test_capture_leaves_the_ip_adapter_image_bit_identical_and_sees_only_the_text(with_ip_adapter):
    name, pipe, plain_image = with_ip_adapter
    kwargs = call_kwargs(name, **image_prompt(name))
    expected = run(pipe, PROMPT, **kwargs)
    assert not np.array_equal(expected, plain_image)  # the adapter does change the image
    processors = dict(denoiser_of(name, pipe).attn_processors)
    keys = KeyCounts()
    with attnctl.apply(pipe, Capture(["dog", "cat"]), keys, prompt=PROMPT) as session:
        image = run(pipe, PROMPT, **kwargs)
        text_len = session.step.text_len or 77
    assert np.array_equal(image, expected)
    assert dict(denoiser_of(name, pipe).attn_processors) == processors  # restored
    # every call's text is the prompt's tokens alone, and its probabilities are a distribution over them plus (joint
    # attention) the image tokens: the adapter's image tokens are in neither
    assert keys.text_lengths == {text_len}
    assert max(keys.total_error) < 1e-5


class KeyCounts(attnctl.Controller):
    """An observer: the text length of each call, and how far each row's probabilities over all keys are from 1."""

    observer = True

    def attach(self, session):
        self.text_lengths, self.total_error = set(), []

    def __call__(self, call):
        self.text_lengths.add(call.text.stop - call.text.start)
        image_keys = call.k[:, :, call.image] if call.k.shape[2] > call.text.stop - call.text.start else None
        total = call.text_probs().sum(-1)
        if image_keys is not None:  # joint attention: the image keys take the rest
            s = (call.q[:, :, call.image].float() @ image_keys.float().transpose(-1, -2)) * call.scale
            total = total + torch.exp(s - call.lse()[:, :, call.image, None]).sum(-1)
        self.total_error.append(float((total - 1).abs().max()))


def test_the_methods_change_the_ip_adapter_image(with_ip_adapter):
    name, pipe, _ = with_ip_adapter
    if name == "unet":
        kwargs = call_kwargs(name, steps=2, height=256, width=256, **image_prompt(name))  # its layers at 8x8
        method = Regulation(["dog", "cat"], edit_steps=2, iterations=2)
    else:
        kwargs = call_kwargs(name, steps=2, **image_prompt(name))
        method = AST({"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]},
                                                    {"phrase": "grey cat", "box": [0.5, 0, 1, 1]}]})
    expected = run(pipe, PROMPT, **kwargs)
    with attnctl.apply(pipe, method, prompt=PROMPT):
        image = run(pipe, PROMPT, **kwargs)
    assert np.abs(image - expected).max() > 1e-3


def test_ip_adapter_masks_are_honoured_bit_for_bit():
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    pipe = tiny_pipe("unet")
    saved = load_random_ip_adapter(pipe, "unet")
    try:
        left = np.zeros((64, 64), dtype=np.uint8)
        left[:, :32] = 255
        masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(left)], height=64, width=64)
        kwargs = call_kwargs("unet", **image_prompt("unet", cross_attention_kwargs={"ip_adapter_masks": [masks]}))
        unmasked = run(pipe, PROMPT, **call_kwargs("unet", **image_prompt("unet")))
        expected = run(pipe, PROMPT, **kwargs)
        assert not np.array_equal(expected, unmasked)
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
            image = run(pipe, PROMPT, **kwargs)
        assert np.array_equal(image, expected)
    finally:
        unload(pipe, "unet", saved)
