"""edgemoe.chat_template: real models' templates render exactly as transformers renders them,
the plain template's format, GGUF reading, and every refusal as a typed one-line error."""

from __future__ import annotations

import copy
import pathlib
from datetime import datetime

import gguf
import jinja2
import pytest

from edgemoe.chat_template import PLAIN_TEMPLATE, ChatTemplate
from edgemoe.errors import ChatTemplateError, InvalidArgumentError, ModelFormatError

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "edgemoe-tiny-q8_0.gguf"

# Qwen2-7B-Instruct (ChatML with a default system turn)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# DeepSeek-V2-Lite-Chat (tokenizer_config.json)
DEEPSEEK_V2 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# gemma-7b-it: refuses a system turn and non-alternating roles
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# the features transformers adds to jinja: its tojson, loop controls, namespace, strftime_now
FEATURES = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{%- for m in messages -%}\n"
    "    {%- if m.role == 'system' %}{% continue %}{% endif -%}\n"
    "    {%- set ns.n = ns.n + 1 -%}\n"
    "    {{ m | tojson }}\n"
    "    {{ m | tojson(indent=2, sort_keys=true) }}\n"
    "    {%- if ns.n == 2 %}{% break %}{% endif %}\n"
    "{% endfor -%}\n"
    "{{ tools | tojson }} {{ strftime_now('%Y') }}"
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant"}
CHAT = [
    {"role": "user", "content": "Hello <b>&</b> café"},
    {"role": "assistant", "content": "   Hi there, naïve one   "},
    {"role": "user", "content": "Who are you?\nSay it in 日本語."},
]


def transformers_render(template, messages, add_generation_prompt, bos_token="", eos_token=""):
    """The reference: transformers' apply_chat_template rendering (a test extra)."""
    tcu = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = tcu.render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)
    return rendered[0]


TEMPLATES = {
    "qwen2": (QWEN2, "", ""),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"),
    "deepseek-v2": (DEEPSEEK_V2, DEEPSEEK_BOS, DEEPSEEK_EOS),
    "gemma": (GEMMA, "<bos>", "<eos>"),
    "features": (FEATURES, "", ""),
}
# gemma refuses a system turn (tested below)
CASES = [(name, system) for name in TEMPLATES for system in (False, True) if not (name == "gemma" and system)]


@pytest.mark.parametrize("name,system", CASES, ids=[f"{n}{'-system' if s else ''}" for n, s in CASES])
@pytest.mark.parametrize("gen", [False, True], ids=["continue", "gen"])
def test_renders_exactly_as_transformers(name, system, gen):
    template, bos, eos = TEMPLATES[name]
    messages = ([SYSTEM] if system else []) + CHAT
    before = copy.deepcopy(messages)
    t = ChatTemplate.from_string(template, bos, eos)
    assert (t.source, t.stop) == ("gguf", ())
    got = t.render(messages, add_generation_prompt=gen)
    assert got == transformers_render(template, messages, gen, bos, eos)
    if name != "features":  # the one template that ignores add_generation_prompt
        assert got != t.render(messages, add_generation_prompt=not gen)
    assert messages == before  # the caller's chat is not touched


def test_deepseek_v2_literal():
    # llama.cpp's test-chat-template expectation for this template, with the BOS it is given
    t = ChatTemplate.from_string(DEEPSEEK_V2, DEEPSEEK_BOS, DEEPSEEK_EOS)
    got = t.render([SYSTEM, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                    {"role": "user", "content": "Who are you"}])
    assert got == (DEEPSEEK_BOS + "You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi there"
                   + DEEPSEEK_EOS + "User: Who are you\n\nAssistant:")


def test_features_use_transformers_tojson_and_strftime_now():
    out = ChatTemplate.from_string(FEATURES).render([SYSTEM] + CHAT)
    assert '{"role": "user", "content": "Hello <b>&</b> café"}' in out  # no HTML or ASCII escaping
    assert '{\n  "content": "Hello <b>&</b> café",\n  "role": "user"\n}' in out  # indent, sort_keys
    assert "Who are you" not in out  # {% break %} after two messages
    assert out.endswith(f"null {datetime.now().year}")


@pytest.mark.parametrize("messages,message", [
    ([SYSTEM] + CHAT, "chat template: System role not supported"),
    (CHAT[:1] + CHAT[:1], "chat template: Conversation roles must alternate user/assistant/user/assistant/..."),
])
def test_raise_exception_is_a_chat_template_error(messages, message):
    with pytest.raises(jinja2.TemplateError):  # transformers refuses the same chats
        transformers_render(GEMMA, messages, True)
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate.from_string(GEMMA).render(messages)
    assert str(e.value) == message
    assert isinstance(e.value, InvalidArgumentError)


