import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(*args, timeout: float = 120):
    """`attnctl app ARGS` started as users start it: the console script installed beside this Python, in its own
    process, on a free loopback port. Yields the page's URL once it answers; the server is stopped afterwards. A server
    that exits or never answers fails the test with its output."""
    script = Path(sys.executable).with_name("attnctl")
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"attnctl-app-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(script), "app", "--port", str(port), *map(str, args)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"attnctl app exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"attnctl app did not answer on {url} in {timeout:g} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)
