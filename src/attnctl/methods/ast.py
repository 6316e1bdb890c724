"""AST: hierarchical, step- and layer-wise attention specialty tuning for joint (MMDiT) attention
(arXiv 2504.10148; FLUX.1, SD3/3.5), as written down in docs/methods.md §2.

    layout = attnctl.layout.Layout.load("examples/two_animals.json")
    with attnctl.apply(pipe, AST(layout)):          # the layout carries the prompt
        image = pipe(layout.prompt, num_inference_steps=32).images[0]

At every tuned site and step (the first `tuned_steps` steps, conditional rows of the batch only) the joint attention
becomes softmax(S + B)·V with B_X = w_X · ρ_X · τ(t) · (M_X − P_X) on the image→image, text→text and image→text blocks
(see `ast_attention`). τ(t) = (t/1000)^γ with the scheduler's timestep. Area terms: image rows
ρ(p) = 1 − a_img·|region(p)|/(H·W); text rows ρ(j) = 1 − a_txt·(row sum of M_T2T)/L_text, with L_text the text length
of the joint sequence. Formulas, defaults with their sources and every departure from the published code:
docs/methods.md §2 (departures §2.8).

The layer schedule is a list of `Band`s on relative depth (block index / number of joint blocks). The default,
`REFERENCE_SCHEDULE`, puts the reference's FLUX.1 boundaries (19 double + 38 single blocks = 57) at k/57, so on FLUX.1
(dev and schnell) it tunes exactly the reference's blocks; on other depths (SD3/3.5: 24 or 38 blocks, reduced FLUX) it
maps by relative depth. Override with `schedule=` (a list of Bands or dicts, see `parse_schedule`).

Choices where the specification leaves room, stated (with the departures from the published code, among them region
rasterisation and the role parser, in docs/methods.md §2.8):
- M_T2T is the identity together with 1 wherever both tokens are in the same phrase (entries are 0/1: a phrase
  token's diagonal is 1, as in the reference's code).
- I2T area term: `i2t_area="region"` (default, the specification: every pixel's own region, background included);
  `i2t_area="reference"` reproduces the reference code, which counts in the I2T area term only the regions taking
  part in the block (instance regions always, the background only where background tokens are tuned), so background
  pixels get ρ = 1 in the instance-only and attribute blocks.
- The reference also replaces the prompt embeddings of each phrase by those of the phrase encoded alone; the
  specification does not include this and neither do we (attention is the only thing AST changes here).
- Computation: `implementation="auto"` (default) runs flex on CUDA and fast elsewhere; `implementation="fast"` is
  exact with O(N) memory (two passes with the row LSE, query-chunked
  with a budget proportional to q); `implementation="flex"` is exact too, one `flex_attention` pass whose
  `score_mod` adds the bias from per-token labels and the rows' LSE (compiled on CUDA, eager elsewhere; the GPU path
  of issue 10, not yet measured there); `implementation="direct"` is the formula chunk by chunk (memory chunk × N);
  `implementation="reference"`
  materialises everything in float64 (tests only). `approximate=True` drops the −P term (one fused SDPA pass per
  query chunk with an additive mask): not exact. Measured: on random attention it deviates from the exact output by
  up to 0.014 (flat rows, max P 0.013) and 2.2 (peaked rows, max P 0.995) for |v| ≈ 1.2 (tests/test_ast_attention.py);
  in the tiny random FLUX / SD3 pipelines (3 steps, 128², images in [0, 1]) the final images differ from exact AST by
  at most 6.3e-4 / 9.3e-4 (mean 4e-5 / 3e-5), where AST itself changes them by 0.014 / 0.22.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ..config import build, check, default_of, flag_of, option
from ..control import AttentionCall, Controller
from ..errors import UsageError
from ..layout import Layout, load_layout
from ..roles import ATTRIBUTE, BACKGROUND, INSTANCE, ROLES
from ..roles import PARSERS as ROLE_PARSERS
from .ast_attention import (
    TuningTables,
    direct_attention,
    fast_attention,
    flex_attention_ast,
    reference_attention,
    row_lse,
)

IMPLEMENTATIONS = ("fast", "flex", "direct", "reference", "auto")
_BAND_KEYS = {"from", "to", "blocks", "roles"}
I2T_AREAS = ("region", "reference")


@dataclass(frozen=True)
class Band:
    """Sites with start <= relative depth < stop tune I2I and/or T2T, and I2T towards the tokens of `roles`."""

    start: Fraction
    stop: Fraction
    i2i: bool
    t2t: bool
    roles: tuple[str, ...]

    @property
    def tunes(self) -> bool:
        """Whether the band changes anything (I2I, T2T or I2T towards some role)."""
        return self.i2i or self.t2t or bool(self.roles)

    def describe(self) -> str:
        """The band for messages, e.g. "[0.088, 0.333): I2I + T2T + I2T(instance)" (or ": untouched")."""
        blocks = [b for b, on in (("I2I", self.i2i), ("T2T", self.t2t)) if on]
        if self.roles:
            blocks.append("I2T(" + " ∪ ".join(self.roles) + ")")
        return f"[{float(self.start):.3f}, {float(self.stop):.3f}): " + (" + ".join(blocks) or "untouched")


def _flux_depth(k: int, n: int = 57) -> Fraction:
    """Relative depth of FLUX.1's k-th joint block (19 double + 38 single)."""
    return Fraction(k, n)


