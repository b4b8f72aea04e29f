"""Renders a chat (OpenAI-style messages) into a prompt with the model's own chat template.

The template is the GGUF's `tokenizer.chat_template`, rendered as transformers'
`apply_chat_template` renders it (and llama.cpp's server with `--jinja` imitates): the same
sandboxed jinja2 environment, filters, globals and variables, so the prompt is the one the
model was tuned on, byte for byte. A model without a template gets PLAIN_TEMPLATE.

The prompt may begin with `bos_token` (many templates write it): tokenize it without adding
another BOS, as llama.cpp's server strips a leading BOS when its vocabulary adds one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgemoe.errors import ChatTemplateError, InvalidArgumentError, ModelFormatError
from edgemoe.gguf_header import read_header

PLAIN_TEMPLATE = r"""
{%- for message in messages -%}
    {%- if message.role in ('system', 'developer') -%}
        {{- message.content ~ '\n\n' -}}
    {%- elif message.role == 'assistant' and message.content[:1] in (' ', '\n') -%}
        {{- 'Assistant:' ~ message.content ~ '\n' -}}
    {%- else -%}
        {{- {'user': 'User', 'assistant': 'Assistant', 'tool': 'Tool'}[message.role] ~ ': ' ~ message.content ~ '\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    Assistant:
{%- endif -%}
"""
"""edgemoe's template for a model without `tokenizer.chat_template`.

edgemoe's shipped tiny models (models/README.md) were trained on plain English prose with no
chat tuning, so no format is native to them: this one only frames a prompt as a transcript in
prose would. System text is a leading paragraph, then one `User: ...` or `Assistant: ...` line
per turn, ending with `Assistant:` (no trailing space: a GPT-2-style BPE puts the space in
front of the next word). A model that goes on to write the next `User:` line has finished its
turn, hence PLAIN_STOP.
"""
PLAIN_STOP = ("\nUser:",)

_TEMPLATE_KEY = "tokenizer.chat_template"
_ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI content-part types -> what the error calls them
_PART_KINDS = {"image_url": "image", "input_image": "image", "input_audio": "audio", "file": "file"}


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _raise_exception(message):
    # templates call this to refuse a chat (e.g. a system role); render() turns it into ChatTemplateError
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters and sorts keys; transformers' does neither
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # transformers' settings; templates are untrusted code from the model file, hence the sandbox
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(_one_line(f"chat template: syntax error at line {e.lineno}: {e.message}")) from None


def _content_text(content, where: str, role: str) -> str:
    """A message's content as one string: OpenAI text parts joined by newlines, as llama.cpp does."""
    if isinstance(content, str):
        return content
    if content is None:
        if role != "assistant":
            raise InvalidArgumentError(f"{where}: null is allowed only in an assistant message")
        return ""  # llama.cpp renders an absent content as an empty one
    if not isinstance(content, list):
        raise InvalidArgumentError(f"{where}: expected a string, a list of text parts or null, "
                                   f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidArgumentError(f"{where}[{j}]: expected an object with a type")
        kind = part["type"]
        if kind != "text":
            raise InvalidArgumentError(f"{where}: {_PART_KINDS.get(kind, repr(kind))} parts are not supported")
        if not isinstance(part.get("text"), str):
            raise InvalidArgumentError(f"{where}[{j}].text: expected a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _validate(messages) -> list[dict]:
    """Checked copies of the messages with only `role` and a string `content`, which is all a
    template is given (no tools, so no tool calls)."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(f"messages: expected a list, got {type(messages).__name__}")
    if not messages:
        raise InvalidArgumentError("messages: empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgumentError(f"{where}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidArgumentError(f"{where}.role: " + ("missing" if role is None else "expected a string"))
        if role not in _ROLES:
            raise InvalidArgumentError(f"{where}.role: unknown role {role!r} (one of {', '.join(_ROLES)})")
        if "content" not in m and role != "assistant":
            raise InvalidArgumentError(f"{where}.content: missing")
        out.append({"role": role, "content": _content_text(m.get("content"), f"{where}.content", role)})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template.

    source is "gguf" for a model's own template (or one given as a string) and "plain" for
    PLAIN_TEMPLATE. stop holds stop strings the template implies; a GGUF template's end of turn
    is an end-of-generation token in llama.cpp, so it needs none.
    """

    template: str
    bos_token: str = ""
    eos_token: str = ""
    source: str = "gguf"
    stop: tuple[str, ...] = ()
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_compiled", _compile(self.template))

    @classmethod
    def from_string(cls, template: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """Compiles `template`; raises ChatTemplateError on a syntax error."""
        if not isinstance(template, str):
            raise InvalidArgumentError(f"chat template: expected a string, got {type(template).__name__}")
        if template == PLAIN_TEMPLATE:
            return cls(template, bos_token, eos_token, source="plain", stop=PLAIN_STOP)
        return cls(template, bos_token, eos_token)

    @classmethod
    def from_model(cls, model_path) -> "ChatTemplate":
        """The template of the GGUF at `model_path`, with its BOS/EOS token text; PLAIN_TEMPLATE
        when it has none.

        Raises:
            EdgemoeIOError, ModelFormatError: the file cannot be read as a GGUF.
            ChatTemplateError: its template does not compile.
        """
        # the vocabulary is left undecoded unless the template needs a token's text
        header = read_header(model_path, check_data=False, string_arrays=False)
        template = header.get(_TEMPLATE_KEY)
        if template is None or template == "":
            return cls.from_string(PLAIN_TEMPLATE)
        if not isinstance(template, str):
            raise ModelFormatError(f"{header.path}: {_TEMPLATE_KEY} is not a string")
        bos = eos = ""
        if "bos_token" in template or "eos_token" in template:
            kv = read_header(model_path, check_data=False).kv
            tokens = kv.get("tokenizer.ggml.tokens")
            tokens = tokens if isinstance(tokens, list) else []

            def text(key):  # llama.cpp gives a missing special token as ""
                tid = kv.get(key)
                return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

            bos, eos = text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id")
        return cls.from_string(template, bos, eos)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`, ending with the assistant's turn header when
        `add_generation_prompt`.

        Raises:
            InvalidArgumentError: malformed messages (the message names the field).
            ChatTemplateError: the template refused the chat or failed.
        """
        chat = _validate(messages)
        try:
            return self._compiled.render(messages=chat, add_generation_prompt=bool(add_generation_prompt),
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=None)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise ChatTemplateError(_one_line(f"chat template: {e.message or type(e).__name__}")) from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:  # e.g. 'a' + none in the template
            raise ChatTemplateError(_one_line(f"chat template: {type(e).__name__}: {e}")) from None
