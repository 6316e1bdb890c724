"""attnctl: training-free attention control for diffusers text-to-image pipelines."""

from .control import AttentionCall, Controller, Session, StepState, apply
from .errors import UsageError
from .layout import Layout
from .methods.ast import AST
from .methods.capture import Capture
from .methods.regulation import Regulation
from .models import load_pipeline
from .sites import AttentionSite

__all__ = ["apply", "Capture", "Regulation", "AST", "Layout", "Controller", "AttentionCall", "AttentionSite", "Session", "StepState",
           "UsageError", "load_pipeline"]
__version__ = "0.1.0"
