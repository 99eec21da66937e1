"""Random weights in the official TensorFlow MTL format (``weights.npy``, ``ss_weights.npy``, ``fc_weights.npy``,
Python-2-style ``.npy`` of dicts, TF names and HWIO layouts; ``models/tf_weights.py``), for the tests."""
from __future__ import annotations

import os

import numpy as np

from tests.helpers import py2_object_npy

WIDTHS = (64, 128, 256, 512)
SLIM = (32, 64, 128, 256)  # resnet12_slim


def official_files(folder, way=5, widths=WIDTHS, seed=0, pre_classes=None, ss=True):
    """Random weights in the official format (Python-2 style .npy of dicts), TF layouts and names."""
    rng = np.random.default_rng(seed)
    w, s = {}, {}
    chans = (3,) + tuple(widths)
    for k in range(1, 5):
        cin, cout = chans[k - 1], chans[k]
        for j in range(1, 4):
            ci = cin if j == 1 else cout
            w[f"block{k}_conv{j}"] = (rng.standard_normal((3, 3, ci, cout)) * np.sqrt(2.0 / (9 * ci))).astype(
                np.float32)
            w[f"block{k}_bias{j}"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
            s[f"block{k}_conv{j}"] = (1.0 + 0.1 * rng.standard_normal((1, 1, ci, cout))).astype(np.float32)
            s[f"block{k}_bias{j}"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        w[f"block{k}_conv_res"] = (rng.standard_normal((1, 1, cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32)
    if pre_classes:
        w["w5"] = (0.05 * rng.standard_normal((widths[-1], pre_classes))).astype(np.float32)
        w["b5"] = (0.05 * rng.standard_normal(pre_classes)).astype(np.float32)
    fc = {"w5": (0.05 * rng.standard_normal((widths[-1], way))).astype(np.float32),
          "b5": (0.05 * rng.standard_normal(way)).astype(np.float32)}
    os.makedirs(folder, exist_ok=True)
    py2_object_npy(os.path.join(folder, "weights.npy"), w)
    if ss:
        py2_object_npy(os.path.join(folder, "ss_weights.npy"), s)
        py2_object_npy(os.path.join(folder, "fc_weights.npy"), fc)
    return w, s, fc
