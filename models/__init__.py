"""Models of MTL: SS convolution (Eq. 6), backbones, the inner loop (Eq. 3), the pre-train and the meta model."""
from .conv2d_mtl import Conv2dMtl
from .mtl import MetaLearner, PreLearner, inner_loop, stable_inner_lr, straight_through
from .resnet_mtl import BACKBONES, build_backbone, min_image_size

__all__ = ["Conv2dMtl", "BACKBONES", "build_backbone", "min_image_size", "inner_loop", "stable_inner_lr",
           "straight_through", "PreLearner", "MetaLearner"]
