"""Embedders that score concepts: CLIP/ALIGN image–text models and sentence (text–text) models.

``msae.embedded.shapes_clip`` trains the embedded default's small CLIP (``data/shapes-clip``).
"""

from msae.embed.embedders import (
    DEFAULT_SENTENCE_MODEL,
    EmbedderLoadError,
    ImageTextEmbedder,
    ResolvedRef,
    TextEmbedder,
    TextEmbedding,
    TextTowerEmbedder,
    concept_probabilities,
    load_image_text_embedder,
    load_text_embedder,
    packaged_model_dir,
    resolve_model_ref,
)

__all__ = [
    "DEFAULT_SENTENCE_MODEL",
    "EmbedderLoadError",
    "ImageTextEmbedder",
    "ResolvedRef",
    "TextEmbedder",
    "TextEmbedding",
    "TextTowerEmbedder",
    "concept_probabilities",
    "load_image_text_embedder",
    "load_text_embedder",
    "packaged_model_dir",
    "resolve_model_ref",
]