@pytest.mark.parametrize("template,needle", [
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ nosuch.attr }}", "'nosuch' is undefined"),
    ("{% set _ = messages.append(messages[0]) %}", "unsafe"),   # the environment is immutable
    ("{{ ''.__class__.__mro__ }}", "unsafe"),                  # and sandboxed
])
def test_template_failures_at_render(template, needle):
    t = ChatTemplate.from_string(template)  # compiles: these fail only when rendered
    with pytest.raises(ChatTemplateError) as e:
        t.render(CHAT)
    assert str(e.value).startswith("chat template: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_syntax_error_fails_at_from_string():
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate.from_string("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    assert str(e.value).startswith("chat template: syntax error at line 2: ")
    assert "\n" not in str(e.value)


def test_plain_template():
    t = ChatTemplate.from_string(PLAIN_TEMPLATE)
    assert (t.source, t.stop) == ("plain", ("\nUser:",))
    chat = [{"role": "user", "content": "Who goes there?"},
            {"role": "assistant", "content": "A friend."},
            {"role": "user", "content": "Stand and unfold yourself."}]
    assert t.render(chat, add_generation_prompt=False) == (
        "User: Who goes there?\nAssistant: A friend.\nUser: Stand and unfold yourself.\n")
    assert t.render(chat, add_generation_prompt=True) == (
        "User: Who goes there?\nAssistant: A friend.\nUser: Stand and unfold yourself.\nAssistant:")
    assert t.render([{"role": "system", "content": "A play."}] + chat[:1]) == (
        "A play.\n\nUser: Who goes there?\nAssistant:")
    assert t.render([{"role": "developer", "content": "Terse."}, {"role": "tool", "content": "42"}],
                    add_generation_prompt=False) == "Terse.\n\nTool: 42\n"
    # transformers agrees on edgemoe's own template too
    assert t.render(chat) == transformers_render(PLAIN_TEMPLATE, chat, True)


def test_content_parts_and_null_content():
    t = ChatTemplate.from_string(PLAIN_TEMPLATE)
    chat = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None},
            {"role": "assistant"},
            {"role": "user", "content": []}]
    # text parts join with a newline as in llama.cpp; a null or absent assistant content is empty
    assert t.render(chat, False) == "User: one\ntwo\nAssistant: \nAssistant: \nUser: \n"


def test_from_model_shipped_tiny_model_is_plain():
    t = ChatTemplate.from_model(TINY)
    assert (t.source, t.stop, t.template) == ("plain", ("\nUser:",), PLAIN_TEMPLATE)


def _write_gguf(path, template=None, bos=1, eos=2):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(50)])
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if isinstance(template, str):
        w.add_chat_template(template)
    elif template is not None:
        w.add_uint32(gguf.Keys.Tokenizer.CHAT_TEMPLATE, template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_model_reads_the_gguf_template_and_tokens(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", DEEPSEEK_V2)
    t = ChatTemplate.from_model(path)
    assert (t.source, t.stop, t.bos_token, t.eos_token) == ("gguf", (), "<s>", "</s>")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    assert t.render(chat) == "<s>User: Hi\n\nAssistant: Hello</s>User: Bye\n\nAssistant:"
    assert t.render(chat) == transformers_render(DEEPSEEK_V2, chat, True, "<s>", "</s>")


def test_from_model_edge_cases(tmp_path):
    # no special token ids: their text is empty, as in llama.cpp
    t = ChatTemplate.from_model(_write_gguf(tmp_path / "a.gguf", LLAMA3, bos=None, eos=None))
    assert (t.bos_token, t.eos_token) == ("", "")
    assert ChatTemplate.from_model(_write_gguf(tmp_path / "b.gguf")).source == "plain"
    with pytest.raises(ModelFormatError, match="tokenizer.chat_template is not a string"):
        ChatTemplate.from_model(_write_gguf(tmp_path / "c.gguf", 7))
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate.from_model(_write_gguf(tmp_path / "d.gguf", "{% if %}"))


U = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("messages,message", [
    ("hi", "messages: expected a list, got str"),
    ([], "messages: empty"),
    ([U, "hi"], "messages[1]: expected an object, got str"),
    ([{"content": "hi"}], "messages[0].role: missing"),
    ([{"role": 3, "content": "hi"}], "messages[0].role: expected a string"),
    ([U, {"role": "bot", "content": "hi"}],
     "messages[1].role: unknown role 'bot' (one of system, user, assistant, tool, developer)"),
    ([{"role": "user"}], "messages[0].content: missing"),
    ([{"role": "system", "content": None}], "messages[0].content: null is allowed only in an assistant message"),
    ([{"role": "user", "content": 5}], "messages[0].content: expected a string, a list of text parts or null, got int"),
    ([U, U, {"role": "user", "content": [{"type": "text", "text": "look"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[2].content: image parts are not supported"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content: audio parts are not supported"),
    ([{"role": "user", "content": [{"type": "video"}]}], "messages[0].content: 'video' parts are not supported"),
    ([{"role": "user", "content": ["text"]}], "messages[0].content[0]: expected an object with a type"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].text: expected a string"),
])
def test_invalid_messages(messages, message):
    with pytest.raises(InvalidArgumentError) as e:
        ChatTemplate.from_string(PLAIN_TEMPLATE).render(messages)
    assert str(e.value) == message
    assert not isinstance(e.value, ChatTemplateError)
