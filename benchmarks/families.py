"""Per family of the README's support matrix (the tiny random pipelines of tests/test_family_support.py, two steps,
latents out): how far capture, Regulation and AST move the latents from the plain run's.
`python benchmarks/families.py` (figures in BENCHMARKS.md)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from attnctl import AST, Capture, Regulation, UsageError  # noqa: E402
from test_family_support import NO, PROMPT, SUPPORT, generate  # noqa: E402

LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]}
METHODS = (lambda: Capture(["dog"]), lambda: Regulation(["dog", "cat"], edit_steps=2, iterations=2),
           lambda: AST(LAYOUT))


def cell(pipe, name, make, plain) -> str:
    try:
        return f"{float((generate(pipe, name, [make()]) - plain).abs().max()):.3g}"
    except UsageError:
        return "refused"


def main():
    print("| family | capture | Regulation | AST | seconds |")
    print("|---|---|---|---|---|")
    for name, build, capture, *_ in SUPPORT:
        start = time.perf_counter()
        pipe = build()
        if capture == NO:
            cells = [cell(pipe, name, make, None) for make in METHODS]
        else:
            plain = generate(pipe, name, [])
            cells = [cell(pipe, name, make, plain) for make in METHODS]
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
