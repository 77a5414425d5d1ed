"""Image opening: every PIL mode becomes the expected RGB pixels; every failure gets its reason."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageFile

from fixtures_data import encode, noise_rgb, truncated
from msae.data.images import BadImage, load_image_rgb, safe_filename, to_rgb

WHITE = (255, 255, 255)


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, 1 blue
    img.putpixel((1, 0), 1)
    if transparent:
        img.info["transparency"] = 0
    return img


def _two_pixels(mode: str, a: object, b: object) -> Image.Image:
    img = Image.new(mode, (2, 1), a)
    img.putpixel((1, 0), b)
    return img


# (image, file format it round-trips through, expected RGB of its two pixels)
CASES = {
    "L": (_two_pixels("L", 0, 100), "PNG", [(0, 0, 0), (100, 100, 100)]),
    "1": (_two_pixels("1", 0, 1), "PNG", [(0, 0, 0), WHITE]),
    "LA": (_two_pixels("LA", (50, 0), (50, 255)), "PNG", [WHITE, (50, 50, 50)]),
    "RGBA": (_two_pixels("RGBA", (10, 20, 30, 0), (10, 20, 30, 255)), "PNG", [WHITE, (10, 20, 30)]),
    "P": (_palette(transparent=False), "PNG", [(255, 0, 0), (0, 0, 255)]),
    "P+transparency": (_palette(transparent=True), "PNG", [WHITE, (0, 0, 255)]),
    "CMYK": (_two_pixels("CMYK", (0, 255, 0, 0), (0, 0, 0, 255)), "TIFF", [(255, 0, 255), (0, 0, 0)]),
    "I;16": (_two_pixels("I;16", 65535, 2570), "PNG", [WHITE, (10, 10, 10)]),
    "F": (_two_pixels("F", 0.0, 0.5), "TIFF", [(0, 0, 0), (128, 128, 128)]),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_modes_convert_to_expected_rgb_through_a_file(tmp_path, mode):
    img, fmt, expected = CASES[mode]
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(encode(img, fmt))
    out = load_image_rgb(str(path))
    assert out.mode == "RGB" and out.size == (2, 1)
    assert [tuple(p) for p in np.asarray(out)[0]] == expected


def test_partial_alpha_is_composited_onto_white():
    out = to_rgb(Image.new("LA", (1, 1), (0, 128)))
    assert tuple(np.asarray(out)[0, 0]) == (127, 127, 127)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (_two_pixels("I", 100, 200), [(100, 100, 100), (200, 200, 200)]),  # already 8-bit range
        (_two_pixels("I", 0, 65535), [(0, 0, 0), WHITE]),  # 16-bit range (16-bit PNG as "I")
        (_two_pixels("F", 0.0, 300.0), [(0, 0, 0), WHITE]),  # beyond [0, 1]: clipped
        (Image.new("YCbCr", (2, 1), (128, 128, 128)), [(128, 128, 128)] * 2),
        (_two_pixels("RGB", (1, 2, 3), (9, 9, 9)), [WHITE, (9, 9, 9)]),  # tRNS colour key
    ],
    ids=["I-8bit", "I-16bit", "F-clipped", "YCbCr", "RGB+transparency"],
)
def test_in_memory_modes(img, expected):
    if img.mode == "RGB":
        img.info["transparency"] = (1, 2, 3)
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert [tuple(p) for p in np.asarray(out)[0]] == expected


def test_rgb_is_returned_as_is():
    img = noise_rgb(4)
    assert to_rgb(img) is img


def _reason(ref: str) -> str:
    with pytest.raises(BadImage) as err:
        load_image_rgb(ref)
    assert err.value.reason in str(err.value) and err.value.detail
    return err.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(tmp_path, fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(truncated(fmt))
    assert _reason(str(path)) == "truncated_image"


def test_failure_reasons(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert _reason(str(tmp_path / "nope.png")) == "missing_image"
    assert _reason(str(tmp_path / "dir.png")) == "not_regular_file"  # only regular files are opened
    assert _reason(str(tmp_path / "garbage.png")) == "unreadable_image"
    assert _reason(str(tmp_path / "empty.png")) == "empty_image"


def test_fsspec_urls_open():
    root = f"memory://test-images-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    with fsspec.open(f"{root}/a.png", "wb") as f:
        f.write(encode(Image.new("L", (3, 2), 7)))
    try:
        out = load_image_rgb(f"{root}/a.png")
        assert out.size == (3, 2) and tuple(np.asarray(out)[1, 2]) == (7, 7, 7)
        assert _reason(f"{root}/missing.png") == "missing_image"
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_safe_filename():
    assert safe_filename("000123_a-b.c") == "000123_a-b.c"
    unsafe = ["a/b", "a_b ", "a:b", "..", "", "é"]
    names = [safe_filename(s) for s in unsafe]
    assert all(n and not n.startswith(".") and "/" not in n for n in names)
    assert len(set(names + ["a_b"])) == len(unsafe) + 1  # never collides with each other or a safe id
    assert len(safe_filename("x" * 500)) <= 100 + 9
