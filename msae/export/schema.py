"""The records of the Neuronpedia export, as pydantic models (field by field: docs/formats.md).

Neuronpedia's fields keep Neuronpedia's names and meanings (its database schema,
``apps/webapp/prisma/schema.prisma`` of hijohnnylin/neuronpedia: models ``Neuron``, ``Activation``,
``Explanation``, ``ExplanationScore``); everything msae adds sits under one ``msae`` key per feature.
:func:`validate_record` checks one JSONL line; ``FeatureRecord.model_json_schema()`` is the JSON Schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Keyed(_Record):
    """Neuronpedia addresses a feature by (modelId, layer, index); ``layer`` is the source id."""

    modelId: str = Field(min_length=1, pattern=r"^[a-z0-9_-]+$")
    layer: str = Field(min_length=1, description="Neuronpedia source id: '<layer>-<sourceSetName>'.")
    index: str = Field(pattern=r"^[0-9]+$", description="The latent, as Neuronpedia's string index.")


class Activation(_Keyed):
    """One top text of the latent (Neuronpedia ``Activation``): the sample's text tokens as displayed."""

    id: str = Field(min_length=1)
    tokens: list[str] = Field(min_length=1)
    values: list[float] = Field(min_length=1)
    maxValue: float
    maxValueTokenIndex: int = Field(ge=0)
    minValue: float
    qualifyingTokenIndex: int | None = Field(
        None, ge=0, description="The token the example was ranked by (msae's peak: eligible tokens only).")
    dataSource: str | None = None
    dataIndex: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Activation:
        if len(self.tokens) != len(self.values):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.values)} values")
        if self.maxValue != max(self.values) or self.minValue != min(self.values):
            raise ValueError("maxValue / minValue are not the largest / smallest of values")
        if self.maxValueTokenIndex >= len(self.values) or self.values[self.maxValueTokenIndex] != self.maxValue:
            raise ValueError("maxValueTokenIndex does not point at maxValue")
        if self.qualifyingTokenIndex is not None and self.qualifyingTokenIndex >= len(self.values):
            raise ValueError("qualifyingTokenIndex is outside the tokens")
        return self


class ExplanationScore(_Record):
    """Neuronpedia ``ExplanationScore``: one score of one explanation."""

    value: float
    explanationScoreTypeName: str = Field(min_length=1, description="The concepts.parquet column.")
    explanationScoreModelName: str | None = Field(
        None, description="The embedder that scored it; None for word-match and count columns.")


class Explanation(_Keyed):
    """Neuronpedia ``Explanation``: a visual concept (per prompting mode) or the textual concept."""

    id: str = Field(min_length=1)
    description: str = Field(min_length=1)
    typeName: str = Field(pattern=r"^msae-(visual|textual)-(masked|whole)$")
    explanationModelName: str | None = None
    notes: str | None = None
    scores: list[ExplanationScore]


class ImageActivation(_Record):
    """msae's image evidence: one top image with the latent's activation on each base-grid patch."""

    rank: int = Field(ge=0)
    sample_id: str
    sample_index: int = Field(ge=0)
    image: str
    question: str
    answer: str
    grid_rows: int = Field(gt=0)
    grid_cols: int = Field(gt=0)
    patch_activations: list[float]
    max_activation: float
    max_patch: int = Field(ge=0)
    active_threshold: float
    active_patches: list[int]
    active_count: int = Field(ge=0)
    mean_activation: float
    score: float

    @model_validator(mode="after")
    def _grid(self) -> ImageActivation:
        n = self.grid_rows * self.grid_cols
        if len(self.patch_activations) != n:
            raise ValueError(f"{len(self.patch_activations)} patch activations for a "
                             f"{self.grid_rows}×{self.grid_cols} grid")
        if self.patch_activations[self.max_patch] != max(self.patch_activations):
            raise ValueError("max_patch does not point at the largest patch activation")
        above = [i for i, a in enumerate(self.patch_activations) if a > self.active_threshold]
        if self.active_patches != above:
            raise ValueError("active_patches are not the patches above active_threshold")
        return self


class ConceptRow(_Record):
    """One prompting mode's row of concepts.parquet, its label included."""

    prompting: str
    visual_concept: str | None
    textual_concept: str | None
    visual_concept_proposed: str | None = None
    textual_concept_proposed: str | None = None
    visual_category: str | None = None
    concept_cosine: float | None = None
    concepts_agree: bool | None = None
    modality: str | None


class MsaeExtras(_Record):
    """What msae adds to a Neuronpedia feature."""

    latent: int = Field(ge=0)
    layer: int = Field(ge=0)
    width: int = Field(gt=0)
    label: str | None = Field(description="The modality label (concepts.parquet `modality` of label_prompting).")
    label_prompting: str | None
    fires_image: int | None = None
    fires_text: int | None = None
    freq_image: float | None = None
    freq_text: float | None = None
    max_image: float | None = None
    max_text: float | None = None
    modality_score: float | None = None
    selectivity: float | None = None
    concepts: list[ConceptRow]
    image_activations: list[ImageActivation]
    ground_truth: dict[str, Any] | None = Field(description="ground_truth.parquet's row, without `latent`.")


class FeatureRecord(_Keyed):
    """One JSONL line: a Neuronpedia feature (``Neuron``) with its activations and explanations."""

    sourceSetName: str = Field(min_length=1)
    hookName: str | None = None
    maxActApprox: float = Field(ge=0)
    frac_nonzero: float | None = Field(None, ge=0, le=1)
    activations: list[Activation]
    explanations: list[Explanation]
    msae: MsaeExtras

    @model_validator(mode="after")
    def _same_feature(self) -> FeatureRecord:
        key = (self.modelId, self.layer, self.index)
        if any((r.modelId, r.layer, r.index) != key for r in [*self.activations, *self.explanations]):
            raise ValueError("an activation or explanation belongs to another feature")
        if self.index != str(self.msae.latent):
            raise ValueError(f"index {self.index!r} is not msae.latent {self.msae.latent}")
        return self


def validate_record(record: dict[str, Any]) -> FeatureRecord:
    """A record checked against the schema (pydantic's ValidationError names the field otherwise)."""
    return FeatureRecord.model_validate(record)

