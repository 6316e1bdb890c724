"""Contrast guidance: the edited prompts, one guided step against a float64 transcription of the formula (with and
without classifier-free guidance), the steps it guides, batches, and bad input."""

import copy

import pytest
import torch

import attnctl
from attnctl.errors import UsageError
from attnctl.methods.contrast_guidance import ContrastGuidance, EditedPrompts, shifted_prompts
from attnctl.methods.contrast_locator import joined_arguments

from conftest import call_kwargs, tiny_pipe

PROMPT = "a red cat and a blue dog"
WITHOUT = ["a blue dog", "a red cat"]  # the prompt without each object
SHIFTED = ["a blue cat and a red dog"]  # its modifiers moved one object along


def test_the_modifiers_move_along_the_objects_once_per_shift():
    assert shifted_prompts(PROMPT, [(2, 5), (16, 20)]) == SHIFTED
    triple = "a big red circle, a blue square and a green triangle"
    spans = [(triple.index(m), triple.index(m) + len(m)) for m in ("big red", "blue", "green")]
    assert shifted_prompts(triple, spans) == ["a blue circle, a green square and a big red triangle",
                                              "a green circle, a big red square and a blue triangle"]


def test_it_finds_the_objects_and_their_modifiers():
    method = ContrastGuidance()
    with attnctl.apply(tiny_pipe("unet"), method, prompt=PROMPT):
        assert method.withouts == WITHOUT and method.shifted == SHIFTED
    presence_only = ContrastGuidance(binding=0)
    with attnctl.apply(tiny_pipe("unet"), presence_only, prompt="a cat and a dog"):
        assert presence_only.withouts == ["a dog", "a cat"] and presence_only.shifted == []


def _encode(pipe, name, text, negative=False):
    if name == "unet":
        embeds = pipe.encode_prompt(text, "cpu", 1, True)
        return {"encoder_hidden_states": embeds[1 if negative else 0].double()}
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=text, prompt_2=text, prompt_3=text, device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=True)
    return {"encoder_hidden_states": (negative_embeds if negative else embeds).double(),
            "pooled_projections": (negative_pooled if negative else pooled).double()}


def _prediction(denoiser64, name, inputs, x, t):
    with torch.no_grad():
        if name == "unet":
            return denoiser64(x.double(), t, **inputs).sample
        return denoiser64(hidden_states=x.double(), timestep=t.expand(1).double(), **inputs, return_dict=False)[0]


@pytest.mark.parametrize("name, guidance", [("unet", 5.0), ("sd3", 1.0)])
def test_a_guided_step_is_the_formula_in_float64(name, guidance):
    """The latents after the first step are the scheduler's step with c + p (c − w_k) + b Σ (c − s_r), k the object of
    least contrast, mixed with the unconditional prediction by the pipeline's guidance (UNet, CFG 5) or used alone (SD3
    without CFG), every prediction computed in float64 from the pipeline's own encoder; rel 1e-4."""
    pipe = tiny_pipe(name)
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    side = 64 // pipe.vae_scale_factor
    noise = torch.randn(1, denoiser.config.in_channels, side, side, generator=torch.Generator().manual_seed(3))
    kwargs = call_kwargs(name, steps=3, output_type="latent", guidance_scale=guidance)
    reached = []
    method = ContrastGuidance(presence=0.7, binding=0.4)
    with attnctl.apply(pipe, method, prompt=PROMPT) as session:
        session(prompt=PROMPT, latents=noise, callback_on_step_end=lambda p, i, t, x: reached.append(
            x["latents"].clone()) or {}, **kwargs)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
    denoiser64 = copy.deepcopy(denoiser).double()
    c = _prediction(denoiser64, name, _encode(pipe, name, PROMPT), model_input, t)
    w = [_prediction(denoiser64, name, _encode(pipe, name, text), model_input, t) for text in WITHOUT]
    s = [_prediction(denoiser64, name, _encode(pipe, name, text), model_input, t) for text in SHIFTED]
    u = _prediction(denoiser64, name, _encode(pipe, name, PROMPT, negative=True), model_input, t)

    def step_with(k):
        guided = c + 0.7 * (c - w[k]) + 0.4 * sum(c - si for si in s)
        if guidance > 1:
            guided = u + guidance * (guided - u)
        return copy.deepcopy(scheduler).step(guided.float(), t, x).prev_sample

    weakest = min(range(2), key=lambda i: float((c - w[i]).norm()))
    # float32 round-off of the predictions (~1e-5) grows by the guidance times (1 + 0.7 + 0.4): 2e-4; the other
    # object's term moves the step by more than 10 times that
    torch.testing.assert_close(reached[0], step_with(weakest), rtol=0, atol=2e-4)
    assert (step_with(1 - weakest) - reached[0]).abs().max() > 2e-3
    plain = []
    pipe(PROMPT, latents=noise, callback_on_step_end=lambda p, i, t, x: plain.append(x["latents"]) or {}, **kwargs)
    assert (plain[0] - reached[0]).abs().max() > 1e-3  # it guided


