"""What `semiseg train` settles before any work: the run's config and every rule it must pass.

`resolve_run_config` turns a preset, a method switch, `--set` overrides and typed option values
into the validated config (for `--resume`, the run's own stored config with the allowed
changes). `check_run_config` applies every rule that needs no data — the config's own bounds are
pydantic's, the cross-field rules each method's `check_config` — plus the run folder and output
location checks; `--dry-run` calls it, and so does `train` before it touches anything, so a config
that `--dry-run` passes is one that `train` starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semiseg_cli.errors import UserError
from semiseg_cli.io import check_output_dir


def default_out(cfg: Any) -> str:
    """runs/<preset name>[-<method>] when the config keeps the default folder."""
    return f"runs/{cfg.name}" if cfg.method in cfg.name else f"runs/{cfg.name}-{cfg.method}"


def resolve_run_config(
    preset: str | None,
    method: str | None,
    overrides: list[str],
    values: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    notes: list[str] | None = None,
) -> Any:
    """The run's validated config. `data.auto` fields are filled from the data here (one line
    each appended to `notes`), except for a resumed run, which keeps its stored config."""
    from semiseg_cli.config import build_config, resume_config
    from semiseg_cli.engine.auto_defaults import explicit_keys, fill_from_data

    cfg = build_config(preset, overrides, method, values)
    if cfg.out == "runs/run":  # default folder: name it after the preset and method
        cfg.out = default_out(cfg)
    last = Path(cfg.out) / "last.pt"
    resuming = resume and not overwrite and last.is_file()
    if not resuming and cfg.data.auto:
        filled = fill_from_data(cfg, explicit_keys(preset, overrides, values))
        if notes is not None:
            notes.extend(filled)
    if resuming:
        # A resumed run continues with the config stored in its checkpoint; the options given
        # now may only change what RESUME_MAY_CHANGE lists.
        from semiseg_cli.engine.checkpoint import load_checkpoint

        out_dir = cfg.out
        stored = load_checkpoint(last, mmap=True, verify=False)["config"]  # the tensors stay on disk
        cfg = resume_config(stored, overrides, cfg if (preset or method) else None, values)
        cfg.out = out_dir
    return cfg


def dataset_classes(cfg: Any) -> int | None:
    """The dataset's class count when its root can be read now, else None (dry runs elsewhere)."""
    from semiseg_cli.data import layout_for

    try:
        return layout_for(cfg.data).num_classes
    except UserError:
        return None


def check_run_config(cfg: Any, resume: bool = False, overwrite: bool = False, num_classes: int | None = None) -> None:
    """Every rule a run must pass that needs no pass over the data. Writes nothing."""
    from semiseg_cli.methods import get_method

    if num_classes is None:
        num_classes = dataset_classes(cfg)
    get_method(cfg.method).check_config(cfg, num_classes)
    check_run_dir(Path(cfg.out), resume, overwrite)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run-folder request that cannot go ahead; touches nothing."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    check_output_dir(run_dir, "run folder")
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(
                f"nothing to resume: {last} does not exist (the run stopped before its first checkpoint); "
                "start it again with --overwrite instead of --resume"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run folder {run_dir} is not empty; pass --resume to continue it, --overwrite to replace it, or --out elsewhere")
