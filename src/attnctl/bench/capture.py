"""`attnctl bench capture`: the cost of capturing token maps at every site and step, against the plain pipeline."""

from __future__ import annotations

from ..methods.capture import Capture
from . import compare, plain

PROMPT = "a photo of a cat and a dog on a sofa"


def capture_words(pipe, prompt, words=("cat", "dog")):
    """A `Capture` of the maps of `words`."""
    return [Capture(list(words))]


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Full: SD 1.5's UNet at 512x512 and a full-width FLUX transformer (2 double + 4 single blocks) at 512x512,
    4 steps, 3 rounds. Quick: 128x128, 2 steps, 1 round, fewer FLUX blocks."""
    size, steps = (128, 2) if quick else (512, 4)
    cases = {
        "unet": ("random:sd15", dict(height=size, width=size, num_inference_steps=steps)),
        "mmdit": ("random:flux?double=1&single=1" if quick else "random:flux?double=2&single=4",
                  dict(height=size, width=size, num_inference_steps=steps, max_sequence_length=128)),
    }
    out = {}
    for family, (model, kwargs) in cases.items():
        res = compare(model, {"plain": plain, "capture": capture_words}, PROMPT, kwargs,
                      repeats=1 if quick else 3, device=device)
        out[family] = {"model": model, **kwargs, "plain": res["plain"], "capture": res["capture"],
                       **{k: res["capture"][k] for k in ("time_ratio", "peak_memory_ratio", "working_memory_ratio")}}
    for key in ("time_ratio", "peak_memory_ratio"):
        out[key] = max(out["unet"][key], out["mmdit"][key])
    return out
