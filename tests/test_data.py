"""Tests for jaxalign.data: formats, masks, truncation, bad records, deterministic resumable order."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data import (
    DataConfig, DataError, DataLoader, bucket_length, detect_file_kind, detect_kind, load_jsonl,
)
from jaxalign.tokenizer import Tokenizer, apply_chat_template, render_completion

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is one token, so lengths are easy to check."""
    tokenizer = Tokenizer.train_bpe(["abc"], vocab_size=259)
    assert tokenizer.encode("hello") == [tokenizer.encode(c)[0] for c in "hello"]
    return tokenizer


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_preference_batch_hand_checked(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "ab", "chosen": "cde", "rejected": "f", "margin": 1.5, "p_chosen": 0.75},
        {"prompt": "xyz", "chosen": "u", "rejected": "vw"},
    ])
    dataset = load_jsonl(path, tok, config=DataConfig(max_length=16, pad_multiple=4))
    assert dataset.kind == "preference" and len(dataset) == 2
    batch = dataset.collate([0, 1])
    assert set(batch) == {"chosen_ids", "chosen_attention_mask", "chosen_completion_mask", "rejected_ids",
                          "rejected_attention_mask", "rejected_completion_mask", "margin", "p_chosen"}
    # longest: [BOS] a b c d e [EOS] = 7 tokens -> bucket 8
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (2, 8)
    assert all(v.dtype == np.int32 for k, v in batch.items() if k not in ("margin", "p_chosen"))
    np.testing.assert_array_equal(batch["chosen_ids"][0], [BOS, *ids(tok, "abcde"), EOS, PAD])
    np.testing.assert_array_equal(batch["chosen_attention_mask"][0], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["chosen_completion_mask"][0], [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["rejected_ids"][0], [BOS, *ids(tok, "abf"), EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(batch["rejected_completion_mask"][0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["rejected_completion_mask"][1], [0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["rejected_attention_mask"][1], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(batch["margin"], [1.5, 0.0])
    np.testing.assert_allclose(batch["p_chosen"], [0.75, 1.0])
    assert batch["margin"].dtype == batch["p_chosen"].dtype == np.float32


def test_sft_ranking_and_prompt_batches(tok: Tokenizer, tmp_path: Path) -> None:
    config = DataConfig(max_length=16, pad_multiple=4)
    sft = load_jsonl(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "ab", "completion": "c"}]), tok, config=config)
    batch = sft.collate([0])
    assert sft.kind == "sft" and set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    np.testing.assert_array_equal(batch["input_ids"], [[BOS, *ids(tok, "abc"), EOS, PAD, PAD, PAD]])
    np.testing.assert_array_equal(batch["completion_mask"], [[0, 0, 0, 1, 1, 0, 0, 0]])

    ranking = load_jsonl(write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["a", "bb", "ccc"], "ranking": [1, 0, 1]},
        {"prompt": "qq", "responses": ["d", "e", "f"], "ranking": [2, 1, 0]},
    ]), tok, config=config)
    batch = ranking.collate([0, 1])
    assert ranking.kind == "ranking" and set(batch) == {"ids", "attention_mask", "completion_mask", "ranks"}
    assert batch["ids"].shape == (2, 3, 8) and batch["ranks"].dtype == np.int32
    np.testing.assert_array_equal(batch["ranks"], [[1, 0, 1], [2, 1, 0]])
    np.testing.assert_array_equal(batch["ids"][0, 2], [BOS, *ids(tok, "qccc"), EOS, PAD, PAD])
    np.testing.assert_array_equal(batch["completion_mask"][0, 1], [0, 0, 1, 1, 1, 0, 0, 0])

    prompts = load_jsonl(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "abcde"}, {"prompt": "x"}]), tok,
                         config=config)
    batch = prompts.collate([0, 1])
    assert prompts.kind == "prompt" and set(batch) == {"prompt_ids", "prompt_mask"}
    np.testing.assert_array_equal(batch["prompt_ids"], [[0, 0, BOS, *ids(tok, "abcde")],
                                                         [0, 0, 0, 0, 0, 0, BOS, *ids(tok, "x")]])
    np.testing.assert_array_equal(batch["prompt_mask"][1], [0, 0, 0, 0, 0, 0, 1, 1])


