"""Shared checks for the command line's promises on bad input and on writing files.

A refused command prints one line starting with `error:` on stderr (no traceback) and exits
non-zero; an atomic write leaves no temporary file behind (`semiseg_cli.io.TMP_MARK` marks them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semiseg_cli.io import TMP_MARK


def one_line_error(
    result: Any, *fragments: str, code: int | None = None, mid_run: bool = False, quiet_stdout: bool = False
) -> str:
    """The error line of a refused CliRunner `result`, after checking the promise.

    `fragments` must each appear in it; `code` is the exact exit status wanted (any non-zero when
    None); `mid_run`: progress lines printed before the error are fine, the error is the last line
    and the only one starting with `error:`; `quiet_stdout`: nothing may reach stdout.
    """
    if code is None:
        assert result.exit_code != 0, (result.exit_code, result.output)
    else:
        assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err, err
    if mid_run:
        lines = err.splitlines()
        assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
        err = lines[-1] if lines else err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for f in fragments:
        assert f in err, (f, err)
    if quiet_stdout:
        assert result.stdout == "", result.stdout
    return err


def temp_files(folder: Path) -> list[Path]:
    """Temporaries of an atomic write left anywhere below `folder`."""
    return [p for p in Path(folder).rglob(f"*{TMP_MARK}*")]


def no_temp_files(folder: Path) -> bool:
    return not temp_files(folder)
