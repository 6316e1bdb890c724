"""No host sync inside a denoising step (issue 31, item 1), proven on the CPU.

Each controller runs on the tiny random pipelines while a watch records, inside every denoiser forward after the first
step (the run's per-run facts may be computed at step 0), what attnctl's own code asks for that would stall or copy on
a GPU:
- a host read of a tensor's value: `item`, `float`, `int`, `bool` (`aten._local_scalar_dense`), any op PyTorch tags
  `data_dependent_output` (`equal`, ...), `tolist`, `numpy`;
- an output shape read from the data: ops tagged `dynamic_output_shape` (`nonzero`, `masked_select`, `unique`, ...),
  and indexing with a boolean mask;
- a tensor made on the host: from Python data (`torch.tensor`, `as_tensor`, a Python list used as an index:
  `aten.lift_fresh`), by a factory function given no `device` (on CUDA it is made on the CPU), or drawn from a CPU
  generator;
- a device move: `.to(device)`, `.to(tensor)`, `.cpu()`, `.cuda()` (on CUDA a copy; where the tensor already is there,
  a sign that it was not made there).
An op is attnctl's when the innermost Python frame that asked for it, outside torch itself, is in `attnctl`: the
model's and the pipeline's own code (diffusers' modules, the scheduler) is not ours and is not judged. The denoiser's
forward is entered through its forward hooks, so attnctl's step hook (which runs inside the forward) is judged too.

Watched: steps 1 and 2 of 3-step runs, with Attend-and-Excite the gradient forwards it runs for them too, with
contrast guidance its forwards for the edited prompts and the guided output.
What this cannot see on a CPU-only machine: whether a kernel that runs on the device would synchronise by itself (an
implicit copy made inside a C++ kernel, a CPU scalar tensor passed to a CUDA kernel), a host read made through a path
that dispatches no op and calls no torch function, and what happens inside flex_attention (AST's flex path), which
compiles itself even when called eagerly and refuses a user's modes: it runs unwatched, attnctl's code around it is
watched. What it proves: inside the steps it watched, attnctl named no value to read back, made no tensor on the host
and moved none, in any path these runs took. `test_the_watch_catches_each_kind_of_sync_and_only_attnctls` shows the
watch catching each kind, and not counting what diffusers' own code asks for.
"""

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import attnctl
from attnctl.methods.ast import AST
from attnctl.methods.attend_excite import AttendAndExcite
from attnctl.methods.contrast_guidance import ContrastGuidance
from attnctl.methods.layout_modulation import LayoutModulation
from attnctl.methods.regulation import Regulation

from conftest import call_kwargs, denoiser_of, tiny_pipe

aten = torch.ops.aten
ATTNCTL = str(Path(attnctl.__file__).parent)
PASS_THROUGH = (str(Path(torch.__file__).parent), contextlib.__file__)

WATCH_FUNCTIONS = {"asker", "note", "__torch_dispatch__", "__torch_function__"}
LIFTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}
MOVES = {torch.Tensor.cpu, torch.Tensor.cuda}
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal}


