"""Layout attention modulation, the layout-conditioned peer of AST: the image→text score bias of DenseDiffusion (Kim et
al., ICCV 2023) and regional prompting, on UNet cross-attention and MMDiT joint attention, from AST's layout JSON.

    with attnctl.apply(pipe, LayoutModulation(layout)):
        image = pipe(layout.prompt).images[0]

With S = q kᵀ·scale, for an image token p and a text token j of a phrase (a region's, or the background's):
    pulled (j belongs to the phrase of p's region):      S'[p, j] = S[p, j] + λ_t · s_p · (max_j S[p, :] − S[p, j])
    pushed (j belongs to another region's phrase):      S'[p, j] = S[p, j] − λ_t · s_p · (S[p, j] − min_j S[p, :])
with the maximum and minimum over the row's text keys, s_p = 1 − |region(p)| / (H·W) (small regions pulled harder) and
λ_t = w · (t/1000)^5, at the first `steps_fraction` of the steps; then softmax(S')·V. Text tokens in no phrase, every
other key and every text query are left alone; only conditional rows are modulated. docs/methods.md §6 gives the
sources and how this departs from DenseDiffusion's code (which also modulates self-attention and pushes every key
outside a pixel's segment, start and padding tokens included).

Memory: only the image→text block (image tokens × text tokens) is formed. With other keys (joint attention), their part
comes from the fused kernel as an output and a row log-sum-exp, and the two parts are merged exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention import attention, attention_with_lse, chunked_lse, cpu_attention_with_lse
from ..config import build, check, option
from ..control import AttentionCall, Controller
from ..errors import UsageError
from ..layout import Layout, load_layout

log = logging.getLogger(__name__)


@dataclass
class LayoutModulationConfig:
    """Every option of layout attention modulation, with DenseDiffusion's defaults for cross-attention
    (docs/methods.md §6)."""

    weight: float = option(1.0, "strength w of the image→text modulation (DenseDiffusion's cross-attention "
                           "weight w^c)", symbol="w", low=0)
    power: float = option(5.0, "decay over the denoising: λ_t = w·(t/1000)^power", low=0)
    steps_fraction: float = option(0.3, "modulate the first fraction of the denoising steps", low=0, high=1)
    size_weighted: bool = option(True, "scale each pixel's modulation by 1 − its region's share of the image")
    strength: float = option(1.0, "scale of the modulation (an attnctl extension for dose-response studies: 1 is the "
                             "method, 0 modulates nothing)", low=0)
    hard_mask: bool = option(False, "a hard regional mask instead of the bias, in the same steps: an image token "
                             "attends to no other region's phrase (regional prompting; an attnctl extension)")

    cli_prefix = "lm-"  # its flags: --lm-weight, ...

    def __post_init__(self):
        check(self)


@dataclass
class ModulationTables:
    """Per conditional row: the region of each image token (0 = background), the phrase label of each text token
    (region r, 0 for the background phrase, −1 for tokens in no phrase) and λ_t·s_p per image token."""

    img_label: torch.Tensor  # long (B, I)
    txt_label: torch.Tensor  # long (B, T)
    scale: torch.Tensor  # float (B, I)
    hard_mask: bool = False  # pushed keys masked out (−∞) instead of the bias


def pulled_and_pushed(tables: ModulationTables) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, I, T) masks of the image→text block: `pulled` where the text token is in the phrase of the image token's
    region, `pushed` where it is in another phrase."""
    in_phrase = tables.txt_label[:, None, :] >= 0
    pulled = (tables.img_label[:, :, None] == tables.txt_label[:, None, :]) & in_phrase
    return pulled, in_phrase & ~pulled


