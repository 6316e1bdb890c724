"""Regulation's optimisation, fast (eager) against compiled (one torch.compile region), on the CPU: time per call,
the compile time of a new shape, and what runs inside the compiled region (kernels by the profiler: inductor's
generated C++ kernels and the library calls it makes, such as addmm and topk).

    python benchmarks/regulation_compiled.py            # prints a markdown table; one thread, as the controller runs

Sizes are SD 1.5's edited layers at 512² (2 images × 8 heads, 16×16) and at 1024² (32×32), and SDXL's (2 × 20 heads,
32×32 at 1024²); two targets, 77 text tokens, the default 20 iterations.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch._inductor import config as inductor_config
from torch.profiler import profile

from attnctl.methods import regulation_compiled, regulation_math
from attnctl.methods.regulation import RegulationConfig

SIZES = {"SD1.5 512² (16 rows, 16×16)": (16, 16), "SD1.5 1024² (16 rows, 32×32)": (16, 32),
         "SDXL 1024² (40 rows, 32×32)": (40, 32)}


def inputs(rows: int, side: int):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, side * side, 77, generator=g) * 1.5
    logits[..., 0] += 5.0
    basis = regulation_math.gaussian_basis(side, side)[0]
    w0 = torch.rand(rows, basis.shape[1], 2, generator=g)
    targets = torch.tensor([2, 5])
    others = torch.tensor([i for i in range(77) if i not in (2, 5)])
    return logits, targets, others, basis, w0


def fast(logits, targets, others, basis, w0, config):
    return regulation_math.optimise_fast(*regulation_math.split_logits(logits, targets, others), basis, w0, config)


def median_ms(fn, *args, repeats=30) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def region_kernels(*args) -> tuple[int, int]:
    """(inductor's kernels, library calls) the compiled region runs in one call."""
    with profile() as prof:
        regulation_compiled.optimise_compiled(*args)
    fused = sum(1 for e in prof.events() if "cpp_fused" in e.name)
    library = sum(1 for e in prof.events() if e.name in ("aten::addmm", "aten::mm", "aten::topk", "aten::bmm",
                                                         "aten::scatter_reduce_", "aten::scatter_add_"))
    return fused, library


def main() -> None:
    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True  # name the generated kernels in the profiler
    config = RegulationConfig(targets=["a"])
    print("| layer size | fast, ms per call | compiled, ms per call | ratio | first call of the shape, s "
          "| inside the region: fused kernels + library calls |")
    print("|---|---|---|---|---|---|")
    for label, (rows, side) in SIZES.items():
        args = (*inputs(rows, side), config)
        start = time.perf_counter()
        regulation_compiled.optimise_compiled(*args)
        first = time.perf_counter() - start
        t_fast, t_compiled = median_ms(fast, *args), median_ms(regulation_compiled.optimise_compiled, *args)
        fused, library = region_kernels(*args)
        print(f"| {label} | {t_fast:.1f} | {t_compiled:.1f} | {t_fast / t_compiled:.2f}× | {first:.1f} "
              f"| {fused} + {library} |", flush=True)


if __name__ == "__main__":
    main()
