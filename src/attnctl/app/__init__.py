"""`attnctl app`: a web page to paint a layout and generate with every method, on the package's own code.

    page = attnctl.app.Page(model="builtin:shapes-mmdit")
    page.blocks().launch()          # or: attnctl app

Needs the app extra: pip install 'attnctl[app]'.
"""

from __future__ import annotations

from ..errors import UsageError

try:
    import gradio  # noqa: F401
except ImportError as err:  # the app's extra is not installed
    raise UsageError("the app needs Gradio: pip install 'attnctl[app]'") from err

from .page import CSS, Page

__all__ = ["Page", "CSS"]
