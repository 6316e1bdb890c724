"""Relocation: the window search against a brute-force search, the permutation of the cells, and the controller on
every tiny family: the steps it reads are the plain run's, and the move is exactly that permutation of the plain
run's latents."""

import itertools
from pathlib import Path

import pytest
import torch

import attnctl
from attnctl.errors import UsageError
from attnctl.methods.relocation import (
    Relocation,
    box_cells,
    cell_permutation,
    centred_window,
    holds_window,
    object_windows,
)

from conftest import call_kwargs, run, tiny_pipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LAYOUT = {"prompt": "a red cat and a blue dog",
          "regions": [{"phrase": "a red cat", "box": [0.55, 0.1, 0.95, 0.5]},
                      {"phrase": "a blue dog", "box": [0.05, 0.5, 0.45, 0.9]}]}


def brute_force_windows(maps, boxes):
    taken = torch.zeros(maps.shape[-2:], dtype=torch.bool)
    out = [None] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda j: -float(maps[j].max())):
        _, _, bh, bw = boxes[i]
        best, where = -1.0, None
        for top, left in itertools.product(range(maps.shape[1] - bh + 1), range(maps.shape[2] - bw + 1)):
            if taken[top:top + bh, left:left + bw].any():
                continue
            mass = float(maps[i, top:top + bh, left:left + bw].double().sum())
            if mass > best + 1e-9:
                best, where = mass, (top, left)
        out[i] = where
        taken[where[0]:where[0] + bh, where[1]:where[1] + bw] = True
    return out


