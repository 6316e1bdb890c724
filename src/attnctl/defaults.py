"""The built-in models used when no model is named: the UNet one for the methods on text cross-attention (and the
plain pipeline), the MMDiT one for the methods on joint attention. Both ship in the package (`attnctl/builtin/`)."""

DEFAULT_MODEL = "builtin:shapes-unet"
DEFAULT_JOINT_MODEL = "builtin:shapes-mmdit"
