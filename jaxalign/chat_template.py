"""A model's own chat template, rendered the way ``transformers`` renders it.

Hugging Face tokenizers ship a Jinja template (``tokenizer_config.json``'s ``chat_template``, a
string or a list of named ``{"name", "template"}``; or a ``chat_template.jinja`` file, plus
``additional_chat_templates/NAME.jinja``). :func:`render` evaluates it exactly as
``transformers.utils.chat_template_utils.render_jinja_template`` does: an
``ImmutableSandboxedEnvironment`` (templates are untrusted code, so jinja2 ≥ 3.1.6, the first
without the known sandbox escapes) with ``trim_blocks``, ``lstrip_blocks`` and loop controls;
the globals ``raise_exception``, ``strftime_now``, ``dict`` and a ``namespace`` that refuses
underscore names; a ``tojson`` that does not escape HTML; the ``{% generation %}`` block tag
(rendered as its body); and the variables ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``, ``eos_token``,
...). Messages lose their ``None``-valued keys first, as ``apply_chat_template`` does.

:func:`apply_chat_template` and :func:`render_completion` are the plain ``<|role|>`` format a
tokenizer without a template falls back to (see :mod:`jaxalign.tokenizer`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CHAT_ROLES", "apply_chat_template", "read_chat_templates", "render",
           "render_completion", "select_template"]

CHAT_ROLES = ("system", "user", "assistant")
_GENERATION_PROMPT = "<|assistant|>\n"


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text; renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (as transformers')."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


class _Dict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env.from_string(source)


def render(template: str, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = False, special_tokens: Mapping[str, str] | None = None,
           tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
           **kwargs: Any) -> str:
    """The text of ``messages`` under the Jinja ``template`` (see the module docstring).

    Raises:
      jinja2.TemplateError: the template rejects the conversation (``raise_exception``).
    """
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    variables = {**(special_tokens or {}), **kwargs}
    return _compile(template).render(messages=messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **variables)


def read_chat_templates(directory: str, tokenizer_config: Mapping[str, Any]) -> (
        str | dict[str, str] | None):
    """A tokenizer directory's template(s), as transformers reads them: ``chat_template.jinja``
    and ``additional_chat_templates/*.jinja`` win over ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of ``{"name", "template"}``); ``None`` if none."""
    templates: dict[str, str] = {}
    config_value = tokenizer_config.get("chat_template")
    if isinstance(config_value, str):
        templates["default"] = config_value
    elif isinstance(config_value, list):
        templates.update({t["name"]: t["template"] for t in config_value})
    files: dict[str, str] = {}
    main = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(main):
        files["default"] = _read(main)
    extra = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(extra):
        files.update({name.removesuffix(".jinja"): _read(os.path.join(extra, name))
                      for name in sorted(os.listdir(extra)) if name.endswith(".jinja")})
    templates = files or templates
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def select_template(templates: str | Mapping[str, str], name: str | None = None,
                    tools: Any = None) -> str:
    """The template to render: ``name`` (a key of named templates) if given, else ``"tool_use"``
    when there are tools, else ``"default"`` (transformers' ``get_chat_template``)."""
    if isinstance(templates, str):
        return templates if name is None or name == "default" else name
    if not templates and name is None:
        raise ValueError("this tokenizer has no chat template: pass chat_template=...")
    if name is not None:
        return templates.get(name, name)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError(f"this tokenizer has chat templates {sorted(templates)} and no default:"
                     " pass chat_template=NAME")


# ---------------------------------------------------------------- the plain fallback format
def apply_chat_template(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Renders `[{"role", "content"}, ...]` as `<|role|>\\ncontent\\n` blocks: the plain format of
    :mod:`jaxalign.tokenizer`, for tokenizers without a chat template.

    Roles must be one of `system`, `user`, `assistant`; contents must be strings.
    """
    parts = []
    for index, message in enumerate(messages):
        role, content = _check_message(message, index)
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append(_GENERATION_PROMPT)
    return "".join(parts)


def render_completion(messages: Sequence[Mapping[str, str]]) -> str:
    """Text of assistant turn(s) that follow a prompt rendered with `add_generation_prompt`.

    The first message must be from the assistant; its header is already in the prompt, so
    `apply_chat_template(prompt, add_generation_prompt=True) + render_completion(reply)`
    equals `apply_chat_template(prompt + reply)`.
    """
    if not messages or _check_message(messages[0], 0)[0] != "assistant":
        raise ValueError("a completion must start with an assistant message")
    return apply_chat_template(messages)[len(_GENERATION_PROMPT) :]


def _check_message(message: object, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"message {index} must have string 'role' and 'content'")
    if role not in CHAT_ROLES:
        expected = ", ".join(CHAT_ROLES)
        raise ValueError(f"message {index} has unknown role {role!r} (expected one of {expected})")
    return role, content
