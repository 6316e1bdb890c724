"""Attaching controllers to a pipeline, and what they see at each attention call.

    with attnctl.apply(pipe, Capture(words=["cat", "dog"]), prompt=prompt) as session:
        image = pipe(prompt).images[0]

On entry the processors of the sites the controllers want are replaced by the family's processors, which compute
q, k, v exactly as the originals do and hand them to the session; a diffusers `ModelHook` on the denoiser reads the
step (from the scheduler) and the batch layout before every denoiser call, and hands the call's output to the
controllers after it (a method that guides the prediction replaces it there). On exit, also after an exception, the
original processor objects are put back and the hook is removed, leaving the pipeline as it was. A processor the user
set while attached is an error at the next denoiser call and is left in place on exit (with a logged warning). A
`torch.compile` wrapper is seen through; the hook and the controllers run eagerly inside the compiled model.

Methods that move the latents (Attend-and-Excite) are run through the session, `session(prompt, ...)`: the pipeline
call with what each controller adds to its arguments (`Controller.prepare_call`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils.torch_utils import unwrap_module

from .attention import attention, attention_with_lse, chunked_lse, default_scale, key_probs, rows_lse
from .errors import UsageError
from .families import Family, family_of, refuse_without_sites
from .sites import AttentionSite, downsampled
from .tokens import PromptTokens

HOOK_NAME = "attnctl.step"
log = logging.getLogger(__name__)


@dataclass
class StepState:
    """Where the denoising loop is, and how the batch is laid out, for the current denoiser call.

        def begin_step(self, step):                  # in a Controller
            self.active = step.index < 10 and step.cond_rows.stop > step.cond_rows.start
    """

    index: int  # step index, 0-based, as the scheduler counts it
    num_steps: int
    timestep: float  # the scheduler's timestep of this step, on the 0..1000 scale (`Family.timestep_scale`)
    batch_size: int
    cond_rows: slice  # rows conditioned on the prompt (CFG: the second half; none in an uncond or guidance pass)
    token_grid: tuple[int, int]  # the denoiser's image token grid (latent grid after patchify)
    text_len: int | None  # joint models: number of text tokens in the sequence
    images_per_prompt: int = 1

    def prompt_of_row(self, row: int) -> int:
        """Index of the prompt that conditional row `row` (0-based within the conditional rows) was made from."""
        return row // self.images_per_prompt


class AttentionCall:
    """One attention call at one site: the projected q, k, v (batch, heads, tokens, head_dim) and the layout.

    A method either leaves the output alone or sets it (`set_output`); observers read `text_probs()`, which give the
    probabilities actually used, whichever method produced them.

        def __call__(self, call):                      # in a Controller
            q, k = call.q[:, :, call.image], call.k[:, :, call.text]
            call.set_output(call.output() * 1.0)       # a method may replace the output
    """

    def __init__(self, site, step, q, k, v, text, image, grid, scale=None, key_bias=None, model_mask=None, own=None):
        self.site: AttentionSite = site
        self.step: StepState = step
        self.q, self.k, self.v = q, k, v
        self.text: slice = text  # key positions of the text tokens
        self.image: slice = image  # query (and, for joint sites, key) positions of the image tokens
        self.grid: tuple[int, int] = grid
        self.scale = default_scale(q) if scale is None else scale
        # the model's key mask (padding text tokens), additive, (batch, heads or 1, 1, keys); None: no mask
        self.key_bias: torch.Tensor | None = key_bias
        # where the model's mask is per query (Chroma): (that mask, the image rows' part of it); the unmodified
        # output uses the mask as the model does
        self.model_mask: tuple[torch.Tensor, torch.Tensor] | None = model_mask
        # where the model computes the image's rows as one attention of the image's queries alone over every key
        # (with its mask) and the other rows apart (Qwen-Image 2.1: its text, causally per segment at the prefill,
        # not at all at cached steps): a function giving the model's output for every row from the image rows'
        # (None: it computes them, as the model does)
        self._own = own
        self._out = None
        self._lse = None
        # with `own` and no key mask: the image rows' output and LSE from one fused pass over their queries alone
        self._image_out = None
        self._image_lse = None
        self._text_probs = None
        self.modified = False

    def output(self) -> torch.Tensor:
        """The attention output (batch, heads, queries, head_dim): the one a method set, else the unmodified
        attention with the model's mask, computed once on first use."""
        if self._out is None:
            if self._own is not None:
                self._out, self._image_out = self._own(self._image_out), None
            else:
                mask = self.key_bias if self.model_mask is None else self.model_mask[0]
                self._out = attention(self.q, self.k, self.v, mask=mask, scale=self.scale)
        return self._out

    def lse(self) -> torch.Tensor:
        """Row log-sum-exp of the unmodified logits (with the key mask), float32 (batch, heads, queries)."""
        if self._lse is None:
            if self.key_bias is not None:
                self._lse = chunked_lse(self.q, self.k, self.scale, self.key_bias)
            elif self._own is not None:  # the image's rows from the pass that gives their output; the others apart
                image, parts = self.image, []
                for rows in (slice(0, image.start), image, slice(image.stop, self.q.shape[2])):
                    if rows is image:
                        parts.append(self._own_image_lse())
                    elif rows.stop > rows.start:
                        parts.append(rows_lse(self.q[:, :, rows], self.k, self.v, self.scale))
                self._lse = torch.cat(parts, dim=-1)
            else:
                out, self._lse = attention_with_lse(self.q, self.k, self.v, scale=self.scale)
                if self._out is None:
                    self._out = out
        return self._lse

    def _own_image_lse(self) -> torch.Tensor:
        """With `own` and no key mask: the image rows' LSE from one fused pass over their queries alone, the
        attention the model computes for them; its output is kept for `output()`, which then computes none."""
        if self._image_lse is None:
            out, self._image_lse = attention_with_lse(self.q[:, :, self.image], self.k, self.v, scale=self.scale)
            if self._out is None:
                self._image_out = out
        return self._image_lse

    def _image_rows_lse(self) -> torch.Tensor:
        """`lse()` of the image's rows (batch, heads, image tokens); with `own` and no key mask, from their pass
        alone."""
        if self._lse is None and self._own is not None and self.key_bias is None:
            return self._own_image_lse()
        return self.lse()[:, :, self.image]

    def text_probs(self) -> torch.Tensor:
        """Image-query → text-key probabilities in use, float32 (batch, heads, image tokens, text tokens); masked
        keys have 0."""
        if self._text_probs is None:
            lse = self._image_rows_lse()
            bias = None if self.key_bias is None else self.key_bias[..., self.text]
            self._text_probs = key_probs(self.q[:, :, self.image], self.k[:, :, self.text], lse, self.scale, bias)
        return self._text_probs

    def kept_text_probs(self, rows: slice, columns: torch.Tensor) -> torch.Tensor:
        """`text_probs()[rows][..., columns]` (float32, (rows, heads, image tokens, columns)) computed for just those
        rows and text positions (`columns`, a device index tensor into the text tokens): exp(q·k·scale − lse) with
        the rows' full log-sum-exp, so the normaliser still runs over every key.

        Probabilities a method set (or an earlier reader computed) are read, not recomputed. The LSE is this call's
        own where it is known or comes with the output the call needs anyway (no key mask, no output yet: one fused
        pass of the kernel plain SDPA uses); else that of the kept rows' image queries alone (`rows_lse`)."""
        if self._text_probs is not None:
            return self._text_probs[rows].index_select(-1, columns)
        q = self.q[rows][:, :, self.image]
        k = self.k[rows][:, :, self.text].index_select(2, columns)
        bias = self.key_bias
        if bias is not None:
            bias = bias[rows] if bias.shape[0] > 1 else bias
        if self._lse is not None or self._image_lse is not None or (bias is None and self._out is None):
            lse = self._image_rows_lse()[rows]
        else:
            lse = rows_lse(q, self.k[rows], self.v[rows], self.scale, bias)
        kept_bias = None if bias is None else bias[..., self.text].index_select(-1, columns)
        return key_probs(q, k, lse, self.scale, kept_bias)

    def set_output(self, out: torch.Tensor, text_probs: torch.Tensor | None = None) -> None:
        """Replace the attention output; `text_probs` are the image→text probabilities that produced it. Under a
        per-query mask, text rows whose own mask differs from the image rows' (Chroma's padding text queries) keep
        the model's attention: methods work with the keys the image rows see."""
        if self.model_mask is not None:
            mask, image_keys = self.model_mask
            rows = mask[:, :, self.text]
            differs = (rows != image_keys).any(dim=-1, keepdim=True)
            own = attention(self.q[:, :, self.text], self.k, self.v, mask=rows, scale=self.scale)
            out = out.clone()
            out[:, :, self.text] = torch.where(differs, own.to(out.dtype), out[:, :, self.text])
        self._out, self._text_probs, self.modified = out, text_probs, True
        self._lse = self._image_lse = self._image_out = None


