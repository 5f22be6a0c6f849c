"""Click parameter types, exits, stop signals and stderr output shared by every `edlight` command."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from engine.errors import EdlightError


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what `timeout`, a service manager or a closed terminal send), raised where the
    process is, so that a job unwinds as from Ctrl-C: records flushed, locks and partial files removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """The exit status of a job stopped by `exc`: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


STOP_SIGNALS = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))  # no SIGHUP on Windows
_unwinding = [0]  # depth of stops_unwind blocks that set a handler
_requested: list[int | None] = [None]  # the stop signal received within them, if any


@contextlib.contextmanager
def stops_unwind() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Stopped. A signal the process was told to ignore (SIGHUP
    under nohup) stays ignored; outside the main thread, where handlers cannot be set, nothing changes."""
    previous = {}
    for signum in STOP_SIGNALS:
        try:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _stop)
        except (ValueError, OSError):  # not the main thread; a platform without the signal
            pass
    _unwinding[0] += bool(previous)
    try:
        yield
    finally:
        _unwinding[0] -= bool(previous)
        if not _unwinding[0]:
            _requested[0] = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(signum: int, _frame: object) -> None:
    _requested[0] = signum
    raise Stopped(signum)


def check_stop() -> None:
    """Raise Stopped again for a stop whose exception library code swallowed (a bare `except:` in an import the
    signal interrupted: the run went on to its end). Long loops call it between their steps."""
    if _requested[0] is not None and _unwinding[0]:
        raise Stopped(_requested[0])


def reclaim_stop_signals() -> None:
    """Within `stops_unwind`, take back SIGTERM and SIGHUP from a library that set its own handler since
    (ray.init makes SIGTERM exit with status 15 and no word); elsewhere nothing changes."""
    if not _unwinding[0]:
        return
    for signum in STOP_SIGNALS:
        try:
            if signal.getsignal(signum) not in (_stop, signal.SIG_IGN):
                signal.signal(signum, _stop)
        except (ValueError, OSError):
            pass


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """Within the block Ctrl-C, SIGTERM and SIGHUP are noted, not acted on; the first is raised again as soon as
    it ends, to the handlers it would have met (for a few writes that must not be cut in half). Handlers, not a
    signal mask: a mask holds for one thread only, and the kernel hands a process's signal to any thread that
    does not block it (a thread pool's, OpenMP's), whose arrival Python then acts on in the main thread. Outside
    the main thread, where handlers cannot be set, and for a signal ignored or handled outside Python, nothing
    changes."""
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        try:
            handler = signal.getsignal(signum)
            if handler not in (None, signal.SIG_IGN):
                previous[signum] = signal.signal(signum, lambda number, _frame: caught.append(number))
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


def unwinds_on_stop(function: Callable[..., Any]) -> Callable[..., Any]:
    """A command (under its click decorators) that runs within `stops_unwind`."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with stops_unwind():
            return function(*args, **kwargs)

    return run


def say(message: str) -> None:
    """One line on stderr, if stderr takes it: a closed pipe or a full disk there (`2>&1 | head`,
    `2>/dev/full`) costs the messages, not the job or its exit status."""
    try:
        click.echo(message, err=True)
    except OSError:
        pass


# The exit status of a process killed by SIGPIPE (13), which a command whose stdout reader has gone ends with.
PIPE_CLOSED_STATUS = 128 + 13


def print_result(text: str, essential: bool = True) -> None:
    """`text` on stdout: a command's scores, table or summary. Commands write their files first, so that a
    stdout that takes nothing loses no work. A reader that stopped reading (`| head`, `| true`) ends the command
    as SIGPIPE ends other tools (exit 141); another failure (`>/dev/full`) is said on stderr, exit 1. Text that
    only repeats what a file holds (`essential=False`: export's summary of the bundle's manifest) is dropped
    instead, the command going on to its own exit status."""
    try:
        click.echo(text)  # click flushes: a full disk shows here, not at exit
    except OSError as exc:
        if not essential:
            _drop_stdout()
            return
        output_failed(exc)


