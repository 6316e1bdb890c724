"""Side-by-side measurements: a method against the plain pipeline, in one process, one model load.

Times: after a warm-up call, every variant runs once for its memory figure, then the variants take turns (`repeats`
rounds, order rotated each round), and each variant's median is compared with the plain pipeline's median of the same
rounds, so machine noise hits all variants alike. Memory: on CUDA, `max_memory_allocated`; on CPU, the bytes in use by
the C allocator (glibc's mallinfo2, which counts torch's CPU tensors), sampled every millisecond by a thread during the
call. Both are reported as the peak of everything held (weights included, `peak_memory_ratio`) and as the peak growth
during the call (`working_memory_ratio`).

The plain pipeline ("plain", a variant that attaches nothing) is called as it is, outside `attnctl.apply`: no step
hook and no processor of attnctl in it. With `keep_going`, a method variant whose run raises is left out of the
remaining runs and its error reported in its result (`{"error": ...}`) instead of raised.

Progress: one bar per `compare` on stderr, a step per pipeline run, naming the model and the variant running (off
with ATTNCTL_PROGRESS=0).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..control import apply

# A variant: (pipe, prompt) -> controllers to attach (empty for the plain pipeline).
Variant = Callable[[object, str], list]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _cpu_bytes_reader():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2

        def in_use():
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd
        return in_use

    def resident():  # not glibc: resident set size, which only approximates freed memory
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    return resident


class PeakMemory:
    """Context manager measuring (held before, peak during) bytes on `device`."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.read = None if self.cuda else _cpu_bytes_reader()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        self.before = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.read())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(model, variants: dict[str, Variant], prompt: str, call_kwargs: dict, repeats: int = 3,
            device: str = "cpu", dtype=torch.float32, seed: int = 0, warmup: bool = True,
            keep_going: bool = False) -> dict:
    """Run each variant of `variants` (one must be named "plain" and attach nothing) side by side.

    `model` is a spec for `load_pipeline` or a pipeline. Returns, per variant, median seconds, peak bytes held and
    peak working bytes, and the ratios to "plain"; with `keep_going`, a method variant that raised has only
    `{"error": "Type: message"}` and is not run again (an error of the plain pipeline is raised).
    """
    from tqdm import tqdm

    from ..models import _show_progress, load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype) if isinstance(model, str) else model
    pipe.set_progress_bar_config(disable=True)  # the runs' own bar below instead of one per run
    names = list(variants)
    bar = tqdm(total=int(warmup) + len(names) * (1 + repeats), unit="run", disable=not _show_progress(),
               desc=f"bench {model if isinstance(model, str) else type(pipe).__name__}")
    failed: dict[str, str] = {}

    def run(name, measure_memory=False):
        bar.set_postfix_str(name + (" (memory)" if measure_memory else ""))
        try:
            return measured(name, measure_memory)
        except Exception as e:
            if not keep_going or name == "plain":
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory variant leaves the others room
            return None
        finally:
            bar.update()

    def measured(name, measure_memory):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        controllers = variants[name](pipe, prompt)
        # the plain pipeline as users call it: nothing of attnctl attached, not even the step hook
        with apply(pipe, *controllers, prompt=prompt) if controllers else nullcontext():
            _sync(device)
            start = time.perf_counter()
            if measure_memory:
                with PeakMemory(device) as mem:
                    pipe(prompt=prompt, generator=generator, **call_kwargs)
                return mem.before, mem.peak
            pipe(prompt=prompt, generator=generator, **call_kwargs)
            _sync(device)
            return time.perf_counter() - start

    times = {n: [] for n in names}
    memory = {}
    with bar:
        if warmup:  # one-time allocations and kernel selection stay out of the measurements
            run(names[0])
        for n in names:  # the sampling thread stays out of the timed runs
            if n not in failed:
                memory[n] = run(n, measure_memory=True)
        for r in range(repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                if n not in failed:
                    times[n].append(run(n))

    results = {n: {"error": failed[n]} for n in names if n in failed}
    for n in names:
        if n in failed:
            continue
        before, peak = memory[n]
        results[n] = {"time_s": statistics.median(times[n]), "times_s": times[n], "peak_bytes": peak,
                      "working_bytes": peak - before}
    plain = results["plain"]
    for n in names:
        if n in failed:
            continue
        results[n]["time_ratio"] = results[n]["time_s"] / plain["time_s"]
        results[n]["peak_memory_ratio"] = results[n]["peak_bytes"] / plain["peak_bytes"]
        results[n]["working_memory_ratio"] = results[n]["working_bytes"] / max(1, plain["working_bytes"])
    return {n: results[n] for n in names}


def plain(pipe, prompt) -> list:
    """The plain pipeline's variant: no controllers."""
    return []
