"""`attnctl bench gpu`: issue 10's table in one command; its dry run on the tiny models runs here."""

import json

import torch

from attnctl.bench.gpu import rows, table


def test_quick_dry_run_gives_every_row_with_each_methods_ratios(cli):
    code, out, err = cli("bench", "gpu", "--quick", "--json")
    assert code == 0, err
    results = json.loads(out[out.index("{"):])
    labels = [row[0] for row in rows(quick=True)]
    assert list(results["rows"]) == labels and len(labels) == 9
    for (label, _, _, _, variants, _), row in zip(rows(quick=True), results["rows"].values()):
        methods = [name for name in variants if name != "plain"]
        assert [k.removesuffix("_time_ratio") for k in row if k.endswith("_time_ratio")] == methods, label
        assert all(row[f"{m}_time_ratio"] > 0 and row[f"{m}_peak_memory_ratio"] > 0 for m in methods)
        assert row["dtype"] == "float32" and f"attnctl: {label}: done in" in out
    assert all(f"| {label} |" in table(results) for label in labels)


def test_full_size_rows_need_cuda(cli):
    code, _, err = cli("bench", "gpu")
    assert code == 2 and "run it with --device cuda, or add --quick" in err
    if not torch.cuda.is_available():
        code, _, err = cli("bench", "gpu", "--device", "cuda")
        assert code == 2 and "no CUDA device" in err
