"""Frames compiled and plain time of an in-place compiled tiny UNet (eager backend, CPU) before and after a
Regulation run with attnctl attached: `python benchmarks/compile_after_detach.py` (figures in BENCHMARKS.md)."""

import time

import torch

import attnctl
from attnctl import Regulation

PROMPT = "a red dog and a grey cat"
KWARGS = dict(height=256, width=256, num_inference_steps=4, output_type="latent")
frames = [0]


def backend(graph, example_inputs):  # eager, counting the frames dynamo compiles
    frames[0] += 1
    return graph.forward


def plain(pipe):
    start = time.perf_counter()
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **KWARGS).images
    return out, time.perf_counter() - start


def main():
    pipe = attnctl.load_pipeline("random:sd15-tiny")
    eager, _ = plain(pipe)
    pipe.unet.compile(backend=backend)
    plain(pipe)
    compiled_plain = frames[0]
    before = min(plain(pipe)[1] for _ in range(3))
    with attnctl.apply(pipe, Regulation(["dog", "cat"], edit_steps=4, iterations=2), prompt=PROMPT):
        plain(pipe)
    controlled = frames[0] - compiled_plain
    out, _ = plain(pipe)
    recompiled = frames[0] - compiled_plain - controlled
    after = min(plain(pipe)[1] for _ in range(3))
    print(f"frames: plain {compiled_plain}, Regulation run {controlled}, first plain call after detach {recompiled}, "
          f"later plain calls {frames[0] - compiled_plain - controlled - recompiled}")
    print(f"plain after detach bit-identical to eager: {torch.equal(out, eager)}; plain time after/before detach "
          f"{after / before:.2f} (best of 3 each, {before:.3f} s / {after:.3f} s)")


if __name__ == "__main__":
    main()
