"""What the probes share: each arm's rows kept in a CSV (an arm with a file is not run again), and the pairing of an
arm's rows with the plain arm's on the same (prompt, seed)."""

from __future__ import annotations

import csv
from pathlib import Path


def arm_rows(path: Path, make) -> dict[tuple[str, str], dict]:
    """The arm's rows by (prompt, seed), as read back from `path`; `make()` runs the arm and its rows are written
    there first when the file does not exist."""
    if not path.exists():
        rows = make()
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with path.open() as f:
        return {(r["prompt"], r["seed"]): r for r in csv.DictReader(f)}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path` (the header first where the file is new): a probe's checkpoint per case."""
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)


def fixed_broken(rows: dict, plain: dict, column: str) -> tuple[int, int]:
    """Samples where the arm succeeds on `column` and the plain arm does not (fixed), and the reverse (broken)."""
    fixed = sum(int(r[column]) and not int(plain[k][column]) for k, r in rows.items())
    broken = sum(not int(r[column]) and int(plain[k][column]) for k, r in rows.items())
    return fixed, broken
