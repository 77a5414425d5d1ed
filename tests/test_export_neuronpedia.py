"""Neuronpedia export on the hand-built latent_stats store of test_cards, plus concepts and ground truth."""

import json
from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel, ValidationError
from test_cards import LAYER, WIDTH, store  # noqa: F401  (the fixture: local and memory:// stores)

from msae.cli import main
from msae.config import PROJECT_ROOT, parse_config
from msae.explain.stage import PROPOSALS, concepts_folder
from msae.export.neuronpedia import EXPORT_ROOT, FEATURES, export_neuronpedia, model_id, width_label
from msae.export import schema
from msae.export.schema import FeatureRecord, validate_record
from msae.latents.evidence import latents_dir, load_evidence
from msae.score.stage import CONCEPTS, GROUND_TRUTH
from msae.store import Store

N_IMAGE, N_TEXT = 400, 100
MODES = ("masked", "whole")


def _concepts() -> pl.DataFrame:
    """Explained latents 0, 1, 3 × both modes; latent 1 has no visual concept, latent 3 a NaN score."""
    rows = []
    for latent, visual, textual, label in [(0, "diagonal", None, "visual"), (1, None, "objects", "textual"),
                                           (3, "red", "red", "multimodal")]:
        for k, mode in enumerate(MODES):
            rows.append({"latent": latent, "prompting": mode, "visual_concept": visual, "textual_concept": textual,
                         "visual_concept_proposed": "red circle" if latent == 3 else visual,
                         "visual_score": 0.9 - 0.1 * k + latent / 100, "visual_score__clip-b": 0.7,
                         "visual_score_var": 0.01, "visual_population_auroc": float("nan") if latent == 3 else 0.8,
                         "textual_score": 0.6, "textual_population_precision": 0.5, "visual_category": "color",
                         "concepts_agree": latent == 3, "modality": label if mode == "masked" else "none"})
    return pl.DataFrame(rows)


@pytest.fixture
def cfg(store):  # noqa: F811
    """The config the export reads, and the store completed with the concept stages' tables."""
    folder = concepts_folder(LAYER, WIDTH)
    store.write_parquet(_concepts(), folder, CONCEPTS)
    store.write_parquet(pl.DataFrame({"latent": [3], "gt_modality": ["multimodal"], "gt_visual_concept": ["red"],
                                      "gt_visual_auroc": [0.97], "gt_textual_auroc": [float("nan")]}),
                        folder, GROUND_TRUTH)
    store.write_parquet(pl.DataFrame({"latent": [0, 0, 1, 1, 3, 3], "prompting": list(MODES) * 3,
                                      "explainer": ["openai:gpt-x"] * 6}), folder, PROPOSALS)
    stats = store.read_parquet(latents_dir(LAYER, WIDTH), "stats.parquet")
    store.write_parquet(stats.with_columns(fires_image=pl.Series([4, 0, 0, 80]), fires_text=pl.Series([0, 3, 0, 10])),
                        latents_dir(LAYER, WIDTH), "stats.parquet")
    store.write_json({"n_image_tokens": N_IMAGE, "n_text_tokens": N_TEXT}, latents_dir(LAYER, WIDTH), "summary.json")
    return parse_config({"store": store.root, "dataset": {"kind": "shapes"}, "model": {"name_or_path": "Org/Tiny.VLM"},
                         "layers": [LAYER], "widths": [WIDTH, 2 * WIDTH], "sae": {"k": 4},
                         "embedders": {"image_text": ["clip-a", "clip-b"], "text": "minilm"}})


def _lines(path: Path | str, fs_store: Store | None = None) -> list[dict]:
    data = fs_store.read_bytes(path) if fs_store is not None else Path(path).read_bytes()
    return [json.loads(line) for line in data.decode().splitlines()]


