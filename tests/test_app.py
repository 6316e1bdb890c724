"""The app (issue 11): the sketch's colours and typed boxes as a layout, the page's options as command-line flags,
and the page itself through gradio_client against the app launched in-process: images and maps for a two-colour
sketch, the CLI's message (and no image) for each bad input, a layout download that the CLI reproduces bit for bit,
one generation at a time, cancel."""

import html
import json
import shlex
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnctl.app import jobs, sketch
from attnctl.errors import UsageError
from attnctl.methods.registry import METHODS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RED, BLUE = (230, 25, 75), (0, 130, 200)
PROMPT = "a red circle and a blue square"


# --- the sketch ---------------------------------------------------------------------------------------------------
def test_a_canvas_becomes_flat_colours_soft_edges_snapped_and_transparency_white():
    canvas = np.zeros((200, 200, 4), dtype=np.uint8)  # transparent: not painted
    canvas[20:80, 20:80] = (*RED, 255)
    canvas[120:180, 120:180] = (*BLUE, 255)
    canvas[80, 20:80] = (235, 60, 110, 255)  # soft edges (0.03% of the pixels each): nearly red, nearly blue,
    canvas[119, 120:180] = (10, 128, 190, 255)
    canvas[0, :60] = (250, 245, 248, 255)  # and nearly white
    canvas[199, :60] = (*RED, 100)  # painted, but mostly transparent: background
    flat = sketch.flat_sketch(canvas)
    expected = np.full((200, 200, 3), 255, dtype=np.uint8)
    expected[20:81, 20:80] = RED
    expected[119:180, 120:180] = BLUE
    assert flat.dtype == np.uint8 and np.array_equal(flat, expected)
    assert sketch.sketch_colours(flat) == [("#0082c8", 61 * 60 / 40000), ("#e6194b", 61 * 60 / 40000)] or \
        sketch.sketch_colours(flat) == [("#e6194b", 61 * 60 / 40000), ("#0082c8", 61 * 60 / 40000)]


def test_an_uploaded_flat_sketch_is_unchanged_and_too_many_colours_are_refused():
    rgb = np.asarray(Image.open(EXAMPLES / "sketch.png").convert("RGB"))
    assert np.array_equal(sketch.flat_sketch(rgb), rgb)
    assert [c for c, _ in sketch.sketch_colours(rgb)] == ["#0082c8", "#e6194b"]  # largest first
    stripes = np.repeat(np.arange(10, dtype=np.uint8)[None, :, None] * 20, 10, axis=0).repeat(3, axis=2)
    with pytest.raises(UsageError, match="10 colours besides white; the page takes at most 8"):
        sketch.sketch_colours(stripes)


def test_typed_boxes_and_their_mistakes():
    assert sketch.parse_boxes("a red circle: 0.05, 0.25, 0.45, 0.75\n\n a: b: 0 0 1 1") == [
        {"phrase": "a red circle", "box": [0.05, 0.25, 0.45, 0.75]}, {"phrase": "a: b", "box": [0, 0, 1, 1]}]
    for line in ("a red circle 0.1 0.2 0.3 0.4", "a red circle: 0.1, 0.2, 0.3", ": 0 0 1 1", "x: 0 0 one 1"):
        with pytest.raises(UsageError, match="line 1 .*write a box as `phrase: x0, y0, x1, y1`"):
            sketch.parse_boxes(line)


def test_a_colour_without_its_phrase_and_an_empty_layout_are_refused():
    with pytest.raises(UsageError, match="colour #0082c8 has no phrase"):
        sketch.layout_data(PROMPT, "", ["#e6194b", "#0082c8"], ["a red circle", " "], "")
    with pytest.raises(UsageError, match="the layout has no regions"):
        sketch.layout_data(PROMPT, "", [], [], "")
    data = sketch.layout_data(PROMPT, "", ["#e6194b"], ["a red circle"], "a blue square: 0.5 0 1 1")
    assert data == {"prompt": PROMPT, "background": "", "sketch": "sketch.png", "regions": [
        {"phrase": "a red circle", "color": "#e6194b"}, {"phrase": "a blue square", "box": [0.5, 0, 1, 1]}]}