class Controller:
    """Base of every method and observer. Subclasses override what they need.

        class Strongest(attnctl.Controller):           # an observer: the most attended token per call
            observer = True
            def __call__(self, call):
                self.last = call.text_probs().mean(dim=(0, 1, 2)).argmax()
    """

    observer = False  # observers run after the methods and never change the output
    # whether it honours `AttentionCall.key_bias` (a model's text padding mask); calls with a mask are left plain,
    # with a warning, when a controller at the site does not
    handles_key_mask = False

    def attach(self, session: Session) -> None:
        """Validate inputs against the pipeline (sites, prompts) and prepare; raise UsageError on bad input. Called
        again, before any step of a pipeline call, where that call places the prompts' tokens elsewhere than
        `session.prompts` did (Sana's instruction, a call argument): the prompts are then laid out anew."""

    def wants(self, site: AttentionSite) -> bool:
        """Whether the controller runs at `site` (a site's processor is replaced only where some controller wants
        it); every site by default."""
        return True

    def begin_run(self) -> None:
        """Called at the start of each pipeline call (before the `begin_step` of its first denoiser call)."""

    def begin_step(self, step: StepState) -> None:
        """Called before every denoiser call."""

    def __call__(self, call: AttentionCall) -> None:
        """Inspect or modify one attention call."""

    def prepare_call(self, session: Session, args: tuple, kwargs: dict) -> dict:
        """The pipeline's keyword arguments for a run through `session(...)`, with what this controller adds (a
        method that moves the latents adds its step callback and initial latents)."""
        return kwargs

    def exclusive_call(self, call: AttentionCall) -> None:
        """An attention call of a denoiser forward this controller runs itself (`Session.exclusive`)."""

    def end_call(self, step: StepState, args: tuple, kwargs: dict, output):
        """Called after every denoiser call of a run with the call's arguments and output (as the denoiser returned
        it); a method that changes the prediction returns the output to use instead (None: unchanged)."""
        return None

    def detach(self) -> None:
        """Called when the session ends."""


