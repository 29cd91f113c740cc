"""Chat templates against ``transformers.AutoTokenizer.apply_chat_template``, and the
assistant-only masks of conversations (``jaxalign.conversation``; the data pipeline's use of
them is in ``test_data_chat.py``).

The templates are fixtures with the structure of the Llama 3, ChatML/Qwen and Gemma families
(``tests/chat_fixtures.py``) on a word-level tokenizer, so whitespace never merges into tokens
and the expected mask can be written down independently: every assistant turn trains on its
content's tokens followed by its end-of-turn token, and nothing else trains.
"""

import json

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat_fixtures as cf
from jaxalign.conversation import ConversationError, encode_conversation
from jaxalign.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

CONVERSATIONS = [cf.conversation(1), cf.conversation(2, system=True), cf.conversation(3)]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """``name -> directory`` of each template family's tokenizer."""
    dirs = {}
    for name in cf.TEMPLATES:
        dirs[name] = tmp_path_factory.mktemp(name)
        cf.write_tokenizer(dirs[name], name)
    return dirs


@pytest.fixture(scope="module")
def tokenizers_(tokenizer_dirs):
    return {name: Tokenizer.from_file(path) for name, path in tokenizer_dirs.items()}


def _hf_ids(hf_tokenizer, messages, **kwargs):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", list(cf.TEMPLATES))
def test_ids_equal_transformers_on_multi_turn_conversations(tokenizer_dirs, tokenizers_, name):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[name])
    ours = tokenizers_[name]
    for messages in CONVERSATIONS:
        for prompt in (messages, messages[:-1]):  # ends with the assistant / with the user
            for generation_prompt in (False, True):
                text = ours.apply_chat_template(prompt, add_generation_prompt=generation_prompt)
                assert text == hf.apply_chat_template(
                    prompt, add_generation_prompt=generation_prompt, tokenize=False)
                assert ours.apply_chat_template(
                    prompt, add_generation_prompt=generation_prompt, tokenize=True) == _hf_ids(
                        hf, prompt, add_generation_prompt=generation_prompt)
    assert ours.encode(cf.TEMPLATES[name][3]) == [ours.backend.token_to_id(cf.TEMPLATES[name][3])]


def test_template_files_named_templates_and_save_round_trip(tmp_path):
    cf.write_tokenizer(tmp_path / "file", "gemma", as_file=True)  # chat_template.jinja
    messages = cf.conversation(2)
    from_file = Tokenizer.from_file(tmp_path / "file")
    assert from_file.chat_template == cf.GEMMA
    (tmp_path / "file" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [10, 12], "temperature": 0.6}))
    tok = Tokenizer.from_file(tmp_path / "file")
    assert tok.stop_ids == (10, 12) and tok.eos_id == 10
    tok.save(tmp_path / "saved")  # tokenizer_config.json now holds the template
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == cf.GEMMA
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tok.apply_chat_template(messages, tokenize=True) == _hf_ids(hf, messages)
    assert Tokenizer.from_file(tmp_path / "saved").generation_config["temperature"] == 0.6
    # named templates: "default" unless another is asked for, as transformers picks them
    cf.write_tokenizer(tmp_path / "named", "llama3")
    config_path = tmp_path / "named" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "default", "template": cf.LLAMA3},
                               {"name": "chatml", "template": cf.CHATML}]
    config_path.write_text(json.dumps(config))
    named, hf = Tokenizer.from_file(tmp_path / "named"), transformers.AutoTokenizer.from_pretrained(
        tmp_path / "named")
    for which in (None, "chatml"):
        assert named.apply_chat_template(messages, chat_template=which, tokenize=True) == (
            _hf_ids(hf, messages, chat_template=which))


def test_template_globals_and_sandbox(tokenizers_):
    gemma = tokenizers_["gemma"]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        gemma.apply_chat_template([{"role": "assistant", "content": "hi"}])
    date = gemma.apply_chat_template([], chat_template="{{ strftime_now('%Y') }}")
    assert date.isdigit() and len(date) == 4
    with pytest.raises(jinja2.exceptions.SecurityError):
        gemma.apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        gemma.apply_chat_template([], chat_template="{% set ns = namespace(_x=1) %}")


def _expected_mask(tokenizer, messages, end_token):
    """What must train: each assistant content's tokens, then the turn's end token."""
    tokens = []
    for message in messages:
        if message["role"] == "assistant":
            tokens += tokenizer.encode(message["content"].strip())
            tokens += [] if end_token is None else [tokenizer.backend.token_to_id(end_token)]
    return tokens


_WORD = st.sampled_from(cf.WORDS + cf.PUNCTUATION)
_TEXT = st.lists(_WORD, min_size=1, max_size=5).map(" ".join)


@st.composite
def _conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(_TEXT)},
                     {"role": "assistant", "content": draw(_TEXT)}]
    return messages


@given(messages=_conversations(), name=st.sampled_from([*cf.TEMPLATES, "plain"]),
       split=st.integers(0, 2))
def test_assistant_only_mask_covers_exactly_the_assistant_turns(tokenizers_, messages, name,
                                                                split):
    tokenizer = tokenizers_.get(name) or Tokenizer(cf.backend(), bos_token="<bos>",
                                                     eos_token="<eos>")
    end = cf.TEMPLATES[name][3] if name in cf.TEMPLATES else None
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    first = assistant[min(split, len(assistant) - 1)]  # the prompt ends before this turn
    tokens = encode_conversation(tokenizer, messages[:first], messages[first:])
    trained = [t for t, m in zip(tokens.completion_ids, tokens.completion_mask) if m]
    expected = _expected_mask(tokenizer, messages[first:], end)
    if name == "plain":  # the plain format ends the conversation with EOS, which trains too
        expected.append(tokenizer.eos_id)
    assert trained == expected
    assert len(tokens.completion_mask) == len(tokens.completion_ids)
    if name != "plain":  # and the ids are the template's own: prompt + completion = the whole
        whole = tokenizer.apply_chat_template(messages, tokenize=True)
        assert tokens.prompt_ids + tokens.completion_ids == whole


def test_a_conversation_the_template_renders_unstably_is_refused():
    tok = Tokenizer(cf.backend(), chat_template=cf.UNSTABLE)
    assert sum(encode_conversation(tok, None, cf.conversation(1)).completion_mask) > 0
    with pytest.raises(ConversationError, match="not prefix-stable"):
        encode_conversation(tok, None, cf.conversation(2))
    with pytest.raises(ConversationError, match="no assistant message"):
        encode_conversation(tok, None, [{"role": "user", "content": "hi"}])