@pytest.mark.parametrize("seed", range(6))
def test_windows_are_the_brute_force_search(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(3, 12, 10, generator=g, dtype=torch.float64) ** 4
    boxes = [(0, 0, 4, 3), (6, 5, 3, 4), (2, 6, 5, 2)]
    assert object_windows(maps.float(), boxes) == brute_force_windows(maps, boxes)


def test_the_permutation_moves_each_window_onto_its_box_and_keeps_the_rest():
    grid = (8, 9)
    boxes = [(1, 5, 3, 3), (5, 0, 2, 4)]
    sources = [(4, 2), (0, 0)]  # the first window overlaps the second box's rows; the second overlaps nothing
    order = cell_permutation(sources, boxes, grid)
    assert sorted(order.tolist()) == list(range(72))  # a permutation: the latents' distribution is unchanged
    cells = torch.arange(72).view(8, 9)
    for (top, left), (btop, bleft, bh, bw) in zip(sources, boxes):
        assert torch.equal(order.view(8, 9)[btop:btop + bh, bleft:bleft + bw], cells[top:top + bh, left:left + bw])
    in_box = torch.zeros(8, 9, dtype=torch.bool)
    in_window = torch.zeros(8, 9, dtype=torch.bool)
    for (top, left), (btop, bleft, bh, bw) in zip(sources, boxes):
        in_box[btop:btop + bh, bleft:bleft + bw] = True
        in_window[top:top + bh, left:left + bw] = True
    untouched = ~in_box & ~in_window
    assert torch.equal(order.view(8, 9)[untouched], cells[untouched])
    vacated = ~in_box & in_window  # they take what the boxes held and no window took
    assert set(order.view(8, 9)[vacated].tolist()) == set(cells[in_box & ~in_window].tolist())


def test_box_cells_round_to_the_grid_and_keep_a_cell():
    assert box_cells((0.5, 0.25, 1.0, 0.75), (16, 16)) == (4, 8, 8, 8)
    assert box_cells((0.0, 0.0, 0.01, 0.01), (8, 8)) == (0, 0, 1, 1)


def test_the_window_is_at_most_the_given_side_and_centred_in_its_box():
    assert centred_window((3, 4, 6, 7), 1.0, (16, 16)) == (3, 4, 6, 7)  # 1: the whole box
    assert centred_window((3, 4, 6, 7), 0.25, (16, 16)) == (4, 5, 4, 4)  # 4 of 16 cells, centred (rounded down)
    assert centred_window((0, 0, 16, 8), 0.4, (16, 16)) == (5, 1, 6, 6)  # a half: a square in its middle
    assert centred_window((2, 2, 3, 3), 0.0, (8, 8)) == (3, 3, 1, 1)  # at least one cell


def plain_latents(pipe, kwargs) -> list:
    """The plain run's latents after each step."""
    plain = []
    run(pipe, LAYOUT["prompt"], callback_on_step_end=lambda p, i, t, x: plain.append(x["latents"].clone()) or {},
        **kwargs)
    return plain


def test_a_box_holds_a_window_when_it_is_at_least_as_large_in_both_directions():
    grid = (16, 16)
    assert holds_window((0, 0, 16, 8), 0.4, grid)  # a half: 8 cells wide, the window 6
    assert holds_window((0, 0, 6, 6), 0.4, grid)
    assert not holds_window((0, 0, 16, 5), 0.4, grid)  # a third (5 of 16 cells) is narrower than an object
    assert not holds_window((0, 0, 5, 16), 0.4, grid)
    assert not holds_window((0, 0, 15, 15), 1.0, grid)  # 1: only the whole image holds it


THIRDS = {"prompt": "a red cat and a blue dog and a green bird",
          "regions": [{"phrase": "a red cat", "box": [0, 0, 1 / 3, 1]},
                      {"phrase": "a blue dog", "box": [1 / 3, 0, 2 / 3, 1]},
                      {"phrase": "a green bird", "box": [2 / 3, 0, 1, 1]}]}


def test_objects_whose_boxes_are_narrower_than_the_window_are_left_where_they_form(caplog):
    """fit='whole' (default): three columns, each narrower than the window, move nothing (the plain run, bit for bit,
    with one warning naming the objects and the fixes); fit='clip' moves the part of each window the box holds."""
    import logging

    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2, height=128, width=128)  # 16x16 latent cells: a third is 5, the window 6
    plain = run(pipe, THIRDS["prompt"], **kwargs)
    arms = {}
    for fit, runs in (("whole", 2), ("clip", 1)):
        method = Relocation(THIRDS, read_fraction=0.5, fit=fit)  # reads step 0, moves after it
        with caplog.at_level(logging.WARNING, "attnctl"), attnctl.apply(pipe, method) as session:
            for _ in range(runs):
                images = session(THIRDS["prompt"], generator=torch.Generator().manual_seed(0), **kwargs).images
        arms[fit] = (images, method.moves)
    assert method._grid == (16, 16)
    images, moves = arms["whole"]
    assert moves == [[None, None, None]] and torch.equal(torch.as_tensor(images), torch.as_tensor(plain))
    assert caplog.text.count("are narrower than the window") == 1  # once per attach, not per run
    assert "'a red cat', 'a blue dog', 'a green bird'" in caplog.text and "--rl-window" in caplog.text
    images, moves = arms["clip"]
    assert all(m is not None for m in moves[0]) and not torch.equal(torch.as_tensor(images), torch.as_tensor(plain))



