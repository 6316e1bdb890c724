"""What the page runs: its inputs as an `attnctl generate` command line, run by the command's own code (so the
command the page shows reproduces its images exactly), with the loaded pipelines kept between requests."""

from __future__ import annotations

import dataclasses
import json
import shlex
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import cli_fields, default_of, default_text, flag_of
from ..layout import Layout
from ..methods.registry import METHODS, PLAIN, builtin_model, layout_methods

SHARED_FLAGS = ("--targets",)  # shown once on the page, outside the methods' panels


class Cancelled(Exception):
    """The person pressed cancel; raised at the next denoising step."""


def method_fields(method: str) -> list[tuple[str, dataclasses.Field]]:
    """The options of a method as the page shows them: (flag, field), from the method's config."""
    config = METHODS[method].config
    return [(flag_of(config, f.name), f) for f in cli_fields(config) if flag_of(config, f.name) not in SHARED_FLAGS]


def option_arguments(flag: str, f: dataclasses.Field, value) -> list[str]:
    """The command-line words for a method option set to `value` on the page; none when it is the default (so a
    model's recommendations apply, as on the command line)."""
    default = default_of(f)
    if isinstance(default, bool):
        return [] if bool(value) == default else [flag if value else "--no-" + flag[2:]]
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, float) and value.is_integer() and (isinstance(default, int) or f.metadata.get("parse") is int):
        value = int(value)
    text = value.strip() if isinstance(value, str) else str(value)
    if text == default_text(f) or (not isinstance(value, str) and value == default):
        return []
    return [flag, text]


@dataclass
class Request:
    """What the page asks for (blank numbers: the model's own defaults)."""

    method: str
    prompt: str = ""
    layout: Layout | None = None  # the layout methods'
    sketch: np.ndarray | None = None  # the layout's sketch pixels, when it has colour regions
    targets: str = ""
    model: str = ""
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    options: list[str] = field(default_factory=list)  # the methods' flags set on the page
    device: str = "cpu"
    dtype: str = "float32"

    def arguments(self, layout_file: str, out: str) -> list[str]:
        """`attnctl generate` words for this request, with the layout file and output folder given."""
        # typed values as --flag=value: a prompt starting with "-" stays the prompt, not an option
        words = ["generate", "--method", self.method]
        if self.model.strip():
            words += [f"--model={self.model.strip()}"]
        if self.method in layout_methods():
            words += ["--layout", layout_file]
        else:
            words += [f"--prompt={self.prompt}"]
            if self.targets.strip():
                words += [f"--targets={self.targets.strip()}"]
        for flag, value in (("--seed", self.seed), ("--steps", self.steps), ("--guidance", self.guidance),
                            ("--height", self.height), ("--width", self.width)):
            if value is not None and (flag != "--seed" or value != 0):
                words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        words += self.options
        if self.device != "cpu":
            words += ["--device", self.device]
        if self.dtype != "float32":
            words += ["--dtype", self.dtype]
        return words + ["--maps", "--out", out]

    def command(self) -> str:
        """The command line a person runs to get the same images, beside the downloaded layout.json."""
        return "attnctl " + shlex.join(self.arguments("layout.json", "out/app"))


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


class Pipelines:
    """Loaded pipelines by model, device and dtype: each is loaded once and reused; the `keep` used last stay."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._loaded: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, args, default_model: str):
        from ..cli.common import check_sampling, load, resolve_model

        key = (resolve_model(args, default_model), args.device, args.dtype)
        with self._lock:
            if key in self._loaded:
                check_sampling(args)
                self._loaded.move_to_end(key)
                return self._loaded[key]
            pipe = load(args, default_model)
            self._loaded[key] = pipe
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return pipe

    def loaded(self, model: str, device: str = "cpu", dtype: str = "float32"):
        """The pipeline of `model` if it is loaded, else None."""
        return self._loaded.get((model, device, dtype))


@dataclass
class Result:
    command: str
    files: dict[str, Path]  # image, plain, image_layout, plain_layout, maps, layout.json, sketch.png: those written


def run(request: Request, folder: Path, pipelines: Pipelines, on_progress=None,
        cancel: threading.Event | None = None) -> Result:
    """Generate what `request` asks in `folder` with the command's own code. `on_progress(fraction, text)` follows
    the denoising steps of both runs (the method's, then the plain one); setting `cancel` stops at the next step."""
    from ..cli import build_parser
    from ..cli import generate as generate_command

    layout_files = write_layout(request.layout, request.sketch, folder) if request.layout is not None else []
    words = request.arguments(str(folder / "layout.json"), str(folder / "out"))
    args = build_parser(raise_errors=True).parse_args(words)
    args.command_line = "attnctl " + shlex.join(words)
    runs = 1 if request.method == PLAIN else 2

    def on_step(label, step, steps):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if on_progress is not None:
            done = (0 if label == request.method else 1) * steps + step
            on_progress(done / (runs * steps), f"{label}: step {step}/{steps}")

    written = generate_command.run(args, load_pipeline=pipelines, on_step=on_step)
    files = {p.stem: p for p in written if p.suffix == ".png"}
    files.update({p.name: p for p in layout_files})
    return Result(command=request.command(), files=files)


def check_words(request: Request, pipelines: Pipelines) -> None:
    """Where the model is loaded already, the prompt's words as the run will read them: each layout phrase and
    target must be in the prompt's tokens (the same UsageErrors as the run, listing the tokens)."""
    from ..config import comma_list
    from ..control import prompt_tokens
    from ..methods.targets import target_positions
    pipe = pipelines.loaded(request.model.strip() or builtin_model(request.method), request.device, request.dtype)
    prompt = request.layout.prompt if request.layout is not None else request.prompt
    if pipe is None or not prompt.strip():
        return
    tokens = prompt_tokens(pipe, prompt)[0]  # attaches nothing: a run may hold the pipeline
    if request.layout is not None:
        request.layout.bind(tokens)
    elif request.targets.strip():
        target_positions(tokens, comma_list(request.targets))