# FLUX.1: d0–d4 untouched · d5–d18 all + I2T(instance) · s0–s4 (instance ∪ background) · s5–s14 (instance ∪
# attribute) · s15–s30 (attribute) · s31–s37 I2T(attribute) only; double blocks are sites 0–18, single 19–56.
REFERENCE_SCHEDULE = (
    Band(_flux_depth(0), _flux_depth(5), False, False, ()),
    Band(_flux_depth(5), _flux_depth(19), True, True, (INSTANCE,)),
    Band(_flux_depth(19), _flux_depth(24), True, True, (INSTANCE, BACKGROUND)),
    Band(_flux_depth(24), _flux_depth(34), True, True, (INSTANCE, ATTRIBUTE)),
    Band(_flux_depth(34), _flux_depth(50), True, True, (ATTRIBUTE,)),
    Band(_flux_depth(50), _flux_depth(57), False, False, (ATTRIBUTE,)),
)


def parse_schedule(spec) -> tuple[Band, ...]:
    """A schedule from Bands, or dicts {"from": 0.0, "to": 0.3, "blocks": ["i2i", "t2t", "i2t"], "roles": [...]}
    (JSON text or a path to a JSON file also work). Depths not covered by any band are untouched."""
    if spec is None:
        return REFERENCE_SCHEDULE
    if isinstance(spec, (str, Path)):
        text = str(spec)
        try:
            is_file = Path(text).is_file()
        except OSError:  # JSON text longer than a file name may be
            is_file = False
        try:
            spec = json.loads(Path(text).read_text() if is_file else text)
        except (ValueError, RecursionError, OSError) as err:  # ValueError: also numbers past Python's digit limit
            raise UsageError(f"the AST schedule must be JSON (or a JSON file): {err}") from None
    if not isinstance(spec, (list, tuple)):
        raise UsageError(f"the AST schedule is a list of bands such as [{{\"from\": 0.1, \"to\": 0.3, \"blocks\": "
                         f"[\"i2i\"]}}], not {spec!r}")
    bands = []
    for i, item in enumerate(spec):
        if isinstance(item, Band):
            bands.append(item)
            continue
        if not isinstance(item, dict) or "from" not in item or "to" not in item:
            raise UsageError(f"schedule band {i}: write it as {{\"from\": 0.1, \"to\": 0.3, \"blocks\": "
                             "[\"i2i\", \"t2t\", \"i2t\"], \"roles\": [\"instance\"]}")
        if set(item) - _BAND_KEYS:
            raise UsageError(f"schedule band {i}: unknown key(s) {sorted(set(item) - _BAND_KEYS, key=str)}; a band "
                             f"has {', '.join(sorted(_BAND_KEYS))}")
        for key in ("blocks", "roles"):
            if key in item and not (isinstance(item[key], (list, tuple)) and all(isinstance(x, str)
                                                                                 for x in item[key])):
                raise UsageError(f"schedule band {i}: '{key}' must be a list of names, not {item[key]!r}")
        blocks = {b.lower() for b in item.get("blocks", ["i2i", "t2t", "i2t"])}
        unknown = blocks - {"i2i", "t2t", "i2t"}
        roles = tuple(item.get("roles", []))
        bad_roles = set(roles) - set(ROLES)
        if unknown or bad_roles:
            raise UsageError(f"schedule band {i}: unknown blocks {sorted(unknown)} / roles {sorted(bad_roles)}; "
                             f"blocks are i2i, t2t, i2t and roles {', '.join(ROLES)}")
        if "i2t" in blocks and not roles:
            raise UsageError(f"schedule band {i}: an i2t block needs the roles it tunes towards")
        try:
            if any(isinstance(item[k], bool) or not isinstance(item[k], numbers.Real) for k in ("from", "to")):
                raise ValueError
            start, stop = Fraction(str(item["from"])), Fraction(str(item["to"]))
        except ValueError:  # not a finite number (a string, a list, true, NaN)
            raise UsageError(f"schedule band {i}: 'from' and 'to' must be numbers (relative depths from 0 to 1), not "
                             f"{item['from']!r} and {item['to']!r}") from None
        if not 0 <= start < stop <= 1:
            raise UsageError(f"schedule band {i}: need 0 <= from < to <= 1 (relative depth)")
        bands.append(Band(start, stop, "i2i" in blocks, "t2t" in blocks, roles if "i2t" in blocks else ()))
    return tuple(bands)


