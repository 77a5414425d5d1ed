"""Which image references a dataset may make the pipeline open, and how much it reads.

Confinement to the image root (paths, ``..``, symlinks, ``file://``, other schemes), checked before
anything is opened; regular files only; byte and pixel bounds; http(s) images only when allowed,
fetched by httpx from a loopback server; EXIF orientation. Every refusal is a counted skip.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import conv, encode, noise_rgb, write_llava
from msae.config import DatasetConfig
from msae.data import DatasetError, build_samples, load_image_rgb
from msae.data.images import BadImage
from msae.store import Store

CONV = conv("<image>\nq", "a")
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png(value: int = 100, size: int = 8) -> bytes:
    return encode(Image.new("L", (size, size), value))


def _record(sample_id: str, image: str) -> dict[str, object]:
    return {"id": sample_id, "image": image, "conversations": CONV}


def _llava(tmp_path: Path, records: list[dict[str, object]], **kw: object) -> tuple[DatasetConfig, Store]:
    path = write_llava(tmp_path / "ds", records, jsonl=False)
    return DatasetConfig(kind="llava", path=str(path), **kw), Store(str(tmp_path / "store"))


def _reasons(res) -> dict[str, str]:
    return {e["sample_id"]: e["reason"] for e in res.examples}


@contextmanager
def fifo_probe(path: Path) -> Iterator[list[bool]]:
    """A FIFO at ``path`` plus a watcher that notes whether anyone opened it for reading.

    A writer's non-blocking open succeeds only while a reader has the FIFO open (or waits in
    open()); the watcher then closes at once, so a reader gets EOF instead of hanging the test.
    """
    os.mkfifo(path)
    opened: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                stop.wait(0.02)
                continue
            opened.append(True)
            os.close(fd)
            stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """ds/ (the dataset, images inside) and outside/ (a secret next to it)."""
    inside = tmp_path / "ds" / "images"
    inside.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (inside / "good.png").write_bytes(_png(10))
    (outside / "secret.png").write_bytes(_png(200))
    (inside / "escape.png").symlink_to(outside / "secret.png")  # inside by name, outside in fact
    (inside / "alias.png").symlink_to(inside / "good.png")  # a symlink that stays inside: fine
    (inside / "linked_dir").symlink_to(outside, target_is_directory=True)
    return {"inside": inside, "outside": outside}


# --- 4: confinement -----------------------------------------------------------------------------


def test_image_refs_must_stay_inside_the_image_root(layout, tmp_path):
    secret = layout["outside"] / "secret.png"
    good = layout["inside"] / "good.png"
    records = [
        _record("ok", "images/good.png"),
        _record("alias", "images/alias.png"),
        _record("file_inside", f"file://{good}"),
        _record("dotdot", "../outside/secret.png"),
        _record("deep_dotdot", "images/../../outside/secret.png"),
        _record("absolute", str(secret)),
        _record("file_outside", f"file://{secret}"),
        _record("passwd", "../../../../../../../../etc/passwd"),
        _record("symlink", "images/escape.png"),
        _record("symlinked_dir", "images/linked_dir/secret.png"),
        _record("memory", "memory://elsewhere/secret.png"),
        _record("ftp", "ftp://127.0.0.1/secret.png"),
        _record("chained", f"simplecache::file://{secret}"),
    ]
    cfg, store = _llava(tmp_path, records)
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok", "alias", "file_inside"]
    # file:// refs are stored as plain paths, in the user's (un-resolved) form
    assert res.table["image"].to_list() == [str(good), str(layout["inside"] / "alias.png"), str(good)]
    assert res.skips == {"outside_image_root": 7, "unsupported_scheme": 3}
    reasons = _reasons(res)
    assert {k: reasons[k] for k in ("memory", "ftp", "chained")} == dict.fromkeys(
        ("memory", "ftp", "chained"), "unsupported_scheme"
    )
    detail = next(e["detail"] for e in res.examples if e["sample_id"] == "symlink")
    assert str(secret) in detail and "allowed_image_roots" in detail


def test_allowed_image_roots_and_image_root_widen_what_may_be_read(layout, tmp_path):
    secret = layout["outside"] / "secret.png"
    records = [_record("ok", "images/good.png"), _record("abs", str(secret)), _record("dotdot", "../outside/secret.png")]
    cfg, store = _llava(tmp_path, records, allowed_image_roots=[str(layout["outside"])])
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok", "abs", "dotdot"] and res.skips == {}
    assert res.table["image"][2] == str(secret)  # `..` normalised away

    # image_root moves the root: now ds/images itself, so "images/good.png" means ds/images/images/…
    cfg, store = _llava(tmp_path, [_record("ok", "good.png"), _record("up", "../images/good.png"),
                                   _record("out", "../../outside/secret.png")], image_root=str(layout["inside"]))
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok", "up"] and res.skips == {"outside_image_root": 1}


def test_refused_refs_are_never_opened(layout, tmp_path):
    """An outside FIFO would block whoever opens it: the refusal comes before any open."""
    outside_fifo = layout["outside"] / "fifo.png"
    inside_fifo = layout["inside"] / "fifo.png"
    with fifo_probe(outside_fifo) as opened_outside, fifo_probe(inside_fifo) as opened_inside:
        records = [
            _record("ok", "images/good.png"),
            _record("outside_fifo", "../outside/fifo.png"),
            _record("outside_fifo_abs", f"file://{outside_fifo}"),
            _record("inside_fifo", "images/fifo.png"),
        ]
        cfg, store = _llava(tmp_path, records)
        res = build_samples(cfg, store)
        time.sleep(0.1)  # give the watchers a last look
    assert res.table["sample_id"].to_list() == ["ok"]
    assert res.skips == {"outside_image_root": 2, "not_regular_file": 1}
    assert not opened_outside, "a reference outside the root was opened"
    assert not opened_inside, "a FIFO was opened (only regular files may be)"


def test_hf_string_paths_resolve_against_the_dataset_folder(layout, tmp_path):
    import polars as pl

    folder = tmp_path / "hfds"
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "a.png").write_bytes(_png(30))
    secret = layout["outside"] / "secret.png"
    rows = [("a", "imgs/a.png"), ("up", "../outside/secret.png"), ("abs", str(secret)),
            ("url", "http://127.0.0.1:9/x.png")]
    turns = [[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]] * len(rows)
    pl.DataFrame({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "conversations": turns}).write_parquet(
        folder / "train-00000-of-00001.parquet"
    )
    res = build_samples(DatasetConfig(kind="hf", name=str(folder)), Store(str(tmp_path / "store")))
    assert res.table["sample_id"].to_list() == ["a"]
    assert res.table["image"].to_list() == [str(folder / "imgs" / "a.png")]
    assert res.skips == {"outside_image_root": 2, "url_not_allowed": 1}


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_shapes_world_images_must_stay_in_the_world_folder(monkeypatch, tmp_path, store_kind):
    """The world's own images are read; a conversations.json pointing out of the world is refused."""
    import sys
    import types

    from msae.world.config import ShapesConfig

    store = Store(str(tmp_path / "store")) if store_kind == "local" else Store(f"memory://msae-refs-{uuid.uuid4().hex}")
    store.write_bytes(_png(50), "secret.png")  # in the store, but not in the world

    def generate_world(cfg: ShapesConfig, out_dir: str | Path) -> None:
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "images" / "000000.png").write_bytes(_png(1))
        records = [_record("s0", "images/000000.png"), _record("s1", "../secret.png"),
                   _record("s2", store.url("secret.png"))]
        (out / "conversations.json").write_text(json.dumps(records))

    module = types.ModuleType("msae.world.shapes")
    module.generate_world = generate_world  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msae.world.shapes", module)
    try:
        res = build_samples(DatasetConfig(kind="shapes", shapes=ShapesConfig(n_images=1)), store)
        assert res.table["image"].to_list() == [store.url("world", "images", "000000.png")]
        assert res.skips == {"outside_image_root": 2}
    finally:
        store.rm()


