"""Image processor of the mSTAR patch encoder: resize to 224, ImageNet mean/std.

Only imports torch and transformers: copied next to checkpoints for `trust_remote_code` loading.
"""

import numpy as np
import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_transforms import resize as pil_resize
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ChannelDimension, PILImageResampling
from transformers.image_utils import pil_torch_interpolation_mapping


class MStarImageProcessor(TorchvisionBackend):
    r"""
    Preprocesses H&E patches for [`MStarPatchModel`], as UNI and mSTAR were trained: a 256 px patch at
    20x is resized to 224x224 (bilinear), scaled to [0, 1] and normalised with the ImageNet mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

    The resize is Pillow's, as in the official `transforms.Compose([Resize(224), ToTensor(), Normalize])`
    on a PIL image, so features equal the authors' pipeline. `fast_resize=True` resizes the uint8
    tensor with torchvision instead (batched, can run on a GPU): one grey level off in ~0.3% of
    values, which moves ViT-L features of 256 px tiles by ~4e-4.

    `processor(images, return_tensors="pt")["pixel_values"]` gives a float tensor `[B, 3, 224, 224]`.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    fast_resize = False
    model_input_names = ["pixel_values"]

    def __init__(self, fast_resize: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.fast_resize = bool(fast_resize)

    def to_dict(self):
        out = super().to_dict()
        out["fast_resize"] = self.fast_resize
        return out

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        """uint8 images go through Pillow one by one (the official pipeline); float ones, or all of them
        with `fast_resize`, through torchvision."""
        if self.fast_resize or image.dtype != torch.uint8 or image.device.type != "cpu":
            return super().resize(image, size, resample=resample, antialias=antialias, **kwargs)
        if resample is None:
            resample = PILImageResampling.BILINEAR
        elif not isinstance(resample, (PILImageResampling, int)):
            resample = {v: k for k, v in pil_torch_interpolation_mapping.items()}[resample]
        h, w = image.shape[-2:]
        if size.height and size.width:
            new_size = (size.height, size.width)
        elif size.shortest_edge and not size.longest_edge:
            s = size.shortest_edge  # as torchvision's Resize(int): the long side is truncated
            new_size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        else:
            return super().resize(image, size, resample=resample, antialias=antialias, **kwargs)
        flat = image.reshape(-1, *image.shape[-3:])
        out = [
            torch.from_numpy(np.ascontiguousarray(pil_resize(
                img.numpy(), new_size, resample=resample, reducing_gap=None,
                data_format=ChannelDimension.FIRST, input_data_format=ChannelDimension.FIRST,
            )))
            for img in flat
        ]
        return torch.stack(out).reshape(*image.shape[:-2], *new_size)


__all__ = ["MStarImageProcessor"]
