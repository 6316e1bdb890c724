"""Attention Regulation in real (tiny, random-weight) pipelines: what it changes, what it leaves bit-identical, the
batch layouts, dtypes and schedulers it runs with, and the errors a user sees."""

import logging

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.methods.regulation import Regulation, RegulationConfig
from attnctl.methods.targets import choose_targets

from conftest import run, tiny_pipe

PROMPT = "a cat and a dog"
EDITED = ("down_blocks.2.", "up_blocks.1.")


def kwargs(steps=4, size=256, **extra):
    # 256² puts the default layers of the tiny UNets at 8×8 (σ = 1, 9 centres)
    return dict(height=size, width=size, num_inference_steps=steps, output_type="latent", **extra)


class Recorder(attnctl.Controller):
    """Observer at every site: inputs, output, whether a method changed it, and the probabilities in use."""

    observer = True

    def __init__(self, keep_steps=(0,)):
        self.keep_steps = set(keep_steps)
        self.calls = {}
        self.modified = set()

    def __call__(self, call):
        key = (call.site.name, call.step.index)
        if call.modified:
            self.modified.add(key)
        out = call.output()
        plain = F.scaled_dot_product_attention(call.q, call.k, call.v)
        if not call.modified:
            assert torch.equal(out, plain)  # unmodified calls are the plain attention
        if call.step.index in self.keep_steps:
            self.calls[key] = dict(q=call.q.clone(), k=call.k.clone(), v=call.v.clone(), out=out.clone(),
                                   plain=plain, probs=call.text_probs().clone(), cond=call.step.cond_rows)


def edited(name):
    return name.startswith(EDITED)


def test_raises_the_weakest_targets_attention():
    """At the edited layers and steps the weakest target's 90th-percentile map value (mean over heads and the
    edited steps) is at least 10× the plain run's at every edited site."""
    pipe = tiny_pipe("unet")
    maps = {}
    for name, method in (("plain", []), ("regulated", [Regulation(["cat", "dog"], edit_steps=2)])):
        capture = attnctl.Capture(["cat", "dog"], steps=[0, 1], sites=lambda s: edited(s.name))
        with attnctl.apply(pipe, *method, capture, prompt=PROMPT):
            run(pipe, PROMPT, **kwargs(steps=2))
        maps[name] = capture.maps()
    assert set(maps["plain"]) == set(maps["regulated"]) and len(maps["plain"]) == 3
    for site in maps["plain"]:
        weakest = {n: torch.quantile(m[site][0].flatten(1), 0.9, dim=1).min().item() for n, m in maps.items()}
        # measured: plain 0.012-0.016, regulated 0.26-0.39
        assert weakest["regulated"] > 10 * weakest["plain"], (site, weakest)


def test_leaves_other_layers_steps_and_rows_bit_identical():
    pipe = tiny_pipe("unet")
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    reg = Regulation(["cat", "dog"], edit_steps=2)
    with attnctl.apply(pipe, reg, prompt=PROMPT) as session:
        # only the edited layers' processors are replaced
        now = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
        assert {n for n in now if now[n] is not before[n]} == {s.name for s in session.sites if edited(s.name)}
    order = [s.name for s in session.sites]

    runs = {}
    for name, method in (("plain", []), ("regulated", [Regulation(["cat", "dog"], edit_steps=2)])):
        rec = Recorder()
        with attnctl.apply(pipe, *method, rec, prompt=PROMPT):
            run(pipe, PROMPT, **kwargs(steps=3))
        runs[name] = rec
    plain, reg = runs["plain"], runs["regulated"]
    # changed exactly at the edited layers, at the first two steps
    assert reg.modified == {(n, s) for n in order if edited(n) for s in (0, 1)}
    assert plain.modified == set()
    first = min(order.index(n) for n in order if edited(n))
    for i, name in enumerate(order):
        a, b = plain.calls[(name, 0)], reg.calls[(name, 0)]
        # step 0: every site before the first edited one sees the same q, k, v and gives the same output
        if i < first:
            for key in ("q", "k", "v", "out"):
                assert torch.equal(a[key], b[key]), (name, key)
        # and the unconditional half of the guidance batch is untouched everywhere
        uncond = slice(0, a["cond"].start)
        for key in ("q", "k", "v", "out"):
            assert torch.equal(a[key][uncond], b[key][uncond]), (name, key)
        if edited(name):
            assert not torch.equal(a["out"][a["cond"]], b["out"][b["cond"]])

    # with no step to edit, the images are those of the pipeline without attnctl, bit for bit
    plain_images = run(pipe, PROMPT, **kwargs(steps=2, size=128))
    with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=0), prompt=PROMPT):
        same = run(pipe, PROMPT, **kwargs(steps=2, size=128))
    assert torch.equal(plain_images, same)


