"""Which stages of one driver call have anything to do, decided without starting a Dagster run.

The CLI cannot select "only what is stale", and a call whose stages only reuse their manifests
still costs a Dagster process (3–4 s of imports, a run and its events), so before each CLI call
the driver (:mod:`msae_assets.materialize`) asks of every selected stage and partition:

1. is its manifest current — written under the fingerprint its :class:`StagePlan` gives now,
   complete, its outputs intact (:func:`msae.manifest.check_manifest`, the same test the asset
   makes before reusing)?
2. does this instance's latest materialization of that asset partition carry the same stamp
   (:data:`msae_assets.stage.STAMP`: the fingerprint plus the check settings)? Otherwise the
   instance — the UI's metadata, data versions, check results — would not describe the outputs:
   a fresh DAGSTER_HOME over an existing store, a changed check bound, a stage run from a notebook.

A stage that fails either test is materialized; one that fails the first also takes every stage of
the call downstream of it (their fingerprints read a data version it has not written yet), while
one that fails only the second reuses its outputs, so what follows it is judged on its own. The
others are left out of the call's selection, and a call with nothing left is skipped. The driver asks just before each call,
in graph order, so an upstream call has already written what a downstream fingerprint reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from msae.checkpoints import Checkpoint
from msae.config import MsaeConfig
from msae.manifest import check_manifest
from msae.store import Store
from msae_assets.activations import activations_plan
from msae_assets.concept_scores import concept_scores_plan
from msae_assets.concepts import concepts_plan
from msae_assets.controls import controls_plan
from msae_assets.latent_stats import latent_stats_plan
from msae_assets.per_sae import sae_folder
from msae_assets.report import report_plan
from msae_assets.sae import sae_plan
from msae_assets.samples import vqa_samples_plan
from msae_assets.stage import STAMP, StagePlan


def stage_plans(cfg: MsaeConfig, checkpoint: Callable[[], Checkpoint | None]) -> dict[str, StagePlan]:
    """Every stage's plan, by asset name. ``checkpoint``: the one a run without pins would load."""
    plans = [vqa_samples_plan(cfg), activations_plan(cfg, checkpoint), sae_plan(cfg), latent_stats_plan(cfg),
             concepts_plan(cfg), concept_scores_plan(cfg), report_plan(cfg)]
    if cfg.controls.enabled:
        plans.append(controls_plan(cfg))
    return {p.stage: p for p in plans}


def store_partition(key: str | None) -> str | None:
    """A Dagster partition key in the store's form: ``"1|256"`` → ``"layer=1/width=256"``; a layer
    key stays as it is; None (unpartitioned) stays None."""
    if key is None or "|" not in key:
        return key
    layer, width = key.split("|")
    return sae_folder(int(layer), int(width))


def recorded_stamp(instance: dg.DagsterInstance, stage: str, key: str | None) -> str | None:
    """The stamp of the instance's latest materialization of ``stage`` (at partition ``key``)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(stage), asset_partitions=[key] if key is not None else None),
        limit=1).records
    event = records[0].asset_materialization if records else None
    value = event.metadata.get(STAMP) if event is not None else None
    return getattr(value, "value", value)


@dataclass(frozen=True)
class Stale:
    """Why a stage has something to do at one partition; ``recompute``: its outputs will change
    (False: only this instance's record is behind, the run reuses the manifest)."""

    why: str
    recompute: bool


def why_stale(store: Store, instance: dg.DagsterInstance, plan: StagePlan, key: str | None) -> Stale | None:
    """None when ``plan``'s stage is up to date at partition ``key`` (module doc), else why not."""
    part = store_partition(key)
    try:
        fp = plan.fingerprint(store, part)
    except (RuntimeError, OSError) as e:  # an upstream has no output yet, or a damaged one: the run says which
        return Stale(f"inputs not ready: {e}", recompute=True)
    manifest, why = check_manifest(store, plan.stage, fp, part)
    if manifest is None:
        return Stale(why, recompute=True)
    stamp = recorded_stamp(instance, plan.stage, key)
    if stamp != plan.stamp(fp):
        return Stale("no materialization in this instance" if stamp is None
                     else "this instance recorded it under other inputs or check settings", recompute=False)
    return None


@dataclass(frozen=True)
class CallPlan:
    """What one CLI call still has to do: the stages to select (in the call's order) and, for each
    stage left out or kept, why."""

    selected: tuple[str, ...]
    reasons: dict[str, str]

    @property
    def skip(self) -> bool:
        return not self.selected


def plan_call(store: Store, instance: dg.DagsterInstance, plans: dict[str, StagePlan], stages: list[str],
              keys: list[str | None]) -> CallPlan:
    """The stages of one call (``stages`` in graph order, over partitions ``keys``) that are stale or
    downstream of a stale one within the call."""
    selected: list[str] = []
    recomputed: set[str] = set()
    reasons: dict[str, str] = {}
    for stage in stages:
        plan = plans[stage]
        changing = [u for u in plan.upstream if u in recomputed]
        if changing:
            stale: Stale | None = Stale(f"downstream of {', '.join(changing)}", recompute=True)
        else:
            found = [(k, s) for k in keys if (s := why_stale(store, instance, plan, k)) is not None]
            stale = None if not found else Stale(
                "; ".join(f"[{k}] {s.why}" if k is not None else s.why for k, s in found[:2])
                + (f"; and {len(found) - 2} more partitions" if len(found) > 2 else ""),
                recompute=any(s.recompute for _, s in found))
        if stale is None:
            reasons[stage] = "up to date"
            continue
        selected.append(stage)
        reasons[stage] = stale.why
        if stale.recompute:
            recomputed.add(stage)
    return CallPlan(tuple(selected), reasons)
