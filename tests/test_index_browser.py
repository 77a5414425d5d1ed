"""The index page in a real headless browser, from file://: cards present, the filter hides cards,
and a screenshot renders. Needs /usr/bin/chromium (Debian: `apt-get install -y chromium`)."""

import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from msae.latents.index_html import write_index
from msae.store import Store

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium not installed at /usr/bin/chromium (apt-get install -y chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def index_url(tmp_path) -> str:
    """An index with two cards (tiny PNGs) written through the store; its file:// URL."""
    store = Store(str(tmp_path / "store"))
    base = Path(store.path("latents/layer=1/width=16"))
    (base / "cards").mkdir(parents=True)
    for latent, colour in [(3, (200, 30, 40)), (12, (20, 60, 210))]:
        Image.new("RGB", (120, 80), colour).save(base / f"cards/latent_{latent:06d}.png")
    entries = [
        {"latent": 3, "card": "cards/latent_000003.png", "stats": {"freq img": "2.00e-01", "modality": "0.60"},
         "concept_visual": "red circles", "concept_textual": "colour words", "modality": "multimodal"},
        {"latent": 12, "card": "cards/latent_000012.png", "stats": {"freq img": "1.00e-02", "modality": "0.95"},
         "concept_visual": "blue <squares>", "modality": "visual"},
    ]
    name = write_index(store, 1, 16, entries, title="test index")
    return Path(store.path(name)).as_uri()


def _cards(dom: str) -> dict[str, bool]:
    """latent id → hidden, from the dumped DOM."""
    out = {}
    for tag in re.findall(r"<figure [^>]*>", dom):
        out[re.search(r'data-latent="(\d+)"', tag).group(1)] = " hidden" in tag
    return out


def test_index_dom_in_chromium(tmp_path, index_url):
    result = _chromium(tmp_path, "--dump-dom", index_url)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert _cards(dom) == {"3": False, "12": False}
    assert 'src="cards/latent_000003.png"' in dom and "blue &lt;squares&gt;" in dom
    assert "2 of 2 shown" in dom


def test_index_filter_in_chromium(tmp_path, index_url):
    result = _chromium(tmp_path, "--dump-dom", index_url + "#q=blue%20visual")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _cards(result.stdout) == {"3": True, "12": False}
    assert "1 of 2 shown" in result.stdout


def test_index_screenshot_in_chromium(tmp_path, index_url):
    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,600", index_url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (900, 600)
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (200, 30, 40) in colours and (20, 60, 210) in colours  # both card images were loaded

