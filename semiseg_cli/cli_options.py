"""What every `semiseg` command shares, below `cli.py`: consoles, option types, value parsers and
the one place where a `UserError` becomes a one-line message.

The mapping lives in `SemisegGroup.invoke`, the click group every command runs under, so it
applies the same way to the installed entry point, `python -m semiseg_cli` and Typer's test
runner, and no command needs a decorator. Warnings raised while a command checks its input are
held until it starts its work (see `semiseg_cli.errors.held_warnings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from semiseg_cli.errors import UserError, held_warnings

# soft_wrap: a message is one line however narrow the terminal (or 80 columns when not a
# terminal); tables on stdout still fit the width.
err_console = Console(stderr=True, soft_wrap=True)
out_console = Console()


def report_error(e: UserError) -> None:
    problems = getattr(e, "problems", None)
    if problems and len(problems) > getattr(e, "shown", len(problems)):
        # The error line shows the first few; the full list, so one pass fixes them all.
        for p in problems:
            err_console.print(f"  - {p}", highlight=False, markup=False)
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)


class SemisegGroup(TyperGroup):
    """The command group: user errors become one line and their exit code; anything else is a
    bug and keeps its traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            with held_warnings():
                return super().invoke(ctx)
        except UserError as e:
            report_error(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; outputs written so far are complete (rerun to resume)")
            raise typer.Exit(130) from None


# ----------------------------------------------------------------------------- option types
Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="A best.pt/last.pt written by `semiseg train`.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Runtime")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
ScalesOpt = Annotated[Optional[str], typer.Option("--scales", help="Test-time scales, e.g. 0.75,1.0,1.25.", rich_help_panel="Inference")]
FlipOpt = Annotated[bool, typer.Option("--flip", help="Average with horizontally flipped predictions.", rich_help_panel="Inference")]
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="whole | slide.", rich_help_panel="Inference")]
WeightsOpt = Annotated[str, typer.Option(help="auto (EMA teacher if any) | teacher | student.")]
RootOpt = Annotated[Optional[Path], typer.Option(help="Dataset root, if it moved since training.")]


# ----------------------------------------------------------------------------- value parsers


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, e.g. 0.75,1.0,1.25 (got {text!r})") from None
    if not vals or min(vals) <= 0:
        raise UserError(f"{what} must be positive numbers (got {text!r})")
    return vals


def parse_size(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.replace("x", ",").split(",") if x]
    except ValueError:
        raise UserError(f"{what} must be one or two integers like 321 or 224,288 (got {text!r})") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise UserError(f"{what} must be one or two integers like 321 or 224,288 (got {text!r})")
    return parts[0], parts[1]


def check_choice(value: str | None, what: str, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise UserError(f"{what} must be {' or '.join(choices) if len(choices) == 2 else ', '.join(choices)} (got {value!r})")