def test_export_matches_the_store(cfg, store, tmp_path):  # noqa: F811
    out = Store(str(tmp_path / "np"))
    (result,) = export_neuronpedia(cfg, store, out)  # width 32 has no concepts: skipped
    records = _lines(result.path)
    concepts = _concepts()
    assert result.features == len(records) == 3 == concepts["latent"].n_unique()
    assert (result.layer, result.width) == (LAYER, WIDTH) and result.path.endswith(f"layer=1/width=16/{FEATURES}")
    for record in records:
        validate_record(record)
    by_index = {int(r["index"]): r for r in records}
    assert sorted(by_index) == [0, 1, 3]

    r3 = by_index[3]
    assert (r3["modelId"], r3["layer"], r3["sourceSetName"]) == ("tiny-vlm", "1-msae-res-16", "msae-res-16")
    assert r3["maxActApprox"] == 2.0 and r3["frac_nonzero"] == pytest.approx(90 / (N_IMAGE + N_TEXT))
    # the top text: tokens as displayed, Neuronpedia's max (first argmax: the template token "user"), msae's peak
    (act,) = r3["activations"]
    assert act["tokens"] == load_evidence(store, LAYER, WIDTH, [3])[3].texts[0].display()
    assert act["tokens"][-1].strip() == "red"
    assert act["values"] == pytest.approx([0.9, 0, 0, 0, 0, 0.3, 0, 0, 0.9])
    assert act["maxValue"] == pytest.approx(0.9) and act["maxValueTokenIndex"] == 0
    assert act["qualifyingTokenIndex"] == 8 and act["dataIndex"] == "s0" and act["minValue"] == 0.0
    # image evidence as msae's extra fields: the stored peak, the patches above the threshold
    m3 = r3["msae"]
    first, second = m3["image_activations"]
    assert (first["sample_id"], first["image"], first["grid_rows"], first["grid_cols"]) == (
        "s0", store.url("world/images/a.png"), 8, 8)
    assert first["max_activation"] == 2.0 and first["max_patch"] == 10 and first["active_patches"] == [9, 10, 17]
    assert first["patch_activations"][17] == 0.5 and (second["grid_rows"], second["max_patch"]) == (3, 4)
    # label and concepts from concepts.parquet (labels from the first prompting mode, masked)
    assert m3["label"] == concepts.filter((pl.col("latent") == 3) & (pl.col("prompting") == "masked"))["modality"][0]
    assert m3["label_prompting"] == "masked" and [c["modality"] for c in m3["concepts"]] == ["multimodal", "none"]
    assert m3["ground_truth"] == {"gt_modality": "multimodal", "gt_visual_concept": "red", "gt_visual_auroc": 0.97,
                                  "gt_textual_auroc": None}
    assert (m3["fires_image"], m3["freq_text"]) == (80, 0.1)
    # explanations: the visual concept per mode, the textual once; scores are the concept columns
    types = {e["typeName"]: e for e in r3["explanations"]}
    assert list(types) == ["msae-visual-masked", "msae-visual-whole", "msae-textual-masked"]
    masked = types["msae-visual-masked"]
    assert masked["description"] == "red" and masked["explanationModelName"] == "openai:gpt-x"
    assert "red circle" in masked["notes"]
    scores = {s["explanationScoreTypeName"]: s for s in masked["scores"]}
    assert set(scores) == {"visual_score", "visual_score__clip-b"}  # NaN population AUROC left out; no variance
    assert scores["visual_score"]["value"] == pytest.approx(0.93)
    assert scores["visual_score"]["explanationScoreModelName"] == "clip-a"
    assert scores["visual_score__clip-b"]["explanationScoreModelName"] == "clip-b"
    textual = {s["explanationScoreTypeName"]: s for s in types["msae-textual-masked"]["scores"]}
    assert textual["textual_score"]["explanationScoreModelName"] == "minilm"
    assert textual["textual_population_precision"]["explanationScoreModelName"] is None

    # a latent without a visual concept has no visual explanation; no ground truth row: null
    assert [e["typeName"] for e in by_index[1]["explanations"]] == ["msae-textual-masked"]
    assert by_index[1]["msae"]["ground_truth"] is None and by_index[1]["msae"]["image_activations"] == []
    assert by_index[0]["activations"] == [] and by_index[0]["msae"]["label"] == "visual"

    again = export_neuronpedia(cfg, store, Store(str(tmp_path / "again")))[0]
    assert Path(again.path).read_bytes() == Path(result.path).read_bytes()  # deterministic


def test_export_defaults_into_the_store_and_refuses_missing_partitions(cfg, store):  # noqa: F811
    (result,) = export_neuronpedia(cfg, store, layers=[LAYER], widths=[WIDTH])
    assert result.path == store.url(EXPORT_ROOT, f"layer={LAYER}/width={WIDTH}", FEATURES)
    assert len(_lines(f"{EXPORT_ROOT}/layer={LAYER}/width={WIDTH}/{FEATURES}", store)) == 3
    with pytest.raises(ValueError, match=r"no concepts\.parquet for layer 1, width 32"):
        export_neuronpedia(cfg, store, widths=[2 * WIDTH])


def test_cli_export(cfg, store, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "cfg.json"  # JSON is YAML
    path.write_text(json.dumps({**cfg.model_dump(mode="json"), "store": "elsewhere"}))
    args = ["export", "neuronpedia", "--config", str(path), "--store", store.root, "--out", str(tmp_path / "o")]
    assert main([*args, "--layer", str(LAYER), "--width", str(WIDTH)]) == 0
    assert "3 features" in capsys.readouterr().out
    assert len(_lines(tmp_path / "o" / f"layer={LAYER}" / f"width={WIDTH}" / FEATURES)) == 3
    assert main([*args, "--width", str(2 * WIDTH)]) == 1
    assert "materialize concept_scores" in capsys.readouterr().err


def test_schema_refuses_inconsistent_records(cfg, store, tmp_path):  # noqa: F811
    record = _lines(export_neuronpedia(cfg, store, Store(str(tmp_path)))[0].path)[-1]
    bad_max = json.loads(json.dumps(record))
    bad_max["activations"][0]["maxValueTokenIndex"] = 1
    bad_patches = json.loads(json.dumps(record))
    bad_patches["msae"]["image_activations"][0]["active_patches"] = [10]
    other_feature = json.loads(json.dumps(record))
    other_feature["explanations"][0]["index"] = "0"
    for bad in (bad_max, bad_patches, other_feature, {**record, "density": 0.1}):
        with pytest.raises(ValidationError):
            validate_record(bad)


def test_names():
    assert [width_label(w) for w in (256, 16384, 131072, 1_048_576)] == ["256", "16k", "131k", "1m"]
    assert model_id("llava-hf/llama3-llava-next-8b-hf") == "llama3-llava-next-8b-hf"
    assert model_id("/work/data/shapes-llava/") == "shapes-llava"


def test_docs_name_every_field():
    models = [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    fields = {f for m in models if m.__module__ == schema.__name__ for f in m.model_fields}
    text = (PROJECT_ROOT / "docs" / "formats.md").read_text()
    section = text[text.index("## Neuronpedia export"):]
    missing = sorted(f for f in fields if f"`{f}`" not in section)
    assert {"maxValueTokenIndex", "image_activations", "explanationScoreTypeName"} <= fields and not missing, (
        f"docs/formats.md 'Neuronpedia export' does not name {missing}")
    assert "properties" in FeatureRecord.model_json_schema()
