"""Attention Regulation (Zhang et al., ECCV 2024, arXiv 2403.06381) as an attnctl controller.

    with attnctl.apply(pipe, Regulation(targets=["cat", "dog"]), prompt=prompt):
        image = pipe(prompt).images[0]

At the chosen cross-attention layers and the first denoising steps, a smooth additive field (a sum of Gaussians on
the layer's grid) is added to the logits of the target tokens, found by 20 steps of gradient descent so that every
target gets a strongly attended region (its 90th-percentile probability near 0.9) and the targets share the
attention evenly; the field is smoothed over steps and decays with the step index. The algorithm, its defaults and
what decides exactness are in docs/methods.md §1; the arithmetic is in `regulation_math`.

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
import logging
import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from ..config import build, check, comma_list, option, step_indices, word_list
from ..control import AttentionCall, Controller, StepState
from ..errors import UsageError
from ..tokens import HeldWords
from . import regulation_compiled, regulation_math
from .targets import TARGETS_HELP, normalise_targets, targets_per_prompt

log = logging.getLogger(__name__)

DEFAULT_EDIT_STEPS = 25
IMPLEMENTATIONS = ("auto", "fast", "compiled", "direct")
SELECTIONS = ("batch", "image")


_DENORMAL = 1e-310  # a variable, so that the product below is computed when called, not folded when compiled


def _flushing_denormals() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (torch has a setter but no getter; its setter sets
    the thread's flags, which Python's own float arithmetic obeys too, so no tensor is made or read back)."""
    return _DENORMAL * 1.0 == 0.0


@contextlib.contextmanager
def _small_ops(device: torch.device):
    """CPU settings for the many small ops of the optimisation, restored afterwards. Both implementations run under
    them; measured here on a busy 2-core CPU, 8 rows × 256 pixels × 2 targets:
    - one intra-op thread: waking the thread pool for such tensors costs far more than the arithmetic (20
      iterations in ~30 ms on one thread, ~1 s on two);
    - denormals flushed to zero: target probabilities and gradients far below 1e-38 are common once the field has
      pushed a pixel's target logits down, and denormal arithmetic is slow on x86 (fast path 20 ms per call instead
      of 45-85 ms). Values that small change no loss, iterate or probability the tests can see.
    Both settings belong to the calling thread (OpenMP's thread count and the x86 MXCSR flags are per thread), so two
    pipelines regulated in two threads give the images each gives alone (tested); the one trace outside this thread
    is that a thread *started* while it runs inherits one intra-op thread."""
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


class _Columns:
    """The text positions one prompt's edit uses in a text sequence of a given length, as numbers and as index tensors
    on the device (made once, so that an edited call makes none from Python data): the targets, the other columns
    and the start and end-of-text positions whose probabilities are restored (`keep_index`; None: none restored)."""

    def __init__(self, targets: list[int], n_text: int, keep: tuple[int, ...], device):
        self.targets = targets
        index = lambda positions: torch.tensor(positions, dtype=torch.long, device=device)  # noqa: E731
        self.target_index = index(targets)
        self.other_index = index([i for i in range(n_text) if i not in set(targets)])
        self.keep_index = index(list(keep)) if keep else None


class _Group:
    """The conditional rows made from one prompt (a run of the batch) and the columns its edit uses."""

    def __init__(self, prompt: int, rows: slice, columns: _Columns):
        self.prompt, self.rows, self.columns = prompt, rows, columns


