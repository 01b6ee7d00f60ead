"""Media preprocessing and visual-token accounting (digest §1.2 placeholders, §1.3 "Media preprocessing").

Pure NumPy/PIL: it runs inside grain data workers.

Pipeline for one image (digest §1.3, `media_proc_cfg` defaults):
  RGB uint8 -> "navit" resize (bicubic, never upscaling) -> pad right/bottom with black to a multiple of
  PATCH_SIZE * MERGE_KERNEL = 28 -> normalise (x/255 - 0.5)/0.5 -> cut 14x14 patches in raster order.
A video is sampled at `sample_fps`, every frame is resized to one common size under the per-frame patch limit,
and consecutive sampled frames are grouped in chunks of up to TEMPORAL_CHUNK = 4 (MoonViT-3D); each chunk is one
`MediaItem` with its own timestamp-prefixed placeholder.

Placeholders (digest §1.2): the chat template emits ONE `<|media_pad|>` per item; `expand_media_pads` turns it
into `item.num_tokens` = (h/2)(w/2) copies, one per visual token after the 2x2 merge and temporal mean-pool.

Choices where the digest is silent (each tested in tests/test_media.py):
- Padding is pixel value 0 (black) applied before normalisation, so padded pixels are -1.0 in `patches`
  (the order of transformers' Kimi_K25 processors: resize, pad, then rescale+normalise).
- Transparency (PIL alpha / `transparency` info, or a 4th array channel) is composited onto white, as in
  transformers' `convert_to_rgb`.
- Float inputs in [0, 1] are quantised to uint8 (round(x * 255)) before resizing, like a decoded 8-bit file.
- Frame sampling: n = max(1, round_half_up(N * min(sample_fps, fps) / fps)) frames, capped at `max_num_frames`,
  at source indices floor(i * N / n) for i < n (uniform, first frame always kept); timestamp = index / fps.
- Timestamps are rounded to the nearest millisecond (transformers truncates `seconds % 1 * 1000`, which turns
  e.g. 0.29 s into ".289").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_KERNEL = 2
TEMPORAL_CHUNK = 4
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE
MAX_SIDE_PIXELS = 2**15  # larger inputs are rejected as corrupt rather than resized

MEDIA_BEGIN = "<|media_begin|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_PAD = "<|media_pad|>"
MEDIA_END = "<|media_end|>"

_KINDS = ("image", "video")
_TIMESTAMP_RE = re.compile(r"^\d{2,}:\d{2}:\d{2}\.\d{3}$")
_UNSUPPORTED_PIL_MODES = ("F", "I")  # 32-bit float / integer modes (and I;16*): no defined 8-bit RGB meaning

ImageLike = Union[np.ndarray, Image.Image]


@dataclasses.dataclass(frozen=True, eq=False)
class MediaItem:
  """One preprocessed image or video chunk, ready for MoonViT-3D (digest §1.3).

  patches: float32 [t*h*w, 3*14*14]; each row one patch flattened channel-first (C, 14, 14); rows in raster
    order (frame, then patch row, then patch column), i.e. transformers' Kimi_K25 `pixel_values`
    (N, 3, 14, 14) reshaped to (N, 588).
  grid: (t, h, w) in patches; h and w even (2x2 merge); 1 <= t <= TEMPORAL_CHUNK; t == 1 for images.
  kind: "image" or "video".
  timestamp: "HH:MM:SS.mmm" of the chunk's first frame (video chunks); None for images.
  Equality is identity (eq=False): the fields hold arrays.
  """
  patches: np.ndarray
  grid: tuple[int, int, int]
  kind: str
  timestamp: str | None = None

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"MediaItem: kind {self.kind!r} is not one of {_KINDS}")
    if (not isinstance(self.grid, tuple) or len(self.grid) != 3
        or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in self.grid)):
      raise ValueError(f"MediaItem: grid {self.grid!r} must be a tuple of 3 positive ints (t, h, w)")
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))  # NumPy ints -> int (frozen dataclass)
    t, h, w = self.grid
    if h % MERGE_KERNEL or w % MERGE_KERNEL:
      raise ValueError(f"MediaItem: grid {self.grid} needs h and w divisible by {MERGE_KERNEL} (the 2x2 merge); "
                       "pad the pixels to a multiple of 28 first")
    if not 1 <= t <= TEMPORAL_CHUNK or (self.kind == "image" and t != 1):
      raise ValueError(f"MediaItem: grid t={t} invalid for a {self.kind}; images have t=1, video chunks "
                       f"1 <= t <= {TEMPORAL_CHUNK}")
    if not isinstance(self.patches, np.ndarray) or self.patches.dtype != np.float32:
      raise ValueError(f"MediaItem: patches must be a float32 np.ndarray, got "
                       f"{getattr(self.patches, 'dtype', type(self.patches).__name__)}; use .astype(np.float32)")
    if self.patches.shape != (t * h * w, PATCH_DIM):
      raise ValueError(f"MediaItem: patches shape {self.patches.shape} does not match grid {self.grid}; "
                       f"expected {(t * h * w, PATCH_DIM)}")
    if self.timestamp is not None and (self.kind == "image" or not isinstance(self.timestamp, str)
                                       or not _TIMESTAMP_RE.match(self.timestamp)):
      raise ValueError(f"MediaItem: timestamp {self.timestamp!r} invalid for a {self.kind}; images take None, "
                       "video chunks 'HH:MM:SS.mmm' (use format_timestamp)")

  @property
  def num_tokens(self) -> int:
    """Visual tokens after the 2x2 merge and temporal mean-pool: (h/2)(w/2); t does not count (§1.3 step 5)."""
    return (self.grid[1] // MERGE_KERNEL) * (self.grid[2] // MERGE_KERNEL)

  @property
  def num_patches(self) -> int:
    """ViT input length t*h*w (MoonViT-3D attends over all of a chunk's patches jointly, §1.3 step 4)."""
    return self.grid[0] * self.grid[1] * self.grid[2]


# ----------------------------------------------------------------------------------------------- resize rule

def _check_positive_int(value, what: str, fix: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{what} must be a positive int, got {value!r}; {fix}")
  return int(value)


def navit_resize_size(width: int, height: int, *, in_patch_limit: int = 16384,
                      patch_limit_on_one_side: int = 512) -> tuple[int, int]:
  """Size (width, height) to resize to before padding: the "navit_resize" rule of digest §1.3.

  scale = min(1, sqrt(limit / (max(1, W//14) * max(1, H//14))), 512*14/W, 512*14/H);
  W' = min(max(1, int(W * scale)), 512*14) (int() truncates), likewise H'. Never upscales.
  """
  width = _check_positive_int(width, "navit_resize_size: width", "pass the image width in pixels")
  height = _check_positive_int(height, "navit_resize_size: height", "pass the image height in pixels")
  limit = _check_positive_int(in_patch_limit, "navit_resize_size: in_patch_limit", "e.g. 16384 (images)")
  side = _check_positive_int(patch_limit_on_one_side, "navit_resize_size: patch_limit_on_one_side", "e.g. 512")
  max_side = side * PATCH_SIZE
  patches_now = max(1, width // PATCH_SIZE) * max(1, height // PATCH_SIZE)
  scale = min(1.0, math.sqrt(limit / patches_now), max_side / width, max_side / height)
  new_w = min(max(1, int(width * scale)), max_side)
  new_h = min(max(1, int(height * scale)), max_side)
  return new_w, new_h


def padded_size(width: int, height: int) -> tuple[int, int]:
  """(width, height) rounded up to multiples of PATCH_SIZE * MERGE_KERNEL = 28 (zero-pad, digest §1.3)."""
  factor = PATCH_SIZE * MERGE_KERNEL
  return -(-width // factor) * factor, -(-height // factor) * factor


def image_token_count(width: int, height: int, *, in_patch_limit: int = 16384,
                      patch_limit_on_one_side: int = 512) -> int:
  """Visual tokens of a `width` x `height` image without touching pixels: (H'+pad)/28 * (W'+pad)/28 (§1.3)."""
  pw, ph = padded_size(*navit_resize_size(width, height, in_patch_limit=in_patch_limit,
                                          patch_limit_on_one_side=patch_limit_on_one_side))
  factor = PATCH_SIZE * MERGE_KERNEL
  return (pw // factor) * (ph // factor)


# ----------------------------------------------------------------------------------------------- pixels

def _check_size(h: int, w: int, name: str) -> None:
  if h == 0 or w == 0:
    raise ValueError(f"{name}: zero-size image ({w}x{h}); drop the item or fix its decoding")
  if h > MAX_SIDE_PIXELS or w > MAX_SIDE_PIXELS:
    raise ValueError(f"{name}: size {w}x{h} exceeds {MAX_SIDE_PIXELS} pixels per side (corrupt or absurd input); "
                     "downscale it before preprocessing")


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3] over a white background with uint8 alpha [H,W] (transformers' convert_to_rgb behaviour)."""
  a = alpha.astype(np.float32)[..., None] / 255.0
  return np.round(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
  _check_size(image.height, image.width, name)
  if image.mode.startswith(_UNSUPPORTED_PIL_MODES):
    raise ValueError(f"{name}: PIL mode {image.mode!r} has no 8-bit RGB meaning; pass a uint8 array in [0, 255] "
                     "or a float array in [0, 1] instead")
  has_alpha = any(b in ("A", "a") for b in image.getbands()) or "transparency" in image.info
  if has_alpha:
    rgba = np.asarray(image.convert("RGBA"))
    return _composite_on_white(rgba[..., :3], rgba[..., 3])
  return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
  if array.ndim == 2:
    array = array[..., None]
  elif array.ndim != 3:
    raise ValueError(f"{name}: array of rank {array.ndim} (shape {array.shape}); expected HW or HWC")
  h, w, c = array.shape
  if c not in (1, 3, 4):
    raise ValueError(f"{name}: {c} channels (shape {array.shape}); expected HWC with C in {{1, 3, 4}} "
                     "(for channel-first data use np.moveaxis(x, 0, -1))")
  _check_size(h, w, name)
  if array.dtype == np.uint8:
    pixels = array
  elif np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all():
      raise ValueError(f"{name}: float pixels contain NaN or inf; fix the source")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"{name}: float pixels span [{lo:g}, {hi:g}], expected [0, 1]; divide by 255 or pass uint8")
    pixels = np.round(array * 255.0).astype(np.uint8)
  else:
    raise ValueError(f"{name}: dtype {array.dtype} unsupported; pass uint8 in [0, 255] or float in [0, 1]")
  if c == 1:
    return np.repeat(pixels, 3, axis=2)
  if c == 4:
    return _composite_on_white(pixels[..., :3], pixels[..., 3])
  return np.ascontiguousarray(pixels)


def to_rgb_uint8(image: ImageLike, *, name: str = "image") -> np.ndarray:
  """Validated uint8 RGB [H, W, 3] from a PIL image (any 8-bit mode) or an HW / HWC array (digest §1.3).

  Arrays: uint8 in [0, 255] or float in [0, 1]; C in {1, 3, 4}. Alpha is composited onto white.
  Raises ValueError/TypeError naming `name` for empty, wrong-rank, wrong-channel, non-finite, out-of-range,
  absurdly large (> 2**15 per side) or unsupported inputs.
  """
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image, name)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image, name)
  raise TypeError(f"{name}: unsupported type {type(image).__name__}; pass a PIL.Image.Image or a np.ndarray")


def _resize_pad(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize to `size` = (W', H') (skipped when equal), then black pad right/bottom to multiples of 28."""
  if (rgb.shape[1], rgb.shape[0]) != size:
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
  pw, ph = padded_size(*size)
  out = np.zeros((ph, pw, 3), np.uint8)
  out[:rgb.shape[0], :rgb.shape[1]] = rgb
  return out


def _patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
  """uint8 [T, H, W, 3] (H, W multiples of 28) -> normalised float32 [T*h*w, 588] and grid (T, h, w)."""
  t, height, width, _ = frames.shape
  h, w = height // PATCH_SIZE, width // PATCH_SIZE
  patches = frames.reshape(t, h, PATCH_SIZE, w, PATCH_SIZE, 3).transpose(0, 1, 3, 5, 2, 4)
  patches = patches.reshape(t * h * w, PATCH_DIM).astype(np.float32)
  return (patches / 255.0 - 0.5) / 0.5, (t, h, w)


def preprocess_image(image: ImageLike, *, name: str = "image", in_patch_limit: int = 16384,
                     patch_limit_on_one_side: int = 512) -> MediaItem:
  """One image -> MediaItem with grid (1, h, w): navit resize, pad to 28, normalise, patchify (digest §1.3)."""
  rgb = to_rgb_uint8(image, name=name)
  size = navit_resize_size(rgb.shape[1], rgb.shape[0], in_patch_limit=in_patch_limit,
                           patch_limit_on_one_side=patch_limit_on_one_side)
  patches, grid = _patchify(_resize_pad(rgb, size)[None])
  return MediaItem(patches=patches, grid=grid, kind="image")


# ----------------------------------------------------------------------------------------------- video

def _check_video_args(frames, fps: float, sample_fps: float, max_num_frames: int | None, name: str) -> None:
  if isinstance(frames, (str, bytes)) or not isinstance(frames, (Sequence, np.ndarray)):
    raise TypeError(f"{name}: frames of type {type(frames).__name__}; pass a list of frames or a [N, H, W(, C)] "
                    "array")
  if len(frames) == 0:
    raise ValueError(f"{name}: empty video (no frames); drop the item")
  for what, value in (("fps", fps), ("sample_fps", sample_fps)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
        or value <= 0:
      raise ValueError(f"{name}: {what}={value!r} must be a finite number > 0")
  if max_num_frames is not None:
    _check_positive_int(max_num_frames, f"{name}: max_num_frames", "or None for no cap")


def _sample_indices(total: int, fps: float, sample_fps: float, max_num_frames: int | None) -> list[int]:
  n = max(1, math.floor(total * min(sample_fps, fps) / fps + 0.5))
  if max_num_frames is not None:
    n = min(n, max_num_frames)
  return [i * total // n for i in range(n)]


def sample_video_frames(frames: Sequence[ImageLike] | np.ndarray, fps: float, *, sample_fps: float = 2.0,
                        max_num_frames: int | None = None, name: str = "video"
                        ) -> tuple[list[ImageLike], list[float]]:
  """Frames sampled at min(sample_fps, fps) and their times in seconds (digest §1.3 "Video").

  n = max(1, round_half_up(N * min(sample_fps, fps) / fps)), then min(n, max_num_frames); source indices
  floor(i * N / n) for i in range(n); time = index / fps. Frames are returned as given (not validated).
  """
  _check_video_args(frames, fps, sample_fps, max_num_frames, name)
  indices = _sample_indices(len(frames), fps, sample_fps, max_num_frames)
  return [frames[i] for i in indices], [i / fps for i in indices]


def preprocess_video(frames: Sequence[ImageLike] | np.ndarray, fps: float, *, name: str = "video",
                     sample_fps: float = 2.0, in_patch_limit_each_frame: int = 4096,
                     patch_limit_on_one_side: int = 512, max_num_frames: int | None = None) -> list[MediaItem]:
  """A video -> MediaItems of up to TEMPORAL_CHUNK consecutive sampled frames each (digest §1.3 MoonViT-3D).

  All sampled frames must share one size; they are resized to the same size under the per-frame patch limit.
  Each chunk's timestamp is the time of its first sampled frame. Only sampled frames are decoded and checked.
  """
  _check_video_args(frames, fps, sample_fps, max_num_frames, name)
  indices = _sample_indices(len(frames), fps, sample_fps, max_num_frames)
  rgbs = []
  for index in indices:
    frame_name = f"{name} frame {index}"
    rgb = to_rgb_uint8(frames[index], name=frame_name)
    if rgbs and rgb.shape != rgbs[0].shape:
      raise ValueError(f"{frame_name}: size {rgb.shape[1]}x{rgb.shape[0]} differs from the first sampled frame's "
                       f"{rgbs[0].shape[1]}x{rgbs[0].shape[0]}; all frames of a video must share one size")
    rgbs.append(rgb)
  size = navit_resize_size(rgbs[0].shape[1], rgbs[0].shape[0], in_patch_limit=in_patch_limit_each_frame,
                           patch_limit_on_one_side=patch_limit_on_one_side)
  items = []
  for start in range(0, len(rgbs), TEMPORAL_CHUNK):
    chunk = np.stack([_resize_pad(rgb, size) for rgb in rgbs[start:start + TEMPORAL_CHUNK]])
    patches, grid = _patchify(chunk)
    items.append(MediaItem(patches=patches, grid=grid, kind="video",
                           timestamp=format_timestamp(indices[start] / fps)))
  return items


# ----------------------------------------------------------------------------------------------- placeholders

def format_timestamp(seconds: float) -> str:
  """'HH:MM:SS.mmm' (digest §1.2 `timestamp_mode` hh:mm:ss.fff), rounded to the nearest millisecond."""
  if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.number)) or not math.isfinite(seconds) \
      or seconds < 0:
    raise ValueError(f"format_timestamp: seconds={seconds!r} must be a finite number >= 0")
  ms = math.floor(seconds * 1000 + 0.5)
  hours, ms = divmod(ms, 3_600_000)
  minutes, ms = divmod(ms, 60_000)
  secs, ms = divmod(ms, 1000)
  return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def image_placeholder() -> str:
  """The chat-template text of one image (digest §1.2), with a single `<|media_pad|>`."""
  return f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"


def video_chunk_placeholder(timestamp: str) -> str:
  """The chat-template text of one video chunk: its timestamp, then the media block (digest §1.2)."""
  if not isinstance(timestamp, str) or not _TIMESTAMP_RE.match(timestamp):
    raise ValueError(f"video_chunk_placeholder: timestamp {timestamp!r} is not 'HH:MM:SS.mmm'; "
                     "build it with format_timestamp(seconds)")
  return f"{timestamp}{MEDIA_BEGIN}video{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"


def media_placeholder(item: MediaItem) -> str:
  """The placeholder text for `item`: image_placeholder() or video_chunk_placeholder(item.timestamp)."""
  if item.kind == "image":
    return image_placeholder()
  if item.timestamp is None:
    raise ValueError("media_placeholder: video chunk has no timestamp; preprocess it with preprocess_video")
  return video_chunk_placeholder(item.timestamp)


def _as_ids(ids, fn: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{fn}: ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
  return ids


def expand_media_pads(ids: np.ndarray, items: Sequence[MediaItem], media_pad_id: int) -> np.ndarray:
  """Replace the i-th single `media_pad_id` by items[i].num_tokens copies (digest §1.2); other ids unchanged."""
  ids = _as_ids(ids, "expand_media_pads")
  is_pad = ids == media_pad_id
  found = int(is_pad.sum())
  if found != len(items):
    raise ValueError(f"expand_media_pads: {found} media_pad ids ({media_pad_id}) but {len(items)} media items; "
                     "emit exactly one placeholder per item, in order (media_placeholder(item)), and expand "
                     "each sequence once")
  repeats = np.ones(ids.shape, np.int64)
  repeats[is_pad] = [item.num_tokens for item in items]
  return np.repeat(ids, repeats)


def check_media_pads(ids: np.ndarray, items: Sequence[MediaItem], media_pad_id: int) -> None:
  """Verify an expanded sequence: the media_pad runs are, in order, exactly items[i].num_tokens long (§1.2)."""
  ids = _as_ids(ids, "check_media_pads")
  edges = np.diff(np.concatenate([[0], (ids == media_pad_id).astype(np.int8), [0]]))
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  if len(starts) != len(items):
    raise ValueError(f"check_media_pads: {len(starts)} runs of media_pad ids ({media_pad_id}) but {len(items)} "
                     "media items; each item needs its own placeholder block, in order")
  for i, (start, end, item) in enumerate(zip(starts, ends, items)):
    if end - start != item.num_tokens:
      raise ValueError(f"check_media_pads: media item {i} ({item.kind}, grid {item.grid}) needs {item.num_tokens} "
                       f"media_pad ids but the run at position {start} has {end - start}; expand with "
                       "expand_media_pads using the same items")
