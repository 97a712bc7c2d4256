"""The one training loop. It knows nothing about any particular method.

Per iteration: `grad_accum` micro-batches through `method.training_step`, one backward each,
then every optimizer steps and `method.after_optimizer_step` runs. Around that: seeding,
rank-sharded loaders, bf16 autocast on CUDA, DDP + SyncBN under torchrun, rich progress, a JSONL
metrics log (mirrored to TensorBoard when it is installed; `curves.png` drawn from it at the end),
periodic validation, atomic `last.pt`/`best.pt`, exact resume, and a stop with a message (and the
last good checkpoint kept) when the loss stops being finite. The speed switches (channels_last,
cudnn.benchmark, torch.compile; engine/perf.py) change how the steps run, not what they compute.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from semiseg_cli.config import config_to_toml
from semiseg_cli.engine import distributed
from semiseg_cli.engine.device import resolve_device
from semiseg_cli.engine.run_data import RunData, build_data
from semiseg_cli.engine.run_folder import CURVES_PNG, TENSORBOARD_DIR, MetricLog, RunFolder
from semiseg_cli.engine.setup import check_run_config
from semiseg_cli.engine.tensorboard_log import TensorBoardLog
from semiseg_cli.engine.checkpoint import load_checkpoint, non_finite_tensors, rng_state, save_checkpoint, set_rng_state
from semiseg_cli.engine.loaders import eval_loader, infinite_loader, to_device
from semiseg_cli.engine.perf import (
    CompiledNetworks, SpeedSettings, adopt_optimizer_impl, batch_to_channels_last, compile_targets, cudnn_benchmark,
    match_state_layout, networks_to_channels_last, resolve_speed,
)
from semiseg_cli.curves import write_curves
from semiseg_cli.errors import UserError, flush_warnings
from semiseg_cli.inference import InferenceSettings, evaluate
from semiseg_cli.io import write_text
from semiseg_cli.methods import Method, get_method
from semiseg_cli.methods.base import TrainContext
from semiseg_cli.viz import display_palette


class TrainingDiverged(UserError):
    exit_code = 3


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_miou: float
    last_metrics: dict[str, Any] | None
    method: Any = None  # the trained method, unwrapped (for scripts and tests)
    main: bool = True  # rank 0 (or no torchrun): the process that reports


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _hide_masks(batch: dict[str, Any]) -> dict[str, Any]:
    """Weakly supervised methods never see masks: ground truth moves to `gt_mask` (metrics only)."""
    batch = dict(batch)
    batch["gt_mask"] = batch.pop("mask")
    return batch


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


def checkpoint_payload(method: Method, specs: list, step: int, best: float, cfg: Any, full: bool = True) -> dict[str, Any]:
    """What a checkpoint holds. `full=False` (best.pt) keeps what `eval`, `pseudo-label` and
    `export` read (config, inference and student weights) and leaves out the training state
    (optimizer moments, method state, RNG) that only `--resume` needs from last.pt."""
    with unwrapped(method):
        inf = method.inference_model()
        has_teacher = inf is not method.model
        payload = {
            "config": cfg.model_dump(mode="json"),
            "method": cfg.method,
            "class_names": method.class_names,
            "num_classes": method.num_classes,
            "step": step,
            "best_miou": best,
            "inference_state": inf.state_dict(),
            "student_state": method.model.state_dict() if has_teacher else None,
            "has_teacher": has_teacher,
            "resumable": full,
        }
        if full:
            payload.update(
                method_state=method.state_dict(),
                optimizers=[s.optimizer.state_dict() for s in specs],
                rng=rng_state(),
            )
        return payload


def _check_finite(method: Method, run_dir: Path, step: int, lr: float) -> None:
    """Refuse to go on (or save) once any parameter or buffer holds inf/NaN: a finite loss can
    hide it (BatchNorm running statistics overflow first), and such a checkpoint scores ~0."""
    with unwrapped(method):
        bad = non_finite_tensors(method.state_dict())
    if bad:
        raise TrainingDiverged(
            f"training diverged by step {step}: {len(bad)} weight tensor(s) hold inf/NaN (e.g. {bad[0]}); "
            f"{_kept(run_dir)}; {_advice(lr)}"
        )


def _kept(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    return f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was saved"


def _advice(lr: float) -> str:
    # --resume keeps the run's learning rate (RESUME_MAY_CHANGE), so the advice is a new run.
    return f"start again with a lower learning rate, e.g. --lr {lr / 10:g} --overwrite (a resumed run keeps its learning rate), or check the data"


# --------------------------------------------------------------------------- the loop


def train(cfg: Any, resume: bool = False, overwrite: bool = False, console: Any = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `cfg.out`; returns the final step and best validation mIoU.

    Order: every check that needs no data (config rules, the run folder), then every data file,
    then the method (its schedule checks), and only then the run folder is written."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    device = resolve_device(cfg.train.device)
    distributed.init(device.type)
    main = distributed.is_main()
    run_dir = Path(cfg.out)

    from semiseg_cli.data import layout_for

    method_cls = get_method(cfg.method)
    num_classes = layout_for(cfg.data).num_classes
    check_run_config(cfg, resume=resume, overwrite=overwrite, num_classes=num_classes)
    data = build_data(cfg, method_cls)
    seed_everything(cfg.train.seed + distributed.rank())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    bl = cfg.data.batch_size
    bu = cfg.data.unlabeled_batch_size or bl
    ctx = TrainContext(
        total_iters=cfg.train.iters, labeled_size=len(data.ds_l), unlabeled_size=len(data.ds_u) if data.ds_u else 0,
        labeled_batch=bl, unlabeled_batch=bu, device=device,
        world_size=distributed.world_size(), rank=distributed.rank(),
    )
    method_cls.check_schedule(cfg, ctx)  # e.g. a warm-up as long as the run
    method = method_cls(cfg, num_classes, list(data.layout.class_names)).to(device)  # loads pretrained weights
    method.setup(ctx)
    speed = resolve_speed(cfg.train, device)
    if speed.channels_last:  # before the optimizers, DDP and any state loaded into the networks
        networks_to_channels_last(method)
    specs = method.configure_optimizers(cfg.train.iters)
    compiled = CompiledNetworks(compile_targets(method)) if speed.compile else None  # lazy: compiles at the first step

    folder = RunFolder(run_dir, resume, overwrite, main)
    board = TensorBoardLog(run_dir / TENSORBOARD_DIR, cfg.train.tensorboard and main, method.class_names,
                           display_palette(num_classes, data.layout.palette), cfg.data.mean, cfg.data.std)
    flush_warnings()  # every check passed: the questionable inputs are worth reading now
    distributed.barrier()
    try:
        with cudnn_benchmark(speed.cudnn_benchmark):
            result = _run(cfg, method, specs, data, device, folder, console, progress and main, board, speed, compiled)
    except BaseException:
        board.close()  # its files go too when the start failed
        folder.discard_failed_start()
        raise
    finally:
        board.close()
        if compiled is not None:
            compiled.release()  # the method returned (and any later use of it) runs eagerly
        distributed.cleanup()  # under torchrun: the process group ends with the run
    result.main = main
    return result


@dataclass
class Run:
    """What the steps of one run share: built once by `start_run`, then passed to each step."""

    cfg: Any
    method: Method
    specs: list
    folder: RunFolder
    device: torch.device
    console: Any
    log: MetricLog
    val_batches: Any
    settings: InferenceSettings
    amp: bool
    main: bool
    board: TensorBoardLog
    best: float = -1.0
    speed: SpeedSettings = SpeedSettings(False, False, False)
    compiled: CompiledNetworks | None = None  # train.compile: the compiled networks while it works

    @property
    def run_dir(self) -> Path:
        return self.folder.path


def resume_from_last(method: Method, specs: list, run_dir: Path) -> tuple[int, float, Any]:
    """(step, best val mIoU, RNG state) of last.pt, loaded into the method and optimizers."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    if not ckpt.get("resumable", True):
        raise UserError(f"{run_dir / 'last.pt'} holds no training state; it cannot be resumed")
    method.load_state_dict(ckpt["method_state"])
    for spec, st in zip(specs, ckpt["optimizers"]):
        # This run's optim.impl and memory format, not the saved run's (both may change on resume).
        spec.optimizer.load_state_dict(adopt_optimizer_impl(st, spec.optimizer))
        match_state_layout(spec.optimizer)
    best = float(ckpt["best_miou"])
    if (run_dir / "best.pt").is_file():  # written after last.pt at the final validation
        best = max(best, float(load_checkpoint(run_dir / "best.pt", mmap=True, verify=False).get("best_miou", -1.0)))
    return int(ckpt["step"]), best, ckpt["rng"]