class _Uniform:
    """Uniform [0, 1) draws from a CPU generator (a seed gives the same initial weights on every device), handed out
    in order. `draw_ahead(n, device)` draws the next n at once onto the device, so that taking them later neither
    draws on the host nor copies: a CPU generator's uniform draws are one sequence whatever sizes they are drawn in
    (tested), so what is taken is what drawing each request alone gives."""

    def __init__(self, seed: int):
        self.seed, self.generator = seed, torch.Generator()
        self.restart()

    def restart(self) -> None:
        """Back to the seed's first draw, nothing drawn ahead."""
        self.generator.manual_seed(self.seed)
        self.taken = 0  # values handed out since the restart
        self._ahead, self._next = None, 0

    def draw_ahead(self, n: int, device) -> None:
        """Draws the next `n` values now, onto `device` (after what is left of an earlier draw ahead)."""
        rest = [] if self._ahead is None else [self._ahead[self._next:].to(device)]
        self._ahead, self._next = torch.cat(rest + [torch.rand(n, generator=self.generator).to(device)]), 0

    def take(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """The next values, in `shape`, on `device`."""
        n = math.prod(shape)
        self.taken += n
        left = 0 if self._ahead is None else self._ahead.numel() - self._next
        if n > left or self._ahead.device != torch.device(device):
            self.draw_ahead(max(0, n - left), device)
        self._next += n
        return self._ahead[self._next - n : self._next].view(shape)


@dataclass
class RegulationConfig:
    """Every option of Attention Regulation, with the paper's defaults (docs/methods.md §1).

        config = RegulationConfig(targets=["cat", "dog"], layers=("down_blocks.2",))
        Regulation(config=config)          # or Regulation(["cat", "dog"], layers=...): the same fields as keywords
    """

    targets: list | None = option(None, TARGETS_HELP, parse=comma_list, shown_default="the prompt's nouns")
    layers: tuple | None = option(
        None, "cross-attention layers to edit: stages such as down_blocks.2, site-name prefixes, or 'all'",
        parse=comma_list, shown_default="the coarsest cross-attention stages outside the mid block: SD 1.x/2.x "
        "down_blocks.2, up_blocks.1 (the paper's 16x16 layers at 512²), SDXL down_blocks.2, up_blocks.0")
    edit_steps: int | tuple | None = option(
        None, "edit the first N denoising steps (API: or a collection of step indices); more than the run has is an "
        "error", parse=int, shown_default=f"{DEFAULT_EDIT_STEPS}, or every step of a shorter run")
    iterations: int = option(20, "gradient-descent iterations per edited attention call", low=1, high=10_000)
    step_size: float = option(100.0, "gradient step per row (the reference's step is this × rows on the batch loss)",
                              symbol="η", low=0)
    gamma: float = option(1.0, "weight of the quantile term (q90(m) − 0.9)²", symbol="γ", low=0)
    delta: float = option(80.0, "weight of the equal-share term (mean(m) − θ/k)²", symbol="δ", low=0)
    epsilon: float = option(0.09, "weight of the mean(w²) term", symbol="ε", low=0)
    sigma: int | None = option(None, "width of the Gaussians in pixels of the layer's grid", parse=int,
                               symbol="σ", shown_default="max(1, W // 16) of each layer", low=1, high=1024)
    smoothing: float = option(0.25, "weight of the previous step's best field in the applied one", low=0, high=1)
    decay: float = option(0.99, "the applied field is scaled by decay**step", low=0, high=1)
    quantile: float = option(0.9, "which quantile of a target's map must be high (above 0)", low=0, high=1)
    quantile_target: float = option(0.9, "the value that quantile is pulled towards", low=0, high=1)
    share_per_target: float = option(0.2, "attention share per target: θ = min(1, share_per_target · k)", low=0,
                                     high=1)
    restore_special: bool = option(True, "reset the start (where the tokenizer has one: CLIP, not T5) and first "
                                   "end-of-text token probabilities to their unedited values")
    selection: str = option("batch", "keep the iterate with the lowest loss over the batch (the reference) or per "
                            "image", choices=SELECTIONS)
    implementation: str = option("auto", "fast (split softmax denominator, analytic gradient), compiled (the fast "
                                 "optimisation as one torch.compile region: few kernel launches, seconds to compile "
                                 "each new shape), direct (the formulas as written, autograd) or auto (compiled on "
                                 "CUDA, fast elsewhere)", choices=IMPLEMENTATIONS)
    strength: float = option(1.0, "scale of the applied field (an attnctl extension for dose-response studies: 1 is "
                             "the paper's method, 0 edits nothing)", low=0)
    seed: int = option(0, "seed of the random initial weights (uniform in [0, 1)), from the controller's own "
                       "generator", flag="init-seed", low=0, high=2**63 - 1)

    cli_prefix = ""  # its flags: --targets, --layers, ...

    def __post_init__(self):
        check(self)
        self.targets = normalise_targets(self.targets)
        self.layers = _normalise_layers(self.layers)
        self.edit_steps = _normalise_steps(self.edit_steps)
        self.iterations = int(self.iterations)
        self.sigma = None if self.sigma is None else int(self.sigma)
        self.seed = int(self.seed)
        if self.quantile == 0:
            raise UsageError("quantile (--quantile) must be above 0")

    def theta(self, k: int) -> float:
        """θ: the total attention share of k targets."""
        return min(1.0, self.share_per_target * k)


class Regulation(Controller):
    """Attention Regulation as a controller: `Regulation(targets, config=None, **options)`, where the options are
    the fields of `RegulationConfig` (defaults: the paper's).

        with attnctl.apply(pipe, Regulation(["cat", "dog"], edit_steps=10), prompt="a cat and a dog"):
            image = pipe("a cat and a dog", num_inference_steps=20).images[0]

    With `targets=None` the nouns of each prompt are chosen (`attnctl.nouns`) and logged. `history` records, per
    edited call, the chosen iterates and losses when `record_history` is set.
    """

    handles_key_mask = True  # it reads and edits probabilities with the model's key mask added

    def __init__(self, targets=None, config: RegulationConfig | None = None, **options):
        if targets is not None:
            options["targets"] = targets
        self.config = build(RegulationConfig, config, **options)
        c = self.config
        self.target_words: list[str] | None = (list(c.targets) if c.targets and isinstance(c.targets[0], str)
                                               else None)
        self.history: list[dict] = []  # per edited call: site, step, chosen iterate(s), losses (for inspection)
        self.record_history = False

    # --- Controller --------------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        """Picks the cross-attention sites to edit and each prompt's targets (refusing a model without cross sites, or
        no prompt), and seeds the generator of the initial weights."""
        cross = [s for s in session.sites if s.kind == "cross"]
        if not cross:
            raise UsageError("Attention Regulation edits text cross-attention (SD 1.x/2.x, SDXL, PixArt, Sana); this "
                             f"{session.family.name} model has no cross-attention sites")
        self._site_names = edited_sites(self.config, cross)
        self._sites = {s.name: s for s in cross if s.name in self._site_names}
        if not session.prompts:
            raise UsageError("Regulation needs the prompt: pass prompt=... to attnctl.apply")
        per_prompt = self._targets_per_prompt(session.prompts)
        self._positions = HeldWords(session.prompts, per_prompt)
        self._special = [tuple(p for p in (prompt.start_of_text, prompt.end_of_text) if p is not None)
                         for prompt in session.prompts]
        self._uniform = _Uniform(self.config.seed)
        self._basis: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._columns: dict[tuple, _Columns | None] = {}
        self._best: dict[tuple[str, int], torch.Tensor] = {}  # (site, prompt) -> kept weights of the last edited step
        self._editing = False
        self._warned_small: set[str] = set()
        self._compile_failed = False  # "auto" fell back to fast
        self._counting: tuple[set[str], int] | None = None  # (sites not yet edited in this step, values taken before)
        self._drawn_ahead = False

    def wants(self, site) -> bool:
        """The edited cross-attention sites (`edited_sites`)."""
        return site.name in self._site_names

    def begin_run(self) -> None:
        """Each pipeline call starts afresh: the same random initial weights as the first (a rerun gives the same
        image) and no best field of the last call."""
        self._uniform.restart()
        self._best.clear()
        self._counting = None
        self._drawn_ahead = False

    def begin_step(self, step: StepState) -> None:
        """Edits the denoiser call when its step is an edit step, it has conditional rows and `strength` is above 0.
        Where the person chose the layers or sigma and no chosen site can hold a basis, refused at the first edit
        step (the run would be the plain image)."""
        edit = self._edit_set(step.num_steps)
        if step.index == min(edit, default=-1) and (self.config.layers is not None or self.config.sigma is not None):
            self._refuse_nothing_to_edit(step)
        self._editing = (step.index in edit and step.cond_rows.stop > step.cond_rows.start
                         and self.config.strength > 0)
        if self._editing and not self._drawn_ahead:  # count what this step takes, to draw the later steps' at once
            self._counting = (set(self._site_names), self._uniform.taken)

    def __call__(self, call: AttentionCall) -> None:
        if not self._editing:
            return
        self._edit(call)
        if self._counting is not None:
            waiting, before = self._counting
            waiting.discard(call.site.name)
            if not waiting:  # every edited site has drawn in this step: draw what the later edit steps will take
                later = sum(1 for i in self._edit_set(call.step.num_steps) if i > call.step.index)
                self._uniform.draw_ahead(later * (self._uniform.taken - before), call.q.device)
                self._counting, self._drawn_ahead = None, True

    def _edit(self, call: AttentionCall) -> None:
        step = call.step
        q, k = call.q[:, :, call.image], call.k[:, :, call.text]
        h, w = call.grid
        device = q.device
        basis, sigma = self._basis_for(h, w, device)
        if basis.shape[1] == 0:
            if call.site.name not in self._warned_small:
                self._warned_small.add(call.site.name)
                warnings.warn(f"Regulation: {call.site.name} runs at {h}x{w}, too small for a Gaussian basis with "
                              f"sigma={sigma} (centres from {2 * sigma} every {2 * sigma} pixels); left unedited",
                              stacklevel=3)
            return
        out = call.output().clone()  # the plain attention; its rows outside the conditional half are kept
        with _small_ops(device):
            logits = (q.float() @ k.float().transpose(-1, -2)) * call.scale  # (batch, heads, N, L) float32
            if call.key_bias is not None:  # padding text tokens stay masked (PixArt's T5 mask)
                logits = logits + call.key_bias[..., call.text].float()
            heads = q.shape[1]
            groups = self._groups(step, logits.shape[-1], device)
            trajectories = []
            for g in groups:
                g_logits = logits[g.rows].flatten(0, 1)  # (images · heads, N, L), batch-major like the reference
                w0 = self._uniform.take((g_logits.shape[0], basis.shape[1], len(g.columns.targets)), device)
                trajectories.append((g_logits, w0, self._optimise(g_logits, g.columns, basis, w0)))
            chosen = self._choose([t for _, _, t in trajectories], heads)
            probs = torch.softmax(logits, dim=-1)
            for g, (g_logits, w0, traj), pick in zip(groups, trajectories, chosen):
                rows = torch.arange(traj.weights.shape[1], device=pick.device)
                best = traj.weights[pick, rows]  # (rows, K, k): the kept iterate's weights
                key = (call.site.name, g.prompt)
                previous = self._best.get(key)
                if previous is None or previous.shape != best.shape:
                    previous = w0  # first edited step: the initial random weights
                self._best[key] = best
                c = self.config
                # the field is linear in the weights: one field of the smoothed weights, scaled
                scale = c.decay**step.index * c.strength
                applied = regulation_math.field_of(
                    basis, torch.add(previous * (c.smoothing * scale), best, alpha=(1.0 - c.smoothing) * scale))
                keep = g.columns.keep_index
                edited = regulation_math.edited_probs(g_logits, g.columns.target_index, applied,
                                                      () if keep is None else keep, plain=probs[g.rows].flatten(0, 1))
                edited = edited.unflatten(0, (-1, heads))
                out[g.rows] = (edited @ call.v[g.rows][:, :, call.text].float()).to(out.dtype)
                probs[g.rows] = edited
                if self.record_history:
                    self.history.append({"site": call.site.name, "step": step.index, "prompt": g.prompt,
                                         "chosen": pick.cpu(), "row_losses": traj.row_losses.cpu()})
        call.set_output(out, text_probs=probs)

    # --- pieces -------------------------------------------------------------------------------------------------
    def _optimise(self, logits, columns: _Columns, basis, w0) -> regulation_math.Trajectory:
        implementation = resolved_implementation(self.config, logits.device)
        if implementation == "direct":
            return regulation_math.optimise_direct(logits, columns.target_index, basis, w0, self.config)
        if implementation == "compiled" and not self._compile_failed:
            try:
                return regulation_compiled.optimise_compiled(logits, columns.target_index, columns.other_index,
                                                             basis, w0, self.config)
            except torch._dynamo.exc.TorchDynamoException as e:  # no working compiler (inductor's, Triton's)
                if self.config.implementation == "compiled":
                    raise UsageError(f"Regulation's implementation='compiled' could not compile on {logits.device} "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use "
                                     "implementation='fast' (--implementation fast), the same optimisation "
                                     "eagerly") from e
                log.warning("Regulation: compiling the optimisation failed (%s); running the fast implementation "
                            "instead (the same numbers, more kernel launches)", type(e).__name__)
                self._compile_failed = True
        target_logits, rest = regulation_math.split_logits(logits, columns.target_index, columns.other_index)
        return regulation_math.optimise_fast(target_logits, rest, basis, w0, self.config)

    def _choose(self, trajectories: list[regulation_math.Trajectory], heads: int) -> list[torch.Tensor]:
        """Per group, the chosen iterate of each row (rows,). "batch": the iterate with the lowest mean loss over
        all conditional rows, the first one on ties (the reference keeps an iterate only if strictly better);
        "image": the same per image (its heads)."""
        if self.config.selection == "batch":
            total = torch.cat([t.row_losses for t in trajectories], dim=1).mean(dim=1)
            best = torch.argmin(total)
            return [best.expand(t.row_losses.shape[1]) for t in trajectories]
        picks = []
        for t in trajectories:
            per_image = t.row_losses.unflatten(1, (-1, heads)).mean(dim=2)  # (iterations, images)
            picks.append(torch.argmin(per_image, dim=0).repeat_interleave(heads))
        return picks

    def _groups(self, step: StepState, n_text: int, device) -> list[_Group]:
        cond = step.cond_rows
        by_prompt: dict[int, list[int]] = {}
        for r in range(cond.stop - cond.start):
            by_prompt.setdefault(min(step.prompt_of_row(r), len(self._special) - 1), []).append(cond.start + r)
        groups = []
        for prompt, rows in by_prompt.items():  # the prompt of a row never decreases: each prompt's rows are a run
            columns = self._columns_for(prompt, n_text, device)
            if columns is not None:
                groups.append(_Group(prompt, slice(rows[0], rows[-1] + 1), columns))
        return groups

    def _columns_for(self, prompt: int, n_text: int, device) -> _Columns | None:
        """The columns of `prompt`'s edit in a text sequence of `n_text` tokens on `device` (None: no target there),
        made at the first edited call that needs them and kept while attached."""
        key = (prompt, n_text, str(device))
        if key not in self._columns:
            targets = self._targets(prompt, n_text)
            keep = tuple(p for p in self._special[prompt] if p < n_text) if self.config.restore_special else ()
            self._columns[key] = _Columns(targets, n_text, keep, device) if targets else None
        return self._columns[key]

    def _targets(self, prompt: int, n_text: int) -> list[int]:
        """The target positions a text sequence of `n_text` tokens holds, each once; a target word the call's
        max_sequence_length cut is an error (`PromptTokens.held`)."""
        return list(dict.fromkeys(p for positions in self._positions(prompt, n_text) for p in positions))

    def _refuse_nothing_to_edit(self, step: StepState) -> None:
        """A UsageError where every edited site's grid at this step is too small for the Gaussian basis."""
        grids = {name: site.grid(step.token_grid) for name, site in self._sites.items()}
        if grids and all(self._basis_for(h, w, "cpu")[0].shape[1] == 0 for h, w in grids.values()):
            shown = ", ".join(f"{name} ({h}x{w})" for name, (h, w) in sorted(grids.items()))
            raise UsageError(f"Regulation would edit nothing in this run: every chosen site is too small for its "
                             f"Gaussian basis ({shown}); choose larger sites (--layers) or a smaller --sigma, or "
                             "generate a larger image (--height/--width)")

    def _basis_for(self, h: int, w: int, device):
        key = (h, w, str(device))
        if key not in self._basis:
            self._basis[key] = regulation_math.gaussian_basis(h, w, self.config.sigma, dtype=torch.float32,
                                                                  device=device)
        return self._basis[key]

    def _edit_set(self, num_steps: int) -> set[int]:
        edit_steps = self.config.edit_steps
        if edit_steps is None:
            return set(range(min(DEFAULT_EDIT_STEPS, num_steps)))
        if isinstance(edit_steps, int):
            if edit_steps > num_steps:
                raise UsageError(f"edit_steps={edit_steps} but the pipeline runs {num_steps} steps; edit at most "
                                 f"{num_steps} (the paper edits the first half: 25 of 50)")
            return set(range(edit_steps))
        beyond = sorted(s for s in edit_steps if s >= num_steps)
        if beyond:
            raise UsageError(f"edit steps {beyond} lie beyond the pipeline's {num_steps} steps (indices 0 to "
                             f"{num_steps - 1})")
        return set(edit_steps)

    def _targets_per_prompt(self, prompts) -> list[list[str]]:
        chosen = targets_per_prompt(self.config.targets, prompts, "Regulation")
        if self.target_words is None and len({tuple(c) for c in chosen}) == 1:
            self.target_words = list(chosen[0])
        return chosen


