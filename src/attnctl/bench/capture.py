"""`attnctl bench capture`: the cost of capturing token maps at every site and step, against the plain pipeline."""

from __future__ import annotations

from functools import partial

from . import compare, plain
from ..methods.capture import Capture

PROMPT = "a photo of a cat and a dog on a sofa"


def capture_words(pipe, prompt, words=("cat", "dog")):
    return [Capture(list(words))]


def run(quick: bool = False, device: str = "cpu") -> dict:
    size = 256 if quick else 512
    cases = {
        "unet": ("random:sd15", dict(height=size, width=size, num_inference_steps=2 if quick else 4)),
        "mmdit": ("random:flux?double=1&single=2" if quick else "random:flux?double=2&single=4",
                  dict(height=size // 2 if quick else size // 2, width=size // 2 if quick else size // 2,
                       num_inference_steps=2 if quick else 4, max_sequence_length=128)),
    }
    out = {}
    for family, (model, kwargs) in cases.items():
        res = compare(model, {"plain": plain, "capture": partial(capture_words)}, PROMPT, kwargs,
                      repeats=1 if quick else 3, device=device)
        out[family] = {"model": model, **{k: v for k, v in kwargs.items()}, "plain": res["plain"],
                       "capture": res["capture"], "time_ratio": res["capture"]["time_ratio"],
                       "peak_memory_ratio": res["capture"]["peak_memory_ratio"],
                       "working_memory_ratio": res["capture"]["working_memory_ratio"]}
    out["time_ratio"] = max(out["unet"]["time_ratio"], out["mmdit"]["time_ratio"])
    out["peak_memory_ratio"] = max(out["unet"]["peak_memory_ratio"], out["mmdit"]["peak_memory_ratio"])
    return out
