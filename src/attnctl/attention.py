"""The only place attention is computed.

Tensors are (batch, heads, tokens, head_dim). Three things are offered:
- `attention`: plain scaled-dot-product attention (the model's own fast kernel);
- `attention_with_lse`: the same output plus each query row's log-sum-exp of the scaled logits, from one fused pass
  of the backend plain SDPA picks for those inputs (on CUDA: cuDNN, flash or memory-efficient), so that the
  probabilities of any few keys follow as exp(q·kᵀ·scale − lse) without the N×N matrix (`key_probs`);
- `rows_lse`: the log-sum-exp alone, of just the query rows given, with or without a key mask;
- `explicit_probs`: the direct softmax, for tests and for small matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# Rows of the explicit fallback processed at once: bounds its memory to chunk × keys per (batch, head).
_LSE_CHUNK = 1024
# torch.bmm(..., out_dtype=torch.float32) (CUDA, half inputs): products accumulated and written in float32
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


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
            return _cuda_attention_with_lse(q, k, v, scale)
        except RuntimeError:
            pass  # unsupported head size or layout: fall through to the chunked path
    return attention(q, k, v, scale=scale), chunked_lse(q, k, scale)


def sdpa_backend(q, k, v, mask=None, scale=None) -> int:
    """The `SDPBackend` (as an int) that `F.scaled_dot_product_attention` picks for these inputs, under the backends
    enabled where it is called (`torch.nn.attention.sdpa_kernel`)."""
    return int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale))


def _cuda_attention_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel plain SDPA would run (cuDNN on Hopper for half inputs), asked for its log-sum-exp too, so
    that reading the LSE costs no second attention and no slower kernel; flash (half) or memory-efficient (float32)
    where SDPA would pick another one."""
    backend = sdpa_backend(q, k, v, scale=scale)
    if backend == int(SDPBackend.CUDNN_ATTENTION):
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                     scale=scale)
            lse = res[1]
            return res[0], (lse.squeeze(-1) if lse.dim() == 4 else lse).float()  # cuDNN's is (batch, heads, q, 1)
        except RuntimeError:
            pass  # a layout cuDNN refuses when called directly: the kernels below
    if q.dtype in (torch.float16, torch.bfloat16) and backend != int(SDPBackend.EFFICIENT_ATTENTION):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1].float()
        except RuntimeError:
            pass  # flash refuses this head size: memory-efficient below
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1][..., : q.shape[-2]].float()  # its LSE is padded to a multiple of 32 queries


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


def rows_lse(q, k, v, scale=None, key_bias=None) -> torch.Tensor:
    """Row log-sum-exp (float32, batch, heads, queries) of q kᵀ · scale (+ `key_bias`, an additive (batch or 1, heads
    or 1, 1, keys) key mask) for just the query rows in `q`: pass the rows a caller keeps (a batch's conditional
    rows, the image queries). Without a mask, and with one on the CPU, from one fused kernel pass (`v` is its
    value input; its output is dropped); with a mask on CUDA, `chunked_lse`."""
    scale = default_scale(q) if scale is None else scale
    if key_bias is None:
        return attention_with_lse(q, k, v, scale=scale)[1]
    if q.device.type == "cpu" and q.dtype != torch.float64:
        mask = key_bias.to(torch.float32)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)[1].float()
    return chunked_lse(q, k, scale, key_bias).float()


def key_logits(q, k_sel, scale=None) -> torch.Tensor:
    """q k_selᵀ · scale in float32 (float64 for float64 inputs), (…, queries, selected keys). On CUDA, half inputs are
    multiplied as they are, the products summed and written in float32 (`torch.bmm`'s out_dtype): no float32 copy of
    `q`; elsewhere the inputs are cast first."""
    scale = default_scale(q) if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if _BMM_OUT_DTYPE and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) \
            and k_sel.dtype == q.dtype:
        batch, (n, d), t = q.shape[:-2], q.shape[-2:], k_sel.shape[-2]
        k3 = k_sel.expand(*batch, t, d).reshape(-1, t, d)
        try:
            logits = torch.bmm(q.reshape(-1, n, d), k3.transpose(1, 2), out_dtype=torch.float32)
            return logits.view(*batch, n, t).mul_(scale)
        except (RuntimeError, TypeError):
            pass  # a torch without the float32 output for this layout: the cast below
    return (q.to(dtype) @ k_sel.to(dtype).transpose(-1, -2)) * scale


def key_probs(q, k_sel, lse, scale=None, key_bias=None) -> torch.Tensor:
    """Attention probabilities (float32) of queries `q` on the selected keys `k_sel`, given the rows' full lse (and
    the selected keys' additive mask, if any: masked keys get 0)."""
    logits = key_logits(q, k_sel, scale).float()  # a new tensor: updated in place below
    if key_bias is not None:
        logits.add_(key_bias.float())
    return logits.sub_(lse.unsqueeze(-1)).exp_()


def explicit_probs(q, k, scale=None, dtype=torch.float64, bias=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) materialised in `dtype`: the reference the fast paths are tested against (`bias`:
    an additive key mask, −inf where a key is masked)."""
    scale = default_scale(q) if scale is None else scale
    logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    return torch.softmax(logits if bias is None else logits + bias.to(dtype), dim=-1)