def test_sdxl_batch_of_prompts_images_per_prompt_and_guidance():
    """SDXL, two prompts with the targets at different positions, two images each, guidance: each conditional row
    is edited with its own prompt's targets; start and end-of-text probabilities keep their unedited values."""
    pipe = tiny_pipe("sdxl")
    prompts = ["a cat and a dog", "a photo of a dog next to a cat"]
    rec = Recorder(keep_steps=(0,))
    with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1), rec, prompt=prompts) as session:
        run(pipe, prompts, **kwargs(steps=2, num_images_per_prompt=2, guidance_scale=5.0))
        positions = [sum((p.word_positions(w) for w in ("cat", "dog")), []) for p in session.prompts]
    assert positions[0] != positions[1]
    ends = [len(pipe.tokenizer(p)["input_ids"]) - 1 for p in prompts]
    sites = [n for (n, s) in rec.modified]
    # SDXL's default layers: its coarsest stages outside the mid block (16x16 at SDXL's 1024²: 32x32)
    assert {n.split(".attentions")[0] for n in sites} == {"down_blocks.2", "up_blocks.0"}
    assert {s for (_, s) in rec.modified} == {0}
    for name in set(sites):
        call = rec.calls[(name, 0)]
        assert call["cond"] == slice(4, 8)
        logits = (call["q"].double() @ call["k"].double().transpose(-1, -2)) * call["q"].shape[-1] ** -0.5
        unedited = torch.softmax(logits, dim=-1)
        probs = call["probs"].double()
        torch.testing.assert_close(probs[:4], unedited[:4], rtol=0, atol=1e-6)
        assert torch.equal(call["out"][:4], call["plain"][:4])
        for row in range(4, 8):
            prompt = (row - 4) // 2
            for col in (0, ends[prompt]):
                torch.testing.assert_close(probs[row, :, :, col], unedited[row, :, :, col], rtol=0, atol=1e-6)
            # the targets of this row's prompt gained attention
            gain = (probs[row] - unedited[row]).sum(dim=(0, 1))
            assert (gain[positions[prompt]] > 0).all()


def test_without_guidance_the_whole_batch_is_edited():
    pipe = tiny_pipe("unet")
    rec = Recorder()
    with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1), rec, prompt=PROMPT):
        run(pipe, PROMPT, **kwargs(steps=2, guidance_scale=1.0, num_images_per_prompt=2))
    for (name, _step), call in rec.calls.items():
        if edited(name):
            assert call["cond"] == slice(0, 2)
            for row in range(2):
                assert not torch.equal(call["out"][row], call["plain"][row])


@pytest.mark.parametrize("dtype,scheduler", [(torch.float16, "DDIMScheduler"),
                                             (torch.bfloat16, "EulerAncestralDiscreteScheduler")])
def test_half_precision_and_other_schedulers(dtype, scheduler):
    import diffusers

    pipe = attnctl.load_pipeline("random:sd15-tiny", dtype=dtype)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    reg = Regulation(["cat", "dog"], edit_steps=2)
    reg.record_history = True
    rec = Recorder(keep_steps=())
    with attnctl.apply(pipe, reg, rec, prompt=PROMPT):
        out = run(pipe, PROMPT, **kwargs(steps=3, size=128))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert {(h["site"], h["step"]) for h in reg.history} == rec.modified
    assert {s for (_, s) in rec.modified} == {0, 1}
    assert all(h["row_losses"].dtype == torch.float32 for h in reg.history)  # the optimisation runs in float32


def test_nouns_chosen_and_logged_without_targets(caplog):
    pipe = tiny_pipe("unet")
    reg = Regulation(edit_steps=1)
    with caplog.at_level(logging.INFO, "attnctl"), attnctl.apply(pipe, reg, prompt="a red car and a white sheep"):
        run(pipe, "a red car and a white sheep", **kwargs(steps=1, size=128))
    assert "car, sheep" in caplog.text and "extension" in caplog.text
    assert reg.target_words == ["car", "sheep"]


def test_fast_and_direct_give_the_same_images():
    """The two implementations inside a pipeline: same edits to float32 rounding (2 steps, both edited)."""
    pipe = tiny_pipe("unet")
    images = {}
    for impl in ("fast", "direct"):
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=2, implementation=impl), prompt=PROMPT):
            images[impl] = run(pipe, PROMPT, **kwargs(steps=2))
    scale = images["direct"].abs().max().item()
    assert (images["fast"] - images["direct"]).abs().max().item() < 1e-4 * scale


# --- errors and the command line ---------------------------------------------------------------------------------

