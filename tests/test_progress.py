"""ATTNCTL_PROGRESS: progress bars on stderr when on (the default), none at all with ATTNCTL_PROGRESS=0: generate
and maps (loading and denoising), and bench, whose runs have one bar per model."""

import pytest

import attnctl.models

BAR = "%|"  # what every tqdm bar writes
SMALL = ["--model", "random:sd15-tiny", "--steps", "2", "--height", "64", "--width", "64"]


@pytest.mark.parametrize("progress", ["1", "0"])
def test_maps_and_generate_bars_follow_the_switch(tmp_path, cli, monkeypatch, progress):
    monkeypatch.setenv("ATTNCTL_PROGRESS", progress)
    code, out, err = cli("maps", *SMALL, "--prompt", "a cat", "--words", "cat", "--out", tmp_path / "maps")
    assert code == 0, err
    assert (BAR in err) == (progress == "1") and ("2/2" in err) == (progress == "1")
    code, out, err = cli("generate", "--method", "none", *SMALL, "--prompt", "a cat", "--out", tmp_path / "generate")
    assert code == 0, err
    assert (BAR in err) == (progress == "1")


def test_loading_bars_are_off_with_progress_off_and_restored(capfd, monkeypatch):
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setenv("ATTNCTL_PROGRESS", "0")
    before = diffusers_logging.is_progress_bar_enabled()
    capfd.readouterr()
    attnctl.models.load_pipeline("builtin:shapes-unet")
    assert BAR not in capfd.readouterr().err
    assert diffusers_logging.is_progress_bar_enabled() == before


@pytest.fixture
def tiny_bench_models(monkeypatch):
    """`attnctl bench capture`'s models replaced by the tiny ones of the same families (fresh pipelines)."""
    load = attnctl.models.load_pipeline
    loaded = []

    def tiny(spec, **kwargs):
        loaded.append(spec)
        return load("random:sd15-tiny" if spec == "random:sd15" else "random:flux-tiny", **kwargs)

    monkeypatch.setattr(attnctl.models, "load_pipeline", tiny)
    return loaded


@pytest.mark.parametrize("progress", ["1", "0"])
def test_bench_quick_shows_a_bar_per_model_unless_progress_is_off(cli, monkeypatch, tiny_bench_models, progress):
    monkeypatch.setenv("ATTNCTL_PROGRESS", progress)
    code, out, err = cli("bench", "capture", "--quick")
    assert code == 0, err
    assert tiny_bench_models == ["random:sd15", "random:flux?double=1&single=1"]
    assert out.startswith("capture: time ratio ")
    # a warm-up, a memory run per variant, one timed round of both: 5 runs per model
    for model in tiny_bench_models:
        assert (f"bench {model}: 100%" in err and "5/5" in err) == (progress == "1")
    assert (BAR in err) == (progress == "1")
