"""CPU time of capture and AST against the plain pipeline on one family's tiny random pipeline (the one of
tests/test_family_support.py, its two-step test call), side by side in one process: rounds alternate the arms, one
thread, medians.

    python benchmarks/family_time.py "Qwen-Image 2.1" [--rounds 15]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import attnctl  # noqa: E402
from test_family_support import PROMPT, call_of, pipe_of  # noqa: E402

LAYOUT = {"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]},
                                        {"phrase": "grey cat", "box": [0.5, 0, 1, 1]}]}
ARMS = {"plain": lambda: [], "capture": lambda: [attnctl.Capture(["dog", "cat"])], "ast": lambda: [attnctl.AST(LAYOUT)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = pipe_of(args.family)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_of(args.family)
    times = {arm: [] for arm in ARMS}
    for round_ in range(args.rounds + 1):
        for arm, controllers in ARMS.items():
            with attnctl.apply(pipe, *controllers(), prompt=PROMPT) as session:
                start = time.perf_counter()
                session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
                if round_:  # the first round warms up
                    times[arm].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    print(f"{args.family}: plain {plain * 1e3:.0f} ms per two-step call; " + ", ".join(
        f"{arm} {statistics.median(t) / plain:.2f}×" for arm, t in times.items() if arm != "plain"))


if __name__ == "__main__":
    main()
