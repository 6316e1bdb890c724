"""attnctl: training-free attention control for diffusers text-to-image pipelines.

    import attnctl
    with attnctl.apply(pipe, attnctl.Regulation(["cat", "dog"]), prompt="a cat and a dog"):
        image = pipe("a cat and a dog").images[0]
"""

from .analysis import Hierarchy
from .control import AttentionCall, Controller, Session, StepState, apply
from .errors import UsageError
from .layout import Layout
from .methods.ast import AST, ASTConfig
from .methods.attend_excite import AttendAndExcite, AttendExciteConfig
from .methods.capture import Capture, CaptureConfig
from .methods.layout_modulation import LayoutModulation, LayoutModulationConfig
from .methods.regulation import Regulation, RegulationConfig
from .models import load_pipeline
from .sites import AttentionSite

__all__ = ["apply", "Capture", "CaptureConfig", "Regulation", "RegulationConfig", "AST", "ASTConfig",
           "AttendAndExcite", "AttendExciteConfig", "LayoutModulation", "LayoutModulationConfig", "Hierarchy",
           "Layout", "Controller", "AttentionCall", "AttentionSite", "Session", "StepState", "UsageError",
           "load_pipeline"]
__version__ = "0.1.0"
