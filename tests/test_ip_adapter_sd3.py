"""SD3's IP-Adapter (random weights): attnctl's processor computes what diffusers' SD3IPAdapterJointAttnProcessor2_0
computes, bit for bit (its branch: an attention of the image queries on the image tokens and the image-prompt tokens,
those normed by the timestep embedding the transformer's `image_proj` makes, added before the output projection),
with the image-prompt tokens outside the text sequence the methods see; the pipeline still sees an active adapter."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl import AST, Capture
from attnctl.families.sd3 import SD3IPAdapterJointProcessor
from test_ip_adapter import KeyCounts

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red dog and a grey cat"
EMBED_DIM = 8  # the image encoder's features
TIME_DIM = 32  # the image projection's hidden size: its timestep embedding's
LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]},
                                        {"phrase": "grey cat", "box": [0.5, 0, 1, 1]}]}


def load_random_ip_adapter(transformer, scale=0.8):
    """What `pipe.load_ip_adapter` sets up on an SD3 transformer, with random weights: an
    SD3IPAdapterJointAttnProcessor2_0 on every attention, and the image projection (`image_proj`, an
    IPAdapterTimeImageProjection). Returns the processors it replaced."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    saved = dict(transformer.attn_processors)
    inner = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    generator = torch.manual_seed(1)
    processors = {key: SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                         head_dim=transformer.config.attention_head_dim,
                                                         timesteps_emb_dim=TIME_DIM, scale=scale)
                  for key in saved}
    for processor in processors.values():
        for p in processor.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    transformer.set_attn_processor(dict(processors))
    transformer.image_proj = IPAdapterTimeImageProjection(embed_dim=EMBED_DIM, output_dim=inner, hidden_dim=TIME_DIM,
                                                          depth=1, dim_head=8, heads=2, num_queries=4,
                                                          timestep_in_dim=16).eval()
    return saved


def unload(transformer, saved):
    del transformer.image_proj  # (it has an attention layer of its own, not a site)
    transformer.set_attn_processor(dict(saved))


def image_prompt():
    """Image embeddings for a call under classifier-free guidance: the pipeline splits them into the negative half
    and the positive one."""
    embeds = torch.randn(1, 5, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    return dict(ip_adapter_image_embeds=torch.cat([torch.zeros_like(embeds), embeds]))


@pytest.fixture
def sd3_with_ip_adapter():
    pipe = tiny_pipe("sd3")
    plain = run(pipe, PROMPT, **call_kwargs("sd3"))
    saved = load_random_ip_adapter(pipe.transformer)
    try:
        yield pipe, plain
    finally:
        unload(pipe.transformer, saved)
    assert np.array_equal(run(pipe, PROMPT, **call_kwargs("sd3")), plain)


def test_capture_leaves_the_image_bit_identical_and_sees_only_the_text(sd3_with_ip_adapter):
    """Capture attached: the image the adapter makes, bit for bit, the adapter seen active (same modules, same
    weights' names), and every attention call's text the prompt's tokens alone, its probabilities a distribution over
    them and the image tokens. Detached: the adapter's processors back, the image again bit for bit."""
    pipe, plain = sd3_with_ip_adapter
    kwargs = call_kwargs("sd3", **image_prompt())
    expected = run(pipe, PROMPT, **kwargs)
    assert not np.array_equal(expected, plain)  # the adapter does change the image
    processors = dict(pipe.transformer.attn_processors)
    weights = {name: p for name, p in pipe.transformer.named_parameters()}
    keys = KeyCounts()
    with attnctl.apply(pipe, Capture(["dog", "cat"]), keys, prompt=PROMPT) as session:
        assert all(isinstance(p, SD3IPAdapterJointProcessor) for name, p in pipe.transformer.attn_processors.items()
                   if name.startswith("transformer_blocks."))
        assert pipe.is_ip_adapter_active
        assert {name: p for name, p in pipe.transformer.named_parameters()} == weights
        image = run(pipe, PROMPT, **kwargs)
        text_len = session.step.text_len
    assert np.array_equal(image, expected)
    assert dict(pipe.transformer.attn_processors) == processors  # restored, the same objects
    assert {name: p for name, p in pipe.transformer.named_parameters()} == weights
    assert keys.text_lengths == {text_len}
    assert max(keys.total_error) < 1e-5
    assert np.array_equal(run(pipe, PROMPT, **kwargs), expected)


def test_the_adapters_scale_is_read_and_set_on_the_adapter(sd3_with_ip_adapter):
    """`pipe.set_ip_adapter_scale` while attached sets the adapter's own scale, which the run uses (0: the branch is
    off, the image is the plain one) and which stays after detach."""
    pipe, plain = sd3_with_ip_adapter
    kwargs = call_kwargs("sd3", **image_prompt())
    originals = [p for name, p in pipe.transformer.attn_processors.items() if name.startswith("transformer_blocks.")]
    try:
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
            pipe.set_ip_adapter_scale(0.0)
            assert not pipe.is_ip_adapter_active
            image = run(pipe, PROMPT, **kwargs)
        assert np.array_equal(image, plain)
        assert {p.scale for p in originals} == {0.0}
    finally:
        pipe.set_ip_adapter_scale(0.8)


def test_an_ip_adapter_image_is_encoded_while_attached(sd3_with_ip_adapter):
    """Called with `ip_adapter_image` (encoded by the pipeline's image encoder only while it sees an active
    adapter), the image is the one the adapter makes without attnctl, bit for bit."""
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip import SiglipImageProcessorPil

    base, _ = sd3_with_ip_adapter
    torch.manual_seed(3)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=EMBED_DIM, intermediate_size=16, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=16)).eval()
    pipe = StableDiffusion3Pipeline(**{**base.components, "image_encoder": encoder,
                                       "feature_extractor": SiglipImageProcessorPil(size={"height": 32, "width": 32})})
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs("sd3", ip_adapter_image=Image.new("RGB", (32, 32), (200, 30, 30)))
    expected = run(pipe, PROMPT, **kwargs)
    assert not np.array_equal(expected, run(pipe, PROMPT, **call_kwargs("sd3")))
    with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
        image = run(pipe, PROMPT, **kwargs)
    assert np.array_equal(image, expected)


def test_ast_changes_the_ip_adapter_image(sd3_with_ip_adapter):
    pipe, _ = sd3_with_ip_adapter
    kwargs = call_kwargs("sd3", steps=2, **image_prompt())
    expected = run(pipe, PROMPT, **kwargs)
    with attnctl.apply(pipe, AST(LAYOUT), prompt=PROMPT):
        image = run(pipe, PROMPT, **kwargs)
    assert np.abs(image - expected).max() > 1e-3
    assert np.array_equal(run(pipe, PROMPT, **kwargs), expected)
