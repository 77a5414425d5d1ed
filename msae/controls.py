"""Controls beside the pipeline: a random SAE (the floor) and the dissection explainer (an oracle).

**Random-SAE control** — the whole concept pipeline on an SAE that has learned nothing.

A method that finds "visual", "textual" and "multimodal" latents should not find them in a
random dictionary. For each trained SAE the control builds a random-weight SAE of the same shape
(d_in, width, k, architecture; seeded; decoder rows unit-norm, encoder = decoderᵀ as at the
trainer's initialisation) that keeps only the trained SAE's pre-encoder bias ``b_dec`` — the data's
centre, so the random directions act on centred activations as the trained ones do — and runs the
very same stages on it: latent statistics, concepts, scores and (where annotations exist) ground
truth. Its labels should collapse to the prior (mostly "none"); the report shows them beside the
real SAE's.

The control's files live under ``<store>/controls/random_sae/`` in the usual layout
(``sae/…``, ``latents/…``, ``concepts/…``) through :class:`ControlStore`, which redirects exactly
those per-SAE folders and reads everything else (activations, tokens, samples, world) from the
main store, so no stage needs to know it is running a control.

**Dissection oracle** — on annotated worlds, the real SAE's latents explained by the
``dissection`` backend (Network-Dissection IoU of the active patches with the annotation masks:
it reads the ground-truth masks, so it is an upper reference for what an explainer could name,
not a method), scored and labelled like the pipeline's; files under ``<store>/controls/dissection/``
(only ``concepts/…``: the evidence is the real SAE's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msae.store import Store

CONTROL_ROOT = "controls/random_sae"
ORACLE_ROOT = "controls/dissection"
PER_SAE_FOLDERS = ("sae", "latents", "concepts")
"""Top-level folders of the per-SAE stages: the only ones a control writes."""


@dataclass(frozen=True)
class ControlStore(Store):
    """The main store, with the top-level ``folders`` moved under ``prefix``."""

    prefix: str = CONTROL_ROOT
    folders: tuple[str, ...] = PER_SAE_FOLDERS

    def url(self, *parts: str) -> str:
        rel = "/".join(p.strip("/") for p in parts if p)
        if rel.split("/", 1)[0] in self.folders:
            rel = f"{self.prefix}/{rel}"
        return super().url(rel)


def control_store(store: Store) -> ControlStore:
    return ControlStore(store.root)


def oracle_store(store: Store) -> ControlStore:
    return ControlStore(store.root, prefix=ORACLE_ROOT, folders=("concepts",))


def random_sae_like(trained: Any, seed: int) -> Any:
    """A random SAE of ``trained``'s shape, keeping only its ``b_dec`` (see module doc)."""
    import torch

    from msae.sae.model import SparseCoder

    sae = SparseCoder(trained.d_in, trained.num_latents, trained.k, trained.architecture, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(trained.b_dec.detach().to(sae.b_dec.dtype).cpu())
    sae.threshold = float(getattr(trained, "threshold", 0.0))
    return sae


def control_config(cfg: Any, width: int) -> Any:
    """The config the random-SAE control runs with: labels come from the method's prompting mode
    alone (the first of ``explainer.prompting``), so the baseline mode is not explained again, and
    a seeded sample of ``controls.latents`` latents estimates the control's label distribution
    (every latent of a random TopK SAE fires, so explaining all of them costs the most of all)."""
    explainer = cfg.explainer.model_copy(update={"prompting": [cfg.explainer.prompting[0]]})
    latents: dict[str, Any] = {"cards": 0}  # nobody browses a random SAE's latent cards
    if cfg.controls.latents is not None and cfg.controls.latents < width:
        latents |= {"select": "sample", "n": cfg.controls.latents, "seed": cfg.controls.seed}
    return cfg.model_copy(update={"explainer": explainer, "latents": cfg.latents.model_copy(update=latents)})


def oracle_config(cfg: Any) -> Any:
    """The config of the dissection oracle: the same settings with the ``dissection`` backend, in
    the method's prompting mode only (the report compares labels, which come from that mode)."""
    explainer = cfg.explainer.model_copy(update={"backend": "dissection", "prompting": [cfg.explainer.prompting[0]]})
    return cfg.model_copy(update={"explainer": explainer})


def run_controls(cfg: Any, store: Store, layer: int, width: int, fingerprint: str = "") -> tuple[str, dict[str, Any]]:
    """Every enabled control for one layer × width; (data version, metadata)."""
    import hashlib

    versions, meta = [], {}
    if cfg.controls.random_sae:
        v, m = run_random_sae_control(control_config(cfg, width), store, layer, width, seed=cfg.controls.seed,
                                      fingerprint=fingerprint)
        versions.append(v)
        meta |= m
    if cfg.controls.dissection_oracle and store.exists("world", "annotations.parquet"):
        v, m = run_dissection_oracle(oracle_config(cfg), store, layer, width)
        versions.append(v)
        meta |= m
    # explainer requests of a control that failed: the controls partition is not done either (it
    # is recomputed, and the answer cache re-sends exactly those), as for `concepts`
    meta["incomplete"] = sum(int(v) for k, v in meta.items() if k.endswith("explainer_failures"))
    return hashlib.sha256("-".join(versions).encode()).hexdigest()[:16], meta


def run_dissection_oracle(cfg: Any, store: Store, layer: int, width: int) -> tuple[str, dict[str, Any]]:
    """Concepts and scores of the real SAE's latents by the dissection backend (see module doc)."""
    from msae.explain.stage import run_concepts
    from msae.score.stage import run_concept_scores

    ostore = oracle_store(store)
    _, concepts_meta = run_concepts(cfg, ostore, layer, width)
    # the oracle explains the real SAE, whose ground truth the `concept_scores` asset already wrote
    # (the report judges the oracle against that one): computing it again would only cost time
    version, meta = run_concept_scores(cfg, ostore, layer, width, ground_truth=False)
    meta = {f"oracle_{k}": v for k, v in meta.items() if k.startswith("census_")}
    meta["oracle_explainer_failures"] = int(concepts_meta.get("explainer_failures", 0))
    meta["oracle_root"] = store.url(ORACLE_ROOT)
    return version, meta


def run_random_sae_control(cfg: Any, store: Store, layer: int, width: int, seed: int = 0,
                           fingerprint: str = "") -> tuple[str, dict[str, Any]]:
    """Build the random SAE and run latent stats → concepts → scores on it; (data version, metadata)."""
    import hashlib

    from msae.explain.stage import run_concepts
    from msae.latents.stage import run_latent_stats
    from msae.sae.formats import load_sae, save_sae
    from msae.score.stage import run_concept_scores

    cstore = control_store(store)
    trained = load_sae(store.url(store.sae_name(layer, width)))
    sae = random_sae_like(trained, seed=seed + 1000 * layer + width)
    save_sae(sae, cstore.url(cstore.sae_name(layer, width)),
             metadata={"control": "random_sae", "seed": seed, "b_dec_from": store.url(store.sae_name(layer, width))})
    run_latent_stats(cfg, cstore, layer, width, fingerprint=fingerprint)
    _, concepts_meta = run_concepts(cfg, cstore, layer, width)
    version, meta = run_concept_scores(cfg, cstore, layer, width)
    meta = {f"control_{k}": v for k, v in meta.items() if k.startswith(("census_", "gt_"))}
    meta["control_explainer_failures"] = int(concepts_meta.get("explainer_failures", 0))
    meta["control_root"] = store.url(CONTROL_ROOT)
    digest = hashlib.sha256(f"{version}-{seed}".encode()).hexdigest()[:16]
    return digest, meta
