"""`edgemoe run`: stream a completion, optionally with the expert cache, and report stats;
with -i, a chat in the terminal (edgemoe.chat_session, the template code `serve` uses)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from typing import Optional

import click
from click.core import ParameterSource

from edgemoe.budget import parse_budget
from edgemoe.cache_options import cache_options
from edgemoe.errors import CliError, EdgemoeError
from edgemoe.files import discard, publish, temp_beside
from edgemoe.interrupt import held, interruptible_command

# What --stats prints, in this order; --stats-json writes every scalar of EngineStats and the
# per-layer list. The *_per_token lines split a decode step (docs/cache.md, "Where the time goes").
STATS_FIELDS = ("ttft_ms", "tpot_ms", "tokens_per_s", "hit_rate", "hits", "misses",
                "bytes_read", "stall_ms", "peak_rss_bytes", "compute_ms_per_token", "stall_ms_per_token",
                "cache_ms_per_token", "predict_ms_per_token", "bytes_read_per_token", "cpu_s_per_token",
                "expert_pool")
PREFETCH_FIELDS = ("prefetch_hits_per_token", "prefetch_wasted_per_token", "pred_precision", "pred_recall")
# a model with a readme router: its time, and what loading its routes ahead did
ROUTER_FIELDS = ("router_ms_per_token", "prefetch_hits_per_token", "prefetch_wasted_per_token")


class _JsonOut:
    """Writes a JSON file atomically: a temp file beside the target, renamed when complete.

    The temp file is created up front, so an unwritable path fails before any work.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            raise CliError(f"cannot write --stats-json {path}: is a directory")
        try:
            fd, self._tmp = temp_beside(path)
        except OSError as e:
            raise CliError(f"cannot write --stats-json {path}: {e.strerror or e}") from None
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def commit(self, obj: dict) -> None:
        json.dump(obj, self._file, indent=2)
        self._file.write("\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        publish(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            self._file.close()
            discard(self._tmp)
            self._tmp = None


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.2f}"
    return str(value)


