"""Regulation's optimisation as one compiled region: `implementation="compiled"` (and "auto" on CUDA).

The fast optimisation (`regulation_math.optimise_fast`, with `split_logits` before it) is compiled by
`torch.compile` and called through one custom operator, `attnctl::regulation_trajectory`: to the dispatcher (and to
a model the user compiles, which sees its fake implementation) the 20 iterations are one operator, and inside it
inductor fuses the element-wise work of each iteration into a few kernels around the matrix products and the order
statistic. The same function as the eager fast path is compiled, so the two agree to float32 rounding (tested).

A new shape (site resolution, rows, targets) or new constants compile once (seconds on a CPU, cached on disk by
inductor); later calls of the same shape reuse the compiled code, so denoising steps do not recompile (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import regulation_math


@dataclass(frozen=True)
class _Constants:
    """The constants `optimise_fast` reads from a `RegulationConfig`, as plain numbers (a custom operator takes
    tensors and numbers, not the config)."""

    iterations: int
    quantile: float
    quantile_target: float
    gamma: float
    delta: float
    epsilon: float
    step_size: float
    total_share: float  # θ for this call's number of targets

    def theta(self, k: int) -> float:
        return self.total_share


def _trajectory(logits, target_index, other_index, basis, w0, constants: _Constants):
    target_logits, rest = regulation_math.split_logits(logits, target_index, other_index)
    trajectory = regulation_math.optimise_fast(target_logits, rest, basis, w0, constants)
    return trajectory.row_losses, trajectory.weights.contiguous()


@functools.cache
def _compiled():
    # dynamic=False: a site's shapes are fixed for a run, and the quantile's ranks are Python numbers of N
    return torch.compile(_trajectory, fullgraph=True, dynamic=False)


@torch.library.custom_op("attnctl::regulation_trajectory", mutates_args=())
def regulation_trajectory(logits: torch.Tensor, target_index: torch.Tensor, other_index: torch.Tensor,
                          basis: torch.Tensor, w0: torch.Tensor, iterations: int, quantile: float,
                          quantile_target: float, gamma: float, delta: float, epsilon: float, step_size: float,
                          total_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_losses (iterations, rows), weights (iterations, rows, K, k)) of `optimise_fast` on `logits` (rows, N, L)
    with the target columns `target_index` and the others `other_index`, computed by the compiled region."""
    constants = _Constants(iterations, quantile, quantile_target, gamma, delta, epsilon, step_size, total_share)
    return _compiled()(logits, target_index, other_index, basis, w0, constants)


@regulation_trajectory.register_fake
def _(logits, target_index, other_index, basis, w0, iterations, quantile, quantile_target, gamma, delta, epsilon,
      step_size, total_share):
    rows, n_centres, k = w0.shape
    return logits.new_empty(iterations, rows), logits.new_empty(iterations, rows, n_centres, k)


def optimise_compiled(logits: torch.Tensor, target_index: torch.Tensor, other_index: torch.Tensor,
                      basis: torch.Tensor, w0: torch.Tensor, settings) -> regulation_math.Trajectory:
    """`optimise_fast` after `split_logits`, as one operator; `settings` is the RegulationConfig."""
    k = target_index.numel()
    row_losses, weights = regulation_trajectory(
        logits, target_index, other_index, basis, w0, settings.iterations, settings.quantile,
        settings.quantile_target, settings.gamma, settings.delta, settings.epsilon, settings.step_size,
        settings.theta(k))
    return regulation_math.Trajectory(row_losses, weights)
