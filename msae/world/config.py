"""Configuration of the synthetic "shapes" VQA world (the embedded default's dataset)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QuestionKind = Literal["color", "shape", "exists", "count", "left_right", "describe", "describe_at", "where"]
V1_QUESTION_KINDS: tuple[QuestionKind, ...] = ("color", "shape", "exists", "count", "left_right")
# World v2 adds descriptions ("what is shown ?" -> "small red circle and large blue square",
# "what is at the top left ?" -> "small blue square") and a question that names an attribute
# ("where is the red object ?" -> "top left"), so colour, shape and size words occur as text.
ALL_QUESTION_KINDS: tuple[QuestionKind, ...] = (*V1_QUESTION_KINDS, "describe", "describe_at", "where")


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
    always_ask: tuple[QuestionKind, ...] = Field(
        (), description="Kinds asked of every scene first (e.g. describe: a caption per image); the "
        "remaining questions_per_image are drawn among question_kinds.",
    )

    @model_validator(mode="after")
    def _objects_range(self) -> "ShapesConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"dataset.shapes.min_objects ({self.min_objects}) must be <= "
                f"dataset.shapes.max_objects ({self.max_objects})"
            )
        extra = [k for k in self.always_ask if k not in self.question_kinds]
        if extra:
            raise ValueError(f"dataset.shapes.always_ask: {extra} not in question_kinds {list(self.question_kinds)}")
        return self
