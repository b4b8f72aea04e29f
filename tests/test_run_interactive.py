"""`edgemoe run -i`: the chat loop in subprocesses driven through a pipe, and ChatSession in-process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import N_THREADS, REPO, assert_one_line_error, needs_llama

MODEL = REPO / "models" / "edgemoe-tiny-q8_0.gguf"
ARGS = ["-m", str(MODEL), "--temp", "0", "-n", "12", "--expert-cache", "off", "-t", str(N_THREADS)]

pytestmark = [needs_llama, pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not found")]

TURN = re.compile(r"^turn (\d+): (.*)$", re.M)


def _chat(lines, env, *extra):
    return subprocess.run([sys.executable, "-m", "edgemoe", "run", "-i", *ARGS, "--stats", *extra],
                          input="".join(f"{line}\n" for line in lines), env=env, capture_output=True,
                          text=True, timeout=60)


def _turns(stderr: str) -> list:
    """The --stats line of each turn, as a dict of its name=value fields."""
    turns = []
    for n, fields in TURN.findall(stderr):
        assert int(n) == len(turns) + 1, stderr
        turns.append({k: v for k, v in (f.split("=", 1) for f in fields.split())})
    return turns


@pytest.fixture(scope="module")
def engine():
    from edgemoe.engine import Engine

    with Engine(MODEL, n_threads=N_THREADS) as eng:
        yield eng


@pytest.fixture(scope="module")
def template():
    from edgemoe.chat_template import ChatTemplate

    return ChatTemplate.from_model(MODEL)


def _session(engine, template, **kw):
    from edgemoe.chat_session import ChatSession
    from edgemoe.generator import SamplingOptions

    return ChatSession(engine, template, options=SamplingOptions(max_tokens=12, temperature=0), **kw)


# -- the command -------------------------------------------------------------------------


def test_two_turns_reuse_the_history(edgemoe_env, engine, template):
    proc = _chat(["Hello there", "What is your name?"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # the same chat in-process: the replies, each followed by a blank line, and nothing else
    session = _session(engine, template)
    replies = [session.send("Hello there"), session.send("What is your name?")]
    assert all(replies), replies
    assert proc.stdout == "".join(f"{r}\n\n" for r in replies)
    first, second = _turns(proc.stderr)
    assert int(first["completion_tokens"]) > 0 and int(second["completion_tokens"]) > 0
    # the second prompt starts with the first prompt and reply: their KV was kept, not re-evaluated
    assert int(second["cached_tokens"]) >= int(first["prompt_tokens"]) > 0
    assert float(second["tokens_per_s"]) > 0


def test_reset_and_unknown_command(edgemoe_env, engine, template):
    from edgemoe.chat_session import chat_prompt_tokens

    proc = _chat(["Hello there", "What is your name?", "/frobnicate now", "", "/reset", "Good morning", "/exit",
                  "never sent"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    turns = _turns(proc.stderr)
    assert len(turns) == 3, proc.stderr  # the blank line is skipped, nothing after /exit is read
    notices = [line for line in proc.stderr.splitlines() if "/frobnicate" in line]
    assert len(notices) == 1 and notices[0].startswith("edgemoe: unknown command /frobnicate"), proc.stderr
    assert "edgemoe: chat cleared" in proc.stderr
    # after /reset the prompt holds only the new message: the old turns are neither sent nor reused
    fresh = chat_prompt_tokens(engine, template, [{"role": "user", "content": "Good morning"}])
    assert int(turns[2]["prompt_tokens"]) == len(fresh)
    assert int(turns[2]["cached_tokens"]) < min(int(turns[1]["cached_tokens"]), len(fresh))
    assert proc.stdout.count("\n\n") >= 3


def test_prompt_is_the_first_message_and_system_prompt(edgemoe_env, tmp_path, engine, template):
    out = tmp_path / "chat.json"
    proc = _chat([], edgemoe_env, "-p", "Hello there", "--system", "A play in one act.", "--stats-json", str(out))
    assert proc.returncode == 0, proc.stderr
    session = _session(engine, template, system="A play in one act.")
    assert proc.stdout == session.send("Hello there") + "\n\n"
    stats = json.loads(out.read_text())
    assert [t["prompt_tokens"] for t in stats["turns"]] == [session.last_usage.prompt_tokens]


def test_ctrl_c_at_the_prompt_exits_130(edgemoe_env):
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", "-i", *ARGS], env=edgemoe_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("Hello there\n")
        proc.stdin.flush()
        seen = ""
        while not seen.endswith("\n\n"):  # the reply and its blank line: the loop reads again
            char = proc.stdout.read(1)
            assert char, proc.stderr.read()
            seen += char
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("edgemoe: aborted")


def test_usage_errors_are_one_line(edgemoe_env):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "edgemoe", "run", *args], env=edgemoe_env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert_one_line_error(run("-m", str(MODEL), "--system", "x"), "--system")
    assert_one_line_error(run("-i", "-m", str(MODEL), "-n", "0"), "-n")
    assert_one_line_error(run("-i", "-m", "/nonexistent/model.gguf"))


# -- ChatSession -------------------------------------------------------------------------


def test_first_reply_is_generate_on_the_rendered_prompt(engine, template):
    from edgemoe.chat_session import chat_prompt_tokens

    messages = [{"role": "user", "content": "Hello there"}]
    rendered = template.render(messages)
    assert rendered == "User: Hello there\nAssistant:"
    assert chat_prompt_tokens(engine, template, messages) == engine.tokenize(rendered)
    expected = "".join(engine.generate(rendered, max_tokens=12, temperature=0))
    expected = expected.split(template.stop[0])[0].strip()  # the template's stop string ends the reply

    session = _session(engine, template)
    pieces = []
    reply = session.send("Hello there", pieces.append)
    assert reply == expected and "".join(pieces) == reply
    assert session.last_usage.prompt_tokens == len(engine.tokenize(rendered))
    assert session.last_usage.cached_tokens == 0
    assert session.messages[:-1] == messages and session.messages[-1]["role"] == "assistant"
    assert session.messages[-1]["content"].strip() == reply  # kept as generated, returned trimmed

    turn1 = session.last_usage
    reply2 = session.send("And then?")
    n_first = len(engine.tokenize(rendered))
    assert session.last_usage.cached_tokens >= n_first  # the history was not evaluated again
    assert session.last_usage.prompt_tokens == len(chat_prompt_tokens(engine, template, session.messages[:-1]))
    assert session.messages[-1]["content"].strip() == reply2
    # the whole first turn was reused, the reply included: every token it generated but the
    # last, which was sampled and never decoded
    assert session.last_usage.cached_tokens >= turn1.prompt_tokens + turn1.completion_tokens - 1

    session.reset()
    assert session.messages == []
    session.send("Hello there")
    assert session.last_usage.prompt_tokens == n_first  # only the new message


def test_cancel_keeps_the_partial_reply(engine, template):
    from edgemoe.generator import SamplingOptions

    session = _session(engine, template)
    session.options = SamplingOptions(max_tokens=64, temperature=0)
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 2:
            session.cancel()

    reply = session.send("Tell me a long story", on_text)
    assert session.last_turn.finish_reason == "cancelled"
    assert reply == "".join(seen) and session.last_usage.completion_tokens < 64
    assert session.messages[-1]["content"].strip() == reply
    session.send("Go on")  # the chat goes on, over the kept prefix
    assert session.last_usage.cached_tokens > 0 and session.last_turn.finish_reason in ("stop", "length")


def test_sigint_during_a_reply_stops_only_the_reply(engine, template):
    """What run -i installs around a reply: Ctrl-C cancels it and raises nothing."""
    from edgemoe.generator import SamplingOptions
    from edgemoe.run import _sigint_cancels

    session = _session(engine, template)
    session.options = SamplingOptions(max_tokens=64, temperature=0)
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with _sigint_cancels(session):
        session.send("Tell me a long story", on_text)
    assert signal.getsignal(signal.SIGINT) is before
    assert session.last_turn.finish_reason == "cancelled"


def test_on_text_failure_is_raised_and_the_chat_unchanged(engine, template):
    session = _session(engine, template)

    def on_text(piece):
        raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        session.send("Hello there", on_text)
    assert session.messages == []
    assert session.send("Hello there")  # the generator is still usable


def test_system_prompt_and_bos(template):
    from edgemoe.chat_session import ChatSession, chat_prompt_tokens
    from edgemoe.chat_template import ChatTemplate

    class Tokenizer:
        def tokenize(self, text, add_special=True, parse_special=False):
            self.call = (text, add_special, parse_special)
            return [1, 2, 3]

    tok = Tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt_tokens(tok, template, msgs) == [1, 2, 3]
    assert tok.call == ("Be brief.\n\nUser: Hi\nAssistant:", True, True)
    with_bos = ChatTemplate.from_string("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                                        bos_token="<s>")
    chat_prompt_tokens(tok, with_bos, msgs)
    assert tok.call == ("<s>Be brief.Hi", False, True)  # the template wrote the BOS: none added

    class NoEngine:  # what the session needs of an engine before any reply
        n_parallel, n_ctx_seq, cache, router = 1, 64, None, None

    session = ChatSession(NoEngine(), template, system="Be brief.")
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_trim_passes_the_reply_as_kept():
    from edgemoe.chat_session import _Trim

    pieces = [" ", " Hi", " there", " \n", "", "!", "  "]
    out = []
    trim = _Trim(out.append)
    for p in pieces:
        trim.feed(p)
    assert "".join(out) == trim.text == "".join(pieces).strip()