# --- the page's options as flags -------------------------------------------------------------------------------
def test_options_become_typed_values_only_where_they_differ_from_the_default():
    from attnctl.config import default_of, default_text

    fields = {flag: f for m in METHODS for flag, f in jobs.method_fields(m)}
    assert "--targets" not in fields  # shown once, outside the panels
    gamma = fields["--ast-gamma"]
    assert jobs.option_value("--ast-gamma", gamma, 3.0) is jobs.option_value("--ast-gamma", gamma, None) is jobs.UNSET
    assert jobs.option_value("--ast-gamma", gamma, 0.123) == 0.123
    seven = jobs.option_value("--iterations", fields["--iterations"], 7.0)
    assert seven == 7 and type(seven) is int
    for flag, value, typed in (("--ast-approximate", False, jobs.UNSET), ("--ast-approximate", True, True),
                               ("--lm-size-weighted", True, jobs.UNSET), ("--lm-size-weighted", False, False)):
        assert jobs.option_value(flag, fields[flag], value) is typed
    thresholds = fields["--ae-thresholds"]
    assert default_text(thresholds) == "0:0.05,10:0.5,20:0.8"  # as the flag takes it
    assert jobs.option_value("--ae-thresholds", thresholds, " 0:0.05,10:0.5,20:0.8 ") is jobs.UNSET
    assert jobs.option_value("--ae-thresholds", thresholds, "0:0.1") == {0: 0.1}  # parsed as the flag parses it
    assert jobs.option_value("--layers", fields["--layers"], "") is jobs.UNSET
    assert default_of(fields["--layers"]) is None
    with pytest.raises(UsageError, match="--ae-thresholds: thresholds 'x'"):
        jobs.option_value("--ae-thresholds", thresholds, "x")


def test_cancel_stops_at_the_next_step_and_leaves_the_pipeline_as_it_was(tmp_path):
    from attnctl.layout import Layout
    from attnctl.run import Pipelines, Request
    from attnctl.sampling import SamplingConfig

    pipelines = Pipelines()
    layout = Layout.load(EXAMPLES / "two_shapes.json")
    job = jobs.Job(Request(method="ast", layout=layout, sampling=SamplingConfig(steps=4), maps=True))
    seen, cancel = [], threading.Event()

    def progress(fraction, text):
        seen.append(text)
        cancel.set()

    with pytest.raises(jobs.Cancelled):
        jobs.run(job, tmp_path, pipelines, on_progress=progress, cancel=cancel)
    assert seen == ["ast: step 1/4"]
    pipe = pipelines.loaded("builtin:shapes-mmdit")
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} <= {
        "JointAttnProcessor2_0", "FluxAttnProcessor"}  # the model's own processors again
    assert not hasattr(pipe.transformer, "_diffusers_hook") or pipe.transformer._diffusers_hook.get_hook(
        "attnctl") is None


# --- the page, through gradio_client ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    """The page as users get it: `attnctl app` started through its console script (a real server on a free port),
    with a gradio_client on it; the page's input names come from building the same page here."""
    from gradio_client import Client

    from attnctl.app import Page

    from conftest import served_app

    page = Page()
    page.blocks()
    with served_app() as url:
        client = Client(url, verbose=False)
        yield page, client
        client.close()
    page.close()


@pytest.fixture(scope="module")
def app_in_process():
    """The page launched inside the test process, for the test that watches its generate function."""
    from gradio_client import Client

    from attnctl.app import CSS, Page

    page = Page()
    demo = page.blocks().queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, css=CSS, server_name="127.0.0.1")
    client = Client(url, verbose=False)
    yield page, client
    client.close()
    demo.close()
    page.close()


