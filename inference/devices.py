"""Whether a device a user named is one this machine has, asked before any work rather than at the first model load."""

from __future__ import annotations


def cuda_device_problem(device: str) -> str | None:
    """What is wrong with a ``cuda`` or ``cuda:N`` device here (torch sees no GPU, or fewer than N + 1), else None.

    Any other device string is not judged (None). Imports torch only for a CUDA device.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU on this machine; use cpu (or auto, which takes a GPU where there is one)"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        return f"this machine has {count} CUDA GPU{'s' if count != 1 else ''} ({gpus})"
    return None