def wrap_for_ddp(method: Method, cfg: Any, device: torch.device) -> list[nn.Parameter]:
    """Put the student in DDP under torchrun; returns the trainable parameters outside it
    (discriminators, ...), whose gradients the loop averages itself."""
    distributed.broadcast_state(method)  # parts outside DDP (teacher, discriminator) start as rank 0's
    if distributed.is_dist():
        if cfg.model.sync_bn and device.type == "cuda":  # SyncBN needs CUDA; CPU ranks share rank 0's stats
            method.model = nn.SyncBatchNorm.convert_sync_batchnorm(method.model)
        ids = [device.index] if device.type == "cuda" else None
        method.model = nn.parallel.DistributedDataParallel(method.model, device_ids=ids)
    student_ids = {id(p) for p in method.model.parameters()}
    return [p for p in method.parameters() if p.requires_grad and id(p) not in student_ids]


def save(run: Run, name: str, step: int, full: bool) -> None:
    """Write last.pt (`full`, resumable) or best.pt (slim) on rank 0."""
    if run.main:
        payload = checkpoint_payload(run.method, run.specs, step, run.best, run.cfg, full=full)
        save_checkpoint(run.run_dir / name, payload)
        run.folder.checkpointed = True


def save_last(run: Run, step: int) -> None:
    distributed.broadcast_buffers(run.method)
    _check_finite(run.method, run.run_dir, step, run.cfg.optim.lr)
    save(run, "last.pt", step, full=True)


