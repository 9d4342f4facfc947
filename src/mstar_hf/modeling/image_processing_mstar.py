"""Image processor of the mSTAR patch encoder: resize to 224, ImageNet mean/std.

Only imports transformers: copied next to checkpoints for `trust_remote_code` loading.
"""

from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


class MStarImageProcessor(TorchvisionBackend):
    r"""
    Preprocesses H&E patches for [`MStarPatchModel`], as UNI and mSTAR were trained: a 256 px patch at
    20x is resized to 224x224 (bilinear), scaled to [0, 1] and normalised with the ImageNet mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

    `processor(images, return_tensors="pt")["pixel_values"]` gives a float tensor `[B, 3, 224, 224]`.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    model_input_names = ["pixel_values"]


__all__ = ["MStarImageProcessor"]
