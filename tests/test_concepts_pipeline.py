"""The stages after `sae` through Dagster: outputs, reuse, and what a prompt/explainer change makes stale."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from msae.config import parse_config
from msae.explain.prompts import load_templates
from msae.store import Store
from msae_assets.definitions import build_definitions

UPSTREAM = ("vqa_samples", "activations", "sae", "latent_stats")
DOWNSTREAM = ("concepts", "concept_scores", "report")


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets}


def _version(defs: dg.Definitions, name: str) -> str:
    return _assets(defs)[name].code_versions_by_key[dg.AssetKey(name)]


def _copy_templates(folder, edit: str | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for t in load_templates(None).values():
        text = t.text + (f"\n{edit}\n" if edit and t.name.startswith("visual_masked") else "")
        (folder / t.name).write_text(text)
    return str(folder)


def test_prompt_edit_changes_only_the_concepts_code_version(tiny_config_data, tmp_path):
    """An edited template reruns `concepts` (code version) and, through data versions, what follows."""
    openai = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    same = {**tiny_config_data, "explainer": {**openai, "prompt_dir": _copy_templates(tmp_path / "a")}}
    moved = {**tiny_config_data, "explainer": {**openai, "prompt_dir": _copy_templates(tmp_path / "b")}}
    edited = {**tiny_config_data, "explainer": {**openai, "prompt_dir": _copy_templates(
        tmp_path / "c", "Prefer colours over shapes.")}}
    a, b, c = (build_definitions(parse_config(d)) for d in (same, moved, edited))
    assert _version(a, "concepts") == _version(b, "concepts")  # same text, other folder: nothing to redo
    assert _version(a, "concepts") != _version(c, "concepts")
    for name in (*UPSTREAM, "concept_scores", "report"):
        assert _version(a, name) == _version(c, name), name
    faster = {**same, "explainer": {**same["explainer"], "concurrency": 16, "timeout_s": 5}}
    assert _version(build_definitions(parse_config(faster)), "concepts") == _version(a, "concepts")


def _materialize_all(defs: dg.Definitions, cfg, instance) -> None:
    assets = _assets(defs)

    def run(names, partition=None):
        r = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                           partition_key=partition, selection=names)
        assert r.success
        return r

    run(["vqa_samples"])
    for layer in cfg.layers:
        run(["activations"], str(layer))
    for layer in cfg.layers:
        for width in cfg.widths:
            run(["sae", "latent_stats", "concepts", "concept_scores", "controls"], f"{layer}|{width}")
    return run(["report"])


@pytest.mark.slow
def test_explainer_change_makes_concepts_then_its_readers_stale(tiny_config_data):
    cfg = parse_config(tiny_config_data)
    defs = build_definitions(cfg)
    store = Store(cfg.store)
    with dg.instance_for_test() as instance:
        report = _materialize_all(defs, cfg, instance)
        meta = report.asset_materializations_for_node("report")[-1].metadata
        assert "census" in meta and store.exists("report", "index.html")

        # outputs of every stage, in the documented places
        key = f"layer={cfg.layers[0]}/width={cfg.widths[0]}"
        stats = store.read_parquet(f"latents/{key}", "stats.parquet")
        assert stats.height == cfg.widths[0]
        proposals = store.read_parquet(f"concepts/{key}", "proposals.parquet")
        assert set(proposals["prompting"]) == {"masked", "whole"}
        assert proposals["latent"].n_unique() == int(stats["explained"].sum())
        scored = store.read_parquet(f"concepts/{key}", "concepts.parquet")
        for col in ("latent", "visual_concept", "textual_concept", "visual_score", "textual_score", "modality"):
            assert col in scored.columns
        assert set(scored["modality"]) <= {"visual", "textual", "multimodal", "mixed", "none"}
        assert scored.filter(pl.col("visual_concept").is_not_null())["visual_score"].null_count() == 0

        # an explainer setting changes: `concepts` is stale by its code version, nothing upstream is
        changed_cfg = {**tiny_config_data, "explainer": {"min_iou": 1.0, "min_enrichment": 1000}}
        changed = build_definitions(parse_config(changed_cfg))
        part = f"{cfg.layers[0]}|{cfg.widths[0]}"

        def status() -> dict[str, StaleStatus]:
            resolver = CachingStaleStatusResolver(instance, changed.resolve_asset_graph(),
                                                  loading_context=LoadingContextForTest(instance))
            return {
                "vqa_samples": resolver.get_status(dg.AssetKey("vqa_samples")),
                "activations": resolver.get_status(dg.AssetKey("activations"), str(cfg.layers[0])),
                **{n: resolver.get_status(dg.AssetKey(n), part) for n in ("sae", "latent_stats", "concepts",
                                                                          "concept_scores")},
                "report": resolver.get_status(dg.AssetKey("report")),
            }

        now = status()
        assert {n: now[n] for n in UPSTREAM} == dict.fromkeys(UPSTREAM, StaleStatus.FRESH)
        assert now["concepts"] == StaleStatus.STALE
        # rerunning it gives new proposals (a new data version), which makes what reads them stale in turn
        new = _assets(changed)
        r = dg.materialize([new["concepts"]], instance=instance, resources=changed.resources, partition_key=part,
                           selection=["concepts"])
        assert r.success and store.read_parquet(f"concepts/{key}", "proposals.parquet")["visual_concept"].null_count() \
            > proposals["visual_concept"].null_count()
        now = status()
        assert {n: now[n] for n in (*UPSTREAM, "concepts")} == dict.fromkeys((*UPSTREAM, "concepts"), StaleStatus.FRESH)
        assert now["concept_scores"] == StaleStatus.STALE
        r = dg.materialize([new["concept_scores"]], instance=instance, resources=changed.resources,
                           partition_key=part, selection=["concept_scores"])
        assert r.success and status()["report"] == StaleStatus.STALE

        # the manifests agree: a rerun of the other partition (unchanged inputs) recomputes nothing
        other = f"{cfg.layers[1]}|{cfg.widths[0]}"
        r = dg.materialize([new["latent_stats"]], instance=instance, resources=changed.resources,
                           partition_key=other, selection=["latent_stats"])
        assert r.asset_materializations_for_node("latent_stats")[-1].metadata["reused"].value is True