def test_allowed_image_roots_refuse_urls():
    with pytest.raises(ValueError, match="allow_image_urls"):
        DatasetConfig(kind="llava", path="x.json", allowed_image_roots=["https://example.com/imgs"])


def test_config_defaults_match_the_reader_defaults():
    from msae.data.images import DEFAULT_LIMITS, ImageLimits

    cfg = DatasetConfig(kind="shapes")
    assert ImageLimits.from_config(cfg) == DEFAULT_LIMITS
    assert cfg.allowed_image_roots == [] and cfg.allow_image_urls is False
    assert DEFAULT_LIMITS.max_bytes == 64 * 1024 * 1024 and DEFAULT_LIMITS.max_pixels == Image.MAX_IMAGE_PIXELS


# --- 7: only regular files, bounded bytes and pixels -------------------------------------------


def _limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_dev_zero_is_a_skip_without_being_read(tmp_path):
    """Run in a child with 1 GiB of address space: reading /dev/zero would die of MemoryError there."""
    code = (
        "from msae.data.images import BadImage, load_image_rgb\n"
        "try:\n    load_image_rgb('/dev/zero')\nexcept BadImage as err:\n    print('REASON', err.reason)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=_limited_memory, env=env, cwd=str(Path(__file__).parents[1]))
    assert out.stdout.strip() == "REASON not_regular_file", out.stderr[-2000:]


def test_devices_and_directories_in_a_dataset_are_counted_skips(layout, tmp_path):
    (layout["inside"] / "folder.png").mkdir()
    records = [_record("ok", "images/good.png"), _record("zero", "/dev/zero"), _record("dir", "images/folder.png")]
    cfg, store = _llava(tmp_path, records, allowed_image_roots=["/dev"])
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok"]
    assert _reasons(res) == {"zero": "not_regular_file", "dir": "not_regular_file"}


def test_files_over_max_image_bytes_are_skipped(layout, tmp_path):
    big = encode(noise_rgb(64))  # noise: does not compress
    (layout["inside"] / "big.png").write_bytes(big)
    small = (layout["inside"] / "good.png").read_bytes()
    assert len(small) < 1000 < len(big)
    records = [_record("ok", "images/good.png"), _record("big", "images/big.png")]
    cfg, store = _llava(tmp_path, records, max_image_bytes=1000)
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok"] and res.skips == {"image_too_large": 1}
    from msae.data.images import ImageLimits

    assert load_image_rgb(str(layout["inside"] / "big.png"), ImageLimits(max_bytes=len(big))).size == (64, 64)
    with pytest.raises(BadImage, match="image_too_large"):
        load_image_rgb(str(layout["inside"] / "big.png"), ImageLimits(max_bytes=len(big) - 1))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _bomb_png(side: int, rows: int | None = None) -> bytes:
    """A greyscale PNG declaring side × side pixels, all zero: ~100 KB on disk for 10⁸ pixels.
    With ``rows``, only that many rows of pixel data follow (the header is what matters)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side if rows is None else rows)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_from_the_header(layout, tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    (layout["inside"] / "bomb.png").write_bytes(_bomb_png(10_000))  # 10⁸ pixels: over the default limit
    (layout["inside"] / "huge.png").write_bytes(_bomb_png(20_000, rows=1))  # 4×10⁸: PIL's own refusal
    decoded: list[tuple[int, int]] = []
    load = PngImagePlugin.PngImageFile.load

    def spy(self):  # noqa: ANN001, ANN202
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", spy)
    records = [_record("ok", "images/good.png"), _record("bomb", "images/bomb.png"), _record("huge", "images/huge.png")]
    cfg, store = _llava(tmp_path, records)
    res = build_samples(cfg, store)
    assert res.table["sample_id"].to_list() == ["ok"]
    assert _reasons(res) == {"bomb": "image_too_large", "huge": "image_too_large"}
    assert set(decoded) == {(8, 8)}, "a bomb was decoded"

    cfg, store = _llava(tmp_path, [_record("ok", "images/good.png")], max_image_pixels=63)  # 8×8 = 64
    with pytest.raises(DatasetError, match="image_too_large=1"):
        build_samples(cfg, store)


# --- 8: http(s) images --------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict[str, str]]]
    good: bytes

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append((self.path, dict(self.headers)))
        if self.path == "/good.png":
            self._send(200, self.good)
        elif self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/good.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/error.png":
            self._send(500, b"boom")
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):  # a byte every 0.2 s: 20 s in all
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/endless.png":  # no Content-Length: only the byte count can stop it
            self.send_response(200)
            self.end_headers()
            self.server.sent = 0  # type: ignore[attr-defined]
            try:
                for _ in range(1024):
                    self.wfile.write(b"\0" * 65536)
                    self.server.sent += 65536  # type: ignore[attr-defined]
            except OSError:
                pass
        else:
            self._send(404, b"not found")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[tuple[str, http.server.ThreadingHTTPServer, list]]:
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Handler", (_Handler,), {"seen": seen, "good": _png(77)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd, seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_urls_are_skipped_unless_allowed(layout, tmp_path, server):
    base, _, seen = server
    records = [_record("ok", "images/good.png"), _record("url", f"{base}/good.png"),
               _record("https", f"https://127.0.0.1:{_closed_port()}/good.png")]
    cfg, store = _llava(tmp_path, records)
    res = build_samples(cfg, store)  # one URL used to fail the whole dataset (fsspec's HTTPFileSystem)
    assert res.table["sample_id"].to_list() == ["ok"]
    assert res.skips == {"url_not_allowed": 2}
    assert seen == [], "a URL was fetched although the config does not allow it"


def test_allowed_urls_are_fetched_with_httpx_and_failures_are_skips(layout, tmp_path, server, monkeypatch):
    base, httpd, seen = server
    port = httpd.server_address[1]
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))  # a client trusting the environment would send these
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{_closed_port()}")  # …and go through this dead proxy
    records = [
        _record("ok", "images/good.png"),
        _record("url", f"{base}/good.png"),
        _record("redirect", f"{base}/redirect.png"),
        _record("missing", f"{base}/missing.png"),
        _record("error", f"{base}/error.png"),
        _record("unreachable", f"http://127.0.0.1:{_closed_port()}/good.png"),
        _record("creds", f"http://user:pw@127.0.0.1:{port}/good.png"),
        _record("slow", f"{base}/slow.png"),
        _record("endless", f"{base}/endless.png"),
    ]
    cfg, store = _llava(tmp_path, records, allow_image_urls=True, image_url_timeout_s=2.0, max_image_bytes=100_000)
    start = time.monotonic()
    res = build_samples(cfg, store)
    elapsed = time.monotonic() - start
    assert res.table["sample_id"].to_list() == ["ok", "url", "redirect"]
    assert res.table["image"].to_list()[1:] == [f"{base}/good.png", f"{base}/redirect.png"]
    assert _reasons(res) == {
        "missing": "url_fetch_failed", "error": "url_fetch_failed", "unreachable": "url_fetch_failed",
        "creds": "url_not_allowed", "slow": "url_fetch_failed", "endless": "image_too_large",
    }
    assert "HTTP 404" in next(e["detail"] for e in res.examples if e["sample_id"] == "missing")
    assert elapsed < 15, f"the 2 s deadline did not end the slow download ({elapsed:.1f} s)"
    assert httpd.sent < 1024 * 65536  # type: ignore[attr-defined]  # stopped reading, not drained
    assert all("authorization" not in {k.lower() for k in h} for _, h in seen)
    assert "user:pw" not in json.dumps(res.examples)
    # later stages re-read the stored URL the same way (bounded, through httpx)
    assert tuple(np.asarray(load_image_rgb(f"{base}/good.png"))[0, 0]) == (77, 77, 77)


# --- EXIF orientation ----------------------------------------------------------------------------


def _two_colours() -> Image.Image:
    img = Image.new("RGB", (2, 1), RED)
    img.putpixel((1, 0), BLUE)
    return img


def _with_orientation(img: Image.Image, fmt: str, orientation: int, **save: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(1, [[RED, BLUE]]), (3, [[BLUE, RED]]), (6, [[RED], [BLUE]]), (8, [[BLUE], [RED]])],
)
def test_exif_orientation_is_applied_pixel_exactly(tmp_path, orientation, expected):
    path = tmp_path / "o.png"
    path.write_bytes(_with_orientation(_two_colours(), "PNG", orientation))
    out = np.asarray(load_image_rgb(str(path)))
    assert [[tuple(int(v) for v in px) for px in row] for row in out] == expected


def test_exif_orientation_6_rotates_a_jpeg(tmp_path):
    """Two 8×8 blocks, red left of blue; orientation 6 (rotate 90° clockwise): red above blue."""
    img = Image.new("RGB", (16, 8), RED)
    img.paste(BLUE, (8, 0, 16, 8))
    path = tmp_path / "o.jpg"
    path.write_bytes(_with_orientation(img, "JPEG", 6, quality=100, subsampling=0))
    out = np.asarray(load_image_rgb(str(path))).astype(int)
    assert out.shape == (16, 8, 3)
    assert np.abs(out[:8] - RED).max() <= 3 and np.abs(out[8:] - BLUE).max() <= 3


def test_shapes_world_pngs_are_unaffected(tmp_path):
    from msae.world.config import ShapesConfig
    from msae.world.shapes import generate_world

    generate_world(ShapesConfig(n_images=3, seed=1), tmp_path / "world")
    pngs = sorted((tmp_path / "world" / "images").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(png) as raw:
            assert not raw.getexif()
            expected = np.asarray(raw.convert("RGB"))
        assert np.array_equal(np.asarray(load_image_rgb(str(png))), expected)


# --- later re-reads (cards) ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_cards_read_images_bounded(layout):
    from msae.latents.cards import _load_image

    assert _load_image("/dev/zero") is None
    with fifo_probe(layout["inside"] / "card_fifo.png") as opened:
        assert _load_image(str(layout["inside"] / "card_fifo.png")) is None
    assert not opened
    (layout["inside"] / "bomb.png").write_bytes(_bomb_png(10_000))
    assert _load_image(str(layout["inside"] / "bomb.png")) is None
    rotated = layout["inside"] / "rot.png"
    rotated.write_bytes(_with_orientation(_two_colours(), "PNG", 6))
    card_image = _load_image(str(rotated))
    assert card_image is not None and card_image.size == (1, 2)  # as extraction saw it