def asker(judged: tuple[str, ...]) -> str | None:
    """`file:line function` of the innermost frame outside torch (and the watch) that asked for the op, where its
    file is under one of the `judged` paths; None elsewhere."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(PASS_THROUGH) or (
            frame.f_code.co_filename == __file__ and frame.f_code.co_name in WATCH_FUNCTIONS)):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(judged):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"


def dispatched_host_op(func, args, kwargs) -> str | None:
    """What a dispatched op does that stalls or copies on a GPU, or None."""
    if func in LIFTS:
        return "tensor from Python data"
    if torch.Tag.data_dependent_output in func.tags:
        return f"host read ({func})"
    if func in INDEXING:
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
            return f"boolean index ({func})"
        return None
    if torch.Tag.dynamic_output_shape in func.tags:
        return f"shape from data ({func})"
    generator = kwargs.get("generator")
    if generator is not None and generator.device.type == "cpu":
        return f"draw from a CPU generator ({func})"
    return None


def called_host_op(func, args, kwargs) -> str | None:
    """What a torch function call does that reads back, makes a tensor on the host or moves one, or None."""
    if func in HOST_READS:
        return f"host read ({func.__name__})"
    if func in MOVES or func is torch.Tensor.to and (
            "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])):
        return f"device move ({func.__name__})"
    if func in FACTORIES and "device" not in kwargs:
        return f"made on the host ({func.__name__} without device)"
    return None


class _Dispatched(TorchDispatchMode):
    def __init__(self, watch):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch.watching:
            self.watch.note(dispatched_host_op(func, args, kwargs))
        return func(*args, **kwargs)


class _Called(TorchFunctionMode):
    def __init__(self, watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watch.watching:
            self.watch.note(called_host_op(func, args, kwargs))
        return func(*args, **kwargs)


class Watch:
    """Records attnctl's host syncs inside the denoiser's forwards once armed (by `arm`, the pipeline's step-end
    callback: from the end of step 0 on). `found`: {(where, what): times}; `forwards`: the forwards watched."""

    def __init__(self, denoiser, judged=(ATTNCTL,)):
        self.denoiser, self.judged = denoiser, judged
        self.armed, self.depth, self.forwards = False, 0, 0
        self.found: Counter = Counter()
        self.others = 0  # what the model's and the pipeline's own code asked for (diffusers' UNet: a device move)

    @property
    def watching(self) -> bool:
        return self.armed and self.depth > 0

    def note(self, what):
        if what is not None:
            where = asker(self.judged)
            if where is None:
                self.others += 1
            else:
                self.found[(where, what)] += 1

    def arm(self, pipe, i, t, tensors):
        self.armed = True
        return {}

    def _enter(self, module, args):
        self.depth += 1
        self.forwards += self.watching

    def _leave(self, module, args, output):
        self.depth -= 1

    def report(self) -> str:
        return "\n".join(f"{n:4d}x {where}: {what}" for (where, what), n in sorted(self.found.items()))

    @contextlib.contextmanager
    def running(self):
        hooks = [self.denoiser.register_forward_pre_hook(self._enter),
                 self.denoiser.register_forward_hook(self._leave, always_call=True)]
        try:
            with _Called(self), _Dispatched(self):
                yield self
        finally:
            for h in hooks:
                h.remove()


class Acted(attnctl.Controller):
    """Observer: the attention calls of watched forwards that a method changed."""

    observer = True

    def __init__(self, watch):
        self.watch, self.modified, self.calls = watch, 0, 0

    def __call__(self, call):
        if self.watch.watching:
            self.calls += 1
            self.modified += call.modified


PROMPT = "a cat and a dog"
LAYOUT = {"prompt": "a red cat and a blue dog on grass", "background": "grass",
          "regions": [{"phrase": "a red cat", "box": [0, 0, 0.5, 1]}, {"phrase": "a blue dog", "box": [0.5, 0, 1, 1]}]}

# name: (pipeline, controllers, prompt, pipeline size, through the session)
CASES = {
    **{f"capture-{f}": (f, lambda: [attnctl.Capture(["cat", "dog"])], PROMPT, 64, False)
       for f in ("unet", "sdxl", "sd3", "flux")},
    # 256²: the default layers of the tiny UNets run at 8x8, large enough for a Gaussian basis
    **{f"regulation-{impl}-{f}": (f, lambda impl=impl: [Regulation(["cat", "dog"], implementation=impl)], PROMPT,
                                  256, False)
       for f, impl in (("unet", "fast"), ("unet", "direct"), ("unet", "compiled"), ("sdxl", "fast"))},
    "regulation-image-two-prompts": ("unet", lambda: [Regulation(["cat", "dog"], selection="image")],
                                     [PROMPT, "a dog and a cat"], 256, False),
    **{f"ast-{impl}-{f}": (f, lambda impl=impl: [AST(LAYOUT, implementation=impl)], LAYOUT["prompt"], 128, False)
       for f in ("flux", "sd3") for impl in ("fast", "direct", "reference", "flex")},
    **{f"ast-approximate-{f}": (f, lambda: [AST(LAYOUT, approximate=True)], LAYOUT["prompt"], 128, False)
       for f in ("flux", "sd3")},
    **{f"layout-modulation-{f}": (f, lambda: [LayoutModulation(LAYOUT, steps_fraction=1.0)], LAYOUT["prompt"], 128,
                                  False) for f in ("unet", "sd3", "flux")},
    "layout-modulation-hard-unet": ("unet", lambda: [LayoutModulation(LAYOUT, steps_fraction=1.0, hard_mask=True)],
                                    LAYOUT["prompt"], 128, False),
    # 128²: the tiny UNet's finest cross-attention runs at 16x16, the sites Attend-and-Excite reads
    "attend-excite-unet": ("unet", lambda: [AttendAndExcite(["cat", "dog"], max_iter_to_alter=3,
                                                            thresholds={1: 0.8}, max_refinement_steps=2)],
                           PROMPT, 128, True),
    **{f"contrast-guidance-{f}": (f, lambda: [ContrastGuidance()], LAYOUT["prompt"], 64, True)
       for f in ("unet", "sd3", "flux")},
}


def watched_run(name, controllers, prompt, size, through_session, judged=(ATTNCTL,)):
    """Runs 3 steps under the watch, judging the code under `judged`; (watch, Acted observer)."""
    pipe = tiny_pipe(name)
    watch = Watch(denoiser_of(name, pipe), judged)
    acted = Acted(watch)
    kwargs = call_kwargs(name, steps=3, height=size, width=size, output_type="latent", callback_on_step_end=watch.arm)
    with attnctl.apply(pipe, *controllers, acted, prompt=prompt) as session:
        with watch.running():
            (session if through_session else pipe)(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    return watch, acted


def unwatched_flex(flex):
    """flex_attention run with the watch's modes off: even eagerly it compiles its own wrapper, which refuses them.
    AST's flex path is judged up to that call and after it."""

    def run(*args, **kwargs):
        with torch.utils._python_dispatch._disable_current_modes(), torch.overrides._pop_mode_temporarily():
            return flex(*args, **kwargs)

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_inside_a_step(case, monkeypatch):
    name, make, prompt, size, through_session = CASES[case]
    monkeypatch.setattr(torch.nn.attention.flex_attention, "flex_attention",
                        unwatched_flex(torch.nn.attention.flex_attention.flex_attention))
    controllers = make()
    watch, acted = watched_run(name, controllers, prompt, size, through_session)
    assert watch.forwards >= 2 and acted.calls > 0  # steps 1 and 2 were watched
    if isinstance(controllers[0], (AttendAndExcite, ContrastGuidance)):
        assert watch.forwards > 2  # its own forwards (gradient, edited prompts) were watched too
    elif not isinstance(controllers[0], attnctl.Capture):
        assert acted.modified > 0  # the method acted in the watched steps
    assert not watch.found, f"{case}: host syncs inside a denoising step:\n{watch.report()}"


