"""Non-finite values (NaN, +-inf) stop every phase: the one home of the check that pre-train, meta-train, validation,
meta-test and checkpoint loading share.

A float32 overflow does not raise: an inner loop at a huge step (``--base_lr 1e30``) or a checkpoint holding a NaN
gives NaN logits, ``argmax`` of a row of NaNs is 0, and the accuracy comes out as a plausible-looking chance level
(20.00 +- 0.00 at 5 ways). So each phase checks what it computed, cheaply: one reduction per tensor, at most one
host synchronisation per chunk of work (:func:`all_finite`); only once something is found to be non-finite is it
located (:func:`first_nonfinite_row`, :func:`first_nonfinite_key`) for the message.

:class:`NonFiniteError` is the one-line error; ``what`` (the step and the place), ``advice`` (the flags to change,
with their values) and the middle ``context`` (what was kept) let a caller restate it in its own terms (a
validation inside a training names the epoch and the last good checkpoint).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from utils.errors import UserError

__all__ = ["NonFiniteError", "all_finite", "first_nonfinite_row", "first_nonfinite_key", "describe_nonfinite"]


class NonFiniteError(UserError):
    """``{what}; {context}. {advice}`` on one line (:class:`utils.errors.UserError`, exit 2)."""

    def __init__(self, what: str, advice: str, context: str = "nothing was written", kind: str = ""):
        self.what, self.advice, self.context, self.kind = what, advice, context, kind
        super().__init__(f"{what}; {context}. {advice}")


def all_finite(tensors: torch.Tensor | Iterable[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` (one tensor or several; integer tensors are finite) is finite: one
    ``isfinite().all()`` per tensor on its device, one host synchronisation for all."""
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    flags = [torch.isfinite(t).all() for t in ts if t.is_floating_point() or t.is_complex()]
    if not flags:
        return True
    if len(flags) == 1:
        return bool(flags[0])
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def first_nonfinite_row(t: torch.Tensor) -> int | None:
    """The index along dim 0 of the first row of ``t`` ``(N, ...)`` holding a NaN or an infinity, or ``None``."""
    if t.shape[0] == 0:
        return None
    bad = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1))
    return int(bad[0]) if len(bad) else None


def describe_nonfinite(t: torch.Tensor) -> str:
    """``'2 nan, 1 inf of 432 values'``: what is wrong in ``t``, for a message."""
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    parts = [f"{n} {w}" for n, w in ((n_nan, "nan"), (n_inf, "inf")) if n]
    return f"{', '.join(parts)} of {t.numel()} values"


def first_nonfinite_key(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in the mapping's order, e.g. a state dict's) whose floating tensor holds a NaN or an infinity,
    or ``None``; one host synchronisation when all are finite."""
    floats = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if all_finite(v for _, v in floats):
        return None
    return next(k for k, v in floats if not all_finite(v))
