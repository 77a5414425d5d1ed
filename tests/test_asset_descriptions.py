"""The descriptions Dagster shows (assets, the checkpoint source asset, asset checks, the sensor)
render as written: the UI reads them as Markdown, where a bare ``<store>`` or ``<L>`` is an HTML
tag and disappears. Paths with placeholders go in code spans (`` `<store>/sae/...` ``), which the
UI renders literally."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import yaml

from test_definitions_snapshot import WATCHING

# What CommonMark reads as an inline HTML tag: ``<`` then a tag name or ``/``, up to ``>``.
TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def bare_tags(text: str) -> list[str]:
    """The ``<word>`` pieces of ``text`` outside its code spans."""
    return [m.group(0) for m in TAG.finditer(CODE_SPAN.sub("", text))]


def descriptions() -> dict[str, str]:
    from msae.config import parse_config, profile_text
    from msae_assets.definitions import build_definitions

    data = yaml.safe_load(profile_text("embedded"))
    with tempfile.TemporaryDirectory() as empty:
        cfg = parse_config({**data, "checkpoints": WATCHING}, "profile embedded + checkpoints", Path(empty))
        repo = build_definitions(cfg).get_repository_def()
    out = {}
    for key, asset in repo.assets_defs_by_key.items():
        out[f"asset {key.to_user_string()}"] = asset.descriptions_by_key.get(key)
        for spec in asset.check_specs:
            out[f"check {spec.asset_key.to_user_string()}.{spec.name}"] = spec.description
    for key, source in repo.source_assets_by_key.items():
        out[f"source asset {key.to_user_string()}"] = source.description
    for sensor in repo.sensor_defs:
        out[f"sensor {sensor.name}"] = sensor.description
    return out


def test_the_pattern_sees_tags_outside_code_spans_only():
    assert bare_tags("→ <store>/sae/layer=<L>/") == ["<store>", "<L>"]
    assert bare_tags("→ `<store>/sae/layer=<L>/` and `<W>`") == []
    assert bare_tags("FVU <= 0.2, a < b > c") == []


@pytest.fixture(scope="module")
def described() -> dict[str, str]:
    return descriptions()


def test_every_asset_has_a_description(described):
    assets = {name: text for name, text in described.items() if name.startswith("asset ")}
    assert {"asset sae", "asset latent_stats", "asset report", "asset vqa_samples"} <= set(assets)
    assert all(text and text.strip() for text in assets.values()), assets


def test_no_description_holds_a_bare_html_tag(described):
    bad = {name: bare_tags(text) for name, text in described.items() if text and bare_tags(text)}
    assert not bad, f"wrap these in backticks (the Dagster UI reads descriptions as Markdown): {bad}"
    assert any("`<store>/" in text for text in described.values() if text)
