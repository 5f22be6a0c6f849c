"""Click parameter types and exits shared by every `edlight` command."""

from __future__ import annotations

import math
from typing import Any, NoReturn

import click


def cannot_run(message: str) -> NoReturn:
    """A job that cannot run (bad model, input or output; a missing extra): one line on stderr, exit 2."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def failed(message: str) -> NoReturn:
    """A job that ran and failed (a check of its result, a run stopped partway): one line on stderr, exit 1."""
    click.echo(f"error: {message}", err=True)
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