@dataclass
class ASTConfig:
    """Every option of AST, with the specification's FLUX.1-dev defaults (docs/methods.md §2).

        AST(layout, config=ASTConfig(tuned_steps=10))      # or AST(layout, tuned_steps=10)

    A `tuned_steps` above the run's number of denoising steps cannot act and is a UsageError when the run starts,
    unless it is the default (16, of the published code's 32 steps; a shorter run is tuned at every step): a field
    equal to its default is never refused, whoever gave it.
    """

    w_t2t: float = option(3.5, "text→text weight", symbol="w_T2T", low=0)
    w_i2t: float = option(5.0, "image→text weight", symbol="w_I2T", low=0)
    w_i2i: float = option(3.5, "image→image weight", symbol="w_I2I", low=0)
    gamma: float = option(3.0, "exponent of the time factor τ(t) = (t/1000)^γ", symbol="γ", low=0)
    tuned_steps: int = option(16, "tune the first N denoising steps (0 leaves the image plain)", symbol="n_mod",
                             low=0)
    a_img: float = option(1.0, "image area term: ρ(p) = 1 − a_img·|region(p)|/(H·W)", symbol="a_img", low=0)
    a_txt: float = option(4.0, "text area term: ρ(j) = 1 − a_txt·(row sum of M_T2T)/L_text", symbol="a_txt",
                          low=0)
    schedule: object = option(
        None, "layer schedule: a list (JSON text or file) of {from, to, blocks, roles} on relative depth",
        parse=str, shown_default="the reference's FLUX.1 schedule, by relative depth")
    strength: float = option(1.0, "scale of the three weights together (an attnctl extension for dose-response "
                             "studies: 1 is the specification's method, 0 tunes nothing)", low=0)
    implementation: str = option("auto", "fast (exact, O(N) memory), flex (exact, one flex_attention kernel, "
                                 "compiled on CUDA), direct (the formula, query-chunked), reference (float64, for "
                                 "tests) or auto (flex on CUDA, fast elsewhere)", choices=IMPLEMENTATIONS)
    approximate: bool = option(False, "drop the −P term of the bias (one fused pass; not exact)")
    role_parser: str = option("auto", "how attribute words are found: auto (spaCy if installed, else the built-in "
                              "rules), spacy or rules", choices=ROLE_PARSERS)
    i2t_area: str = option("region", "I2T area term: each pixel's own region (the specification) or the reference "
                           "code's variant", choices=I2T_AREAS)

    cli_prefix = "ast-"  # its flags: --ast-w-t2t, ...

    def __post_init__(self):
        check(self)
        self.tuned_steps = int(self.tuned_steps)
        self.schedule = parse_schedule(self.schedule)
        if self.approximate and self.implementation not in ("fast", "auto"):
            raise UsageError("approximate=True is a variant of the fast implementation; use implementation='fast'")


def resolved_implementation(config: ASTConfig, device: torch.device) -> str:
    """The implementation that runs: the config's, or for "auto" flex on CUDA (one fused kernel) and fast elsewhere
    (flex_attention is not compiled off CUDA and materialises the scores there); approximate is fast's variant."""
    if config.implementation != "auto":
        return config.implementation
    return "flex" if device.type == "cuda" and not config.approximate else "fast"


