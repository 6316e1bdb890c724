"""Layout attention modulation: the merged two-part path against the whole masked softmax in float64, and the
controller on cross-attention (UNet) and joint attention (SD3, FLUX) models."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl.methods.layout_modulation import (
    LayoutModulation,
    LayoutModulationConfig,
    ModulationTables,
    biased_scores,
    modulated_image_rows,
    pulled_and_pushed,
    reference_attention,
)

from conftest import call_kwargs, denoiser_of, run, tiny_pipe

LAYOUT = {"prompt": "a red cat and a blue dog on grass", "background": "grass",
          "regions": [{"phrase": "a red cat", "box": [0, 0, 0.5, 1]}, {"phrase": "a blue dog", "box": [0.5, 0, 1, 1]}]}


def random_case(n_text, n_image, text_first, n_context=0, batch=2, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_text + n_image + n_context
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) for _ in range(3))
    text = slice(0, n_text) if text_first else slice(n_image, n_image + n_text)
    image = slice(n_text, n_text + n_image) if text_first else slice(0, n_image)
    tables = ModulationTables(img_label=torch.randint(0, 3, (batch, n_image), generator=g),
                              txt_label=torch.randint(-1, 3, (batch, n_text), generator=g),
                              scale=torch.rand(batch, n_image, generator=g, dtype=torch.float64) * 0.9)
    return q, k, v, text, image, tables


@pytest.mark.parametrize("n_text, n_image, text_first, n_context", [(7, 16, True, 0), (7, 16, False, 0),
                                                                     (7, 16, True, 5), (7, 16, None, 0)])
def test_the_merged_path_is_the_masked_softmax(n_text, n_image, text_first, n_context):
    """Cross-attention (keys: text only), FLUX's order (text first, with Kontext's context tokens after), SD3's."""
    if text_first is None:  # cross-attention: queries are the image, keys the text
        g = torch.Generator().manual_seed(1)
        q = torch.randn(2, 3, n_image, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(2, 3, n_text, 8, generator=g, dtype=torch.float64) for _ in range(2))
        tables = random_case(n_text, n_image, True)[-1]
        expected = torch.softmax(biased_scores((q @ k.transpose(-1, -2)) * 0.3, tables), dim=-1) @ v
        text, q_img = slice(0, n_text), q
    else:
        q, k, v, text, image, tables = random_case(n_text, n_image, text_first, n_context)
        expected = reference_attention(q, k, v, text, image, 0.3, tables)[:, :, image]
        q_img = q[:, :, image]
    out64, probs = modulated_image_rows(q_img, k, v, text, 0.3, tables)
    assert (out64 - expected).abs().max() < 1e-12
    out32, _ = modulated_image_rows(q_img.float(), k.float(), v.float(), text, 0.3, tables)
    assert (out32.double() - expected).abs().max() < 1e-5
    assert probs.sum(-1).max() <= 1 + 1e-6  # image→text probabilities: a part of each row


@pytest.mark.parametrize("cross", [True, False])
def test_a_key_mask_hides_its_keys_from_the_modulation_and_the_softmax(cross):
    """Sana/PixArt (cross-attention) and Chroma (joint, text first) hide padding keys: they get probability 0, and the
    modulation's maximum and minimum run over the keys shown (per image row), by the formula written out in float64."""
    n_text, n_image = 7, 16
    q, k, v, text, image, tables = random_case(n_text, n_image, True)
    if cross:
        k, v, text, image, q = k[:, :, text], v[:, :, text], slice(0, n_text), slice(0, n_image), q[:, :, image]
    n_keys = k.shape[2]
    hidden = torch.zeros(2, n_keys, dtype=torch.bool)
    hidden[0, text.stop - 3:text.stop] = True  # three padding keys in the first row, one in the second
    hidden[1, text.stop - 1] = True
    bias = torch.zeros(2, 1, 1, n_keys, dtype=torch.float64).masked_fill(hidden[:, None, None], float("-inf"))
    S = (q @ k.transpose(-1, -2)) * 0.3
    block = S[:, :, image, text]
    shown = ~hidden[:, None, None, text]
    top = torch.where(shown, block, -torch.inf).amax(-1, keepdim=True)
    bottom = torch.where(shown, block, torch.inf).amin(-1, keepdim=True)
    pulled, pushed = pulled_and_pushed(tables)
    lam = tables.scale[:, None, :, None]
    S[:, :, image, text] = block + lam * (top - block) * pulled[:, None] - lam * (block - bottom) * pushed[:, None]
    expected = (torch.softmax(S.masked_fill(hidden[:, None, None], -torch.inf), dim=-1) @ v)[:, :, image]
    q_img = q[:, :, image]
    out64, probs = modulated_image_rows(q_img, k, v, text, 0.3, tables, bias)
    assert (out64 - expected).abs().max() < 1e-12
    assert probs[0, ..., -3:].abs().max() == 0 and probs[1, ..., -1].abs().max() == 0
    out32, _ = modulated_image_rows(q_img.float(), k.float(), v.float(), text, 0.3, tables, bias.float())
    assert (out32.double() - expected).abs().max() < 1e-5
    if not cross:
        reference = reference_attention(q, k, v, text, image, 0.3, tables, bias)[:, :, image]
        assert (reference - expected).abs().max() < 1e-12