def page_args(app, **given):
    """The page's values for its events, by input name (phrase_1 for "phrase 1"; the defaults for the rest)."""
    page, client = app
    given = {k.replace("_", " "): v for k, v in given.items()}
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    values = [given.pop(name, p.get("parameter_default")) for name, p in zip(page.input_names, params, strict=True)]
    assert not given, f"no such inputs: {list(given)}"
    return values


def editor_with(path):
    from gradio_client import handle_file

    picture = handle_file(str(path))
    return {"background": picture, "layers": [], "composite": picture}


SKETCH = dict(method="ast", prompt=PROMPT, phrase_1="a blue square", phrase_2="a red circle", steps=3)


def test_a_two_colour_sketch_gives_both_images_the_maps_and_the_layout_files(app):
    _, client = app
    editor = editor_with(EXAMPLES / "sketch.png")
    swatches = client.predict(*page_args(app, sketch=editor), api_name="/check")[2::2]  # (swatch, box) per colour
    assert [("#0082c8 · 24%" in u["value"], "#e6194b · 17%" in u["value"], u["visible"]) for u in swatches] == [
        (True, False, True), (False, True, True)] + [(False, False, False)] * 6
    plain, controlled, maps, message, command, files = client.predict(
        *page_args(app, sketch=editor, **SKETCH), api_name="/generate")
    assert "done" in message, message
    for picture in (plain, controlled, maps):
        assert Image.open(picture).size[0] >= 256  # enlarged to be readable
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(controlled)))
    assert command == "attnctl generate --method ast --layout layout.json --steps 3 --maps --out out/app"
    assert sorted(Path(f).name for f in files) == ["layout.json", "sketch.png"]


def test_the_downloaded_layout_and_command_reproduce_the_page_bit_for_bit(app, tmp_path, cli, monkeypatch):
    from attnctl.layout import Layout

    _, client = app
    args = page_args(app, sketch=editor_with(EXAMPLES / "sketch.png"), **{**SKETCH, "seed": 5})
    plain, controlled, _, message, command, files = client.predict(*args, api_name="/generate")
    assert "done" in message, message
    downloaded, _, download_command = client.predict(*args, api_name="/download")
    assert download_command == command == ("attnctl generate --method ast --layout layout.json --seed 5 --steps 3 "
                                           "--maps --out out/app")
    for f in downloaded:
        shutil.copy(f, tmp_path / Path(f).name)
    layout = Layout.load(tmp_path / "layout.json")
    assert [r.phrase for r in layout.regions] == ["a blue square", "a red circle"]
    assert json.loads((tmp_path / "layout.json").read_text())["sketch"] == "sketch.png"
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*shlex.split(command)[1:])
    assert code == 0, err
    for page_image, name in ((controlled, "image_layout.png"), (plain, "plain_layout.png")):
        assert np.array_equal(np.asarray(Image.open(page_image)), np.asarray(Image.open(tmp_path / "out/app" / name)))


BAD = [  # (page values, the message's start): the CLI's messages, on the page
    (dict(phrase_2="a green circle"), "region 2 ('a green circle'): the phrase is not part of the prompt"),
    (dict(phrase_2=""), "colour #e6194b has no phrase"),
    (dict(sketch=None, boxes=""), "the layout has no regions"),
    (dict(sketch=None, boxes="a red circle: 0.5 0.5 0.5 0.9"), "region 1 ('a red circle'): box [0.5, 0.5, 0.5, 0.9] "
                                                                "is empty"),
    (dict(sketch=None, boxes="a red circle: 0 0 0.6 1\na blue square: 0.4 0 1 1"), "regions 1 ('a red circle') and 2 "
                                                                                  "('a blue square') overlap"),
    (dict(prompt=""), "layout: 'prompt' must be a non-empty string"),
    (dict(steps=1001), "--steps must be between 1 and 1000"),
    (dict(guidance="lots"), "guidance must be a number (1 or less turns guidance off), not 'lots'"),
    (dict(method="regulation", targets="dog"), "word 'dog' is not in the prompt 'a red circle and a blue square'. The "
                                               "prompt's words are: a, red, circle, and, a, blue, square; its tokens "
                                               "are: <|startoftext|> a red circle"),
    (dict(method="regulation", model="builtin:nothing-here"), "no built-in model 'builtin:nothing-here'; built-in "
                                                              "models: shapes-mmdit, shapes-unet"),
    (dict(model="builtin:shapes-unet"), "AST tunes joint text-image attention (MMDiT models"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:30] for _, m in BAD])
