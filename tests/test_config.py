"""Configuration: profiles load, bad keys and values fail with the key's dotted path."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from msae.config import PROFILES, ConfigError, config_hash, load_config, parse_config


def _base() -> dict:
    return {
        "store": "out",
        "dataset": {"kind": "shapes", "shapes": {"n_images": 10}},
        "model": {"name_or_path": "some/model"},
        "layers": [3, 1],
        "widths": [64],
    }


def test_embedded_profile_is_the_default(monkeypatch):
    monkeypatch.delenv("MSAE_CONFIG", raising=False)
    monkeypatch.delenv("MSAE_PROFILE", raising=False)
    monkeypatch.delenv("MSAE_STORE", raising=False)
    cfg = load_config()
    assert cfg.dataset.kind == "shapes"
    assert cfg.model.local_files_only is True
    assert Path(cfg.store).is_absolute()


def test_paper_profile_matches_the_reference_setup(monkeypatch):
    monkeypatch.delenv("MSAE_CONFIG", raising=False)
    monkeypatch.setenv("MSAE_PROFILE", "paper")
    cfg = load_config()
    assert cfg.model.name_or_path == "llava-hf/llama3-llava-next-8b-hf"
    assert cfg.model.dtype == "float16" and cfg.model.attn_implementation == "sdpa"
    assert (cfg.dataset.kind, cfg.dataset.name, cfg.dataset.fraction) == ("hf", "lmms-lab/LLaVA-NeXT-Data", 0.15)
    assert cfg.layers == [24] and cfg.widths == [131072]
    assert cfg.sae.source == "pretrained" and cfg.sae.k == 256
    assert cfg.sae.pretrained == "lmms-lab/llama3-llava-next-8b-hf-sae-131k"
    assert cfg.sae.hookpoint_template.format(layer=24) == "model.layers.24"
    assert (cfg.latents.select, cfg.latents.n) == ("first", 5000)


def test_unknown_profile_names_the_choices(monkeypatch):
    monkeypatch.delenv("MSAE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="embedded"):
        load_config(profile="papr")


def test_unknown_nested_key_is_named():
    data = _base()
    data["dataset"]["shapes"]["n_imagez"] = 3
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "dataset.shapes.n_imagez" in str(err.value)
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"layers": [-1]}, "layers"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"widths": [0]}, "widths"),
        ({"dataset": {"kind": "llava"}}, "dataset.path is required"),
        ({"dataset": {"kind": "hf"}}, "dataset.name is required"),
        ({"dataset": {"kind": "hf", "name": "x", "fraction": 1.5}}, "dataset.fraction"),
        ({"model": {"name_or_path": "m", "dtype": "float8"}}, "model.dtype"),
        ({"dataset": {"kind": "shapes", "shapes": {"min_objects": 3, "max_objects": 2}}}, "min_objects"),
    ],
)
def test_bad_values_name_the_key(patch, needle):
    data = {**_base(), **patch}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(data)


@pytest.mark.parametrize(
    ("dataset", "explainer"),
    [({"kind": "hf", "name": "lmms-lab/LLaVA-NeXT-Data"}, {}),  # dissection is the default backend
     ({"kind": "llava", "path": "data.json"}, {"backend": "dissection"})],
)
def test_dissection_without_annotations_is_refused_at_load(dataset, explainer):
    with pytest.raises(ConfigError) as err:
        parse_config({**_base(), "dataset": dataset, "explainer": explainer})
    message = str(err.value)
    assert "explainer.backend 'dissection'" in message and f"dataset.kind {dataset['kind']!r}" in message
    assert "set explainer.backend to 'openai'" in message and "'transformers'" in message


def test_dissection_on_shapes_and_the_oracle_control_without_annotations_load():
    assert parse_config(_base()).explainer.backend == "dissection"
    assert parse_config(_base()).dataset.has_annotations
    # the dissection oracle control only skips where annotations are missing: not a reason to refuse
    cfg = parse_config({**_base(), "dataset": {"kind": "hf", "name": "x"},
                        "explainer": {"backend": "openai", "model": "m"}, "controls": {"dissection_oracle": True}})
    assert not cfg.dataset.has_annotations and cfg.controls.dissection_oracle


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads(profile, monkeypatch):
    monkeypatch.delenv("MSAE_CONFIG", raising=False)
    monkeypatch.delenv("MSAE_STORE", raising=False)
    assert load_config(profile=profile).layers


def test_layers_and_widths_are_sorted():
    cfg = parse_config({**_base(), "widths": [128, 64]})
    assert cfg.layers == [1, 3] and cfg.widths == [64, 128]


def test_config_file_env_and_store_override(tmp_path, monkeypatch):
    (tmp_path / "mymodel").mkdir()
    path = tmp_path / "cfg.yaml"
    path.write_text(
        textwrap.dedent(
            """
            store: results
            dataset: {kind: shapes}
            model: {name_or_path: mymodel}
            layers: [0]
            widths: [32]
            """
        )
    )
    monkeypatch.setenv("MSAE_CONFIG", str(path))
    monkeypatch.delenv("MSAE_STORE", raising=False)
    cfg = load_config()
    # relative paths resolve against the config file's folder; hub-like ids that do not exist stay
    assert cfg.store == str(tmp_path / "results")
    assert cfg.model.name_or_path == str(tmp_path / "mymodel")
    monkeypatch.setenv("MSAE_STORE", "memory://elsewhere")
    assert load_config().store == "memory://elsewhere"


def test_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("MSAE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config()


def test_config_hash_tracks_content_only():
    a = parse_config(_base())
    b = parse_config({**_base(), "layers": [1, 3]})
    c = parse_config({**_base(), "model": {"name_or_path": "other"}})
    assert config_hash(a.model) == config_hash(b.model)
    assert config_hash(a.model) != config_hash(c.model)
    assert config_hash(a.dataset) == config_hash(c.dataset)


def test_library_imports_without_dagster():
    code = (
        "import sys; sys.modules['dagster'] = None\n"
        "import msae.config, msae.store, msae.manifest, msae.world.shapes, msae.data.samples\n"
        "import msae.vlm.build, msae.vlm.load, msae.extract.extractor, msae.sae\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
