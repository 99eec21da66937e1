"""Device selection and the speed switches: AMP (bfloat16 autocast on CUDA and the CPU), channels_last, compile.

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


AMP_DTYPES = ("auto", "bfloat16")
"""``--amp_dtype``: ``auto`` = bfloat16 where the device runs it natively, else float32 (one line says so);
``bfloat16`` = bfloat16 even where it is emulated (a CPU without avx512_bf16 / amx_bf16: slower than float32,
for measuring the accuracy cost)."""

# the CPU features with native bfloat16 arithmetic (the keys of torch.cpu.get_capabilities(), cpuinfo's flag names)
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86 (2), arm64 (2)

_noted: set[str] = set()  # the one-line notes already printed in this process


def _note(key: str, line: str) -> None:
    if key not in _noted:
        _noted.add(key)
        print(line, flush=True)


def amp_mode(amp: bool, amp_dtype: str = "auto") -> str:
    """The run's precision request from ``--amp`` and ``--amp_dtype``: ``off`` | ``auto`` | ``bfloat16``."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}")
    return amp_dtype if amp else "off"


CPUINFO = "/proc/cpuinfo"


def _cpuinfo_flags(path: str | None = None) -> set[str]:
    """The CPU's feature flags from ``path`` (default :data:`CPUINFO`; x86 ``flags``, arm64 ``Features``); empty if
    unreadable."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_bf16_feature() -> str | None:
    """The CPU feature that runs bfloat16 natively (``avx512_bf16``, ``amx_bf16``; arm64 ``bf16``, ``sve_bf16``),
    or ``None`` where bfloat16 would be emulated in float32 arithmetic (slower than float32, e.g. avx2 only).

    Read from ``torch.cpu.get_capabilities()`` (cpuinfo, torch >= 2.8), else from ``/proc/cpuinfo``.
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used: oneDNN also says yes on plain avx512.)"""
    try:
        caps = dict(torch.cpu.get_capabilities())
        have = {k for k, v in caps.items() if v is True}
    except (AttributeError, RuntimeError):
        have = _cpuinfo_flags()
    return next((f for f in NATIVE_BF16_FEATURES if f in have), None)


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype of a run: ``torch.bfloat16``, or ``None`` for float32.

    ``amp``: ``False``/``"off"`` (float32), ``True``/``"auto"`` (``--amp``: bfloat16 where native, else float32
    with one line), ``"bfloat16"`` (``--amp --amp_dtype bfloat16``: bfloat16 even where emulated, one line on a CPU
    without native support). On CUDA both requests give bfloat16 on a GPU with bf16 support; elsewhere float32 and
    one warning (fp16 would need a ``GradScaler``, which is not kept). Each line is printed once per process."""
    mode = ("auto" if amp else "off") if isinstance(amp, bool) else amp
    if mode not in ("off",) + AMP_DTYPES:
        raise ValueError(f"amp must be a bool or one of off, auto, bfloat16; got {amp!r}")
    if mode == "off":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        _note("cuda", "warning: --amp needs a GPU with bf16 support; running in fp32")
        return None
    if device.type != "cpu":
        _note(device.type, f"note: --amp is used on CUDA and the CPU only; running in float32 on {device.type}")
        return None
    feature = cpu_bf16_feature()
    if feature is not None:
        _note("cpu-native", f"note: --amp: bfloat16 autocast on the CPU ({feature})")
        return torch.bfloat16
    if mode == "auto":
        _note("cpu-float32", "note: --amp: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16); running in "
              "float32 (--amp_dtype bfloat16 runs emulated bfloat16, slower)")
        return None
    _note("cpu-emulated", "note: --amp_dtype bfloat16: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16): "
          "bfloat16 is emulated, slower than float32 (for measuring its accuracy, not its speed)")
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool | str):
    """bfloat16 autocast when :func:`amp_dtype` says so (``--amp``, on CUDA and the CPU); a no-op context otherwise.
    Default numerics stay fp32 so results are comparable with the official code.

    ``enabled``: a bool (``--amp``) or the :func:`amp_mode` string (``off`` | ``auto`` | ``bfloat16``).
    bf16 has fp32's exponent range, so no gradient scaler is needed (and none is kept in ``resume.pth``). Under
    it only the encoder (and the pre-train head) run in bfloat16: the inner loop and the query logits run in float32
    (:meth:`models.mtl.MetaLearner.forward_tasks`), the losses are computed on float32 logits, and the parameters,
    optimizer state and checkpoints stay float32."""
    dt = amp_dtype(device, enabled)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


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
    evaluation (``models/evaluate.py``) keeps using the uncompiled module. Without CUDA (or without the flag)
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
