"""The arithmetic of Attention Regulation (arXiv 2403.06381), separate from the controller that applies it.

One optimisation, two implementations that compute the same thing:

- `optimise_direct`: the formulas as written. Each iteration adds the field to the target columns of the full
  (rows, pixels, text tokens) logits, takes the softmax over all text tokens, scores the target columns with
  `torch.quantile` and gets the gradient from autograd; the update is w ← w − (rows · step size) · ∂L/∂w with L the
  one loss over the batch, as in the reference.
- `optimise_fast`: the same iterates from (targets, rows, pixels) tensors only. The softmax denominator of a pixel
  is exp(rest) + Σ_t exp(s_t + A_t), where `rest` (the log-sum-exp of the untouched columns) is computed once per
  call, so the target columns are a softmax over k + 1 values per pixel; the gradient is written out analytically.
  The loss is a mean over rows of per-row terms, so the gradient of the batch loss for row r is ∂L_r/∂w_r / rows
  and the reference's step (rows · step size) is step size · ∂L_r/∂w_r: every row follows its own trajectory and
  only the choice of the best iterate ties rows together.

Shapes: rows = conditional images × heads; N = H·W pixels; L = text tokens; k targets; K basis centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the optimisation reads its constants from the method's config
    from .regulation import RegulationConfig


@dataclass
class Trajectory:
    """The scored iterates of one optimisation: iterate j is scored before update j (the last update is never
    scored, so it is not made)."""

    row_losses: torch.Tensor  # (iterations, rows): the loss of each row's own terms; the batch loss is their mean
    weights: torch.Tensor  # (iterations, rows, K, k)

    def batch_losses(self) -> torch.Tensor:
        """(iterations,): each iterate's batch loss, the mean of its rows' losses."""
        return self.row_losses.mean(dim=1)


def default_sigma(width: int) -> int:
    """σ = W // 16 as in the reference, but at least 1 (the reference fails on grids narrower than 16)."""
    return max(1, width // 16)


def gaussian_basis(height: int, width: int, sigma: int | None = None, dtype=torch.float32, device=None):
    """Isotropic Gaussians exp(−((x − x0)² + (y − y0)²) / 2σ²) on the H×W grid, centres every 2σ pixels from 2σ on
    (centre order: x0 outer, y0 inner, as the reference builds them). Returns ((H·W, K) row-major pixels, σ)."""
    sigma = default_sigma(width) if sigma is None else int(sigma)
    if sigma < 1:
        raise ValueError("sigma must be >= 1")
    centres = [(x0, y0) for x0 in range(2 * sigma, width, 2 * sigma) for y0 in range(2 * sigma, height, 2 * sigma)]
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    xx, yy = xx.reshape(-1, 1), yy.reshape(-1, 1)
    if centres:
        c = torch.tensor(centres, dtype=torch.float64)
        basis = torch.exp(-((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) / (2.0 * sigma**2))
    else:
        basis = torch.zeros(height * width, 0, dtype=torch.float64)
    return basis.to(dtype=dtype, device=device), sigma


def _quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """torch.quantile's linear interpolation: sorted positions below/above q·(n−1) and the weight of the upper."""
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    return lo, hi, pos - lo


def split_logits(logits: torch.Tensor, targets, others: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, N, L) logits → target logits (rows, N, k) and the log-sum-exp of all other columns (rows, N): the
    untouched part of every softmax denominator, computed once. `targets`: positions (a list, or a tensor); `others`:
    the other positions as an index tensor on the logits' device, where the caller keeps one (then nothing is read
    back or made from Python data)."""
    if others is None:
        positions = targets.tolist() if torch.is_tensor(targets) else [int(t) for t in targets]
        others = torch.tensor([i for i in range(logits.shape[-1]) if i not in set(positions)], dtype=torch.long,
                              device=logits.device)
        targets = torch.tensor(positions, dtype=torch.long, device=logits.device)
    picked = logits[..., targets]
    if others.numel() == 0:
        return picked, logits.new_full(logits.shape[:-1], -math.inf)
    return picked, torch.logsumexp(logits[..., others], dim=-1)


def optimise_fast(target_logits: torch.Tensor, rest_lse: torch.Tensor, basis: torch.Tensor, w0: torch.Tensor,
                  settings: RegulationConfig) -> Trajectory:
    """The optimisation on (k, rows, N) tensors with an analytic gradient, in few operators (a GPU launches a kernel
    per operator): an iteration is 11 (the last 6), most writing into buffers made once per call, and the losses
    are computed after the loop from the gaps each iteration kept. `target_logits` (rows, N, k), `rest_lse`
    (rows, N), `basis` (N, K), `w0` (rows, K, k); all in one float dtype (float32 in use)."""
    rows, n, k = target_logits.shape
    n_centres = basis.shape[1]
    lo, hi, frac = _quantile_ranks(n, settings.quantile)
    n_top = n - lo  # the values at sorted positions ≥ lo, largest first: position lo is the last, hi the one before
    at_lo, at_hi = n_top - 1, n_top - 1 - (hi - lo)
    share = settings.theta(k) / k
    c_q, c_mu = 2.0 * settings.gamma / k, 2.0 * settings.delta / (k * n)
    c_w = 2.0 * settings.epsilon / (n_centres * k)
    like = dict(dtype=target_logits.dtype, device=target_logits.device)
    # The target columns and the untouched rest as one softmax over k + 1 rows per pixel, target-major so that the
    # targets' part is one (k · rows, N) matrix: A = S + W·Gᵀ is written into it by one addmm.
    z = torch.empty(k + 1, rows, n, **like)
    z[k] = rest_lse
    z_targets = z.view((k + 1) * rows, n)[: k * rows]
    s = target_logits.permute(2, 0, 1).reshape(k * rows, n)
    basis_t = basis.t()
    m_all = torch.empty_like(z)
    m = m_all[:k]  # (k, rows, N): the target columns of the softmax over all tokens
    # ∂L_r/∂m over all k + 1 rows divided by c_mu (its factor moves to the step): mean(m) on every pixel, the
    # quantile term on its two order statistics, and share (θ/k) on the untouched row. The softmax's gradient is
    # the same for any constant added to all its rows, so this is mean(m) − share on the targets and 0 on the rest.
    scale = c_mu if c_mu else 1.0
    g_all = torch.empty_like(z)
    g_all[k].fill_(share if c_mu else 0.0)
    g = g_all[:k]
    ga = torch.empty_like(z)  # ∂L_r/∂A / c_mu
    ga_rows = ga.view((k + 1) * rows, n)[: k * rows]
    top = torch.empty(k, rows, n_top, **like)
    order = torch.empty(k, rows, n_top, dtype=torch.long, device=like["device"])
    v_lo, v_hi, at_both = top[..., at_lo:], top[..., at_hi : at_hi + 1], order[..., at_hi:]
    # the quantile term's weight on the order statistics at_hi..at_lo: frac on hi, 1 − frac on lo
    weights = torch.linspace(frac if hi > lo else 1.0 - frac, 1.0 - frac, at_lo - at_hi + 1, **like) * (c_q / scale)
    w = w0.permute(2, 0, 1).reshape(k * rows, n_centres)
    iterates, quantile_gaps, means = [w], [], []
    for it in range(settings.iterations):
        torch.addmm(s, w, basis_t, out=z_targets)
        torch.softmax(z, dim=0, out=m_all)
        torch.topk(m, n_top, dim=-1, out=(top, order))
        dq = torch.lerp(v_lo, v_hi, frac).sub_(settings.quantile_target)  # (k, rows, 1): q90(m) − 0.9
        mean = m.mean(dim=-1, keepdim=True)  # (k, rows, 1)
        quantile_gaps.append(dq)
        means.append(mean)
        if it == settings.iterations - 1:
            break
        # then through the softmax and the basis: w ← w − step · (c_w · w + ∂L/∂A · G)
        if c_mu:
            g.copy_(mean)
        else:
            g.zero_()
        g.scatter_add_(-1, at_both, dq * weights)
        torch.ops.aten._softmax_backward_data.out(g_all, m_all, 0, g.dtype, grad_input=ga)
        w = torch.addmm(w, ga_rows, basis, beta=1.0 - settings.step_size * c_w, alpha=-settings.step_size * scale)
        iterates.append(w)
    weights_t = torch.stack(iterates).view(-1, k, rows, n_centres)  # (iterations, k, rows, K)
    dq = torch.stack(quantile_gaps).squeeze(-1)  # (iterations, k, rows)
    dmu = torch.stack(means).squeeze(-1).sub_(share)
    row_losses = (settings.gamma * (dq * dq).mean(1) + settings.delta * (dmu * dmu).mean(1)
                  + settings.epsilon * (weights_t * weights_t).mean(dim=(1, 3)))
    return Trajectory(row_losses, weights_t.permute(0, 2, 3, 1))


def optimise_direct(logits: torch.Tensor, targets: torch.Tensor, basis: torch.Tensor, w0: torch.Tensor,
                    settings: RegulationConfig) -> Trajectory:
    """The formulas as written: full logits (rows, N, L), softmax over all L tokens, torch.quantile, autograd on the
    batch loss, step (rows · step size). Same arguments and result as `optimise_fast` otherwise."""
    rows, n, n_text = logits.shape
    k = targets.numel()
    theta = settings.theta(k)
    w = w0.clone()
    losses, iterates = [], []
    for it in range(settings.iterations):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            field = torch.einsum("nc,rck->rnk", basis, w)  # A_t = Σ_c w_{c,t} G_c
            additive = torch.zeros_like(logits).index_copy(-1, targets, field)
            maps = torch.softmax(logits + additive, dim=-1)[..., targets]  # (rows, N, k)
            q = torch.quantile(maps, settings.quantile, dim=1)  # (rows, k)
            mean = maps.mean(dim=1)
            loss = (settings.gamma * ((q - settings.quantile_target) ** 2).mean()
                    + settings.delta * ((mean - theta / k) ** 2).mean() + settings.epsilon * (w**2).mean())
        with torch.no_grad():
            losses.append(settings.gamma * ((q - settings.quantile_target) ** 2).mean(-1)
                          + settings.delta * ((mean - theta / k) ** 2).mean(-1)
                          + settings.epsilon * (w**2).mean(dim=(1, 2)))
        iterates.append(w.detach())
        if it == settings.iterations - 1:
            break
        (grad,) = torch.autograd.grad(loss, [w])
        w = w.detach() - rows * settings.step_size * grad
    return Trajectory(torch.stack(losses), torch.stack(iterates))


def field_of(basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_c w_{c,t} G_c for weights (rows, K, k): (rows, N, k)."""
    return torch.matmul(basis, weights)


def edited_probs(logits: torch.Tensor, targets: torch.Tensor, field: torch.Tensor, keep=(),
                 plain: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(S + A on the target columns) over all tokens, then the columns in `keep` (start and end-of-text
    tokens: positions, or an index tensor on the logits' device of positions within L) reset to their unedited
    probabilities, without renormalising: (rows, N, L). `plain`: softmax(S), where the caller has it already."""
    edited = logits.index_add(-1, targets, field)
    probs = torch.softmax(edited, dim=-1)
    if not torch.is_tensor(keep):
        keep = [int(i) for i in keep if i is not None and 0 <= int(i) < logits.shape[-1]]
        keep = torch.tensor(keep, dtype=torch.long, device=logits.device) if keep else None
    if keep is not None and keep.numel():
        plain = torch.softmax(logits, dim=-1) if plain is None else plain
        probs[..., keep] = plain[..., keep]
    return probs
