"""The official TensorFlow MTL weight files (``weights.npy``, ``ss_weights.npy``, ``fc_weights.npy``) <-> our ResNet-12.

The files (``tensorflow/models/resnet12.py`` L168-239 builds the variables, ``tensorflow/trainer/meta.py`` L222-229 and
L266-272 saves them with ``np.save`` of a dict; the downloads were written by Python 2, so they are read with
``encoding="latin1"``, as ``tensorflow/trainer/meta.py`` L84/L124-126 do):

* ``weights.npy``: for ``block1``..``block4``: ``<block>_conv1..3`` 3x3 kernels HWIO ``[3, 3, in, out]``,
  ``<block>_bias1..3`` ``[out]``, ``<block>_conv_res`` the 1x1 shortcut ``[1, 1, in, out]`` (no bias); widths
  64-128-256-512 for the paper's ResNet-12. A pre-train snapshot may also hold its classifier ``w5`` ``[512, C]``,
  ``b5`` ``[C]``.
* ``ss_weights.npy``: ``<block>_conv1..3`` ``[1, 1, in, out]`` (the SS scaling Phi_S1, tiled over the kernel,
  ``resnet12.py`` L45-56) and ``<block>_bias1..3`` ``[out]``: the SS shift, which the TF meta graph uses *instead of*
  the conv bias (``block_forward`` L128-150); meta-training starts it at the pre-trained bias (``trainer/meta.py``
  L91-94). The shortcut has no scaling.
* ``fc_weights.npy``: the base learner ``w5`` ``[512, way]``, ``b5`` ``[way]``.

The mapping onto :class:`models.resnet_mtl.ResNet12` with TF BatchNorm (``models/bn_mode.py``, ``--bn_mode tf``),
tensor by tensor, every key checked (a missing, extra or mis-shaped key is a one-line
:class:`utils.errors.UserError` naming it):

============================  ===============================================  =========================================
TF                            ours                                             layout
============================  ===============================================  =========================================
``block<k>_conv<j>``          ``layer<k>.conv<j>.weight`` (frozen W)           HWIO -> OIHW (``permute(3, 2, 0, 1)``)
``block<k>_bias<j>``          ``layer<k>.conv<j>.bias`` (frozen b)             (out,)
``block<k>_conv_res``         ``layer<k>.shortcut.weight``                     HWIO -> OIHW
ss ``block<k>_conv<j>``       ``layer<k>.conv<j>.mtl_weight`` (Phi_S1)         [1, 1, in, out] -> (out, in, 1, 1)
ss ``block<k>_bias<j>``       ``layer<k>.conv<j>.mtl_bias`` = ss - b (Phi_S2)  (out,); effective bias b + Phi_S2 = ss
(none)                        ``layer<k>.shortcut.mtl_weight`` = 1             TF has no SS on the shortcut
fc ``w5``, ``b5``             ``base_learner.weight`` = w5^T, ``.bias`` = b5   [D, way] -> (way, D)
weights ``w5``, ``b5``        ``pre_fc.weight`` = w5^T, ``.bias`` = b5         [D, C] -> (C, D) (pre-train snapshot)
============================  ===============================================  =========================================

TF convolutions are cross-correlations like PyTorch's, ``'SAME'`` at stride 1 is padding 1 for a 3x3 kernel, the
2x2 ``'VALID'`` max pool is ``MaxPool2d(2)``, and the final 5x5 ``'VALID'`` average pool of an 84-px input is the
global average pool. Inputs are pixels / 255 (``--preprocess paper``).

The files are pickles, which run code when loaded with numpy: they are read only through
:func:`utils.safe_pickle.load_object_npy` (numpy arrays, dicts, strings and numbers; anything else is refused before
any of it runs). They are written (:func:`save_tf_weights`, the exporter ``python -m tools.export_tf_weights``) with
``np.save`` of a dict, atomically.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from utils.errors import UserError
from utils.misc import atomic_write
from utils.safe_pickle import load_object_npy

from .resnet_mtl import BACKBONES, ResNet12, build_backbone
from .spec import Expect, ModelSpec, Weights

__all__ = ["TF_FILES", "TENSORFLOW", "is_tf_weights", "tf_folder", "resnet12_widths", "read_tf_weights",
           "read_tf_model", "tf_to_state_dicts", "state_dicts_to_tf", "save_tf_weights"]

TF_FILES = ("weights.npy", "ss_weights.npy", "fc_weights.npy")
TENSORFLOW = "TensorFlow"  # the source named by models.spec.Weights.source
BLOCKS = 4
CONVS = 3


def is_tf_weights(path: str) -> bool:
    """True when a checkpoint flag names TF weights: a folder, or an ``.npy`` file."""
    return os.path.isdir(path) or path.lower().endswith(".npy")


def tf_folder(path: str) -> str:
    """The folder of TF weights named by ``path`` (the folder itself, or its ``weights.npy``)."""
    if not os.path.exists(path):
        raise UserError(f"TensorFlow weights not found: {path} (a folder holding {', '.join(TF_FILES)}, or its "
                        "weights.npy)")
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) == "weights.npy":
        folder = os.path.dirname(path) or "."
    else:
        raise UserError(f"{path}: TensorFlow weights are given as their folder or its weights.npy "
                        f"(the folder holds {', '.join(TF_FILES)})")
    if not os.path.isfile(os.path.join(folder, "weights.npy")):
        raise UserError(f"no weights.npy in {folder} (TensorFlow weights: weights.npy, and for a meta-trained "
                        "model ss_weights.npy and fc_weights.npy)")
    return folder


def resnet12_widths(encoder: nn.Module, path: str) -> tuple[int, ...]:
    """The four block widths of a ResNet-12 encoder; a one-line error for any other backbone."""
    if not isinstance(encoder, ResNet12):
        raise UserError(f"{path}: TensorFlow weights are a ResNet-12; use --backbone resnet12 (or resnet12_wide / "
                        f"resnet12_slim for those widths), not {getattr(encoder, 'name', type(encoder).__name__)}")
    return tuple(getattr(encoder, f"layer{k}").conv1.out_channels for k in range(1, BLOCKS + 1))


def _expected(widths: tuple[int, ...]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """TF key -> shape for ``weights.npy`` (without the optional w5/b5) and ``ss_weights.npy``."""
    w, ss = {}, {}
    chans = (3,) + tuple(widths)
    for k in range(1, BLOCKS + 1):
        cin, cout = chans[k - 1], chans[k]
        for j in range(1, CONVS + 1):
            ci = cin if j == 1 else cout
            w[f"block{k}_conv{j}"] = (3, 3, ci, cout)
            w[f"block{k}_bias{j}"] = (cout,)
            ss[f"block{k}_conv{j}"] = (1, 1, ci, cout)
            ss[f"block{k}_bias{j}"] = (cout,)
        w[f"block{k}_conv_res"] = (1, 1, cin, cout)
    return w, ss


def _read_dict(path: str) -> dict[str, np.ndarray]:
    obj = load_object_npy(path)
    if not isinstance(obj, dict):
        raise UserError(f"TensorFlow weights {path} hold a {type(obj).__name__}, not a dict of arrays")
    out = {}
    for k, v in obj.items():
        k = k.decode("latin1") if isinstance(k, bytes) else k
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu":
            raise UserError(f"TensorFlow weights {path}: key {k!r} does not hold a numeric array")
        out[k] = v
    return out


def _check(d: dict[str, np.ndarray], expected: dict[str, tuple[int | None, ...]], path: str,
           optional: dict[str, tuple[int | None, ...]] | None = None) -> None:
    optional = optional or {}
    missing = [k for k in expected if k not in d]
    extra = [k for k in d if k not in expected and k not in optional]
    if missing:
        raise UserError(f"TensorFlow weights {path}: missing key {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    if extra:
        raise UserError(f"TensorFlow weights {path}: unexpected key {sorted(extra)[0]}"
                        f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    for k, v in d.items():
        want = expected.get(k, optional.get(k))
        if len(v.shape) != len(want) or any(w is not None and w != s for w, s in zip(want, v.shape)):
            shown = tuple("?" if w is None else w for w in want)
            raise UserError(f"TensorFlow weights {path}: key {k} has shape {tuple(v.shape)}, the model needs "
                            f"({', '.join(str(x) for x in shown)}{',' if len(shown) == 1 else ''})")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def tf_to_state_dicts(weights: dict[str, np.ndarray], ss: dict[str, np.ndarray] | None = None,
                      fc: dict[str, np.ndarray] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Checked TF dicts -> ``(encoder_sd, head_sd)`` in our keys (see the module table). Without ``ss`` the encoder
    state dict is the plain one (no ``mtl_*`` keys) and ``head_sd`` the pre-train classifier (or None); with ``ss``
    and ``fc`` it is the SS encoder and ``head_sd`` the base learner."""
    enc: dict[str, torch.Tensor] = {}
    for k in range(1, BLOCKS + 1):
        for j in range(1, CONVS + 1):
            b = _t(weights[f"block{k}_bias{j}"])
            enc[f"layer{k}.conv{j}.weight"] = _t(weights[f"block{k}_conv{j}"]).permute(3, 2, 0, 1).contiguous()
            enc[f"layer{k}.conv{j}.bias"] = b
            if ss is not None:
                enc[f"layer{k}.conv{j}.mtl_weight"] = _t(ss[f"block{k}_conv{j}"]).permute(3, 2, 0, 1).contiguous()
                enc[f"layer{k}.conv{j}.mtl_bias"] = _t(ss[f"block{k}_bias{j}"]) - b
        res = _t(weights[f"block{k}_conv_res"]).permute(3, 2, 0, 1).contiguous()
        enc[f"layer{k}.shortcut.weight"] = res
        if ss is not None:
            enc[f"layer{k}.shortcut.mtl_weight"] = torch.ones(res.shape[0], res.shape[1], 1, 1)
    src = fc if ss is not None else weights
    head = None
    if src is not None and "w5" in src:
        head = {"weight": _t(src["w5"]).t().contiguous(), "bias": _t(src["b5"])}
    return enc, head


