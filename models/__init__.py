"""Models of MTL: SS convolution (Eq. 6), backbones, the few-shot heads (the inner loop, Eq. 3), the pre-train and the
meta model, the model spec every checkpoint stores and the one loader that rebuilds a model from a file
(``models.load``). Evaluation is ``models/evaluate.py``. The map: docs/ARCHITECTURE.md."""
from .conv2d_mtl import Conv2dMtl
from .heads import HEADS, FewShotHead, fresh_init, init_base_learner, inner_loop, make_head, stable_inner_lr, \
    straight_through
from .loading import LoadedModel, load, read_weights
from .mtl import MetaLearner, PreLearner, build_encoder
from .resnet_mtl import BACKBONES, build_backbone, min_image_size
from .spec import Expect, ModelSpec

__all__ = ["Conv2dMtl", "BACKBONES", "build_backbone", "min_image_size", "inner_loop", "stable_inner_lr",
           "straight_through", "init_base_learner", "fresh_init", "FewShotHead", "HEADS", "make_head", "PreLearner",
           "MetaLearner", "build_encoder", "ModelSpec", "Expect", "LoadedModel", "load", "read_weights"]
