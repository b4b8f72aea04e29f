"""`edgemoe convert SRC -o OUT.gguf`: the click command over edgemoe.convert.convert()."""

from __future__ import annotations

from typing import Optional

import click

from edgemoe.errors import EdgemoeError
from edgemoe.errors import CliError
from edgemoe.interrupt import interruptible_command


@click.command("convert")
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="OUT.gguf", help="The GGUF to write.")
@click.option("--router", metavar="FILE", default=None,
              help="Router file (GGUF or safetensors, docs/router-format.md) to embed.")
@click.option("--outtype", metavar="TYPE", default=None,
              help="f32, f16, bf16 or a llama.cpp quantization (q8_0, q4_k_m, ...); default: keep.")
@click.option("--align", type=int, default=4096, show_default=True, metavar="BYTES",
              help="Data alignment; expert slices of whole pages then start on page boundaries.")
@click.option("-t", "--threads", type=int, default=None, help="Quantization threads (default: all CPUs).")
@interruptible_command  # Ctrl-C, SIGTERM: the temporary files beside OUT removed (an OUT there stays)
def convert_command(src: str, out: str, router: Optional[str], outtype: Optional[str], align: int,
                    threads: Optional[int]) -> None:
    """Convert SRC (a GGUF file or a Hugging Face MoE checkpoint directory) to OUT.gguf.

    Tensors and keys of a GGUF source are re-emitted unchanged (bytes and values), aligned to
    --align; a checkpoint (qwen3_moe, qwen2_moe, olmoe, mixtral, deepseek_v2, or a Read-ME
    router-decoupled Llama: docs/readme-checkpoint.md) is converted with its tokenizer, a Read-ME
    one with its router embedded.
    """
    from edgemoe.convert import convert

    try:
        result = convert(src, out, router=router, outtype=outtype.lower() if outtype else None,
                         align=align, n_threads=threads)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    router_note = f", router: {result.router_kind}" if result.router_kind else ""
    click.echo(f"wrote {result.path}: {result.arch}, {result.n_tensors} tensors, "
               f"{result.size_bytes / 2**20:.1f} MiB, alignment {result.alignment}{router_note}", err=True)
