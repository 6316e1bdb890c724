"""The AST controller on tiny random FLUX and SD3 pipelines: exactness of its paths inside a real pipeline, the plain
pipeline back when no step is tuned, classifier-free guidance rows, batches, bf16, the layer schedule, bad input."""

import types
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl import UsageError
from attnctl.control import AttentionCall, Session, StepState
from attnctl.families.flux import FluxFamily
from attnctl.layout import Layout
from attnctl.methods.ast import AST, REFERENCE_SCHEDULE, parse_schedule
from attnctl.methods.ast_attention import reference_attention
from attnctl.methods.capture import Capture
from attnctl.tokens import PromptTokens

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red dog and a grey cat on the grass"
LAYOUT = {"prompt": PROMPT, "background": "the grass",
          "regions": [{"phrase": "a red dog", "box": [0.0, 0.25, 0.5, 1.0]},
                      {"phrase": "a grey cat", "box": [0.5, 0.25, 1.0, 1.0]}]}
JOINT = ["flux", "sd3"]


def kwargs(name, **extra):
    return call_kwargs(name, steps=3, height=128, width=128, **extra)


def generate(name, *controllers, prompt=PROMPT, **extra):
    pipe = tiny_pipe(name)
    with attnctl.apply(pipe, *controllers, prompt=prompt):
        return run(pipe, prompt, **kwargs(name, **extra))


@pytest.mark.parametrize("name", JOINT)
def test_no_tuned_steps_gives_the_plain_pipeline_exactly(name):
    plain = run(tiny_pipe(name), PROMPT, **kwargs(name))
    ast = AST(LAYOUT, tuned_steps=0)
    assert np.array_equal(generate(name, ast), plain)


def test_strength_scales_the_weights_and_zero_is_plain():
    plain = run(tiny_pipe("sd3"), PROMPT, **kwargs("sd3"))
    assert np.array_equal(generate("sd3", AST(LAYOUT, strength=0.0)), plain)
    assert np.array_equal(generate("sd3", AST(LAYOUT, strength=1.0)), generate("sd3", AST(LAYOUT)))
    # strength s is the same as every weight times s (τ·s·w = τ·(s·w))
    half = generate("sd3", AST(LAYOUT, strength=0.5))
    weights = generate("sd3", AST(LAYOUT, w_t2t=1.75, w_i2t=2.5, w_i2i=1.75))
    assert np.abs(half - weights).max() < 1e-5  # float32 rounding of τ·s·w against τ·(s·w)


@pytest.mark.parametrize("name", JOINT)
def test_fast_and_direct_paths_equal_the_formula_in_a_pipeline(name):
    plain = run(tiny_pipe(name), PROMPT, **kwargs(name))
    paths = ("reference", "direct", "fast", "flex")
    images = {path: generate(name, AST(LAYOUT, implementation=path)) for path in paths}
    # float32 computation against the float64 formula, through 3 steps and the VAE: measured ≤ 2e-6
    for path in paths[1:]:
        assert np.abs(images[path] - images["reference"]).max() < 2e-5, path
    assert np.abs(images["fast"] - plain).max() > 1e-3  # and AST does change the image


def test_batches_and_several_images_per_prompt():
    one = generate("flux", AST(LAYOUT, implementation="reference"), num_images_per_prompt=2)
    fast = generate("flux", AST(LAYOUT), num_images_per_prompt=2)
    assert one.shape[0] == 2 and np.abs(fast - one).max() < 2e-5
    two = generate("sd3", AST(LAYOUT), prompt=[PROMPT, PROMPT])
    ref = generate("sd3", AST(LAYOUT, implementation="reference"), prompt=[PROMPT, PROMPT])
    assert two.shape[0] == 2 and np.abs(two - ref).max() < 2e-5


def test_bf16_runs_and_matches_the_direct_path():
    pipe = attnctl.load_pipeline("random:flux-tiny", dtype=torch.bfloat16)
    out = {}
    for path in ("fast", "direct"):
        with attnctl.apply(pipe, AST(LAYOUT, implementation=path)):
            out[path] = run(pipe, PROMPT, **kwargs("flux"))
    assert np.isfinite(out["fast"]).all()
    assert np.abs(out["fast"] - out["direct"]).max() < 0.05  # bf16 activations between the blocks