def biased_scores(scores: torch.Tensor, tables: ModulationTables, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """S' of the image→text block from S = scores (B, H, I, T), in the dtype of `scores`; `hidden` (broadcast to
    S): keys the model's text mask hides, which stay −inf and take no part in S's maximum and minimum."""
    pulled, pushed = pulled_and_pushed(tables)
    if tables.hard_mask:
        biased = scores.masked_fill(pushed[:, None], float("-inf"))
    else:
        shown = scores if hidden is None else scores.masked_fill(hidden, float("-inf"))
        top = shown.amax(dim=-1, keepdim=True)
        bottom = (scores if hidden is None else scores.masked_fill(hidden, float("inf"))).amin(dim=-1, keepdim=True)
        lam = tables.scale.to(scores.dtype)[:, None, :, None]
        biased = (scores + lam * (top - scores) * pulled[:, None].to(scores.dtype)
                  - lam * (scores - bottom) * pushed[:, None].to(scores.dtype))
    return biased if hidden is None else biased.masked_fill(hidden, float("-inf"))


def modulated_image_rows(q_img, k, v, text: slice, scale: float, tables: ModulationTables, key_bias=None):
    """The attention output of the image queries `q_img` (B, H, I, d) on all keys `k`, `v` (B, H, N, d) with the text
    keys at `text` modulated, and the image→text probabilities (float32) that produced it. `key_bias`: the model's
    key mask, additive (B or 1, heads or 1, 1, N), −inf where a key is hidden. Float32 accumulation (float64 for
    float64 inputs); the output has q's dtype."""
    compute = torch.float64 if q_img.dtype == torch.float64 else torch.float32
    k_text, v_text = k[:, :, text].to(compute), v[:, :, text].to(compute)
    raw = (q_img.to(compute) @ k_text.transpose(-1, -2)) * scale
    hidden = None
    if key_bias is not None:
        text_bias = key_bias[..., text].to(compute)
        hidden = torch.isneginf(text_bias)
        raw = raw + text_bias.masked_fill(hidden, 0.0)  # the model's logits; hidden keys are set to −inf below
    scores = biased_scores(raw, tables, hidden)
    n = k.shape[2]
    others = [s for s in (slice(0, text.start), slice(text.stop, n)) if s.stop > s.start]
    if not others:
        probs = torch.softmax(scores, dim=-1)
        return (probs @ v_text).to(q_img.dtype), probs.float()
    k_other = torch.cat([k[:, :, s] for s in others], dim=2)
    v_other = torch.cat([v[:, :, s] for s in others], dim=2)
    if key_bias is not None:  # the other keys with their part of the mask
        other_bias = torch.cat([key_bias[..., s] for s in others], dim=-1)
        out_other = attention(q_img, k_other, v_other, mask=other_bias.to(q_img.dtype), scale=scale)
        lse_other = chunked_lse(q_img, k_other, scale, other_bias)
    elif compute == torch.float64 and q_img.device.type == "cpu":  # the float64 kernel's own row log-sum-exp
        out_other, lse_other = cpu_attention_with_lse(q_img, k_other, v_other, scale)
    else:
        out_other, lse_other = attention_with_lse(q_img, k_other, v_other, scale=scale)
    lse_other = lse_other.to(compute).unsqueeze(-1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), lse_other)
    weights = torch.exp(scores - top)
    weight_other = torch.exp(lse_other - top)
    denominator = weights.sum(dim=-1, keepdim=True) + weight_other
    out = (weights @ v_text + weight_other * out_other.to(compute)) / denominator
    return out.to(q_img.dtype), (weights / denominator).float()


def reference_attention(q, k, v, text: slice, image: slice, scale: float, tables: ModulationTables,
                        key_bias=None) -> torch.Tensor:
    """The whole (N × N) softmax in float64, for tests: S (+ the model's key mask) with the bias on the image→text
    block, the modulation's maximum and minimum over the keys the mask shows."""
    q, k, v = q.double(), k.double(), v.double()
    S = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        bias = key_bias.double().expand(S.shape[0], S.shape[1], S.shape[2], -1).clone()
        hidden = torch.isneginf(bias)
        S = S + bias.masked_fill(hidden, 0.0)
        block = S[:, :, image, text]
        S[:, :, image, text] = biased_scores(block, tables, hidden[:, :, image, text])
        return torch.softmax(S.masked_fill(hidden, float("-inf")), dim=-1) @ v
    S[:, :, image, text] = biased_scores(S[:, :, image, text], tables)
    return torch.softmax(S, dim=-1) @ v


