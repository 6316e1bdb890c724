"""Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381) as an attnctl controller.

    with attnctl.apply(pipe, Regulation(targets=["cat", "dog"]), prompt=prompt):
        image = pipe(prompt).images[0]

At the chosen cross-attention layers and the first denoising steps, a smooth additive field (a sum of Gaussians on
the layer's grid) is added to the logits of the target tokens, found by 20 steps of gradient descent so that every
target gets a strongly attended region (its 90th-percentile probability near 0.9) and the targets share the
attention evenly; the field is smoothed over steps and decays with the step index. The algorithm, its defaults and
what decides exactness are in METHODS.md §1; the arithmetic is in `regulation_math`.

Where this implementation departs from the reference code, on purpose:
- the logits and the edited probabilities are float32 (the reference casts the edited logits to fp16), whatever the
  pipeline's dtype; the optimisation is float32 too;
- σ = max(1, W // 16) (the reference's W // 16 is 0, and it fails, on grids narrower than 16);
- without classifier-free guidance the whole batch is edited (the reference assumes a CFG batch and then edits half
  of the heads of the only half there is);
- `selection="image"` keeps the best iterate per image instead of by one loss over the batch (the default,
  `selection="batch"`, is the reference's);
- with `targets=None` the nouns of each prompt are chosen (`attnctl.nouns`): our extension, the reference needs them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable

import torch

from ..control import AttentionCall, Controller, StepState
from ..errors import UsageError
from . import regulation_math as rm

DEFAULT_LAYERS = ("down_blocks.2", "up_blocks.1")
DEFAULT_EDIT_STEPS = 25
IMPLEMENTATIONS = ("fast", "direct")
SELECTIONS = ("batch", "image")


def _flushing_denormals() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (torch has a setter but no getter)."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@contextlib.contextmanager
def _small_ops(device: torch.device):
    """CPU settings for the many small ops of the optimisation, restored afterwards. Both implementations run under
    them; measured here on a busy 2-core CPU, 8 rows × 256 pixels × 2 targets:
    - one intra-op thread: waking the thread pool for such tensors costs far more than the arithmetic (20
      iterations in ~30 ms on one thread, ~1 s on two);
    - denormals flushed to zero: target probabilities and gradients far below 1e-38 are common once the field has
      pushed a pixel's target logits down, and denormal arithmetic is slow on x86 (fast path 20 ms per call instead
      of 45-85 ms). Values that small change no loss, iterate or probability the tests can see."""
    if device.type != "cpu":
        yield
        return
    threads, flushing = torch.get_num_threads(), _flushing_denormals()
    if threads > 1:
        torch.set_num_threads(1)
    if not flushing:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
        if not flushing:
            torch.set_flush_denormal(False)


class _Group:
    """The conditional rows made from one prompt: their targets and end-of-text position."""

    def __init__(self, prompt: int, rows: list[int], targets: list[int], eos: int | None):
        self.prompt, self.rows, self.targets, self.eos = prompt, rows, targets, eos


class Regulation(Controller):
    """Attention Regulation. Defaults are the paper's; every constant of the method is a keyword.

    targets: words of the prompt (every sub-token of a word is a target; `dog#2` for a repeated word), one list for
        all prompts or one list per prompt; None chooses the nouns of each prompt (our extension) and prints them.
    layers: site names or name prefixes (`down_blocks.2` = all its cross-attention modules), or "all".
    edit_steps: edit the first `edit_steps` denoising steps, or an explicit collection of step indices. None (the
        default) is the paper's 25, or every step of a run with fewer (as the reference code does); an explicit
        value beyond the run's step count is an error.
    iterations, step_size, gamma, delta, epsilon: the gradient descent and the loss weights (20, 100, 1, 80, 0.09).
    sigma: width of the Gaussians in pixels of the layer's grid; None is max(1, W // 16).
    smoothing: weight of the previous step's best field (0.25); decay: the applied field is scaled by decay**step.
    quantile, quantile_target, share_per_target: the 0.9, 0.9 and 0.2 of the loss (θ = min(1, 0.2·k)).
    restore_special: reset the start and (first) end-of-text token probabilities to their unedited values.
    selection: "batch" keeps the iterate with the lowest loss over all rows (reference), "image" per image.
    implementation: "fast" (split softmax denominator, analytic gradient) or "direct" (the formulas as written).
    seed: seed of the random initial weights (uniform in [0, 1)), drawn from the controller's own generator.
    """

    def __init__(self, targets=None, layers=DEFAULT_LAYERS, edit_steps=None, *, iterations: int = 20,
                 step_size: float = 100.0, gamma: float = 1.0, delta: float = 80.0, epsilon: float = 0.09,
                 sigma: int | None = None, smoothing: float = 0.25, decay: float = 0.99, quantile: float = 0.9,
                 quantile_target: float = 0.9, share_per_target: float = 0.2, restore_special: bool = True,
                 selection: str = "batch", implementation: str = "fast", seed: int = 0, verbose: bool = True):
        self.targets = _normalise_targets(targets)
        self.layers = _normalise_layers(layers)
        self.edit_steps = _normalise_steps(edit_steps)
        if iterations < 1:
            raise UsageError(f"iterations must be at least 1 (got {iterations})")
        if sigma is not None and int(sigma) < 1:
            raise UsageError(f"sigma must be at least 1 pixel (got {sigma})")
        if not 0.0 <= smoothing <= 1.0:
            raise UsageError(f"smoothing must lie in [0, 1] (got {smoothing})")
        if not 0.0 < quantile <= 1.0:
            raise UsageError(f"quantile must lie in (0, 1] (got {quantile})")
        if selection not in SELECTIONS:
            raise UsageError(f"selection must be one of {', '.join(SELECTIONS)} (got {selection!r})")
        if implementation not in IMPLEMENTATIONS:
            raise UsageError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)} (got {implementation!r})")
        self.hp = rm.Hyperparameters(iterations=int(iterations), step_size=float(step_size), gamma=float(gamma),
                                     delta=float(delta), epsilon=float(epsilon), quantile=float(quantile),
                                     quantile_target=float(quantile_target),
                                     share_per_target=float(share_per_target))
        self.sigma = None if sigma is None else int(sigma)
        self.smoothing, self.decay = float(smoothing), float(decay)
        self.restore_special = restore_special
        self.selection, self.implementation = selection, implementation
        self.seed, self.verbose = seed, verbose
        self.target_words: list[str] | None = (list(self.targets) if self.targets and isinstance(self.targets[0], str)
                                               else None)
        self.history: list[dict] = []  # per edited call: site, step, chosen iterate(s), losses (for inspection)
        self.record_history = False

    # --- Controller --------------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        cross = [s for s in session.sites if s.kind == "cross"]
        if not cross:
            raise UsageError("Attention Regulation edits UNet cross-attention (SD 1.x/2.x, SDXL); this "
                             f"{session.family.name} model has no cross-attention sites")
        self._site_names = _select_sites(cross, self.layers)
        if not session.prompts:
            raise UsageError("Regulation needs the prompt: pass prompt=... to attnctl.apply")
        per_prompt = self._targets_per_prompt(session.prompts)
        self._positions, self._eos = [], []
        for prompt, words in zip(session.prompts, per_prompt):
            positions: list[int] = []
            for word in words:
                for p in prompt.word_positions(word):  # UsageError listing the prompt's tokens if absent
                    if p not in positions:
                        positions.append(p)
            self._positions.append(positions)
            self._eos.append(_end_of_text(prompt))
        self._generator = torch.Generator().manual_seed(self.seed)
        self._basis: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._best: dict[tuple[str, int], torch.Tensor] = {}  # (site, prompt) -> best field of the last edited step
        self._last_index: int | None = None
        self._editing = False
        self._warned_small: set[str] = set()

    def wants(self, site) -> bool:
        return site.name in self._site_names

    def begin_step(self, step: StepState) -> None:
        edit = self._edit_set(step.num_steps)
        if self._last_index is not None and step.index < self._last_index:
            self._best.clear()  # a new pipeline call inside the same `apply`
        self._last_index = step.index
        self._editing = step.index in edit and step.cond_rows.stop > step.cond_rows.start

    def __call__(self, call: AttentionCall) -> None:
        if not self._editing:
            return
        step = call.step
        q, k = call.q[:, :, call.image], call.k[:, :, call.text]
        h, w = call.grid
        device = q.device
        basis, sigma = self._basis_for(h, w, device)
        if basis.shape[1] == 0:
            if call.site.name not in self._warned_small:
                self._warned_small.add(call.site.name)
                warnings.warn(f"Regulation: {call.site.name} runs at {h}x{w}, too small for a Gaussian basis with "
                              f"sigma={sigma} (centres from {2 * sigma} every {2 * sigma} pixels); left unedited")
            return
        out = call.output().clone()  # the plain attention; its rows outside the conditional half are kept
        with _small_ops(device):
            logits = (q.float() @ k.float().transpose(-1, -2)) * call.scale  # (batch, heads, N, L) float32
            heads = q.shape[1]
            groups = self._groups(step, logits.shape[-1])
            trajectories = []
            for g in groups:
                g_logits = logits[g.rows].flatten(0, 1)  # (images · heads, N, L), batch-major like the reference
                w0 = torch.rand((g_logits.shape[0], basis.shape[1], len(g.targets)), generator=self._generator)
                w0 = w0.to(device)
                trajectories.append((g_logits, w0, self._optimise(g_logits, g.targets, basis, w0)))
            chosen = self._choose([t for _, _, t in trajectories], heads)
            probs = torch.softmax(logits, dim=-1)
            for g, (g_logits, w0, traj), pick in zip(groups, trajectories, chosen):
                rows = torch.arange(traj.weights.shape[1], device=pick.device)
                best = rm.field_of(basis, traj.weights[pick, rows])  # (rows, N, k)
                key = (call.site.name, g.prompt)
                previous = self._best.get(key)
                if previous is None or previous.shape != best.shape:
                    previous = rm.field_of(basis, w0)  # first edited step: the initial random field
                self._best[key] = best
                applied = (self.smoothing * previous + (1.0 - self.smoothing) * best) * self.decay**step.index
                keep = (0, g.eos) if self.restore_special else ()
                targets = torch.tensor(g.targets, device=device)
                edited = rm.edited_probs(g_logits, targets, applied, keep).unflatten(0, (len(g.rows), heads))
                v = call.v[g.rows][:, :, call.text]
                out[g.rows] = (edited @ v.float()).to(out.dtype)
                probs[g.rows] = edited
                if self.record_history:
                    self.history.append({"site": call.site.name, "step": step.index, "prompt": g.prompt,
                                         "chosen": pick.cpu(), "row_losses": traj.row_losses.cpu()})
        call.set_output(out, text_probs=probs)

    # --- pieces -------------------------------------------------------------------------------------------------
    def _optimise(self, logits, targets, basis, w0) -> rm.Trajectory:
        if self.implementation == "direct":
            return rm.optimise_direct(logits, torch.tensor(targets, device=logits.device), basis, w0, self.hp)
        target_logits, rest = rm.split_logits(logits, targets)
        return rm.optimise_fast(target_logits, rest, basis, w0, self.hp)

    def _choose(self, trajectories: list[rm.Trajectory], heads: int) -> list[torch.Tensor]:
        """Per group, the chosen iterate of each row (rows,). "batch": the iterate with the lowest mean loss over
        all conditional rows, the first one on ties (the reference keeps an iterate only if strictly better);
        "image": the same per image (its heads)."""
        if self.selection == "batch":
            total = torch.cat([t.row_losses for t in trajectories], dim=1).mean(dim=1)
            best = torch.argmin(total)
            return [best.expand(t.row_losses.shape[1]) for t in trajectories]
        picks = []
        for t in trajectories:
            per_image = t.row_losses.unflatten(1, (-1, heads)).mean(dim=2)  # (iterations, images)
            picks.append(torch.argmin(per_image, dim=0).repeat_interleave(heads))
        return picks

    def _groups(self, step: StepState, n_text: int) -> list[_Group]:
        cond = step.cond_rows
        by_prompt: dict[int, list[int]] = {}
        for r in range(cond.stop - cond.start):
            by_prompt.setdefault(min(step.prompt_of_row(r), len(self._positions) - 1), []).append(cond.start + r)
        groups = []
        for prompt, rows in by_prompt.items():
            targets = [p for p in self._positions[prompt] if p < n_text]
            eos = self._eos[prompt]
            if targets:
                groups.append(_Group(prompt, rows, targets, eos if eos is not None and eos < n_text else None))
        return groups

    def _basis_for(self, h: int, w: int, device):
        key = (h, w, str(device))
        if key not in self._basis:
            self._basis[key] = rm.gaussian_basis(h, w, self.sigma, dtype=torch.float32, device=device)
        return self._basis[key]

    def _edit_set(self, num_steps: int) -> set[int]:
        if self.edit_steps is None:
            return set(range(min(DEFAULT_EDIT_STEPS, num_steps)))
        if isinstance(self.edit_steps, int):
            if self.edit_steps > num_steps:
                raise UsageError(f"edit_steps={self.edit_steps} but the pipeline runs {num_steps} steps; edit at most "
                                 f"{num_steps} (the paper edits the first half: 25 of 50)")
            return set(range(self.edit_steps))
        beyond = sorted(s for s in self.edit_steps if s >= num_steps)
        if beyond:
            raise UsageError(f"edit steps {beyond} lie beyond the pipeline's {num_steps} steps (indices 0 to "
                             f"{num_steps - 1})")
        return set(self.edit_steps)

    def _targets_per_prompt(self, prompts) -> list[list[str]]:
        if self.targets is None:
            from ..nouns import choose_nouns, tagger_name

            chosen = [choose_nouns(p.prompt) for p in prompts]
            for p, words in zip(prompts, chosen):
                if not words:
                    raise UsageError(f"no nouns found in the prompt {p.prompt!r}; name the targets "
                                     "(targets=[...] or --targets w1,w2)")
            if self.verbose:
                for p, words in zip(prompts, chosen):
                    print(f"attnctl: Regulation targets for {p.prompt!r}: {', '.join(words)} (nouns chosen by the "
                          f"{tagger_name()} tagger: an attnctl extension, the paper's method is given targets)",
                          file=sys.stderr)
            if self.target_words is None and len({tuple(c) for c in chosen}) == 1:
                self.target_words = list(chosen[0])
            return chosen
        if isinstance(self.targets[0], str):
            return [list(self.targets)] * len(prompts)
        if len(self.targets) != len(prompts):
            raise UsageError(f"targets were given for {len(self.targets)} prompts but the batch has "
                             f"{len(prompts)} prompts; give one list for all prompts or one per prompt")
        return [list(t) for t in self.targets]


# --- input checks ------------------------------------------------------------------------------------------------

def _normalise_targets(targets):
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if not targets:
        raise UsageError("targets is empty: name at least one word of the prompt, or pass targets=None to choose "
                         "the prompt's nouns")
    if all(isinstance(t, str) for t in targets):
        return [t.strip() for t in targets]
    if all(isinstance(t, (list, tuple)) and t and all(isinstance(x, str) for x in t) for t in targets):
        return [[x.strip() for x in t] for t in targets]
    raise UsageError("targets must be a list of words (for every prompt) or one non-empty list of words per prompt")


def _normalise_layers(layers) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    layers = tuple(layers)
    if not layers:
        raise UsageError("layers is empty: name at least one layer, e.g. down_blocks.2")
    return layers


def _normalise_steps(edit_steps):
    if edit_steps is None:
        return None
    if isinstance(edit_steps, bool):
        raise UsageError("edit_steps must be a number of steps or a collection of step indices")
    if isinstance(edit_steps, int):
        if edit_steps < 0:
            raise UsageError(f"edit_steps must be >= 0 (got {edit_steps})")
        return edit_steps
    if isinstance(edit_steps, Iterable):
        steps = sorted({int(s) for s in edit_steps})
        if any(s < 0 for s in steps):
            raise UsageError(f"edit step indices must be >= 0 (got {steps})")
        return tuple(steps)
    raise UsageError(f"edit_steps must be a number of steps or a collection of step indices (got {edit_steps!r})")


def _matches(name: str, layer: str) -> bool:
    return layer == "all" or name == layer or name.startswith(layer + ".")


def _select_sites(cross_sites, layers) -> set[str]:
    chosen: set[str] = set()
    for layer in layers:
        hits = {s.name for s in cross_sites if _matches(s.name, layer)}
        if not hits:
            stages = list(dict.fromkeys(s.stage for s in cross_sites))
            raise UsageError(
                f"layer {layer!r} does not exist in this model. Valid layers: {', '.join(stages)} (all cross-attention "
                f"modules of a stage), 'all', or a prefix of a site name such as {cross_sites[0].name!r}; "
                "`attnctl sites --model ...` lists every site"
            )
        chosen |= hits
    return chosen


def _end_of_text(prompt) -> int | None:
    """Position of the first end-of-text token of the prompt in the attention's text sequence."""
    segment = prompt.segments[0]
    tokenizer = segment.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return None
    ids = list(tokenizer(prompt.prompt, truncation=True, max_length=segment.length)["input_ids"])
    return segment.offset + ids.index(eos) if eos in ids else None