def test_the_contrast_locator_makes_no_predictions_where_no_object_would_move():
    """Three columns narrower than the window under fit='whole': the contrast locator's extra forwards (the prompt
    with and without each object) are skipped, and the run is the plain one, bit for bit."""
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2, height=128, width=128)
    plain = run(pipe, THIRDS["prompt"], **kwargs)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        method = Relocation(THIRDS, read_fraction=0.5, locator="contrast")
        with attnctl.apply(pipe, method) as session:
            images = session(THIRDS["prompt"], generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    # the three edited prompts' first calls (stopped) and the run's two steps: no 1 + 3 forwards after step 0
    assert len(calls) == 3 + 2 and method._located is None and method.moves == [[None, None, None]]
    assert torch.equal(torch.as_tensor(images), torch.as_tensor(plain))


@pytest.mark.parametrize("name, window, locator", [
    ("unet", 1.0, "attention"), ("sd3", 1.0, "attention"), ("flux", 1.0, "attention"), ("unet", 0.2, "attention"),
    ("unet", 0.4, "contrast"), ("flux", 0.4, "contrast")])
def test_the_read_steps_are_plain_and_the_move_is_the_permutation(name, window, locator):
    """The steps read are the plain run's bit for bit; the latents the denoiser gets after the move are exactly the
    plain latents of that step with their cells permuted as `moves` says (with the contrast locator too: its probes
    of the edited prompts draw nothing from the caller's generator)."""
    pipe = tiny_pipe(name)
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    kwargs = call_kwargs(name, steps=4)
    plain = plain_latents(pipe, kwargs)
    inputs = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kw: inputs.append((args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    fit = "clip" if window == 1.0 else "whole"  # 1: the whole box, which no box smaller than the image holds whole
    method = Relocation(LAYOUT, read_fraction=0.5, window=window, locator=locator, fit=fit)  # reads 0-1, moves after 1
    try:
        with attnctl.apply(pipe, method) as session:
            images = session(LAYOUT["prompt"], generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    # (contrast: the two edited prompts' first calls, stopped), steps 0-1, (contrast: its 1 + 2 forwards), steps 2-3;
    # one denoiser call per step, under guidance the rows repeat the latents
    probes, forwards = (2, 3) if locator == "contrast" else (0, 0)
    assert len(inputs) == probes + 2 + forwards + 2
    grid = method._grid
    boxes = [centred_window(box_cells(r.box, grid), window, grid) for r in method.layout.regions]
    assert [m["box"] for m in method.moves[0]] == [b[:2] for b in boxes]
    order = cell_permutation([m["window"] for m in method.moves[0]], boxes, grid)
    assert order.tolist() != list(range(len(order)))  # something moved
    if plain[1].dim() == 3:  # packed: one token per cell
        expected = plain[1][:, order]
    else:
        expected = plain[1].flatten(2)[:, :, order].view_as(plain[1])
    assert torch.equal(inputs[probes + 2 + forwards][:1].to(expected.dtype), expected)
    assert torch.equal(inputs[probes + 1][:1].to(plain[0].dtype), plain[0])  # step 1's input: the plain run's
    assert images.shape == run(pipe, LAYOUT["prompt"], **kwargs).shape


def test_a_plain_pipeline_call_is_refused():
    pipe = tiny_pipe("sd3")
    with attnctl.apply(pipe, Relocation(LAYOUT)):
        with pytest.raises(UsageError, match="through the session"):
            run(pipe, LAYOUT["prompt"], **call_kwargs("sd3", steps=2))


def test_a_read_fraction_out_of_range_names_the_flag():
    with pytest.raises(UsageError, match="read_fraction|--rl-read-fraction"):
        Relocation(LAYOUT, read_fraction=1.5)


@pytest.mark.parametrize("name, locator", [("unet", "attention"), ("flux", "attention"), ("unet", "contrast")])
def test_a_restart_starts_from_the_moved_initial_latents(name, locator):
    """With `restart`, the read steps run from the plain run's initial latents, and the run proper starts from those
    latents permuted as `moves` says."""
    pipe = tiny_pipe(name)
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    kwargs = call_kwargs(name, steps=4)
    inputs = []

    def record(module, args, kw):
        inputs.append((args[0] if args else kw["hidden_states"]).clone())

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, LAYOUT["prompt"], **kwargs)
        plain_start = inputs[0][:1]
        inputs.clear()
        method = Relocation(LAYOUT, read_fraction=0.5, restart=True, locator=locator)
        with attnctl.apply(pipe, method) as session:
            session(LAYOUT["prompt"], generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        handle.remove()
    # (contrast: the two edited prompts' first calls, stopped), the session's first call (stopped), the two read
    # steps, (contrast: its three forwards), then the four steps of the run proper
    probes, forwards = (2, 3) if locator == "contrast" else (0, 0)
    assert len(inputs) == probes + 1 + 2 + forwards + 4
    assert torch.equal(inputs[probes + 1][:1], plain_start)
    grid = method._grid
    order = cell_permutation([m["window"] for m in method.moves[0]],
                             [box_cells(r.box, grid) for r in method.layout.regions], grid)
    expected = plain_start[:, order] if plain_start.dim() == 3 else \
        plain_start.flatten(2)[:, :, order].view_as(plain_start)
    assert torch.equal(inputs[probes + 3 + forwards][:1], expected)


# --- the contrast locator ---------------------------------------------------------------------------------------
from attnctl.methods.contrast_locator import prompt_without  # noqa: E402


def test_a_prompt_without_an_object_drops_its_phrase_and_one_connector():
    pair, triple = "a red circle and a blue square", "a red circle, a blue square and a green triangle"
    assert prompt_without(pair, (0, 12)) == "a blue square"
    assert prompt_without(pair, (17, 30)) == "a red circle"
    assert prompt_without(triple, (14, 27)) == "a red circle, a green triangle"
    assert prompt_without(triple, (32, 48)) == "a red circle, a blue square"
    relation = "a red circle to the left of a blue square"
    assert prompt_without(relation, (0, 12)) == "to the left of a blue square"
    assert prompt_without("a cat and a dog on a sofa", (10, 15)) == "a cat on a sofa"


def _reference_prediction(pipe, name, text, x, t):
    """The denoiser's conditional prediction for `text` at latents `x`, in float64, from the pipeline's own encoder."""
    import copy

    if name == "unet":
        embeds = pipe.encode_prompt(text, "cpu", 1, False)[0]
        unet = copy.deepcopy(pipe.unet).double()
        with torch.no_grad():
            return unet(x.double(), t, encoder_hidden_states=embeds.double()).sample
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=text, prompt_3=text, device="cpu",
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    transformer = copy.deepcopy(pipe.transformer).double()
    with torch.no_grad():
        return transformer(hidden_states=x.double(), timestep=t.expand(1).double(),
                           encoder_hidden_states=embeds.double(), pooled_projections=pooled.double(),
                           return_dict=False)[0]


@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_the_contrast_maps_are_the_prediction_differences(name):
    """Object i's map is |prediction(prompt) − prediction(prompt without i)| over channels at the latents after the
    last read step and the next timestep, against a float64 computation from the pipeline's own encoder; the read
    steps are the plain run's (the probes for the edited prompts draw nothing from the caller's generator)."""
    pipe = tiny_pipe(name)
    kwargs = call_kwargs(name, steps=4)
    plain = plain_latents(pipe, kwargs)
    method = Relocation(LAYOUT, read_fraction=0.5, locator="contrast")  # reads to step 1
    with attnctl.apply(pipe, method) as session:
        session(prompt=LAYOUT["prompt"], generator=torch.Generator().manual_seed(0), **kwargs)
    assert method._contrast.edited == ["a blue dog", "a red cat"]
    x, t = plain[1], pipe.scheduler.timesteps[2]
    full = _reference_prediction(pipe, name, LAYOUT["prompt"], x, t)
    expected = torch.stack([(full - _reference_prediction(pipe, name, text, x, t)).norm(dim=1)
                            for text in method._contrast.edited], 1)
    assert method._located.shape == expected.shape
    # float32 predictions round at about 1e-7 of their size, and a map is a difference of two of them
    scale = float(full.detach().abs().max())
    torch.testing.assert_close(method._located.double(), expected.detach(), rtol=1e-4, atol=1e-5 * scale)
    assert float(expected.max()) > 10 * 1e-5 * scale  # the maps lie well above that tolerance


def test_the_contrast_locator_refuses_what_it_cannot_edit_before_any_step():
    pipe = tiny_pipe("sd3")
    kwargs = call_kwargs("sd3", steps=2)
    embeds = pipe.encode_prompt(prompt=LAYOUT["prompt"], prompt_2=None, prompt_3=None, device="cpu")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with attnctl.apply(pipe, Relocation(LAYOUT, locator="contrast"), prompt=LAYOUT["prompt"]) as session:
            with pytest.raises(UsageError, match="prompt as one string.*--rl-locator attention"):
                session(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=embeds[2],
                        negative_pooled_prompt_embeds=embeds[3], **kwargs)
            with pytest.raises(UsageError, match="prompt_2 differs"):
                session(prompt=LAYOUT["prompt"], prompt_2="a cat", **kwargs)
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(UsageError, match="locator.*attention, contrast"):
        Relocation(LAYOUT, locator="x-ray")


def test_a_sketch_layout_moves_each_object_onto_its_regions_bounding_box():
    """Colour (and mask) regions have no box: the target is the centre of the region's bounding box (a sketch
    crashed the app's relocation before)."""
    from attnctl.layout import Layout

    layout = Layout.load(EXAMPLES / "sketch_layout.json")
    red = layout.regions[0]
    x0, y0, x1, y1 = red.extent()
    ys, xs = red.mask.nonzero()
    assert (x0 * red.mask.shape[1], y1 * red.mask.shape[0]) == (xs.min(), ys.max() + 1)
    pipe = tiny_pipe("unet")
    method = Relocation(layout, read_fraction=0.5)
    with attnctl.apply(pipe, method) as session:
        session(layout.prompt, generator=torch.Generator().manual_seed(0), **call_kwargs("unet", steps=4))
    grid = method._grid
    assert [m["box"] for m in method.moves[0]] == [
        centred_window(box_cells(r.extent(), grid), 0.4, grid)[:2] for r in layout.regions]


def test_in_the_suite_only_the_triples_in_thirds_have_boxes_narrower_than_the_window():
    """On the built-in models' 16x16 latent grid at the default window: the triples' thirds are left where they form
    (fit='whole'), every other layout of the suite (halves, relation layouts, random boxes) holds whole windows, so
    relocation's images there are what they were before fit existed."""
    from attnctl.eval import build_suite

    grid = (16, 16)
    for case in build_suite(20):
        holds = {holds_window(box_cells(box, grid), 0.4, grid) for box in case.boxes}
        assert holds == ({False} if set(case.categories) & {"three_objects", "seen_triples"} else {True}), case


# --- compose: each object drawn alone, its start put into its box ------------------------------------------------

@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_compose_puts_each_objects_own_start_into_its_box(name):
    """With `compose`, each object's phrase runs alone from the run's own initial latents for the read steps; after
    the move, each box's window holds the cells of that object's own latents from the window where the map
    ‖conditional − unconditional prediction‖ of its run (at the last read step) is largest; the rest is the move."""
    pipe = tiny_pipe(name)
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    kwargs = call_kwargs(name, steps=4, guidance_scale=5.0)
    inputs, outputs = [], []
    pre = denoiser.register_forward_pre_hook(
        lambda module, args, kw: inputs.append((args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    post = denoiser.register_forward_hook(lambda module, args, out: outputs.append(
        (out[0] if isinstance(out, tuple) else out.sample).clone()))
    method = Relocation(LAYOUT, read_fraction=0.5, window=0.4, locator="attention", compose=True)
    try:
        with attnctl.apply(pipe, method) as session:
            session(LAYOUT["prompt"], generator=torch.Generator().manual_seed(0), **kwargs)
        start = method._starts[2]
        # the session's first call (stopped), the two phrases' read steps 0-1, the run's steps 0-1, then step 2's
        given = inputs[5][:1]
        assert torch.equal(inputs[0][:1], start) and torch.equal(inputs[3][:1], start)
        # the reference: both phrases from the same initial latents, nothing attached, stopped after step 1
        inputs.clear(), outputs.clear()
        alone = []

        def stop(p, i, t, x):
            if i == 1:
                alone.append(x["latents"].clone())
                p._interrupt = True
            return {}

        pipe([r["phrase"] for r in LAYOUT["regions"]], latents=start.repeat(2, *[1] * (start.dim() - 1)),
             callback_on_step_end=stop, **kwargs)
        reference = alone[0]
        out = outputs[1]  # step 1: rows [uncond a, uncond b, cond a, cond b]
        channel = 1 if out.dim() == 4 else -1
        maps = (out[2:].double() - out[:2].double()).norm(dim=channel)
        if out.dim() == 3:
            maps = maps.unflatten(-1, method._grid)
        # the main run from the same initial latents, plain, to the end of step 1
        plain = plain_latents(pipe, {**kwargs, "latents": start})[1]
    finally:
        pre.remove(), post.remove()
    grid = method._grid
    boxes = [centred_window(box_cells(r["box"], grid), 0.4, grid) for r in LAYOUT["regions"]]
    order = cell_permutation([m["window"] for m in method.moves[0]], boxes, grid)
    packed = plain.dim() == 3
    cells = (plain if packed else plain.flatten(2).transpose(1, 2))[0, order].clone()
    own = reference if packed else reference.flatten(2).transpose(1, 2)
    for i, (top, left, bh, bw) in enumerate(boxes):
        (stop_top, stop_left), = brute_force_windows(maps[i][None], [(top, left, bh, bw)])
        for dy, dx in itertools.product(range(bh), range(bw)):
            cells[(top + dy) * grid[1] + left + dx] = own[i, (stop_top + dy) * grid[1] + stop_left + dx]
    expected = cells[None] if packed else cells.T.reshape(plain.shape)
    assert torch.allclose(given.to(expected.dtype), expected, atol=1e-6)


def test_compose_without_guidance_names_the_fix():
    pipe = tiny_pipe("sd3")
    with attnctl.apply(pipe, Relocation(LAYOUT, compose=True)) as session:
        with pytest.raises(UsageError, match="guidance scale above 1"):
            session(LAYOUT["prompt"], generator=torch.Generator().manual_seed(0),
                    **call_kwargs("sd3", steps=2, guidance_scale=1.0))


def test_compose_runs_no_object_alone_where_no_object_would_move():
    """Boxes narrower than the window move nothing (fit='whole'): no object's own run either, the plain images."""
    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=2, height=128, width=128, guidance_scale=5.0)
    plain = run(pipe, THIRDS["prompt"], **kwargs)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with attnctl.apply(pipe, Relocation(THIRDS, read_fraction=0.5, compose=True)) as session:
            images = session(THIRDS["prompt"], generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    assert len(calls) == 1 + 2  # the first call (stopped) for the initial latents, then the run's two steps
    assert torch.equal(torch.as_tensor(images), torch.as_tensor(plain))


def test_compose_and_restart_together_are_refused():
    with pytest.raises(UsageError, match="--no-rl-compose or --no-rl-restart"):
        Relocation(LAYOUT, compose=True, restart=True)


def test_compose_gives_each_phrase_the_negative_prompt():
    """The objects' own runs take a list of phrases; a negative prompt given as text goes to each of them (diffusers
    refuses a text negative prompt beside a list of prompts)."""
    pipe = tiny_pipe("unet")
    method = Relocation(LAYOUT, read_fraction=0.5, compose=True)
    with attnctl.apply(pipe, method) as session:
        session(LAYOUT["prompt"], negative_prompt="a green bird", generator=torch.Generator().manual_seed(0),
                **call_kwargs("unet", steps=2, guidance_scale=5.0))
    assert method._starts[0].shape[0] == 2 and all(m is not None for m in method.moves[0])
