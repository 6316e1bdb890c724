"""The only place attention is computed.

Tensors are (batch, heads, tokens, head_dim). Three things are offered:
- `attention`: plain scaled-dot-product attention (the model's own fast kernel);
- `attention_with_lse`: the same output plus each query row's log-sum-exp of the scaled logits, from one fused pass
  where the backend returns it, so that the probabilities of any few keys follow as exp(q·kᵀ·scale − lse) without
  the N×N matrix (`key_probs`);
- `explicit_probs`: the direct softmax, for tests and for small matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Rows of the explicit fallback processed at once: bounds its memory to chunk × keys per (batch, head).
_LSE_CHUNK = 1024


def default_scale(q: torch.Tensor) -> float:
    """1/√head_dim for queries `q` (batch, heads, tokens, head_dim): SDPA's default scale."""
    return 1.0 / math.sqrt(q.shape[-1])


def attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v by PyTorch's SDPA (the model's own fast kernel); `mask` boolean or additive,
    `scale` None for 1/√head_dim."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


def attention_with_lse(q, k, v, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and float32 row log-sum-exp (batch, heads, queries) of softmax(q kᵀ · scale) v."""
    scale = default_scale(q) if scale is None else scale
    if q.device.type == "cpu":
        out, lse = cpu_attention_with_lse(q, k, v, scale)
        return out, lse.float()
    if q.device.type == "cuda":
        try:
            if q.dtype in (torch.float16, torch.bfloat16):
                res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            else:
                res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                             scale=scale)
            return res[0], res[1][..., : q.shape[-2]].float()
        except RuntimeError:
            pass  # unsupported head size or layout: fall through to the chunked path
    return attention(q, k, v, scale=scale), chunked_lse(q, k, scale)


def cpu_attention_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU kernel: the output and the row log-sum-exp in the kernel's precision (float64 for float64
    inputs, float32 for every other dtype)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def chunked_lse(q, k, scale=None, key_bias=None) -> torch.Tensor:
    """Row log-sum-exp of q kᵀ · scale (+ `key_bias`, an additive (batch, heads or 1, 1, keys) mask), float32
    (float64 for float64 inputs)."""
    scale = default_scale(q) if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = 0.0 if key_bias is None else key_bias.to(dtype)
    parts = [
        torch.logsumexp((q[..., i : i + _LSE_CHUNK, :].to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale + bias,
                        dim=-1)
        for i in range(0, q.shape[-2], _LSE_CHUNK)
    ]
    return torch.cat(parts, dim=-1)


def key_probs(q, k_sel, lse, scale=None, key_bias=None) -> torch.Tensor:
    """Attention probabilities (float32) of queries `q` on the selected keys `k_sel`, given the rows' full lse (and
    the selected keys' additive mask, if any: masked keys get 0)."""
    scale = default_scale(q) if scale is None else scale
    logits = (q.float() @ k_sel.float().transpose(-1, -2)) * scale
    if key_bias is not None:
        logits = logits + key_bias.float()
    return torch.exp(logits - lse.unsqueeze(-1))


def explicit_probs(q, k, scale=None, dtype=torch.float64) -> torch.Tensor:
    """softmax(q kᵀ · scale) materialised in `dtype`: the reference the fast paths are tested against."""
    scale = default_scale(q) if scale is None else scale
    return torch.softmax((q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale, dim=-1)
