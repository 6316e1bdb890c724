"""AST: hierarchical, step- and layer-wise attention specialty tuning for joint (MMDiT) attention
(arXiv 2504.10148; FLUX.1, SD3/3.5), as specified in the project's METHODS.md §2.

    layout = attnctl.layout.Layout.load("examples/two_animals.json")
    with attnctl.apply(pipe, AST(layout)):          # the layout carries the prompt
        image = pipe(layout.prompt, num_inference_steps=32).images[0]

At every tuned site and step (the first `n_mod` steps, conditional rows of the batch only) the joint attention becomes
softmax(S + B)·V with B_X = w_X · ρ_X · τ(t) · (M_X − P_X) on the image→image, text→text and image→text blocks (see
`ast_attention`). τ(t) = (t/1000)^γ with the scheduler's timestep. Area terms: image rows ρ(p) = 1 − a_img·|region(p)|/(H·W);
text rows ρ(j) = 1 − a_txt·(row sum of M_T2T)/L_text, with L_text the text length of the joint sequence.

The layer schedule is a list of `Band`s on relative depth (block index / number of joint blocks). The default,
`REFERENCE_SCHEDULE`, puts the reference's FLUX.1 boundaries (19 double + 38 single blocks = 57) at k/57, so on FLUX.1
(dev and schnell) it tunes exactly the reference's blocks; on other depths (SD3/3.5: 24 or 38 blocks, reduced FLUX) it
maps by relative depth. Override with `schedule=` (a list of Bands or dicts, see `parse_schedule`).

Choices where the specification leaves room, stated:
- M_T2T is the identity together with 1 wherever both tokens are in the same phrase (entries are 0/1: a phrase
  token's diagonal is 1, as in the reference's code).
- I2T area term: `i2t_area="region"` (default, the specification: every pixel's own region, background included);
  `i2t_area="reference"` reproduces the reference code, which counts in the I2T area term only the regions taking
  part in the block (instance regions always, the background only where background tokens are tuned), so background
  pixels get ρ = 1 in the instance-only and attribute blocks.
- The reference also replaces the prompt embeddings of each phrase by those of the phrase encoded alone; the
  specification does not include this and neither do we (attention is the only thing AST changes here).
- Computation: `path="fast"` (default) is exact with O(N) memory (two passes with the row LSE, query-chunked with a
  budget proportional to q); `path="direct"` is the formula chunk by chunk (memory chunk × N); `path="reference"`
  materialises everything in float64 (tests only). `approximate=True` drops the −P term (one fused SDPA pass per
  query chunk with an additive mask): not exact. Measured: on random attention it deviates from the exact output by
  up to 0.014 (flat rows, max P 0.013) and 2.2 (peaked rows, max P 0.995) for |v| ≈ 1.2 (tests/test_ast_attention.py);
  in the tiny random FLUX / SD3 pipelines (3 steps, 128², images in [0, 1]) the final images differ from exact AST by
  at most 6.3e-4 / 9.3e-4 (mean 4e-5 / 3e-5), where AST itself changes them by 0.014 / 0.22.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from ..control import AttentionCall, Controller
from ..errors import UsageError
from ..layout import Layout, load_layout
from ..roles import ATTRIBUTE, BACKGROUND, INSTANCE, ROLES
from .ast_attention import TuningTables, direct_attention, fast_attention, reference_attention

DEFAULTS = dict(w_t2t=3.5, w_i2t=5.0, w_i2i=3.5, gamma=3.0, n_mod=16, a_img=1.0, a_txt=4.0)
PATHS = ("fast", "direct", "reference")


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
        return self.i2i or self.t2t or bool(self.roles)

    def describe(self) -> str:
        blocks = [b for b, on in (("I2I", self.i2i), ("T2T", self.t2t)) if on]
        if self.roles:
            blocks.append("I2T(" + " ∪ ".join(self.roles) + ")")
        return f"[{float(self.start):.3f}, {float(self.stop):.3f}): " + (" + ".join(blocks) or "untouched")


def _f(k: int, n: int = 57) -> Fraction:
    return Fraction(k, n)


# FLUX.1: d0–d4 untouched · d5–d18 all + I2T(instance) · s0–s4 (instance ∪ background) · s5–s14 (instance ∪
# attribute) · s15–s30 (attribute) · s31–s37 I2T(attribute) only; double blocks are sites 0–18, single 19–56.
REFERENCE_SCHEDULE = (
    Band(_f(0), _f(5), False, False, ()),
    Band(_f(5), _f(19), True, True, (INSTANCE,)),
    Band(_f(19), _f(24), True, True, (INSTANCE, BACKGROUND)),
    Band(_f(24), _f(34), True, True, (INSTANCE, ATTRIBUTE)),
    Band(_f(34), _f(50), True, True, (ATTRIBUTE,)),
    Band(_f(50), _f(57), False, False, (ATTRIBUTE,)),
)


def parse_schedule(spec) -> tuple[Band, ...]:
    """A schedule from Bands, or dicts {"from": 0.0, "to": 0.3, "blocks": ["i2i", "t2t", "i2t"], "roles": [...]}
    (JSON text or a path to a JSON file also work). Depths not covered by any band are untouched."""
    if spec is None:
        return REFERENCE_SCHEDULE
    if isinstance(spec, (str, Path)):
        text = str(spec)
        try:
            spec = json.loads(Path(text).read_text() if Path(text).exists() else text)
        except (json.JSONDecodeError, OSError) as err:
            raise UsageError(f"the AST schedule must be JSON (or a JSON file): {err}") from None
    bands = []
    for i, item in enumerate(spec):
        if isinstance(item, Band):
            bands.append(item)
            continue
        if not isinstance(item, dict) or "from" not in item or "to" not in item:
            raise UsageError(f"schedule band {i}: write it as {{\"from\": 0.1, \"to\": 0.3, \"blocks\": "
                             "[\"i2i\", \"t2t\", \"i2t\"], \"roles\": [\"instance\"]}")
        blocks = {b.lower() for b in item.get("blocks", ["i2i", "t2t", "i2t"])}
        unknown = blocks - {"i2i", "t2t", "i2t"}
        roles = tuple(item.get("roles", []))
        bad_roles = set(roles) - set(ROLES)
        if unknown or bad_roles:
            raise UsageError(f"schedule band {i}: unknown blocks {sorted(unknown)} / roles {sorted(bad_roles)}; "
                             f"blocks are i2i, t2t, i2t and roles {', '.join(ROLES)}")
        if "i2t" in blocks and not roles:
            raise UsageError(f"schedule band {i}: an i2t block needs the roles it tunes towards")
        start, stop = Fraction(str(item["from"])), Fraction(str(item["to"]))
        if not 0 <= start < stop <= 1:
            raise UsageError(f"schedule band {i}: need 0 <= from < to <= 1 (relative depth)")
        bands.append(Band(start, stop, "i2i" in blocks, "t2t" in blocks, roles if "i2t" in blocks else ()))
    return tuple(bands)


class AST(Controller):
    """The AST method as a controller. `layout`: a `Layout`, a dict or a JSON path. Hyperparameters default to the
    specification's FLUX.1-dev values."""

    def __init__(self, layout, *, w_t2t: float = 3.5, w_i2t: float = 5.0, w_i2i: float = 3.5, gamma: float = 3.0,
                 n_mod: int = 16, a_img: float = 1.0, a_txt: float = 4.0, schedule=None, path: str = "fast",
                 approximate: bool = False, roles: str = "auto", i2t_area: str = "region"):
        self.layout: Layout = load_layout(layout)
        self.prompt = self.layout.prompt
        self.w_t2t, self.w_i2t, self.w_i2i = float(w_t2t), float(w_i2t), float(w_i2i)
        self.gamma, self.n_mod = float(gamma), int(n_mod)
        self.a_img, self.a_txt = float(a_img), float(a_txt)
        self.schedule = parse_schedule(schedule)
        if path not in PATHS:
            raise UsageError(f"unknown AST path {path!r}; use one of {', '.join(PATHS)}")
        if approximate and path != "fast":
            raise UsageError("approximate=True is a variant of the fast path; use path='fast'")
        if i2t_area not in ("region", "reference"):
            raise UsageError(f"i2t_area must be 'region' or 'reference', not {i2t_area!r}")
        if self.n_mod < 0:
            raise UsageError("the number of tuned steps must be >= 0")
        self.path, self.approximate, self.role_parser, self.i2t_area = path, approximate, roles, i2t_area
        self.bound = []
        self._tables: dict = {}
        self._probs_sites: set[str] = set()
        self.step = None

    # --- controller API ----------------------------------------------------------------------------------------
    def attach(self, session) -> None:
        if not any(s.kind == "joint" for s in session.sites):
            raise UsageError(
                "AST tunes joint text-image attention (MMDiT models: SD3/3.5, FLUX.1), and this pipeline's denoiser "
                "has only cross-attention (a UNet). For UNet models (SD 1.x/2.x, SDXL) use Attention Regulation "
                "instead (`attnctl generate --method regulation`)."
            )
        if not session.prompts:
            raise UsageError("AST needs the prompt the pipeline is called with: pass prompt=... to attnctl.apply "
                             "(or omit it to use the layout's prompt)")
        self.bound = [self.layout.bind(p, self.role_parser) for p in session.prompts]
        self._tables.clear()
        self._probs_sites = {s.name for s in session.sites
                             if any(c.observer and c.wants(s) for c in session.controllers)}

    def band(self, site) -> Band | None:
        depth = Fraction(site.block, site.num_sites)
        return next((b for b in self.schedule if b.start <= depth < b.stop), None)

    def wants(self, site) -> bool:
        band = self.band(site)
        return site.kind == "joint" and band is not None and band.tunes

    def begin_step(self, step) -> None:
        self.step = step

    def __call__(self, call: AttentionCall) -> None:
        step = call.step
        rows = step.cond_rows
        if step.index >= self.n_mod or rows.stop <= rows.start:
            return
        band = self.band(call.site)
        tau = (max(float(step.timestep), 0.0) / 1000.0) ** self.gamma
        tables = self._tables_for(call, band, rows, tau)
        want_probs = call.site.name in self._probs_sites
        batch = call.q.shape[0]
        partial = rows.stop - rows.start < batch
        q, k, v = call.q[rows], call.k[rows], call.v[rows]
        if self.path == "fast":
            lse = None if self.approximate or q.dtype == torch.float64 else call.lse()[rows]
            out, probs = fast_attention(q, k, v, call.scale, tables, lse=lse, want_text_probs=want_probs,
                                        approximate=self.approximate)
        elif self.path == "direct":
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
        return TuningTables(
            text=call.text, image=call.image, img_label=img_label, i2t_label=i2t_label, t2t_label=t2t_label,
            alpha_i2i=rho_img * (self.w_i2i * tau) if band.i2i else None,
            alpha_i2t=rho_i2t * (self.w_i2t * tau) if band.roles else None,
            alpha_t2t=rho_txt * (self.w_t2t * tau) if band.t2t else None,
        )

    def _prompt_tables(self, prompt: int, grid, n_text: int, band: Band):
        bound = self.bound[min(prompt, len(self.bound) - 1)]
        labels = self.layout.labels(grid).flatten()
        n_img = labels.numel()
        n_regions = len(self.layout.regions)
        counts = torch.bincount(labels, minlength=n_regions + 1).double()
        area = counts[labels] / n_img
        rho_img = 1 - self.a_img * area
        if self.i2t_area == "reference":
            takes_part = torch.ones(n_regions + 1, dtype=torch.bool)
            takes_part[0] = BACKGROUND in band.roles
            rho_i2t = 1 - self.a_img * torch.where(takes_part[labels], area, torch.zeros_like(area))
        else:
            rho_i2t = rho_img
        t2t = -(torch.arange(n_text) + 2)  # unique labels: the identity for tokens in no phrase
        i2t = torch.full((n_text,), -1, dtype=torch.long)
        keep = lambda ps: [p for p in ps if p < n_text]  # noqa: E731
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
        rho_txt = 1 - self.a_txt * row_sum / n_text
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


