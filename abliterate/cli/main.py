"""The `abliterate` group: one-line errors, never tracebacks; a MODEL first argument runs the whole job."""

from __future__ import annotations

import signal
import sys

import click

from abliterate import __version__
from abliterate.cli.demo import demo
from abliterate.cli.edit import apply, merge, verify
from abliterate.cli.evaluate import evaluate
from abliterate.cli.extract import extract
from abliterate.cli.jailbreak import jailbreak
from abliterate.cli.probe import probe
from abliterate.cli.run import run
from abliterate.cli.search import search
from abliterate.cli.steer import steer


class Main(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit, never a traceback; a first
    argument that is not a subcommand is a MODEL for `run` (so `abliterate MODEL --push` works)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        from abliterate.errors import AbliterateError

        try:
            return super().invoke(ctx)
        except AbliterateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            click.echo(f"error: {e.strerror or e} ({e.filename or 'I/O'}); no output was written", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory; place the model across devices with --device-map auto (and "
                       "--max-memory), or lower --batch-size", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":  # torch.cuda's, past every loop that halves its batches
                click.echo("error: out of GPU memory; lower --batch-size, or place the model across devices with "
                           "--device-map auto --max-memory 0=SIZE,cpu=SIZE", err=True)
                sys.exit(2)
            from abliterate.io.hub import network_problem

            message = network_problem(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="abliterate")
def cli() -> None:
    """Remove (or add) the refusal direction of an open-weight chat model, exactly and on little memory.

    \b
    abliterate MODEL [--push [REPO_ID]] [--adapter] [--out DIR]
        the whole job (same as `abliterate run MODEL ...`): fetch, extract, edit, evaluate, card, push
    abliterate COMMAND ...
        one stage at a time (extract, apply, verify, evaluate, merge, search, ...)
    """



for _command in (apply, merge, verify, extract, demo, evaluate, search, run, steer, probe, jailbreak):
    cli.add_command(_command)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temporary output is removed


def main() -> None:
    import warnings

    # Deprecation notices from transformers/peft internals are for their developers, not ours to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="abliterate")
