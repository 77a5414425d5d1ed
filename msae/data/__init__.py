"""VQA datasets: loading (shapes world, LLaVA files, Hugging Face), validation, the sample table."""

from msae.data.images import BadImage, ImageLimits, ImagePolicy, check_image_ref, load_image_rgb, to_rgb
from msae.data.samples import (
    DatasetError,
    SamplesResult,
    VQASample,
    build_samples,
    iter_samples,
    read_samples,
    write_samples,
)

__all__ = [
    "BadImage",
    "DatasetError",
    "ImageLimits",
    "ImagePolicy",
    "SamplesResult",
    "VQASample",
    "build_samples",
    "check_image_ref",
    "iter_samples",
    "load_image_rgb",
    "read_samples",
    "to_rgb",
    "write_samples",
]
