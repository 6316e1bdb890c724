"""The arithmetic of Attention Regulation (arXiv 2403.06381), separate from the controller that applies it.

One optimisation, two implementations that compute the same thing:

- `optimise_direct`: the formulas as written. Each iteration adds the field to the target columns of the full
  (rows, pixels, text tokens) logits, takes the softmax over all text tokens, scores the target columns with
  `torch.quantile` and gets the gradient from autograd; the update is w ← w − (rows · step size) · ∂L/∂w with L the
  one loss over the batch, as in the reference.
- `optimise_fast`: the same iterates from (rows, targets, pixels) tensors only. The softmax denominator of a pixel
  is exp(rest) + Σ_t exp(s_t + A_t), where `rest` (the log-sum-exp of the untouched columns) is computed once per
  call; the gradient is written out analytically. The loss is a mean over rows of per-row terms, so the gradient of
  the batch loss for row r is ∂L_r/∂w_r / rows and the reference's step (rows · step size) is step size · ∂L_r/∂w_r:
  every row follows its own trajectory and only the choice of the best iterate ties rows together.

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


def split_logits(logits: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, N, L) logits → target logits (rows, N, k) and the log-sum-exp of all other columns (rows, N): the
    untouched part of every softmax denominator, computed once. `targets`: positions (a list, or a tensor)."""
    targets = targets.tolist() if torch.is_tensor(targets) else [int(t) for t in targets]
    others = [i for i in range(logits.shape[-1]) if i not in set(targets)]
    picked = logits[..., torch.tensor(targets, device=logits.device)]
    if not others:
        return picked, logits.new_full(logits.shape[:-1], -math.inf)
    return picked, torch.logsumexp(logits[..., torch.tensor(others, device=logits.device)], dim=-1)


def optimise_fast(target_logits: torch.Tensor, rest_lse: torch.Tensor, basis: torch.Tensor, w0: torch.Tensor,
                  settings: RegulationConfig) -> Trajectory:
    """The optimisation on (rows, k, N) tensors with an analytic gradient. `target_logits` (rows, N, k),
    `rest_lse` (rows, N), `basis` (N, K), `w0` (rows, K, k); all in one float dtype (float32 in use)."""
    rows, n, k = target_logits.shape
    n_centres = basis.shape[1]
    s = target_logits.transpose(1, 2).contiguous()  # (rows, k, N)
    rest = rest_lse.unsqueeze(1)  # (rows, 1, N)
    basis_t = basis.t().contiguous()  # (K, N)
    w = w0.transpose(1, 2).contiguous()  # (rows, k, K)
    lo, hi, frac = _quantile_ranks(n, settings.quantile)
    n_top = n - lo  # the values at sorted positions ≥ lo, largest first: position lo is the last, hi the one before
    at_lo, at_hi = n_top - 1, n_top - 1 - (hi - lo)
    share = settings.theta(k) / k
    c_q, c_mu = 2.0 * settings.gamma / k, 2.0 * settings.delta / (k * n)
    c_w = 2.0 * settings.epsilon / (n_centres * k)
    losses, iterates = [], []
    for it in range(settings.iterations):
        a = torch.addmm(s.view(-1, n), w.view(-1, n_centres), basis_t).view(rows, k, n)
        lse = torch.logaddexp(rest, torch.logsumexp(a, dim=1, keepdim=True))
        m = torch.exp(a - lse)  # (rows, k, N): the target columns of softmax over all tokens
        top, idx = torch.topk(m, n_top, dim=-1)
        v_lo, v_hi = top[..., at_lo], top[..., at_hi]
        dq = v_lo + frac * (v_hi - v_lo) - settings.quantile_target  # (rows, k)
        dmu = m.mean(dim=-1) - share
        row_loss = (settings.gamma * (dq * dq).mean(-1) + settings.delta * (dmu * dmu).mean(-1)
                    + settings.epsilon * (w * w).mean(dim=(-2, -1)))
        losses.append(row_loss)
        iterates.append(w)
        if it == settings.iterations - 1:
            break
        # ∂L_r/∂m: the mean term on every pixel, the quantile term on its two order statistics
        g = (c_mu * dmu).unsqueeze(-1).expand(rows, k, n).contiguous()
        gq = c_q * dq
        g.scatter_add_(-1, idx[..., at_lo : at_lo + 1], (gq * (1.0 - frac)).unsqueeze(-1))
        if frac != 0.0:
            g.scatter_add_(-1, idx[..., at_hi : at_hi + 1], (gq * frac).unsqueeze(-1))
        # through the softmax (the untouched columns do not depend on w), then the basis
        ga = m * (g - (g * m).sum(dim=1, keepdim=True))
        # w ← w − step · (c_w · w + ∂L/∂A · G), in one fused op
        w = torch.addmm(w.view(-1, n_centres), ga.view(-1, n), basis, beta=1.0 - settings.step_size * c_w,
                        alpha=-settings.step_size).view(rows, k, n_centres)
    return Trajectory(torch.stack(losses), torch.stack(iterates).transpose(-1, -2))


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


def edited_probs(logits: torch.Tensor, targets: torch.Tensor, field: torch.Tensor, keep=()) -> torch.Tensor:
    """softmax(S + A on the target columns) over all tokens, then the columns in `keep` (start and end-of-text
    tokens) reset to their unedited probabilities, without renormalising: (rows, N, L)."""
    edited = logits.index_add(-1, targets, field)
    probs = torch.softmax(edited, dim=-1)
    keep = [int(i) for i in keep if i is not None and 0 <= int(i) < logits.shape[-1]]
    if keep:
        cols = torch.tensor(keep, device=logits.device)
        probs[..., cols] = torch.softmax(logits, dim=-1)[..., cols]
    return probs
