"""Chat-template fixtures shared by the tokenizer, data and CLI tests: a tiny word-level
tokenizer (~90 ids) with the special tokens of three template families, and templates with the
structure of the Llama 3, ChatML (Qwen) and Gemma chat templates (written here, not
downloaded), each with the end-of-turn token its assistant turns end with.
"""

import json
import os

import tokenizers
from tokenizers import models, pre_tokenizers

SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>"]
WORDS = ("system user assistant model you are a helpful kind bot hello hi there how is the "
         "weather today it sunny rainy good bad yes no thanks please tell me joke why cat dog "
         "sat on mat ran fast slow red blue green big small one two three four five what "
         "who where when again more short long answer question".split())
PUNCTUATION = list(".,!?:'")

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'you are a helpful bot' %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nyou are a helpful bot.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}"
    "{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(turns=0) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# Not prefix-stable: earlier assistant turns render as "hidden", the last one in full (as
# templates that drop earlier reasoning do), so a prefix is not the start of the whole.
UNSTABLE = ("{% for m in messages %}{{ m['role'] }}:"
            "{{ m['content'] if loop.last or m['role'] != 'assistant' else 'hidden' }}"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
# name -> (template, bos, eos, the token every assistant turn ends with)
TEMPLATES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "chatml": (CHATML, None, "<|im_end|>", "<|im_end|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", "<end_of_turn>"),
}


def backend() -> tokenizers.Tokenizer:
    """Word-level: whitespace dropped, punctuation split off, unknown words ``<unk>``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + PUNCTUATION)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(directory, name: str, *, as_file: bool = False) -> None:
    """A Hugging Face tokenizer directory with template ``name`` (in tokenizer_config.json, or
    in chat_template.jinja with ``as_file``)."""
    template, bos, eos, _ = TEMPLATES[name]
    os.makedirs(directory, exist_ok=True)
    backend().save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": "<pad>", "unk_token": "<unk>"}
    if as_file:
        with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    else:
        config["chat_template"] = template
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def conversation(turns: int, *, system: bool = False) -> list[dict]:
    """A fixed multi-turn conversation: optional system, then ``turns`` user/assistant pairs."""
    messages = [{"role": "system", "content": "you are a kind bot"}] if system else []
    for i in range(turns):
        messages += [{"role": "user", "content": f"tell me a joke {WORDS[i]} ?"},
                     {"role": "assistant", "content": f"why the cat sat on {WORDS[-i - 1]} ."}]
    return messages
