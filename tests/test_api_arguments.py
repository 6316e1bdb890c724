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
