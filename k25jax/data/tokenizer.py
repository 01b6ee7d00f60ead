"""Tokenizers: a byte-level tokenizer for the tiny/small presets and a loader for the released Kimi BPE.

Digest §1.1 (bos 163584 / eos 163585 / pad 163839 in the released 163840-token vocabulary) and §1.2 (media
placeholders; `<|media_pad|>` is id 163605 there). Both tokenizers share the `Tokenizer` interface, so the chat
template (`k25jax.data.chat`) and the pipeline never depend on which one is used.

Special-token strings are keys everywhere (`special_ids["<|im_end|>"]`); they are parsed out of text only when
`encode(..., allow_special=True)`: plain text that happens to contain `<|im_end|>` stays bytes.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

# Special tokens shared by the chat template and both tokenizers (digest §1.2; the Kimi chat layout).
BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"
IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END = (
    "<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN, TOOL_CALL_ARG_BEGIN, TOOL_CALL_END = (
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")
THINK_BEGIN, THINK_END = "<think>", "</think>"

# ByteTokenizer ids: 0..255 are the bytes; these follow from 256 in this order. The order is part of the on-disk
# contract (checkpoints trained with it): append new tokens at the end, never reorder.
BYTE_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,                    # 256
    EOS,                    # 257
    PAD,                    # 258
    IM_SYSTEM,              # 259 (also opens tool results, as in the released template)
    IM_USER,                # 260
    IM_ASSISTANT,           # 261
    IM_MIDDLE,              # 262
    IM_END,                 # 263
    MEDIA_BEGIN,            # 264
    MEDIA_CONTENT,          # 265
    MEDIA_PAD,              # 266
    MEDIA_END,              # 267
    TOOL_CALLS_BEGIN,       # 268
    TOOL_CALLS_END,         # 269
    TOOL_CALL_BEGIN,        # 270
    TOOL_CALL_ARG_BEGIN,    # 271
    TOOL_CALL_END,          # 272
    THINK_BEGIN,            # 273
    THINK_END,              # 274
)

# Every tokenizer must define these (the chat template emits them).
REQUIRED_SPECIALS: tuple[str, ...] = BYTE_SPECIAL_TOKENS


class Tokenizer(abc.ABC):
  """Common interface. Subclasses set `_specials` (string -> id) and implement the plain-text codec."""

  _specials: dict[str, int]

  def __init__(self, specials: Mapping[str, int]):
    self._specials = dict(specials)
    self._special_by_id = {i: s for s, i in self._specials.items()}
    # Longest first so that a special never matches a prefix of a longer one.
    alternation = "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
    self._special_re = re.compile(f"({alternation})") if alternation else None

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (max id + 1); the model's `vocab_size` must be at least this."""

  @abc.abstractmethod
  def _encode_plain(self, text: str) -> list[int]:
    """Encodes text that contains no special tokens."""

  @abc.abstractmethod
  def _decode_plain(self, ids: Sequence[int]) -> bytes:
    """Bytes of non-special ids."""

  @property
  def special_ids(self) -> dict[str, int]:
    """Special-token string -> id."""
    return dict(self._specials)

  def token_to_id(self, token: str) -> int:
    """Id of a special token string (e.g. "<|im_end|>")."""
    if token not in self._specials:
      raise KeyError(f"token_to_id: {token!r} is not a special token of this tokenizer; known specials: "
                     f"{sorted(self._specials)[:12]}... Use encode() for ordinary text.")
    return self._specials[token]

  @property
  def bos_id(self) -> int:
    return self.token_to_id(BOS)

  @property
  def eos_id(self) -> int:
    return self.token_to_id(EOS)

  @property
  def pad_id(self) -> int:
    return self.token_to_id(PAD)

  @property
  def media_pad_id(self) -> int:
    return self.token_to_id(MEDIA_PAD)

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    """Token ids of `text`; special strings become special ids only when `allow_special`."""
    if not isinstance(text, str):
      raise TypeError(f"encode: expected str, got {type(text).__name__}; decode bytes to str first")
    if not allow_special or self._special_re is None:
      return self._encode_plain(text)
    ids: list[int] = []
    for k, piece in enumerate(self._special_re.split(text)):
      if k % 2:  # odd pieces are the captured specials
        ids.append(self._specials[piece])
      elif piece:
        ids.extend(self._encode_plain(piece))
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """Text of `ids` (invalid UTF-8 sequences become U+FFFD); specials are written out unless skipped."""
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      i = int(i)
      if i in self._special_by_id:
        out.append(self._decode_plain(run).decode("utf-8", errors="replace"))
        run = []
        if not skip_special:
          out.append(self._special_by_id[i])
      else:
        run.append(i)
    out.append(self._decode_plain(run).decode("utf-8", errors="replace"))
    return "".join(out)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes (ids 0..255) plus `BYTE_SPECIAL_TOKENS` from id 256; 275 ids, fits the presets' vocab of 512."""

  def __init__(self):
    super().__init__({s: 256 + k for k, s in enumerate(BYTE_SPECIAL_TOKENS)})

  @property
  def vocab_size(self) -> int:
    return 256 + len(BYTE_SPECIAL_TOKENS)

  def _encode_plain(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def _decode_plain(self, ids: Sequence[int]) -> bytes:
    bad = [i for i in ids if not 0 <= i < 256]
    if bad:
      raise ValueError(f"ByteTokenizer.decode: ids {bad[:5]} are neither bytes (0..255) nor specials "
                       f"(256..{self.vocab_size - 1}); the ids come from a different tokenizer")
    return bytes(ids)


# Pre-tokenisation regex (stdlib `re`, which lacks \p{..} classes). It approximates Kimi's tiktoken pattern:
# runs of Han characters; words = an optional single non-letter/non-digit lead character, then letters, then an
# optional English contraction; numbers in groups of at most 3 digits; punctuation runs with an optional leading
# space and trailing newlines; newline runs; whitespace not followed by non-space; remaining whitespace.
# Differences from Kimi: no upper/lower-case split inside words (CamelCase stays one piece), `\d` instead of
# \p{N}, and `[^\W\d_]` for \p{L}\p{M}. Token ids therefore match the released tokenizer on most but not all text.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
PRETOKENIZE_PATTERN = "|".join([
    f"[{_HAN}]+",
    rf"(?:[^\r\n\w]|_)?(?:(?![{_HAN}])[^\W\d_])+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\d{1,3}",
    r" ?(?:[^\s\w]|_)+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


class TiktokenTokenizer(Tokenizer):
  """Byte-pair tokenizer in the released Kimi layout (digest §1.1): `tiktoken.model` + `tokenizer_config.json`.

  `tiktoken.model` has one `base64(token bytes) rank` per line; the rank is the token id and the merge priority.
  BPE runs in pure Python (the `tiktoken` package is not a dependency): each pre-tokenised piece
  (`PRETOKENIZE_PATTERN`) starts as single bytes, and the adjacent pair whose concatenation has the lowest rank is
  merged until no pair is in the vocabulary.
  """

  def __init__(self, ranks: Mapping[bytes, int], specials: Mapping[str, int]):
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
      raise ValueError(f"TiktokenTokenizer: the BPE vocabulary lacks single bytes {missing[:8]} "
                       f"({len(missing)} in all); every byte must have a rank so any text can be encoded")
    clash = sorted(set(ranks.values()) & set(specials.values()))
    if clash:
      raise ValueError(f"TiktokenTokenizer: special ids {clash[:8]} are also BPE ranks; give specials ids "
                       "above the BPE ranks in tokenizer_config.json")
    for s in REQUIRED_SPECIALS:
      if s not in specials:
        raise ValueError(f"TiktokenTokenizer: special token {s!r} is missing from added_tokens_decoder; the chat "
                         "template needs it (add it to tokenizer_config.json)")
    super().__init__(specials)
    self._ranks = dict(ranks)
    self._bytes_by_id = {i: b for b, i in self._ranks.items()}
    self._pretokenize = re.compile(PRETOKENIZE_PATTERN)
    self._cache: dict[str, tuple[int, ...]] = {}

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "TiktokenTokenizer":
    """Loads `<path>/tiktoken.model` and the specials of `<path>/tokenizer_config.json`."""
    model_file = os.path.join(path, "tiktoken.model")
    config_file = os.path.join(path, "tokenizer_config.json")
    for f in (model_file, config_file):
      if not os.path.isfile(f):
        raise FileNotFoundError(f"TiktokenTokenizer.from_dir: {f} not found; a Kimi tokenizer directory holds "
                                "tiktoken.model and tokenizer_config.json")
    ranks: dict[bytes, int] = {}
    with open(model_file, "rb") as fh:
      for lineno, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          token_b64, rank = line.split()
          token, rank = base64.b64decode(token_b64, validate=True), int(rank)
        except ValueError as e:
          raise ValueError(f"{model_file}:{lineno}: expected 'base64 rank', got {line[:60]!r} ({e})") from None
        if token in ranks:
          raise ValueError(f"{model_file}:{lineno}: token {token!r} appears twice (ranks {ranks[token]}, {rank})")
        ranks[token] = rank
    with open(config_file, encoding="utf-8") as fh:
      config = json.load(fh)
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
      raise ValueError(f"{config_file}: no 'added_tokens_decoder' mapping (id -> {{'content': ...}}); it is "
                       "where the released Kimi tokenizer lists its special tokens")
    specials = {entry["content"]: int(i) for i, entry in decoder.items()}
    return cls(ranks, specials)

  @property
  def vocab_size(self) -> int:
    return max(max(self._ranks.values()), max(self._specials.values())) + 1

  def _bpe(self, piece: bytes) -> tuple[int, ...]:
    if piece in self._ranks:
      return (self._ranks[piece],)
    parts = [piece[k:k + 1] for k in range(len(piece))]
    while len(parts) > 1:
      best, best_rank = -1, None
      for k in range(len(parts) - 1):
        r = self._ranks.get(parts[k] + parts[k + 1])
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = k, r
      if best < 0:
        break
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return tuple(self._ranks[p] for p in parts)

  def _encode_plain(self, text: str) -> list[int]:
    ids: list[int] = []
    for piece in self._pretokenize.findall(text):
      if piece not in self._cache:
        self._cache[piece] = self._bpe(piece.encode("utf-8"))
      ids.extend(self._cache[piece])
    return ids

  def _decode_plain(self, ids: Sequence[int]) -> bytes:
    try:
      return b"".join(self._bytes_by_id[i] for i in ids)
    except KeyError as e:
      raise ValueError(f"TiktokenTokenizer.decode: id {e.args[0]} is neither a BPE rank nor a special token "
                       f"(vocab_size {self.vocab_size})") from None
