"""The web page (Gradio): a layout painted, uploaded or typed; a method with its options generated from its config;
the plain and controlled images side by side with the layout over them, and the words' attention maps. Every check
and every image comes from the package's own code (`app.sketch`, `app.jobs`, the `generate` command)."""

from __future__ import annotations

import html
import inspect
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr

from ..errors import UsageError
from ..methods.registry import METHODS, PLAIN, choices, default_targets, layout_methods, listing, target_methods
from ..run import Pipelines
from . import jobs, sketch

log = logging.getLogger(__name__)

KEPT_RESULTS = 8  # request folders kept (Gradio serves copies of what it shows)
CANVAS = (512, 512)


def _swatch(colour: str, share: float) -> str:
    return (f"<div class='swatch'><span style='background:{colour}'></span>{colour} · {share:.0%} of the sketch"
            "</div>")


def _message(text: str, kind: str = "error") -> str:
    return f"<div class='msg {kind}'>{html.escape(text)}</div>" if text else ""


class Page:
    """One app: its pipelines (loaded once, reused), the requests' folders, and the cancel switch per browser
    session."""

    def __init__(self, model: str | None = None, method: str = "relocation", device: str = "cpu",
                 dtype: str = "float32", models: tuple[str, ...] | None = None):
        """`models`: the only models the page may load, offered as a choice (no path typed on the page is opened);
        None: the model field takes any spec (a page on this machine only)."""
        if method not in choices():
            raise UsageError(f"method {method!r} is not one of {', '.join(choices())}")
        if models is not None and model and model not in models:
            raise UsageError(f"--model {model} is not among --models {','.join(models)}")
        self.model, self.method, self.device, self.dtype = model or "", method, device, dtype
        self.models = tuple(models) if models is not None else None
        self.pipelines = Pipelines()
        self.root = Path(tempfile.mkdtemp(prefix="attnctl-app-"))
        self._count = 0
        self._cancels: dict[str, threading.Event] = {}
        self._in_flight: set[Path] = set()
        self._lock = threading.Lock()

    # --- from the page's values to a request ------------------------------------------------------------
    def request(self, v: dict, flat=None) -> jobs.Job:
        """The job the page's values `v` describe; a UsageError (the command line's message, from the same
        declarations) for what is wrong. `flat`: the canvas already flattened, if it was."""
        from ..config import build, comma_list
        from ..run import Request
        from ..sampling import SamplingConfig

        method = v["method"]
        if method not in choices():
            raise UsageError(f"choose a method: {', '.join(choices())}")
        options = {}
        for flag, f in jobs.method_fields(method) if method != PLAIN else ():
            value = jobs.option_value(flag, f, v[f"{method} {flag}"])
            if value is not jobs.UNSET:
                options[f.name] = value
        numbers = {name: _whole(name, v[name] or 0) or None for name in ("steps", "height", "width")}  # 0: default
        sampling = build(SamplingConfig, None, seed=_whole("seed", v["seed"] or 0), guidance=_guidance(v["guidance"]),
                         device=self.device, dtype=self.dtype, **numbers)
        layout = pixels = None
        if method in layout_methods():
            pixels = flat if flat is not None else sketch.flat_sketch(_composite(v["sketch"]))
            layout = sketch.page_layout(v["prompt"], v["background"], pixels, v["phrases"], v["boxes"])
        elif not (v["prompt"] or "").strip():
            raise UsageError("type a prompt")
        targets = comma_list(v["targets"] or "") or None
        request = Request(method=method, prompt=v["prompt"] or "", layout=layout, targets=targets, options=options,
                          model=(v["model"] or "").strip() or None, sampling=sampling, maps=True)
        if self.models is not None and request.model_spec not in self.models:
            shown = "the method's built-in model " + request.model_spec if not request.model else request.model_spec
            raise UsageError(f"this page serves only {', '.join(self.models)}; {shown} is not among them: choose "
                             "one of those")
        return jobs.Job(request, pixels)

    # --- the page's events -------------------------------------------------------------------------------
    def check(self, v: dict) -> list:
        """The message and command for the page as it stands (as the person types), then a (swatch, phrase box)
        update per colour slot: one box per colour found on the canvas, shown with its colour, the others hidden."""
        try:
            flat = sketch.flat_sketch(_composite(v["sketch"]))
            found = sketch.sketch_colours(flat)
        except UsageError:
            flat, found = None, []
        slots = []
        for i in range(sketch.MAX_COLOURS):
            shown = i < len(found)
            slots += [gr.update(visible=shown, value=_swatch(*found[i]) if shown else ""), gr.update(visible=shown)]
        try:
            job = self.request(v, flat)
            jobs.check_words(job.request, self.pipelines)
        except UsageError as err:
            return [_message(str(err)), "", *slots]
        note = ""
        if job.request.method not in layout_methods() and (found or (v["boxes"] or "").strip()):
            note = _message(f"the layout is used by {listing(layout_methods())}; this method reads the prompt and "
                            "its target words", "note")
        return [note or _message("ready", "ok"), job.command(), *slots]

    def download(self, v: dict):
        """layout.json (and sketch.png) for `attnctl generate --layout`, and the command that reproduces the page."""
        try:
            job = self.request(v)
        except UsageError as err:
            return None, _message(str(err)), ""
        if job.request.layout is None:
            return None, _message(f"only {listing(layout_methods())} take a layout; this method's command is below",
                                  "note"), job.command()
        paths = jobs.write_layout(job.request.layout, job.sketch, self._folder())
        return [str(p) for p in paths], _message("layout written: save both files in one folder and run the "
                                                 "command there", "ok"), job.command()

    def generate(self, v: dict, progress, session: str):
        """(plain, controlled, maps, message, command, files) for the page's request."""
        empty = (None, None, None)
        try:
            job = self.request(v)
        except UsageError as err:
            return (*empty, _message(str(err)), "", None)
        cancel = self._cancels.setdefault(session, threading.Event())
        cancel.clear()
        progress(0, desc="loading the model")
        folder = self._folder(in_flight=True)
        try:
            result = jobs.run(job, folder, self.pipelines, cancel=cancel,
                              on_progress=lambda fraction, text: progress(fraction, desc=text))
        except UsageError as err:
            return (*empty, _message(str(err)), job.command(), None)
        except jobs.Cancelled:
            return (*empty, _message("cancelled", "note"), job.command(), None)
        except Exception as err:  # a bug: say so on the page, keep the server up, log the traceback
            log.exception("generation failed")
            return (*empty, _message(f"internal error: {type(err).__name__}: {err}"), job.command(), None)
        finally:
            self._in_flight.discard(folder)
        f = result.files
        shown = [f.get("plain_layout") or f.get("plain"), f.get("image_layout") or f.get("image")]
        if job.request.method == PLAIN:
            shown = [f["image"], None]
        downloads = [str(f[name]) for name in ("layout.json", "sketch.png") if name in f]
        return (*[str(p) if p else None for p in shown], str(f["maps"]) if "maps" in f else None,
                _message("done", "ok"), result.command, downloads or None)

    def cancel(self, session: str) -> None:
        """Stop the run of browser session `session` at its next denoising step."""
        if session in self._cancels:
            self._cancels[session].set()

    def _folder(self, in_flight: bool = False) -> Path:
        """A new request folder; the oldest beyond KEPT_RESULTS are deleted, except those of runs still going
        (`in_flight` marks this one so until `generate` is done with it)."""
        with self._lock:
            self._count += 1
            folder = self.root / f"{self._count:06d}"
            for old in sorted(self.root.iterdir())[:-KEPT_RESULTS]:
                if old not in self._in_flight:
                    shutil.rmtree(old, ignore_errors=True)
            folder.mkdir()
            if in_flight:
                self._in_flight.add(folder)
        return folder

    def close(self) -> None:
        """Delete the requests' folders."""
        shutil.rmtree(self.root, ignore_errors=True)

    # --- the page ----------------------------------------------------------------------------------------
    def blocks(self) -> gr.Blocks:
        """The page's Gradio blocks, their events wired to `check`, `generate`, `cancel` and `download`."""
        with gr.Blocks(title="attnctl") as demo:
            gr.Markdown("## attnctl: sketch where things go, then generate with attention control\n"
                        "Paint each object in its own colour (white is the background) or upload a sketch PNG, "
                        "give each colour its phrase from the prompt, pick a method, generate. The plain image "
                        "(same seed) is shown beside the controlled one.")
            values: dict[str, gr.components.Component] = {}
            with gr.Row():
                with gr.Column(scale=5):
                    values["method"] = gr.Radio(list(choices()), value=self.method, label="method",
                                                elem_id="method")
                    if self.models is None:
                        values["model"] = gr.Textbox(self.model, label="model", elem_id="model",
                                                     placeholder="blank: the built-in model that fits the method "
                                                     "(builtin:NAME, a hub id or a local diffusers folder)")
                    else:  # served beyond this machine: a choice, so no path typed on the page is opened
                        values["model"] = gr.Dropdown([("the method's built-in model", ""), *self.models],
                                                      value=self.model, label="model", elem_id="model")
                    values["prompt"] = gr.Textbox(label="prompt", elem_id="prompt",
                                                  placeholder="a red circle and a blue square")
                    values["background"] = gr.Textbox(label="background", elem_id="background",
                                                      info="the background's phrase, part of the prompt (may be "
                                                      "blank)")
                    values["targets"] = gr.Textbox(label="targets", elem_id="targets",
                                                   info=f"{listing(target_methods())}'s words (the maps' words for "
                                                   f"{PLAIN}), comma-separated; preselected from the prompt's nouns")
                    values["sketch"] = _readable_upload_errors(gr.ImageEditor(
                        label="sketch: paint each object in its own colour (white is the background), or upload a "
                        "sketch PNG", type="numpy", image_mode="RGBA", format="png", sources=("upload",),
                        canvas_size=CANVAS, fixed_canvas=True, elem_id="sketch", layers=False,
                        brush=gr.Brush(colors=list(sketch.BRUSH_COLOURS), default_color=sketch.BRUSH_COLOURS[0],
                                       color_mode="fixed", default_size=32)))
                    swatches, phrases = [], []
                    for i in range(sketch.MAX_COLOURS):
                        with gr.Row(equal_height=True):
                            swatches.append(gr.HTML(visible=False, elem_id=f"swatch-{i + 1}"))
                            phrases.append(gr.Textbox(label=f"phrase {i + 1}", show_label=False, visible=False,
                                                      elem_id=f"phrase-{i + 1}",
                                                      placeholder="the phrase painted in this colour"))
                    values["boxes"] = gr.Textbox(lines=2, label="boxes", elem_id="boxes",
                                                 info="instead of or beside the sketch, one per line: phrase: x0, "
                                                 "y0, x1, y1 (fractions of the image, origin top left)")
                    with gr.Row():
                        values["seed"] = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                        for name in ("steps", "height", "width"):
                            values[name] = gr.Number(0, label=name, precision=0, minimum=0, elem_id=name,
                                                     info="0: the model's")
                        values["guidance"] = gr.Textbox(label="guidance", elem_id="guidance",
                                                        info="blank: the pipeline's")
                    panels = {}
                    for method in METHODS:
                        with gr.Accordion(f"{method} options (a default left: the model's recommendation)", open=False,
                                          visible=method == self.method, elem_id=f"options-{method}") as panel:
                            panels[method] = panel
                            for flag, f in jobs.method_fields(method):
                                values[f"{method} {flag}"] = _option_component(flag, f)
                    message = gr.HTML(elem_id="message")
                    with gr.Row():
                        run = gr.Button("generate", variant="primary", elem_id="generate")
                        stop = gr.Button("cancel", elem_id="cancel")
                        save = gr.Button("download layout", elem_id="download-layout")
                    command = gr.Textbox(label="the same on the command line (beside the downloaded layout)",
                                         interactive=False, elem_id="command", buttons=["copy"])
                    files = gr.File(label="layout files", file_count="multiple", interactive=False,
                                    elem_id="layout-files")
                with gr.Column(scale=6):
                    with gr.Row():
                        plain = gr.Image(label="plain (same seed)", type="filepath", interactive=False,
                                         elem_id="plain")
                        controlled = gr.Image(label="controlled", type="filepath", interactive=False,
                                              elem_id="controlled")
                    maps = gr.Image(label="attention maps: a row per run and resolution, a column per word",
                                    type="filepath", interactive=False, elem_id="maps")

            # the inputs of every event, in this order: (method, model, ..., options, phrase 1, ..., phrase 8)
            self.input_names = list(values) + [f"phrase {i + 1}" for i in range(len(phrases))]
            inputs = list(values.values()) + phrases

            def page_values(args) -> dict:
                v = dict(zip(self.input_names, args))
                v["phrases"] = [v.pop(f"phrase {i + 1}") for i in range(len(phrases))]
                return v

            def check(*args):
                return self.check(page_values(args))

            def pick_targets(prompt, method, targets, last):
                if method in layout_methods() or (targets and targets != last):
                    return targets, last
                try:
                    chosen = ", ".join(default_targets(method, prompt)) if prompt.strip() else ""
                except UsageError:
                    chosen = ""
                return chosen, chosen

            def generate(*args):
                *given, progress, request = args
                return self.generate(page_values(given), progress, request.session_hash if request else "")

            _declare_progress_and_request(generate, len(inputs))

            def cancel(request: gr.Request = None):
                self.cancel(request.session_hash if request else "")

            def download(*args):
                return self.download(page_values(args))

            values["method"].change(lambda m: [gr.update(visible=k == m) for k in panels], values["method"],
                                    list(panels.values()), queue=False, api_visibility="private")
            chosen = gr.State("")
            values["prompt"].change(pick_targets, [values["prompt"], values["method"], values["targets"], chosen],
                                    [values["targets"], chosen], queue=False, api_visibility="private")
            slots = [c for pair in zip(swatches, phrases) for c in pair]
            # one event for every edit (the canvas is flattened once); "always_last" so that the editor's change
            # after an upload is never dropped while an earlier check is running
            editor = values["sketch"]
            gr.on([demo.load, editor.upload, editor.apply] + [c.change for c in inputs], check, inputs,
                  [message, command, *slots], queue=False, show_progress="hidden", api_name="check",
                  trigger_mode="always_last")
            event = run.click(generate, inputs, [plain, controlled, maps, message, command, files],
                              concurrency_limit=1, concurrency_id="generate", api_name="generate")
            stop.click(cancel, None, None, cancels=[event], queue=False, api_name="cancel")
            save.click(download, inputs, [files, message, command], queue=False, api_name="download")
        return demo


