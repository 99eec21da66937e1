"""Device selection and the GPU speed switches (AMP, channels_last).

The official ``set_gpu`` only sets ``CUDA_VISIBLE_DEVICES`` and its default (``'1'``) hides the only GPU of a
single-GPU machine. Here ``--gpu`` is applied only when given, and ``--device auto`` picks CUDA when present.
"""
from __future__ import annotations

import contextlib
import os

import torch

from utils.errors import UserError


def set_gpu(gpu: str | None) -> None:
    """Restrict the visible GPUs (``--gpu 0`` or ``--gpu 0,1``); ``None`` leaves the environment alone."""
    if gpu is not None and gpu != "":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available "
                        "(use --device cpu or --device auto)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled`` (``--amp``); a no-op context otherwise. Default numerics stay
    fp32 so results are comparable with the official code."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch with a non-blocking copy from pinned memory on CUDA."""
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x
