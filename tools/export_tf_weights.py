"""Export one of our checkpoints to the official TensorFlow files (``weights.npy``, ``ss_weights.npy``,
``fc_weights.npy``), the format ``main.py --init_weights / --eval_weights`` and ``run_experiment.py META_LOAD /
TEST_LOAD`` read (``models/tf_weights.py``).

    python -m tools.export_tf_weights logs/meta/<run>/max_acc.pth logs/download_weights
    python -m tools.export_tf_weights logs/pre/<run>/max_acc.pth  logs/download_weights   # weights.npy only

The checkpoint must be a ResNet-12 trained with ``--bn_mode tf`` (the TF files hold no BatchNorm parameters or
statistics). A meta checkpoint gives all three files; a pre-train checkpoint gives ``weights.npy`` (with its
classifier as ``w5``/``b5`` when the head is linear, ``--pre_head linear``). Each file is written atomically.
Errors are one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from models.loading import read_weights
from models.tf_weights import save_tf_weights, state_dicts_to_tf
from utils.errors import UserError


def export(checkpoint: str, out_dir: str) -> list[str]:
    """Write the TF files of ``checkpoint`` into ``out_dir``; returns the paths written."""
    weights = read_weights(checkpoint)  # (the same adapters as models.load; the state dicts as the file has them)
    return save_tf_weights(out_dir, state_dicts_to_tf(weights.encoder, weights.head, weights.kind, checkpoint))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="our .pth (pre or meta) of a --backbone resnet12* --bn_mode tf run")
    p.add_argument("out_dir", help="folder for weights.npy, ss_weights.npy, fc_weights.npy")
    args = p.parse_args(argv)
    try:
        for path in export(args.checkpoint, args.out_dir):
            print(f"wrote {path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