def test_each_bad_input_gives_its_message_and_no_image(app, bad, message):
    _, client = app
    values = {**SKETCH, "sketch": editor_with(EXAMPLES / "sketch.png"), **bad}
    plain, controlled, maps, shown, command, files = client.predict(*page_args(app, **values),
                                                                    api_name="/generate")
    assert (plain, controlled, maps, files) == (None, None, None, None)
    assert message in html.unescape(shown) and "msg error" in shown, shown
    assert "Traceback" not in shown


def test_the_page_checks_as_the_person_types(app):
    _, client = app
    values = {**SKETCH, "sketch": editor_with(EXAMPLES / "sketch.png")}
    shown, command, *_ = client.predict(*page_args(app, **values), api_name="/check")
    assert "ready" in shown and command.startswith("attnctl generate --method ast")
    shown, command, *_ = client.predict(*page_args(app, **{**values, "phrase_1": "a blue cube"}), api_name="/check")
    assert "'a blue cube'): the phrase is not part of the prompt" in html.unescape(shown) and command == ""
    # once the model is loaded, also the words as its tokenizer reads them: here a phrase cut by its 16 tokens
    client.predict(*page_args(app, **{**values, "steps": 1}), api_name="/generate")
    long_prompt = {"prompt": PROMPT + " in a park with tall trees by a lake", "background": "a lake"}
    shown, command, *_ = client.predict(*page_args(app, **{**values, **long_prompt}), api_name="/check")
    assert "phrase 'a lake' lies beyond the text encoder's token limit" in html.unescape(shown), shown


def test_a_regulation_request_preselects_nouns_and_maps_its_targets(app):
    _, client = app
    plain, controlled, maps, message, command, _ = client.predict(
        *page_args(app, method="regulation", prompt=PROMPT, targets="circle, square", steps=2),
        api_name="/generate")
    assert "done" in message, message
    assert command == f"attnctl generate --method regulation --prompt '{PROMPT}' --targets circle,square " \
                      "--steps 2 --maps --out out/app"
    assert plain and controlled and maps


def test_one_generation_runs_at_a_time(app_in_process):
    app = app_in_process
    page, client = app
    spans, original = [], page.generate

    def timed(*args, **kwargs):
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            spans.append((start, time.monotonic()))

    page.generate = timed
    try:
        values = page_args(app, sketch=editor_with(EXAMPLES / "sketch.png"), **SKETCH)
        first, second = (client.submit(*values, api_name="/generate") for _ in range(2))
        assert all("done" in job.result()[3] for job in (first, second))
    finally:
        del page.generate
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, "the second generation started before the first ended"


def test_method_none_generates_the_plain_image_and_its_maps(app):
    _, client = app
    plain, controlled, maps, message, command, _ = client.predict(
        *page_args(app, method="none", prompt=PROMPT, targets="circle, square", steps=2), api_name="/generate")
    assert "done" in message, message
    assert plain and controlled is None and maps
    assert command == f"attnctl generate --method none --prompt '{PROMPT}' --targets circle,square --steps 2 " \
                      "--maps --out out/app"
    shown, *_ = client.predict(*page_args(app, method="none", prompt=PROMPT), api_name="/check")
    assert "ready" in shown, shown


