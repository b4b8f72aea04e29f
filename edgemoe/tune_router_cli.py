"""`edgemoe tune-router SRC -o OUT --text FILE`: the click command over edgemoe.tune."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from edgemoe.errors import CliError, EdgemoeError
from edgemoe.tune.options import DEVICES, DTYPES, TuneOptions

NEEDS_TORCH = "edgemoe tune-router needs torch: pip install 'edgemoe[tune]'"
_D = TuneOptions()


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise CliError(NEEDS_TORCH) from None


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Progress:
    """A progress line on stderr: redrawn in place on a terminal, one line per tenth of the
    steps otherwise (a log)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()

    def __call__(self, s) -> None:
        if not self.tty and s.step != s.steps and s.step % max(1, s.steps // 10):
            return
        rate = s.tokens / s.seconds if s.seconds > 0 else 0.0
        eta = s.seconds / s.step * (s.steps - s.step)
        line = (f"step {s.step}/{s.steps}  loss {s.loss:.3f}  ce {s.ce:.3f}  kl {s.kl:.4f}  "
                f"locality {s.locality:.3f}  hit {s.hit:.3f}  alpha {s.alpha:.2f}  {rate:.0f} tok/s  "
                f"eta {_duration(eta)}")
        if self.tty:
            click.echo(f"\r{line}\x1b[K", err=True, nl=s.step == s.steps)
        else:
            click.echo(line, err=True)


@click.command("tune-router")
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="OUT",
              help="The tuned model: a GGUF for a GGUF SRC, a checkpoint directory for a checkpoint.")
@click.option("--text", "text", required=True, metavar="FILE", help="Training text, UTF-8 (.txt or .txt.xz).")
@click.option("--steps", type=int, default=_D.steps, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="AdamW learning rate of the gates.")
@click.option("--alpha", type=float, default=_D.alpha, show_default=True,
              help="Weight of the locality term (reached after --warmup).")
@click.option("--lam", type=float, default=_D.lam, show_default=True,
              help="Weight of the KL anchor to the frozen gate.")
@click.option("--window", type=int, default=_D.window, show_default=True,
              help="W: the experts of the last W tokens count as cached.")
@click.option("--gguf", "gguf_out", default=None, metavar="OUT.gguf",
              help="Also convert the tuned checkpoint to this GGUF (checkpoint SRC only).")
@click.option("--warmup", type=float, default=_D.warmup, show_default=True,
              help="Share of the steps over which alpha rises from 0.")
@click.option("--ctx", type=int, default=_D.ctx, show_default=True, help="Tokens per training window.")
@click.option("--batch", type=int, default=_D.batch, show_default=True, help="Windows per step.")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of the window order.")
@click.option("--device", type=click.Choice(DEVICES), default=_D.device, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default=_D.dtype, show_default=True,
              help="The frozen weights' type (the gates train in f32).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads for torch (default: torch's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (before/after figures) as JSON.")
def tune_router_command(src: str, out: str, text: str, steps: int, lr: float, alpha: float, lam: float,
                        window: int, gguf_out: Optional[str], warmup: float, ctx: int, batch: int, seed: int,
                        device: str, dtype: str, threads: Optional[int], as_json: bool) -> None:
    """Fine-tune only the routers of SRC so that tokens reuse recently used experts (ReMoE).

    SRC is a GGUF or a Hugging Face checkpoint (qwen3_moe, qwen2_moe, olmoe, mixtral,
    deepseek_v2). The
    loss is next-token CE + LAM * KL(tuned gate || frozen gate) + alpha(t) * a locality term
    that pulls each token's top-k onto the experts of the last W tokens (docs/remoe.md).
    OUT is SRC with only the gate tensors changed, in the same layout; inference is unchanged.
    """
    _require_torch()
    from edgemoe.tune import tune_router

    opts = TuneOptions(steps=steps, lr=lr, alpha=alpha, lam=lam, window=window, warmup=warmup, ctx=ctx,
                       batch=batch, seed=seed, device=device, dtype=dtype, threads=threads)
    try:
        result = tune_router(src, out, text, opts, gguf_out=gguf_out, progress=_Progress(),
                             notice=lambda line: click.echo(line, err=True))
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None
    b, a = result.before, result.after
    also = f" and {result.gguf_out}" if result.gguf_out else ""
    click.echo(f"wrote {result.out}{also}: {result.arch}, {result.n_moe_layers} MoE layers, {result.steps} steps on "
               f"{result.trained_tokens:,} tokens in {_duration(result.seconds)} ({result.device}); on "
               f"{b.tokens:,} tokens of the text: EOR {b.eor:.3f} -> {a.eor:.3f}, hit rate (window {window}) "
               f"{b.hit:.3f} -> {a.hit:.3f}, perplexity {b.ppl:.2f} -> {a.ppl:.2f}", err=True)
    if as_json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