def test_cfg_tunes_only_the_conditional_rows():
    """SD3 with guidance: the batch is [uncond; cond]; the unconditional half must come out as plain attention."""
    pipe = tiny_pipe("sd3")
    ast = AST(LAYOUT)
    session = Session(pipe, [ast])
    session.prompts = [PromptTokens(PROMPT, session.family.text_segments(pipe))]
    ast.attach(session)
    site = next(s for s in session.sites if ast.wants(s))
    n_img, n_txt, heads, dim = 64, 333, 2, 8
    step = StepState(index=0, num_steps=3, timestep=900.0, batch_size=2, cond_rows=slice(1, 2), token_grid=(8, 8),
                     text_len=n_txt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n_img + n_txt, dim, generator=g) for _ in range(3))
    call = AttentionCall(site, step, q, k, v, text=slice(n_img, n_img + n_txt), image=slice(0, n_img), grid=(8, 8))
    ast.begin_step(step)
    ast(call)
    out = call.output()
    plain = F.scaled_dot_product_attention(q, k, v)
    assert (out[0] - plain[0]).abs().max() < 1e-6
    tables = ast._tables_for(call, ast.band(site), slice(1, 2), 0.9 ** 3)
    want, _ = reference_attention(q[1:], k[1:], v[1:], call.scale, tables)
    assert (out[1:].double() - want).abs().max() < 1e-6
    assert (out[1] - plain[1]).abs().max() > 1e-3


def test_tables_follow_the_layout_and_roles():
    pipe = tiny_pipe("flux")
    ast = AST(LAYOUT, role_parser="rules")
    session = Session(pipe, [ast])
    tokens = PromptTokens(PROMPT, session.family.text_segments(pipe))
    session.prompts = [tokens]
    ast.attach(session)
    grid, n_text = (4, 4), 32
    strings = tokens.token_strings
    for band in REFERENCE_SCHEDULE[1:]:
        labels, i2t, t2t, rho_img, rho_i2t, rho_txt = ast._prompt_tables(0, grid, n_text, band)
        assert torch.equal(labels, ast.layout.labels(grid).flatten())
        selected = {r: sorted(strings[j] for j in range(n_text) if i2t[j] == r) for r in (0, 1, 2)}
        want = {0: [], 1: [], 2: []}
        if "instance" in band.roles:
            want[1] += ["a", "dog"]
            want[2] += ["a", "cat"]
        if "attribute" in band.roles:
            want[1] += ["red"]
            want[2] += ["grey"]
        if "background" in band.roles:
            want[0] += ["grass", "the"]
        assert selected == {r: sorted(w) for r, w in want.items()}, band
        # area terms: 1 - a_img * |region| / HW, and 1 - a_txt * (tokens in the phrase) / L_text
        assert torch.allclose(rho_img, 1 - (labels[:, None] == labels[None]).sum(1).float() / 16)
        dog = tokens.phrase_positions("a red dog")
        assert abs(rho_txt[dog[0]].item() - (1 - 4.0 * 3 / 32)) < 1e-6
        assert abs(rho_txt[30].item() - (1 - 4.0 / 32)) < 1e-6  # a padding token: the identity only


def test_reference_i2t_area_option():
    pipe = tiny_pipe("flux")
    ast = AST(LAYOUT, i2t_area="reference")
    session = Session(pipe, [ast])
    session.prompts = [PromptTokens(PROMPT, session.family.text_segments(pipe))]
    ast.attach(session)
    labels, _, _, rho_img, rho_i2t, _ = ast._prompt_tables(0, (4, 4), 32, REFERENCE_SCHEDULE[1])
    assert torch.equal(rho_i2t[labels > 0], rho_img[labels > 0])
    assert (rho_i2t[labels == 0] == 1).all()  # instance-only band: the background does not count
    _, _, _, rho_img, rho_i2t, _ = ast._prompt_tables(0, (4, 4), 32, REFERENCE_SCHEDULE[2])
    assert torch.equal(rho_i2t, rho_img)  # instance ∪ background band: every region counts


def _reference_flux_rule(position: int):
    """The reference code's own test for its 57 attention calls per step (1-based call position within a step)."""
    if position <= 19:  # double-stream blocks: tuned after the fifth
        return (True, True, ("instance",)) if position > 5 else (False, False, ())
    self_blocks = position <= 50
    if position <= 24:
        roles = ("instance", "background")
    elif position <= 34:
        roles = ("instance", "attribute")
    else:
        roles = ("attribute",)
    return self_blocks, self_blocks, roles


def test_schedule_equals_the_reference_block_for_block_on_flux1():
    transformer = types.SimpleNamespace(transformer_blocks=[None] * 19, single_transformer_blocks=[None] * 38)
    sites = FluxFamily().discover(transformer)
    ast = AST(LAYOUT)
    for site in sites:
        band = ast.band(site)
        want = _reference_flux_rule(site.block + 1)
        assert (band.i2i, band.t2t, band.roles) == want, site.name
        assert ast.wants(site) == (site.block >= 5)


