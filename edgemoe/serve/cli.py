"""`edgemoe serve`: the click command. Loads the model, then hands it to uvicorn (server.py)."""

from __future__ import annotations

import os
from typing import Optional

import click

from edgemoe.budget import parse_budget
from edgemoe.cache_options import cache_options
from edgemoe.errors import CliError, EdgemoeError

PER_SEQUENCE_CTX = 2048  # -c's default is this times --parallel


@click.command("serve")
@click.option("-m", "--model", "model_path", metavar="FILE", help="GGUF model (default: the built-in model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless told otherwise; 0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0: any free one; the ready line names it).")
@click.option("-np", "--parallel", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Sequences decoded together; more requests wait in the queue.")
@click.option("-c", "--ctx-size", type=click.IntRange(1), default=None,
              help=f"Total context, split evenly among the sequences (default: {PER_SEQUENCE_CTX} per sequence).")
@click.option("-b", "--batch-size", type=click.IntRange(1), default=512, show_default=True)
@click.option("-t", "--threads", type=int, default=None, help="Compute threads (default: all CPUs).")
@click.option("-ngl", "--n-gpu-layers", type=int, default=0, show_default=True)
@cache_options
@click.option("--schedule", type=click.Choice(["fifo", "expert"]), default="expert", show_default=True,
              help="Which ready sequences share a decode step when more are ready than --step-seqs: expert "
                   "takes those whose next experts overlap or are loaded; fifo takes them in turn.")
@click.option("--step-seqs", type=click.IntRange(0), default=0, show_default=True,
              help="Sequences one decode step takes (0: every ready one, as llama-server). Below --parallel "
                   "the schedule chooses; a small expert cache gains from it (BENCHMARKS.md).")
@click.option("--max-wait", type=click.IntRange(0), default=4, show_default=True,
              help="Steps a sequence may be passed over by --schedule expert before it goes regardless.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait for a sequence; beyond, 503 with Retry-After.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds running requests may take to finish after SIGTERM/SIGINT before they are cancelled.")
@click.option("--seed", type=int, default=None, help="Sampling seed of requests without one (default: random).")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log and every request.")
def serve_command(model_path: Optional[str], host: str, port: int, parallel: int, ctx_size: Optional[int],
                  batch_size: int, threads: Optional[int], n_gpu_layers: int, expert_cache: str, policy: str, io: str,
                  prefetch: str, expert_pool: str, repack: bool, hybrid: bool, schedule: str, step_seqs: int, max_wait: int, max_queue: int, shutdown_timeout: float, seed: Optional[int],
                  verbose: bool) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    try:
        budget = parse_budget(expert_cache)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    from edgemoe.serve.server import bind, serve, url_of

    try:
        sock = bind(host, port)
    except OSError as e:
        raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    engine = runtime = None
    try:
        from edgemoe.default_model import default_model_path
        from edgemoe.engine import Engine
        from edgemoe.generator import BatchGenerator
        from edgemoe.serve.app import create_app
        from edgemoe.serve.runtime import Runtime

        if model_path is None:
            model_path = str(default_model_path())
        engine = Engine(model_path, expert_cache=budget, policy=policy, io=io, prefetch=prefetch, n_threads=threads,
                        n_ctx=ctx_size or PER_SEQUENCE_CTX * parallel, n_batch=batch_size, seed=seed,
                        n_parallel=parallel, verbose=verbose, n_gpu_layers=n_gpu_layers, expert_pool=expert_pool, repack=repack,
                        hybrid=hybrid)
        template = _chat_template(model_path)
        generator = BatchGenerator(engine, schedule=schedule, max_queue=max_queue, max_wait=max_wait,
                                   step_seqs=step_seqs or None)
        runtime = Runtime(engine, generator, template, shutdown_timeout=shutdown_timeout)
        runtime.start()
        url = url_of(sock)

        def ready() -> None:
            click.echo(f"edgemoe: serving {model_path} on {url} ({generator.n_parallel} sequences)", err=True)

        if not serve(create_app(runtime), runtime, sock, ready, verbose=verbose):
            raise CliError("the server did not start")
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:  # during the load, before the server handles signals
        raise click.exceptions.Abort() from None
    finally:
        sock.close()
        if runtime is not None:
            runtime.stop()  # where the server never started, or its lifespan did not run to the end
        if engine is not None:
            engine.close()


def _chat_template(model_path: str):
    """The model's chat template, or None (with a notice) where it has none usable."""
    from edgemoe.chat_template import ChatTemplate

    try:
        return ChatTemplate.from_model(model_path)
    except EdgemoeError as e:
        click.echo(f"edgemoe: notice: {os.path.basename(model_path)}: no chat template ({e}); "
                   f"/v1/chat/completions answers 400", err=True)
        return None