# --- command line ----------------------------------------------------------------------------------------------

def add_cli_arguments(parser) -> None:
    """The method's flags for `attnctl generate --method regulation` (defaults: the paper's)."""
    parser.add_argument("--targets", default=None,
                        help="comma-separated words of the prompt to regulate (word#2 for a repeat); default: the "
                             "prompt's nouns, chosen by a tagger (an attnctl extension) and printed")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                        help="comma-separated layers (stages such as down_blocks.2, site-name prefixes, or 'all'); "
                             "default: %(default)s")
    parser.add_argument("--edit-steps", type=int, default=None,
                        help=f"edit the first N steps (default: {DEFAULT_EDIT_STEPS}, or all steps of shorter runs)")
    parser.add_argument("--iterations", type=int, default=20, help="gradient steps per edit (default: %(default)s)")
    parser.add_argument("--step-size", type=float, default=100.0,
                        help="gradient step per row (×rows on the batch loss; default: %(default)s)")
    parser.add_argument("--gamma", type=float, default=1.0, help="weight of the 90th-percentile term (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=80.0, help="weight of the equal-share term (default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=0.09, help="weight of the mean(w²) term (default: %(default)s)")
    parser.add_argument("--sigma", type=int, default=None,
                        help="Gaussian width in grid pixels (default: max(1, W//16) of each layer)")
    parser.add_argument("--smoothing", type=float, default=0.25,
                        help="weight of the previous step's field (default: %(default)s)")
    parser.add_argument("--decay", type=float, default=0.99, help="field scaled by decay**step (default: %(default)s)")
    parser.add_argument("--selection", choices=SELECTIONS, default="batch",
                        help="best iterate by one loss over the batch (reference) or per image (default: %(default)s)")
    parser.add_argument("--implementation", choices=IMPLEMENTATIONS, default="fast",
                        help="fast (split softmax, analytic gradient) or direct (the formulas as written)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the random initial weights (default: 0)")


def controller_from_args(args, prompt) -> Regulation:
    """A Regulation from parsed flags; without --targets the prompt's nouns are chosen and printed."""
    targets = getattr(args, "targets", None)
    words = [w.strip() for w in targets.split(",") if w.strip()] if targets else None
    if words is None:
        from ..nouns import choose_nouns, tagger_name

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        chosen = [choose_nouns(p) for p in prompts]
        for p, c in zip(prompts, chosen):
            if not c:
                raise UsageError(f"no nouns found in the prompt {p!r}; pass --targets w1,w2")
            print(f"attnctl: regulating the nouns of {p!r}: {', '.join(c)} (chosen by the {tagger_name()} tagger; "
                  "an attnctl extension, the paper's method is given targets; set them with --targets)")
        words = chosen[0] if len(chosen) == 1 else chosen
    return Regulation(
        targets=words, layers=args.layers, edit_steps=args.edit_steps, iterations=args.iterations,
        step_size=args.step_size, gamma=args.gamma, delta=args.delta, epsilon=args.epsilon, sigma=args.sigma,
        smoothing=args.smoothing, decay=args.decay, selection=args.selection, implementation=args.implementation,
        seed=args.init_seed,
    )
