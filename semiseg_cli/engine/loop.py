"""The one training loop. It knows nothing about any particular method.

Per iteration: `grad_accum` micro-batches through `method.training_step`, one backward each,
then every optimizer steps and `method.after_optimizer_step` runs. Around that: seeding,
rank-sharded loaders, bf16 autocast on CUDA, DDP + SyncBN under torchrun, rich progress, a JSONL
metrics log, periodic validation, atomic `last.pt`/`best.pt`, exact resume, and a stop with a
message (and the last good checkpoint kept) when the loss stops being finite.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from semiseg_cli.config import config_to_toml
from semiseg_cli.engine import distributed
from semiseg_cli.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from semiseg_cli.engine.loaders import eval_loader, infinite_loader, to_device
from semiseg_cli.errors import UserError
from semiseg_cli.inference import InferenceSettings, evaluate
from semiseg_cli.io import write_text
from semiseg_cli.methods import Method, get_method
from semiseg_cli.methods.base import TrainContext


class TrainingDiverged(UserError):
    exit_code = 3


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_miou: float
    last_metrics: dict[str, Any] | None
    method: Any = None  # the trained method, unwrapped (for scripts and tests)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
        if name == "cuda":  # an explicit index: set_device needs one, and so do DDP's device_ids
            name = f"cuda:{distributed.local_rank() if distributed.launched_by_torchrun() else torch.cuda.current_device()}"
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        if dev.index is None or dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible; use cuda:0..")
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data pools


def resolve_pools(cfg: Any, layout: Any, uses_tags: bool) -> tuple[list, list]:
    """(labeled, unlabeled) pairs: split files, a split drawn now from a fraction, or all."""
    from semiseg_cli.data.splits import draw_split, read_split_file, widen_unlabeled

    d = cfg.data
    if d.labeled_list:
        labeled = read_split_file(d.labeled_list, layout.root)
        unlabeled = read_split_file(d.unlabeled_list, layout.root) if d.unlabeled_list else []
    elif d.labeled:
        labeled, unlabeled = draw_split(layout.list_pairs(d.train_split), d.labeled, d.split_seed)
        if d.unlabeled_split and d.unlabeled_split != d.train_split:
            unlabeled = widen_unlabeled(labeled, unlabeled, layout.list_pairs(d.unlabeled_split))
    else:
        labeled, unlabeled = layout.list_pairs(d.train_split), []
    if uses_tags:  # weak supervision: every training image, tags only
        labeled, unlabeled = sorted(set(labeled) | set(unlabeled)), []
    return labeled, unlabeled


def _hide_masks(batch: dict[str, Any]) -> dict[str, Any]:
    """Weakly supervised methods never see masks: ground truth moves to `gt_mask` (metrics only)."""
    batch = dict(batch)
    batch["gt_mask"] = batch.pop("mask")
    return batch


# --------------------------------------------------------------------------- run folder


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run-folder request that cannot go ahead; touches nothing."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run folder {run_dir} is not empty; pass --resume to continue it, --overwrite to replace it, or --out elsewhere")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check, then (with --overwrite) clear the previous run's files and create the folder. Called
    only once the config, data and model have been built, so bad input never costs an old run."""
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        for name in ("last.pt", "best.pt", "metrics.jsonl", "config.toml"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


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


# --------------------------------------------------------------------------- DDP handling


@contextmanager
def unwrapped(method: Method) -> Iterator[None]:
    """Temporarily put the plain student back in place of its DDP wrapper (eval, saving)."""
    wrapped = method.model
    method.model = distributed.unwrap(wrapped)
    try:
        yield
    finally:
        method.model = wrapped


def checkpoint_payload(method: Method, specs: list, step: int, best: float, cfg: Any) -> dict[str, Any]:
    with unwrapped(method):
        inf = method.inference_model()
        has_teacher = inf is not method.model
        return {
            "config": cfg.model_dump(mode="json"),
            "method": cfg.method,
            "class_names": method.class_names,
            "num_classes": method.num_classes,
            "step": step,
            "best_miou": best,
            "method_state": method.state_dict(),
            "inference_state": inf.state_dict(),
            "student_state": method.model.state_dict() if has_teacher else None,
            "has_teacher": has_teacher,
            "optimizers": [s.optimizer.state_dict() for s in specs],
            "rng": rng_state(),
        }


# --------------------------------------------------------------------------- the loop


def train(cfg: Any, resume: bool = False, overwrite: bool = False, console: Any = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `cfg.out`; returns the final step and best validation mIoU."""
    from rich.console import Console

    from semiseg_cli.data import build_dataset, get_layout, load_tags

    console = console or Console(stderr=True)
    device = resolve_device(cfg.train.device)
    distributed.init(device.type)
    main = distributed.is_main()
    run_dir = Path(cfg.out)

    # Config, data and model problems are refused before the run folder is touched.
    check_run_dir(run_dir, resume, overwrite)
    method_cls = get_method(cfg.method)
    layout = get_layout(cfg.data.dataset, cfg.data.root)
    num_classes = layout.num_classes
    method_cls.check_config(cfg, num_classes)
    labeled, unlabeled = resolve_pools(cfg, layout, method_cls.uses_tags)
    if method_cls.uses_unlabeled and not unlabeled:
        raise UserError(
            f"method {cfg.method} needs unlabeled images but the split leaves none; pass --labeled 1/8 "
            "(or data.unlabeled_list) so part of the training pool is unlabeled"
        )
    tags = None
    if method_cls.uses_tags and cfg.data.tags_file:  # the user's tags must cover every training image
        tags = load_tags(cfg.data.tags_file, num_classes, [img for img, _ in labeled])

    seed_everything(cfg.train.seed + distributed.rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    ds_l = build_dataset(cfg.data, labeled, train=True)
    if tags is not None:
        ds_l.tags = tags
    ds_u = build_dataset(cfg.data, unlabeled, train=True) if method_cls.uses_unlabeled else None
    ds_val = build_dataset(cfg.data, layout.list_pairs(cfg.data.val_split), train=False)

    method = method_cls(cfg, num_classes, list(layout.class_names)).to(device)  # loads pretrained weights
    if main:
        prepare_run_dir(run_dir, resume, overwrite)
    distributed.barrier()
    bl = cfg.data.batch_size
    bu = cfg.data.unlabeled_batch_size or bl
    total = cfg.train.iters
    ctx = TrainContext(
        total_iters=total, labeled_size=len(ds_l), unlabeled_size=len(ds_u) if ds_u else 0,
        labeled_batch=bl, unlabeled_batch=bu, device=device,
        world_size=distributed.world_size(), rank=distributed.rank(),
    )
    method.setup(ctx)
    specs = method.configure_optimizers(total)

    start, best, resume_rng = 0, -1.0, None
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        method.load_state_dict(ckpt["method_state"])
        for spec, st in zip(specs, ckpt["optimizers"]):
            spec.optimizer.load_state_dict(st)
        start, best = int(ckpt["step"]), float(ckpt["best_miou"])
        resume_rng = ckpt["rng"]
        if start >= total:
            console.print(f"[yellow]{run_dir} already finished {start} of {total} iterations; nothing to do")
    distributed.broadcast_state(method)  # parts outside DDP (teacher, discriminator) start as rank 0's
    if distributed.is_dist():
        if cfg.model.sync_bn and device.type == "cuda":  # SyncBN needs CUDA; CPU ranks share rank 0's stats
            method.model = nn.SyncBatchNorm.convert_sync_batchnorm(method.model)
        ids = [device.index] if device.type == "cuda" else None
        method.model = nn.parallel.DistributedDataParallel(method.model, device_ids=ids)
    student_ids = {id(p) for p in method.model.parameters()}
    other_params = [p for p in method.parameters() if p.requires_grad and id(p) not in student_ids]

    if main:
        write_text(run_dir / "config.toml", config_to_toml(cfg))
    log = MetricLog(run_dir / "metrics.jsonl", start if resume else None, main)
    accum = cfg.train.grad_accum
    pin = device.type == "cuda"
    it_l = infinite_loader(ds_l, bl, cfg.data.workers, cfg.train.seed, 0, start * accum, pin)
    it_u = infinite_loader(ds_u, bu, cfg.data.workers, cfg.train.seed, 1, start * accum, pin) if ds_u else None
    val_batches = eval_loader(ds_val, cfg.eval.batch_size, cfg.data.workers, pin)
    settings = InferenceSettings.from_config(cfg)
    amp = cfg.train.amp and device.type == "cuda"

    def validate(step: int) -> dict[str, Any]:
        nonlocal best
        distributed.broadcast_buffers(method)
        with unwrapped(method):
            m = evaluate(method.inference_model(), val_batches, num_classes, settings, device, cfg.data.ignore_index, amp)
        rec = {"step": step, "val_mIoU": m.miou, "val_aAcc": m.aacc, "val_mAcc": m.macc}
        log.write(rec)
        if main:
            console.print(f"step {step}: val mIoU {100 * m.miou:.2f}  aAcc {100 * m.aacc:.2f}")
        improved = m.miou > best
        best = max(best, m.miou)
        if improved and main:
            save_checkpoint(run_dir / "best.pt", checkpoint_payload(method, specs, step, best, cfg))
        return m.as_dict(method.class_names)

    last_metrics: dict[str, Any] | None = None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    n_logged = 0
    t0 = time.perf_counter()
    bar = _progress(console, enabled=progress and main)
    task = bar.add_task("train", total=total, completed=start, info="")
    method.train()
    if resume_rng is not None:  # last, so that building loaders above draws nothing from it
        set_rng_state(resume_rng)
    with bar:
        for step in range(start, total):
            for spec in specs:
                spec.optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                batch_l = to_device(next(it_l), device)
                if method_cls.uses_tags:
                    batch_l = _hide_masks(batch_l)
                batch_u = to_device(next(it_u), device) if it_u is not None else None
                sync = micro == accum - 1 or not isinstance(method.model, nn.parallel.DistributedDataParallel)
                with (nullcontext() if sync else method.model.no_sync()):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        losses = method.training_step(batch_l, batch_u, step)
                    loss = losses["loss"]
                    if not torch.isfinite(loss.detach()):
                        _diverged(run_dir, step, losses)
                    (loss / accum).backward()
                for k, v in losses.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    sums[k] = sums.get(k, 0.0) + v  # type: ignore[operator]
                    counts[k] = counts.get(k, 0) + 1
            distributed.average_gradients(other_params)
            for spec in specs:
                if step % spec.every == 0:
                    spec.set_lr(step)
                    spec.optimizer.step()
            with unwrapped(method):
                method.after_optimizer_step(step)
            n_logged += 1
            done = step + 1
            if done % cfg.train.log_interval == 0 or done == total:
                # Per-key counts: a method may log a value only on some steps (e.g. when masks exist).
                rec = {"step": done, **{k: round(float(v) / counts[k], 6) for k, v in sums.items()}}
                rec["lr"] = specs[0].optimizer.param_groups[0]["lr"]
                rec["it_per_s"] = round(n_logged / max(time.perf_counter() - t0, 1e-9), 4)
                rec.update(method.extra_log())
                log.write(rec)
                bar.update(task, info=f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['it_per_s']:.2f} it/s")
                sums, counts, n_logged, t0 = {}, {}, 0, time.perf_counter()
            bar.update(task, completed=done)
            val_due = cfg.train.val_interval and done % cfg.train.val_interval == 0
            if val_due or done == total:
                last_metrics = validate(done)
            if done % cfg.train.ckpt_interval == 0 or done == total:
                distributed.broadcast_buffers(method)
            if main and (done % cfg.train.ckpt_interval == 0 or done == total):
                save_checkpoint(run_dir / "last.pt", checkpoint_payload(method, specs, done, best, cfg))
            if done % cfg.train.ckpt_interval == 0:
                distributed.barrier()
    distributed.barrier()
    method.model = distributed.unwrap(method.model)
    return TrainResult(run_dir, max(start, total), best, last_metrics, method)


def _diverged(run_dir: Path, step: int, losses: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v.detach()).all()]
    last = run_dir / "last.pt"
    kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was saved yet"
    raise TrainingDiverged(
        f"loss became non-finite at step {step} ({', '.join(bad) or 'loss'}); {kept}; "
        "lower the learning rate (--lr) or check the data, then --resume"
    )


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