class LayoutModulation(Controller):
    """Layout attention modulation as a controller: `LayoutModulation(layout, config=None, **options)`, where
    `layout` is a `Layout`, a dict or a JSON path (AST's format) and the options are the fields of
    `LayoutModulationConfig`."""

    handles_key_mask = True  # a model's text padding mask: hidden keys stay out of the modulation and the softmax

    def __init__(self, layout, config: LayoutModulationConfig | None = None, **options):
        self.layout: Layout = load_layout(layout)
        self.prompt = self.layout.prompt
        self.config = build(LayoutModulationConfig, config, **options)
        self._tables: dict = {}

    def attach(self, session) -> None:
        """Binds the layout to each prompt's tokens (a phrase's tokens labelled by its region, from 1; the
        background's 0) and notes the sites it modulates and those observed; a UsageError without a prompt."""
        if not session.prompts:
            raise UsageError("LayoutModulation needs the prompt: pass prompt=... to attnctl.apply (or omit it to use "
                             "the layout's prompt)")
        self._labels = []
        for tokens in session.prompts:
            bound = self.layout.bind(tokens, "rules")
            labels = {}
            for r, region in enumerate(bound.regions, start=1):
                labels.update(dict.fromkeys(region.phrase, r))
            labels.update(dict.fromkeys(bound.background, 0))
            self._labels.append(labels)
        self._tables.clear()
        self._active = False
        self._probs_sites = session.observed_sites()
        self._sites = [s for s in session.sites if self.wants(s)]
        self._run_checked = False

    def wants(self, site) -> bool:
        """The text cross-attention and joint attention sites (the image→text block of each)."""
        return site.kind in ("cross", "joint")

    def begin_run(self) -> None:
        """Re-arms the check of the layout against the run's token grid (in `begin_step`, at the run's first step)."""
        self._run_checked = False

    def begin_step(self, step) -> None:
        """Whether this step is modulated, and λ_t; at the run's first step, a layout that fits the token grid of
        none of the sites (each is left alone where it does not fit, so nothing would change) is a UsageError."""
        if not self._run_checked:
            self._run_checked = True
            self._check_grids(step.token_grid)
        c = self.config
        self._lam = c.weight * c.strength * (max(step.timestep, 0.0) / 1000.0) ** c.power
        self._active = (step.index < c.steps_fraction * step.num_steps and step.cond_rows.stop > step.cond_rows.start
                        and self._lam > 0)

    def _check_grids(self, token_grid: tuple[int, int]) -> None:
        """A UsageError unless the layout gets a label grid at one site at least (the finest grid's error, else)."""
        grids = sorted({s.grid(token_grid) for s in self._sites}, key=lambda g: (-g[0] * g[1], g))
        finest = None
        for grid in grids:
            try:
                self.layout.labels(grid)
                return
            except UsageError as err:
                finest = finest or (grid, err)
        if finest is not None:
            (h, w), err = finest
            raise UsageError(f"LayoutModulation would change nothing in this run: the layout fits the token grid "
                             f"of none of its {len(self._sites)} attention sites; at the finest, {h}x{w}: {err} (the "
                             "image size is --height/--width, or height=/width= of the pipeline call)")

    def __call__(self, call: AttentionCall) -> None:
        tables = self._active_tables(call)
        if tables is None:
            return
        rows = call.step.cond_rows
        probs = call.text_probs().clone() if call.site.name in self._probs_sites else None
        out = call.output().clone()
        q_img = call.q[rows][:, :, call.image]
        bias = call.key_bias
        if bias is not None and bias.shape[0] > 1:
            bias = bias[rows]
        out[rows, :, call.image], modulated = modulated_image_rows(q_img, call.k[rows], call.v[rows], call.text,
                                                                   call.scale, tables, bias)
        if probs is not None:
            probs[rows] = modulated
        call.set_output(out, text_probs=probs)

    def _active_tables(self, call: AttentionCall) -> ModulationTables | None:
        """The tables of this call's conditional rows where this step is modulated, else None."""
        return self._tables_for(call, call.step.cond_rows) if self._active else None

    def _tables_for(self, call: AttentionCall, rows: slice) -> ModulationTables | None:
        """The tables of this call, or None on a grid too coarse for every region to get a cell (left alone)."""
        n_text = call.text.stop - call.text.start
        prompts = tuple(min(call.step.prompt_of_row(r), len(self._labels) - 1) for r in range(rows.stop - rows.start))
        key = (prompts, tuple(call.grid), n_text, str(call.q.device))
        if key not in self._tables:
            try:
                labels = self.layout.labels(call.grid).flatten()
            except UsageError as too_small:
                log.info("LayoutModulation leaves %s unmodulated: %s", call.site.name, too_small)
                self._tables[key] = None
                return None
            img, txt, size = [], [], []
            share = torch.bincount(labels, minlength=len(self.layout.regions) + 1).double()[labels] / labels.numel()
            for p in prompts:
                t = torch.full((n_text,), -1, dtype=torch.long)
                for position, label in self._labels[p].items():
                    if position < n_text:
                        t[position] = label
                img.append(labels)
                txt.append(t)
                size.append((1 - share) if self.config.size_weighted else torch.ones_like(share))
            self._tables[key] = tuple(t.to(call.q.device) for t in (torch.stack(img), torch.stack(txt),
                                                                       torch.stack(size).float()))
        if self._tables[key] is None:
            return None
        img, txt, size = self._tables[key]
        return ModulationTables(img, txt, size * self._lam, self.config.hard_mask)