def test_cancel_stops_the_run_and_the_next_request_starts_at_once(app):
    from gradio_client.utils import Status

    _, client = app
    long_run = client.submit(*page_args(app, sketch=editor_with(EXAMPLES / "sketch.png"), **{**SKETCH, "steps": 1000}),
                             api_name="/generate")
    deadline = time.monotonic() + 60
    while long_run.status().code != Status.PROGRESS:  # denoising has begun
        assert time.monotonic() < deadline, long_run.status()
        time.sleep(0.1)
    client.predict(api_name="/cancel")
    start = time.monotonic()
    *_, message, _, _ = client.predict(*page_args(app, method="regulation", prompt=PROMPT, steps=2),
                                       api_name="/generate")
    assert "done" in message, message  # the pipeline was free: the cancelled run stopped and restored it
    assert time.monotonic() - start < 30  # not after the 1000 steps the cancelled run asked for


def test_a_run_keeps_its_result_and_the_live_check_works_while_it_runs(app):
    """During a generation: nine layout downloads (each a new request folder) do not delete the run's folder, and
    the live check reads the words without attaching to the pipeline the run holds."""
    from gradio_client.utils import Status

    _, client = app
    values = page_args(app, sketch=editor_with(EXAMPLES / "sketch.png"), **{**SKETCH, "steps": 100})
    job = client.submit(*values, api_name="/generate")
    deadline = time.monotonic() + 60
    while job.status().code != Status.PROGRESS:
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.1)
    for _ in range(9):
        client.predict(*values, api_name="/download")
    shown, *_ = client.predict(*values, api_name="/check")
    assert "ready" in shown, shown
    assert not job.done(), "the run ended before the downloads: give it more steps"
    plain, controlled, maps, message, *_ = job.result()
    assert "done" in message, message
    assert all(Path(p).exists() for p in (plain, controlled, maps))


def test_typed_values_stay_values_whatever_they_start_with():
    """A prompt, target or model typed on the page reaches the command as that value, also when it starts with
    "-" (it was read as an option)."""
    from attnctl.cli import build_parser
    from attnctl.run import Request

    request = Request(method="regulation", prompt="-a red circle --steps 3", targets=["-circle"], model="--weird")
    args = build_parser().parse_args(request.arguments("layout.json", "out"))
    assert (args.prompt, vars(args)["option--targets"], args.model, getattr(args, "option--steps", None)) == (
        "-a red circle --steps 3", ["-circle"], "--weird", None)


def test_an_uploaded_file_that_is_not_an_image_gets_the_pages_message(app, tmp_path):
    from gradio_client.exceptions import AppError

    _, client = app
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    for endpoint in ("/check", "/generate"):
        with pytest.raises(AppError, match="the sketch is not an image Gradio can read .* upload a PNG or JPEG"):
            client.predict(*page_args(app, **{**SKETCH, "sketch": editor_with(text)}), api_name=endpoint)


def test_a_page_served_beyond_this_machine_opens_only_the_models_it_was_given():
    """On any address but the loopback one, the model is a choice among the models given at launch (default: the
    built-in ones): a path sent to the page is never opened, and the API refuses a model outside the list."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from attnctl.app import Page

    from conftest import served_app

    page = Page(models=("builtin:shapes-unet", "builtin:shapes-mmdit"))
    page.blocks()
    with served_app("--host", "0.0.0.0") as url:
        client = Client(url, verbose=False)
        served = (page, client)
        with pytest.raises(AppError, match="/etc/passwd"):  # Gradio's own check of the choice
            client.predict(*page_args(served, **{**SKETCH, "model": "/etc/passwd"}), api_name="/check")
        shown, *_ = client.predict(*page_args(served, **{**SKETCH, "model": "builtin:shapes-mmdit",
                                                         "sketch": editor_with(EXAMPLES / "sketch.png")}),
                                   api_name="/check")
        assert "ready" in shown, shown
        client.close()
    values = {"method": "none", "prompt": "a cat", "targets": "", "model": "/etc", "seed": 0, "steps": 0, "height": 0,
              "width": 0, "guidance": "", "sketch": None, "background": "", "boxes": "", "phrases": []}
    with pytest.raises(UsageError, match="this page serves only builtin:shapes-unet, builtin:shapes-mmdit; /etc is"):
        page.request(values)
    page.close()
