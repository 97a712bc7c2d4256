"""Files in and out: atomic writes, output checks before work, text reading with one-line errors.

Writes go to a temporary file in the target folder, then `os.replace`: a run killed mid-write
leaves either the old file or the new one, never half of one. Temporary files carry this
project's mark and the writer's process id (`.NAME.semiseg-tmp-PID-RANDOM`), so the next run
into the same folder removes the ones whose writer is gone (`clean_stale_temps`) and nothing else.
Files are created with mode 0o666 and the user's umask applies, like any other tool's output.

Output locations are checked before any work starts (`check_output_file`, `check_output_dir`):
a parent that is a file, a read-only or pseudo filesystem, a folder where a file should go. The
check creates and removes a probe in the nearest existing folder, because permission bits alone
say nothing for root or for read-only mounts.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from semiseg_cli.errors import UserError

TMP_MARK = ".semiseg-tmp-"


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_dir(folder: Path, what: str, target: Path) -> None:
    """Create and remove a probe file in `folder`: the one reliable test that writing works."""
    probe = folder / f"{TMP_MARK}{os.getpid()}-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {target}: {folder} is not writable ({_reason(e)}); choose another location") from None


def _check_parent_chain(path: Path, what: str) -> None:
    """Every existing ancestor of `path` must be a folder, and the nearest one writable."""
    base = _nearest_existing(path.parent)
    if base.exists() and not base.is_dir():
        raise UserError(f"cannot write {what} {path}: {base} is a file, not a folder; choose another location")
    if not base.exists():
        raise UserError(f"cannot write {what} {path}: none of its parent folders exist")
    _probe_dir(base, what, path)


def check_output_file(path: str | os.PathLike[str] | None, overwrite: bool = False, what: str = "output") -> None:
    """Refuse, before any work, an output file that could not be written or would be replaced
    without `overwrite`. Writes nothing."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name inside it")
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} exists; pass --overwrite to replace it")
    _check_parent_chain(path, what)


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created/written.
    Whether an existing folder's content may be reused is the caller's rule. Writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; give a folder")
    if path.is_dir():
        _probe_dir(path, what, path)
    else:
        _check_parent_chain(path, what)


def clean_stale_temps(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Remove temporary files (and folders) of our own naming whose writing process no longer
    runs (left by a `kill -9`); returns what was removed. Those of live writers and all other
    files stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"*{TMP_MARK}*"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = []
    for p in found:
        try:
            pid = int(p.name.split(TMP_MARK, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

    The temporary file is created empty with mode 0o666 less the umask, so the renamed result
    has the permissions any other tool's output would have. A failure to create or rename it
    (disk full, read-only folder) is a one-line `UserError` naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.parent / f".{path.name[:80]}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
        fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}; check the location is a writable folder") from None
    try:
        yield tmp_path
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise UserError(f"cannot write {path}: a folder of that name exists; remove it or choose another name") from None
            raise UserError(f"cannot write {path}: {_reason(e)}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"cannot write {path}: no space left on the device; free some space and rerun") from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_text(path: str | os.PathLike[str], what: str, fix: str = "save it as UTF-8 text") -> str:
    """A text file's content, or a one-line `UserError` when it is missing, unreadable or not
    UTF-8 (the message names the file, the byte offset and `fix`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {_reason(e)}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); {fix}") from None


def remove_entries(folder: Path, names: Iterable[str]) -> None:
    """Remove `folder/NAME` for every name: a folder with all it holds, a file, or a link (the
    link itself, never what it points to); names that do not exist are skipped.

    For commands that own a fixed set of names inside a folder the user chose (`--overwrite`, a
    failed start): everything else in that folder stays, so a mistyped path cannot wipe it."""
    for name in names:
        p = Path(folder) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
