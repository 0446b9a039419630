"""Which device a command runs on: ``--device auto|cpu|cuda`` resolved once, with a clear error.

``auto`` is CUDA when torch sees a GPU, else CPU. Asking for CUDA on a machine without one is a
user error (one line), not a traceback from deep inside torch or bitsandbytes.
"""
from __future__ import annotations

import torch

from qpissa.errors import UserError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto | cpu | cuda (auto: cuda when available)"


def resolve_device(device: str, flag: str = "--device") -> str:
    """``auto`` → ``cuda``/``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` pass through once checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"{flag} {device!r}: choose one of {', '.join(DEVICES)}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device} requested but CUDA is not available (torch sees no GPU); use {flag} cpu or auto")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