def test_pulled_tokens_gain_and_pushed_tokens_lose_probability():
    q, k, v, text, image, tables = random_case(7, 16, True)
    S = (q[:, :, image] @ k[:, :, text].transpose(-1, -2)) * 0.3
    after = biased_scores(S, tables)
    pulled = (tables.img_label[:, :, None] == tables.txt_label[:, None, :]) & (tables.txt_label[:, None, :] >= 0)
    pushed = (tables.txt_label[:, None, :] >= 0) & ~pulled
    neutral = tables.txt_label[:, None, :].expand_as(pulled) < 0
    assert pulled.any() and pushed.any() and neutral.any()
    delta = after - S
    assert (delta[pulled[:, None].expand_as(delta)] >= 0).all()
    assert (delta[pushed[:, None].expand_as(delta)] <= 0).all()
    assert (delta[neutral[:, None].expand_as(delta)] == 0).all()
    assert (after.amax(-1) <= S.amax(-1) + 1e-12).all()  # a pulled score reaches at most the row's maximum
    assert (after.amin(-1) >= S.amin(-1) - 1e-12).all()  # a pushed one at least its minimum


@pytest.mark.parametrize("name", ["unet", "sd3", "flux"])
def test_the_controller_changes_the_image_and_strength_0_is_plain(name):
    pipe = tiny_pipe(name)
    before = dict(denoiser_of(name, pipe).attn_processors)
    kwargs = call_kwargs(name, steps=4)
    plain = run(pipe, LAYOUT["prompt"], **kwargs)
    with attnctl.apply(pipe, LayoutModulation(LAYOUT, weight=5.0)):
        moved = run(pipe, LAYOUT["prompt"], **kwargs)
    with attnctl.apply(pipe, LayoutModulation(LAYOUT, strength=0.0)):
        same = run(pipe, LAYOUT["prompt"], **kwargs)
    with attnctl.apply(pipe, LayoutModulation(LAYOUT, weight=5.0, steps_fraction=0.0)):
        unmodulated = run(pipe, LAYOUT["prompt"], **kwargs)
    assert np.abs(moved - plain).max() > 1e-3
    assert np.array_equal(same, plain) and np.array_equal(unmodulated, plain)
    assert dict(denoiser_of(name, pipe).attn_processors) == before


def test_observers_see_the_modulated_probabilities():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2)
    maps = []
    for weight in (0.0, 50.0):
        capture = attnctl.Capture(["cat"])
        with attnctl.apply(pipe, LayoutModulation(LAYOUT, weight=weight, steps_fraction=1.0), capture):
            run(pipe, LAYOUT["prompt"], **kwargs)
        maps.append(capture.grouped())
    group = max(maps[0], key=lambda label: maps[0][label].shape[-1])  # the finest grid
    plain, modulated = (m[group][0, 0] for m in maps)
    w = plain.shape[-1]
    # "cat" is pulled in the left half and pushed in the right half
    assert modulated[:, : w // 2].mean() > plain[:, : w // 2].mean()
    assert modulated[:, w // 2:].mean() < plain[:, w // 2:].mean()


def test_bad_options_are_refused():
    with pytest.raises(attnctl.UsageError, match="steps_fraction"):
        LayoutModulationConfig(steps_fraction=1.5)
    with pytest.raises(attnctl.UsageError, match="weight"):
        LayoutModulation(LAYOUT, weight=-1)


@pytest.mark.parametrize("text_first, n_context", [(True, 0), (False, 0), (True, 5)])
def test_the_hard_mask_is_the_softmax_without_other_regions_phrases(text_first, n_context):
    """Written out directly in float64: an image token of region r sees its own phrase, the background's only if it
    is background, every token in no phrase and every non-text key; nothing of another region's phrase."""
    import dataclasses

    q, k, v, text, image, tables = random_case(7, 16, text_first, n_context, seed=3)
    tables = dataclasses.replace(tables, hard_mask=True)
    S = (q @ k.transpose(-1, -2)) * 0.3
    img, txt = tables.img_label[:, :, None], tables.txt_label[:, None, :]
    hidden = (txt >= 0) & (txt != img)  # (B, I, T): a phrase that is not this token's region's
    assert hidden.any() and (~hidden).any()
    block = S[:, :, image, text].clone()
    block[hidden[:, None].expand_as(block)] = float("-inf")
    S[:, :, image, text] = block
    expected = (torch.softmax(S, dim=-1) @ v)[:, :, image]
    out64, probs = modulated_image_rows(q[:, :, image], k, v, text, 0.3, tables)
    assert (out64 - expected).abs().max() < 1e-12
    assert (probs[hidden[:, None].expand_as(probs)] == 0).all()
    out32, _ = modulated_image_rows(q[:, :, image].float(), k.float(), v.float(), text, 0.3, tables)
    assert (out32.double() - expected).abs().max() < 1e-5