def test_schedule_maps_by_relative_depth_and_can_be_overridden():
    ast = AST(LAYOUT)
    sd35 = [types.SimpleNamespace(block=i, num_sites=38, kind="joint") for i in range(38)]
    roles = [ast.band(s).roles if ast.band(s).i2i else ("untouched",) if not ast.band(s).roles else ("i2t only",)
             for s in sd35]
    # 38 blocks: depth i/38 against the bands at k/57 (i.e. 2k/3 blocks)
    assert roles[:4] == [("untouched",)] * 4 and roles[4] == ("instance",)
    assert roles[12] == ("instance",) and roles[13] == ("instance", "background")
    assert roles[33] == ("attribute",) and roles[34] == ("i2t only",)
    custom = AST(LAYOUT, schedule='[{"from": 0, "to": 0.5, "blocks": ["i2t"], "roles": ["attribute"]}]')
    expected = parse_schedule([{"from": 0, "to": 0.5, "blocks": ["i2t"], "roles": ["attribute"]}])[0]
    assert custom.band(sd35[0]) == expected
    assert custom.band(sd35[0]).start == Fraction(0) and not custom.band(sd35[0]).i2i
    assert custom.band(sd35[20]) is None and not custom.wants(sd35[20])
    with pytest.raises(UsageError, match="i2t block needs the roles"):
        AST(LAYOUT, schedule=[{"from": 0, "to": 1, "blocks": ["i2t"]}])


def test_observers_see_the_tuned_maps():
    maps = {}
    for path in ("reference", "fast", None):
        capture = Capture(["dog", "cat"])
        controllers = [AST(LAYOUT, implementation=path), capture] if path else [capture]
        generate("flux", *controllers)
        maps[path] = capture.maps()
    for name, m in maps["reference"].items():
        assert (maps["fast"][name] - m).abs().max() < 1e-5
    assert max((maps[None][n] - m).abs().max().item() for n, m in maps["reference"].items()) > 1e-3


def test_unet_pipelines_are_pointed_to_regulation():
    with pytest.raises(UsageError, match="use Attention Regulation"):
        with attnctl.apply(tiny_pipe("unet"), AST(LAYOUT)):
            pass


def test_phrase_not_in_the_called_prompt():
    with pytest.raises(UsageError, match="'a red dog' is not part of the prompt"):
        generate("flux", AST(LAYOUT), prompt="a cat on the grass")


def test_phrase_cut_by_the_sequence_length():
    prompt = "a cat on the grass " + "and more " * 20 + "a red dog"
    layout = {"prompt": prompt, "background": "", "regions": [{"phrase": "a red dog", "box": [0, 0, 0.5, 0.5]}]}
    with pytest.raises(UsageError, match="beyond the 32 text tokens"):
        generate("flux", AST(layout), prompt=prompt)


def test_layout_object_and_bad_options():
    lay = Layout.from_dict(LAYOUT)
    assert AST(lay).prompt == PROMPT
    with pytest.raises(UsageError, match="implementation .* must be one of fast, flex, direct, reference"):
        AST(lay, implementation="flash")
    with pytest.raises(UsageError, match="variant of the fast implementation"):
        AST(lay, implementation="direct", approximate=True)
    with pytest.raises(UsageError, match="unknown ASTConfig option.*n_mod"):
        AST(lay, n_mod=3)


def test_cli_generate_writes_images_and_overlays(tmp_path, cli):
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    base = ["generate", "--method", "ast", "--model", "random:flux-tiny", "--steps", "2", "--height", "64", "--width",
            "64"]
    code, out, err = cli(*base, "--layout", examples / "sketch_layout.json", "--ast-tuned-steps", "1",
                         "--out", tmp_path)
    assert code == 0, err
    assert {"image.png", "image_layout.png"} <= {p.name for p in tmp_path.iterdir()}
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "a red dog", "regions": [{"phrase": "a blue dog", "box": [0, 0, 1, 1]}]}')
    code, out, err = cli(*base, "--layout", bad, "--out", tmp_path / "x")
    assert code == 2 and "'a blue dog'): the phrase is not part of the prompt" in err
    assert "Traceback" not in err
    code, out, err = cli(*base, "--layout", bad, "--layers", "all", "--out", tmp_path / "x")
    assert code == 2 and "--layers belong to --method regulation" in err


def test_auto_runs_flex_on_cuda_and_fast_elsewhere():
    """The default implementation (issue 31): the fused flex kernel where it is compiled (CUDA), the fast path
    elsewhere and for the approximate variant; a named implementation runs as named."""
    from attnctl.methods.ast import ASTConfig, resolved_implementation

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ASTConfig().implementation == "auto"
    assert (resolved_implementation(ASTConfig(), cuda), resolved_implementation(ASTConfig(), cpu)) == ("flex", "fast")
    assert resolved_implementation(ASTConfig(approximate=True), cuda) == "fast"
    assert resolved_implementation(ASTConfig(implementation="direct"), cuda) == "direct"