def validate(run: Run, step: int) -> dict[str, Any]:
    """Evaluate the inference model on the val split, log it, keep best.pt; the report."""
    method = run.method
    distributed.broadcast_buffers(method)
    _check_finite(method, run.run_dir, step, run.cfg.optim.lr)
    pictures = run.board.sampler()  # keeps a few of the pass's own predictions; draws no randomness
    # Images of many sizes: no per-shape autotuning or compiling, eager networks.
    with unwrapped(method), cudnn_benchmark(False), (run.compiled.eager() if run.compiled else nullcontext()):
        m = evaluate(method.inference_model(), run.val_batches, method.num_classes, run.settings, run.device,
                     run.cfg.data.ignore_index, run.amp, on_batch=pictures)
    run.log.write({"step": step, "val_mIoU": m.miou, "val_aAcc": m.aacc, "val_mAcc": m.macc})
    run.board.validation(step, m, pictures)
    if run.main:
        run.console.print(f"step {step}: val mIoU {100 * m.miou:.2f}  aAcc {100 * m.aacc:.2f}", highlight=False)
    if m.miou > run.best:
        run.best = m.miou
        save(run, "best.pt", step, full=False)
    return m.as_dict(method.class_names)


def save_curves(run: Run) -> None:
    """RUN/curves.png from metrics.jsonl (rank 0), for a look without TensorBoard."""
    if run.main:
        write_curves(run.run_dir / "metrics.jsonl", run.run_dir / CURVES_PNG)


