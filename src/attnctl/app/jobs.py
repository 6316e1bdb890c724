"""What the page runs: its inputs as a `run.Request` of typed values, run by `run.generate` as the command line runs
it (so the command the page shows, rendered from the request, reproduces its images exactly), with the loaded
pipelines kept between requests."""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import cli_fields, default_of, default_text, flag_of, number_kind, parsed_value
from ..layout import Layout
from ..methods.registry import METHODS, PLAIN
from ..outputs import write
from ..run import Pipelines, Request, generate

SHARED_FLAGS = ("--targets",)  # shown once on the page, outside the methods' panels


class Cancelled(Exception):
    """The person pressed cancel; raised at the next denoising step."""


def method_fields(method: str) -> list[tuple[str, dataclasses.Field]]:
    """The options of a method as the page shows them: (flag, field), from the method's config."""
    config = METHODS[method].config
    return [(flag_of(config, f.name), f) for f in cli_fields(config) if flag_of(config, f.name) not in SHARED_FLAGS]


UNSET = object()  # a page value that leaves the option to the model's recommendation and the config's default


def option_value(flag: str, f: dataclasses.Field, value):
    """A method option's value from its input on the page: typed as the command line parses it (text through the
    field's parser), or UNSET when blank or the default (so a model's recommendations apply, as on the command
    line)."""
    default = default_of(f)
    if isinstance(default, bool):
        return UNSET if bool(value) == default else bool(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNSET
    if isinstance(value, str):
        text = value.strip()
        return UNSET if text == default_text(f) else parsed_value(flag, f, text)
    if isinstance(value, float) and value.is_integer() and number_kind(f) is int:
        value = int(value)
    return UNSET if value == default else value


@dataclass
class Job:
    """What the page asks for: the request, and the sketch's pixels where its layout has colour regions (written
    beside layout.json for the command line)."""

    request: Request
    sketch: np.ndarray | None = None

    def command(self) -> str:
        """The command line a person runs beside the downloaded layout.json to get the same images."""
        return self.request.command("layout.json", "out/app")


def write_layout(layout: Layout, sketch: np.ndarray | None, folder: Path) -> list[Path]:
    """layout.json (and sketch.png, when it has colour regions) in `folder`, as `attnctl generate --layout` reads
    them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = layout.to_dict()
    paths = [folder / "layout.json"]
    if any(r.color is not None for r in layout.regions):
        data["sketch"] = "sketch.png"
        paths.append(folder / "sketch.png")
        Image.fromarray(sketch).save(paths[-1])
    paths[0].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return paths


@dataclass
class Result:
    """What a job wrote: the command that reproduces it and the files written, by name (see `run`)."""

    command: str
    files: dict[str, Path]  # image, plain, image_layout, plain_layout, maps, layout.json, sketch.png: those written


def run(job: Job, folder: Path, pipelines: Pipelines, on_progress=None,
        cancel: threading.Event | None = None) -> Result:
    """Generate what `job` asks in `folder` (its layout files, then the images and maps under out/).
    `on_progress(fraction, text)` follows the denoising steps of both runs (the method's, then the plain one);
    setting `cancel` stops at the next step."""
    request = job.request
    layout_files = write_layout(request.layout, job.sketch, folder) if request.layout is not None else []
    runs = 1 if request.method == PLAIN else 2

    def on_step(label, step, steps):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if on_progress is not None:
            done = (0 if label == request.method else 1) * steps + step
            on_progress(done / (runs * steps), f"{label}: step {step}/{steps}")

    written = write(generate(request, pipelines, on_step=on_step), folder / "out")
    files = {p.stem: p for p in written if p.suffix == ".png"}
    files.update({p.name: p for p in layout_files})
    return Result(command=job.command(), files=files)


def check_words(request: Request, pipelines: Pipelines) -> None:
    """Where the model is loaded already, the prompt's words as the run will read them: each layout phrase and
    target must be in the prompt's tokens (the same UsageErrors as the run, listing the tokens)."""
    from ..control import prompt_tokens
    from ..methods.targets import target_positions

    sampling = request.sampling
    pipe = pipelines.loaded(request.model_spec, sampling.device, sampling.dtype)
    if pipe is None:
        return
    tokens = prompt_tokens(pipe, request.prompt)[0]  # attaches nothing: a run may hold the pipeline
    if request.layout is not None:
        request.layout.bind(tokens)
    elif request.targets:
        target_positions(tokens, request.targets)