@click.command("run")
@click.option("-m", "--model", "model_path", metavar="FILE", help="GGUF model (default: the built-in model).")
@click.option("-p", "--prompt", default="Once upon a time", show_default=True)
@click.option("-n", "--n-predict", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("-t", "--threads", type=int, default=None, help="Compute threads (default: all CPUs).")
@click.option("-c", "--ctx-size", type=int, default=4096, show_default=True)
@click.option("-b", "--batch-size", type=int, default=512, show_default=True)
@click.option("-ub", "--ubatch-size", type=int, default=512, show_default=True)
@click.option("-ngl", "--n-gpu-layers", type=int, default=0, show_default=True)
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature; 0 is greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@cache_options
@click.option("--lookahead", type=click.IntRange(0, 8), default=1, show_default=True,
              help="Layers ahead whose predicted experts --prefetch lookahead loads (0: the predictions "
                   "only steer eviction).")
@click.option("--prefetch-top", type=click.IntRange(0), default=0, show_default=True,
              help="Predicted experts per token to load, most likely first (0: half of the model's top-k).")
@click.option("--stats", "show_stats", is_flag=True, help="Print timing and cache stats to stderr at the end.")
@click.option("--stats-json", metavar="FILE", default=None, help="Write the stats as one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log.")
@click.option("-i", "--interactive", is_flag=True,
              help="Chat in the terminal with the model's chat template (-p: the first message; /reset, "
                   "/exit; -n, --temp and --seed apply to each reply; --stats: each reply's speed and "
                   "reused prompt tokens). See docs/chat.md.")
@click.option("--system", metavar="TEXT", default=None, help="System prompt of the --interactive chat.")
@click.pass_context
@interruptible_command  # Ctrl-C, SIGTERM: the --stats-json temporary file removed, 130 or 143
def run(ctx: click.Context, model_path: Optional[str], prompt: str, n_predict: int, threads: Optional[int],
        ctx_size: int, batch_size: int, ubatch_size: int, n_gpu_layers: int, temp: float, seed: Optional[int],
        expert_cache: str, policy: str, io: str, prefetch: str, expert_pool: str, repack: bool, hybrid: bool, lookahead: int, prefetch_top: int,
        show_stats: bool, stats_json: Optional[str], verbose: bool, interactive: bool,
        system: Optional[str]) -> None:
    """Generate text from PROMPT, streaming it to stdout; with -i, chat."""
    if system is not None and not interactive:
        raise click.UsageError("--system applies to a chat: add -i (--interactive)")
    if n_predict < 1 and interactive:
        raise click.UsageError("-n must be at least 1 in a chat")
    # in a chat, -p is the first message only where it was given
    first = prompt if ctx.get_parameter_source("prompt") != ParameterSource.DEFAULT else None
    try:
        budget = parse_budget(expert_cache)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    json_out = engine = None
    try:
        if stats_json:
            with held():  # created and recorded at once: an interrupt cannot leave it behind
                json_out = _JsonOut(stats_json)
        from edgemoe.default_model import default_model_path
        from edgemoe.engine import Engine

        if model_path is None:
            model_path = str(default_model_path())
        engine = Engine(model_path, expert_cache=budget, policy=policy, io=io, n_threads=threads,
                        n_ctx=ctx_size, n_batch=batch_size, n_ubatch=ubatch_size,
                        n_gpu_layers=n_gpu_layers, seed=seed, verbose=verbose, prefetch=prefetch,
                        lookahead=lookahead, prefetch_top=prefetch_top, expert_pool=expert_pool,
                        repack=repack, hybrid=hybrid)
        if interactive:
            _chat(engine, model_path, first, system, n_predict, temp, seed, show_stats, json_out)
            return
        out = sys.stdout
        for piece in engine.generate(prompt, max_tokens=n_predict, temperature=temp, seed=seed):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        full = engine.stats()
        stats = full.summary()
        if show_stats:
            if engine.router is not None:
                names = STATS_FIELDS + ROUTER_FIELDS
            else:
                names = STATS_FIELDS + (PREFETCH_FIELDS if prefetch != "off" and engine.cache is not None else ())
            for name in dict.fromkeys(names):
                if name in stats:
                    click.echo(f"{name}: {_format(stats[name])}", err=True)
        if json_out is not None:
            json_out.commit(dict(stats, layers=[asdict(layer) for layer in full.layers]))
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    finally:
        with held():  # a second Ctrl-C must not cut the cleanup short
            if json_out is not None:
                json_out.discard()
            if engine is not None:
                engine.close()


# -- run -i ----------------------------------------------------------------------------

CHAT_COMMANDS = ("/reset", "/exit")  # forget the chat (the system prompt stays); quit, as Ctrl-D does


def _chat(engine, model_path: str, first: Optional[str], system: Optional[str], n_predict: int, temp: float,
          seed: Optional[int], show_stats: bool, json_out: Optional[_JsonOut]) -> None:
    """The chat loop: a line of stdin is a user message or a command; each reply streams to
    stdout, followed by a blank line. The `> ` prompt shows where stdin is a terminal."""
    from edgemoe.chat_session import ChatSession
    from edgemoe.chat_template import ChatTemplate
    from edgemoe.errors import ContextFullError, InvalidArgumentError
    from edgemoe.generator import SamplingOptions

    session = ChatSession(engine, ChatTemplate.from_model(model_path), system=system,
                          options=SamplingOptions(max_tokens=n_predict, temperature=temp, seed=seed))
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    out = sys.stdout
    turns = []
    pending = first
    while True:
        if pending is not None:
            line, pending = pending, None
            if tty:
                out.write(f"> {line}\n")
        else:
            try:
                line = input("> " if tty else "")
            except EOFError:  # Ctrl-D, or the end of piped input
                if tty:
                    out.write("\n")
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: exit 130, as run does
                if tty:
                    out.write("\n")
                    out.flush()
                raise
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command == "/exit":
                break
            if command == "/reset":
                session.reset()
                click.echo("edgemoe: chat cleared", err=True)
            else:
                click.echo(f"edgemoe: unknown command {command} ({', '.join(CHAT_COMMANDS)})", err=True)
            continue

        def on_text(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            with _sigint_cancels(session):
                session.send(text, on_text)
        except (ContextFullError, InvalidArgumentError) as e:
            # this turn cannot be: the chat goes on without it
            hint = "; /reset starts a new chat" if isinstance(e, ContextFullError) else ""
            CliError(f"{e}{hint}").show()
            continue
        out.write("\n\n")
        out.flush()
        turn = session.last_turn
        turns.append(turn.as_dict())
        if show_stats:
            click.echo(f"turn {len(turns)}: " + " ".join(
                f"{name}={_format(value)}" for name, value in turn.as_dict().items()), err=True)
    full = engine.stats()
    stats = {name: value for name, value in full.summary().items() if name not in _GENERATE_ONLY}
    if show_stats:
        names = ("hit_rate", "hits", "misses", "bytes_read", "stall_ms") if engine.cache is not None else ()
        for name in names + ("peak_rss_bytes",):
            click.echo(f"{name}: {_format(stats[name])}", err=True)
    if json_out is not None:
        json_out.commit(dict(stats, turns=turns, layers=[asdict(layer) for layer in full.layers]))


# EngineStats fields that time Engine.generate(), which a chat does not use (its turns carry their own)
_GENERATE_ONLY = ("ttft_ms", "tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "tokens_per_s", "n_prompt_tokens",
                  "n_generated")


@contextmanager
def _sigint_cancels(session):
    """While a reply streams, Ctrl-C stops it (the chat goes on) instead of raising
    KeyboardInterrupt inside a decode step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: session.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