def test_usage_errors_in_a_pipeline():
    pipe = tiny_pipe("unet")
    with pytest.raises(attnctl.UsageError, match=r"'zebra' is not in the prompt.*tokens are: .*cat and a dog"):
        with attnctl.apply(pipe, Regulation(["zebra"]), prompt=PROMPT):
            pass
    with pytest.raises(attnctl.UsageError, match=r"'up_blocks\.7'.*Valid layers: down_blocks\.0, down_blocks\.1, "
                                                 r"down_blocks\.2, mid_block, up_blocks\.1"):
        with attnctl.apply(pipe, Regulation(["cat"], layers=["up_blocks.7"]), prompt=PROMPT):
            pass
    with pytest.raises(attnctl.UsageError, match="edit_steps=5 but the pipeline runs 2 steps"):
        with attnctl.apply(pipe, Regulation(["cat"], edit_steps=5), prompt=PROMPT):
            run(pipe, PROMPT, **kwargs(steps=2, size=64))
    with pytest.raises(attnctl.UsageError, match="no cross-attention sites"):
        with attnctl.apply(tiny_pipe("flux"), Regulation(["cat"]), prompt=PROMPT):
            pass


def test_cli_flags_are_the_config_fields():
    from attnctl.cli import build_parser
    from attnctl.cli.generate import request_of

    def method_config(args):
        return request_of(args).controller().config

    base = ["generate", "--model", "random:sd15-tiny", "--prompt", PROMPT, "--targets", "cat", "--out", "unused"]
    config = method_config(build_parser().parse_args(base))
    assert config == RegulationConfig(targets=["cat"])
    assert config.layers is None and config.edit_steps is None
    assert (config.iterations, config.step_size, config.gamma, config.delta, config.epsilon) == (20, 100.0, 1.0, 80.0,
                                                                                                 0.09)
    assert (config.sigma, config.smoothing, config.decay, config.selection, config.implementation, config.seed) == (
        None, 0.25, 0.99, "batch", "auto", 0)
    args = build_parser().parse_args(base + [
        "--targets", "dog", "--layers", "up_blocks.1", "--edit-steps", "3", "--selection", "image", "--implementation",
        "direct", "--sigma", "2", "--init-seed", "5", "--no-restore-special", "--quantile", "0.8"])
    config = method_config(args)
    assert (config.targets, config.layers, config.edit_steps, config.selection, config.implementation, config.sigma,
            config.seed, config.restore_special, config.quantile) == (
        ["dog"], ("up_blocks.1",), 3, "image", "direct", 2, 5, False, 0.8)
    assert request_of(args).sampling.seed == 0  # --init-seed is the method's seed, not the sampling seed
    reg = Regulation(config=config)
    assert reg.target_words == ["dog"] and Regulation(["dog"], edit_steps=3, layers="up_blocks.1").config.layers == (
        "up_blocks.1",)


def test_nouns_are_chosen_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="attnctl"):
        assert choose_targets(PROMPT) == ["cat", "dog"]
    assert "cat, dog" in caplog.text and "extension" in caplog.text


@pytest.mark.parametrize("flags, message", [  # a bad layer takes the same path as a bad target (at attach)
    (["--targets", "zebra"], "'zebra' is not in the prompt"),
    (["--targets", "cat", "--edit-steps", "3"], "edit_steps=3 but the pipeline runs 1 steps"),  # inside the call
])
def test_cli_bad_input_exits_cleanly(tmp_path, flags, message, cli):
    code, out, err = cli("generate", "--method", "regulation", "--model", "random:sd15-tiny", "--prompt", PROMPT,
                         "--steps", "1", "--height", "64", "--width", "64", "--out", tmp_path, *flags)
    assert code == 2, err
    assert message in err and "Traceback" not in err + out


def test_strength_zero_is_the_plain_pipeline_and_one_the_method():
    pipe = tiny_pipe("unet")
    plain = run(pipe, PROMPT, **kwargs(steps=1, size=128))
    outputs = {}
    for strength in (None, 0.0, 1.0, 0.5):
        options = {} if strength is None else {"strength": strength}
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1, iterations=5, **options), prompt=PROMPT):
            outputs[strength] = run(pipe, PROMPT, **kwargs(steps=1, size=128))
    assert torch.equal(outputs[0.0], plain)
    assert torch.equal(outputs[1.0], outputs[None])
    assert not torch.equal(outputs[0.5], outputs[None]) and not torch.equal(outputs[0.5], plain)


def test_two_pipelines_in_two_threads_match_their_single_thread_images():
    """The optimisation's CPU settings (one intra-op thread, denormals flushed) belong to the calling thread and are
    restored: two regulated pipelines running at once give the images each gives alone, and leave the settings."""
    import threading

    from conftest import TINY

    pipes = [attnctl.load_pipeline(TINY["unet"]) for _ in range(2)]
    prompts = [PROMPT, "a red cat and a blue dog"]

    def generate(pipe, prompt):
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=2, iterations=5), prompt=prompt):
            return run(pipe, prompt, **kwargs(steps=2, size=128))

    threads_before = torch.get_num_threads()
    alone = [generate(p, t) for p, t in zip(pipes, prompts)]
    together: list = [None, None]
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        together[i] = generate(pipes[i], prompts[i])

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    assert torch.get_num_threads() == threads_before
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # denormals are not flushed outside the optimisation
