"""Attend-and-Excite against diffusers' own StableDiffusionAttendAndExcitePipeline (the oracle), and how it reaches
the pipeline: through the session, with the user's callback kept."""

import warnings

import numpy as np
import pytest
import torch

import attnctl
from attnctl.control import Controller
from attnctl.errors import UsageError
from attnctl.methods.attend_excite import AttendAndExcite, AttendExciteConfig

from conftest import denoiser_of, tiny_pipe

PROMPT = "a cat and a dog"
# 128 px: the tiny SD's finest cross-attention runs at 16x16, the reference's attn_res
SIZE = dict(height=128, width=128, guidance_scale=7.5, output_type="np")
OPTIONS = dict(max_iter_to_alter=3, thresholds={0: 0.05, 2: 0.8})
RELATIVE = 2e-5  # the reference's bmm attention against SDPA: float32 round-off, grown over the steps


def reference(pipe):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionAttendAndExcitePipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def latents_per_step(run):
    seen = []
    images = run(lambda i, latents: seen.append(latents.clone()))
    return seen, images


@pytest.mark.parametrize("prompts, per_prompt, guidance", [([PROMPT], 1, 7.5), ([PROMPT, "a dog and a cat"], 2, 7.5),
                                                           ([PROMPT], 1, 1.0)])
def test_latents_after_every_step_are_the_reference_pipelines(prompts, per_prompt, guidance):
    pipe = tiny_pipe("unet")
    kwargs = {**SIZE, "guidance_scale": guidance, "num_inference_steps": 5, "num_images_per_prompt": per_prompt}
    ae = AttendAndExcite(["cat", "dog"], **OPTIONS)  # the reference's 20 refinement moves at most
    with attnctl.apply(pipe, ae, prompt=prompts) as session:
        indices = [p.word_positions("cat") + p.word_positions("dog") for p in session.prompts]
        ours, image = latents_per_step(lambda record: session(
            prompts, generator=torch.Generator().manual_seed(0), **kwargs,
            callback_on_step_end=lambda p, i, t, d: record(i, d["latents"]) or {}).images)
    theirs, ref_image = latents_per_step(lambda record: reference(pipe)(
        prompts, token_indices=indices if len(indices) > 1 else indices[0], generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, latents: record(i, latents), callback_steps=1, **OPTIONS, **kwargs).images)
    assert [h["step"] for h in ae.history] == [0, 1, 2]
    assert max(max(h["refinement_moves"]) for h in ae.history) == 20  # random weights: the threshold is never met
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() <= RELATIVE * b.abs().max()
    assert np.abs(image - ref_image).max() < 1e-4
    plain = pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(plain - ref_image).max() > 1e-2  # the method moved the image


def test_batched_refinement_stops_per_image():
    """Two images, one prompt each, with a threshold one of them meets: each image moves as it would alone."""
    pipe = tiny_pipe("unet")
    kwargs = {**SIZE, "num_inference_steps": 3}
    alone = []
    for prompt in ("a cat and a dog", "a dog"):
        ae = AttendAndExcite(["dog"], max_iter_to_alter=1, thresholds={0: 0.023}, max_refinement_steps=4)
        with attnctl.apply(pipe, ae, prompt=prompt) as session:
            alone.append((session(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images,
                          ae.history[0]))
    moves = [h["refinement_moves"][0] for _, h in alone]
    assert moves[0] != moves[1], moves  # the test needs one image that stops early
    ae = AttendAndExcite(["dog"], max_iter_to_alter=1, thresholds={0: 0.023}, max_refinement_steps=4)
    prompts = ["a cat and a dog", "a dog"]
    with attnctl.apply(pipe, ae, prompt=prompts) as session:
        together = session(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], **kwargs).images
    assert ae.history[0]["refinement_moves"] == moves
    for i, (image, _) in enumerate(alone):
        assert np.abs(together[i] - image[0]).max() < 1e-4


def test_a_plain_pipeline_call_is_refused_with_the_way_to_run_it():
    pipe = tiny_pipe("unet")
    with attnctl.apply(pipe, AttendAndExcite(["cat"]), prompt=PROMPT):
        with pytest.raises(UsageError, match=r"session\(p, \.\.\.\)"):
            pipe(PROMPT, num_inference_steps=2, **SIZE)


def test_the_users_callback_runs_first_and_its_latents_are_moved():
    pipe = tiny_pipe("unet")
    calls = []

    def callback(p, i, t, tensors):
        calls.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5}

    ae = AttendAndExcite(["cat"], max_iter_to_alter=3, thresholds={})
    with attnctl.apply(pipe, ae, prompt=PROMPT) as session:
        session(PROMPT, num_inference_steps=3, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["prompt_embeds"], **SIZE)
    assert calls == [(i, ["latents", "prompt_embeds"]) for i in range(3)]
    assert [h["step"] for h in ae.history] == [0, 1, 2]


class _Steps(Controller):
    observer = True

    def __init__(self):
        self.steps, self.calls = [], 0

    def begin_step(self, step):
        self.steps.append(step.index)

    def __call__(self, call):
        self.calls += 1


def test_other_controllers_see_only_the_pipelines_own_denoiser_calls():
    pipe = tiny_pipe("unet")
    steps = _Steps()
    with attnctl.apply(pipe, AttendAndExcite(["cat"], **OPTIONS), steps, prompt=PROMPT) as session:
        session(PROMPT, num_inference_steps=4, **SIZE)
    n_sites = sum(s.kind == "cross" for s in session.sites)
    assert steps.steps == [0, 1, 2, 3] and steps.calls == 4 * n_sites


def test_sdxl_is_moved_and_restored():
    pipe = tiny_pipe("sdxl")
    before = dict(denoiser_of("sdxl", pipe).attn_processors)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    # a large step: the random model's gradients are small
    ae = AttendAndExcite(["cat"], max_iter_to_alter=2, thresholds={}, resolution=4, scale_factor=1e6)
    with attnctl.apply(pipe, ae, prompt=PROMPT) as session:
        moved = session(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert [h["step"] for h in ae.history] == [0, 1]
    assert (moved - plain).abs().max() > 1
    assert dict(denoiser_of("sdxl", pipe).attn_processors) == before


def test_bad_options_and_resolutions_are_refused():
    with pytest.raises(UsageError, match="thresholds"):
        AttendExciteConfig(thresholds={0: 2.0})
    with pytest.raises(UsageError, match="max_iter_to_alter"):
        AttendExciteConfig(max_iter_to_alter=-1)
    pipe = tiny_pipe("unet")
    with attnctl.apply(pipe, AttendAndExcite(["cat"], resolution=16), prompt=PROMPT) as session:
        with pytest.raises(UsageError, match=r"the sides here are 1, 2, 4, 8 \(--ae-resolution\)"):
            session(PROMPT, num_inference_steps=2, height=64, width=64)
    with pytest.raises(UsageError, match="UNet cross-attention"):
        with attnctl.apply(tiny_pipe("flux"), AttendAndExcite(["cat"]), prompt=PROMPT):
            pass


def test_without_16x16_sites_the_nearest_grid_is_read():
    pipe = tiny_pipe("unet")  # at 64² its cross-attention runs at 8, 4, 2 and 1
    ae = AttendAndExcite(["cat"], max_iter_to_alter=1, thresholds={})
    with attnctl.apply(pipe, ae, prompt=PROMPT) as session:
        session(PROMPT, num_inference_steps=1, height=64, width=64, output_type="latent")
    assert ae._grid == (8, 8) and len(ae._sites) == 3
