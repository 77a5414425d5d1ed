"""Configuration of the synthetic "shapes" VQA world (the embedded default's dataset)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QuestionKind = Literal["color", "shape", "exists", "count", "left_right"]
ALL_QUESTION_KINDS: tuple[QuestionKind, ...] = ("color", "shape", "exists", "count", "left_right")


class ShapesConfig(BaseModel):
    """How many scenes to draw and how; the same seed always yields the same world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seed of the scene and question generator.")
    n_images: int = Field(400, gt=0, description="Number of scenes (one image each).")
    image_size: int = Field(64, ge=16, description="Side of the square images in pixels.")
    min_objects: int = Field(1, ge=1, description="Fewest objects in a scene.")
    max_objects: int = Field(3, ge=1, le=6, description="Most objects in a scene.")
    questions_per_image: int = Field(
        1, ge=1, description="Questions asked about each scene (one VQA sample each)."
    )
    question_kinds: tuple[QuestionKind, ...] = Field(
        ALL_QUESTION_KINDS, min_length=1, description="Which kinds of question to ask."
    )

    @model_validator(mode="after")
    def _objects_range(self) -> "ShapesConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"dataset.shapes.min_objects ({self.min_objects}) must be <= "
                f"dataset.shapes.max_objects ({self.max_objects})"
            )
        return self