class AST(Controller):
    """The AST method as a controller: `AST(layout, config=None, **options)`, where `layout` is a `Layout`, a dict
    or a JSON path and the options are the fields of `ASTConfig`.

        layout = attnctl.Layout.load("examples/two_animals.json")
        with attnctl.apply(pipe, AST(layout, tuned_steps=12)):
            image = pipe(layout.prompt).images[0]
    """

    handles_key_mask = True  # a model's text padding mask is part of S (ast_attention.TuningTables.key_bias)

    def __init__(self, layout, config: ASTConfig | None = None, **options):
        self.layout: Layout = load_layout(layout)
        self.prompt = self.layout.prompt
        self.config = build(ASTConfig, config, **options)
        self.schedule = self.config.schedule
        self.bound = []
        self._tables: dict = {}
        self._probs_sites: set[str] = set()
        self.step = None
        self._run_checked = False

    # --- controller API ----------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        """Refuses a model without joint attention or a session without prompts; then binds the layout's phrases and
        roles to each prompt's tokens (with the config's `role_parser`)."""
        if not any(s.kind == "joint" for s in session.sites):
            raise UsageError(
                "AST tunes joint text-image attention (MMDiT models: SD3/3.5, FLUX.1), and this pipeline's denoiser "
                "has only text cross-attention (a UNet, PixArt or Sana). For those use Attention Regulation "
                "instead (`attnctl generate --method regulation`)."
            )
        if not session.prompts:
            raise UsageError("AST needs the prompt the pipeline is called with: pass prompt=... to attnctl.apply "
                             "(or omit it to use the layout's prompt)")
        self.bound = [self.layout.bind(p, self.config.role_parser) for p in session.prompts]
        self._prompts = list(session.prompts)
        self._tables.clear()
        self._probs_sites = session.observed_sites()

    def band(self, site) -> Band | None:
        """The schedule's band holding `site`'s relative depth (`block / num_sites`); None where none does."""
        depth = Fraction(site.block, site.num_sites)
        return next((b for b in self.schedule if b.start <= depth < b.stop), None)

    def wants(self, site) -> bool:
        """The joint attention sites whose band tunes something."""
        band = self.band(site)
        return site.kind == "joint" and band is not None and band.tunes

    def begin_run(self) -> None:
        """Re-arms the `tuned_steps` check made at the run's first step (in `begin_step`)."""
        self._run_checked = False

    def begin_step(self, step) -> None:
        """Keeps the step; at the run's first step, refuses a `tuned_steps` that cannot act (see `ASTConfig`)."""
        self.step = step
        if not self._run_checked:
            self._run_checked = True
            tuned = self.config.tuned_steps
            default = default_of(next(f for f in dataclasses.fields(ASTConfig) if f.name == "tuned_steps"))
            if tuned > step.num_steps and tuned != default:
                raise UsageError(f"tuned_steps ({flag_of(ASTConfig, 'tuned_steps')}) is {tuned}, more than this "
                                 f"run's {step.num_steps} denoising steps; give at most {step.num_steps} (every step "
                                 "tuned) or more --steps (num_inference_steps)")

    def __call__(self, call: AttentionCall) -> None:
        step = call.step
        rows = step.cond_rows
        c = self.config
        if step.index >= c.tuned_steps or rows.stop <= rows.start or c.strength == 0:
            return
        band = self.band(call.site)
        tau = (max(float(step.timestep), 0.0) / 1000.0) ** c.gamma * c.strength
        tables = self._tables_for(call, band, rows, tau)
        if call.key_bias is not None:  # the model's text padding mask (Chroma): P and the tuned softmax both see it
            tables.key_bias = call.key_bias[rows] if call.key_bias.shape[0] > 1 else call.key_bias
        want_probs = call.site.name in self._probs_sites
        batch = call.q.shape[0]
        partial = rows.stop - rows.start < batch
        q, k, v = call.q[rows], call.k[rows], call.v[rows]
        implementation = resolved_implementation(c, q.device)
        if implementation == "fast":
            lse = None if c.approximate or q.dtype == torch.float64 else call.lse()[rows]
            out, probs = fast_attention(q, k, v, call.scale, tables, lse=lse, want_text_probs=want_probs,
                                        approximate=c.approximate)
        elif implementation == "flex":
            lse = row_lse(q, k, v, call.scale, tables.key_bias) if q.dtype == torch.float64 else call.lse()[rows]
            out, probs = flex_attention_ast(q, k, v, call.scale, tables, lse, want_text_probs=want_probs)
        elif implementation == "direct":
            out, probs = direct_attention(q, k, v, call.scale, tables, want_text_probs=want_probs)
        else:
            out, probs = reference_attention(q, k, v, call.scale, tables)
            out = out.to(q.dtype)
        if partial:
            full = call.output().clone()
            full[rows] = out
            out = full
            if want_probs:
                plain = call.text_probs().clone()
                plain[rows] = probs
                probs = plain
        call.set_output(out, text_probs=probs if want_probs else None)

    # --- tables -------------------------------------------------------------------------------------------------
    def _tables_for(self, call: AttentionCall, band: Band, rows: slice, tau: float) -> TuningTables:
        n_text = call.text.stop - call.text.start
        prompts = tuple(call.step.prompt_of_row(r) for r in range(rows.stop - rows.start))
        key = (prompts, tuple(call.grid), n_text, band, str(call.q.device))
        if key not in self._tables:
            per_row = [self._prompt_tables(p, tuple(call.grid), n_text, band) for p in prompts]
            stack = lambda i: torch.stack([t[i] for t in per_row]).to(call.q.device)  # noqa: E731
            self._tables[key] = tuple(stack(i) for i in range(6))
        img_label, i2t_label, t2t_label, rho_img, rho_i2t, rho_txt = self._tables[key]
        c = self.config
        return TuningTables(
            text=call.text, image=call.image, img_label=img_label, i2t_label=i2t_label, t2t_label=t2t_label,
            alpha_i2i=rho_img * (c.w_i2i * tau) if band.i2i else None,
            alpha_i2t=rho_i2t * (c.w_i2t * tau) if band.roles else None,
            alpha_t2t=rho_txt * (c.w_t2t * tau) if band.t2t else None,
        )

    def _prompt_tables(self, prompt: int, grid, n_text: int, band: Band):
        bound = self.bound[min(prompt, len(self.bound) - 1)]
        tokens = self._prompts[min(prompt, len(self._prompts) - 1)]
        labels = self.layout.labels(grid).flatten()
        n_img = labels.numel()
        n_regions = len(self.layout.regions)
        counts = torch.bincount(labels, minlength=n_regions + 1).double()
        area = counts[labels] / n_img
        rho_img = 1 - self.config.a_img * area
        if self.config.i2t_area == "reference":
            takes_part = torch.ones(n_regions + 1, dtype=torch.bool)
            takes_part[0] = BACKGROUND in band.roles
            rho_i2t = 1 - self.config.a_img * torch.where(takes_part[labels], area, torch.zeros_like(area))
        else:
            rho_i2t = rho_img
        t2t = -(torch.arange(n_text) + 2)  # unique labels: the identity for tokens in no phrase
        i2t = torch.full((n_text,), -1, dtype=torch.long)
        keep = lambda ps: [p for p in ps if not tokens.is_cut(p, n_text)]  # noqa: E731
        for r, region in enumerate(bound.regions, start=1):
            phrase = keep(region.phrase)
            if not phrase:
                raise UsageError(
                    f"region {r} ({self.layout.regions[r - 1].phrase!r}) lies beyond the {n_text} text tokens this "
                    "model sees (the prompt was cut); raise max_sequence_length or shorten the prompt"
                )
            t2t[phrase] = r
            selected = (region.instance if INSTANCE in band.roles else []) + \
                       (region.attribute if ATTRIBUTE in band.roles else [])
            i2t[keep(selected)] = r
        background = keep(bound.background)
        if background:
            t2t[background] = 0
            if BACKGROUND in band.roles:
                i2t[background] = 0
        row_sum = torch.bincount(t2t - t2t.min()).double()[t2t - t2t.min()]
        rho_txt = 1 - self.config.a_txt * row_sum / n_text
        return labels, i2t, t2t, rho_img.float(), rho_i2t.float(), rho_txt.float()

    def describe_schedule(self, sites) -> str:
        """Which blocks each joint site tunes, one line per site."""
        lines = []
        for s in sites:
            if s.kind != "joint":
                continue
            band = self.band(s)
            lines.append(f"{s.block:3d} {s.name}: " + (band.describe().split(': ', 1)[1] if band else "untouched"))
        return "\n".join(lines)
