"""Kimi K2.5 chat template and the encoders that turn conversations/documents into `Encoded` examples.

Layout (digest §1.2; the released Kimi K2 chat template), one turn per message, no separators:
  system     <|im_system|>system<|im_middle|>{content}<|im_end|>
  user       <|im_user|>user<|im_middle|>{content}<|im_end|>
  assistant  <|im_assistant|>assistant<|im_middle|>[<think>{reasoning}</think>]{content}[tool calls]<|im_end|>
  tool       <|im_system|>tool<|im_middle|>## Return of {call id}\n{content}<|im_end|>
Tool calls: <|tool_calls_section_begin|>(<|tool_call_begin|>functions.{name}:{k}<|tool_call_argument_begin|>
{arguments}<|tool_call_end|>)*<|tool_calls_section_end|>, where k counts calls over the whole conversation; the
k-th tool message answers the k-th call. Content parts are concatenated; an image is `image_placeholder()`, a
video one `video_chunk_placeholder(timestamp)` per chunk of <= 4 frames. No default system prompt is added.
Message text is always encoded as plain text (special strings inside it stay bytes); only the template emits
special tokens. An assistant message may carry an optional "reasoning" string (rendered inside <think>).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from k25jax.data import tokenizer as tk
from k25jax.data.example import Encoded

_ROLE_TOKEN = {"system": tk.IM_SYSTEM, "user": tk.IM_USER, "assistant": tk.IM_ASSISTANT, "tool": tk.IM_SYSTEM}
_TRAIN_ON = ("assistant", "last")


@dataclasses.dataclass(frozen=True)
class _Piece:
  """A run of the rendered sequence: plain text, one special token, or one media placeholder."""
  text: str
  kind: str  # "text" | "special" | "media"
  train: bool
  item: Any = None  # MediaItem for kind == "media"


def _content_parts(content, where: str) -> list[Mapping[str, Any]]:
  if isinstance(content, str):
    return [{"type": "text", "text": content}]
  if not isinstance(content, Sequence):
    raise TypeError(f"{where}: content of type {type(content).__name__}; use a str or a list of parts "
                    "({'type': 'text'|'image'|'video', ...})")
  return list(content)


def _part_pieces(part: Mapping[str, Any], train: bool, where: str) -> list[_Piece]:
  """Text or media pieces of one content part (media preprocessed by `k25jax.data.media`)."""
  from k25jax.data import media  # lazy: keeps the tokenizer side importable without PIL work

  kind = part.get("type") if isinstance(part, Mapping) else None
  if kind == "text":
    if not isinstance(part.get("text"), str):
      raise TypeError(f"{where}: text part needs a str 'text', got {type(part.get('text')).__name__}")
    return [_Piece(part["text"], "text", train)]
  if kind == "image":
    if "image" not in part:
      raise ValueError(f"{where}: image part has no 'image' key (PIL.Image or uint8 array)")
    item = media.preprocess_image(part["image"], name=where)
    return [_Piece(media.media_placeholder(item), "media", False, item)]
  if kind == "video":
    if "frames" not in part or "fps" not in part:
      raise ValueError(f"{where}: video part needs 'frames' (list of frames) and 'fps' (float)")
    items = media.preprocess_video(part["frames"], part["fps"], name=where)
    return [_Piece(media.media_placeholder(item), "media", False, item) for item in items]
  raise ValueError(f"{where}: unknown content part {kind!r}; use type 'text', 'image' or 'video'")


def _message_pieces(messages: Sequence[Mapping[str, Any]], train_turns: set[int]) -> list[_Piece]:
  """The whole conversation as pieces; turns in `train_turns` (assistant) are targets after their header."""
  if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
    raise TypeError(f"messages must be a list of message dicts, got {type(messages).__name__}; pass "
                    "conversation['messages']")
  pieces: list[_Piece] = []
  call_ids: list[str] = []
  answered = 0
  for i, msg in enumerate(messages):
    where = f"message {i}"
    role = msg.get("role") if isinstance(msg, Mapping) else None
    if role not in _ROLE_TOKEN:
      raise ValueError(f"{where}: role {role!r} is not one of {sorted(_ROLE_TOKEN)}")
    if msg.get("tool_calls") and role != "assistant":
      raise ValueError(f"{where}: only assistant messages may carry tool_calls (role is {role!r})")
    train = i in train_turns
    pieces += [_Piece(_ROLE_TOKEN[role], "special", False), _Piece(role, "text", False),
               _Piece(tk.IM_MIDDLE, "special", False)]
    if role == "tool":
      if answered >= len(call_ids):
        raise ValueError(f"{where}: tool result without a pending tool call ({len(call_ids)} calls so far); "
                         "each tool message answers the next unanswered assistant tool call")
      pieces.append(_Piece(f"## Return of {call_ids[answered]}\n", "text", False))
      answered += 1
    if role == "assistant" and msg.get("reasoning") is not None:
      pieces += [_Piece(tk.THINK_BEGIN, "special", train), _Piece(msg["reasoning"], "text", train),
                 _Piece(tk.THINK_END, "special", train)]
    for j, part in enumerate(_content_parts(msg.get("content", []), where)):
      pieces += _part_pieces(part, train, f"{where} part {j}")
    if msg.get("tool_calls"):
      pieces.append(_Piece(tk.TOOL_CALLS_BEGIN, "special", train))
      for call in msg["tool_calls"]:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) \
            or not isinstance(call.get("arguments"), str):
          raise ValueError(f"{where}: tool call {call!r} needs str 'name' and str 'arguments' (JSON text)")
        call_ids.append(f"functions.{call['name']}:{len(call_ids)}")
        pieces += [_Piece(tk.TOOL_CALL_BEGIN, "special", train), _Piece(call_ids[-1], "text", train),
                   _Piece(tk.TOOL_CALL_ARG_BEGIN, "special", train), _Piece(call["arguments"], "text", train),
                   _Piece(tk.TOOL_CALL_END, "special", train)]
      pieces.append(_Piece(tk.TOOL_CALLS_END, "special", train))
    pieces.append(_Piece(tk.IM_END, "special", train))
  return pieces


def _encode_pieces(pieces: Sequence[_Piece], tok: tk.Tokenizer) -> tuple[np.ndarray, np.ndarray, list]:
  """Token ids, loss mask and media items; each placeholder's pad expanded to item.num_tokens (digest §1.2)."""
  from k25jax.data import media

  ids: list[np.ndarray] = []
  mask: list[np.ndarray] = []
  items = []
  k = 0
  while k < len(pieces):
    p = pieces[k]
    if p.kind == "text":  # merge adjacent text runs with the same target flag, so BPE sees whole words
      text = p.text
      while k + 1 < len(pieces) and pieces[k + 1].kind == "text" and pieces[k + 1].train == p.train:
        k += 1
        text += pieces[k].text
      piece_ids = np.asarray(tok.encode(text), np.int64)
    elif p.kind == "special":
      piece_ids = np.asarray([tok.token_to_id(p.text)], np.int64)
    else:
      piece_ids = media.expand_media_pads(np.asarray(tok.encode(p.text, allow_special=True), np.int64),
                                         [p.item], tok.media_pad_id)
      items.append(p.item)
    ids.append(piece_ids)
    mask.append(np.full(piece_ids.shape, p.train))
    k += 1
  return np.concatenate(ids), np.concatenate(mask), items


def _encoded(pieces, tok, meta: Mapping[str, Any] | None) -> Encoded:
  tokens, loss_mask, items = _encode_pieces(pieces, tok)
  meta = dict(meta or {})
  return Encoded(tokens=tokens, loss_mask=loss_mask, media=items, modality="vision" if items else "text",
                 domain=str(meta.get("domain", "")), meta=meta)


def _messages(conv: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
  if not isinstance(conv, Mapping) or "messages" not in conv:
    raise ValueError("conversation must be a dict with a 'messages' list (see k25jax/data/example.py)")
  return conv["messages"]


def render(messages: Sequence[Mapping[str, Any]]) -> str:
  """The Kimi K2.5 chat text of `messages` (module docstring layout; one `<|media_pad|>` per media item)."""
  return "".join(p.text for p in _message_pieces(messages, set()))


def encode_conversation(conv: Mapping[str, Any], tok: tk.Tokenizer, *, train_on: str = "assistant") -> Encoded:
  """A chat example for SFT: loss on assistant turns after their header, incl. their `<|im_end|>`.

  train_on: "assistant" (every assistant turn) or "last" (the final assistant turn only).
  """
  messages = _messages(conv)
  if train_on not in _TRAIN_ON:
    raise ValueError(f"encode_conversation: train_on={train_on!r}; use one of {_TRAIN_ON}")
  assistant = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"]
  if not assistant:
    raise ValueError("encode_conversation: the conversation has no assistant turn, so nothing to train on; "
                     "use encode_prompt for generation prompts")
  train_turns = set(assistant) if train_on == "assistant" else {assistant[-1]}
  return _encoded(_message_pieces(messages, train_turns), tok, conv.get("meta"))


def encode_prompt(conv: Mapping[str, Any], tok: tk.Tokenizer) -> Encoded:
  """A generation prompt: all turns but a final assistant one, then `<|im_assistant|>assistant<|im_middle|>`."""
  messages = list(_messages(conv))
  if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
    messages = messages[:-1]
  pieces = _message_pieces(messages, set()) + [
      _Piece(tk.IM_ASSISTANT, "special", False), _Piece("assistant", "text", False),
      _Piece(tk.IM_MIDDLE, "special", False)]
  return _encoded(pieces, tok, conv.get("meta"))


def encode_document(doc: Mapping[str, Any], tok: tk.Tokenizer) -> Encoded:
  """A pre-training document: `[BOS] parts [EOS]`; loss on text tokens and EOS, not on media placeholders."""
  if not isinstance(doc, Mapping) or "document" not in doc:
    raise ValueError("document must be a dict with a 'document' list of content parts (see example.py)")
  pieces = [_Piece(tk.BOS, "special", False)]
  for j, part in enumerate(_content_parts(doc["document"], "document")):
    pieces += _part_pieces(part, True, f"document part {j}")
  pieces.append(_Piece(tk.EOS, "special", True))
  return _encoded(pieces, tok, doc.get("meta"))
