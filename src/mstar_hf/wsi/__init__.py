"""Whole-slide images: OpenSlide access, tissue segmentation, tiling, patch-feature extraction to h5.

Names are resolved lazily so that importing `mstar_hf.wsi` does not pull in OpenSlide, OpenCV or torch.
"""

import importlib

_EXPORTS = {
    "SlideError": "errors", "MissingMppError": "errors", "NoTissueError": "errors", "SlideTooSmallError": "errors",
    "WSI": "slide", "open_slide": "slide", "ReadPlan": "slide", "SLIDE_EXTENSIONS": "slide",
    "TissueMask": "segmentation", "segment_tissue": "segmentation",
    "TileGrid": "tiling", "tile_slide": "tiling",
    "FeatureFile": "features", "open_features": "features", "write_features": "features",
    "write_pyramidal_tiff": "synthetic", "make_tissue_image": "synthetic", "make_synthetic_slide": "synthetic",
    "PatchDataset": "extraction", "extract_slide_features": "extraction", "extract_features": "extraction",
    "save_qc_image": "qc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
