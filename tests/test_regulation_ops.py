"""Operators Regulation dispatches per edited attention call (issue 31, item 2): a GPU launches a kernel per operator,
and at the sizes of an edited call (rows × pixels × targets: thousands of values) launches, not arithmetic, bound its
time.

Counted by a dispatch mode between a controller placed before Regulation and an observer after it (so only
Regulation's own work at the call is counted), on the tiny UNet at 256²: its 3 default sites, classifier-free
guidance, one prompt, 2 targets. Before this work (main at 488ae0c) the fast implementation dispatched 1036 operators
per edited call at the default 20 iterations (1065 at a run's first), 49 per iteration; now 11 per iteration (6 for
the last) and a fixed part for the call: 318 in all (345 at a run's first, which also draws the initial weights and
makes the index tensors and the basis). The direct implementation (autograd, for tests) stays at about 2520.

Eagerly, 60 per call cannot be met: each iteration depends on the one before through a softmax, an order statistic
and a scatter, so an iteration is at least about ten dependent operators and 20 iterations about 200. The compiled
implementation makes the loop one operator (tests/test_regulation_compiled.py: 54 per call).
"""

from torch.utils._python_dispatch import TorchDispatchMode

import attnctl
from attnctl.methods.regulation import Regulation

from conftest import run, tiny_pipe

PROMPT = "a cat and a dog"
PER_ITERATION = 11  # the last iteration: 6
FIXED = 105  # measured: 104 at a later edited call; the first of a run does more (`FIRST_EXTRA`)
FIRST_EXTRA = 40  # measured: 34


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counting, self.calls = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.calls[-1] += 1
        return func(*args, **(kwargs or {}))


class _Start(attnctl.Controller):
    def __init__(self, counter):
        self.counter = counter

    def __call__(self, call):
        self.counter.calls.append(0)
        self.counter.counting = True


class _Stop(attnctl.Controller):
    observer = True

    def __init__(self, counter):
        self.counter = counter

    def __call__(self, call):
        self.counter.counting = False


def operators_per_call(implementation="fast", iterations=20) -> list[int]:
    """Operators Regulation dispatched at each of its edited calls of a 2-step run (3 sites, both steps edited)."""
    pipe = tiny_pipe("unet")
    counter = _Counter()
    regulation = Regulation(["cat", "dog"], edit_steps=2, implementation=implementation, iterations=iterations)
    with attnctl.apply(pipe, _Start(counter), regulation, _Stop(counter), prompt=PROMPT):
        with counter:
            run(pipe, PROMPT, height=256, width=256, num_inference_steps=2, output_type="latent")
    return [n for n in counter.calls if n]  # the sites Regulation does not edit count 0


def test_operators_per_edited_call():
    counts = {iterations: operators_per_call(iterations=iterations) for iterations in (20, 10)}
    assert all(len(c) == 6 for c in counts.values()), counts  # 3 sites × 2 steps
    # each iteration costs the same number of operators, whatever the call
    assert [a - b for a, b in zip(counts[20], counts[10])] == [PER_ITERATION * 10] * 6, counts
    loop = PER_ITERATION * 19 + 6
    first, later = counts[20][0], counts[20][3:]
    assert first <= loop + FIXED + FIRST_EXTRA, counts
    assert max(later) <= loop + FIXED, counts  # 319 measured, from 1036