class _FirstCall(Exception):
    """Stops a probing run at its first denoiser call, carrying that call's inputs."""

    def __init__(self, args, kwargs):
        super().__init__("first denoiser call")
        self.args, self.kwargs = args, kwargs


class _Hooked:
    """A diffusers hook registered on a module, removable so that the module is as it was: no hook registry and no
    instance `forward` where it had none."""

    def __init__(self, module, hook: ModelHook, name: str):
        self.module, self.name = module, name
        self.had_registry = hasattr(module, "_diffusers_hook")
        self.had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)

    def remove(self) -> None:
        registry = self.module._diffusers_hook
        registry.remove_hook(self.name, recurse=False)
        if not self.had_registry and not registry.hooks:
            del self.module._diffusers_hook
        if not self.had_forward:
            self.module.__dict__.pop("forward", None)


class _TextHook(ModelHook):
    """Keeps the arguments of the text encoder's calls of each pipeline call, which the family's check is given at
    the run's first denoiser call (`judge`): the prompt's encoding, where the pipeline made one. The check raises
    on an encoding it refuses, and may answer with how the call lays the prompts out (`Family.encoder_check`)."""

    def __init__(self, check):
        super().__init__()
        self.check, self.armed, self.calls = check, True, []

    def pre_forward(self, module, *args, **kwargs):
        if self.armed:  # the first encoder call after a denoiser call: a new pipeline call
            self.armed, self.calls = False, []
        self.calls.append((args, kwargs))
        return args, kwargs

    def judge(self, pipe, family: Family, args, kwargs):
        """Check the prompt's encoding: the first call, unless the only call was the negative prompt's (prompt
        embeddings given under guidance: `Family.lone_encoding_is_prompts`, given the run's first denoiser call's
        `args` and `kwargs`). The check's answer (None where it has none)."""
        calls, self.calls = self.calls, []
        if not calls or (len(calls) == 1 and not family.lone_encoding_is_prompts(pipe, calls[0], args, kwargs)):
            return None
        return self.check(*calls[0])


