"""The binding method (SynGen's loss with Attend-and-Excite's presence term): its arithmetic against a float64
transcription of the formula, its first move against a float64 re-computation of the whole chain on the tiny UNet,
the groups it finds, and its refusals."""

import itertools
import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import attnctl
from attnctl.errors import UsageError
from attnctl.methods.attend_excite_math import max_attention_per_token, neglect_loss
from attnctl.methods.binding import Binding
from attnctl.methods.binding_math import GroupPositions, presence_loss, syngen_loss
from attnctl.roles import binding_groups

from conftest import tiny_pipe

PROMPT = "a red circle and a blue square"


def kl64(a, b):
    """KL(p‖q) of two maps read as distributions over pixels, by the sum written out, in float64."""
    a, b = [x.double().flatten() for x in (a, b)]
    p, q = a / a.sum(), b / b.sum()
    return sum(float(p[i]) * math.log(float(p[i]) / float(q[i])) for i in range(len(p)))


def loss64(maps, groups):
    """SynGen's loss as its paper states it, term by term."""
    def d(i, j):
        return 0.5 * (kl64(maps[..., i], maps[..., j]) + kl64(maps[..., j], maps[..., i]))

    def word(a, b):
        return max(d(i, j) for i, j in itertools.product(a, b))

    total = 0.0
    for g in groups:
        for m in g.modifiers:
            outside_m = sum(max(d(i, u) for i in m) for u in g.outside) / len(g.outside) if g.outside else 0.0
            outside_n = sum(max(d(i, u) for i in g.noun) for u in g.outside) / len(g.outside) if g.outside else 0.0
            total += word(m, g.noun) - 0.5 * (outside_m + outside_n)
    return total


def test_loss_is_the_formula_in_float64():
    torch.manual_seed(0)
    maps = torch.rand(6, 5, 12).pow(3) + 1e-3
    groups = [GroupPositions(((2,), (3, 4)), (5,), (1, 6, 7, 9)),  # two modifiers, one of two tokens
              GroupPositions(((8,),), (9, 10), (1, 2, 3, 4, 5, 6, 7)),  # a noun of two tokens
              GroupPositions(((1,),), (11,), ())]  # nothing outside: no negative term
    assert abs(float(syngen_loss(maps, groups)) - loss64(maps, groups)) < 1e-5 * max(1.0, abs(loss64(maps, groups)))
    assert float(syngen_loss(maps[..., [0, 1, 1]], [GroupPositions(((1,),), (2,), ())])) == 0.0  # equal maps


