"""Relocation: each object moved into its box by permuting the latents early in the run (an attnctl method for
issue 28; no published counterpart).

    with attnctl.apply(pipe, Relocation(layout)) as session:
        image = session(layout.prompt).images[0]        # through the session, not pipe(...)

Why: on the built-in models the position of an object is decided by the starting noise, not by where its words are
attended (BENCHMARKS.md, issue 28: a hard image→text mask at every step places no more objects than the plain model),
and an object forms from what the noise holds where it forms. So this method lets the model start as it would, reads
where each instance word is attended over the first `read_fraction` of the steps (the model's own signal: its
image→text attention, cross-attention on UNets, the image→text part of joint attention on MMDiTs), and at the end
of the last read step moves the latent cells of the window where each object is forming onto the centre of its box.
The cells the move vacates get the content the target cells held, so the latents are only permuted: their
distribution (and that of the noise they still hold) is unchanged. The rest of the run denoises the moved latents as
it would any others.

The window: at most `window` of the image on each side and at most the box (so an object's start is moved, not half
the image with the other objects' starts), placed where it holds the most of the object's instance words' attention
(summed over the sites and read steps, each site's map resized to the latent grid); objects are taken in order of
their peak and a window never overlaps an earlier object's. Only conditional rows are read; the move applies
to each image of the batch with its own windows.

Where a model's attention does not show where its objects form (the built-in MMDiT), `locator="contrast"` finds each
object instead where the denoiser's prediction for the prompt differs from its prediction for the prompt without
the object, at the latents after the read steps (`contrast_locator.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import build, check, option
from ..control import AttentionCall, Controller
from ..errors import UsageError
from ..layout import Layout, load_layout
from .contrast_locator import ContrastLocator, PredictionEdit, first_output
from .latent_guidance import initial_latents, moving_latents, require_call_parameters
from .noise_choice import choose_noise

log = logging.getLogger(__name__)


@dataclass
class RelocationConfig:
    """Every option of relocation (docs/methods.md)."""

    read_fraction: float = option(0.32, "let this first fraction of the steps run (the attention locator reads "
                                  "them), then find each object and move its window onto its box", low=0, high=1)

    window: float = option(0.4, "the side of the window moved, as a fraction of the image, at most its box's: the "
                           "object's window goes to the centre of its box (1 with fit='clip': the whole box)", low=0,
                           high=1)

    fit: str = option("whole", "an object whose box is narrower than the window: 'whole' leaves it where it forms "
                      "(cut to the box, its shape breaks), 'clip' moves the part of its window the box holds",
                      choices=("whole", "clip"))

    locator: str = option("attention", "where an object is forming: 'attention' (its instance words' attention "
                          "over the read steps) or 'contrast' (at the last read step, the denoiser's prediction for "
                          "the prompt against the prompt without the object: 1 + objects extra forwards)",
                          choices=("attention", "contrast"))

    restart: bool = option(False, "move the initial latents instead and start the run again from them (the read "
                           "steps run twice)")

    candidates: int = option(1, "starting noises tried per image before the run: the one whose objects all show "
                             "most after the read steps is kept (noise choice, docs/methods.md §10; 1: the run's "
                             "own)", low=1, high=64)

    compose: bool = option(False, "before the run, draw each object alone (its phrase as the prompt, from the same "
                           "noise, for the read steps) and, at the move, put the window where it formed into its "
                           "box: objects the prompt's run would lose start anyway (needs classifier-free guidance)")

    cli_prefix = "rl-"  # its flags: --rl-read-fraction, --rl-window, --rl-locator, --rl-restart, ...

    def __post_init__(self):
        check(self)
        if self.compose and self.restart:
            raise UsageError("relocation's compose puts each object's own start into the latents at the move, and "
                             "restart moves the initial noise instead of those latents: choose one (--no-rl-compose "
                             "or --no-rl-restart)")


class Relocation(Controller):
    """Relocation as a controller: `Relocation(layout, config=None, **options)` with the fields of
    `RelocationConfig`. Run the pipeline through the session (`session(prompt, ...)`): the move replaces the
    latents between two steps, through the pipeline's step-end callback. `moves` holds, per image of the last run,
    each object's window (top, left on the latent grid) and its box's; `choices`, with `candidates` > 1, each
    candidate noise's score and the one chosen (noise choice)."""

    name = "relocation"
    handles_key_mask = True  # it only reads `text_probs`, which give masked keys 0

    def __init__(self, layout, config: RelocationConfig | None = None, **options):
        self.layout: Layout = load_layout(layout)
        self.prompt = self.layout.prompt
        self.config = build(RelocationConfig, config, **options)
        self.moves: list[list[dict | None]] = []  # per image, per region: None where the object was not moved
        self.choices: list[dict] = []  # with candidates > 1, per image: each candidate's score and the chosen one

    def attach(self, session) -> None:
        """Binds the layout to each prompt's tokens (the instance words of each region); a UsageError without a
        prompt or without text cross-attention or joint attention."""
        if not session.prompts:
            raise UsageError("relocation needs the prompt: pass prompt=... to attnctl.apply")
        if not any(self.wants(s) for s in session.sites):
            raise UsageError(f"relocation reads text cross-attention or joint attention; this {session.family.name} "
                             "model has neither")
        bound = [self.layout.bind(tokens, "rules") for tokens in session.prompts]
        self._instances = [[r.instance for r in b.regions] for b in bound]
        self._spans = bound[0].spans
        self.session = session
        self._selectors: dict = {}
        self._prepared = self._restarting = self._choosing = self._composing = False
        self._warned_narrow = False
        self._prediction = PredictionEdit(session)

    def wants(self, site) -> bool:
        """The text cross-attention and joint attention sites."""
        return site.kind in ("cross", "joint")

    def begin_run(self) -> None:
        """Refuses a pipeline call made without the session; clears the maps."""
        if self._choosing or self._composing:  # a candidate noise's or an object's own run: nothing moved
            self._reading = False
            return
        if not self._prepared:
            raise UsageError("relocation moves the latents between denoising steps, which a plain pipeline call gives "
                             "it no way to do: call the pipeline through the session, `with attnctl.apply(pipe, "
                             "method) as session: session(prompt, ...)`, instead of `pipe(prompt, ...)`")
        self._prepared = False
        # the run after a restart reads nothing; the contrast locator reads no attention
        self._reading = not self._restarting and self.config.locator == "attention"
        self._restarting = False
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._located: torch.Tensor | None = None

    def _last_read_step(self, num_steps: int) -> int:
        return max(1, round(self.config.read_fraction * num_steps)) - 1

    def __call__(self, call: AttentionCall) -> None:
        step = call.step
        rows = step.cond_rows
        if not self._reading or rows.stop == rows.start or step.index > self._last_read_step(step.num_steps):
            return
        probs = call.text_probs()[rows].mean(dim=1)  # (images, image tokens, text tokens)
        prompts = tuple(min(step.prompt_of_row(r), len(self._instances) - 1) for r in range(probs.shape[0]))
        chosen = self._selector(prompts, probs.shape[-1], probs.device)
        maps = (probs @ chosen).transpose(1, 2).unflatten(-1, call.grid)  # (images, objects, h, w)
        grid = tuple(call.grid)
        self._maps[grid] = maps if grid not in self._maps else self._maps[grid] + maps

    def _selector(self, prompts: tuple[int, ...], n_text: int, device) -> torch.Tensor:
        """(images, text tokens, objects): 1 where a text token is one of the object's instance words; built once
        per (prompts, text length, device)."""
        key = (prompts, n_text, str(device))
        if key not in self._selectors:
            chosen = torch.zeros(len(prompts), n_text, len(self.layout.regions))
            for image, prompt in enumerate(prompts):
                for region, positions in enumerate(self._instances[prompt]):
                    chosen[image, [p for p in positions if p < n_text], region] = 1.0
            self._selectors[key] = chosen.to(device)
        return self._selectors[key]

    def prepare_call(self, session, args, kwargs) -> dict:
        """The call's arguments with a step-end callback that moves the latents at the end of the last read step,
        around the caller's own callback; with `restart`, the initial latents moved instead (after a first run of
        the read steps)."""
        restarts = self.config.restart or self.config.candidates > 1 or self.config.compose
        needed = ("latents", "callback_on_step_end") if restarts else ("callback_on_step_end",)
        require_call_parameters(session.pipe, self.name, needed)
        self._contrast = None
        if self.config.locator == "contrast":
            self._contrast = ContrastLocator(session, self, args, kwargs, self._spans)
        if self.config.candidates > 1:
            locator = self._contrast or ContrastLocator(session, self, args, kwargs, self._spans,
                                                        who="relocation's noise choice",
                                                        instead="leave --rl-candidates at 1")
            kwargs, self.choices = choose_noise(session, self, args, kwargs, locator, self.config.candidates,
                                                self.config.read_fraction)
        if self.config.restart:
            return self._restarted(session, args, kwargs)
        self._starts = self._objects_alone(session, args, kwargs) if self.config.compose else None
        if self._starts is not None:
            kwargs = {**kwargs, "latents": self._starts[2]}

        def move_after_reading(pipe, i, current):
            if i != self._last_read_step(len(pipe.scheduler.timesteps)):
                return None
            self._reading = False
            grid = latent_grid(current, self.session.step.token_grid)
            if self._contrast is not None and not self._moving(grid):  # its predictions would move nothing
                self.moves = [[None] * len(self.layout.regions) for _ in range(current.shape[0])]
                return None
            self._locate(current, i)
            moved = self.move(current) if self._maps or self._located is not None else None
            if self._starts is None or self._starts[0] is None:
                return moved
            return self._composed(moved if moved is not None else current)

        self._prepared = True
        return moving_latents(kwargs, move_after_reading)

    def _objects_alone(self, session, args, kwargs):
        """Runs the read steps of each object's phrase alone from the run's own initial latents; gives (their latents
        after the last read step, each one's map ‖conditional − unconditional prediction‖ there, the run's initial
        latents), object-major: row i·B + b is object i of image b; (None, None, initial latents) where no object
        would move (boxes narrower than the window)."""
        latents, _, _, step = initial_latents(session, args, kwargs)
        latents = latents / getattr(session.pipe.scheduler, "init_noise_sigma", 1.0)
        if not self._moving(latent_grid(latents, step.token_grid)):
            return None, None, latents
        images, count = latents.shape[0], len(self.layout.regions)
        call = {k: v for k, v in kwargs.items() if k not in ("prompt", "prompt_2", "prompt_3", "generator",
                                                              "num_images_per_prompt")}
        call.update({name: [value] * count for name, value in call.items()
                     if name.startswith("negative_prompt") and isinstance(value, str)})  # one per phrase
        call = {**call, "prompt": [r.phrase for r in self.layout.regions], "num_images_per_prompt": images,
                "latents": latents.repeat(count, *[1] * (latents.dim() - 1)), "output_type": "latent",
                "callback_on_step_end_tensor_inputs": ["latents"]}
        rest = args[1:] if args and "prompt" not in kwargs else args
        found = {}

        def stop(pipe, i, t, tensors):
            if i == self._last_read_step(len(pipe.scheduler.timesteps)):
                found["latents"] = tensors["latents"]
                raise _ReadDone
            return {}

        self._composing, self._prepared, self._alone_maps = True, True, None
        self._prediction.begin_run()
        try:
            with session.other_prompts():
                session.pipe(*rest, **{**call, "callback_on_step_end": stop})
        except _ReadDone:
            pass
        finally:
            self._composing = False
        if self._alone_maps is None:
            raise UsageError("relocation's compose reads each object's map from classifier-free guidance (the "
                             "prediction for its phrase against the unconditional one); this run has no "
                             "unconditional rows: set a guidance scale above 1 (--guidance), or leave compose off "
                             "(compose=False, --no-rl-compose)")
        return found["latents"], self._alone_maps, latents

    def _composed(self, latents: torch.Tensor) -> torch.Tensor:
        """`latents` (after the move) with each moved object's box window taken from its own run's latents, from
        the window where it formed there."""
        alone, maps, _ = self._starts
        h, w = self._grid
        packed = latents.dim() == 3
        cells = (latents if packed else latents.flatten(2).transpose(1, 2)).clone()
        own = alone if packed else alone.flatten(2).transpose(1, 2)
        images = cells.shape[0]
        regions = self.layout.regions
        for i in self._moving((h, w)):
            btop, bleft, bh, bw = centred_window(box_cells(regions[i].extent(), (h, w)), self.config.window, (h, w))
            for image in range(images):
                (top, left), = object_windows(maps[i * images + image][None], [(btop, bleft, bh, bw)])
                source = [(top + dy) * w + left + dx for dy in range(bh) for dx in range(bw)]
                target = [(btop + dy) * w + bleft + dx for dy in range(bh) for dx in range(bw)]
                cells[image, target] = own[i * images + image, source]
        return cells if packed else cells.transpose(1, 2).reshape(latents.shape)

    def _restarted(self, session, args, kwargs) -> dict:
        """Runs the read steps from the run's own initial latents, then returns the call's arguments with those
        latents moved: the run starts again from them and reads nothing."""
        latents = initial_latents(session, args, kwargs)[0] / getattr(session.pipe.scheduler, "init_noise_sigma", 1.0)

        def stop(pipe, i, t, tensors):
            if i == self._last_read_step(len(pipe.scheduler.timesteps)):
                self._locate(tensors["latents"], i)
                raise _ReadDone
            return {}

        self._prepared = True
        try:
            session.pipe(*args, **{**kwargs, "latents": latents, "callback_on_step_end": stop,
                                   "callback_on_step_end_tensor_inputs": ["latents"], "output_type": "latent"})
        except _ReadDone:
            pass
        moved = self.move(latents)
        self._prepared, self._restarting = True, True
        return {**kwargs, "latents": moved}

    def _locate(self, latents: torch.Tensor, index: int) -> None:
        """With the contrast locator, the objects' maps at the latents after step `index`."""
        if self._contrast is not None:
            self._located = self._contrast.maps(latents, index)

    def move(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents (images first) with each image's object windows moved onto their boxes."""
        self._grid = h, w = latent_grid(latents, self.session.step.token_grid)
        if self._located is not None:
            maps = self._located
        else:
            maps = sum(F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                       for m in self._maps.values())
        regions = self.layout.regions
        moving = self._moving((h, w))
        boxes = [centred_window(box_cells(regions[i].extent(), (h, w)), self.config.window, (h, w)) for i in moving]
        maps = maps[:, moving]
        packed = latents.dim() == 3  # (images, tokens, channels): one token per grid cell
        cells = latents if packed else latents.flatten(2).transpose(1, 2)  # (images, cells, channels)
        moved = cells.clone()
        self.moves = []
        for image in range(cells.shape[0]):
            sources = object_windows(maps[image], boxes)
            order = cell_permutation(sources, boxes, (h, w))
            moved[image] = cells[image, order.to(cells.device)]
            moved_objects = dict(zip(moving, zip(sources, boxes)))
            self.moves.append([{"window": moved_objects[i][0], "box": moved_objects[i][1][:2]} if i in moved_objects
                               else None for i in range(len(regions))])
        log.debug("relocation: %s", self.moves)
        return moved if packed else moved.transpose(1, 2).reshape(latents.shape)

    def end_call(self, step, args, kwargs, output):
        """In an object's own run (`compose`), at its last read step: each image's map ‖conditional − unconditional
        prediction‖ over channels, on the latent grid."""
        rows = step.cond_rows
        if not self._composing or step.index != self._last_read_step(step.num_steps) or rows.start == 0:
            return None
        out = first_output(output)
        own = self._prediction.own(args, kwargs, out)
        cond, uncond = own(out[rows]).float(), own(out[:rows.start]).float()  # CFG: the unconditional rows first
        if out.dim() == 3:  # packed: one token per cell of the denoiser's grid
            self._alone_maps = (cond - uncond).norm(dim=-1).unflatten(-1, tuple(step.token_grid))
        else:
            self._alone_maps = (cond - uncond).norm(dim=1)
        return None

    def _moving(self, grid: tuple[int, int]) -> list[int]:
        """The regions whose objects move on this latent grid: every one with fit='clip', else those whose box (a
        sketch's or mask's region: its bounding box) holds a whole window; a warning names the others, once."""
        regions = self.layout.regions
        moving = [i for i, r in enumerate(regions)
                  if self.config.fit == "clip" or holds_window(box_cells(r.extent(), grid), self.config.window, grid)]
        if len(moving) < len(regions) and not self._warned_narrow:
            self._warned_narrow = True
            narrow = ", ".join(repr(regions[i].phrase) for i in range(len(regions)) if i not in moving)
            log.warning("relocation: the boxes of %s are narrower than the window (%.2f of the image): those objects "
                        "are left where they form (fit='whole'); lower window (--rl-window) for smaller objects, or "
                        "fit='clip' moves the part of the window each box holds", narrow, self.config.window)
        return moving


class _ReadDone(Exception):
    """Ends the first run of a restart once its read steps are done."""


def latent_grid(sample: torch.Tensor, token_grid) -> tuple[int, int]:
    """The grid of cells a move permutes: a 4-D latent's (H, W), a packed latent's token grid."""
    if sample.dim() == 4:
        return tuple(sample.shape[-2:])
    if token_grid is None or token_grid[0] * token_grid[1] != sample.shape[1]:
        raise UsageError("relocation needs the latents as a grid: this pipeline's latents are neither (batch, "
                         "channels, height, width) nor one token per cell of the denoiser's grid")
    return tuple(token_grid)


def box_cells(box, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1 as fractions) as cells of the grid: (top, left, height, width), at least one cell."""
    h, w = grid
    x0, y0, x1, y1 = box
    top, left = min(h - 1, round(y0 * h)), min(w - 1, round(x0 * w))
    return top, left, max(1, min(h - top, round((y1 - y0) * h))), max(1, min(w - left, round((x1 - x0) * w)))


def window_cells(side: float, grid: tuple[int, int]) -> tuple[int, int]:
    """A window of `side` (a fraction of the grid) in cells: (height, width), at least one cell."""
    return max(1, round(side * grid[0])), max(1, round(side * grid[1]))


def holds_window(cells, side: float, grid: tuple[int, int]) -> bool:
    """Whether a box (top, left, height, width in cells) holds a whole window of `side`."""
    wh, ww = window_cells(side, grid)
    return cells[2] >= wh and cells[3] >= ww


def centred_window(cells, side: float, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window of at most `side` (a fraction of the grid) in each dimension at the centre of `cells` (top, left,
    height, width): the cells an object's window is moved onto."""
    top, left, bh, bw = cells
    wh, ww = window_cells(side, grid)
    wh, ww = min(bh, wh), min(bw, ww)
    return top + (bh - wh) // 2, left + (bw - ww) // 2, wh, ww


def object_windows(maps: torch.Tensor, boxes) -> list[tuple[int, int]]:
    """For each object (maps: objects × H × W), the (top, left) of the window of its target's size (`boxes`: top,
    left, height, width in cells) holding the most of its attention, objects in order of their peak, no window
    overlapping an earlier object's."""
    taken = torch.zeros(maps.shape[-2:], dtype=torch.bool)
    windows: list[tuple[int, int] | None] = [None] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda j: -float(maps[j].max())):
        _, _, bh, bw = boxes[i]
        mass = F.avg_pool2d(maps[i][None, None], (bh, bw), stride=1)[0, 0]
        clash = F.max_pool2d(taken[None, None].float(), (bh, bw), stride=1)[0, 0] > 0
        mass = mass.masked_fill(clash, float("-inf"))
        if torch.isinf(mass).all():  # no free window: the object stays where it is
            top, left = boxes[i][:2]
        else:
            top, left = divmod(int(mass.flatten().argmax()), mass.shape[1])
        windows[i] = (top, left)
        taken[top:top + bh, left:left + bw] = True
    return windows


def cell_permutation(sources, boxes, grid: tuple[int, int]) -> torch.Tensor:
    """`order` with new[cell] = old[order[cell]]: each box's cells take the cells of its object's window (same
    offsets); cells in no box keep their content where it was not taken, and the vacated cells take the content the
    boxes held, in order. A permutation of the cells."""
    h, w = grid
    order = torch.full((h * w,), -1, dtype=torch.long)
    used = torch.zeros(h * w, dtype=torch.bool)
    for (top, left), (btop, bleft, bh, bw) in zip(sources, boxes):
        for dy in range(bh):
            for dx in range(bw):
                target, source = (btop + dy) * w + bleft + dx, (top + dy) * w + left + dx
                if order[target] < 0 and not used[source]:
                    order[target] = source
                    used[source] = True
    free = order < 0
    keep = free & ~used
    order[keep] = torch.nonzero(keep).flatten()
    used |= keep
    order[order < 0] = torch.nonzero(~used).flatten()
    return order
