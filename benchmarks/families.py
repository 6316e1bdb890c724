"""Per family of the README's support matrix (the tiny random pipelines of tests/test_family_support.py, two steps,
latents out): the largest error of the captured maps against an explicit float64 softmax of the same q, k and key
mask, and how far capture, Regulation and AST move the latents from the plain run's.
`python benchmarks/families.py` (figures in BENCHMARKS.md)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import attnctl  # noqa: E402
from attnctl import AST, Capture, Regulation, UsageError  # noqa: E402
from test_family_support import NO, PROMPT, SUPPORT, generate  # noqa: E402

LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
METHODS = (lambda: Capture(["dog"]), lambda: Regulation(["dog", "cat"], edit_steps=2, iterations=2),
           lambda: AST(LAYOUT))


class MapError(attnctl.Controller):
    """An observer: the largest |p - p64| over its calls, p the image→text probabilities in use, p64 the float64
    softmax of q·kᵀ·scale plus the key mask, at the image rows and text columns."""

    observer = True
    handles_key_mask = True
    worst = 0.0

    def __call__(self, call):
        logits = (call.q.double() @ call.k.double().transpose(-1, -2)) * call.scale
        if call.key_bias is not None:
            logits = logits + call.key_bias.double()
        exact = torch.softmax(logits, dim=-1)[:, :, call.image, call.text]
        self.worst = max(self.worst, float((call.text_probs().double() - exact).abs().max()))


def change(pipe, name, make, plain) -> str:
    try:
        return f"{float((generate(pipe, name, [make()]) - plain).abs().max()):.3g}"
    except UsageError:
        return "refused"


def main():
    print("| family | maps: max abs error vs float64 | latent change: capture | Regulation | AST |")
    print("|---|---|---|---|---|")
    for name, build, capture, *_ in SUPPORT:
        pipe = build()
        if capture == NO:
            print(f"| {name} | refused | refused | refused | refused |", flush=True)
            continue
        plain = generate(pipe, name, [])
        probe = MapError()
        generate(pipe, name, [probe])
        cells = [f"{probe.worst:.1e}"] + [change(pipe, name, make, plain) for make in METHODS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
