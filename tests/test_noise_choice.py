"""Noise choice: the candidates, the score against a float64 computation of the contrasts, the run proper against the
plain pipeline from the chosen noise, and bad input."""

import pytest
import torch

import attnctl
from attnctl.errors import UsageError
from attnctl.methods.noise_choice import NoiseChoice, candidate_noises, presence_score
from test_relocation import _reference_prediction

from conftest import call_kwargs, tiny_pipe

PROMPT = "a red cat and a blue dog"
EDITED = ["a blue dog", "a red cat"]  # the prompt without each object


def session_run(pipe, method, kwargs, seeds=(0,)):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with attnctl.apply(pipe, method, prompt=PROMPT) as session:
        images = session(prompt=PROMPT, generator=generators, num_images_per_prompt=len(seeds), **kwargs).images
    return images, generators


def plain_run(pipe, kwargs, seeds=(0,), latents=None, on_step=None):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    extra = {} if on_step is None else dict(callback_on_step_end=on_step)
    images = pipe(PROMPT, generator=generators, num_images_per_prompt=len(seeds), latents=latents, **kwargs,
                  **extra).images
    return images, generators


def test_the_candidates_are_the_noise_and_permutations_of_each_images_own_values():
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    candidates = candidate_noises(noise, 4)
    assert len(candidates) == 4 and candidates[0] is noise
    for c in candidates[1:]:
        assert c.shape == noise.shape
        for image in range(3):  # the same values, elsewhere
            assert torch.equal(c[image].flatten().sort().values, noise[image].flatten().sort().values)
            assert (c[image] != noise[image]).float().mean() > 0.9
    alone = candidate_noises(noise[2:], 4)  # an image's candidates do not depend on the batch
    assert all(torch.equal(a[0], c[2]) for a, c in zip(alone, candidates))
    assert not torch.equal(candidates[1], candidates[2])


def test_the_score_is_the_weakest_objects_mean_contrast_over_the_strongests():
    maps = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for image in range(2):
        means = [float(maps[image, i].sum()) / 25 for i in range(3)]
        assert float(presence_score(maps)[image]) == pytest.approx(min(means) / max(means), rel=1e-12)


def noise_of(pipe, name, seed=0, images=1):
    """Starting noise of the tiny pipeline's 64² images, given to it as `latents`."""
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    side = 64 // pipe.vae_scale_factor
    return torch.randn(images, denoiser.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_each_candidates_score_is_read_from_its_plain_run_and_the_best_is_run_from_the_start(name):
    """Each candidate's score is the presence score of float64 contrasts at the latents its plain run reaches after
    the read steps (the next step's timestep, the pipeline's own encoder); the image is the plain pipeline's from
    the chosen candidate."""
    pipe = tiny_pipe(name)
    kwargs = call_kwargs(name, steps=4, output_type="latent")
    noise = noise_of(pipe, name)
    method = NoiseChoice(candidates=3, read_fraction=0.5)  # reads after step 1
    with attnctl.apply(pipe, method, prompt=PROMPT) as session:
        image = session(prompt=PROMPT, latents=noise, **kwargs).images
    candidates = candidate_noises(noise, 3)
    scores = method.choices[0]["scores"]
    assert len(scores) == 3 and method.choices[0]["chosen"] == max(range(3), key=lambda j: scores[j])
    for j, score in enumerate(scores):
        reached = []
        pipe(PROMPT, latents=candidates[j], callback_on_step_end=lambda p, i, t, x, at=reached: at.append(x["latents"])
             or {}, **kwargs)
        x, t = reached[1], pipe.scheduler.timesteps[2]
        full = _reference_prediction(pipe, name, PROMPT, x, t)
        maps = torch.stack([(full - _reference_prediction(pipe, name, text, x, t)).norm(dim=1) for text in EDITED], 1)
        assert score == pytest.approx(float(presence_score(maps)[0]), rel=1e-4)
    assert len(set(scores)) == 3  # the candidates differ
    expected = pipe(PROMPT, latents=candidates[method.choices[0]["chosen"]], **kwargs).images
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)


def test_with_one_candidate_it_is_the_plain_pipeline_bit_for_bit():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=3)
    image = session_run(pipe, NoiseChoice(candidates=1), kwargs)[0]
    assert (image == plain_run(pipe, kwargs)[0]).all()


