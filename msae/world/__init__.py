"""The synthetic shapes VQA world: seeded scenes, questions with exact answers, patch annotations."""

from msae.world.config import ALL_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import (
    QA,
    VOCABULARY,
    Scene,
    SceneObject,
    WorldFiles,
    generate_scene,
    generate_world,
    make_questions,
)

__all__ = [
    "ALL_QUESTION_KINDS",
    "QA",
    "VOCABULARY",
    "Scene",
    "SceneObject",
    "ShapesConfig",
    "WorldFiles",
    "generate_scene",
    "generate_world",
    "make_questions",
]
