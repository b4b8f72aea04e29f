"""`edgemoe synth`: a random-weight GGUF in the shape of a real MoE model (edgemoe.shapes)."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import click

from edgemoe.budget import format_bytes
from edgemoe.errors import EdgemoeError
from edgemoe.errors import CliError
from edgemoe.shapes import SHAPES, get_shape, synth_config
from edgemoe.synth import TYPES, plan, write_model


def _describe(cfg, n_vocab: int, specs) -> str:
    expert = sum(s.nbytes for s in specs if s.name.endswith("_exps.weight"))
    total = sum(s.nbytes for s in specs)
    moe_layers = cfg.n_layer - cfg.n_dense_lead
    return (f"{cfg.arch}, {cfg.n_layer} layers ({moe_layers} MoE), n_embd {cfg.n_embd}, "
            f"{cfg.n_head}/{cfg.n_head_kv} heads of {cfg.n_embd_head}, {cfg.n_expert} experts "
            f"(top-{cfg.n_expert_used}) of width {cfg.n_ff_exp}, {cfg.expert_type} experts, vocab {n_vocab}: "
            f"{format_bytes(total)} of tensors, experts {100.0 * expert / total:.1f} %")


def _list(scale: float, overrides: dict) -> None:
    for name, shape in SHAPES.items():
        cfg = synth_config(shape, scale, **overrides)
        try:
            n_vocab, specs = plan(cfg)
        except (ValueError, EdgemoeError) as e:
            click.echo(f"{name}: {e}")
            continue
        click.echo(f"{name} ({shape.model}): {_describe(cfg, n_vocab, specs)}")


@click.command("synth")
@click.option("--shape", "shape_name", metavar="NAME", help=f"One of: {', '.join(SHAPES)}.")
@click.option("-o", "--output", metavar="OUT.gguf", help="The GGUF to write (replaced atomically).")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="0 < F <= 1: layers x F, heads and widths x about F (see models/shapes.md).")
@click.option("--expert-type", type=click.Choice(list(TYPES), case_sensitive=False), default=None,
              help="ggml type of the routed experts (default: the shape's, Q4_0).")
@click.option("--weight-type", type=click.Choice(list(TYPES), case_sensitive=False), default=None,
              help="ggml type of attention, shared-expert and dense matrices (default: Q8_0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--align", type=int, default=4096, show_default=True,
              help="GGUF data alignment (4096 puts page-sized expert slices on page boundaries).")
@click.option("--router-skew", type=float, default=0.0, show_default=True,
              help="Per-layer expert preference, in router-logit standard deviations (0: none).")
@click.option("--vocab", metavar="FILE", default=None, help="Vocab GGUF to copy the tokenizer from "
              "(default: the shape's, from edgemoe's vocab directory).")
@click.option("-t", "--threads", type=int, default=None, help="Threads drawing random data (default: all CPUs).")
@click.option("--list", "list_shapes", is_flag=True, help="Describe every shape at --scale and exit.")
def synth_command(shape_name: Optional[str], output: Optional[str], scale: float, expert_type: Optional[str],
                  weight_type: Optional[str], seed: int, align: int, router_skew: float, vocab: Optional[str],
                  threads: Optional[int], list_shapes: bool) -> None:
    """Write a random-weight MoE model in the shape of a real one, with its real tokenizer.

    Deterministic: the same options give the same bytes.
    """
    if not 0 < scale <= 1:
        raise CliError(f"--scale must be in (0, 1], got {scale:g}")
    if threads is not None and threads < 1:
        raise CliError("--threads must be at least 1")
    if router_skew < 0:
        raise CliError("--router-skew must be >= 0")
    overrides = dict(seed=seed, alignment=align, router_skew=router_skew)
    if expert_type:
        overrides["expert_type"] = expert_type.upper()
    if weight_type:
        overrides["weight_type"] = weight_type.upper()
    if vocab:
        if not os.path.isfile(vocab):
            raise CliError(f"vocab file not found: {vocab}")
        overrides["vocab"] = vocab
    if list_shapes:
        _list(scale, overrides)
        return
    if not shape_name or not output:
        raise CliError("--shape and -o/--output are required (or --list)")
    try:
        shape = get_shape(shape_name)
        cfg = synth_config(shape, scale, **overrides)
        if not os.path.isfile(cfg.vocab):
            raise CliError(f"vocab file not found: {cfg.vocab} (set EDGEMOE_VOCAB_DIR or pass --vocab)")
        n_vocab, specs = plan(cfg)
    except (ValueError, EdgemoeError) as e:
        raise CliError(str(e)) from None
    if os.path.isdir(output):
        raise CliError(f"cannot write {output}: is a directory")
    if os.path.exists(output) and os.path.samefile(output, cfg.vocab):
        raise CliError(f"{output} is the vocab file the tokenizer is read from; choose another output")

    total = sum(s.nbytes for s in specs)
    bar = None
    if sys.stderr.isatty():
        bar = click.progressbar(length=total, label=f"writing {os.path.basename(output)}", file=sys.stderr)
    start = time.perf_counter()
    try:
        if bar is not None:
            with bar:
                write_model(output, cfg, n_threads=threads, progress=bar.update)
        else:
            write_model(output, cfg, n_threads=threads)
    except (ValueError, EdgemoeError) as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {output}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None
    elapsed = time.perf_counter() - start
    size = os.path.getsize(output)
    click.echo(f"wrote {output} ({format_bytes(size)}, {elapsed:.1f} s): {_describe(cfg, n_vocab, specs)}")