def test_each_image_of_a_batch_is_chosen_as_if_it_ran_alone():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=4)
    batch_method, alone_method = NoiseChoice(candidates=4), NoiseChoice(candidates=4)
    batch = session_run(pipe, batch_method, kwargs, seeds=(0, 1))[0]
    alone = session_run(pipe, alone_method, kwargs, seeds=(1,))[0]
    assert batch_method.choices[1]["chosen"] == alone_method.choices[0]["chosen"]
    assert batch_method.choices[1]["scores"] == pytest.approx(alone_method.choices[0]["scores"], rel=1e-4)
    assert abs(batch[1] - alone[0]).max() < 1e-4


def test_a_stochastic_scheduler_draws_in_the_run_proper_what_it_draws_in_the_plain_run():
    """The candidates' runs draw from the caller's generator too (an ancestral scheduler's noise); it is set back
    after each, so the run proper is the plain pipeline's from the chosen noise with the same generator."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = tiny_pipe("unet")
    kept = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(kept.config)
    try:
        kwargs = call_kwargs("unet", steps=4)
        method = NoiseChoice(candidates=3)
        image, generators = session_run(pipe, method, kwargs)
        chosen = method.choices[0]["chosen"]
        noise = noise_of(pipe, "unet")
        generator = torch.Generator().manual_seed(0)
        torch.randn(noise.shape, generator=generator)  # the draw of the noise, as the plain run draws it
        expected = pipe(PROMPT, latents=candidate_noises(noise, 3)[chosen], generator=[generator], **kwargs).images
        assert torch.equal(generators[0].get_state(), generator.get_state())
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
    finally:
        pipe.scheduler = kept


def test_bad_input_is_refused_before_any_step():
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UsageError, match="two or more"):
            with attnctl.apply(pipe, NoiseChoice(targets=["cat"]), prompt=PROMPT):
                pass
        with pytest.raises(UsageError, match="'bird' is not a word of the prompt"):
            with attnctl.apply(pipe, NoiseChoice(targets=["cat", "bird"]), prompt=PROMPT):
                pass
        with pytest.raises(UsageError, match="'cat' is not a word of the prompt .* 2 times"):
            with attnctl.apply(pipe, NoiseChoice(targets=["cat#2", "dog"]), prompt=PROMPT):
                pass
        with pytest.raises(UsageError, match="needs the prompt"):
            with attnctl.apply(pipe, NoiseChoice()):
                pass
        with attnctl.apply(pipe, NoiseChoice(), prompt=PROMPT) as session:
            embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True)
            with pytest.raises(UsageError, match="noise choice .*prompt as one string"):
                session(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], **kwargs)
    finally:
        handle.remove()
    assert not calls
    with attnctl.apply(pipe, NoiseChoice(), prompt=PROMPT):
        with pytest.raises(UsageError, match="through the session"):  # at the first denoiser call, before a step
            pipe(PROMPT, **kwargs)
    for bad in (dict(candidates=0), dict(candidates=2.5), dict(read_fraction=1.5)):
        with pytest.raises(UsageError, match=next(iter(bad))):
            NoiseChoice(**bad)


@pytest.mark.parametrize("locator", ["attention", "contrast"])
def test_relocation_with_candidates_moves_the_objects_of_the_chosen_noise(locator):
    """Relocation's `candidates`: its run from a noise is relocation's run (one candidate) from the chosen candidate
    of that noise; the candidates' runs read and move nothing."""
    from attnctl import Relocation

    layout = {"prompt": PROMPT, "regions": [{"phrase": "red cat", "box": [0.5, 0, 1, 1]},
                                            {"phrase": "blue dog", "box": [0, 0, 0.5, 1]}]}
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=4, output_type="latent")
    noise = noise_of(pipe, "unet")
    chosen_by = Relocation(layout, read_fraction=0.5, window=0.25, locator=locator, candidates=3)
    with attnctl.apply(pipe, chosen_by, prompt=PROMPT) as session:
        image = session(prompt=PROMPT, latents=noise, **kwargs).images
    chosen = chosen_by.choices[0]["chosen"]
    one = Relocation(layout, read_fraction=0.5, window=0.25, locator=locator)
    with attnctl.apply(pipe, one, prompt=PROMPT) as session:
        expected = session(prompt=PROMPT, latents=candidate_noises(noise, 3)[chosen], **kwargs).images
    assert chosen_by.moves == one.moves and any(m is not None for m in one.moves[0])
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(image, pipe(PROMPT, latents=noise, **kwargs).images, atol=1e-3)
