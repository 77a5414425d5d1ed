"""Activation extraction: token→patch map, residual-stream hooks, resumable zarr writer."""

from msae.extract.extractor import ExtractionError, ExtractionResult, extract_activations, validate_layers
from msae.extract.hooks import capture_residual, find_decoder_layers
from msae.extract.token_map import TOKEN_SCHEMA, ImageLayout, ImageTokenMapper, TokenMapError
from msae.extract.writer import read_activations, to_float32

__all__ = [
    "TOKEN_SCHEMA",
    "ExtractionError",
    "ExtractionResult",
    "ImageLayout",
    "ImageTokenMapper",
    "TokenMapError",
    "capture_residual",
    "extract_activations",
    "find_decoder_layers",
    "read_activations",
    "to_float32",
    "validate_layers",
]
