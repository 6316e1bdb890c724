"""AST's tuned joint attention, computed three ways: the formula, a direct path and a fast path.

With S = q kᵀ·scale and P = softmax(S) row-wise, AST computes softmax(S + B)·V where, on the tuned blocks X of the
joint attention matrix (image→image, image→text, text→text; text→image is never touched),
    B_X[r, c] = α_X[r] · (M_X[r, c] − P[r, c]),     α_X[r] = w_X · ρ_X[r] · τ(t),
and B = 0 elsewhere. This equals the reference's "P_X ← P_X · exp(B_X), then renormalise every row". The targets M
are label equalities, so no N×N table is ever stored:
    I2I: M[p, q] = [img_label[p] == img_label[q]]           (same region, background included)
    I2T: M[p, j] = [img_label[p] == i2t_label[j]]          (token j has a selected role of pixel p's region)
    T2T: M[i, j] = [t2t_label[i] == t2t_label[j]]          (same phrase; unique labels elsewhere give the identity)

- `reference_attention`: the formula with the whole N×N matrices, in float64. Tests compare the others to it.
- `direct_attention`: the formula, query chunk by query chunk (memory: chunk × N per batch row and head).
- `fast_attention`: two passes and memory O(N·head_dim): the row log-sum-exp L comes from the fused attention kernel
  (first pass, no N×N), then per small query chunk S − L comes from one fused matmul, P = exp(S − L), the bias is
  added in place, and exp(S + B − L − max|α|)·V and its row sums give the output without a softmax pass (the shift
  is an upper bound of the row maximum, so nothing overflows). Chunks hold at most `budget` scores (default: twice the
  size of q, at least 2^18), so extra memory grows like q, not like N².
- `approximate=True` (fast path only): B = α·M without the −α·P term, a single fused pass per chunk (SDPA with an
  additive mask); not exact, see `attnctl.methods.ast` for its measured deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import attention, attention_with_lse, chunked_lse, cpu_attention_with_lse

DIRECT_CHUNK = 1024


@dataclass
class TuningTables:
    """What AST needs to know about one attention call, per batch row (B = the rows being tuned).

    `alpha_*` are None for blocks that are not tuned at this site; they already include w · ρ · τ."""

    text: slice  # positions of the text tokens in the joint sequence
    image: slice  # positions of the image tokens
    img_label: torch.Tensor  # long (B, I): region of each image token, 0 = background
    i2t_label: torch.Tensor  # long (B, T): region whose selected-role tokens include token j, -1 if none
    t2t_label: torch.Tensor  # long (B, T): phrase of token j; a unique negative label for tokens in no phrase
    alpha_i2i: torch.Tensor | None  # (B, I)
    alpha_i2t: torch.Tensor | None  # (B, I)
    alpha_t2t: torch.Tensor | None  # (B, T)
    # the model's key mask (text padding), additive, (B, 1 or heads, 1, N): part of S, so P and the tuned softmax
    # both see it (masked keys keep probability 0)
    key_bias: torch.Tensor | None = None

    def groups(self, n: int):
        """(query slice, [(key slice, alpha (B, rows), query labels (B, rows), key labels (B, keys))]) for every query
        row of a sequence of `n` tokens; rows outside the text and the image (FLUX.1 Kontext's context image) have no
        blocks: their attention is the model's own."""
        image_keys = []
        if self.alpha_i2i is not None:
            image_keys.append((self.image, self.alpha_i2i, self.img_label, self.img_label))
        if self.alpha_i2t is not None:
            image_keys.append((self.text, self.alpha_i2t, self.img_label, self.i2t_label))
        text_keys = []
        if self.alpha_t2t is not None:
            text_keys.append((self.text, self.alpha_t2t, self.t2t_label, self.t2t_label))
        ends = sorted([(self.text.start, self.text.stop), (self.image.start, self.image.stop)])
        others = [slice(a, b) for a, b in zip([0, ends[0][1], ends[1][1]], [ends[0][0], ends[1][0], n]) if a < b]
        return [(self.image, image_keys), (self.text, text_keys)] + [(rows, []) for rows in others]

    def to(self, device) -> TuningTables:
        """The same tables with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TuningTables(self.text, self.image, move(self.img_label), move(self.i2t_label), move(self.t2t_label),
                            move(self.alpha_i2i), move(self.alpha_i2t), move(self.alpha_t2t), move(self.key_bias))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local(s: slice, start: int) -> slice:
    return slice(s.start - start, s.stop - start)


def reference_attention(q, k, v, scale, tables: TuningTables):
    """softmax(S + B)·V with every matrix materialised, in float64; also the image→text probabilities after tuning.
    For tests and small inputs only."""
    q, k, v = q.double(), k.double(), v.double()
    S = (q @ k.transpose(-1, -2)) * scale
    if tables.key_bias is not None:
        S = S + tables.key_bias.double()
    P = torch.softmax(S, dim=-1)
    batch, n = S.shape[0], S.shape[-1]
    M = torch.zeros(batch, 1, n, n, dtype=torch.float64, device=q.device)
    A = torch.zeros(batch, 1, n, n, dtype=torch.float64, device=q.device)
    for rows, blocks in tables.groups(q.shape[2]):
        for keys, alpha, q_lab, k_lab in blocks:
            M[:, 0, rows, keys] = (q_lab[:, :, None] == k_lab[:, None, :]).double()
            A[:, 0, rows, keys] = alpha.double()[:, :, None].expand(-1, -1, keys.stop - keys.start)
    tuned = torch.softmax(S + A * (M - P), dim=-1)
    return tuned @ v, tuned[:, :, tables.image, tables.text].float()


def _chunks(rows: slice, size: int):
    for start in range(rows.start, rows.stop, size):
        yield slice(start, min(start + size, rows.stop))


def direct_attention(q, k, v, scale, tables: TuningTables, chunk: int = DIRECT_CHUNK, want_text_probs: bool = False):
    """The formula per query chunk: P = softmax(S), B, softmax(S + B)·V. Returns (out, text probs or None)."""
    compute_dtype = _compute_dtype(q.dtype)
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    out = torch.empty(q.shape, dtype=compute_dtype, device=q.device)
    probs = _text_probs_buffer(q, tables) if want_text_probs else None
    for rows, blocks in tables.groups(q.shape[2]):
        for c in _chunks(rows, chunk):
            S = (q[:, :, c].to(compute_dtype) @ kc.transpose(-1, -2)) * scale
            if tables.key_bias is not None:
                S = S + tables.key_bias.to(compute_dtype)
            P = torch.softmax(S, dim=-1)
            B = torch.zeros_like(S)
            local = _local(c, rows.start)
            for keys, alpha, q_lab, k_lab in blocks:
                M = (q_lab[:, local, None] == k_lab[:, None, :]).to(compute_dtype)[:, None]
                a = alpha[:, local].to(compute_dtype)[:, None, :, None]
                B[..., keys] = a * (M - P[..., keys])
            T = torch.softmax(S + B, dim=-1)
            out[:, :, c] = T @ vc
            if probs is not None and rows == tables.image:
                probs[:, :, local] = T[..., tables.text].float()
    return out.to(q.dtype), probs


def _text_probs_buffer(q, tables):
    n_img = tables.image.stop - tables.image.start
    n_txt = tables.text.stop - tables.text.start
    return torch.empty(q.shape[0], q.shape[1], n_img, n_txt, dtype=torch.float32, device=q.device)


def fast_attention(q, k, v, scale, tables: TuningTables, lse=None, budget: int | None = None,
                   want_text_probs: bool = False, approximate: bool = False):
    """Exact two-pass AST attention with memory O(N·head_dim) (see the module doc). `lse`: the rows' log-sum-exp of
    the plain logits if already known (float32 (B, H, N)). Returns (out, text probs or None)."""
    compute_dtype = _compute_dtype(q.dtype)
    if approximate:
        return _approximate_attention(q, k, v, scale, tables, budget, want_text_probs)
    if lse is None:
        lse = row_lse(q, k, v, scale, tables.key_bias)
    batch, heads, n, dim = q.shape
    budget = budget or max(1 << 18, 2 * q.numel())
    size = max(16, budget // max(1, batch * heads * n))
    kt = k.to(compute_dtype).transpose(-1, -2).reshape(batch * heads, dim, n)
    vc = v.to(compute_dtype).reshape(batch * heads, n, dim)
    out = torch.empty(q.shape, dtype=compute_dtype, device=q.device)
    probs = _text_probs_buffer(q, tables) if want_text_probs else None
    for rows, blocks in tables.groups(q.shape[2]):
        for c in _chunks(rows, size):
            rows_c = c.stop - c.start
            local = _local(c, rows.start)
            neg_lse = lse[:, :, c].to(compute_dtype).neg().reshape(batch * heads, rows_c, 1)
            qc = q[:, :, c].to(compute_dtype).reshape(batch * heads, rows_c, dim)
            # U = S − L in one fused op; U <= 0 and exp(U) = P
            U = torch.baddbmm(neg_lse, qc, kt, alpha=scale).view(batch, heads, rows_c, n)
            if tables.key_bias is not None:
                U.add_(tables.key_bias.to(compute_dtype))
            if blocks:
                alphas, shifted_targets = _bias_tables(blocks, local, batch, rows_c, n, compute_dtype, q.device)
                U.addcmul_(U.exp(), alphas, value=-1.0)  # − α·P
                U.add_(shifted_targets)  # + α·M − max|α| (shift: keeps every exponent <= 0)
            E = U.exp_()
            denom = E.sum(dim=-1, keepdim=True)
            out[:, :, c] = torch.bmm(E.view(batch * heads, rows_c, n), vc).view(batch, heads, rows_c, dim).div_(denom)
            if probs is not None and rows == tables.image:
                probs[:, :, local] = (E[..., tables.text] / denom).float()
            del U, E
    return out.to(q.dtype), probs


def _bias_tables(blocks, local: slice, batch: int, rows: int, n: int, dtype, device):
    """Per query chunk, both (B, 1, rows, N): α of each (row, key) (0 on untouched keys), and α·M − max|α| (the
    target term less the row's shift)."""
    alphas = torch.zeros(batch, 1, rows, n, dtype=dtype, device=device)
    targets = torch.zeros(batch, 1, rows, n, dtype=torch.bool, device=device)  # M
    for keys, alpha, q_lab, k_lab in blocks:
        alphas[..., keys] = alpha[:, local].to(dtype)[:, None, :, None]
        targets[..., keys] = (q_lab[:, local, None] == k_lab[:, None, :])[:, None]
    bound = alphas.abs().amax(dim=-1, keepdim=True)
    return alphas, (alphas * targets).sub_(bound)


def row_lse(q, k, v, scale, key_bias=None) -> torch.Tensor:
    """Row log-sum-exp of the plain logits from the fused kernel (float32; float64 for float64 inputs on CPU); with
    a key mask, of the masked logits."""
    if key_bias is not None:
        return chunked_lse(q, k, scale, key_bias)
    if q.dtype == torch.float64 and q.device.type == "cpu":
        return cpu_attention_with_lse(q, k, v, scale)[1]
    return attention_with_lse(q, k, v, scale=scale)[1]


def _approximate_attention(q, k, v, scale, tables, budget, want_text_probs):
    """softmax(S + α·M)·V (no −α·P term), one fused SDPA pass per query chunk with an additive (B, 1, c, N) mask."""
    batch, heads, n, _ = q.shape
    budget = budget or max(1 << 20, 2 * q.numel())
    size = max(16, (budget * heads) // max(1, batch * n))  # the mask has no head axis
    out = torch.empty_like(q)
    probs = _text_probs_buffer(q, tables) if want_text_probs else None
    for rows, blocks in tables.groups(q.shape[2]):
        for c in _chunks(rows, size):
            local = _local(c, rows.start)
            mask = None if tables.key_bias is None else tables.key_bias.to(q.dtype).expand(-1, -1, c.stop - c.start, -1)
            if blocks:
                tuned = torch.zeros(batch, 1, c.stop - c.start, n, dtype=q.dtype, device=q.device)
                for keys, alpha, q_lab, k_lab in blocks:
                    m = (q_lab[:, local, None] == k_lab[:, None, :])[:, None]
                    tuned[..., keys] = (m * alpha[:, local][:, None, :, None]).to(q.dtype)
                mask = tuned if mask is None else tuned + mask
            out[:, :, c] = attention(q[:, :, c], k, v, mask=mask, scale=scale)
            if probs is not None and rows == tables.image:
                S = (q[:, :, c].float() @ k[:, :, tables.text].float().transpose(-1, -2)) * scale
                full = (q[:, :, c].float() @ k.float().transpose(-1, -2)) * scale
                if mask is not None:
                    S = S + mask[..., tables.text].float()
                    full = full + mask.float()
                probs[:, :, local] = torch.exp(S - torch.logsumexp(full, dim=-1, keepdim=True))
    return out, probs


_compiled_flex = None


def _flex():
    """flex_attention: compiled once on CUDA (one fused kernel per shape); eager elsewhere (it then materialises the
    scores, which is fine for tests and small inputs)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attention_ast(q, k, v, scale, tables: TuningTables, lse, want_text_probs: bool = False):
    """Exact AST attention as one `flex_attention` pass whose `score_mod` adds the bias from per-token label and α
    vectors and the rows' plain log-sum-exp `lse` (float32 (B, H, N), with the key mask if any): never an N×N
    tensor, in the model's dtype with the kernel's float32 scores. Returns (out, text probs or None)."""
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, n, _ = q.shape
    dev = q.device
    kind = torch.zeros(n, dtype=torch.int8, device=dev)  # 1: image token, 2: text token, 0: other (context image)
    kind[tables.image].fill_(1)
    kind[tables.text].fill_(2)

    def spread(values, where, fill):
        full = torch.full((batch, n), fill, dtype=values.dtype, device=dev)
        full[:, where] = values
        return full

    lab_img = spread(tables.img_label, tables.image, -1)
    lab_i2t = spread(tables.i2t_label, tables.text, -2)
    lab_t2t = spread(tables.t2t_label, tables.text, -3)
    dtype = _compute_dtype(q.dtype)
    zero = torch.zeros(batch, 1, dtype=dtype, device=dev).expand(-1, n)
    a_ii = zero if tables.alpha_i2i is None else spread(tables.alpha_i2i.to(dtype), tables.image, 0.0)
    a_it = zero if tables.alpha_i2t is None else spread(tables.alpha_i2t.to(dtype), tables.image, 0.0)
    a_tt = zero if tables.alpha_t2t is None else spread(tables.alpha_t2t.to(dtype), tables.text, 0.0)
    key_bias = None if tables.key_bias is None else tables.key_bias.to(dtype).expand(batch, heads, 1, n)[:, :, 0]
    lse = lse.to(dtype)

    def score_mod(score, b, h, qi, ki):
        if key_bias is not None:
            score = score + key_bias[b, h, ki]
        p = torch.exp(score - lse[b, h, qi])
        key_image, key_text = kind[ki] == 1, kind[ki] == 2
        m = torch.where(key_image, lab_img[b, qi] == lab_img[b, ki],
                        torch.where(kind[qi] == 1, lab_img[b, qi] == lab_i2t[b, ki], lab_t2t[b, qi] == lab_t2t[b, ki]))
        alpha = torch.where(key_image, a_ii[b, qi], torch.where(key_text, a_it[b, qi] + a_tt[b, qi], 0.0))
        return score + alpha * (m.to(score.dtype) - p)

    attend = _flex() if dev.type == "cuda" else flex_attention
    out, tuned_lse = attend(q, k, v, score_mod=score_mod, scale=scale, **_lse_request())
    if not isinstance(tuned_lse, torch.Tensor):  # AuxOutput
        tuned_lse = tuned_lse.lse
    return out, (_flex_text_probs(q, k, scale, tables, lse, tuned_lse.to(dtype)) if want_text_probs else None)


def _lse_request() -> dict:
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def _flex_text_probs(q, k, scale, tables: TuningTables, lse, tuned_lse):
    """The tuned image→text probabilities (float32 (B, H, I, T)) from the plain and the tuned row LSE: one small
    image × text product."""
    img, txt, dtype = tables.image, tables.text, lse.dtype
    S = (q[:, :, img].to(dtype) @ k[:, :, txt].to(dtype).transpose(-1, -2)) * scale
    if tables.key_bias is not None:
        S = S + tables.key_bias[..., txt].to(dtype)
    if tables.alpha_i2t is not None:
        M = (tables.img_label[:, :, None] == tables.i2t_label[:, None, :])[:, None].to(dtype)
        P = torch.exp(S - lse[:, :, img, None])
        S = S + tables.alpha_i2t.to(dtype)[:, None, :, None] * (M - P)
    return torch.exp(S - tuned_lse[:, :, img, None]).float()