def _readable_upload_errors(editor: gr.ImageEditor) -> gr.ImageEditor:
    """`editor`, whose preprocessing failures (an upload that is not an image) become a message saying what to
    upload instead of Gradio's bare "Error". Set on this one component: a subclass of a Gradio component makes
    Gradio write a .pyi file beside this module."""
    preprocess = editor.preprocess

    def readable(payload):
        try:
            return preprocess(payload)
        except Exception as err:  # PIL's UnidentifiedImageError, a truncated file, a file of another kind
            raise gr.Error(f"the sketch is not an image Gradio can read ({type(err).__name__}); upload a PNG or "
                           "JPEG, or paint on the canvas", print_exception=False) from None

    editor.preprocess = readable
    return editor


def _declare_progress_and_request(handler, n_inputs: int) -> None:
    """Give `handler(*inputs, progress, request)` the signature Gradio reads to pass a `gr.Progress` and the
    `gr.Request`: it looks for them among positional parameters only, and a handler of `*args` has none (so every
    run was keyed to one session and cancel never reached it)."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(f"input_{i}", positional) for i in range(n_inputs)]
        + [inspect.Parameter("progress", positional, default=gr.Progress()),
           inspect.Parameter("request", positional, default=None, annotation=gr.Request)])
    handler.__annotations__ = {"request": gr.Request}


def _whole(name: str, value) -> int:
    """A whole-number field's value; a UsageError naming the field for anything else (text, NaN, 2.5)."""
    try:
        number = float(value)
        if number.is_integer():
            return int(number)
    except (TypeError, ValueError, OverflowError):
        pass
    raise UsageError(f"{name} must be a whole number, not {value!r}")