def test_preference_file_serves_as_prompts(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab", "chosen": "c", "rejected": "d"}])
    dataset = load_jsonl(path, tok, kind="prompt", config=DataConfig(max_length=8, pad_multiple=4))
    np.testing.assert_array_equal(dataset.collate([0])["prompt_ids"], [[PAD, BOS, *ids(tok, "ab")]])


def test_conversational_records(tok: Tokenizer, tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello!"}]
    rejected = [{"role": "assistant", "content": "Go away."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    batch = load_jsonl(path, tok, config=DataConfig(max_length=128)).collate([0])
    chosen_tokens = batch["chosen_ids"][0][batch["chosen_attention_mask"][0] == 1]
    assert tok.decode(chosen_tokens) == apply_chat_template(prompt + chosen)
    completion = batch["chosen_ids"][0][batch["chosen_completion_mask"][0] == 1]
    assert tok.decode(completion, skip_special_tokens=False) == render_completion(chosen) + "<eos>"
    assert completion[-1] == EOS
    prompt_len = int(batch["chosen_attention_mask"][0].sum() - batch["chosen_completion_mask"][0].sum())
    assert tok.decode(batch["chosen_ids"][0][:prompt_len]) == apply_chat_template(prompt, add_generation_prompt=True)


def test_truncation_policy_and_counts(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "0123456789", "completion": "abc"},      # prompt cut to its last 3 (+BOS)
        {"prompt": "01", "completion": "abcdefghij"},       # completion cut from the right, EOS lost
        {"prompt": "01", "completion": "ab"},               # fits
    ])
    config = DataConfig(max_length=8, max_prompt_length=4, pad_multiple=8)
    dataset = load_jsonl(path, tok, config=config)
    assert (dataset.report.num_records, dataset.report.num_truncated, dataset.report.num_skipped) == (3, 2, 0)
    batch = dataset.collate([0, 1, 2])
    np.testing.assert_array_equal(batch["input_ids"][0], [BOS, *ids(tok, "789abc"), EOS])
    np.testing.assert_array_equal(batch["input_ids"][1], [BOS, *ids(tok, "01abcde")])
    np.testing.assert_array_equal(batch["completion_mask"][1], [0, 0, 0, 1, 1, 1, 1, 1])
    assert "3 sft records, 2 truncated, 0 skipped" in dataset.report.summary()


def test_bucket_lengths(tok: Tokenizer, tmp_path: Path) -> None:
    assert bucket_length(1, pad_multiple=64, max_length=512) == 64
    assert bucket_length(65, pad_multiple=64, max_length=512) == 128
    assert bucket_length(500, pad_multiple=64, max_length=500) == 500
    assert bucket_length(3, pad_multiple=64, max_length=512, pad_to_max=True) == 512
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    fixed = load_jsonl(path, tok, config=DataConfig(max_length=48, pad_to_max=True))
    assert fixed.collate([0])["input_ids"].shape == (1, 48)


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
BAD_RECORDS = [
    ('{"prompt": "p", "chosen": ', "invalid JSON (Expecting value at column 27)"),
    ('["prompt"]', "record must be a JSON object, got array"),
    ("null", "record must be a JSON object, got null"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "field 'prompt' is empty"),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string or a list of messages, got number"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({**GOOD, "margin": "big"}, "field 'margin' must be a finite number, got \"big\""),
    ({**GOOD, "p_chosen": 1.5}, "field 'p_chosen' must be a number in [0, 1], got 1.5"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"},
     "fields 'prompt' and 'chosen' mix plain text and message lists"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "c"}],
      "rejected": [{"role": "assistant", "content": "r"}]},
     "field 'chosen' must start with an assistant message, got role 'user'"),
    ({"prompt": [{"role": "robot", "content": "p"}], "chosen": "c", "rejected": "r"},
     "field 'prompt': message 0 has unknown role 'robot' (expected one of system, user, assistant)"),
    ({"prompt": "p" * 20, "chosen": "c", "rejected": "r"},
     "'chosen' is empty after truncation (the prompt has 16 tokens, max_length=16)"),
    ({"prompt": "p", "chosen": "c" * 20 + "x", "rejected": "c" * 20 + "y"},
     "'chosen' and 'rejected' are identical after truncation to max_length=16"),
]


@pytest.mark.parametrize("record, reason", BAD_RECORDS)
def test_bad_record_messages(tok: Tokenizer, tmp_path: Path, record, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", record, GOOD])  # the bad record is on line 3
    with pytest.raises(DataError) as error:
        load_jsonl(path, tok, config=DataConfig(max_length=16, max_prompt_length=16))
    assert str(error.value) == f"{path}:3: {reason}"
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0]}, "'ranking' has 1 entries but 'responses' has 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, -1]},
     "field 'ranking' must be a list of non-negative integers"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "field 'responses' must be a list of at least 2 responses"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
     "expected 2 responses (as in the first record), got 3"),
    ({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "field 'responses[1]' is empty"),
])
def test_bad_ranking_records(tok: Tokenizer, tmp_path: Path, record, reason: str) -> None:
    first = {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [first, record])
    with pytest.raises(DataError, match="^") as error:
        load_jsonl(path, tok)
    assert str(error.value) == f"{path}:2: {reason}"


def test_invalid_utf8_and_undetectable_kind(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r":1: line is not valid UTF-8$"):
        load_jsonl(path, tok)
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match=r":1: cannot tell the record kind"):
        load_jsonl(path, tok)


