"""`attnctl bench regulation`: Attention Regulation against the plain pipeline, and the direct implementation of its
formulas as the peer, side by side in one process.

Full: SD 1.5's UNet (`random:sd15`, full size, random weights) at 512x512 with the paper's edit settings: 50 steps,
the first 25 edited, layers down_blocks.2 and up_blocks.1 (which then run at 16x16: σ = 1, 49 centres), 20
iterations, guidance 7.5, DPM-Solver multistep. Quick: the same model and size, 4 steps of which 2 edited.
Reported: time and peak-memory ratios to the plain pipeline for the fast implementation (`time_ratio`,
`peak_memory_ratio`) and the direct one (`direct_time_ratio`, `direct_peak_memory_ratio`), the raw times, and the
seconds spent inside the controller per run and their share of the plain run's time (its own cost, free of the
UNet's run-to-run noise on a busy machine).
"""

from __future__ import annotations

import time

from ..methods.regulation import Regulation
from . import compare, plain

MODEL = "random:sd15"
PROMPT = "a photo of a cat and a dog on a sofa"
TARGETS = ("cat", "dog")


class _Timed(Regulation):
    """Regulation that adds the wall time of its own calls to a shared list (one entry per pipeline run)."""

    def __init__(self, log: list, **kwargs):
        super().__init__(**kwargs)
        self._log = log
        log.append(0.0)

    def __call__(self, call):
        start = time.perf_counter()
        try:
            super().__call__(call)
        finally:
            self._log[-1] += time.perf_counter() - start


def run(quick: bool = False, device: str = "cpu", steps: int | None = None, edit_steps: int | None = None,
        size: int = 512, repeats: int | None = None) -> dict:
    """Measure; `steps`/`edit_steps`/`size`/`repeats` override the full or quick settings (for slow machines)."""
    steps = steps or (4 if quick else 50)
    edit_steps = edit_steps if edit_steps is not None else (2 if quick else 25)
    repeats = repeats or (1 if quick else 3)
    kwargs = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    seconds = {"regulation": [], "direct": []}

    def variant(implementation):
        def make(pipe, prompt):
            return [_Timed(seconds[implementation], targets=list(TARGETS), edit_steps=edit_steps,
                           implementation="fast" if implementation == "regulation" else "direct")]
        return make

    variants = {"plain": plain, "regulation": variant("regulation"), "direct": variant("direct")}
    res = compare(MODEL, variants, PROMPT, kwargs, repeats=repeats, device=device)
    out = {
        "model": MODEL, "prompt": PROMPT, "targets": list(TARGETS), "device": device, **kwargs,
        "edit_steps": edit_steps, "layers": ["down_blocks.2", "up_blocks.1"], "repeats": repeats,
        "time_ratio": res["regulation"]["time_ratio"],
        "peak_memory_ratio": res["regulation"]["peak_memory_ratio"],
        "working_memory_ratio": res["regulation"]["working_memory_ratio"],
        "direct_time_ratio": res["direct"]["time_ratio"],
        "direct_peak_memory_ratio": res["direct"]["peak_memory_ratio"],
        "direct_working_memory_ratio": res["direct"]["working_memory_ratio"],
        "plain_time_s": res["plain"]["time_s"],
        "regulation_time_s": res["regulation"]["time_s"],
        "direct_time_s": res["direct"]["time_s"],
        # seconds inside the controller per pipeline run (median over runs), all edited calls together
        "regulation_controller_s": _median(seconds["regulation"]),
        "direct_controller_s": _median(seconds["direct"]),
        "raw": res,
    }
    # The controller's own seconds over the plain run's: an upper bound on its share of the time ratio (the calls it
    # edits would have cost their plain attention anyway), free of the UNet's run-to-run noise on a busy machine.
    for name in ("regulation", "direct"):
        s = out[f"{name}_controller_s"]
        out[f"{name}_controller_share"] = None if s is None else s / out["plain_time_s"]
    return out


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v > 0)
    return values[len(values) // 2] if values else None
