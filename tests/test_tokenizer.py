"""Tokenizers (digest §1.1 special ids, §1.2 media placeholders): byte tokenizer and the Kimi BPE loader."""

import base64
import json

import pytest

from k25jax.data import tokenizer as tk

UNICODE_TEXT = "Héllo wörld! 你好，世界 🙂 e\u0301 123456 it's\n\n\t  <|im_end|> [BOS] _x_ ½²"

# The documented ByteTokenizer ids (a stable on-disk contract: changing one breaks trained checkpoints).
EXPECTED_BYTE_IDS = {
    "[BOS]": 256, "[EOS]": 257, "[PAD]": 258, "<|im_system|>": 259, "<|im_user|>": 260, "<|im_assistant|>": 261,
    "<|im_middle|>": 262, "<|im_end|>": 263, "<|media_begin|>": 264, "<|media_content|>": 265,
    "<|media_pad|>": 266, "<|media_end|>": 267, "<|tool_calls_section_begin|>": 268,
    "<|tool_calls_section_end|>": 269, "<|tool_call_begin|>": 270, "<|tool_call_argument_begin|>": 271,
    "<|tool_call_end|>": 272, "<think>": 273, "</think>": 274,
}


def test_byte_round_trip_unicode():
  tok = tk.ByteTokenizer()
  ids = tok.encode(UNICODE_TEXT)
  assert ids == list(UNICODE_TEXT.encode("utf-8"))
  assert tok.decode(ids) == UNICODE_TEXT


def test_byte_specials_only_when_allowed():
  tok = tk.ByteTokenizer()
  text = "a<|im_end|>b<think>"
  assert all(i < 256 for i in tok.encode(text))
  assert tok.encode(text, allow_special=True) == [97, 263, 98, 273]
  assert tok.decode([97, 263, 98], skip_special=True) == "ab"
  assert tok.decode([97, 263, 98]) == "a<|im_end|>b"


def test_byte_stable_documented_ids():
  tok = tk.ByteTokenizer()
  assert tok.special_ids == EXPECTED_BYTE_IDS
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.media_pad_id) == (256, 257, 258, 266)
  assert tok.vocab_size == 275 <= 512
  assert tok.token_to_id("<|tool_call_end|>") == 272


def test_byte_bad_inputs():
  tok = tk.ByteTokenizer()
  with pytest.raises(ValueError, match="neither bytes"):
    tok.decode([300])
  with pytest.raises(KeyError, match="not a special token"):
    tok.token_to_id("<|nope|>")
  with pytest.raises(TypeError, match="expected str"):
    tok.encode(b"bytes")


# A hand-written BPE vocabulary in the released layout: 256 single bytes, then merges by rank.
MERGES = [b"ab", b"bc", b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
# Released Kimi ids for bos/eos/pad (digest §1.1) and media_pad (§1.2); the others are arbitrary free ids.
SPECIAL_IDS = {"[BOS]": 163584, "[EOS]": 163585, "[PAD]": 163839, "<|media_pad|>": 163605}


def _write_bpe_dir(path, merges=MERGES, specials=None):
  if specials is None:
    specials = dict(SPECIAL_IDS)
    free = iter(i for i in range(163586, 163800) if i not in SPECIAL_IDS.values())
    for s in tk.REQUIRED_SPECIALS:
      specials.setdefault(s, next(free))
  tokens = [bytes([b]) for b in range(256)] + list(merges)
  lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
  (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
  decoder = {str(i): {"content": s, "special": True} for s, i in specials.items()}
  (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
  return specials


def test_tiktoken_round_trip_and_merges(tmp_path):
  specials = _write_bpe_dir(tmp_path)
  tok = tk.TiktokenTokenizer.from_dir(tmp_path)
  assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
  rank = {t: 256 + k for k, t in enumerate(MERGES)}
  # "abc": pairs ab (rank 256) and bc (257); the lower rank merges first, so c stays alone.
  assert tok.encode("abc") == [rank[b"ab"], ord("c")]
  # "hello world" pre-tokenises to "hello" and " world"; both merge all the way up.
  assert tok.encode("hello world") == [rank[b"hello"], rank[b" world"]]
  # "help": he + l + p (no "hel"/"lp" merge exists).
  assert tok.encode("help") == [rank[b"he"], ord("l"), ord("p")]
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.media_pad_id) == (163584, 163585, 163839, 163605)
  assert tok.vocab_size == 163840
  assert tok.special_ids == specials


def test_tiktoken_merge_order_follows_rank(tmp_path):
  _write_bpe_dir(tmp_path, merges=[b"bc", b"ab"])  # bc now outranks ab
  tok = tk.TiktokenTokenizer.from_dir(tmp_path)
  assert tok.encode("abc") == [ord("a"), 256]


def test_tiktoken_specials(tmp_path):
  _write_bpe_dir(tmp_path)
  tok = tk.TiktokenTokenizer.from_dir(tmp_path)
  text = "hello<|media_pad|>[EOS]"
  assert 163605 not in tok.encode(text) and 163585 not in tok.encode(text)
  ids = tok.encode(text, allow_special=True)
  assert ids == [256 + MERGES.index(b"hello"), 163605, 163585]
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special=True) == "hello"


def test_tiktoken_bad_files(tmp_path):
  specials = {s: 1000 + k for k, s in enumerate(tk.REQUIRED_SPECIALS)}
  (tmp_path / "a").mkdir()
  _write_bpe_dir(tmp_path / "a", specials={k: v for k, v in specials.items() if k != "<|im_end|>"})
  with pytest.raises(ValueError, match="im_end"):
    tk.TiktokenTokenizer.from_dir(tmp_path / "a")
  (tmp_path / "b").mkdir()
  _write_bpe_dir(tmp_path / "b", specials=specials)
  lines = (tmp_path / "b" / "tiktoken.model").read_text().splitlines()
  (tmp_path / "b" / "tiktoken.model").write_text("\n".join(lines[1:]))  # drop byte 0
  with pytest.raises(ValueError, match="single bytes"):
    tk.TiktokenTokenizer.from_dir(tmp_path / "b")
  with pytest.raises(FileNotFoundError, match="tiktoken.model"):
    tk.TiktokenTokenizer.from_dir(tmp_path / "missing")
