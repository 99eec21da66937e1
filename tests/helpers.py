"""Test helpers: small learnable datasets, and float tolerances that follow from the computation.

Datasets: the tests make them themselves (no download, no fonts). Each class is a random smooth colour pattern;
its images are the pattern under random shifts and noise, so a few-shot learner can beat chance on classes it
has never seen while a broken pipeline cannot.

Tolerances: :func:`assert_close_f64` (two formulas, compared in float64) and :func:`float32_noise_floor` /
:func:`assert_within_float32_noise` (a float32 computation against its exact value, at a bound measured from
float32 rounding and the computation's conditioning).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import struct

import numpy as np
import torch
from PIL import Image


def make_split(n_classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``images`` uint8 (N, size, size, 3) and ``labels`` int64 (N,), class-major."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n_classes, 4, 4, 3)).astype(np.uint8)
    imgs = []
    for c in range(n_classes):
        base = np.asarray(Image.fromarray(coarse[c]).resize((size + 4, size + 4), Image.BILINEAR), dtype=np.float32)
        for _ in range(per_class):
            dy, dx = rng.integers(0, 5, 2)
            crop = base[dy:dy + size, dx:dx + size] + rng.normal(0, 25, (size, size, 3))
            imgs.append(np.clip(crop, 0, 255).astype(np.uint8))
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int64)
    return np.stack(imgs), labels


def make_npz(path: str, size: int = 16, per_class: int = 20, classes=(12, 6, 6), seed: int = 0) -> str:
    """An ``.npz`` pack in the embedded-data format with train/val/test splits."""
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        imgs, labels = make_split(classes[i], per_class, size, seed + 101 * i)
        arrays[f"{split}_images"] = imgs
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_classes"] = np.array([f"{split}_{c:02d}" for c in range(classes[i])])
    np.savez_compressed(path, **arrays)
    return path


def make_folders(root: str, size: int = 16, per_class: int = 20, classes=(12, 6, 6), seed: int = 0,
                 ext: str = "png") -> str:
    """The official layout ``root/{train,val,test}/<class>/<image>``. Class names are numbered across the splits
    (train ``n0000``.., then val, then test), as real splits never share a class (split hygiene refuses that)."""
    first = 0
    for i, split in enumerate(("train", "val", "test")):
        imgs, labels = make_split(classes[i], per_class, size, seed + 101 * i)
        for j, (img, lab) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, f"n{first + lab:04d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{j:05d}.{ext}"))
        first += classes[i]
    return root


# ------------------------------------------------------------------------------------------------------------
# Float tolerances that follow from the computation
# ------------------------------------------------------------------------------------------------------------
#
# Two kinds of float comparison appear in the tests:
#
# * Two formulas that are equal in exact arithmetic (closed form vs autograd, batched vs per task, ...): both are
#   evaluated in float64 and compared with :func:`assert_close_f64`.
# * A float32 computation against its exact value: the float64 evaluation of the same float32 data, compared with
#   :func:`assert_within_float32_noise` at a tolerance measured by :func:`float32_noise_floor`.
#
# Neither depends on which BLAS kernels, summation order or thread count a machine picks.

U32 = 2.0 ** -24  # float32 unit roundoff: fl(z) = z * (1 + d), |d| <= U32
U64 = 2.0 ** -53  # float64 unit roundoff
F64_RTOL = 1e-10


def _named(x) -> dict:
    return dict(x) if isinstance(x, dict) else {"value": x}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))


def assert_close_f64(actual, expected, rtol: float = F64_RTOL) -> None:
    """Two formulas that are equal in exact arithmetic, both evaluated in float64: per tensor (or per entry of a
    dict of tensors), ``||actual - expected|| <= rtol * ||expected||`` (Frobenius norms).

    Why ``rtol = 1e-10``: a float64 evaluation has the rounding noise of the float32 one scaled by
    ``U64 / U32 = 2**-29``. The float32 tolerances of this suite (:func:`float32_noise_floor` times its factor)
    are at most ~1e-4 relative, so float64 rounding stays below ~2e-13 relative: 1e-10 leaves a margin of
    several hundred for any machine, thread count or summation order, and is still ~1e6 times smaller than the
    changes that the tests guard against (one inner step more or less, a wrong scale or sign: >= 1e-4 relative).
    Norm-wise rather than element-wise, so tiny elements (whose relative error is meaningless) cannot fail it.
    """
    actual, expected = _named(actual), _named(expected)
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k in expected:
        a, b = actual[k], expected[k]
        assert a.dtype == b.dtype == torch.float64, f"{k}: {a.dtype} / {b.dtype}: compare formulas in float64"
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = _rel_err(a, b)
        assert err <= rtol, f"{k}: relative error {err:.3e} > {rtol:.0e} (float64)"


class _Rounding(torch.autograd.Function):
    """x * (1 + d_fwd) forward, g * (1 + d_bwd) backward: one simulated rounding of a value and, independently,
    of the gradient that flows back through it. The backward is made of differentiable ops (second order)."""

    @staticmethod
    def forward(ctx, x, d_fwd, d_bwd):
        ctx.save_for_backward(d_bwd)
        return x * (1 + d_fwd)

    @staticmethod
    def backward(ctx, g):
        (d_bwd,) = ctx.saved_tensors
        return g * (1 + d_bwd), None, None


class Float32Noise:
    """One draw of simulated float32 rounding inside a float64 computation (see :func:`float32_noise_floor`).

    ``noise(t)`` returns ``t * (1 + d)`` with ``d`` uniform in ``[-U32, U32]`` per element, and perturbs the
    gradient flowing back through it by an independent ``d``; ``with noise.on(module):`` perturbs the module's
    parameters and floating buffers in place and the output of every leaf module (forward and backward) during
    the block. ``Float32Noise(None)`` is the exact computation: the identity.
    """

    def __init__(self, seed: int | None):
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)

    def _d(self, t: torch.Tensor) -> torch.Tensor:
        return U32 * (2 * torch.rand(t.shape, generator=self.gen, dtype=t.dtype) - 1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.gen is None or not t.is_floating_point():
            return t
        assert t.dtype == torch.float64, "simulate float32 rounding in float64"
        return _Rounding.apply(t, self._d(t), self._d(t))

    @contextlib.contextmanager
    def on(self, module: torch.nn.Module):
        if self.gen is None:
            yield module
            return
        with torch.no_grad():
            for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
                t.mul_(1 + self._d(t))
        hooks = [m.register_forward_hook(lambda _m, _i, out: self(out)) for m in module.modules()
                 if not list(m.children()) and not isinstance(m, torch.nn.Identity)]
        try:
            yield module
        finally:
            for h in hooks:
                h.remove()


NO_NOISE = Float32Noise(None)


def float32_noise_floor(compute, draws: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """The float32 rounding noise of a computation, measured in float64: ``(reference, floor)``.

    ``compute(noise)`` runs the computation in float64 on the float32 data (``.double()`` of the float32 inputs and
    parameters) and returns a dict of float64 tensors (losses, gradients, BN buffers, ...). It applies ``noise``
    (:class:`Float32Noise`) to what float32 would round: ``with noise.on(model)`` (parameters, buffers, every layer's
    output and the gradient flowing back through it), the inputs, and the iterates of any loop it writes out.
    ``reference = compute(NO_NOISE)`` is the exact result of the float32 data (float64 is exact to
    ~1e-14 relative here, see :func:`assert_close_f64`). ``floor[name]`` is Delta, the largest
    ``||y_draw - reference||`` over ``draws`` draws of the noise, the result itself rounded once more too.

    Derivation. Float32 rounds every operation's result, ``fl(z) = z (1 + d)`` with ``|d| <= u = 2**-24``. A draw
    makes these perturbations, with random ``d``, at every stage of the float64 computation that it reaches (the
    inputs, every parameter and buffer, every layer's output and gradient, the loop iterates, the results), so Delta
    is the float32 noise *as the computation's own conditioning propagates it* (cancellation, BN over a few samples,
    the inner loop's amplification), not a guessed ``rtol``. What a draw does not model is the rounding *inside* a
    reduction: a sum of ``n`` terms accumulated one after another rounds ``n`` partial sums; as a random walk their
    combined error is ``sqrt((n + 1) / 4) ~ sqrt(n) / 2`` times that of one rounding of each term (variances
    ``u^2 s^2 n(n+1)/6`` vs ``u^2 s^2 2n/3`` for terms of size ``s``). That fully sequential order is the worst a BLAS
    kernel or a thread split can pick (blocked, pairwise and split sums are shorter chains), so a float32
    implementation is expected within ``sqrt(n)/2 * Delta`` of the exact result. The tolerance is ``K * Delta`` with
    ``K = sqrt(longest_sum)``: ``longest_sum`` the longest sum anywhere in the computation (forward or backward: a
    conv's ``C_in k^2``, a BN statistic's or a conv weight gradient's ``N H W``) and one more factor 2 for the
    spread between a few draws and a fresh rounding pattern. Norm-wise per tensor, so the bound does not hinge on
    tiny elements. Two float32 implementations that each pass are within ``2 K Delta`` of each other.
    ``tests/trainer/test_speed_paths.py`` shows the bound is tight enough to fail: a gradient off by 1% or an inner
    loop one step short exceeds it. Measured there (meta steps of resnet12_slim, one and two threads, default and
    forced-SSE / reproducible-mode MKL and oneDNN kernels): float32 errors of at most 0.1 x the bound.
    """
    reference = compute(NO_NOISE)
    floor = {k: 0.0 for k in reference}
    for i in range(draws):
        noise = Float32Noise(seed + 1 + i)
        out = compute(noise)
        assert out.keys() == reference.keys()
        for k, v in out.items():
            floor[k] = max(floor[k], float((noise(v.detach()) - reference[k]).norm()))
    return reference, floor


def float32_error_ratios(actual, reference: dict, floor: dict, longest_sum: int) -> dict:
    """Per tensor ``||actual - reference|| / (K * Delta)``, ``K = sqrt(longest_sum)`` (see
    :func:`float32_noise_floor`); a ratio above 1 fails :func:`assert_within_float32_noise`."""
    actual = _named(actual)
    assert actual.keys() == reference.keys(), (sorted(actual), sorted(reference))
    k_factor = math.sqrt(longest_sum)
    out = {}
    for k, ref in reference.items():
        a = actual[k]
        assert a.shape == ref.shape, f"{k}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
        assert floor[k] > 0, f"{k}: zero noise floor (the computation does not depend on its inputs?)"
        out[k] = float((a.detach().double() - ref).norm()) / (k_factor * floor[k])
    return out


def assert_within_float32_noise(actual, reference: dict, floor: dict, longest_sum: int, what: str = "") -> dict:
    """A float32 result (dict of tensors named as ``reference``) is within ``sqrt(longest_sum) * Delta`` of the
    exact one, per tensor (:func:`float32_noise_floor`). Returns the ratios error / bound."""
    ratios = float32_error_ratios(actual, reference, floor, longest_sum)
    worst = sorted(ratios.items(), key=lambda kv: -kv[1])
    bad = [(k, r) for k, r in worst if not r <= 1.0]
    assert not bad, (f"{what}: float32 error above sqrt({longest_sum}) x noise floor for "
                     + ", ".join(f"{k} ({r:.2f}x the bound)" for k, r in bad[:5]))
    return ratios


# ---------------------------------------------------------------------------------------------------------------------
# Python-2-style pickles (the MetaOptNet / RFS benchmark pickles and the official TensorFlow ``weights.npy`` were
# written by Python 2): byte strings as ``BINSTRING`` opcodes, ``__builtin__`` and ``numpy.core`` module names.
# ---------------------------------------------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be overridden
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", None)
        name = name or obj.__qualname__
        module = {"builtins": "__builtin__", "numpy._core.multiarray": "numpy.core.multiarray",
                  "numpy._core.numeric": "numpy.core.numeric"}.get(module, module)
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    dispatch[type] = save_global


def py2_pickle_dumps(obj) -> bytes:
    """``obj`` pickled as Python 2's ``cPickle.dump(obj, f, protocol=2)`` wrote it: every ``str`` and ``bytes`` is a
    Python 2 byte string (so ``pickle.load`` without ``encoding="latin1"`` fails on the arrays, as on the real files),
    globals under their Python 2 / numpy 1 names. Strings must be latin-1 encodable."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def py2_object_npy(path: str, obj) -> str:
    """An ``.npy`` file as Python 2 ``np.save(path, obj_dict)`` wrote it: a version 1.0 header for a 0-d object array,
    then the Python-2-style pickle of that array (how the official TensorFlow MTL ``weights.npy`` files are stored)."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(py2_pickle_dumps(arr))
    return path