def read_tf_weights(path: str, encoder: nn.Module, parts: str = "auto") -> Weights:
    """Read the TF files named by ``path`` (a folder or its ``weights.npy``) for ``encoder`` (a ResNet-12, whose
    widths fix the shapes), strictly.

    ``parts``: ``pre`` reads ``weights.npy`` only (meta-training starts from it, as the TF ``META_LOAD`` does;
    ``tensorflow/trainer/meta.py`` L82-94); ``auto`` reads all three files when ``ss_weights.npy`` and
    ``fc_weights.npy`` are there (kind ``meta``), ``weights.npy`` alone when neither is (kind ``pre``).
    """
    folder = tf_folder(path)
    widths = resnet12_widths(encoder, path)
    return _read_checked(folder, _read_dict(os.path.join(folder, "weights.npy")), encoder.name, widths, parts)


def _read_checked(folder: str, weights: dict[str, np.ndarray], backbone: str, widths: tuple[int, ...],
                  parts: str) -> Weights:
    """The files of ``folder`` (``weights`` = its ``weights.npy``, read) checked key by key against a ResNet-12 of
    ``widths`` (``backbone``), as :class:`models.spec.Weights` with the TF model's spec."""
    exp_w, exp_ss = _expected(widths)
    d = widths[-1]
    wpath = os.path.join(folder, "weights.npy")
    _check(weights, exp_w, wpath, optional={"w5": (d, None), "b5": (None,)})
    if ("w5" in weights) != ("b5" in weights):
        raise UserError(f"TensorFlow weights {wpath}: missing key {'b5' if 'w5' in weights else 'w5'}")
    if "w5" in weights and weights["b5"].shape[0] != weights["w5"].shape[1]:
        raise UserError(f"TensorFlow weights {wpath}: key b5 has shape {tuple(weights['b5'].shape)}, the model "
                        f"needs ({weights['w5'].shape[1]},)")
    ss_path, fc_path = (os.path.join(folder, f) for f in TF_FILES[1:])
    have = [os.path.isfile(p) for p in (ss_path, fc_path)]
    if parts == "pre" or not any(have):
        enc, head = tf_to_state_dicts(weights)
        spec = ModelSpec(kind="pre", backbone=backbone, bn_mode="tf", pre_head="linear" if head else None,
                         num_classes=int(head["weight"].shape[0]) if head else None)
        return Weights(spec, enc, head, TENSORFLOW, wpath)
    if not all(have):
        raise UserError(f"{folder} holds {TF_FILES[1] if have[0] else TF_FILES[2]} but not "
                        f"{TF_FILES[2] if have[0] else TF_FILES[1]} (a meta-trained TensorFlow model needs "
                        f"{', '.join(TF_FILES)})")
    ss = _read_dict(ss_path)
    _check(ss, exp_ss, ss_path)
    fc = _read_dict(fc_path)
    _check(fc, {"w5": (d, None), "b5": (None,)}, fc_path)
    if fc["b5"].shape[0] != fc["w5"].shape[1]:
        raise UserError(f"TensorFlow weights {fc_path}: key b5 has shape {tuple(fc['b5'].shape)}, the model needs "
                        f"({fc['w5'].shape[1]},)")
    enc, head = tf_to_state_dicts(weights, ss, fc)
    spec = ModelSpec(kind="meta", backbone=backbone, bn_mode="tf", way=int(head["weight"].shape[0]),
                     shortcut_ss=False)
    return Weights(spec, enc, head, TENSORFLOW, fc_path)


