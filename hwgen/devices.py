"""The torch devices hwgen computes float work on (the host driver's ops, the
float distillation stage): one list and one check, read by every flag that
takes a device."""
from __future__ import annotations

import torch

#: the device names a ``--device``-like flag accepts
DEVICES = ("cpu", "cuda")


def torch_device(device: str, flag: str = "--device") -> torch.device:
    """The torch device named ``device``; a ``ValueError`` naming ``flag`` when
    the name is unknown or torch sees no CUDA GPU for ``cuda``."""
    if device not in DEVICES:
        raise ValueError(f"{flag} {device}: unknown device, expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                         f"False); use {flag} cpu")
    return torch.device(device)


def default_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``: the device long float work
    (the bench's distillation stages) picks when nobody names one."""
    return "cuda" if torch.cuda.is_available() else "cpu"
