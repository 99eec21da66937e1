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


_warned_no_bf16 = False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled`` (``--amp``); a no-op context otherwise. Default numerics stay
    fp32 so results are comparable with the official code.

    bf16 has fp32's exponent range, so no gradient scaler is needed (and none is kept in ``resume.pth``). fp16
    would need a ``GradScaler``; on a GPU without bf16 ``--amp`` is therefore ignored (fp32, one warning)."""
    global _warned_no_bf16
    if enabled and device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if not _warned_no_bf16:
            _warned_no_bf16 = True
            print("warning: --amp needs a GPU with bf16 support; running in fp32", flush=True)
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch with a non-blocking copy from pinned memory on CUDA."""
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x


def use_channels_last(device: torch.device, enabled: bool) -> bool:
    """``--channels_last`` applies on CUDA only (on the CPU the default layout is as fast or faster)."""
    return bool(enabled) and device.type == "cuda"


def to_channels_last(x: torch.Tensor, device: torch.device, enabled: bool) -> torch.Tensor:
    """A float image batch (B, 3, S, S) in ``channels_last`` memory format when :func:`use_channels_last`;
    the same values either way."""
    return x.contiguous(memory_format=torch.channels_last) if use_channels_last(device, enabled) else x


_noted_compile_cpu = False


def maybe_compile(module: torch.nn.Module, device: torch.device, enabled: bool) -> torch.nn.Module:
    """``--compile``: a ``torch.compile`` wrapper of ``module`` for the training steps, on CUDA only.

    The wrapper shares the parameters and buffers of ``module`` but is never registered as a submodule, so the
    model's ``state_dict`` (checkpoints, ``resume.pth``) keeps its plain keys (no ``_orig_mod.`` prefix), and
    evaluation (``trainer/evaluate.py``) keeps using the uncompiled module. Without CUDA (or without the flag)
    ``module`` itself is returned; on the CPU a one-line note says that ``--compile`` is ignored.
    """
    global _noted_compile_cpu
    if not enabled:
        return module
    if device.type != "cuda":
        if not _noted_compile_cpu:
            _noted_compile_cpu = True
            print("note: --compile is used on CUDA only; the CPU run is not compiled", flush=True)
        return module
    return torch.compile(module)
