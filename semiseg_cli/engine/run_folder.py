"""The run folder: created only once every check has passed, emptied again after a failed start,
and its append-only metrics log.

Files: `config.toml` (the resolved config), `metrics.jsonl`, `last.pt` (resumable), `best.pt`
(slim), `curves.png` (drawn from metrics.jsonl at the end) and `tensorboard/` (event files, with
the optional package). Temporary files of a run killed mid-write are removed when the next run
opens the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semiseg_cli.engine.setup import check_run_dir
from semiseg_cli.io import clean_stale_temps, remove_entries, write_text

TENSORBOARD_DIR = "tensorboard"
CURVES_PNG = "curves.png"
# What a run writes; --overwrite and a failed start remove these (and nothing else) from the folder.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.toml", CURVES_PNG, TENSORBOARD_DIR)


class RunFolder:
    """The run folder's life: created (or cleared with --overwrite) only after every check has
    passed, and emptied again if the run fails before its first checkpoint, so a failed start
    leaves nothing behind and the same command can simply be rerun. From the first checkpoint on,
    a failed run keeps its folder: `--resume` continues from `last.pt`."""

    def __init__(self, path: Path, resume: bool, overwrite: bool, main: bool) -> None:
        self.path, self.resume, self.main = path, resume, main
        self.created = False
        self.checkpointed = False
        if not main:
            return
        check_run_dir(path, resume, overwrite)
        self.created = not path.exists()
        if not resume and path.exists():
            remove_entries(path, RUN_FILES)
        path.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path)  # left by a run killed mid-write

    def discard_failed_start(self) -> None:
        if not self.main or self.resume or self.checkpointed:
            return
        remove_entries(self.path, RUN_FILES)
        clean_stale_temps(self.path)
        if self.created:
            try:
                self.path.rmdir()
            except OSError:
                pass


class MetricLog:
    """Append-only JSONL log; on resume, records past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text(path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def has_validation(self, step: int) -> bool:
        """Whether the log holds a validation record of `step` (a finished run whose final
        validation failed after last.pt was written has none)."""
        if not self.path.is_file():
            return False
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") == step and "val_mIoU" in rec:
                return True
        return False
