"""Capture on every family: exact maps, untouched images, the pipeline restored, the step and batch layout right."""

import numpy as np
import pytest
import torch

import attnctl
from attnctl.attention import explicit_probs

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red cat and a blue dog"


class Probe(attnctl.Controller):
    """Compares every call's text probabilities with an explicit float64 softmax and records the steps seen."""

    observer = True

    def __init__(self):
        self.worst, self.calls, self.steps, self.cond = 0.0, 0, [], []

    def begin_step(self, step):
        self.steps.append(step.index)
        self.cond.append((step.cond_rows.start, step.cond_rows.stop, step.batch_size))

    def __call__(self, call):
        got = call.text_probs().double()
        ref = explicit_probs(call.q, call.k)[:, :, call.image, call.text]
        self.worst = max(self.worst, ((got - ref).abs() / ref.abs().max()).max().item())
        self.calls += 1


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def processor_ids(pipe):
    return {n: id(m.processor) for n, m in denoiser(pipe).named_modules() if hasattr(m, "processor")}


def test_maps_exact_images_unchanged_pipeline_restored(family):
    pipe = tiny_pipe(family)
    kwargs = call_kwargs(family)
    before = processor_ids(pipe)
    plain = run(pipe, PROMPT, **kwargs)
    probe, capture = Probe(), attnctl.Capture(["cat", "dog"])
    with attnctl.apply(pipe, capture, probe, prompt=PROMPT) as session:
        captured = run(pipe, PROMPT, **kwargs)
    after = run(pipe, PROMPT, **kwargs)

    assert probe.calls == len(session.sites) * kwargs["num_inference_steps"]
    assert probe.worst < 1e-5  # float32 fast path vs float64 softmax, relative to the largest probability
    np.testing.assert_allclose(captured, plain, atol=1e-4, rtol=0)
    assert np.array_equal(after, plain)
    assert processor_ids(pipe) == before
    assert not hasattr(denoiser(pipe), "_diffusers_hook") or not denoiser(pipe)._diffusers_hook.hooks
    assert "forward" not in denoiser(pipe).__dict__
    maps = capture.maps()
    assert set(maps) == {s.name for s in session.sites}
    for m in maps.values():
        assert m.shape[:2] == (1, 2) and m.min() >= 0 and m.max() <= 1


def test_map_values_equal_explicit_word_probabilities():
    """The stored map of a word is the mean over heads and steps of the summed probabilities of its tokens."""
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2)
    seen = {}

    class Record(attnctl.Controller):
        observer = True

        def __call__(self, call):
            seen.setdefault(call.site.name, []).append(
                explicit_probs(call.q, call.k)[call.step.cond_rows][:, :, :, call.text].mean(1))

    capture = attnctl.Capture(["cat", "dog"])
    with attnctl.apply(pipe, capture, Record(), prompt=PROMPT) as session:
        run(pipe, PROMPT, **kwargs)
        positions = [session.prompts[0].word_positions(w) for w in ("cat", "dog")]
    for name, calls in seen.items():
        probs = torch.stack(calls).mean(0)  # (rows, pixels, text)
        expected = torch.stack([probs[..., p].sum(-1) for p in positions], dim=1)
        got = capture.maps()[name].reshape(expected.shape).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_steps_come_from_the_scheduler_and_cfg_half_is_conditional():
    pipe = tiny_pipe("unet")
    probe = Probe()
    with attnctl.apply(pipe, probe, prompt=PROMPT):
        run(pipe, PROMPT, **call_kwargs("unet", steps=4, guidance_scale=7.5))
    assert probe.steps == [0, 1, 2, 3]
    assert probe.cond == [(1, 2, 2)] * 4
    probe = Probe()
    with attnctl.apply(pipe, probe, prompt=PROMPT):
        run(pipe, PROMPT, **call_kwargs("unet", steps=2, guidance_scale=1.0))
    assert probe.cond == [(0, 1, 1)] * 2


def test_scheduler_without_step_counter(monkeypatch):
    from diffusers import DDIMScheduler

    pipe = tiny_pipe("unet")
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        assert not hasattr(pipe.scheduler, "step_index")
        probe = Probe()
        with attnctl.apply(pipe, probe, prompt=PROMPT):
            run(pipe, PROMPT, **call_kwargs("unet", steps=3))
        assert probe.steps == [0, 1, 2]
    finally:
        pipe.scheduler = original


def test_batches_of_prompts_and_images_per_prompt():
    pipe = tiny_pipe("sd3")
    prompts = ["a red cat", "a dog and a red cat"]
    capture = attnctl.Capture(["cat"])
    with attnctl.apply(pipe, capture, prompt=prompts) as session:
        run(pipe, prompts, **call_kwargs("sd3", steps=2, num_images_per_prompt=2))
    first = next(iter(capture.maps().values()))
    assert first.shape[:2] == (4, 1)
    assert session.prompts[0].word_positions("cat") != session.prompts[1].word_positions("cat")
    # rows 0,1 come from prompt 0 and rows 2,3 from prompt 1: different token positions, different maps
    assert not torch.equal(first[0], first[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_track_float64(dtype):
    pipe = attnctl.load_pipeline("random:sd15-tiny", dtype=dtype)
    probe = Probe()
    with attnctl.apply(pipe, probe, prompt=PROMPT):
        run(pipe, PROMPT, **call_kwargs("unet", steps=2))
    assert probe.calls > 0 and probe.worst < 2e-2  # inputs are half precision, the maps are computed in float32


def test_exception_inside_the_call_restores_the_pipeline():
    pipe = tiny_pipe("flux")
    before = processor_ids(pipe)

    class Boom(attnctl.Controller):
        def __call__(self, call):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attnctl.apply(pipe, Boom(), prompt=PROMPT):
            run(pipe, PROMPT, **call_kwargs("flux", steps=1))
    assert processor_ids(pipe) == before
    assert "forward" not in pipe.transformer.__dict__
