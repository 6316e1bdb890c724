"""Attaching and detaching controllers over many generations: nothing stays behind (no tensors, processors or hooks
accumulate), and the plain pipeline's image is the same bit for bit before, between and after."""

import gc

import numpy as np
import torch

import attnctl
from attnctl import AST, Capture, Regulation

from conftest import call_kwargs, denoiser_of, run, tiny_pipe

PROMPT = "a red dog and a grey cat"
LAYOUT = {"prompt": PROMPT, "background": "",
          "regions": [{"phrase": "a red dog", "box": [0.0, 0.0, 0.5, 1.0]},
                      {"phrase": "a grey cat", "box": [0.5, 0.0, 1.0, 1.0]}]}


def live_tensors() -> tuple[int, int]:
    """Count and bytes of every real tensor the garbage collector can reach (not the fake tensors of compiled
    graphs that earlier tests may leave in dynamo's caches)."""
    gc.collect()
    tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
    return len(tensors), sum(t.element_size() * t.nelement() for t in tensors)


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def cycle(name: str, controllers, generations: int):
    """`generations` generations, alternating plain and each controller; returns whether every plain image equals
    the first bit for bit, and the tensors alive after the second round and after the last (only the first plain
    image is kept: an image holds a tensor)."""
    torch._dynamo.reset()  # compiled graphs of earlier tests are freed now, not during the count
    pipe = tiny_pipe(name)
    denoiser = denoiser_of(name, pipe)
    processors, n_hooks = dict(denoiser.attn_processors), hooks(denoiser)
    kwargs = call_kwargs(name, steps=2)
    first_plain, same, alive = None, True, []
    for g in range(generations):
        make = controllers[g % len(controllers)]
        if make is None:
            image = run(pipe, PROMPT, **kwargs)
            first_plain = image if first_plain is None else first_plain
            same = same and np.array_equal(image, first_plain)
            del image
        else:
            with attnctl.apply(pipe, make(), prompt=PROMPT):
                run(pipe, PROMPT, **kwargs)
        if g + 1 in (2 * len(controllers), generations):
            alive.append(live_tensors())
    assert denoiser.attn_processors == processors and hooks(denoiser) == n_hooks
    return same, alive


def test_unet_controllers_leave_nothing_over_100_generations():
    controllers = [None, lambda: Capture(["dog", "cat"]),
                   lambda: Regulation(["dog", "cat"], edit_steps=1, iterations=2, layers=["down_blocks.1"])]
    same, (first, last) = cycle("unet", controllers, 102)
    assert last == first  # the same number and bytes of live tensors after 6 and after 102 generations
    assert same


def test_ast_leaves_nothing_over_60_generations():
    same, (first, last) = cycle("sd3", [None, lambda: AST(LAYOUT, tuned_steps=1)], 60)
    assert last == first
    assert same
