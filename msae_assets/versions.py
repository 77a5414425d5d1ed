"""Code versions: a stage revision plus a hash of exactly the config sections the stage reads.

Dagster does not put run config into data versions, so a changed hyper-parameter or prompt must
change the code version of its stage; everything downstream then becomes stale through data
versions, and nothing upstream does.
"""

from __future__ import annotations

from pydantic import BaseModel

from msae.config import config_hash

# Bump a stage's revision when its code changes what it writes.
STAGE_REVISIONS: dict[str, int] = {
    "vqa_samples": 1,
    "activations": 2,  # 2: the model's content stamp is an input (a model retrained in place re-extracts)
    "sae": 2,  # 2: a training checkpoint resumes only on the same activations' data version (an SAE
    # trained under r1 may have resumed another model's checkpoint of the same shape)
    "latent_stats": 2,  # 2: each sample's answer position is eligible text evidence
    "concepts": 4,  # 2: failed explainer requests make a partition incomplete (recomputed, not reused);
    # 3: proposals record the answers' candidates; 4: the answer position is named, one word
    "concept_scores": 3,  # 2: population detection, its label gate and concept selection; 3: ground truth
    # without partial patches, answer positions by name
    "controls": 4,  # 2: likewise for the controls' explainer requests; 3: candidates and population detection;
    # 4: as concept_scores 3
    "report": 1,
}


def code_version(stage: str, *sections: BaseModel | dict | str | int | None) -> str:
    return f"r{STAGE_REVISIONS[stage]}-{config_hash(*sections)}"