def presence64(maps, nouns):
    """Attend-and-Excite's loss on `nouns` written out in float64: a softmax (×100) over the text positions after the
    first, the last left out unless a noun is there, each noun's map smoothed by the 3×3 kernel exp(−(x/(2·0.5))²)
    per axis (normalised) after reflect padding, its maximum; then max over nouns of max(0, 1 − maximum)."""
    m = maps.double()
    last = m.shape[-1] if max(nouns) == m.shape[-1] - 1 else m.shape[-1] - 1
    inner = torch.softmax(m[..., 1:last] * 100, dim=-1)
    axis = torch.exp(-((torch.arange(3, dtype=torch.float64) - 1) / 1.0) ** 2)
    kernel = axis[:, None] * axis[None, :] / (axis.sum() ** 2)
    worst = 0.0
    for n in nouns:
        padded = torch.nn.functional.pad(inner[..., n - 1][None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
        h, w = inner.shape[:2]
        smoothed = max(float((padded[y:y + 3, x:x + 3] * kernel).sum()) for y in range(h) for x in range(w))
        worst = max(worst, max(0.0, 1 - smoothed))
    return worst


def test_a_text_key_the_mask_hides_changes_nothing_and_leaves_the_gradient_finite():
    """Sana's padding keys get no attention (the model's text mask adds −inf to their logits): their all-zero maps
    must neither change the loss nor make its gradient NaN (0/0 in the pixel distributions did, through the
    softmax into every logit, and every image came out NaN)."""
    torch.manual_seed(2)
    logits = torch.randn(6, 5, 11, requires_grad=True)
    mask = torch.zeros(11).index_fill_(0, torch.tensor([8, 9, 10]), float("-inf"))  # three masked keys at the end
    maps = torch.softmax(logits + mask, dim=-1)
    groups = [GroupPositions(((2,),), (3,), (1, 5, 6)), GroupPositions(((5,),), (6,), (1, 2, 3))]
    (syngen_loss(maps, groups) + presence_loss(maps, [3, 6])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    expected = loss64(maps.detach()[..., :8], groups)
    assert abs(float(syngen_loss(maps.detach(), groups)) - expected) < 1e-5 * max(1.0, abs(expected))


@pytest.mark.parametrize("nouns", [[2, 5], [3, 9]])  # 9: the text's last position (Lumina's caption ends on a noun)
def test_presence_is_attend_and_excites_loss_in_float64_also_on_a_last_noun(nouns):
    torch.manual_seed(1)
    maps = torch.softmax(torch.randn(6, 5, 10) * 0.05, dim=-1)  # flat: every smoothed maximum below 1
    assert abs(float(presence_loss(maps, nouns)) - presence64(maps, nouns)) < 1e-6
    if max(nouns) < 9:  # a noun before the last position: exactly Attend-and-Excite's own arithmetic
        assert torch.equal(presence_loss(maps, nouns), neglect_loss(max_attention_per_token(maps, nouns)))


@pytest.mark.parametrize("prompt, groups", [
    (PROMPT, [(["red"], "circle"), (["blue"], "square")]),
    ("a big shiny red car with a dog", [(["big", "shiny", "red"], "car")]),
    ("a red circle to the left of a blue square", [(["red"], "circle"), (["blue"], "square")]),
    ("two green triangles, a blue square", [(["green"], "triangles"), (["blue"], "square")]),
    ("a circle and a square", []),
])
def test_rules_find_each_noun_with_its_modifiers(prompt, groups):
    found = [([w for w, _, _ in g.modifiers], g.noun[0]) for g in binding_groups(prompt, "rules")]
    assert found == groups
    for g in binding_groups(prompt, "rules"):
        assert all(prompt[s:e] == w for w, s, e in [*g.modifiers, g.noun])


class _Recording(AttnProcessor):
    """diffusers' own attention (the explicit softmax), recording the 16×16 cross-attention probabilities."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None and hidden_states.shape[1] == 256:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            self.store.append(attn.get_attention_scores(q, k, None))  # (batch·heads, 256, text)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_first_move_is_the_gradient_of_the_float64_loss():
    """The moved initial latents are z − α·∇L, with L (SynGen + presence · Attend-and-Excite) and its gradient
    re-computed in float64 through diffusers' explicit attention on a float64 copy of the UNet."""
    import copy

    pipe = tiny_pipe("unet")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].detach().clone(), args[1] if len(args) > 1 else kwargs["timestep"],
                                             kwargs["encoder_hidden_states"])),
        with_kwargs=True)
    method = Binding(step_size=20.0, presence=0.5, max_iter_to_alter=1)
    try:
        with attnctl.apply(pipe, method, prompt=PROMPT) as session:
            session(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=128,
                    width=128, guidance_scale=1.0, output_type="np")
            tokens = session.prompts[0]
    finally:
        hook.remove()
    (z0, t, text), _gradient_pass, (moved, _, _) = seen[:3]
    assert [tokens.token_strings[i] for i in (2, 3, 6, 7)] == ["red", "circle", "blue", "square"]
    groups = [GroupPositions(((2,),), (3,), (1, 4, 5, 6, 7)), GroupPositions(((6,),), (7,), (1, 2, 3, 4, 5))]

    unet = copy.deepcopy(pipe.unet).double()
    store = []
    unet.set_attn_processor(_Recording(store))
    z = z0.double().requires_grad_(True)
    unet(z, t, encoder_hidden_states=text.double())
    assert len(store) >= 2
    maps = torch.cat(store).mean(dim=0).unflatten(0, (16, 16))  # the mean over every head of every 16×16 site
    loss = syngen_loss(maps, groups) + 0.5 * neglect_loss(max_attention_per_token(maps, [3, 7]))
    assert abs(float(syngen_loss(maps, groups)) - loss64(maps, groups)) < 1e-9
    assert abs(float(loss) - method.history[0]["loss"][0]) < 1e-5
    grad = torch.autograd.grad(loss, z)[0]
    step = (z0.double() - moved.double()) / 20.0
    assert (step - grad).abs().max() <= 1e-4 * grad.abs().max()
    assert grad.abs().max() > 0


@pytest.mark.parametrize("name", ["unet", "sd3", "flux"])
def test_binding_moves_the_image_on_unet_and_mmdits_and_a_zero_step_is_the_plain_image(name):
    """Step size 0 runs every gradient forward and hands the latents back unchanged: the plain image exactly (the
    step-0 hand-over and the denoiser's timestep, FLUX's divided by 1000, are right); a large step changes it; the
    pipeline is left as it was."""
    pipe = tiny_pipe(name)
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    before = dict(denoiser.attn_processors)
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np",
                  **({"max_sequence_length": 32} if name == "flux" else {}))
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    images = {}
    for step_size in (0.0, 1e4):
        method = Binding(step_size=step_size)
        with attnctl.apply(pipe, method, prompt=PROMPT) as session:
            images[step_size] = session(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert method.groups == [[(["red"], "circle"), (["blue"], "square")]]
        assert [h["step"] for h in method.history] == [0, 1, 2]
    assert abs(images[0.0] - plain).max() == 0
    assert abs(images[1e4] - plain).max() > 1e-3
    assert dict(denoiser.attn_processors) == before


@pytest.mark.parametrize("options, prompt, message", [
    ({}, "a circle and a square", "found no noun with a modifier"),
    ({"targets": ["square"]}, "a red circle and a square", "no modifier found for 'square'"),
    ({"groups": ["green circle"]}, PROMPT, "not a part of the prompt"),
])
def test_prompts_it_cannot_bind_are_refused_before_anything_runs(options, prompt, message):
    pipe = tiny_pipe("unet")
    with pytest.raises(UsageError, match=message):
        with attnctl.apply(pipe, Binding(**options), prompt=prompt):
            pass
    assert all(type(p).__name__ != "UNetCrossProcessor" for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("options, message", [
    ({"groups": ["circle"]}, "two words or more"),
    ({"groups": ["red circle"], "targets": ["circle"]}, "not both"),
    ({"step_size": -1.0}, "step_size"),
    ({"presence": float("nan")}, "presence"),
    ({"parser": "nltk"}, "parser"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        Binding(**options)


def test_explicit_groups_bind_what_the_rules_cannot_parse():
    pipe = tiny_pipe("unet")
    prompt = "a red, shiny circle and a square"
    method = Binding(groups=["shiny circle"])
    with attnctl.apply(pipe, method, prompt=prompt):
        pass
    assert method.groups == [[(["shiny"], "circle")]]