def _run(cfg: Any, method: Method, specs: list, data: RunData, device: torch.device, folder: RunFolder,
         console: Any, show: bool, board: TensorBoardLog, speed: SpeedSettings | None = None,
         compiled: CompiledNetworks | None = None) -> TrainResult:
    main = distributed.is_main()
    total = cfg.train.iters
    start, best, resume_rng = resume_from_last(method, specs, folder.path) if folder.resume else (0, -1.0, None)
    other_params = wrap_for_ddp(method, cfg, device)
    if main:
        write_text(folder.path / "config.toml", config_to_toml(cfg))
    board.open(start if folder.resume else None)  # a resumed run's events after `start` are purged
    from semiseg_cli.engine.loaders import loader_settings
    pin = loader_settings(cfg.data, device)  # data.pin_memory / persistent_workers / prefetch_factor
    run = Run(
        cfg, method, specs, folder, device, console,
        log=MetricLog(folder.path / "metrics.jsonl", start if folder.resume else None, main),
        val_batches=eval_loader(data.ds_val, cfg.eval.batch_size, cfg.data.workers, pin),
        settings=InferenceSettings.from_config(cfg), amp=cfg.train.amp and device.type == "cuda", main=main,
        board=board, best=best, speed=speed or SpeedSettings(False, False, False), compiled=compiled,
    )
    if start >= total:
        if main:
            console.print(f"[yellow]{folder.path} already finished {start} of {total} iterations; nothing to train")
        # A finished run whose final validation failed (after last.pt was written) validates now.
        last_metrics = None if run.log.has_validation(start) else validate(run, start)
        save_curves(run)
        return TrainResult(folder.path, start, run.best, last_metrics, method)

    accum = cfg.train.grad_accum
    bl = cfg.data.batch_size
    bu = cfg.data.unlabeled_batch_size or bl
    it_l = infinite_loader(data.ds_l, bl, cfg.data.workers, cfg.train.seed, 0, start * accum, pin)
    it_u = infinite_loader(data.ds_u, bu, cfg.data.workers, cfg.train.seed, 1, start * accum, pin) if data.ds_u else None
    # A second, independently shuffled pass over the unlabeled pool for methods that mix each
    # image with a partner from another batch (FixMatch/UniMatch's CutMix, as the official code).
    it_p = (infinite_loader(data.ds_u, bu, cfg.data.workers, cfg.train.seed, 2, start * accum, pin)
            if data.ds_u and method.unlabeled_partner else None)
    draw = _micro_batches(method, (it_l, it_u, it_p), device, run.speed.channels_last)
    meter = StepMeter()
    plain = show and not getattr(console, "is_terminal", False)  # no live bar off a terminal: lines instead
    bar = _progress(console, enabled=show and not plain)
    task = bar.add_task("train", total=total, completed=start, info="")
    last_metrics: dict[str, Any] | None = None
    method.train()
    if resume_rng is not None:  # last, so that building loaders above draws nothing from it
        set_rng_state(resume_rng)
    with bar:
        for step in range(start, total):
            meter.add(_iteration(run, draw, accum, step))
            distributed.average_gradients(other_params)
            for spec in specs:
                if step % spec.every == 0:
                    spec.set_lr(step)
                    spec.optimizer.step()
            with unwrapped(method):
                method.after_optimizer_step(step)
            done = step + 1
            if done % cfg.train.log_interval == 0 or done == total:
                rec = meter.record(done, specs, method)
                run.log.write(rec)
                run.board.scalars(rec)
                info = f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['it_per_s']:.2f} it/s"
                bar.update(task, info=info)
                if plain:
                    console.print(f"step {done}/{total}  {info}", highlight=False)
            bar.update(task, completed=done)
            if done == total:
                # The final checkpoint comes before the final validation: a validation that fails
                # then costs nothing but a rerun with --resume, which validates again.
                save_last(run, done)
                last_metrics = validate(run, done)
                break
            # Mid-run, validation first: its loader draws from the RNG that last.pt stores, so
            # this order is what makes a resumed run bit-identical to an uninterrupted one.
            if cfg.train.val_interval and done % cfg.train.val_interval == 0:
                last_metrics = validate(run, done)
            if done % cfg.train.ckpt_interval == 0:
                save_last(run, done)
                distributed.barrier()
    distributed.barrier()
    save_curves(run)
    method.model = distributed.unwrap(method.model)
    return TrainResult(folder.path, max(start, total), run.best, last_metrics, method)


