"""Checks that need an NVIDIA GPU (issue 10), skipped without one: `pytest -m cuda` runs exactly these. Each compares
a fast path on CUDA in the model's dtype with the float64 formula and asks for at most twice plain SDPA's own error
in that dtype. The `check_*` functions take the device, so a dry run calls them with "cpu" first."""

import pytest
import torch
import torch.nn.functional as F

from attnctl.attention import attention_with_lse, explicit_probs, key_probs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sdpa_error(q, k, v):
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    return (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max()


def qkv(device, dtype, dim, n=300, heads=4, seed=0):
    """(batch, heads, tokens, dim) made the way diffusers makes them: (batch, tokens, heads, dim) transposed, so not
    contiguous."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, heads, dim, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]


def check_lse_kernel(device, dtype, dim):
    q, k, v = qkv(device, dtype, dim)
    assert not q.is_contiguous()
    out, lse = attention_with_lse(q, k, v)
    probs = explicit_probs(q, k)  # float64
    assert lse.device.type == device and lse.dtype == torch.float32
    text = slice(0, 16)
    got = key_probs(q, k[:, :, text], lse).double()
    assert (got - probs[..., text]).abs().max() <= max(2 * sdpa_error(q, k, v), 1e-6)
    assert (out.double() - probs @ v.double()).abs().max() <= 2 * sdpa_error(q, k, v) + 1e-6


def check_ast_paths(device, dtype):
    from attnctl.methods.ast_attention import direct_attention, fast_attention, flex_attention_ast, row_lse
    from test_ast_attention import make_case, recipe

    q, k, v, scale, tables = make_case(True, seed=7, n_img=256, n_text=32, dim=64, dtype=dtype)
    want, _ = recipe(q, k, v, scale, tables)  # the formula on the same (rounded) inputs, in float64
    q, k, v = (t.to(device) for t in (q, k, v))
    tables = tables.to(device)
    bound = 2 * sdpa_error(q, k, v) + 1e-6
    lse = row_lse(q, k, v, scale)
    for name, out in (("fast", fast_attention(q, k, v, scale, tables)[0]),
                      ("direct", direct_attention(q, k, v, scale, tables)[0]),
                      ("flex", flex_attention_ast(q, k, v, scale, tables, lse)[0])):
        assert out.device.type == device and out.dtype == dtype, name
        assert (out.double().cpu() - want).abs().max() <= bound, name


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
def test_lse_kernels_on_cuda(dtype, dim):
    check_lse_kernel("cuda", dtype, dim)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_ast_paths_on_cuda(dtype):
    check_ast_paths("cuda", dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["sd15-tiny", "flux-tiny"])
def test_capture_maps_on_cuda_equal_the_cpu_maps(name):
    import attnctl

    maps = {}
    for device in ("cpu", "cuda"):
        pipe = attnctl.load_pipeline(f"random:{name}", device=device)
        capture = attnctl.Capture(["dog"])
        with attnctl.apply(pipe, capture, prompt="a red dog"):
            pipe("a red dog", height=64, width=64, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        maps[device] = capture.maps()
    assert maps["cpu"].keys() == maps["cuda"].keys()
    for site, m in maps["cpu"].items():
        assert (maps["cuda"][site] - m).abs().max() < 1e-4, site
