"""Rendering is checked pixel by pixel and character by character on tiny synthetic cases."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from msae.latents.render import (
    COLORMAP_ANCHORS,
    blur_inactive,
    colormap,
    display_tokens,
    heatmap_overlay,
    join_tokens,
    mark_active,
    mark_peak,
    mask_inactive,
    patch_boxes,
    patch_pixel_mask,
    peak_window,
)

RED, BLUE = (200, 30, 40), (20, 60, 210)


def two_colour(width: int, height: int, split_x: int) -> Image.Image:
    """Left of split_x red, the rest blue."""
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[:, :split_x] = RED
    arr[:, split_x:] = BLUE
    return Image.fromarray(arr, "RGB")


# 10×7 px on a 3×3 grid: x edges round(0, 3.33, 6.67, 10) = 0, 3, 7, 10; y edges round(0, 2.33, 4.67, 7) = 0, 2, 5, 7
X_EDGES, Y_EDGES = [0, 3, 7, 10], [0, 2, 5, 7]


def cell(edges: list[int], p: int) -> int:
    return next(i for i in range(len(edges) - 1) if edges[i] <= p < edges[i + 1])


def test_patch_boxes_non_square_round_edges():
    boxes = patch_boxes(3, 3, 10, 7)
    assert boxes.shape == (3, 3, 4)
    assert boxes[0, 0].tolist() == [0, 0, 3, 2]
    assert boxes[1, 2].tolist() == [7, 2, 10, 5]
    assert boxes[2, 1].tolist() == [3, 5, 7, 7]
    assert boxes[..., 0][0].tolist() == X_EDGES[:-1] and boxes[..., 3][:, 0].tolist() == Y_EDGES[1:]


def test_patch_boxes_ties_round_to_even_and_cover_image():
    # 5 px over 2 columns: round(2.5) = 2 (Python's round)
    assert patch_boxes(1, 2, 5, 5)[0, :, 2].tolist() == [2, 5]
    boxes = patch_boxes(24, 24, 640, 480)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).sum()
    assert area == 640 * 480


def test_patch_pixel_mask_non_square():
    active = np.zeros((3, 3), dtype=bool)
    active[1, 1] = True
    mask = patch_pixel_mask(active, 10, 7)
    assert mask.shape == (7, 10)
    assert mask.sum() == 3 * 4  # rows 2..4, cols 3..6
    assert mask[2:5, 3:7].all()
    assert not mask[1, 3] and not mask[5, 3] and not mask[2, 2] and not mask[2, 7]


def test_mask_inactive_non_square_pixel_exact():
    image = two_colour(10, 7, split_x=5)
    acts = np.array([[0.0, 0.0, 1.5], [0.0, 0.2, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = np.array(mask_inactive(image, acts))
    src = np.array(image)
    for y in range(7):
        for x in range(10):
            active = acts[cell(Y_EDGES, y), cell(X_EDGES, x)] > 0
            assert out[y, x].tolist() == (src[y, x].tolist() if active else [0, 0, 0]), (y, x)


def test_mask_inactive_threshold_and_rgb_conversion():
    image = two_colour(10, 7, split_x=5).convert("RGBA")
    acts = np.array([[0.5, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 0.5]])
    out = mask_inactive(image, acts, threshold=0.5)
    assert out.mode == "RGB"
    arr = np.array(out)
    assert (arr[2:5, 3:7] == np.array(image.convert("RGB"))[2:5, 3:7]).all()
    assert arr.reshape(-1, 3).any(axis=1).sum() == 12  # only the centre patch survives (> threshold)


def test_mask_inactive_64px_on_8x8_grid():
    rng = np.random.default_rng(0)
    image = two_colour(64, 64, split_x=27)
    acts = rng.random((8, 8)) * (rng.random((8, 8)) > 0.6)
    out = np.array(mask_inactive(image, acts))
    src = np.array(image)
    expected = np.where((acts > 0)[np.arange(64)[:, None] // 8, np.arange(64)[None, :] // 8][..., None], src, 0)
    assert (out == expected).all()


def test_blur_inactive_pixel_exact():
    image = two_colour(64, 64, split_x=27)
    acts = np.zeros((8, 8))
    acts[2:5, 3] = 1.0
    out = np.array(blur_inactive(image, acts, radius=5.0))
    src = np.array(image)
    blurred = np.array(image.filter(ImageFilter.GaussianBlur(5.0)))
    active = np.zeros((64, 64), dtype=bool)
    active[16:40, 24:32] = True
    assert (out[active] == src[active]).all()
    assert (out[~active] == blurred[~active]).all()
    assert (out[~active] != src[~active]).any()  # the blur did something near the colour edge


def test_blur_inactive_non_square():
    image = two_colour(10, 7, split_x=5)
    acts = np.zeros((3, 3))
    acts[0, 1] = 2.0
    out = np.array(blur_inactive(image, acts, radius=2.0))
    blurred = np.array(image.filter(ImageFilter.GaussianBlur(2.0)))
    assert (out[0:2, 3:7] == np.array(image)[0:2, 3:7]).all()
    assert (out[2:, :] == blurred[2:, :]).all() and (out[:2, :3] == blurred[:2, :3]).all()


def test_colormap_anchors_and_interpolation():
    assert colormap(np.array(0.0)).tolist() == COLORMAP_ANCHORS[0].tolist()
    assert colormap(np.array(1.0)).tolist() == COLORMAP_ANCHORS[-1].tolist()
    assert colormap(np.array(0.5)).tolist() == COLORMAP_ANCHORS[2].tolist()
    assert np.allclose(colormap(np.array(0.125)), (COLORMAP_ANCHORS[0] + COLORMAP_ANCHORS[1]) / 2)
    assert colormap(np.array([[2.0, -1.0]])).shape == (1, 2, 3)


def test_heatmap_overlay_pixel_exact():
    a, b = (200, 100, 50), (10, 20, 30)
    arr = np.empty((64, 64, 3), dtype=np.uint8)
    arr[:, :8] = a
    arr[:, 8:] = b
    image = Image.fromarray(arr, "RGB")
    acts = np.zeros((8, 8))
    acts[0, 0] = 2.0  # max → (253, 231, 37)
    acts[0, 1] = 1.0  # half → (33, 145, 140)
    acts[1, 1] = 0.5  # quarter → (59, 82, 139)
    out = np.array(heatmap_overlay(image, acts, alpha=0.4))
    # 0.6 * image + 0.4 * colour, rounded
    assert (out[0:8, 0:8] == [221, 152, 45]).all()
    assert (out[0:8, 8:16] == [19, 70, 74]).all()
    assert (out[8:16, 8:16] == [30, 45, 74]).all()
    assert (out[8:16, 0:8] == [120, 60, 30]).all()  # zero patch, colour a, dimmed
    assert (out[16:, 16:] == [6, 12, 18]).all()  # zero patches, colour b, dimmed


def test_heatmap_overlay_all_zero_is_dimmed_image():
    image = two_colour(10, 7, split_x=5)
    out = np.array(heatmap_overlay(image, np.zeros((3, 3)), alpha=0.5))
    assert (out[:, :5] == [100, 15, 20]).all() and (out[:, 5:] == [10, 30, 105]).all()


# --- text ------------------------------------------------------------------------------------

BYTE = ["The", "Ġred", "Ġball", "Ċ", "Ġis", "Ġround"]
SP = ["▁The", "▁red", "▁ball", "<0x0A>", "▁is"]
WORDS = ["how", "many", "objects", "are", "there", "?"]


def test_display_tokens_byte_level():
    assert display_tokens(BYTE) == ["The", " red", " ball", "\n", " is", " round"]
    assert join_tokens(display_tokens(BYTE)) == "The red ball\n is round"
    assert display_tokens(["Ġcaf", "Ã©"]) == [" caf", "é"]  # bytes of é in the byte-level alphabet


def test_display_tokens_sentencepiece():
    assert display_tokens(SP) == [" The", " red", " ball", "\n", " is"]


def test_display_tokens_words():
    assert display_tokens(WORDS) == ["how", " many", " objects", " are", " there", " ?"]
    assert join_tokens(display_tokens(WORDS)) == "how many objects are there ?"
    assert display_tokens([]) == []


def test_mark_peak_styles():
    assert mark_peak(WORDS, [0, 1, 3, 0, 0, 0]) == "how many (objects) are there ?"
    assert mark_peak(BYTE, [0, 2, 1, 0, 0, 0]) == "The (red) ball\n is round"
    assert mark_peak(SP, [0, 0, 0, 0, 5]) == "The red ball\n (is)"
    assert mark_peak(WORDS, [4, 1, 4, 0, 0, 0]) == "(how) many objects are there ?"  # ties → first
    assert mark_peak(WORDS, [0, 0, 0, 0, 0, 1], style="brackets") == "how many objects are there [?]"
    assert mark_peak([], []) == ""


def test_mark_peak_window():
    assert mark_peak(WORDS, [0, 0, 0, 1, 0, 0], window=1) == "… objects (are) there …"
    assert mark_peak(WORDS, [1, 0, 0, 0, 0, 0], window=2) == "(how) many objects …"


def test_mark_active_spans():
    assert mark_active(WORDS, [0, 1, 2, 0, 3, 0]) == "how <<many objects>> are <<there>> ?"
    assert mark_active(WORDS, [1, 1, 1, 1, 1, 1]) == "<<how many objects are there ?>>"
    assert mark_active(WORDS, [1, 0, 0, 0, 0, 1]) == "<<how>> many objects are there <<?>>"
    assert mark_active(BYTE, [0, 1, 1, 0, 0, 0]) == "The <<red ball>>\n is round"
    assert mark_active(WORDS, [0.5, 0, 0, 0, 0, 0.6], threshold=0.5) == "how many objects are there <<?>>"
    with pytest.raises(ValueError):
        mark_active(WORDS, [1, 2])


def test_peak_window_clips_at_ends():
    assert peak_window(WORDS, [0, 0, 0, 9, 0, 0], size=1) == "objects are there"
    assert peak_window(WORDS, [9, 0, 0, 0, 0, 0], size=2) == "how many objects"
    assert peak_window(WORDS, [0, 0, 0, 0, 0, 9], size=2) == "are there ?"
    assert peak_window(WORDS, [0, 0, 9, 0, 0, 0]) == "how many objects are there ?"
    assert peak_window(BYTE, [0, 0, 0, 0, 0, 1], size=1) == "is round"
    assert peak_window([], []) == ""


def test_peak_window_before_only_ends_at_the_peak():
    """What a causal model saw when it activated there: the context before the peak, and the peak."""
    assert peak_window(WORDS, [0, 0, 0, 9, 0, 0], size=1, before_only=True) == "objects are"
    assert peak_window(WORDS, [0, 0, 0, 9, 0, 0], size=5, before_only=True) == "how many objects are"
    assert peak_window(WORDS, [9, 0, 0, 0, 0, 0], size=2, before_only=True) == "how"
