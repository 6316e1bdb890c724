"""attnctl: training-free attention control for diffusers text-to-image pipelines.

    import attnctl
    with attnctl.apply(pipe, attnctl.Regulation(["cat", "dog"]), prompt="a cat and a dog"):
        image = pipe("a cat and a dog").images[0]

One generation as the command line and the page run it: `attnctl.generate(attnctl.Request(...))` (`attnctl.run`).

Every method's controller and config (`attnctl.Regulation`, `attnctl.RegulationConfig`, ...) is exported from the
method registry (`attnctl.methods.registry.METHODS`).
"""

from .analysis import Hierarchy
from .control import AttentionCall, Controller, Session, StepState, apply, prompt_tokens, sites_of
from .errors import UsageError
from .layout import Layout
from .methods.capture import Capture, CaptureConfig
from .methods.registry import METHODS
from .models import load_pipeline
from .run import Output, Pipelines, Request, generate
from .sampling import SamplingConfig
from .sites import AttentionSite

_METHOD_EXPORTS = {cls.__name__: cls for m in METHODS.values() for cls in (m.controller, m.config)}
globals().update(_METHOD_EXPORTS)

__all__ = ["apply", "sites_of", "prompt_tokens", "Capture", "CaptureConfig", *_METHOD_EXPORTS, "Hierarchy", "Layout",
           "Controller", "AttentionCall", "AttentionSite", "Session", "StepState", "UsageError", "load_pipeline",
           "Request", "SamplingConfig", "generate", "Output", "Pipelines"]
__version__ = "0.1.0"