class StepMeter:
    """Sums of the logged values since the last log record, with per-key counts (a method may
    log a value on some steps only, e.g. when masks exist), and the iteration rate."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, values: dict[str, tuple[torch.Tensor, int]]) -> None:
        for k, (v, c) in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + c
        self.steps += 1

    def record(self, step: int, specs: list, method: Method) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": step, **{k: round(float(v) / self.counts[k], 6) for k, v in self.sums.items()}}
        rec["lr"] = specs[0].optimizer.param_groups[0]["lr"]
        rec["it_per_s"] = round(self.steps / max(time.perf_counter() - self.t0, 1e-9), 4)
        rec.update(method.extra_log())
        self.reset()
        return rec


MicroBatch = tuple[dict[str, Any], Optional[dict[str, Any]]]  # (labeled, unlabeled)


def _micro_batches(method: Method, streams: tuple[Any, Any, Any], device: torch.device,
                   channels_last: bool) -> Callable[[], MicroBatch]:
    """The next (labeled, unlabeled) micro-batch on the device, each call. `streams`: the
    labeled, unlabeled and partner iterators (the last two may be None)."""
    it_l, it_u, it_p = streams

    def draw() -> MicroBatch:
        batch_l = to_device(next(it_l), device)
        if method.uses_tags:
            batch_l = _hide_masks(batch_l)
        batch_u = to_device(next(it_u), device) if it_u is not None else None
        if batch_u is not None and it_p is not None:
            batch_u["partner"] = to_device(next(it_p), device)
        if channels_last:  # at the device copy, as the networks' weights
            return batch_to_channels_last(batch_l), batch_to_channels_last(batch_u)
        return batch_l, batch_u

    return draw


def _iteration(run: Run, draw: Callable[[], MicroBatch], accum: int, step: int) -> dict[str, tuple[torch.Tensor, int]]:
    """`_train_step`, and with train.compile the way back when torch.compile fails.

    torch compiles at the first call of each new input shape (the first iteration, and e.g.
    U2PL's first semi-supervised one), so a failure surfaces inside a step. The iteration then
    runs again eagerly from the same micro-batches and RNG state, with the method's state as
    it was before the first compiled iteration (a copy kept for that one only: later failures,
    rare once the first shapes compiled, keep whatever the failed attempt's forward had already
    updated, e.g. BatchNorm statistics). Data errors, a diverged loss and running out of
    memory are not compile failures and stop the run as without compile."""
    rest = (run.device, accum, run.amp, step, run.run_dir, run.cfg.optim.lr)
    compiled = run.compiled
    if compiled is None or not compiled.active:
        return _train_step(run.method, run.specs, draw, *rest)
    drawn: list[MicroBatch] = []
    data_failed = False

    def recorded() -> MicroBatch:
        nonlocal data_failed
        try:
            batch = draw()
        except BaseException:
            data_failed = True
            raise
        drawn.append(batch)
        return batch

    rng = rng_state()
    snapshot = ({k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                 for k, v in run.method.state_dict().items()} if compiled.first else None)
    try:
        out = _train_step(run.method, run.specs, recorded, *rest)
    except (UserError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the compiler raised; an eager rerun shows a real error again
        if data_failed:
            raise
        compiled.fall_back(e)
        flush_warnings()
        set_rng_state(rng)
        if snapshot is not None:
            run.method.load_state_dict(snapshot)
        replay = iter(drawn)
        out = _train_step(run.method, run.specs, lambda: next(replay, None) or draw(), *rest)
    compiled.first = False
    return out


def _train_step(method: Method, specs: list, draw: Callable[[], MicroBatch], device: torch.device, accum: int, amp: bool,
                step: int, run_dir: Path, lr: float) -> dict[str, tuple[torch.Tensor, int]]:
    """One iteration's forward/backward passes: `accum` micro-batches from `draw`, gradients
    summed. Returns each logged value summed over the micro-batches, with its count."""
    for spec in specs:
        spec.optimizer.zero_grad(set_to_none=True)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for micro in range(accum):
        batch_l, batch_u = draw()
        sync = micro == accum - 1 or not isinstance(method.model, nn.parallel.DistributedDataParallel)
        with (nullcontext() if sync else method.model.no_sync()):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                losses = method.training_step(batch_l, batch_u, step)
            loss = losses["loss"]
            if not torch.isfinite(loss.detach()):
                _diverged(run_dir, step, losses, lr)
            (loss / accum).backward()
        for k, v in losses.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            s, c = out.get(k, (0.0, 0))
            out[k] = (s + v, c + 1)  # type: ignore[assignment]
    return out


def _diverged(run_dir: Path, step: int, losses: dict[str, torch.Tensor], lr: float) -> None:
    bad = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v.detach()).all()]
    raise TrainingDiverged(
        f"loss became non-finite at step {step} ({', '.join(bad) or 'loss'}); {_kept(run_dir)}; {_advice(lr)}"
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
