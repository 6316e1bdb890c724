"""`attnctl bench ast`: AST's exact fast path and direct path against the plain pipeline, side by side in one run, on
FLUX.1's full-width transformer (random weights, reduced depth), plus the attention call alone at FLUX sizes.

Pipeline (via `attnctl.bench.compare`): plain, AST fast path, AST direct path (and the approximate mode for
reference); all steps tuned (tuned_steps = 16 > steps), the layout of `examples/two_animals.json`.
- quick: `random:flux?double=1&single=2`, 256², 1 step, 128 text tokens, 1 timed round (under a minute).
- full:  `random:flux?double=2&single=4`, 512², 2 steps, 256 text tokens, 2 timed rounds.
Attention alone: one joint attention call of FLUX's shape (24 heads × 128, batch 1) with image + text tokens of a
512² (quick) or 1024² (full) image: plain SDPA, the fast path and the direct path; median time and peak working
memory (bytes allocated during the call beyond what was held before).
Also reported: torch's thread count and the machine's load average at the start (timings on a shared machine).
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial

import torch

from ..methods.ast import AST
from . import PeakMemory, compare, plain

LAYOUT = {
    "prompt": "a red dog and a grey cat sitting on the green grass",
    "background": "the green grass",
    "regions": [{"phrase": "a red dog", "box": [0.05, 0.30, 0.48, 0.95]},
                {"phrase": "a grey cat", "box": [0.52, 0.35, 0.95, 0.95]}],
}


def ast_variant(pipe, prompt, **options):
    """AST on `LAYOUT` with `options` (the fast or direct path, or the approximate mode)."""
    return [AST(LAYOUT, **options)]


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Side-by-side pipeline timings and the attention call alone. ATTNCTL_THREADS=n sets torch's CPU threads for the
    whole run (plain and AST alike), e.g. on an oversubscribed machine."""
    if os.environ.get("ATTNCTL_THREADS"):
        torch.set_num_threads(int(os.environ["ATTNCTL_THREADS"]))
    if quick:
        model, size, steps, text, repeats = "random:flux?double=1&single=2", 256, 1, 128, 1
    else:
        model, size, steps, text, repeats = "random:flux?double=2&single=4", 512, 2, 256, 2
    kwargs = dict(height=size, width=size, num_inference_steps=steps, max_sequence_length=text, guidance_scale=3.5,
                  output_type="latent")
    variants = {"plain": plain, "fast": partial(ast_variant, implementation="fast"),
                "direct": partial(ast_variant, implementation="direct")}
    if not quick:
        variants["approximate"] = partial(ast_variant, approximate=True)
    started = time.perf_counter()
    res = compare(model, variants, LAYOUT["prompt"], kwargs, repeats=repeats, device=device)
    out = {
        "model": model, "height": size, "width": size, "steps": steps, "max_sequence_length": text,
        "repeats": repeats, "device": device, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time_ratio": res["fast"]["time_ratio"], "peak_memory_ratio": res["fast"]["peak_memory_ratio"],
        "working_memory_ratio": res["fast"]["working_memory_ratio"],
        "direct_time_ratio": res["direct"]["time_ratio"],
        "direct_peak_memory_ratio": res["direct"]["peak_memory_ratio"],
        "direct_working_memory_ratio": res["direct"]["working_memory_ratio"],
        "plain_time_s": res["plain"]["time_s"], "fast_time_s": res["fast"]["time_s"],
        "direct_time_s": res["direct"]["time_s"], "pipeline": res,
    }
    if "approximate" in res:
        out["approximate_time_ratio"] = res["approximate"]["time_ratio"]
    out["attention_call"] = attention_call(image_tokens=(1024 if quick else 4096), text_tokens=(256 if quick else 512),
                                           repeats=1 if quick else 2, device=device)
    out["wall_s"] = time.perf_counter() - started
    return out


def attention_call(image_tokens: int, text_tokens: int, heads: int = 24, dim: int = 128, repeats: int = 2,
                   device: str = "cpu") -> dict:
    """One FLUX-shaped joint attention call ([text; image], batch 1): plain SDPA vs AST's fast and direct paths."""
    import torch.nn.functional as F

    from ..layout import Layout
    from ..methods.ast_attention import TuningTables, direct_attention, fast_attention

    side = int(image_tokens ** 0.5)
    n = text_tokens + image_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device) for _ in range(3))
    labels = Layout.from_dict(LAYOUT).labels((side, side)).flatten()[None].to(device)
    t2t = -(torch.arange(text_tokens, device=device) + 2)[None]
    t2t[:, 0:3], t2t[:, 4:7] = 1, 2
    i2t = torch.full((1, text_tokens), -1, device=device)
    i2t[:, 0:3], i2t[:, 4:7] = 1, 2
    alpha = torch.full((1, image_tokens), 2.0, device=device)
    tables = TuningTables(slice(0, text_tokens), slice(text_tokens, n), labels, i2t, t2t, alpha, alpha * 1.4,
                          torch.full((1, text_tokens), 3.0, device=device))
    scale = dim ** -0.5
    calls = {
        "plain": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "fast": lambda: fast_attention(q, k, v, scale, tables),
        "direct": lambda: direct_attention(q, k, v, scale, tables),
    }
    result = {"image_tokens": image_tokens, "text_tokens": text_tokens, "heads": heads, "head_dim": dim}
    for name, fn in calls.items():
        fn()
        with PeakMemory(device) as mem:
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[name] = {"time_s": statistics.median(times), "working_bytes": mem.peak - mem.before}
    for name in ("fast", "direct"):
        result[f"{name}_time_ratio"] = result[name]["time_s"] / result["plain"]["time_s"]
        plain_bytes = max(1, result["plain"]["working_bytes"])
        result[f"{name}_working_memory_ratio"] = result[name]["working_bytes"] / plain_bytes
    return result