class _ContextState(BaseState):
    def reset(self, *args, **kwargs):
        pass


class _StepHook(ModelHook):
    """Reads the step and batch layout before each denoiser call. Stateful so that diffusers tells it the cache
    context ("cond"/"uncond") that pipelines with separate guidance passes (FLUX true CFG) set."""

    _is_stateful = True

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.contexts = StateManager(_ContextState)

    @torch.compiler.disable  # under torch.compile, the per-step Python state must not become guards (recompiles)
    def pre_forward(self, module, *args, **kwargs):
        session = self.session
        for text_hook in session._text_hooks:
            text_hook.armed = True  # the next text encoding belongs to the next pipeline call
        if session._probing:
            raise _FirstCall(args, kwargs)
        if session._exclusive is not None:
            if not session._exclusive_grid_given:
                session._exclusive_grid = session.family.token_grid(session.denoiser, args, kwargs)
            return args, kwargs
        context = self.contexts._context
        session._begin_call(args, kwargs, context.name if context is not None else None)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        session = self.session
        if session._exclusive is not None or session._call is None:
            return output
        args, kwargs = session._call
        session._call = None
        for c in session.controllers:
            changed = c.end_call(session.step, args, kwargs, output)
            if changed is not None:
                output = changed
        return output

    def reset_state(self, module):
        self.contexts.reset()
        return module


def denoiser_of(pipe) -> tuple[torch.nn.Module, Family]:
    """The pipeline's denoiser (seen through a torch.compile wrapper: its sites are those of the module it wraps) and
    its family adapter; a UsageError for a pipeline attnctl does not support."""
    denoiser = next((d for d in (getattr(pipe, n, None) for n in ("unet", "transformer")) if d is not None), None)
    if denoiser is None:
        raise UsageError("the pipeline has neither a `unet` nor a `transformer`; attnctl needs a diffusers "
                         "text-to-image pipeline (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1)")
    denoiser = unwrap_module(denoiser)
    return denoiser, family_of(denoiser)


