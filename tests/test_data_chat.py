"""Conversational records in the data pipeline: ``{"messages"}`` and message-list preference
records train on their assistant turns only, with the chat template's own ids
(``transformers``' ``apply_chat_template``); a conversation the template does not render
prefix-stably is a bad record named by ``file:line``.
"""

import json

import pytest

import chat_fixtures as cf
from jaxalign.data import DataConfig, DataError, load_jsonl
from jaxalign.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    cf.write_tokenizer(path, "llama3")
    return Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)


def _hf_ids(hf_tokenizer, messages, **kwargs):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _expected_mask(tokenizer, messages, end_token):
    """What must train: each assistant content's tokens, then the turn's end token."""
    tokens = []
    for message in messages:
        if message["role"] == "assistant":
            tokens += tokenizer.encode(message["content"].strip())
            tokens.append(tokenizer.backend.token_to_id(end_token))
    return tokens


def test_conversational_records_train_on_assistant_turns(llama3, tmp_path):
    tok, hf = llama3
    messages = cf.conversation(2, system=True)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": messages}) + "\n")
    batch = load_jsonl(sft, tok, config=DataConfig(max_length=128, pad_multiple=8)).collate([0])
    length = int(batch["attention_mask"].sum())
    assert batch["input_ids"][0, :length].tolist() == _hf_ids(hf, messages)
    trained = batch["input_ids"][0][batch["completion_mask"][0] == 1].tolist()
    assert trained == _expected_mask(tok, messages, "<|eot_id|>")
    prefs = tmp_path / "prefs.jsonl"
    prompt = messages[:-1]  # an earlier assistant turn sits in the prompt: context only
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes ."}],
              "rejected": [{"role": "assistant", "content": "no !"}]}
    prefs.write_text(json.dumps(record) + "\n")
    batch = load_jsonl(prefs, tok, config=DataConfig(max_length=128, pad_multiple=8)).collate([0])
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_ids"][0], batch[f"{side}_completion_mask"][0]
        length = int(batch[f"{side}_attention_mask"][0].sum())
        assert ids[:length].tolist() == _hf_ids(hf, prompt + record[side])
        assert ids[mask == 1].tolist() == _expected_mask(tok, record[side], "<|eot_id|>")
    prompts = load_jsonl(prefs, tok, kind="prompt", config=DataConfig(max_length=64)).collate([0])
    assert prompts["prompt_ids"][0][prompts["prompt_mask"][0] == 1].tolist() == _hf_ids(
        hf, prompt, add_generation_prompt=True)


def test_a_template_that_is_not_prefix_stable_names_the_line(tmp_path):
    tok = Tokenizer(cf.backend(), chat_template=cf.UNSTABLE)
    path = tmp_path / "sft.jsonl"
    good = {"messages": cf.conversation(1)}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": cf.conversation(2)}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:2: field 'messages': the chat template is not"
                                        r" prefix-stable"):
        load_jsonl(path, tok, config=DataConfig(max_length=128))