# --- command line ------------------------------------------------------------------------------------------------

def add_hyperparameter_arguments(parser) -> None:
    """AST's hyperparameters as options (all prefixed --ast-), with the specification's defaults."""
    parser.add_argument("--ast-w-t2t", type=float, default=DEFAULTS["w_t2t"], help="text→text weight (default 3.5)")
    parser.add_argument("--ast-w-i2t", type=float, default=DEFAULTS["w_i2t"], help="image→text weight (default 5.0)")
    parser.add_argument("--ast-w-i2i", type=float, default=DEFAULTS["w_i2i"], help="image→image weight (default 3.5)")
    parser.add_argument("--ast-gamma", type=float, default=DEFAULTS["gamma"],
                        help="time factor (t/1000)^gamma (default 3)")
    parser.add_argument("--ast-steps", type=int, default=DEFAULTS["n_mod"], help="tune the first N steps (default 16)")
    parser.add_argument("--ast-a-img", type=float, default=DEFAULTS["a_img"], help="image area term (default 1.0)")
    parser.add_argument("--ast-a-txt", type=float, default=DEFAULTS["a_txt"], help="text area term (default 4.0)")
    parser.add_argument("--ast-schedule", default=None,
                        help="layer schedule: JSON list (or file) of {from, to, blocks, roles} on relative depth "
                             "(default: the reference's FLUX.1 schedule, by relative depth)")
    parser.add_argument("--ast-path", choices=PATHS, default="fast",
                        help="fast (exact, O(N) memory; default), direct (formula, query-chunked), reference")
    parser.add_argument("--ast-approximate", action="store_true",
                        help="drop the -P term of the bias (one fused pass; not exact)")
    parser.add_argument("--ast-roles", choices=("auto", "spacy", "rules"), default="auto",
                        help="how attribute words are found (auto: spaCy if installed, else the built-in rules)")
    parser.add_argument("--ast-i2t-area", choices=("region", "reference"), default="region",
                        help="I2T area term: each pixel's region (specification) or the reference code's variant")


def add_cli_arguments(parser) -> None:
    """`--layout` and AST's hyperparameters (for `attnctl generate --method ast`)."""
    parser.add_argument("--layout", default=None,
                        help="AST: layout JSON with prompt, background and regions (see attnctl.layout)")
    add_hyperparameter_arguments(parser)


def controller_from_args(args) -> AST:
    if not getattr(args, "layout", None):
        raise UsageError("AST needs a layout: pass --layout L.json (prompt, background and regions; see examples/)")
    return AST(
        args.layout, w_t2t=args.ast_w_t2t, w_i2t=args.ast_w_i2t, w_i2i=args.ast_w_i2i, gamma=args.ast_gamma,
        n_mod=args.ast_steps, a_img=args.ast_a_img, a_txt=args.ast_a_txt, schedule=args.ast_schedule,
        path=args.ast_path, approximate=args.ast_approximate, roles=args.ast_roles, i2t_area=args.ast_i2t_area,
    )
