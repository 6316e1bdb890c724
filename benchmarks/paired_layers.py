"""Paired comparison of Regulation's layer choices on shapes-unet against the plain model, sample by sample (the
same prompts and seeds in every arm): `python benchmarks/paired_layers.py [success|present] [OUT]` after the runs
listed in BENCHMARKS.md ("Regulation's layers on the GPU-trained shapes-unet"); OUT defaults to out/layers."""

import csv
import sys
from pathlib import Path

from attnctl.eval import mcnemar

ARMS = ("none", "coarse", "mid8", "fine16", "all")


def load(folder: Path) -> dict:
    with open(folder / "results.csv") as f:
        return {(r["category"], r["prompt"], r["seed"]): r for r in csv.DictReader(f)}


def main():
    column = sys.argv[1] if len(sys.argv) > 1 else "success"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "out/layers")
    data = {arm: load(out / arm) for arm in ARMS}
    print(f"| arm | category | {column} | plain | fixed | broke | exact McNemar p |")
    print("|---|---|---|---|---|---|---|")
    for category in ("seen_pairs", "three_objects"):
        keys = [k for k in data["none"] if k[0] == category]
        plain = [int(float(data["none"][k][column])) for k in keys]
        for arm in ARMS[1:]:
            got = [int(float(data[arm][k][column])) for k in keys]
            gained = sum(y > b for b, y in zip(plain, got))
            lost = sum(y < b for b, y in zip(plain, got))
            print(f"| {arm} | {category} | {sum(got) / len(got):.3f} | {sum(plain) / len(plain):.3f} | {gained} | "
                  f"{lost} | {mcnemar(gained, lost):.2f} |")


if __name__ == "__main__":
    main()