def _counted(monkeypatch):
    """The number of edited prompts predicted at each guided call."""
    calls = []
    original = EditedPrompts.outputs

    def counting(self, latent_input, timestep):
        out = original(self, latent_input, timestep)
        calls.append(len(out))
        return out
    monkeypatch.setattr(EditedPrompts, "outputs", counting)
    return calls


def test_it_guides_the_first_fraction_of_the_steps_and_leaves_a_weightless_term_out(monkeypatch):
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=4)
    calls = _counted(monkeypatch)
    with attnctl.apply(pipe, ContrastGuidance(steps_fraction=0.5), prompt=PROMPT) as session:
        session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    assert calls == [3, 3]  # 2 of 4 steps, each: the prompt without each object, and shifted
    calls.clear()
    with attnctl.apply(pipe, ContrastGuidance(binding=0), prompt=PROMPT) as session:
        session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    assert calls == [2] * 4
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    for options in (dict(presence=0, binding=0), dict(steps_fraction=0)):
        with attnctl.apply(pipe, ContrastGuidance(**options), prompt=PROMPT) as session:
            image = session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert (image == plain).all()


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_the_edited_prompts_are_predicted_in_one_forward_as_each_alone(name, monkeypatch):
    """Where the edited prompts' arguments differ only in batch-wise tensors (the tiny UNet, FLUX.1 with its padded
    text), one forward predicts them all, as one forward each does (float32, 1e-5)."""
    pipe = tiny_pipe(name)
    gaps, joined = [], []
    original = EditedPrompts.outputs

    def compared(self, latent_input, timestep):
        out = original(self, latent_input, timestep)
        joined.append(self._joined is not None)
        alone = [self.output(i, latent_input, timestep) for i in range(len(self.encoded))]
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(out, alone)))
        return out
    monkeypatch.setattr(EditedPrompts, "outputs", compared)
    with attnctl.apply(pipe, ContrastGuidance(), prompt=PROMPT) as session:
        session(prompt=PROMPT, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                **call_kwargs(name, steps=2, output_type="latent"))
    assert joined == [True, True] and max(gaps) < 1e-5


def test_arguments_join_where_only_batch_wise_tensors_differ():
    from attnctl.control import StepState

    step = StepState(index=0, num_steps=1, timestep=1.0, batch_size=4, cond_rows=slice(2, 4), token_grid=(2, 2),
                     text_len=None)
    a = {"encoder_hidden_states": torch.arange(4.0).view(4, 1), "ids": torch.zeros(3), "flag": None, "timestep": 1}
    b = {"encoder_hidden_states": torch.arange(4.0, 8).view(4, 1), "ids": torch.zeros(3), "flag": None, "timestep": 2}
    joined = joined_arguments([(a, step), (b, step)])
    assert torch.equal(joined["encoder_hidden_states"], torch.tensor([[2.0], [3.0], [6.0], [7.0]]))
    assert joined["ids"] is a["ids"] and joined["flag"] is None and "timestep" not in joined
    longer = {**b, "encoder_hidden_states": torch.zeros(4, 2)}
    assert joined_arguments([(a, step), (longer, step)]) is None  # another text length: one forward each
    assert joined_arguments([(a, step), ({**b, "ids": torch.ones(3)}, step)]) is None


def test_each_image_of_a_batch_is_guided_as_if_it_ran_alone():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=3)
    with attnctl.apply(pipe, ContrastGuidance(), prompt=PROMPT) as session:
        batch = session(prompt=PROMPT, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s)
                                                                            for s in (0, 1)], **kwargs).images
        alone = session(prompt=PROMPT, generator=[torch.Generator().manual_seed(1)], **kwargs).images
    assert abs(batch[1] - alone[0]).max() < 1e-4


def test_bad_input_is_refused_before_any_step():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UsageError, match="two or more"):
            with attnctl.apply(pipe, ContrastGuidance(targets=["cat"]), prompt=PROMPT):
                pass
        with pytest.raises(UsageError, match="contrast guidance: 'bird' is not a word of the prompt"):
            with attnctl.apply(pipe, ContrastGuidance(targets=["cat", "bird"]), prompt=PROMPT):
                pass
        with pytest.raises(UsageError, match="1 object.* with a modifier.*--cg-binding 0"):
            with attnctl.apply(pipe, ContrastGuidance(), prompt="a red cat and a dog"):
                pass
        with pytest.raises(UsageError, match="needs the prompt"):
            with attnctl.apply(pipe, ContrastGuidance()):
                pass
        with attnctl.apply(pipe, ContrastGuidance(), prompt=PROMPT) as session:
            embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True)
            with pytest.raises(UsageError, match="contrast guidance .*prompt as one string"):
                session(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], **kwargs)
    finally:
        handle.remove()
    assert not calls
    with attnctl.apply(pipe, ContrastGuidance(), prompt=PROMPT):
        with pytest.raises(UsageError, match="through the session"):  # at the first denoiser call, before a step
            pipe(PROMPT, **kwargs)
    for bad in (dict(presence=-1), dict(binding=101), dict(steps_fraction=1.5), dict(parser="nltk")):
        with pytest.raises(UsageError, match=next(iter(bad))):
            ContrastGuidance(**bad)
