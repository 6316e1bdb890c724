"""Regulation's optimisation as one compiled region (`implementation="compiled"`, issue 31 item 2): the same numbers as
the float64 formulas within the fast path's tolerances, the same images as the direct implementation, one operator to
the dispatcher, no recompiles across steps, and "auto" choosing it on CUDA only.

Each new shape compiles once (about 10 s on this CPU, more when busy), so these tests use one case of the math tests
and the tiny UNet's one edited resolution."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import attnctl
from attnctl.methods import regulation_compiled, regulation_math
from attnctl.methods.regulation import Regulation, RegulationConfig, resolved_implementation
from test_regulation_math import CASES, DEFAULTS, logits, ref_optimise, ref_probs
from test_regulation_ops import operators_per_call

from conftest import run, tiny_pipe

PROMPT = "a cat and a dog"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_matches_the_float64_formulas(dtype):
    rows, (h, w), targets, (loss_tol, field_tol, probs_tol) = CASES[0]  # SD 1.5's 16×16 layers, 2 images × 8 heads
    if dtype == torch.float64:  # measured: the fast path's float64 agreement (losses 4e-13 relative)
        loss_tol, field_tol, probs_tol = 1e-10, 1e-9, 1e-10
    S = logits(rows, h * w, seed=rows)
    G = regulation_math.gaussian_basis(h, w, dtype=torch.float64)[0]
    w0 = torch.rand(rows, G.shape[1], len(targets), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_losses, ref_best, ref_field = ref_optimise(S, targets, G, w0)
    index = torch.tensor(targets)
    others = torch.tensor([i for i in range(S.shape[-1]) if i not in targets])
    trajectory = regulation_compiled.optimise_compiled(S.to(dtype), index, others, G.to(dtype), w0.to(dtype),
                                                       DEFAULTS)
    losses = trajectory.batch_losses().double()
    torch.testing.assert_close(losses, torch.tensor(ref_losses, dtype=torch.float64), rtol=loss_tol, atol=0)
    best = int(torch.argmin(losses))
    assert best == ref_best
    field = regulation_math.field_of(G.to(dtype), trajectory.weights[best]).double()
    assert (field - ref_field).abs().max().item() <= field_tol * ref_field.abs().max().item()
    eos = max(targets) + 1
    P = regulation_math.edited_probs(S.to(dtype), index, field.to(dtype), keep=(0, eos)).double()
    assert (P - ref_probs(S, targets, ref_field, eos)).abs().max().item() <= probs_tol


def test_compiled_in_a_pipeline_gives_the_direct_images_and_compiles_only_once():
    pipe = tiny_pipe("unet")
    kwargs = dict(height=256, width=256, num_inference_steps=2, output_type="latent")  # its layers at 8×8
    images = {}
    for impl in ("direct", "compiled"):
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=2, implementation=impl), prompt=PROMPT):
            images[impl] = run(pipe, PROMPT, **kwargs)
    scale = images["direct"].abs().max().item()
    assert (images["compiled"] - images["direct"]).abs().max().item() < 1e-4 * scale  # the fast path's tolerance
    compiled_graphs = counters["stats"]["unique_graphs"]
    with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=2, implementation="compiled"), prompt=PROMPT):
        again = run(pipe, PROMPT, **kwargs)
    assert counters["stats"]["unique_graphs"] == compiled_graphs  # the same shapes: nothing compiled again
    assert torch.equal(again, images["compiled"])


def test_the_compiled_region_is_one_operator_and_an_edited_call_at_most_60():
    """Counted as in test_regulation_ops (the tiny UNet at 256², guidance, two targets, 20 iterations): the fast
    path dispatches 318 operators per later edited call; compiled, the optimisation is one operator and the call 54
    (57–60 at the first step, which starts from the random initial weights; 81 at a run's first call, which also
    draws the initial weights of every later step and makes the index tensors and the basis)."""
    counts = operators_per_call("compiled")
    assert len(counts) == 6, counts  # 3 sites × 2 steps
    assert max(counts[1:]) <= 60, counts
    assert counts[0] <= 90, counts


def test_the_fake_implementation_gives_the_shapes_without_computing():
    with FakeTensorMode():
        row_losses, weights = regulation_compiled.regulation_trajectory(
            torch.empty(16, 64, 77), torch.empty(2, dtype=torch.long), torch.empty(75, dtype=torch.long),
            torch.empty(64, 9), torch.empty(16, 9, 2), 20, 0.9, 0.9, 1.0, 80.0, 0.09, 100.0, 0.4)
    assert row_losses.shape == (20, 16) and weights.shape == (20, 16, 9, 2)


@pytest.mark.parametrize("implementation, device, runs", [("auto", "cuda", "compiled"), ("auto", "cpu", "fast"),
                                                          ("compiled", "cpu", "compiled"), ("fast", "cuda", "fast")])
def test_auto_compiles_on_cuda_only(implementation, device, runs):
    config = RegulationConfig(targets=["cat"], implementation=implementation)
    assert resolved_implementation(config, device) == runs


def _failing_compile(*args):
    raise torch._inductor.exc.InductorError(RuntimeError("no C++ compiler found"), None)


def test_a_failing_compiler_is_a_usage_error_when_asked_for_and_falls_back_under_auto(monkeypatch, caplog):
    import logging

    from attnctl.methods import regulation

    pipe = tiny_pipe("unet")
    kwargs = dict(height=256, width=256, num_inference_steps=1, output_type="latent")
    with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1, implementation="fast"), prompt=PROMPT):
        fast = run(pipe, PROMPT, **kwargs)
    monkeypatch.setattr(regulation_compiled, "_compiled", lambda: _failing_compile)
    with pytest.raises(attnctl.UsageError, match=r"could not compile on cpu \(InductorError.*"
                                                 r"implementation='fast'"):
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1, implementation="compiled"), prompt=PROMPT):
            run(pipe, PROMPT, **kwargs)
    monkeypatch.setattr(regulation, "resolved_implementation", lambda config, device: "compiled")  # auto on CUDA
    with caplog.at_level(logging.WARNING, "attnctl"):
        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=1), prompt=PROMPT):
            fallen_back = run(pipe, PROMPT, **kwargs)
    assert caplog.text.count("compiling the optimisation failed") == 1  # once, not at every site
    assert torch.equal(fallen_back, fast)
