"""Tests for jaxalign.tokenizer: byte-level BPE round trips, special tokens, batch padding, chat."""

import json

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from jaxalign.tokenizer import Tokenizer, apply_chat_template, render_completion

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer",
    "café crème, naïve résumé",
    "日本語のテキスト 日本",
    "emoji 🙂🚀 and more 🙂",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=400)


@pytest.mark.parametrize(
    "text",
    ["hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n", "café naïve", "日本 日本語",
     "emoji 🙂🚀👍🏽", "unseen: Ωμέγα ק ✓", ""],
)
def test_byte_level_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    with_specials = tok.encode(text, add_bos=True, add_eos=True)
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert with_specials[1:-1] == tok.encode(text)
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, skip_special_tokens=False) == f"<bos>{text}<eos>"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_property(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_train_bpe_learns_merges_and_special_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 400  # 3 specials + 256 bytes + some merges
    assert len(tok.encode("hello world")) < len("hello world")


def test_save_and_load_give_identical_ids(tok: Tokenizer, tmp_path) -> None:
    texts = ["hello world", "café 日本 🙂", "new words entirely"]
    tok.save(tmp_path / "tokenizer.json")
    tok.save(tmp_path / "model_dir")
    for loaded in (Tokenizer.from_file(tmp_path / "tokenizer.json"), Tokenizer.from_file(tmp_path / "model_dir")):
        assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
            tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size)


def test_overrides_survive_directory_save(tmp_path) -> None:
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300, special_tokens=("<pad>", "<bos>", "<eos>", "<|eot|>"))
    custom = Tokenizer(tok.backend, eos_token="<|eot|>")
    assert custom.eos_id == 3
    custom.save(tmp_path / "dir")
    assert Tokenizer.from_file(tmp_path / "dir").eos_id == 3
    with pytest.raises(ValueError, match=r"eos_token='<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, eos_token="<nope>")


def test_hf_directory_with_config_and_common_names(tmp_path) -> None:
    base = Tokenizer.train_bpe(CORPUS, vocab_size=300, special_tokens=("<s>", "</s>", "<|endoftext|>"))
    assert (base.pad_id, base.bos_id, base.eos_id) == (None, 0, 1)  # looked up by common names
    assert base.padding_id == base.eos_id
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    base.backend.save(str(model_dir / "tokenizer.json"))
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<|endoftext|>",
              "bos_token": None}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_file(model_dir)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (2, 0, 2)
    assert Tokenizer.from_file(model_dir, eos_token="</s>").eos_id == 1


def test_backend_post_processor_never_adds_specials(tok: Tokenizer) -> None:
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    wrapped = Tokenizer(backend)
    assert backend.encode("hi").ids[0] == 1
    assert wrapped.encode("hi") == tok.encode("hi")
    assert wrapped.encode("hi", add_bos=True) == [1] + tok.encode("hi")


def test_missing_specials_are_not_added() -> None:
    bare = Tokenizer.train_bpe(CORPUS, vocab_size=280, special_tokens=())
    assert (bare.pad_id, bare.bos_id, bare.eos_id, bare.padding_id) == (None, None, None, 0)
    assert bare.encode("abc", add_bos=True, add_eos=True) == bare.encode("abc")


def test_encode_batch_padding_sides_and_masks(tok: Tokenizer) -> None:
    a, b = tok.encode("hello world"), tok.encode("fox")
    ids, mask = tok.encode_batch(["hello world", "fox"], add_bos=True, add_eos=True)
    length = len(a) + 2
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, length)
    np.testing.assert_array_equal(ids[0], [1, *a, 2])
    np.testing.assert_array_equal(ids[1], [1, *b, 2] + [0] * (len(a) - len(b)))
    np.testing.assert_array_equal(mask[1], [1] * (len(b) + 2) + [0] * (len(a) - len(b)))
    left_ids, left_mask = tok.encode_batch(["hello world", "fox"], max_length=length + 1, padding_side="left")
    np.testing.assert_array_equal(left_ids[1], [0] * (length + 1 - len(b)) + b)
    np.testing.assert_array_equal(left_mask[1], [0] * (length + 1 - len(b)) + [1] * len(b))
    np.testing.assert_array_equal(left_mask[0], [0, 0, 0] + [1] * len(a))


def test_encode_batch_truncation_keeps_bos_and_eos(tok: Tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    full = tok.encode(text)
    assert len(full) > 4
    right, _ = tok.encode_batch([text], max_length=5, add_bos=True, add_eos=True)
    left, _ = tok.encode_batch([text], max_length=5, add_bos=True, add_eos=True, truncation_side="left")
    np.testing.assert_array_equal(right[0], [1, *full[:3], 2])
    np.testing.assert_array_equal(left[0], [1, *full[-3:], 2])
    with pytest.raises(ValueError, match="leaves no room"):
        tok.encode_batch([text], max_length=1, add_bos=True, add_eos=True)
    with pytest.raises(ValueError, match="must be 'right' or 'left'"):
        tok.encode_batch([text], padding_side="middle")  # type: ignore[arg-type]


def test_decode_batch_uses_mask(tok: Tokenizer) -> None:
    texts = ["hello world", "café 🙂"]
    ids, mask = tok.encode_batch(texts, max_length=32, padding_side="left", add_eos=True)
    assert tok.decode_batch(ids, attention_mask=mask) == texts
    assert tok.decode_batch(ids) == texts  # pad and EOS are special tokens, skipped
    assert tok.decode_batch(ids, attention_mask=mask, skip_special_tokens=False)[0] == "hello world<eos>"


def test_chat_template_format_and_completion() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    reply = [{"role": "assistant", "content": "Hello."}]
    rendered = apply_chat_template(prompt, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"
    assert render_completion(reply) == "Hello.\n"
    assert rendered + render_completion(reply) == apply_chat_template(prompt + reply)
    with pytest.raises(ValueError, match="message 1 has unknown role 'bot'"):
        apply_chat_template([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])
    with pytest.raises(ValueError, match="must start with an assistant message"):
        render_completion(prompt)
    with pytest.raises(ValueError, match="message 0 must have string 'role' and 'content'"):
        apply_chat_template([{"role": "user", "content": 3}])
