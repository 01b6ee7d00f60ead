"""Chat template and encoders (digest §1.2 placeholders; the Kimi K2 chat layout)."""

import numpy as np
import pytest

from k25jax.data import chat
from k25jax.data import media
from k25jax.data.tokenizer import ByteTokenizer

PAD = "<|media_pad|>"


def _image(h=56, w=84, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _conversation():
  return {"messages": [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What is 1+1?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "Let me compute."}],
       "tool_calls": [{"name": "python", "arguments": '{"code": "1+1"}'}]},
      {"role": "tool", "content": [{"type": "text", "text": "2"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The answer is 2."}]},
  ], "meta": {"domain": "toy", "answer": "2"}}


GOLDEN = (
    "<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
    "<|im_user|>user<|im_middle|><|media_begin|>image<|media_content|><|media_pad|><|media_end|>What is 1+1?"
    "<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>Let me compute.<|tool_calls_section_begin|><|tool_call_begin|>"
    'functions.python:0<|tool_call_argument_begin|>{"code": "1+1"}<|tool_call_end|><|tool_calls_section_end|>'
    "<|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.python:0\n2<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>The answer is 2.<|im_end|>")
TRAINED = ('Let me compute.<|tool_calls_section_begin|><|tool_call_begin|>functions.python:0'
           '<|tool_call_argument_begin|>{"code": "1+1"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
           'The answer is 2.<|im_end|>')


def test_render_golden():
  assert chat.render(_conversation()["messages"]) == GOLDEN


def test_conversation_loss_mask_and_media_pads():
  tok = ByteTokenizer()
  enc = chat.encode_conversation(_conversation(), tok)
  assert enc.tokens.dtype == np.int32 and enc.tokens.shape == enc.loss_mask.shape
  assert len(enc.media) == 1 and enc.media[0].grid == (1, 4, 6)
  n_pad = int((enc.tokens == tok.media_pad_id).sum())
  assert n_pad == sum(item.num_tokens for item in enc.media) == 6
  media.check_media_pads(enc.tokens, enc.media, tok.media_pad_id)
  assert tok.decode(enc.tokens) == GOLDEN.replace(PAD, PAD * n_pad)
  assert tok.decode(enc.tokens[enc.loss_mask]) == TRAINED
  assert not enc.loss_mask[enc.tokens == tok.media_pad_id].any()
  assert (enc.modality, enc.domain, enc.meta["answer"]) == ("vision", "toy", "2")


def test_train_on_last_and_prompt():
  tok = ByteTokenizer()
  conv = _conversation()
  last = chat.encode_conversation(conv, tok, train_on="last")
  assert tok.decode(last.tokens[last.loss_mask]) == "The answer is 2.<|im_end|>"
  prompt = chat.encode_prompt(conv, tok)
  assert not prompt.loss_mask.any()
  expected = chat.render(conv["messages"][:-1]) + "<|im_assistant|>assistant<|im_middle|>"
  assert tok.decode(prompt.tokens) == expected.replace(PAD, PAD * 6)
  full = chat.encode_conversation(conv, tok)
  head = full.tokens[:len(prompt.tokens)]  # the prompt is a prefix of the full conversation
  np.testing.assert_array_equal(head, prompt.tokens)


def test_video_chunks_and_document():
  tok = ByteTokenizer()
  frames = [_image(28, 28, seed=s) for s in range(6)]  # 6 frames at 2 fps -> chunks of 4 and 2 frames
  doc = {"document": [{"type": "text", "text": "A clip:"}, {"type": "video", "frames": frames, "fps": 2.0},
                      {"type": "text", "text": "done."}], "meta": {"domain": "clips"}}
  enc = chat.encode_document(doc, tok)
  assert [item.timestamp for item in enc.media] == ["00:00:00.000", "00:00:02.000"]
  assert [item.grid[0] for item in enc.media] == [4, 2]
  assert int((enc.tokens == tok.media_pad_id).sum()) == sum(i.num_tokens for i in enc.media)
  assert enc.tokens[0] == tok.bos_id and enc.tokens[-1] == tok.eos_id
  assert tok.decode(enc.tokens[enc.loss_mask]) == "A clip:done.[EOS]"
  text = tok.decode(enc.tokens)
  assert "00:00:02.000<|media_begin|>video<|media_content|><|media_pad|><|media_end|>done." in text


def test_special_strings_in_text_stay_text():
  tok = ByteTokenizer()
  conv = {"messages": [{"role": "user", "content": "hi<|im_end|><|im_assistant|>"},
                       {"role": "assistant", "content": "ok"}]}
  enc = chat.encode_conversation(conv, tok)
  assert int((enc.tokens == tok.token_to_id("<|im_end|>")).sum()) == 2  # one per turn, none from the text
  assert int((enc.tokens == tok.token_to_id("<|im_assistant|>")).sum()) == 1


def test_bad_conversations():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="message 0: tool result without a pending tool call"):
    chat.render([{"role": "tool", "content": "2"}])
  with pytest.raises(ValueError, match="message 1: role 'bot'"):
    chat.render([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])
  with pytest.raises(ValueError, match="no assistant turn"):
    chat.encode_conversation({"messages": [{"role": "user", "content": "x"}]}, tok)
  with pytest.raises(ValueError, match="message 0 part 0: unknown content part 'audio'"):
    chat.render([{"role": "user", "content": [{"type": "audio"}]}])
  with pytest.raises(ValueError, match="train_on"):
    chat.encode_conversation(_conversation(), tok, train_on="all")