def _drop_stdout() -> None:
    """What is left in stdout's buffer would fail again as Python exits ("Exception ignored ..."): let it go to
    /dev/null instead."""
    with contextlib.suppress(OSError, ValueError):
        descriptor = sys.stdout.fileno()  # none under a test runner's capture
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, descriptor)
        finally:
            os.close(null)


def output_failed(exc: OSError) -> NoReturn:
    """End a command whose stdout took nothing: exit 141 as SIGPIPE would for a reader gone (`| head`), else one
    line on stderr and exit 1 (`>/dev/full`)."""
    _drop_stdout()
    if isinstance(exc, BrokenPipeError):
        raise SystemExit(PIPE_CLOSED_STATUS) from None
    say(f"error: cannot write to stdout ({exc.strerror or exc})")
    raise SystemExit(1) from None


def show_and_save(text: str, out: Path | None, save: Callable[[Path], None]) -> None:
    """A command's results: `text` printed, and `save(out)` writing them to its --out file (if any). The file is
    written first, so that neither a full disk nor a stdout that takes nothing (`| head`, `>/dev/full`) loses
    the work; an `out` that is itself a stream (`--out -`) follows the text, as it reads. An EdlightError from
    `save` is said last (exit 2), after the text."""
    from engine.folder import is_stream

    first = out is None or os.fspath(out) == "-" or is_stream(out)
    if first:
        print_result(text)
    unwritten = None
    if out is not None:
        try:
            save(out)
        except EdlightError as exc:
            unwritten = exc
    if not first:
        print_result(text, essential=unwritten is None)  # else the file's error is the one to say
    if unwritten is not None:
        cannot_run(str(unwritten))


class TolerantStream:
    """A stream (stderr, for a progress bar) that stops writing where it no longer takes output (its reader
    or terminal gone, a full disk): the job goes on, with the bar the only loss."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.broken = stream, False

    def write(self, text: str) -> None:
        if not self.broken:
            try:
                self.stream.write(text)
            except OSError:
                self.broken = True

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except OSError:
                self.broken = True

    def __getattr__(self, name: str) -> Any:  # fileno (the terminal's width), encoding (unicode blocks), isatty
        return getattr(self.stream, name)


class LineProgress:
    """Progress for a stderr that is not a terminal (a service's journal, a CI log, `2> file`): a plain line at
    most every `interval` seconds, where a progress bar's carriage-return redraws would pile up on one line.
    The same `update`/`close` calls as tqdm's bar."""

    def __init__(self, total: int, desc: str, unit: str, stream: Any, interval: float = 60.0) -> None:
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.done = 0
        self.started = self.said = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.said >= self.interval and 0 < self.done < self.total:
            self.said = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate
            self.stream.write(
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.3g} {self.unit}/s, about {_duration(left)} left\n"
            )
            self.stream.flush()

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal, or a Jupyter kernel's output (no tty, but it redraws a bar's line)."""
    try:
        return bool(stream.isatty()) or "ipykernel" in sys.modules
    except (AttributeError, OSError, ValueError):  # a stand-in stream, or one already closed
        return False


def progress_bar(total: int, desc: str, unit: str, stream: Any) -> Any:
    """tqdm's bar on a terminal; elsewhere a LineProgress. Both write through a TolerantStream."""
    tolerant = TolerantStream(stream)
    if not is_terminal(stream):
        return LineProgress(total, desc, unit, tolerant)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=tolerant, dynamic_ncols=True)


def cannot_run(message: str) -> NoReturn:
    """A job that cannot run (bad model, input or output; a missing extra): one line on stderr, exit 2."""
    say(f"error: {message}")
    raise SystemExit(2)


def failed(message: str) -> NoReturn:
    """A job that ran and failed (a check of its result, a run stopped partway): one line on stderr, exit 1."""
    say(f"error: {message}")
    raise SystemExit(1)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (nan passes every range check; inf overflows a run)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class GivenPath(click.Path):
    """A click.Path that refuses an empty string: Path("") is the current folder, and an unset shell
    variable ("$PHOTOS") must not caption everything below it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("an empty path (an unset variable?)", param, ctx)
        return super().convert(value, param, ctx)
