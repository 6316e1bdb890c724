import os
import warnings

import pytest
import torch

os.environ.setdefault("ATTNCTL_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = {"unet": "random:sd15-tiny", "sdxl": "random:sdxl-tiny", "sd3": "random:sd3-tiny", "flux": "random:flux-tiny"}
_cache = {}


def tiny_pipe(name: str):
    """A random-weight tiny pipeline, built once per test session (tests must leave it as they found it)."""
    import attnctl

    if name not in _cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cache[name] = attnctl.load_pipeline(TINY[name])
    return _cache[name]


def denoiser_of(name, pipe):
    return pipe.unet if name in ("unet", "sdxl") else pipe.transformer


def call_kwargs(name: str, steps: int = 3, **extra):
    kwargs = dict(height=64, width=64, num_inference_steps=steps, output_type="np")
    if name == "flux":
        kwargs["max_sequence_length"] = 32
    kwargs.update(extra)
    return kwargs


def run(pipe, prompt, seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(params=list(TINY))
def family(request):
    return request.param


@pytest.fixture
def cli(capsys):
    """`attnctl ARGS` run in-process: cli("maps", "--prompt", ...) -> (exit status, stdout, stderr)."""
    from attnctl.cli import main

    def run_cli(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli
