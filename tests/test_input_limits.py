"""Input limits: the model's context length, strict integers, k and layers against the SAE and model,
and config errors on the command line (a message and exit 2, never a traceback)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from PIL import Image

from msae.config import PROJECT_ROOT, ConfigError, ExtractionConfig, ModelConfig, load_config, parse_config
from msae.extract import extract_activations
from msae.extract.batching import prepare_batches
from msae.store import Store
from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
from msae.vlm.load import LoadedVLM, load_vlm
from msae.world.shapes import VOCABULARY

LAYERS = [0, 2]
LONG_QUESTION = " ".join(["what color is the circle ?"] * 150)  # ~900 word tokens: beyond 512 positions


# --- context length ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tiny_vlm_dir) -> LoadedVLM:
    """The session's tiny LLaVA-NeXT (512 positions), loaded as the pipeline loads it."""
    return load_vlm(ModelConfig(name_or_path=str(tiny_vlm_dir), dtype="float32", device="cpu", batch_size=4,
                                local_files_only=True))


def _samples(tmp_path: Path, questions: list[str]) -> pl.DataFrame:
    rows = []
    for i, q in enumerate(questions):
        path = tmp_path / f"img{i}.png"
        arr = np.random.default_rng(i).integers(0, 256, (64, 48 + 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(path)
        rows.append({"sample_id": f"s{i}", "image": str(path), "question": q, "answer": "red"})
    return pl.DataFrame(rows)


def _extract(samples: pl.DataFrame, vlm: LoadedVLM, root: Path, **cfg):
    store = Store(str(root))
    cfg = ExtractionConfig(chunk_samples=4, rows_per_zarr_chunk=64, **cfg)
    res = extract_activations(samples, vlm, LAYERS, store, cfg, progress=False, batch_size=2)
    tokens = store.read_parquet(store.TOKENS)
    arrays = {layer: zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True),
                                     mode="r")[:] for layer in LAYERS}
    return res, tokens, arrays


def _rows_of(tokens: pl.DataFrame, arrays: dict, sid: str) -> tuple[list[int], dict[int, np.ndarray]]:
    idx = tokens.with_row_index().filter(pl.col("sample_id") == sid)["index"].to_numpy()
    return tokens["token_id"].to_numpy()[idx].tolist(), {layer: a[idx] for layer, a in arrays.items()}


def _assert_same_sample(a, b, sid: str) -> None:
    ids_a, rows_a = _rows_of(*a, sid)
    ids_b, rows_b = _rows_of(*b, sid)
    assert ids_a == ids_b and len(ids_a) > 0
    for layer in LAYERS:
        np.testing.assert_array_equal(rows_a[layer], rows_b[layer])


def test_context_length_is_read_from_the_text_config(tiny_vlm):
    from msae.extract.prepare import context_length  # new API

    assert context_length(tiny_vlm.model) == 512
    assert context_length(SimpleNamespace(config=SimpleNamespace(text_config=None))) is None  # unsaid: no check


def test_sample_beyond_the_context_is_skipped_and_counted(tiny_vlm, tmp_path, caplog):
    questions = ["what color is the circle ?", LONG_QUESTION, "how many objects are there ?"]
    samples = _samples(tmp_path, questions)
    with caplog.at_level(logging.WARNING, logger="msae.extract"):
        res, tokens, arrays = _extract(samples, tiny_vlm, tmp_path / "with_long")
    assert res.samples_done == 2
    assert res.samples_skipped == {"too_long": 1}  # where every other skip is counted (and reported)
    assert res.summary()["samples_skipped"] == {"too_long": 1}
    assert "max_position_embeddings" in res.skip_examples["too_long"][0]
    assert res.skip_examples["too_long"][0].startswith("s1:")
    assert any("too_long" in r.getMessage() and "'s1'" in r.getMessage() for r in caplog.records)
    assert set(tokens["sample_id"].unique()) == {"s0", "s2"}
    # the other samples are extracted exactly as without the long one
    ref = _extract(samples.filter(pl.col("sample_id") != "s1"), tiny_vlm, tmp_path / "without")[1:]
    for sid in ("s0", "s2"):
        _assert_same_sample((tokens, arrays), ref, sid)
    # evaluations that re-run the model on extracted samples leave it out too
    batches = list(prepare_batches(samples, tiny_vlm, ExtractionConfig(), batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [2]
    assert batches[0]["attention_mask"].sum(1).max() <= 512


def test_truncate_cuts_text_to_exactly_the_context(tiny_vlm, tmp_path):
    samples = _samples(tmp_path, ["what color is the circle ?", LONG_QUESTION, "how many objects are there ?"])
    res, tokens, arrays = _extract(samples, tiny_vlm, tmp_path / "truncated", too_long="truncate")
    assert res.samples_done == 3 and res.samples_skipped == {}
    long = tokens.filter(pl.col("sample_id") == "s1")
    assert long.height == 512 and long["position"].to_list() == list(range(512))
    # no image token was cut: the same image with a short question has as many
    short = _extract(_samples(tmp_path, ["what color is the circle ?", "what color is the circle ?"]),
                     tiny_vlm, tmp_path / "short")[1]
    n_image = short.filter((pl.col("sample_id") == "s1") & (pl.col("modality") == "image")).height
    assert long.filter(pl.col("modality") == "image").height == n_image > 0
    ref = _extract(samples.filter(pl.col("sample_id") != "s1"), tiny_vlm, tmp_path / "without")[1:]
    for sid in ("s0", "s2"):
        _assert_same_sample((tokens, arrays), ref, sid)


def test_image_tokens_beyond_the_context_are_skipped_even_under_truncate(tmp_path):
    geometry = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=3, text_heads=2,
                           text_intermediate=64, max_position_embeddings=48)  # fewer than the 8×8 base grid
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), geometry, seed=0)
    vlm = LoadedVLM(model.eval().requires_grad_(False), processor, torch.device("cpu"), torch.float32)
    samples = pl.concat([_samples(tmp_path, ["what is shown ?"]),
                         pl.DataFrame([{"sample_id": "text", "image": None, "question": "what is shown ?",
                                        "answer": "red"}])])
    res = _extract(samples, vlm, tmp_path / "s", too_long="truncate")[0]
    assert res.samples_done == 1 and res.samples_skipped == {"too_long": 1}
    assert "image tokens alone" in res.skip_examples["too_long"][0]


def test_too_long_choice_is_validated():
    assert ExtractionConfig().too_long == "skip"
    with pytest.raises(ValueError, match="too_long"):
        ExtractionConfig(too_long="cut")


# --- config: strict integers, k and layers -------------------------------------------------------------


def _base(**kw) -> dict:
    return {"store": "out", "dataset": {"kind": "shapes"}, "model": {"name_or_path": "some/model"},
            "layers": [1], "widths": [64], **kw}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"widths": [True]}, "widths.0"),
        ({"widths": [64.0]}, "widths.0"),
        ({"layers": [False]}, "layers.0"),
        ({"layers": ["1"]}, "layers.0"),
        ({"sae": {"k": True}}, "sae.k"),
        ({"sae": {"batch_size": 128.0}}, "sae.batch_size"),
        ({"sae": {"token_budget": "1000"}}, "sae.token_budget"),
        ({"model": {"name_or_path": "m", "batch_size": True}}, "model.batch_size"),
        ({"extraction": {"chunk_samples": True}}, "extraction.chunk_samples"),
        ({"extraction": {"max_length": 100.0}}, "extraction.max_length"),
        ({"latents": {"top_k": True}}, "latents.top_k"),
        ({"latents": {"batch_samples": 8.5}}, "latents.batch_samples"),
    ],
)
def test_integers_are_strict(patch, field):
    with pytest.raises(ConfigError) as err:
        parse_config(_base(**patch))
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith(field))
    assert "whole number" in line and "got" in line


def test_auto_batch_size_and_plain_integers_still_load():
    cfg = parse_config(_base(model={"name_or_path": "m", "batch_size": "auto"}, widths=[64, 32]))
    assert cfg.model.batch_size == "auto" and cfg.widths == [32, 64]


def test_k_above_a_width_fails_at_load_time():
    with pytest.raises(ConfigError, match=r"sae\.k: 48 .*widths \[32\].*choose sae\.k <= 32"):
        parse_config(_base(widths=[32, 64], sae={"k": 48}))
    assert parse_config(_base(widths=[32, 64], sae={"k": 32})).sae.k == 32


def test_layer_beyond_a_local_model_fails_at_load_time(tiny_vlm_dir):
    with pytest.raises(ConfigError, match=r"layers: 3 is beyond the model's 3 layers \(0–2\).*choose layers < 3"):
        parse_config(_base(model={"name_or_path": str(tiny_vlm_dir)}, layers=[0, 3]))
    assert parse_config(_base(model={"name_or_path": str(tiny_vlm_dir)}, layers=[0, 2])).layers == [0, 2]


def test_relative_model_folder_is_checked_from_the_config_file(tmp_path, tiny_vlm_dir):
    (tmp_path / "vlm").symlink_to(tiny_vlm_dir, target_is_directory=True)
    path = tmp_path / "cfg.yaml"
    path.write_text("store: out\ndataset: {kind: shapes}\nmodel: {name_or_path: vlm}\nlayers: [5]\nwidths: [32]\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*\n.*layers: 5 is beyond the model's 3 layers"):
        load_config(path)


def _fake_hub_cache(root: Path, repo: str, config: dict) -> None:
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("config loading tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_layer_beyond_a_cached_hub_model_fails_without_a_download(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "org/explicit", {"model_type": "llava_next",
                                               "text_config": {"model_type": "llama", "num_hidden_layers": 32}})
    with pytest.raises(ConfigError, match=r"layers: 40 is beyond the model's 32 layers \(0–31\); choose layers < 32"):
        parse_config(_base(model={"name_or_path": "org/explicit"}, layers=[40]))
    assert parse_config(_base(model={"name_or_path": "org/explicit"}, layers=[31])).layers == [31]
    # a config saved as a diff against the defaults (Llama's 32 layers left out) is read with those defaults
    _fake_hub_cache(tmp_path, "org/diffed", {"model_type": "llava_next", "text_config": {"model_type": "llama"}})
    with pytest.raises(ConfigError, match="beyond the model's 32 layers"):
        parse_config(_base(model={"name_or_path": "org/diffed"}, layers=[32]))
    # not in the cache: not checked here (the extraction stage checks it), and nothing is downloaded
    assert parse_config(_base(model={"name_or_path": "org/elsewhere"}, layers=[40])).layers == [40]


def test_profiles_load_offline(monkeypatch, no_network):
    for var in ("MSAE_CONFIG", "MSAE_PROFILE", "MSAE_STORE"):
        monkeypatch.delenv(var, raising=False)
    assert load_config().layers == [1, 3]  # the embedded model's folder is checked (4 layers)
    assert load_config(profile="paper").layers == [24]  # a hub id not cached here: silently not checked


# --- the command line --------------------------------------------------------------------------------


def _msae(args: list[str], config: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MSAE_CONFIG", "MSAE_PROFILE", "MSAE_STORE")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if config is not None:
        env["MSAE_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "msae.cli", *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=PROJECT_ROOT)


def _config_file(tmp_path: Path, body: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ("store: out\ndataset: {kind: shapes}\nmodel: {name_or_path: m}\nlayers: [0]\nwidths: [true]\n",
         ["widths.0", "whole number", "got True"]),
        ("store: out\ndataset: {kind: shapes}\nmodel: {name_or_path: m}\nlayers: [0]\nwidths: [8]\nsae: {k: 9}\n",
         ["sae.k", "choose sae.k <= 8"]),
        ("store: [out\n", ["not valid YAML"]),
        (None, ["config file not found", "missing.yaml"]),
    ],
)
@pytest.mark.parametrize("command", ["config", "materialize"])
def test_cli_config_errors_are_a_message_not_a_traceback(tmp_path, command, body, needles):
    path = tmp_path / "missing.yaml" if body is None else _config_file(tmp_path, body)
    out = _msae([command, "--dry-run"] if command == "materialize" else [command], path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.startswith(f"msae {command}: ")
    for needle in needles:
        assert needle in out.stderr


def test_cli_layer_beyond_the_model(tmp_path, tiny_vlm_dir):
    path = _config_file(tmp_path, f"store: out\ndataset: {{kind: shapes}}\nmodel: {{name_or_path: {tiny_vlm_dir}}}\n"
                                  "layers: [7]\nwidths: [32]\n")
    out = _msae(["config"], path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "layers: 7 is beyond the model's 3 layers (0–2)" in out.stderr and "choose layers < 3" in out.stderr


def test_cli_bad_world_arguments(tmp_path):
    out = _msae(["world", str(tmp_path / "w"), "--n-images", "0"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "n_images" in out.stderr and "got 0" in out.stderr
    assert not (tmp_path / "w").exists()


def test_cli_good_config_prints_it(tmp_path):
    out = _msae(["config"])  # the embedded profile
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layers"] == [1, 3]
