"""Checkpoint files, generically: atomic writes, safe loading, strict key checks.

What a file holds and how a model is rebuilt from it (our checkpoints and their model spec, the official PyTorch
``{"params": ...}``, the TF ``.npy`` folder) is ``models/loading.py``; this module knows no format but the tag
:data:`FORMAT` that every file this program writes carries (model checkpoints and resume states alike).

Every load uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code. Every state dict is
loaded strictly through :func:`load_strict`, which names the first mismatches instead of dropping keys
silently (the official meta trainer filters unknown keys without a word, reference section 3.1), and refuses a
tensor holding a NaN or an infinity (:func:`check_finite_weights`). :func:`save_atomic` writes through
:func:`utils.misc.atomic_write`: a full disk or a read-only folder is one line naming the file, never a truncated
checkpoint.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Iterable

import torch
from torch import nn

from utils.errors import UserError
from utils.finite import describe_nonfinite, first_nonfinite_key
from utils.misc import atomic_write

FORMAT = "mtl-pytorch/1"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and ``os.replace`` (:func:`utils.misc.atomic_write`): a crash at
    any moment leaves either the old checkpoint or the new one, never a truncated one."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint safely (``weights_only=True``, on CPU) or raise a one-line :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's message starts with a paragraph on the weights_only default; the line naming the refused
        # global ("Trying to load unsupported GLOBAL posix.system ...") is the one that says what is wrong.
        refused = next((ln for ln in lines if "GLOBAL" in ln), None)
        if refused is None:  # "Unsupported operand 123": the bytes are no pickle at all (a text file, random data)
            detail = next((ln for ln in lines if "nsupported" in ln), lines[-1] if lines else type(e).__name__)
            raise UserError(f"checkpoint {path} is not a PyTorch checkpoint (its bytes are no torch.save file or "
                            f"pickle: {detail[:80]}); pass the .pth file the run wrote")
        raise UserError(f"checkpoint {path} cannot be loaded safely (weights_only=True refused it: {refused[:160]})")
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{type(e).__name__}")
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                allow_missing: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` or raise a :class:`UserError` naming the first mismatches.

    Args:
        allow_missing: key suffixes that may be absent (e.g. ``("mtl_weight", "mtl_bias")`` when a plain
            pre-trained encoder is loaded into the scaling/shifting encoder: Phi starts at 1 and 0).
    """
    allow = tuple(allow_missing)
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(allow)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:2])})")
    if problems:
        raise UserError(f"{what} does not fit the model: " + "; ".join(problems))
    check_finite_weights(state, what)
    module.load_state_dict(state, strict=False)


def check_finite_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """A one-line :class:`UserError` naming the first tensor of ``state`` that holds a NaN or an infinity (one pass
    over the weights, :func:`utils.finite.first_nonfinite_key`): a run stops before it saves a non-finite model, so
    such a file was damaged or written by other code, and every number computed from it would be meaningless."""
    key = first_nonfinite_key(state)
    if key is not None:
        raise UserError(f"{what} holds non-finite weights: {key} has {describe_nonfinite(state[key])} (a damaged "
                        "file, or one saved by a run that diverged); use another checkpoint")