class Syncing(attnctl.Controller):
    """Does at every call what the watch must catch."""

    def __call__(self, call):
        float(call.q[0, 0, 0, 0])
        call.q[0, 0, 0].tolist()
        (call.q > 0).nonzero()
        torch.tensor([1.0], device=call.q.device)
        call.q[:, :, [0, 0]]
        torch.zeros(3)
        torch.rand(2, generator=torch.Generator())
        call.q.to(call.q.device)


def test_the_watch_catches_each_kind_of_sync_and_only_attnctls():
    """A controller (judged like attnctl's code) that syncs in every way listed is caught, each way at its line, at
    every watched call and only then; the plain pipeline's own code, run through attnctl's processors, is not
    counted."""
    watch, acted = watched_run("unet", [Syncing()], PROMPT, 64, False, judged=(ATTNCTL, __file__))
    ours = {key: n for key, n in watch.found.items() if key[0].startswith(Path(__file__).name)}
    assert len({where for where, _ in ours}) == 8, watch.report()
    assert {what.split(" (")[0] for _, what in ours} == {
        "host read", "shape from data", "tensor from Python data", "made on the host", "draw from a CPU generator",
        "device move"}, watch.report()
    assert set(ours.values()) == {acted.calls}, watch.report()  # each line counted at every watched call, no more
    assert watch.others > 0  # diffusers' own code was seen asking too, and not counted