def _meta_device_backbone(name: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        return build_backbone(name, mtl=False)


def _resnet12_family() -> dict[str, tuple[int, ...]]:
    """Registered backbone name -> block widths, for every ResNet-12 of :data:`models.resnet_mtl.BACKBONES`."""
    nets = {name: _meta_device_backbone(name) for name in BACKBONES}
    return {name: resnet12_widths(net, name) for name, net in nets.items() if isinstance(net, ResNet12)}


def _detect_widths(weights: dict[str, np.ndarray]) -> str:
    """The ResNet-12 whose shapes the most keys of ``weights.npy`` have (``resnet12`` on a tie): the files name no
    backbone. A file that fits none exactly is then refused by the strict check, naming its first wrong key."""
    def fitting(widths: tuple[int, ...]) -> int:
        return sum(1 for k, shape in _expected(widths)[0].items()
                   if k in weights and tuple(weights[k].shape) == shape)
    family = _resnet12_family()
    return max(family, key=lambda name: (fitting(family[name]), name == "resnet12"))


def read_tf_model(path: str, expect: Expect | None = None, parts: str = "auto") -> Weights:
    """The TF adapter of ``models/loading.py``: the folder (or its ``weights.npy``) named by ``path``, with the spec
    of the TF model: the ResNet-12 of the widths the files hold (or the one ``--backbone`` names), ``--bn_mode tf``,
    no SS on the shortcut (``shortcut_ss`` off), the base learner's way from ``fc_weights.npy``.

    Checked in this order: the files are there (E59, E50); a ``--backbone`` given that is no ResNet-12 (E57); a
    ``--bn_mode`` given other than tf (E56); every key and shape (E51-E54); a ``--way`` given that the base learner
    does not have (E31). ``Weights.path`` is ``fc_weights.npy`` for a meta model, ``weights.npy`` for a pre one."""
    folder = tf_folder(path)
    expect = expect or Expect()
    try:
        widths = resnet12_widths(_meta_device_backbone(expect.backbone), path) if expect.backbone else None
    except UserError as e:  # one line naming every flag to change
        if expect.bn_mode is None or expect.bn_mode == "tf":
            raise
        raise UserError(f"{e}, and pass --bn_mode tf (the TF code's BatchNorm)") from None
    if expect.bn_mode is not None and expect.bn_mode != "tf":
        raise UserError(f"{path}: TensorFlow weights need --bn_mode tf (the TF code's BatchNorm: batch statistics "
                        "at train and test, no scale or shift); pass --bn_mode tf")
    weights = _read_dict(os.path.join(folder, "weights.npy"))
    backbone = expect.backbone or _detect_widths(weights)
    out = _read_checked(folder, weights, backbone, widths or _resnet12_family()[backbone], parts)
    out.spec.check_way(expect.way, out.path)
    return out


def state_dicts_to_tf(encoder_sd: dict[str, torch.Tensor], head_sd: dict[str, torch.Tensor] | None, kind: str,
                      source: str) -> dict[str, dict[str, np.ndarray]]:
    """Our ResNet-12 state dicts (``--bn_mode tf``) -> the TF dicts ``{"weights": ..., "ss_weights": ...,
    "fc_weights": ...}`` (``meta``) or ``{"weights": ...}`` (``pre``; with the pre-train classifier as w5/b5 when
    ``head_sd`` is a linear head). The inverse of :func:`tf_to_state_dicts`: ss bias = b + Phi_S2; a shortcut
    scaling (TF has none) is folded into ``conv_res`` (the same function)."""
    bn = sorted(k for k in encoder_sd if ".bn" in k)
    if bn:
        raise UserError(f"checkpoint {source} has BatchNorm parameters ({bn[0]}, ...): it was trained with "
                        "--bn_mode pytorch, whose learned scale/shift and running statistics the TensorFlow files "
                        "cannot hold; export a --bn_mode tf checkpoint")
    if f"layer{BLOCKS}.conv{CONVS}.weight" not in encoder_sd or "layer1.conv1.bias" not in encoder_sd:
        raise UserError(f"checkpoint {source} is not a ResNet-12 with TF conv biases (--backbone resnet12 "
                        "--bn_mode tf); only those export to TensorFlow files")

    def hwio(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().permute(2, 3, 1, 0).contiguous().numpy()

    def vec(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().contiguous().numpy()

    weights: dict[str, np.ndarray] = {}
    ss: dict[str, np.ndarray] = {}
    for k in range(1, BLOCKS + 1):
        for j in range(1, CONVS + 1):
            p = f"layer{k}.conv{j}."
            weights[f"block{k}_conv{j}"] = hwio(encoder_sd[p + "weight"])
            weights[f"block{k}_bias{j}"] = vec(encoder_sd[p + "bias"])
            if kind == "meta":
                ss[f"block{k}_conv{j}"] = hwio(encoder_sd[p + "mtl_weight"])
                ss[f"block{k}_bias{j}"] = vec(encoder_sd[p + "bias"] + encoder_sd[p + "mtl_bias"])
        res = encoder_sd[f"layer{k}.shortcut.weight"]
        if kind == "meta" and f"layer{k}.shortcut.mtl_weight" in encoder_sd:
            res = res * encoder_sd[f"layer{k}.shortcut.mtl_weight"]
        weights[f"block{k}_conv_res"] = hwio(res)
    out = {"weights": weights}
    if kind == "meta":
        out["ss_weights"] = ss
        out["fc_weights"] = {"w5": vec(head_sd["weight"].t()), "b5": vec(head_sd["bias"])}
    elif head_sd is not None and set(head_sd) == {"weight", "bias"}:
        weights["w5"], weights["b5"] = vec(head_sd["weight"].t()), vec(head_sd["bias"])
    return out


def save_tf_weights(folder: str, files: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """Write ``{"weights": dict, "ss_weights": dict, "fc_weights": dict}`` as ``<folder>/<name>.npy`` (``np.save``
    of the dict, as the TF code), each atomically. Returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for name, d in files.items():
        path = os.path.join(folder, f"{name}.npy")
        atomic_write(path, lambda f, d=d: np.save(f, d, allow_pickle=True), binary=True)
        out.append(path)
    return out
