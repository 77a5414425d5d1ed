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

**Evidence, then labels** — as in the pipeline, what the controls explain (the random SAE, its
latent statistics and concepts; the oracle's concepts) does not depend on the scores' settings.
It is cached in two levels, each with its own manifest, keyed by the code versions of the stages it
repeats and the real SAE's data versions: :data:`STATS_STAGE` (the random SAE, its latent
statistics) and :data:`EVIDENCE_STAGE` (the concepts). A threshold or rule change re-runs only the
controls' scoring and labelling, which read the cached alignment scores; a prompt change re-runs
their concepts too, never their statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from msae.manifest import Manifest, current_manifest, layer_width_folder, save_manifest
from msae.store import Store

STATS_STAGE = "controls_stats"
"""The manifest of the random SAE and its latent statistics, per layer × width."""
EVIDENCE_STAGE = "controls_evidence"
"""The manifest of the controls' concepts (the random SAE's, the oracle's), per layer × width."""
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


@dataclass(frozen=True)
class EvidenceKeys:
    """The keys of the controls' two cached levels (see module doc): ``stats`` — the random SAE and
    its latent statistics; ``concepts`` — the random SAE's and the oracle's concepts (combined
    here with the stats level's data version, so new statistics always mean new concepts)."""

    stats: str
    concepts: str


def run_controls(cfg: Any, store: Store, layer: int, width: int, fingerprint: str = "",
                 evidence: EvidenceKeys | None = None) -> tuple[str, dict[str, Any]]:
    """Every enabled control for one layer × width; (data version, metadata).

    ``evidence``: the keys of the cached levels; a level whose manifest is current and intact is
    reused. None: build everything."""
    import hashlib

    from msae.manifest import fingerprint as combine

    part = layer_width_folder(layer, width)
    stats, stats_reused = _reuse_or_build(store, STATS_STAGE, evidence.stats if evidence else None, part,
                                          lambda: build_control_stats(cfg, store, layer, width, fingerprint))
    concepts_key = combine(evidence.concepts, {STATS_STAGE: stats.data_version}) if evidence else None
    concepts, concepts_reused = _reuse_or_build(store, EVIDENCE_STAGE, concepts_key, part,
                                                lambda: build_control_concepts(cfg, store, layer, width))
    versions: list[str] = []
    meta = {**stats.metadata, **concepts.metadata, "stats_reused": stats_reused, "concepts_reused": concepts_reused}
    if cfg.controls.random_sae:
        v, m = score_random_sae_control(control_config(cfg, width), store, layer, width, seed=cfg.controls.seed)
        versions.append(v)
        meta |= m
    if oracle_enabled(cfg, store):
        v, m = score_dissection_oracle(oracle_config(cfg), store, layer, width)
        versions.append(v)
        meta |= m
    # explainer requests of a control that failed: the controls partition is not done either (it
    # is recomputed, and the answer cache re-sends exactly those), as for `concepts`
    meta["incomplete"] = sum(int(v) for k, v in meta.items() if k.endswith("explainer_failures"))
    return hashlib.sha256("-".join(versions).encode()).hexdigest()[:16], meta


def _reuse_or_build(store: Store, stage: str, key: str | None, part: str,
                    build: Callable[[], tuple[str, dict[str, Any]]]) -> tuple[Manifest, bool]:
    """(the level's manifest, whether it was reused): reused when recorded under ``key``, complete
    and intact (:func:`msae.manifest.current_manifest`), else built and recorded."""
    done = current_manifest(store, stage, key, part) if key else None
    if done is not None:
        return done, True
    version, meta = build()
    return save_manifest(store, Manifest(stage, key or "", version, meta), part), False


def oracle_enabled(cfg: Any, store: Store) -> bool:
    return bool(cfg.controls.dissection_oracle) and store.exists("world", "annotations.parquet")


def build_control_stats(cfg: Any, store: Store, layer: int, width: int, fingerprint: str = "") -> tuple[str, dict[str, Any]]:
    """The random SAE and its latent statistics (nothing when the random-SAE control is off);
    (latent stats' data version, metadata)."""
    from msae.latents.stage import run_latent_stats
    from msae.sae.formats import load_sae, save_sae

    if not cfg.controls.random_sae:
        return "", {}
    seed = cfg.controls.seed
    cstore = control_store(store)
    trained = load_sae(store.url(store.sae_name(layer, width)))
    sae = random_sae_like(trained, seed=seed + 1000 * layer + width)
    save_sae(sae, cstore.url(cstore.sae_name(layer, width)),
             metadata={"control": "random_sae", "seed": seed, "b_dec_from": store.url(store.sae_name(layer, width))})
    return run_latent_stats(control_config(cfg, width), cstore, layer, width, fingerprint=fingerprint)[0], {}


def build_control_concepts(cfg: Any, store: Store, layer: int, width: int) -> tuple[str, dict[str, Any]]:
    """The random SAE's concepts and the oracle's; (a digest of what was written, metadata).
    ``incomplete`` > 0 where explainer requests failed (built again next time, re-sending only those)."""
    import hashlib

    from msae.explain.stage import run_concepts

    versions, meta = [], {}
    if cfg.controls.random_sae:
        v, m = run_concepts(control_config(cfg, width), control_store(store), layer, width)
        versions.append(v)
        meta["control_explainer_failures"] = int(m.get("explainer_failures", 0))
    if oracle_enabled(cfg, store):
        v, m = run_concepts(oracle_config(cfg), oracle_store(store), layer, width)
        versions.append(v)
        meta["oracle_explainer_failures"] = int(m.get("explainer_failures", 0))
    meta["incomplete"] = sum(int(v) for k, v in meta.items() if k.endswith("explainer_failures"))
    return hashlib.sha256("-".join(versions).encode()).hexdigest()[:16], meta


def score_dissection_oracle(cfg: Any, store: Store, layer: int, width: int) -> tuple[str, dict[str, Any]]:
    """Scores and labels of the oracle's concepts for the real SAE's latents (see module doc)."""
    from msae.score.stage import run_concept_scores

    # the oracle explains the real SAE, whose ground truth the `concept_scores` asset already wrote
    # (the report judges the oracle against that one): computing it again would only cost time
    version, meta = run_concept_scores(cfg, oracle_store(store), layer, width, ground_truth=False)
    meta = {f"oracle_{k}": v for k, v in meta.items() if k.startswith("census_")}
    meta["oracle_root"] = store.url(ORACLE_ROOT)
    return version, meta


def score_random_sae_control(cfg: Any, store: Store, layer: int, width: int, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """Scores, labels and ground truth of the random SAE's concepts; (data version, metadata)."""
    import hashlib

    from msae.score.stage import run_concept_scores

    version, meta = run_concept_scores(cfg, control_store(store), layer, width)
    meta = {f"control_{k}": v for k, v in meta.items() if k.startswith(("census_", "gt_"))}
    meta["control_root"] = store.url(CONTROL_ROOT)
    digest = hashlib.sha256(f"{version}-{seed}".encode()).hexdigest()[:16]
    return digest, meta
