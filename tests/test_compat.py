"""attnctl next to other things a user does with a pipeline: a second `apply` inside the first, processors changed
while attached, processors attnctl cannot reproduce, `torch.compile`, and calling the pipeline twice."""

import re

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Capture, UsageError

from conftest import call_kwargs, denoiser_of, run, tiny_pipe

PROMPT = "a red dog and a grey cat"


def pipeline_state(denoiser):
    """What attaching may change: the processor objects, an instance `forward`, the diffusers hook registry."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    return (dict(denoiser.attn_processors), denoiser.__dict__.get("forward"),
            None if registry is None else list(registry.hooks))


def captured(pipe, capture, steps=2, name="unet", **extra):
    with attnctl.apply(pipe, capture, prompt=PROMPT):
        image = run(pipe, PROMPT, **call_kwargs(name, steps=steps, **extra))
    return image, capture.maps()


def assert_same_maps(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- 1. a second apply on the same pipeline -------------------------------------------------------------------------
@pytest.mark.parametrize("disjoint", [False, True], ids=["same-sites", "disjoint-sites"])
def test_nested_apply_is_refused_and_the_outer_session_keeps_working(disjoint):
    pipe = tiny_pipe("unet")
    before = pipeline_state(pipe.unet)
    first, second = (s.name for s in attnctl.sites_of(pipe)[:2])
    outer_sites, inner_sites = ([first], [second]) if disjoint else (None, None)
    image, maps = captured(pipe, Capture(["dog"], sites=outer_sites))

    outer = Capture(["dog"], sites=outer_sites)
    with attnctl.apply(pipe, outer, prompt=PROMPT):
        during = pipeline_state(pipe.unet)
        with pytest.raises(UsageError, match=r"already attached to this pipeline; put all controllers in one apply"):
            with attnctl.apply(pipe, Capture(["cat"], sites=inner_sites), prompt=PROMPT):
                pass
        assert pipeline_state(pipe.unet) == during  # the refused apply changed nothing
        again = run(pipe, PROMPT, **call_kwargs("unet", steps=2))
    assert np.array_equal(again, image)
    assert_same_maps(outer.maps(), maps)
    assert pipeline_state(pipe.unet) == before


# --- 2. processors changed while attached ---------------------------------------------------------------------------
def test_attention_slicing_turned_on_inside_apply_is_an_error_and_stays_on(caplog):
    pipe = tiny_pipe("unet")
    before = pipeline_state(pipe.unet)
    try:
        with pytest.raises(UsageError, match=r"got a new processor while attnctl.apply was attached.*"
                                             r"\(attention slicing, IP-Adapter, set_attn_processor\) before entering"):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pipe.enable_attention_slicing()
                run(pipe, PROMPT, **call_kwargs("unet", steps=2))
        processors = pipe.unet.attn_processors
        assert {type(p).__name__ for p in processors.values()} == {"SlicedAttnProcessor"}  # the user's change kept
        assert pipeline_state(pipe.unet)[1:] == before[1:]
        assert f"{len(attnctl.sites_of(pipe))} site(s)" in caplog.text and "left as the user set them" in caplog.text
    finally:
        pipe.unet.set_attn_processor(dict(before[0]))  # it empties the dict it is given
    assert pipeline_state(pipe.unet) == before


def test_a_processor_set_inside_apply_is_an_error_and_kept_while_the_others_are_restored(caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_pipe("unet")
    before = pipeline_state(pipe.unet)
    site = attnctl.sites_of(pipe)[3].name
    custom = AttnProcessor2_0()
    try:
        expected = rf"1 attention site\(s\), e.g. {re.escape(site)} \(now AttnProcessor2_0\), got a new"
        with pytest.raises(UsageError, match=expected):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pipe.unet.get_submodule(site).set_processor(custom)
                run(pipe, PROMPT, **call_kwargs("unet", steps=2))
        after = pipeline_state(pipe.unet)
        assert after[0][f"{site}.processor"] is custom
        assert after[0] == {**before[0], f"{site}.processor": custom} and after[1:] == before[1:]
        assert f"1 site(s), e.g. {site}, got a new attention processor" in caplog.text
    finally:
        pipe.unet.set_attn_processor(dict(before[0]))  # it empties the dict it is given
    assert pipeline_state(pipe.unet) == before


# --- 3. processors attnctl cannot reproduce: the message names what gives the model's own back ----------------------
class CustomProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        raise AssertionError("never called")


def refusal(pipe, install) -> str:
    """The UsageError of `apply` after `install(pipe)` set other processors; the pipeline is put back after."""
    before = pipeline_state(pipe.unet)
    try:
        install(pipe)
        changed = pipeline_state(pipe.unet)
        with pytest.raises(UsageError) as err:
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pass
        assert pipeline_state(pipe.unet) == changed  # the refusal left everything as it was
    finally:
        pipe.unet.set_attn_processor(dict(before[0]))
    assert pipeline_state(pipe.unet) == before
    return str(err.value)


def ip_adapter_on_first_site(pipe):  # the torch-1 variant (IPAdapterAttnProcessor2_0 is supported)
    from diffusers.models.attention_processor import IPAdapterAttnProcessor

    site = pipe.unet.get_submodule(attnctl.sites_of(pipe)[0].name)
    site.set_processor(IPAdapterAttnProcessor(site.inner_dim, site.cross_attention_dim))


def custom_on_first_site(pipe):
    pipe.unet.get_submodule(attnctl.sites_of(pipe)[0].name).set_processor(CustomProcessor())


def xformers_everywhere(pipe):  # what enable_xformers_memory_efficient_attention sets, without needing xformers
    from diffusers.models.attention_processor import XFormersAttnProcessor

    pipe.unet.set_attn_processor(XFormersAttnProcessor())


KNOWN = "which attnctl cannot reproduce exactly (it knows AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0); "


@pytest.mark.parametrize("install, advice", [
    (lambda pipe: pipe.enable_attention_slicing(),
     f"SlicedAttnProcessor, {KNOWN}attention slicing is on: call `pipe.disable_attention_slicing()`, then call "
     "attnctl.apply."),
    (ip_adapter_on_first_site,
     f"IPAdapterAttnProcessor, {KNOWN}an IP-Adapter is loaded through a processor attnctl does not reproduce (it "
     "supports diffusers' IPAdapterAttnProcessor2_0 on UNets, SD3IPAdapterJointAttnProcessor2_0 on SD3 and "
     "FluxIPAdapterAttnProcessor on FLUX.1): call `pipe.unload_ip_adapter()`, then call attnctl.apply."),
    (xformers_everywhere,
     f"XFormersAttnProcessor, {KNOWN}xformers attention is on: call "
     "`pipe.disable_xformers_memory_efficient_attention()`, then call attnctl.apply."),
    (custom_on_first_site,
     f"CustomProcessor, {KNOWN}it is a custom processor: remove it, putting back the processors the model had before "
     "it was set (`denoiser.set_attn_processor(saved)` with `saved = dict(denoiser.attn_processors)` taken before), "
     "then call attnctl.apply."),
], ids=["slicing", "ip-adapter", "xformers", "custom"])
def test_refused_processors_are_named_with_what_puts_the_models_own_back(install, advice):
    pipe = tiny_pipe("unet")
    message = refusal(pipe, install)
    assert message == f"{attnctl.sites_of(pipe)[0].name} uses the attention processor {advice}"


# --- 4. torch.compile -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, how", [("flux", "wrapper"), ("unet", "in-place")])
def test_a_compiled_denoiser_gives_the_eager_result_and_compiles_only_at_the_first_step(name, how):
    from torch._dynamo.testing import CompileCounter

    pipe = tiny_pipe(name)
    attr = "unet" if name == "unet" else "transformer"
    module = getattr(pipe, attr)
    before = pipeline_state(module)
    expected_image, expected_maps = captured(pipe, Capture(["dog"]), steps=3, name=name)
    counter = CompileCounter()  # an eager backend that counts the frames dynamo compiles
    frames = []

    def count_frames(pipe, step, timestep, tensors):
        frames.append(counter.frame_count)
        return tensors

    try:
        if how == "wrapper":
            setattr(pipe, attr, torch.compile(module, backend=counter))  # pipe.transformer = torch.compile(...)
        else:
            module.compile(backend=counter)
        compiled = getattr(pipe, attr)
        compiled_before = counter.frame_count
        for first in (True, False):
            frames.clear()
            image, maps = captured(pipe, Capture(["dog"]), steps=3, name=name, callback_on_step_end=count_frames)
            assert np.array_equal(image, expected_image)  # bit for bit
            assert_same_maps(maps, expected_maps)
            assert getattr(pipe, attr) is compiled and pipeline_state(module) == before
            # everything compiled in the first step, nothing after: the step is not a guard (no recompiles)
            assert frames == [frames[0]] * 3
            assert frames[0] > compiled_before if first else frames[0] == compiled_before  # the second: nothing new
            compiled_before = frames[0]
    finally:
        setattr(pipe, attr, module)
        module._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_attaching_to_a_torch_compile_wrapper_changes_the_wrapped_module_and_keeps_the_wrapper(name):
    pipe = tiny_pipe(name)
    attr = "unet" if name == "unet" else "transformer"
    module = getattr(pipe, attr)
    before = pipeline_state(module)
    wrapper = torch.compile(module, backend="eager")  # compiles nothing until it is called
    try:
        setattr(pipe, attr, wrapper)
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
            assert session.denoiser is module
            kinds = {type(p).__name__ for p in module.attn_processors.values()}
            assert ("UNetCrossProcessor" if name == "unet" else "SD3JointProcessor") in kinds
        assert getattr(pipe, attr) is wrapper and pipeline_state(module) == before
    finally:
        setattr(pipe, attr, module)


# --- 5. the same call twice inside one apply --------------------------------------------------------------------------
class Events(attnctl.Controller):
    observer = True

    def attach(self, session):
        self.events = []

    def begin_run(self):
        self.events.append("run")

    def begin_step(self, step):
        self.events.append(step.index)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_begin_run_comes_once_at_the_start_of_every_pipeline_call(name):
    pipe = tiny_pipe(name)
    events = Events()
    with attnctl.apply(pipe, events, prompt=PROMPT):
        run(pipe, PROMPT, **call_kwargs(name, steps=3))
        run(pipe, PROMPT, **call_kwargs(name, steps=2))
    assert events.events == ["run", 0, 1, 2, "run", 0, 1]


def test_regulation_gives_the_same_image_when_called_twice_in_one_apply():
    from attnctl import Regulation

    pipe = tiny_pipe("unet")
    kwargs = call_kwargs("unet", steps=3, height=256, width=256, output_type="latent")  # its layers at 8x8
    plain = run(pipe, PROMPT, **kwargs)
    with attnctl.apply(pipe, Regulation(["dog", "cat"], edit_steps=2, iterations=2), prompt=PROMPT):
        first = run(pipe, PROMPT, **kwargs)
        second = run(pipe, PROMPT, **kwargs)
    with attnctl.apply(pipe, Regulation(["dog", "cat"], edit_steps=2, iterations=2), prompt=PROMPT):
        fresh = run(pipe, PROMPT, **kwargs)
    assert not torch.equal(first, plain)  # it did edit
    assert torch.equal(second, first) and torch.equal(fresh, first)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_after_detach_the_compiled_denoiser_runs_its_graphs_again_bit_identical(name):
    """A regulated (UNet) or tuned (FLUX) run inside compile must not leave the model eager or changed afterwards."""
    from attnctl import AST, Regulation

    pipe = tiny_pipe(name)
    module = denoiser_of(name, pipe)
    graph_calls, compiled_frames = [0], [0]

    def counting_backend(graph, example_inputs):  # eager, but counts compiled frames and every run of one
        compiled_frames[0] += 1

        def run_graph(*args):
            graph_calls[0] += 1
            return graph.forward(*args)
        return run_graph

    if name == "unet":
        kwargs = call_kwargs(name, steps=2, height=256, width=256, output_type="latent")
        method = Regulation(["dog", "cat"], edit_steps=2, iterations=2)
    else:
        kwargs = call_kwargs(name, steps=2, output_type="latent")
        method = AST({"prompt": PROMPT, "regions": [{"phrase": "red dog", "box": [0, 0, 0.5, 1]}]})
    eager = run(pipe, PROMPT, **kwargs)
    try:
        module.compile(backend=counting_backend)
        assert torch.equal(run(pipe, PROMPT, **kwargs), eager)
        run(pipe, PROMPT, **kwargs)
        frames_plain = compiled_frames[0]
        with attnctl.apply(pipe, method, prompt=PROMPT):
            controlled = run(pipe, PROMPT, **kwargs)
        assert not torch.equal(controlled, eager)
        calls_before, frames_before = graph_calls[0], compiled_frames[0]
        after = run(pipe, PROMPT, **kwargs)
        assert torch.equal(after, eager)  # bit for bit
        assert graph_calls[0] > calls_before  # it ran compiled graphs, not eager code
        assert compiled_frames[0] - frames_before <= frames_plain  # at most the plain graph compiled once more
        frames_after = compiled_frames[0]
        run(pipe, PROMPT, **kwargs)
        assert compiled_frames[0] == frames_after  # settled: no recompiles in later plain calls
    finally:
        module._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.parametrize("install, advice", [
    (lambda pipe: pipe.enable_attention_slicing(), lambda pipe: pipe.disable_attention_slicing()),
    (xformers_everywhere, lambda pipe: pipe.disable_xformers_memory_efficient_attention()),
], ids=["slicing", "xformers"])
def test_the_advice_of_a_refusal_works(install, advice):
    pipe = tiny_pipe("unet")
    before = pipeline_state(pipe.unet)
    plain = run(pipe, PROMPT, **call_kwargs("unet", steps=2))
    try:
        install(pipe)
        with pytest.raises(UsageError):
            with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT):
                pass
        advice(pipe)
        image, maps = captured(pipe, Capture(["dog"]))
        assert np.array_equal(image, plain) and maps
    finally:
        pipe.unet.set_attn_processor(dict(before[0]))
