"""The `edgemoe` command: a click group that only dispatches to one module per command."""

from __future__ import annotations

import sys

try:
    import click

    from edgemoe import interrupt
    from edgemoe.version import __version__, describe
    from edgemoe.bench.cli import bench
    from edgemoe.convert.command import convert_command
    from edgemoe.errors import CliError
    from edgemoe.run import run
    from edgemoe.serve.cli import serve_command
    from edgemoe.info import info_command
    from edgemoe.inflate import inflate_command
    from edgemoe.synth_cli import synth_command
    from edgemoe.trace import trace, trace_stats
    from edgemoe.tune_router_cli import tune_router_command
except KeyboardInterrupt:
    # Ctrl-C while the commands load (seconds on a busy machine): the same exit as during one
    print("edgemoe: aborted", file=sys.stderr)
    raise SystemExit(130) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgemoe", message=describe())
def cli() -> None:
    """edgemoe: MoE inference with an expert cache, on llama.cpp."""


cli.add_command(run)
cli.add_command(serve_command)
cli.add_command(synth_command)
cli.add_command(info_command)
cli.add_command(bench)
cli.add_command(convert_command)
cli.add_command(trace)
cli.add_command(trace_stats)
cli.add_command(inflate_command)
cli.add_command(tune_router_command)


def main(argv=None) -> int:
    """Console entry point; usage errors become one `edgemoe: error:` line too."""
    try:
        cli.main(args=argv, prog_name="edgemoe", standalone_mode=False)
    except click.exceptions.Abort as e:
        # Ctrl-C (SIGINT: 130) or SIGTERM (143); click raises a plain Abort from a
        # KeyboardInterrupt that reached it, with the interrupt as its cause
        signum = getattr(e, "signum", None) or interrupt.signum_of(e.__cause__ or e)
        print(interrupt.message(signum), file=sys.stderr)
        return interrupt.exit_status(signum)
    except CliError as e:
        e.show()
        return e.exit_code
    except click.exceptions.ClickException as e:
        # click's usage errors get the same one-line form as ours
        print(f"edgemoe: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except BrokenPipeError:
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
