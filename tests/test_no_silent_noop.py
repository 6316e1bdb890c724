"""Issue 33, no silent no-op: an option that cannot act in the run is a UsageError naming why and the fix, before
anything is moved or tuned; defaults that simply cover a shorter run are kept."""

import re

import numpy as np
import pytest

import attnctl
from attnctl import UsageError
from attnctl.methods.ast import AST
from attnctl.methods.attend_excite import AttendAndExcite, AttendExciteConfig, parse_thresholds
from attnctl.methods.layout_modulation import LayoutModulation

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a cat and a dog"
AE_RUN = dict(num_inference_steps=3, height=64, width=64, output_type="latent")


# --- Attend-and-Excite -----------------------------------------------------------------------------------------------
def test_a_threshold_step_given_twice_is_refused():
    message = ("thresholds '0:0.1,0:0.5' give step 0 more than once; give each step one threshold, such as "
               "0:0.05,10:0.5,20:0.8")
    with pytest.raises(UsageError) as err:
        parse_thresholds("0:0.1,0:0.5")
    assert str(err.value) == message
    with pytest.raises(UsageError, match=r"give step 3, 5 more than once"):
        parse_thresholds("5:0.1,3:0.2,5:0.3,3:0.4,7:0.5")
    assert parse_thresholds("0:0.1,5:0.5") == {0: 0.1, 5: 0.5}
    with pytest.raises(UsageError, match=re.escape("thresholds (--ae-thresholds) {'0': 0.1, 0: 0.5} give a step "
                                                   "more than once (as a number and as text)")):
        AttendExciteConfig(thresholds={"0": 0.1, 0: 0.5})  # an attnctl.json's "0" beside a 0 from Python


def test_the_cli_refuses_a_threshold_step_given_twice(cli):
    code, out, err = cli("generate", "--method", "attend-excite", "--model", "random:sd15-tiny", "--prompt", PROMPT,
                         "--ae-thresholds", "0:0.1,0:0.5")
    assert code == 2
    assert "argument --ae-thresholds: thresholds '0:0.1,0:0.5' give step 0 more than once" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("options, message", [
    (dict(max_iter_to_alter=4, thresholds={}),
     "max_iter_to_alter (--ae-max-iter-to-alter) is 4, more than this run's 3 denoising steps; give at most 3 (every "
     "step moved) or more --steps (num_inference_steps)"),
    (dict(max_iter_to_alter=1, thresholds={0: 0.05, 3: 0.5, 9: 0.8}),
     "thresholds (--ae-thresholds) name step(s) 3, 9, which this run's 3 denoising steps (0 to 2) never reach; give "
     "threshold steps below 3 or more --steps (num_inference_steps)"),
])
def test_attend_and_excite_refuses_steps_past_the_run_before_moving(options, message):
    pipe = tiny_pipe("unet")
    ae = AttendAndExcite(["cat"], **options)
    with attnctl.apply(pipe, ae, prompt=PROMPT) as session:
        with pytest.raises(UsageError) as err:
            session(PROMPT, **AE_RUN)
    assert str(err.value) == message
    assert ae.history == []  # refused before the first move


@pytest.mark.parametrize("options, moved", [
    (dict(max_iter_to_alter=3, thresholds={2: 0.5}, max_refinement_steps=1), [0, 1, 2]),  # the last step each
    (dict(max_refinement_steps=1), [0, 1, 2]),  # the defaults (25; thresholds at 0, 10, 20) on a 3-step run
    (dict(max_iter_to_alter=25, thresholds={0: 0.05, 10: 0.5, 20: 0.8}, max_refinement_steps=1), [0, 1, 2]),
])
def test_attend_and_excite_keeps_values_that_act_and_the_defaults(options, moved):
    pipe = tiny_pipe("unet")
    ae = AttendAndExcite(["cat"], **options)
    with attnctl.apply(pipe, ae, prompt=PROMPT) as session:
        session(PROMPT, **AE_RUN)
    assert [h["step"] for h in ae.history] == moved


# --- AST -------------------------------------------------------------------------------------------------------------
AST_LAYOUT = {"prompt": "a red dog and a grey cat on the grass", "background": "the grass",
              "regions": [{"phrase": "a red dog", "box": [0.0, 0.25, 0.5, 1.0]},
                          {"phrase": "a grey cat", "box": [0.5, 0.25, 1.0, 1.0]}]}


def test_ast_refuses_more_tuned_steps_than_the_run_has():
    pipe = tiny_pipe("sd3")
    prompt = AST_LAYOUT["prompt"]
    kwargs = call_kwargs("sd3", steps=2, output_type="latent")
    with attnctl.apply(pipe, AST(AST_LAYOUT, tuned_steps=3)):
        with pytest.raises(UsageError) as err:
            run(pipe, prompt, **kwargs)
    assert str(err.value) == ("tuned_steps (--ast-tuned-steps) is 3, more than this run's 2 denoising steps; give at "
                              "most 2 (every step tuned) or more --steps (num_inference_steps)")
    plain = run(pipe, prompt, **kwargs)
    for options in (dict(tuned_steps=2), dict(tuned_steps=16)):  # every step; the default 16, even given by name
        with attnctl.apply(pipe, AST(AST_LAYOUT, **options)):
            tuned = run(pipe, prompt, **kwargs)
        assert (tuned - plain).abs().max() > 1e-4, options


# --- layout modulation -----------------------------------------------------------------------------------------------
# two boxes inside the same latent cell at 64 px (8x8 tokens): the second gets no cell at any site's grid
TINY_BOXES = {"prompt": "a red cat and a blue dog on grass", "background": "grass",
              "regions": [{"phrase": "a red cat", "box": [0.0, 0.0, 0.05, 0.05]},
                          {"phrase": "a blue dog", "box": [0.06, 0.0, 0.1, 0.05]}]}


def test_layout_modulation_refuses_a_layout_that_fits_no_site():
    pipe = tiny_pipe("unet")
    prompt = TINY_BOXES["prompt"]
    with attnctl.apply(pipe, LayoutModulation(TINY_BOXES, weight=5.0, steps_fraction=1.0)):
        with pytest.raises(UsageError) as err:
            run(pipe, prompt, **call_kwargs("unet", steps=2))
    assert str(err.value) == (
        "LayoutModulation would change nothing in this run: the layout fits the token grid of none of its 10 attention "
        "sites; at the finest, 8x8: region 2 ('a blue dog') is too small to get a cell of the 8x8 token grid; enlarge "
        "it or generate at a higher resolution (the image size is --height/--width, or height=/width= of the pipeline "
        "call)")
    # at 128 px (16x16 tokens) the same layout fits the finest sites and changes the image
    kwargs = call_kwargs("unet", steps=2, height=128, width=128)
    plain = run(pipe, prompt, **kwargs)
    with attnctl.apply(pipe, LayoutModulation(TINY_BOXES, weight=50.0, steps_fraction=1.0)):
        moved = run(pipe, prompt, **kwargs)
    assert np.abs(moved - plain).max() > 1e-4
