"""The `edlight` command: a thin click layer over the Python API.

Training, export, parity and benchmark commands live in packages that need
torch/transformers/optimum. They are imported only when invoked, so
`edlight caption` works on an engine-only install, and a command whose extra
is missing says which extra to install and exits 2.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys
from typing import Any

import click

from engine import __version__
from engine.click_types import interrupted_status, output_failed, say
from engine.errors import install_hint, is_installed

# name -> (module, attribute, extra that provides its dependencies, one-line help)
LAZY_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "caption": ("engine.caption_cli", "caption", "", "Caption images and folders with an ONNX bundle."),
    "data": ("train.data_cli", "data", "", "Generate and check data folders (images + metadata)."),
    "train": ("train.cli", "train", "train", "Fine-tune Pix2Struct on a data folder."),
    "evaluate": ("train.cli", "evaluate", "train", "BLEU/chrF of a PyTorch checkpoint on a data folder."),
    "export": ("export.cli", "export", "export", "Export a checkpoint to a verified ONNX bundle."),
    "parity": ("export.parity_cli", "parity", "export", "Check that a bundle's BLEU matches PyTorch's."),
    "bench": ("benchmarks.cli", "bench", "", "Latency, throughput and memory of the runtimes."),
}

# Imports that mean "this extra is not installed", as opposed to a bug in our code.
EXTRA_MODULES = {"torch", "transformers", "optimum", "accelerate", "onnx", "matplotlib", "ray"}
# What each extra's commands import, checked before loading them: a command module may import its
# heavy dependencies only inside functions, and a missing one must not surface mid-run as a traceback.
EXTRA_NEEDS = {"train": ("torch", "transformers", "accelerate"), "export": ("torch", "transformers", "optimum", "onnx")}


def missing_module(extra: str) -> str | None:
    """The first module that `extra` needs and this environment lacks, or None."""
    return next((name for name in EXTRA_NEEDS.get(extra, ()) if not is_installed(name)), None)


class MissingExtraCommand(click.Command):
    """Stands in for a command whose extra is not installed."""

    def __init__(self, name: str, extra: str, missing: str, help_text: str) -> None:
        super().__init__(name, help=f"{help_text} (needs edlight[{extra}])", context_settings={"ignore_unknown_options": True})
        self.params = [click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)]
        self.extra = extra
        self.missing = missing

    def invoke(self, ctx: click.Context) -> None:
        click.echo(
            f"error: `edlight {self.name}` needs the [{self.extra}] extra ({self.missing} is not installed).\n"
            f"  install it {install_hint(self.extra)}",
            err=True,
        )
        ctx.exit(2)


class _WarningLine(logging.Handler):
    """edlight's logged warnings as the CLI words its others: `warning: ...` on stderr (Python's last-resort
    handler printed them bare: a torn line cut off, bad entries skipped)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        say(f"{record.levelname.lower()}: {record.getMessage()}")


# The packages whose modules log through logging.getLogger(__name__), and export's and parity's "edlight.*".
LOGGING_PACKAGES = ("engine", "train", "export", "benchmarks", "edlight")


class LazyGroup(click.Group):
    def main(self, *args: Any, **kwargs: Any) -> Any:
        for name in LOGGING_PACKAGES:
            logger = logging.getLogger(name)
            if not any(isinstance(handler, _WarningLine) for handler in logger.handlers):
                logger.addHandler(_WarningLine())
        # click writes --help, --version and usage errors itself: a stdout that takes nothing (`| head`,
        # `>/dev/full`) ended them in a traceback. Commands handle their own output (print_result, say).
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ENOSPC):
                raise
            output_failed(exc)

    def invoke(self, ctx: click.Context) -> object:
        # Ctrl-C before a command's own handling starts (while it imports or loads a model): click would
        # say "Aborted!" and exit 1, the status of a failed run; an interruption is 130.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            stop = exc
        except ImportError as exc:  # onnxruntime's native start-up turns a Ctrl-C during its import into this
            cause = exc.__cause__ or exc.__context__
            if not isinstance(cause, KeyboardInterrupt):
                raise
            stop = cause
        say("interrupted")
        ctx.exit(interrupted_status(stop))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listed from the table, not by importing: `edlight --help` must not load torch.
        rows = [(name, help_text) for name, (_, _, _, help_text) in sorted(LAZY_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return None
        module_name, attr, extra, help_text = LAZY_COMMANDS[cmd_name]
        missing = missing_module(extra)
        if missing is not None:
            return MissingExtraCommand(cmd_name, extra, missing, help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").split(".")[0]
            if root in EXTRA_MODULES:
                return MissingExtraCommand(cmd_name, extra or root, root, help_text)
            raise
        command: click.Command = getattr(module, attr)
        return command


@click.group(cls=LazyGroup)
@click.version_option(version=__version__, package_name="edlight")  # the package's own, not an install's record
def main() -> None:
    """edlight: describe photos of student work with Pix2Struct."""


if __name__ == "__main__":
    sys.exit(main())