def _guidance(value) -> float | None:
    """The guidance field (text; a number from the API) as a number, None when blank."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise UsageError(f"guidance must be a number (1 or less turns guidance off), not {value!r}") from None


def _composite(editor):
    """The flattened picture of the editor's value (background and paint), or None."""
    if editor is None:
        return None
    if isinstance(editor, dict):
        return editor.get("composite")
    return editor


def _option_component(flag: str, f):
    """A method option's input, from its config field: a checkbox, a choice, a number or text."""
    from ..config import default_of, default_text

    meta, default = f.metadata, default_of(f)
    label = flag + (f" ({meta['symbol']})" if meta.get("symbol") else "")
    info = meta["help"] + (f"; default {meta['shown_default']}" if meta.get("shown_default") else "")
    elem_id = "option-" + flag[2:]
    if isinstance(default, bool):
        return gr.Checkbox(default, label=label, info=info, elem_id=elem_id)
    if meta.get("choices"):
        return gr.Dropdown(list(meta["choices"]), value=default, label=label, info=info, elem_id=elem_id)
    if isinstance(default, (int, float)):
        return gr.Number(default, label=label, info=info, precision=0 if isinstance(default, int) else None,
                         minimum=meta.get("low"), maximum=meta.get("high"), elem_id=elem_id)
    return gr.Textbox(default_text(f), label=label, info=info, elem_id=elem_id)


CSS = """
.swatch {display:flex; align-items:center; gap:.5em; font-family:monospace}
.swatch span {display:inline-block; width:1.6em; height:1.6em; border:1px solid #888; border-radius:3px}
.msg {padding:.4em .7em; border-radius:4px}
.msg.error {background:#fde8e8; color:#8a1c1c} .msg.note {background:#fff6da} .msg.ok {background:#e6f6e6}
"""