@dataclass
class Session:
    """The controllers attached to one pipeline (what `apply` yields): its family adapter, its attention sites, the
    prompts' tokens.

        with attnctl.apply(pipe, capture, prompt="a cat") as session:
            print(len(session.sites), session.prompts[0].word_positions("cat"))
    """

    pipe: object
    controllers: list[Controller]
    prompts: list[PromptTokens] = field(default_factory=list)

    def __post_init__(self):
        self.denoiser, self.family = denoiser_of(self.pipe)
        self.sites: list[AttentionSite] = self.family.discover(self.denoiser)
        if not self.sites:
            refuse_without_sites(self.pipe, self.denoiser)
        self.step: StepState | None = None
        self._installed: dict[str, tuple[torch.nn.Module, object, object]] = {}  # site: module, original, ours
        self._active: dict[str, list[Controller]] = {}
        self._warned_mask = False
        self._attached: list[Controller] = []  # controllers whose `attach` was called
        self._hooks: list[_Hooked] = []
        self._text_hooks: list[_TextHook] = []  # one per text encoder the family checks
        self._timesteps = None  # the scheduler's timesteps of the current pipeline call (a new tensor per call)
        self._timestep_values: tuple[object, list] = (None, [])  # (timesteps, their values read back once per call)
        self._step_calls = (None, -1, 0)  # (timesteps, step index, denoiser calls made at that step so far)
        # the arguments and step of the run's last denoiser call with conditional rows (not a separate negative call)
        self.conditional_call: tuple[tuple, dict, StepState] | None = None
        self._call: tuple[tuple, dict] | None = None  # the arguments of the denoiser call in progress
        self._probing = False
        self._exclusive: Controller | None = None
        self._exclusive_grid: tuple[int, int] | None = None
        self._exclusive_grid_given = False

    def __call__(self, *args, **kwargs):
        """Run the pipeline with what the controllers add to its arguments (`Controller.prepare_call`). The same as
        `pipe(*args, **kwargs)` for every controller but those that move the latents (Attend-and-Excite)."""
        segments = self.family.call_text_segments(self.pipe, args, kwargs) if self.prompts else None
        if segments is not None:  # laid out before the controllers prepare the call
            self._lay_out(segments)
        for c in self.controllers:
            kwargs = c.prepare_call(self, args, kwargs)
        return self.pipe(*args, **kwargs)

    # --- public helpers for controllers -------------------------------------------------------------
    def site(self, name: str) -> AttentionSite:
        """The site called `name`; a KeyError for any other name."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def observed_sites(self) -> set[str]:
        """Names of the sites some observer wants: where a method must hand over the probabilities it used."""
        return {s.name for s in self.sites if any(c.observer and c.wants(s) for c in self.controllers)}

    def first_denoiser_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, StepState]:
        """Start the pipeline with `args` and `kwargs` and stop it at its first denoiser call, before any step is
        taken: that call's arguments and batch layout. Text encoding and the initial latents are done as the run
        would do them, so a generator given in `kwargs` advances as the run's own draws advance it."""
        self._probing = True
        try:
            with self.quiet():
                self.pipe(*args, **kwargs)
        except _FirstCall as first:
            return first.args, first.kwargs, self._step_state(first.args, first.kwargs, None)
        finally:
            self._probing = False
        raise UsageError("the pipeline returned without calling its denoiser (0 denoising steps?); attnctl's "
                         "methods act inside denoising steps")

    @contextlib.contextmanager
    def quiet(self):
        """Within the block, the pipeline shows no progress bar (a method's own runs before the run proper); its
        progress settings are restored after."""
        config = getattr(self.pipe, "_progress_bar_config", None)
        self.pipe.set_progress_bar_config(**{**(config or {}), "disable": True})
        try:
            yield
        finally:
            if config is None:
                del self.pipe._progress_bar_config
            else:
                self.pipe._progress_bar_config = config

    @contextlib.contextmanager
    def other_prompts(self):
        """Within the block, pipeline calls may be made with prompts other than the session's (a method's own runs
        of edited prompts, before the run proper): their runs are not checked against the session's prompts and not
        laid out by them; controllers see them as runs and must know to act in none of them."""
        prompts, self.prompts = self.prompts, []
        try:
            with self.quiet():
                yield
        finally:
            self.prompts = prompts

    @contextlib.contextmanager
    def exclusive(self, controller: Controller, step: StepState | None = None, grid: tuple[int, int] | None = None):
        """Within the block, denoiser forwards that `controller` runs itself (Attend-and-Excite's gradient pass) begin
        no step and give their attention calls to its `exclusive_call` alone; their outputs are the plain ones.
        `step`: the step whose layout (token grid, text length) the family's processors read meanwhile (before the
        first step there is none). `grid`: the forwards' token grid where the caller knows it (its forwards were
        checked by the family before); else it is read from each forward's arguments, which is where a family refuses
        latents it cannot take (FLUX's grid is read back from the device)."""
        self._exclusive, saved = controller, self.step
        self.step = step or saved
        self._exclusive_grid, self._exclusive_grid_given = grid, grid is not None
        try:
            yield
        finally:
            self._exclusive, self._exclusive_grid, self._exclusive_grid_given, self.step = None, None, False, saved

    # --- lifecycle ----------------------------------------------------------------------------------
    def attach(self) -> None:
        """Calls each controller's `attach` (observers last, so they run after the methods), installs the session's
        processor at every site some controller wants and hooks the denoiser's steps and the text encoder
        (`Family.encoder_check`); a UsageError where attnctl is attached already."""
        registry = getattr(self.denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise UsageError("attnctl.apply is already attached to this pipeline; put all controllers in one "
                             "apply(...)")
        self.controllers = [c for c in self.controllers if not c.observer] + [c for c in self.controllers if c.observer]
        for c in self.controllers:
            self._attached.append(c)
            c.attach(self)
        modules = dict(self.denoiser.named_modules())
        for s in self.sites:
            wanting = [c for c in self.controllers if c.wants(s)]
            if not wanting:
                continue
            module = modules[s.name]
            _check_pag(self.pipe, s.name, module)
            self.family.check_processor(s, module.processor)
            self._active[s.name] = wanting
            ours = self.family.make_processor(s, self, module.processor)
            self._installed[s.name] = (module, module.processor, ours)
            module.set_processor(ours)
        self._hooks.append(_Hooked(self.denoiser, _StepHook(self), HOOK_NAME))
        watched = self.family.encoder_check(self.pipe, self.prompts) if self.prompts else None
        for encoder, check in ([] if watched is None else [watched] if isinstance(watched, tuple) else watched):
            hook = _TextHook(check)
            self._text_hooks.append(hook)
            self._hooks.append(_Hooked(unwrap_module(encoder), hook, HOOK_NAME + ".text"))

    def detach(self) -> None:
        """Undo what `attach` did, and only that (it may have stopped part way)."""
        replaced = self._replaced()
        for name, (module, original, _) in self._installed.items():
            if name not in replaced:
                module.set_processor(original)
        self._installed.clear()
        if replaced:
            log.warning("%d site(s), e.g. %s, got a new attention processor while attnctl was attached; left as the "
                        "user set them, not restored to the processors they had before attnctl.apply",
                        len(replaced), replaced[0])
        while self._hooks:
            self._hooks.pop().remove()
        self._text_hooks = []
        for c in self._attached:
            c.detach()
        self._attached.clear()

    def _replaced(self) -> list[str]:
        """Sites whose processor is no longer the one attach installed (someone set another while attached)."""
        return [name for name, (module, _, ours) in self._installed.items() if module.processor is not ours]

    # --- called by the hook and the processors ------------------------------------------------------
    def _begin_call(self, args, kwargs, context_name) -> None:
        replaced = self._replaced()
        if replaced:
            name = replaced[0]
            now = type(self._installed[name][0].processor).__name__
            raise UsageError(
                f"{len(replaced)} attention site(s), e.g. {name} (now {now}), got a new processor while "
                "attnctl.apply was attached, so attnctl would silently stop controlling them. Change processors "
                "(attention slicing, IP-Adapter, set_attn_processor) before entering `with attnctl.apply(...)` or "
                "after leaving it."
            )
        self.step = self._step_state(args, kwargs, context_name)
        self._call = (args, kwargs)
        if self.step.cond_rows.stop > self.step.cond_rows.start:
            self.conditional_call = (args, kwargs, self.step)
        timesteps = self.pipe.scheduler.timesteps
        new_run = timesteps is not self._timesteps  # every pipeline call sets the scheduler's timesteps anew
        self._timesteps = timesteps
        if new_run and self.prompts:
            for text_hook in self._text_hooks:
                placed = text_hook.judge(self.pipe, self.family, args, kwargs)
                if callable(placed):  # how the prompts lie, given this denoiser call (the text it is given)
                    placed = placed(args, kwargs)
                if placed is not None:
                    self._lay_out(placed)
            self.family.check_text_layout(args, kwargs, self.step, self.prompts)
        for c in self.controllers:
            if new_run:
                c.begin_run()
            c.begin_step(self.step)

    def _lay_out(self, segments) -> None:
        """Lay the prompts out with `segments`, where a pipeline call places their tokens (a call argument the
        denoiser never sees decides it: Sana's instruction). Where some token moves, `prompts` (the same list) gets
        the new layout and every controller is attached again, as `apply` would attach it to prompts laid out so,
        before any step of the call (observers that start afresh on attach do so); nothing changes where every token
        keeps its place."""
        placed = [PromptTokens(p.prompt, segments) for p in self.prompts]
        if all(new.same_places(old) for new, old in zip(placed, self.prompts)):
            return
        self.prompts[:] = placed
        for c in self.controllers:
            c.attach(self)

    def _step_state(self, args, kwargs, context_name) -> StepState:
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps
        index = _step_index(scheduler, self.family.timestep(args, kwargs))
        batch = self.family.batch_size(args, kwargs)
        seen, last, calls = self._step_calls
        calls = calls + 1 if seen is timesteps and last == index else 0
        self._step_calls = (timesteps, index, calls)
        cond = self.family.conditional_rows(self.pipe, args, kwargs, context_name, calls, len(self.prompts))
        n_cond = cond.stop - cond.start
        timestep = float(self._values_of(timesteps)[min(index, len(timesteps) - 1)])
        return StepState(
            index=index,
            num_steps=len(timesteps),
            timestep=timestep * self.family.timestep_scale(self.pipe),
            batch_size=batch,
            cond_rows=cond,
            token_grid=self.family.token_grid(self.denoiser, args, kwargs),
            text_len=self.family.text_len(args, kwargs),
            images_per_prompt=max(1, n_cond // max(1, len(self.prompts))),
        )

    def _values_of(self, timesteps) -> list:
        """The scheduler's timesteps as numbers, read back from the device once per pipeline call (at its first
        denoiser call): later steps read none."""
        if self._timestep_values[0] is not timesteps:
            self._timestep_values = (timesteps, timesteps.tolist())
        return self._timestep_values[1]

    @torch.compiler.disable  # controllers branch on the step and keep Python state: they run eagerly under compile
    def attend(self, site, q, k, v, text: slice, image: slice, mask=None, own=None) -> torch.Tensor:
        """Attention at `site` with the controllers applied; (batch, heads, tokens, head_dim) in and out. `own`: where
        the model's attention is not one attention over q, k, v with `mask` but the image's queries alone over every
        key (with `mask`) and the other rows apart (Qwen-Image 2.1: its text causally per segment, or cached), a
        function giving the model's output for every row from the image rows' (None: it computes them), which an
        unchanged call returns (`AttentionCall`)."""
        key_bias, image_keys = None, None
        if mask is not None:
            image_keys = self.family.image_key_mask(mask, image)
            key_bias = _key_bias(mask if image_keys is None else image_keys, q.shape[2])
            if key_bias is None or not all(c.handles_key_mask for c in self._active[site.name]):
                if not self._warned_mask:
                    warnings.warn(f"{site.name}: an attention mask is in use that attnctl's controllers here do not "
                                  "handle; masked calls are left unchanged", stacklevel=1)
                    self._warned_mask = True
                return attention(q, k, v, mask=mask) if own is None else own()
        if self._exclusive is not None:
            grid = grid_of(image.stop - image.start, self._exclusive_grid, site)
            call = AttentionCall(site, None, q, k, v, text=text, image=image, grid=grid, key_bias=key_bias,
                                 model_mask=None if image_keys is None else (mask, image_keys), own=own)
            if self._exclusive in self._active[site.name]:
                self._exclusive.exclusive_call(call)
            return call.output()
        grid = grid_of(image.stop - image.start, self.step.token_grid, site)
        call = AttentionCall(site, self.step, q, k, v, text=text, image=image, grid=grid, key_bias=key_bias,
                             model_mask=None if image_keys is None else (mask, image_keys), own=own)
        for c in self._active[site.name]:
            c(call)
        return call.output()


def _check_pag(pipe, name: str, module) -> None:
    """A PAG pipeline sets its own processors on the self-attention layers matching `pag_applied_layers` at every
    call (and puts them back only if the call ends normally): a site among them is refused before anything
    changes."""
    layers = getattr(pipe, "pag_applied_layers", None) or []
    if layers and not getattr(module, "is_cross_attention", False) and any(re.search(layer, name) for layer in layers):
        raise UsageError(
            f"{type(pipe).__name__} applies perturbed-attention guidance to {name} (pag_applied_layers {layers}), "
            "replacing its processor during every call, and attnctl controls that attention; give PAG other layers "
            "(`pipe.set_pag_applied_layers([...])`, e.g. ones the method leaves alone) or use the pipeline without "
            "PAG")


def _key_bias(mask: torch.Tensor, n_queries: int) -> torch.Tensor | None:
    """A mask that is the same for every query (a key padding mask) as an additive float32 (batch, heads or 1, 1,
    keys) bias; None for any other mask."""
    if mask.dim() != 4 or mask.shape[2] != 1:
        if mask.dim() == 4 and mask.shape[2] == n_queries and bool((mask == mask[:, :, :1]).all()):
            mask = mask[:, :, :1]
        else:
            return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def grid_of(n_image: int, token_grid: tuple[int, int], site: AttentionSite) -> tuple[int, int]:
    """The (h, w) grid of a call's `n_image` image tokens: the site's grid on `token_grid`, or the token grid
    downsampled by the factor that fits (a site may run at another resolution than its config says)."""
    h, w = site.grid(token_grid)
    if h * w == n_image:
        return h, w
    for factor in (1, 2, 4, 8, 16, 32, 64):  # the site runs at another resolution than its config says
        h, w = downsampled(token_grid, factor)
        if h * w == n_image:
            return h, w
    raise RuntimeError(f"{site.name}: cannot place {n_image} image tokens on the token grid {token_grid}")


def _step_index(scheduler, timestep) -> int:
    """The step the scheduler is at. Schedulers that count steps say so; for the others, find the timestep."""
    if hasattr(scheduler, "step_index"):
        return scheduler.step_index or 0
    t = torch.as_tensor(timestep, dtype=torch.float64).flatten()[0].item()
    ts = scheduler.timesteps.double().cpu()
    return int((ts - t).abs().argmin())


def _check_controllers(controllers) -> None:
    """Each a Controller instance, and each once (a class, a method's name or a repeat is a UsageError)."""
    for c in controllers:
        if isinstance(c, type) and issubclass(c, Controller):
            raise UsageError(f"apply takes controller instances, not the class {c.__name__}: instantiate it, e.g. "
                             f"attnctl.{c.__name__}(...)")
        if not isinstance(c, Controller):
            raise UsageError(f"apply takes controllers such as attnctl.Capture(...) or attnctl.Regulation(...), not "
                             f"{c!r}")
    if len({id(c) for c in controllers}) < len(controllers):
        raise UsageError("the same controller was passed to apply twice; pass it once (it would run twice per "
                         "attention call)")


def sites_of(pipe) -> list[AttentionSite]:
    """The attention sites attnctl finds in `pipe`'s denoiser, without attaching anything (a UsageError for a
    pipeline it does not support)."""
    return Session(pipe, []).sites


def prompt_tokens(pipe, prompt: str | list[str]) -> list[PromptTokens]:
    """Each prompt (a string or a list of them) as `pipe` will feed it to its denoiser: tokens, positions and
    words, for turning words into token positions. Nothing is attached, so this also works while `pipe` runs."""
    return _prompt_tokens(Session(pipe, []), prompt)


def _prompt_tokens(session: Session, prompt) -> list[PromptTokens]:
    segments = session.family.text_segments(session.pipe)
    return [PromptTokens(p, segments) for p in ([prompt] if isinstance(prompt, str) else list(prompt))]


@contextlib.contextmanager
def apply(pipe, *controllers: Controller, prompt: str | list[str] | None = None):
    """Attach `controllers` to `pipe` for the duration of the block; the pipeline is restored on exit.

    `prompt` is the prompt (or list of prompts) that `pipe` will be called with: controllers need it to find the token
    positions of the words they target. Controllers that carry their own prompt (a layout) may omit it.
    """
    _check_controllers(controllers)
    if prompt is None:
        prompt = next((c.prompt for c in controllers if getattr(c, "prompt", None)), None)
    elif not (isinstance(prompt, str) or isinstance(prompt, (list, tuple)) and prompt
              and all(isinstance(p, str) for p in prompt)):
        raise UsageError(f"prompt must be the prompt the pipeline will be called with: a string or a list of "
                         f"strings, not {prompt!r}")
    session = Session(pipe, list(controllers))
    if prompt is not None:
        session.prompts = _prompt_tokens(session, prompt)
    try:
        session.attach()
        yield session
    finally:
        session.detach()