def test_skip_mode_counts_and_lists_reasons(tok: Tokenizer, tmp_path: Path) -> None:
    records = [GOOD, "{oops", {"prompt": "p", "chosen": "c"}] + [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 5
    path = write_jsonl(tmp_path / "mixed.jsonl", records + [GOOD])
    dataset = load_jsonl(path, tok, config=DataConfig(on_bad_record="skip"))
    report = dataset.report
    assert (len(dataset), report.num_records, report.num_skipped) == (2, 2, 7)
    assert len(report.skip_reasons) == 5
    assert report.skip_reasons[0].startswith(f"{path}:2: invalid JSON")
    assert report.skip_reasons[1] == f"{path}:3: missing field 'rejected'"
    assert report.summary().endswith("... and 2 more")
    with pytest.raises(DataError, match="no usable records"):
        load_jsonl(write_jsonl(tmp_path / "all_bad.jsonl", ["{"]), tok, config=DataConfig(on_bad_record="skip"))


def test_detect_kind(tmp_path: Path) -> None:
    assert detect_kind({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_kind({"prompt": "p", "responses": [], "ranking": []}) == "ranking"
    assert detect_kind({"prompt": "p", "completion": "c"}) == "sft"
    assert detect_kind({"prompt": "p"}) == "prompt"
    assert detect_file_kind(write_jsonl(tmp_path / "f.jsonl", ["", {"prompt": "p", "completion": "c"}])) == "sft"
    with pytest.raises(ValueError, match="cannot tell the record kind"):
        detect_kind({"text": "t"})


@pytest.fixture(scope="module")
def sft_dataset(tok: Tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "sft.jsonl"
    write_jsonl(path, [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    return load_jsonl(path, tok, config=DataConfig(max_length=16, pad_multiple=8))


def test_loader_is_deterministic_and_covers_each_epoch(sft_dataset) -> None:
    loader = DataLoader(sft_dataset, batch_size=3, seed=7)
    assert loader.steps_per_epoch == 3
    again = DataLoader(sft_dataset, batch_size=3, seed=7)
    other = DataLoader(sft_dataset, batch_size=3, seed=8)
    orders = [np.concatenate([loader.indices_at(e * 3 + i) for i in range(3)]) for e in range(2)]
    for order in orders:
        assert len(set(order.tolist())) == 9  # 9 distinct examples per epoch, the 10th dropped
    assert not np.array_equal(orders[0], orders[1])
    for step in range(6):
        np.testing.assert_array_equal(loader.batch_at(step)["input_ids"], again.batch_at(step)["input_ids"])
    assert any(not np.array_equal(loader.indices_at(s), other.indices_at(s)) for s in range(3))
    in_order = DataLoader(sft_dataset, batch_size=4, shuffle=False, drop_last=False)
    assert [in_order.indices_at(s).tolist() for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_resume_sees_the_same_batches(sft_dataset) -> None:
    uninterrupted = DataLoader(sft_dataset, batch_size=4, seed=3)
    expected = [next(uninterrupted)["input_ids"] for _ in range(12)]
    first = DataLoader(sft_dataset, batch_size=4, seed=3)
    for _ in range(7):
        next(first)
    saved = json.loads(json.dumps(first.state()))
    assert saved == {"step": 7, "epoch": 3, "index": 1, "seed": 3, "batch_size": 4, "num_examples": 10}
    resumed = DataLoader(sft_dataset, batch_size=4, seed=3)
    resumed.restore(saved)
    for step in range(7, 12):
        np.testing.assert_array_equal(next(resumed)["input_ids"], expected[step])
    with pytest.raises(ValueError, match="loader state has seed=3 but this loader has seed=4"):
        DataLoader(sft_dataset, batch_size=4, seed=4).restore(saved)
    with pytest.raises(ValueError, match="does not fit a dataset of 10 examples"):
        DataLoader(sft_dataset, batch_size=11)


def test_unpaired_batch_pairs_each_prompt_with_the_next_completion(tok: Tokenizer,
                                                                   tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "ab", "completion": "cde", "label": True},
        {"prompt": "xyz", "completion": "u", "label": False},
    ])
    dataset = load_jsonl(path, tok, config=DataConfig(max_length=16, pad_multiple=4))
    assert dataset.kind == "unpaired" and detect_kind({"prompt": "p", "completion": "c",
                                                       "label": False}) == "unpaired"
    batch = dataset.collate([0, 1])
    np.testing.assert_array_equal(batch["desirable"], [1.0, 0.0])
    np.testing.assert_array_equal(batch["input_ids"][0], [BOS, *ids(tok, "abcde"), EOS, PAD])
    np.testing.assert_array_equal(batch["completion_mask"][1], [0, 0, 0, 0, 1, 1, 0, 0])
    # KL rows: row 0's prompt with row 1's completion, row 1's prompt with row 0's
    np.testing.assert_array_equal(batch["kl_input_ids"][0], [BOS, *ids(tok, "abu"), EOS, 0, 0, 0])
    np.testing.assert_array_equal(batch["kl_input_ids"][1], [BOS, *ids(tok, "xyzcde"), EOS])
    np.testing.assert_array_equal(batch["kl_completion_mask"][1], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch["kl_attention_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_unpaired_label_must_be_a_boolean(tok: Tokenizer, tmp_path: Path, label) -> None:
    good = {"prompt": "p", "completion": "c", "label": True}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {**good, "label": label}])
    with pytest.raises(DataError) as error:
        load_jsonl(path, tok, config=DataConfig(max_length=16))
    assert str(error.value) == (f"{path}:2: field 'label' must be true or false, got"
                                f" {json.dumps(label)}")
