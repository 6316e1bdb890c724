"""The Python API checks its arguments (issue 33): controllers are instances, each passed once; a prompt is a string
or a list of strings; `load_pipeline` refuses a device that holds no data. Each a UsageError naming the fix, before
anything is attached."""

import pytest

import attnctl
from attnctl.errors import UsageError

from conftest import tiny_pipe


@pytest.mark.parametrize("controllers, message", [
    (("capture",), "apply takes controllers such as attnctl.Capture(...)"),
    ((attnctl.Capture,), "not the class Capture: instantiate it, e.g. attnctl.Capture(...)"),
    ((attnctl.Regulation,), "not the class Regulation: instantiate it"),
])
def test_apply_takes_controller_instances(controllers, message):
    pipe = tiny_pipe("unet")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with attnctl.apply(pipe, *controllers, prompt="a cat"):
            pass
    assert dict(pipe.unet.attn_processors) == before


def test_the_same_controller_twice_and_a_prompt_of_another_type_are_refused():
    pipe = tiny_pipe("unet")
    capture = attnctl.Capture(["cat"])
    with pytest.raises(UsageError, match="the same controller was passed to apply twice"):
        with attnctl.apply(pipe, capture, capture, prompt="a cat"):
            pass
    for prompt in (123, ["a cat", 5], [], b"a cat"):
        with pytest.raises(UsageError, match="prompt must be the prompt the pipeline will be called with"):
            with attnctl.apply(pipe, capture, prompt=prompt):
                pass
    with attnctl.apply(pipe, capture, attnctl.Capture(["cat"]), prompt=("a cat",)):  # two captures, a tuple: fine
        pass


def test_load_pipeline_refuses_a_device_without_data():
    with pytest.raises(UsageError, match="device meta holds no weights or images"):
        attnctl.load_pipeline("random:sd15-tiny", device="meta")


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_a_pipeline_called_with_another_prompt_than_applys_is_refused(family):
    """The methods find their words in the prompt `apply` was given; a call with another prompt would edit the wrong
    tokens without a word. The same prompt (also as a list, several images each) runs."""
    pipe = tiny_pipe(family)
    kwargs = dict(num_inference_steps=1, height=64, width=64, output_type="latent")
    with attnctl.apply(pipe, attnctl.Capture(["cat"]), prompt="a red cat"):
        with pytest.raises(UsageError, match="was called with the prompt 'a blue dog', but attnctl.apply was given "
                                             "'a red cat'.*pass the same prompt to both"):
            pipe("a blue dog", **kwargs)
        pipe(["a red cat"], num_images_per_prompt=2, **kwargs)


def test_prompt_embeddings_under_guidance_are_not_taken_for_another_prompt():
    """With prompt_embeds the encoder only encodes the negative prompt: that is not the prompt, and runs."""
    pipe = tiny_pipe("unet")
    embeds = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
    with attnctl.apply(pipe, attnctl.Capture(["cat"]), prompt="a red cat"):
        pipe(prompt_embeds=embeds, num_inference_steps=1, height=64, width=64, output_type="latent")
