"""Where and in what precision attnctl runs: the devices and dtypes it accepts, each checked with a message naming
the fix."""

from __future__ import annotations

import torch

from .errors import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype a name of `DTYPES` stands for ("fp16", "bf16", ...); a UsageError listing them otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def checked_device(device, what: str = "device") -> torch.device:
    """`device` (a name such as "cuda:0", or a torch.device) as a torch device this machine has; a UsageError naming
    `what` (a flag, on the command line) and the fix otherwise. `meta` holds no data and is refused."""
    try:
        if isinstance(device, bool):
            raise TypeError
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{what} {device!r} is not a device; use cpu, cuda or cuda:N, or mps") from None
    if device.type not in ("cpu", "cuda", "mps", "meta"):
        raise UsageError(f"{what} {device}: attnctl runs on cpu, cuda (cuda:N) or mps, not {device.type}")
    if device.type == "meta":
        raise UsageError(f"{what} meta holds no weights or images; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what} {device}: this torch build or machine has no CUDA device; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{what} {device}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{what} {device}: MPS is not available here; use cpu")
    return device