def resolved_implementation(config: RegulationConfig, device) -> str:
    """The implementation that runs: the config's, or for "auto" compiled on CUDA (where an eager loop of 20
    iterations is bound by kernel launches) and fast elsewhere (where compiling costs more than it saves)."""
    if config.implementation != "auto":
        return config.implementation
    return "compiled" if torch.device(device).type == "cuda" else "fast"


# --- input checks ------------------------------------------------------------------------------------------------

def _normalise_layers(layers) -> tuple[str, ...] | None:
    if layers is None:
        return None
    layers = tuple(word_list(layers, "layers (names of stages or sites, e.g. down_blocks.2)"))
    if not layers:
        raise UsageError("layers is empty: name at least one layer, e.g. down_blocks.2")
    return layers


def _normalise_steps(edit_steps):
    if edit_steps is None:
        return None
    if isinstance(edit_steps, bool):
        raise UsageError("edit_steps (--edit-steps) must be a number of steps or a collection of step indices")
    if isinstance(edit_steps, numbers.Real):  # `check` has made sure it is a whole number
        if edit_steps < 0:
            raise UsageError(f"edit_steps (--edit-steps) must be at least 0, not {edit_steps}")
        return int(edit_steps)
    return tuple(sorted(set(step_indices(edit_steps, "edit_steps (a number of steps or a collection of step "
                                                     "indices)"))))


def _matches(name: str, layer: str) -> bool:
    return layer == "all" or name == layer or name.startswith(layer + ".")


def edited_sites(config: RegulationConfig, sites) -> set[str]:
    """Names of the sites Regulation edits with `config` among a model's `sites`."""
    cross = [s for s in sites if s.kind == "cross"]
    return _select_sites(cross, config.layers or _coarsest_stages(cross))


def _coarsest_stages(cross_sites) -> tuple[str, ...]:
    """The default layers: the stages outside the mid block whose grid is the coarsest. The paper edits SD 1.x's
    16x16 stages at 512², which are these; on SDXL they are down_blocks.2 and up_blocks.0."""
    outer = [s for s in cross_sites if s.stage != "mid_block"] or list(cross_sites)
    coarsest = max(s.downsample for s in outer)
    stages = tuple(dict.fromkeys(s.stage for s in outer if s.downsample == coarsest))
    log.debug("Regulation layers: %s (the coarsest cross-attention stages)", ", ".join(stages))
    return stages


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
