"""Tests for k25jax.data.media (digest §1.2 placeholders, §1.3 media preprocessing)."""

import numpy as np
import pytest
from PIL import Image

from k25jax.data import media

PAD = 163605  # media_placeholder_token_id (digest §1.2)


def _pixels(item: media.MediaItem) -> np.ndarray:
  """Invert the normalisation: uint8-valued float array of the patches."""
  return np.round((item.patches + 1.0) * 127.5)


def _coord_image(height: int, width: int, frame: int = 0) -> np.ndarray:
  """R = row, G = column, B = 7*row + 3*column + 40*frame (mod 256): every pixel names its position."""
  y, x = np.mgrid[:height, :width]
  return np.stack([y, x, (7 * y + 3 * x + 40 * frame) % 256], -1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- resize rule

@pytest.mark.parametrize("size, kwargs, expected", [
    ((100, 60), {}, (100, 60)),                            # small: untouched
    ((5, 3), {}, (5, 3)),                                  # smaller than a patch: max(1, W//14) keeps scale 1
    ((3584, 3584), {}, (1792, 1792)),                      # 256*256 patches > 16384: scale sqrt(1/4) = 0.5
    ((1000, 1000), {"in_patch_limit": 1000}, (445, 445)),  # 71*71 patches: 1000*sqrt(1000/5041) = 445.399 -> 445
    ((14336, 100), {}, (7168, 50)),                        # wide: 512*14/14336 = 0.5 caps (7168 patches < 16384)
    ((100, 14336), {}, (50, 7168)),                        # tall, the same by symmetry
    ((20000, 100), {}, (7168, 35)),                        # 7168/20000 = 0.3584 -> H' = int(35.84) = 35
    ((3000, 3000), {"patch_limit_on_one_side": 64}, (896, 896)),  # custom per-side cap 64*14
])
def test_navit_resize_size_hand_computed(size, kwargs, expected):
  assert media.navit_resize_size(*size, **kwargs) == expected


def test_resized_size_respects_limits_over_many_shapes():
  rng = np.random.default_rng(0)
  for w, h in rng.integers(1, 30000, size=(300, 2)):
    nw, nh = media.navit_resize_size(int(w), int(h))
    assert 1 <= nw <= min(w, 7168) and 1 <= nh <= min(h, 7168)
    # The budget is on floor-patch counts of the source (W//14), so the resized area in patches may exceed
    # 16384 by at most the floor slack of the source, never more (reference behaviour, digest §1.3).
    slack = (w / 14 / max(1, w // 14)) * (h / 14 / max(1, h // 14))
    assert (nw / 14) * (nh / 14) <= 16384 * slack * (1 + 1e-9)
    if nw < w and nh < h:  # a constraint is active: within one pixel of the tightest cap
      assert (nw + 1) / w >= min(np.sqrt(16384 / (max(1, w // 14) * max(1, h // 14))), 7168 / w, 7168 / h)
    pw, ph = media.padded_size(nw, nh)
    assert pw % 28 == 0 and ph % 28 == 0 and 0 <= pw - nw < 28 and 0 <= ph - nh < 28 and max(pw, ph) <= 7168


@pytest.mark.parametrize("width, height, tokens", [(100, 60, 4 * 3), (5, 3, 1), (3584, 3584, 64 * 64),
                                                   (14336, 100, 256 * 2), (28, 28, 1), (29, 28, 2)])
def test_image_token_count(width, height, tokens):
  assert media.image_token_count(width, height) == tokens


# ----------------------------------------------------------------------------------------------- images

def test_small_image_untouched_and_padded_to_28():
  img = _coord_image(60, 100)
  item = media.preprocess_image(img)
  assert item.kind == "image" and item.timestamp is None
  assert item.grid == (1, 84 // 14, 112 // 14)  # 60 -> 84, 100 -> 112
  assert item.num_tokens == (84 // 28) * (112 // 28) == 12
  assert item.num_patches == 48 and item.patches.shape == (48, 588) and item.patches.dtype == np.float32


def test_patch_order_and_content_map_back_to_pixels():
  """Row r*w + c, column ch*196 + i*14 + j holds pixel (y=14r+i, x=14c+j, ch): an independent loop."""
  img = _coord_image(56, 84)  # a multiple of 28: no resize, no padding
  item = media.preprocess_image(img)
  t, h, w = item.grid
  assert (t, h, w) == (1, 4, 6)
  px = _pixels(item)
  for r in range(h):
    for c in range(w):
      for ch in range(3):
        for i in range(14):
          for j in range(14):
            assert px[r * w + c, ch * 196 + i * 14 + j] == img[14 * r + i, 14 * c + j, ch]
  # Same layout as transformers' pixel_values (N, 3, 14, 14): channel-first blocks.
  block = item.patches.reshape(-1, 3, 14, 14)[w + 2]  # patch row 1, column 2
  np.testing.assert_array_equal(np.round((block + 1) * 127.5), img[14:28, 28:42].transpose(2, 0, 1))


def test_padding_is_black_right_and_bottom():
  img = np.full((20, 30, 3), 200, np.uint8)
  item = media.preprocess_image(img)
  assert item.grid == (1, 2, 4)  # 28 x 56
  canvas = np.round((item.patches.reshape(2, 4, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(28, 56, 3) + 1)
                    * 127.5)
  assert (canvas[:20, :30] == 200).all()
  assert (canvas[20:] == 0).all() and (canvas[:, 30:] == 0).all()
  assert item.patches.min() == -1.0  # padded pixels normalise to -1


def test_normalisation_values():
  img = np.array([[[0, 255, 51]]], np.uint8)
  item = media.preprocess_image(img)
  first = item.patches[0].reshape(3, 14, 14)[:, 0, 0]
  np.testing.assert_allclose(first, [-1.0, 1.0, -0.6], atol=1e-6)  # (x/255 - 0.5)/0.5
  rand = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
  p = media.preprocess_image(rand).patches
  assert p.min() >= -1.0 and p.max() <= 1.0
  np.testing.assert_allclose(p, np.round((p + 1) * 127.5) / 127.5 - 1, atol=1e-6)


def test_resize_capped_by_total_limit_keeps_constant_colour():
  """150x150 with limit 16: 10*10 patches -> scale 0.4 -> 60x60 -> padded 84x84."""
  img = np.full((150, 150, 3), (10, 120, 250), np.uint8)
  item = media.preprocess_image(img, in_patch_limit=16)
  assert item.grid == (1, 6, 6) and item.num_tokens == 9
  canvas = np.round((item.patches.reshape(6, 6, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(84, 84, 3) + 1)
                    * 127.5)
  assert (canvas[:60, :60] == (10, 120, 250)).all()  # bicubic keeps a constant image constant
  assert (canvas[60:] == 0).all() and (canvas[:, 60:] == 0).all()


def test_wide_image_capped_by_side_limit():
  item = media.preprocess_image(np.full((100, 14336, 3), 7, np.uint8))
  assert item.grid == (1, 4, 512)  # 7168 x 50 -> 7168 x 56
  assert item.num_tokens == 2 * 256


def test_input_forms_agree():
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  ref = media.preprocess_image(rgb).patches
  np.testing.assert_array_equal(media.preprocess_image(Image.fromarray(rgb)).patches, ref)
  np.testing.assert_array_equal(media.preprocess_image(rgb.astype(np.float64) / 255.0).patches, ref)
  np.testing.assert_array_equal(media.preprocess_image(Image.fromarray(rgb).convert("P")).patches,
                                media.preprocess_image(Image.fromarray(rgb).convert("P").convert("RGB")).patches)
  gray = rgb[..., 0]
  expected_gray = media.preprocess_image(np.repeat(gray[..., None], 3, -1)).patches
  for form in (gray, gray[..., None], Image.fromarray(gray)):
    np.testing.assert_array_equal(media.preprocess_image(form).patches, expected_gray)


def test_alpha_composited_on_white():
  rgba = np.zeros((28, 28, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:14, :, 3] = 255  # top half opaque red-ish, bottom half transparent
  for form in (rgba, Image.fromarray(rgba, mode="RGBA")):
    px = _pixels(media.preprocess_image(form)).reshape(2, 2, 3, 14, 14)
    assert (px[0, :, 0] == 200).all() and (px[0, :, 1:] == 0).all()
    assert (px[1] == 255).all()


# ----------------------------------------------------------------------------------------------- video

def test_sample_video_frames_rule():
  frames = list(range(50))  # any indexable sequence of frames
  got, times = media.sample_video_frames(frames, 10.0)
  assert got == list(range(0, 50, 5)) and times == pytest.approx([i / 2 for i in range(10)])
  assert media.sample_video_frames(frames, 10.0, max_num_frames=4)[0] == [0, 12, 25, 37]
  assert media.sample_video_frames([0, 1, 2], 1.0)[0] == [0, 1, 2]  # native fps below sample_fps: keep all
  got, times = media.sample_video_frames(list(range(5)), 4.0)  # 5*2/4 = 2.5 -> 3 (half up)
  assert got == [0, 1, 3] and times == [0.0, 0.25, 0.75]
  assert media.sample_video_frames([0, 1], 30.0)[0] == [0]  # at least one frame


def test_video_chunks_of_four_with_timestamps_and_content():
  frames = np.stack([_coord_image(28, 56, frame=f) for f in range(50)])  # 50 frames, 10 fps -> 10 sampled
  items = media.preprocess_video(frames, 10.0)
  assert [it.grid for it in items] == [(4, 2, 4), (4, 2, 4), (2, 2, 4)]
  assert [it.timestamp for it in items] == ["00:00:00.000", "00:00:02.000", "00:00:04.000"]
  assert all(it.kind == "video" and it.num_tokens == 2 for it in items)
  sampled = list(range(0, 50, 5))
  for k, item in enumerate(items):
    px = _pixels(item).reshape(item.grid[0], 2, 4, 3, 14, 14)
    for f in range(item.grid[0]):
      src = frames[sampled[4 * k + f]]
      np.testing.assert_array_equal(px[f, 1, 3], src[14:28, 42:56].transpose(2, 0, 1))


def test_video_frames_share_one_size_under_per_frame_limit():
  frames = [np.full((150, 150, 3), 90, np.uint8) for _ in range(3)]
  items = media.preprocess_video(frames, 2.0, in_patch_limit_each_frame=16)
  assert [it.grid for it in items] == [(3, 6, 6)]
  assert media.preprocess_video(frames, 2.0)[0].grid == (3, 12, 12)  # 4096 default: 150 -> 168 padded


# ----------------------------------------------------------------------------------------------- placeholders

def test_placeholders_and_timestamps():
  assert media.image_placeholder() == "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
  assert media.video_chunk_placeholder("00:01:02.500") == (
      "00:01:02.500<|media_begin|>video<|media_content|><|media_pad|><|media_end|>")
  assert media.format_timestamp(0) == "00:00:00.000"
  assert media.format_timestamp(3725.5) == "01:02:05.500"
  assert media.format_timestamp(0.29) == "00:00:00.290"  # rounded, not truncated to .289
  assert media.format_timestamp(59.9996) == "00:01:00.000"  # carries into the minutes
  item = media.MediaItem(np.zeros((4, 588), np.float32), (np.int64(1), 2, 2), "video", "00:00:04.000")
  assert type(item.grid[0]) is int and type(item.num_tokens) is int
  assert media.media_placeholder(item) == media.video_chunk_placeholder("00:00:04.000")


def _item(grid, kind="image", timestamp=None):
  return media.MediaItem(np.zeros((grid[0] * grid[1] * grid[2], 588), np.float32), grid, kind, timestamp)


def test_expand_and_check_media_pads_mixed():
  image = _item((1, 4, 6))                        # 6 tokens
  chunk_a = _item((4, 2, 2), "video", "00:00:00.000")  # 1 token: t does not count
  chunk_b = _item((2, 4, 4), "video", "00:00:02.000")  # 4 tokens
  items = [image, chunk_a, chunk_b]
  assert [it.num_tokens for it in items] == [6, 1, 4]
  ids = np.array([1, PAD, 2, 3, PAD, 9, PAD, 4], np.int32)
  out = media.expand_media_pads(ids, items, PAD)
  expected = [1] + [PAD] * 6 + [2, 3] + [PAD] + [9] + [PAD] * 4 + [4]
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.int32
  media.check_media_pads(out, items, PAD)
  np.testing.assert_array_equal(media.expand_media_pads(np.array([5, 6]), [], PAD), [5, 6])


def test_expand_media_pads_count_mismatch():
  items = [_item((1, 2, 2)), _item((1, 2, 2))]
  with pytest.raises(ValueError, match="1 media_pad ids .* but 2 media items"):
    media.expand_media_pads(np.array([1, PAD, 2]), items, PAD)
  with pytest.raises(ValueError, match="3 media_pad ids .* but 2 media items"):
    media.expand_media_pads(np.array([PAD, 1, PAD, 2, PAD]), items, PAD)
  with pytest.raises(ValueError, match="1-D integer"):
    media.expand_media_pads(np.array([[1, PAD]]), items[:1], PAD)


def test_check_media_pads_detects_errors():
  items = [_item((1, 4, 4)), _item((1, 2, 4))]  # 4 and 2 tokens
  good = np.array([1] + [PAD] * 4 + [2] + [PAD] * 2 + [3])
  media.check_media_pads(good, items, PAD)
  with pytest.raises(ValueError, match="media item 1 .* needs 2 media_pad ids but the run at position 6 has 1"):
    media.check_media_pads(np.delete(good, 7), items, PAD)
  with pytest.raises(ValueError, match="1 runs of media_pad ids .* but 2 media items"):
    media.check_media_pads(np.delete(good, 5), items, PAD)  # two blocks merged
  with pytest.raises(ValueError, match="2 runs .* but 1 media items"):
    media.check_media_pads(good, items[:1], PAD)


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5, 3), np.uint8), "zero-size"),
    (np.zeros((0, 0), np.uint8), "zero-size"),
    (Image.new("RGB", (0, 4)), "zero-size"),
    (np.zeros((5,), np.uint8), "rank 1"),
    (np.zeros((2, 5, 5, 3), np.uint8), "rank 4"),
    (np.zeros((5, 5, 2), np.uint8), "2 channels"),
    (np.zeros((3, 5, 5), np.uint8), "5 channels"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN or inf"),
    (np.full((4, 4, 3), np.inf, np.float32), "NaN or inf"),
    (np.full((4, 4, 3), 1.5, np.float32), r"span \[1.5, 1.5\]"),
    (np.full((4, 4, 3), -0.1, np.float32), "expected \\[0, 1\\]"),
    (np.zeros((4, 4, 3), np.int64), "dtype int64"),
    (np.zeros((4, 4, 3), bool), "dtype bool"),
    (np.zeros((1, 2**15 + 1), np.uint8), "exceeds 32768"),
    (Image.new("F", (4, 4)), "mode 'F'"),
    (Image.new("I;16", (4, 4)), "mode 'I;16'"),
])
def test_image_errors_name_the_item(bad, match):
  with pytest.raises(ValueError, match=match) as err:
    media.preprocess_image(bad, name="img#7")
  assert "img#7" in str(err.value)


def test_unsupported_type():
  with pytest.raises(TypeError, match="img#3: unsupported type list"):
    media.preprocess_image([[0, 1], [2, 3]], name="img#3")


@pytest.mark.parametrize("frames, fps, kwargs, match", [
    ([], 10.0, {}, "empty video"),
    (np.zeros((0, 4, 4, 3), np.uint8), 10.0, {}, "empty video"),
    ([np.zeros((4, 4, 3), np.uint8)], 0.0, {}, "fps=0.0 must be"),
    ([np.zeros((4, 4, 3), np.uint8)], -5, {}, "fps=-5 must be"),
    ([np.zeros((4, 4, 3), np.uint8)], float("nan"), {}, "fps=nan"),
    ([np.zeros((4, 4, 3), np.uint8)], 10.0, {"sample_fps": 0}, "sample_fps=0"),
    ([np.zeros((4, 4, 3), np.uint8)], 10.0, {"max_num_frames": 0}, "max_num_frames"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], 1.0, {}, "vid#2 frame 1: size 6x4 differs"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32) + 2], 1.0, {}, "vid#2 frame 1: float pixels"),
])
def test_video_errors_name_the_item(frames, fps, kwargs, match):
  with pytest.raises(ValueError, match=match) as err:
    media.preprocess_video(frames, fps, name="vid#2", **kwargs)
  assert "vid#2" in str(err.value)


def test_video_unsupported_type():
  with pytest.raises(TypeError, match="vid: frames of type str"):
    media.preprocess_video("clip.mp4", 10.0, name="vid")


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0, "height": 5}, "width must be a positive int"),
    ({"width": 5, "height": 2.5}, "height must be a positive int"),
    ({"width": 5, "height": 5, "in_patch_limit": 0}, "in_patch_limit"),
    ({"width": 5, "height": 5, "patch_limit_on_one_side": -1}, "patch_limit_on_one_side"),
])
def test_navit_resize_size_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    media.navit_resize_size(**kwargs)


def test_placeholder_and_timestamp_errors():
  with pytest.raises(ValueError, match="'1:02.5' is not 'HH:MM:SS.mmm'"):
    media.video_chunk_placeholder("1:02.5")
  for bad in (-1.0, float("inf"), "3"):
    with pytest.raises(ValueError, match="format_timestamp"):
      media.format_timestamp(bad)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 588), np.float32), (1, 2, 2), "audio"), "kind 'audio'"),
    ((np.zeros((4, 588), np.float32), (1, 2), "image"), "3 positive ints"),
    ((np.zeros((6, 588), np.float32), (1, 2, 3), "image"), "divisible by 2"),
    ((np.zeros((8, 588), np.float32), (2, 2, 2), "image"), "t=2 invalid for a image"),
    ((np.zeros((20, 588), np.float32), (5, 2, 2), "video"), "t=5 invalid"),
    ((np.zeros((4, 588), np.float64), (1, 2, 2), "image"), "float32"),
    ((np.zeros((5, 588), np.float32), (1, 2, 2), "image"), "does not match grid"),
    ((np.zeros((4, 588), np.float32), (1, 2, 2), "image", "00:00:00.000"), "images take None"),
    ((np.zeros((4, 588), np.float32), (1, 2, 2), "video", "0:0"), "'0:0' invalid"),
    ((np.zeros((4, 588), np.float32), (1, 2, 2), "video", 4.0), "4.0 invalid"),
])
def test_media_item_validation(args, match):
  with pytest.raises(ValueError, match=match):
    media.MediaItem(*args)
