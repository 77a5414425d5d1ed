"""The one protocol every explainer backend speaks: requests in, parsed concept answers out.

A request is one prompt: one latent, one kind of concept (visual or textual), one prompting mode
(masked regions, the method; or whole images, the baseline), and its top examples. Backends that
read pictures use the rendered PNGs; the `dissection` backend reads the raw evidence (patch
activations, peak tokens) instead. Every answer carries the versions that produced it, so a stored
answer can be reused only when nothing that shaped it changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

ConceptKind = Literal["visual", "textual"]
Prompting = Literal["masked", "whole"]


@dataclass(frozen=True)
class ExplainExample:
    """One top example as an explainer sees it."""

    sample_id: str
    image_png: bytes | None = None
    """The rendered image: non-active patches black (masked) or the whole image; None for text-only."""
    text: str = ""
    """visual: the sample's question and answer (light context); textual: the text with the peak word marked."""
    patch_activations: np.ndarray | None = field(default=None, compare=False)
    """[grid_rows, grid_cols] activation on each base-grid patch (dissection reads it)."""
    peak_token: str | None = None
    """textual: the token at the peak activation, as displayed."""


@dataclass(frozen=True)
class ExplainRequest:
    latent: int
    kind: ConceptKind
    prompting: Prompting
    examples: tuple[ExplainExample, ...]


@dataclass(frozen=True)
class ExplainAnswer:
    latent: int
    kind: ConceptKind
    prompting: Prompting
    concept: str | None
    """The parsed concept; None for "No visual/textual concept", unparseable or filtered answers."""
    raw: str
    """The explainer's whole answer (or the dissection backend's evidence summary)."""
    status: str
    """ok | no_concept | too_long | unparsed | error (the reason `concept` is None)."""
    explainer: str
    """backend:model, e.g. openai:llava-onevision-qwen2-72b or dissection:shapes."""
    prompt_version: str
    """Hash of the prompt template used (dissection: its rule version)."""
    candidates: tuple[str, ...] = ()
    """Other readings of the same evidence the explainer would also accept, best first (the
    combining rule's qualifying n-grams); the scorer may pick among them and the concept
    (``scores.select_by_detection``). Empty for backends that give one answer."""

    def __post_init__(self) -> None:  # a cached answer comes back from JSON with a list
        object.__setattr__(self, "candidates", tuple(self.candidates))


class Explainer(Protocol):
    """What the `concepts` stage calls. Implementations may batch, parallelise and cache."""

    name: str
    """backend:model, recorded with every answer."""

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        """The prompt/rule version for this kind of request (goes into code versions and the cache key)."""
        ...

    def explain(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        """One answer per request, in order; a failed request gives status 'error', never an exception
        that loses the others' work."""
        ...
