"""Time one training step of several methods at the same preset, batch and crop, and eval throughput.

Methods are timed round-robin in one process (warm-up first), so their ratio is measured under
the same machine load; the median step time of each is reported (wall clock, and process CPU
time, which other jobs on a shared machine disturb less), with the ratio to the first method, the
peak GPU memory per image on CUDA, and eval images/s of the inference network. On a Linux CPU
the step's memory is the rise of the process's resident-set high-water mark during one step above
the resident set just before it (freed heap returned to the OS first, `malloc_trim`; the peak is
reset through /proc/self/clear_refs): activations, gradients and optimiser state touched by the
step, not the weights resident before it. It is approximate (allocator caching), a ratio guide. Every method is
built from the same preset; the supervised one without the heads only other methods' losses use
(`SUPERVISED_OVERRIDES`), and `--set` options of another method's section are skipped.

    python bench/bench_train_step.py --preset supervised_mbv2-os16_1x4-300it_camvid-176x224 \
        --methods supervised,u2pl --device cpu --steps 10

A method entry may be a labelled variant, `LABEL=METHOD+key=value+key=value`, e.g.
`--methods dupl,plain=dupl+dupl.gmm=false+dupl.consistency=false`.
The steps run with the config's speed switches as training would (engine/perf.py: channels_last,
cudnn.benchmark, optim.impl, torch.compile; on CUDA the defaults turn the first three on), so
`--set train.channels_last=false` and the like time the step without one; each row records them.
bench/bench_flops.py times the switches one after another.
Writes bench/results/train_step_<preset>_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semiseg_cli.config import METHOD_NAMES, build_config  # noqa: E402
from semiseg_cli.engine.device import resolve_device  # noqa: E402
from semiseg_cli.methods import get_method  # noqa: E402
from semiseg_cli.engine.perf import (  # noqa: E402
    CompiledNetworks, batch_to_channels_last, compile_targets, cudnn_benchmark, networks_to_channels_last, resolve_speed,
)
from semiseg_cli.methods.base import TrainContext, optimizer_impl  # noqa: E402

SUPERVISED_OVERRIDES = ["model.rep_head=false"]


def synthetic_batch(b: int, crop: tuple[int, int], num_classes: int, device: torch.device, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    h, w = crop
    mask = torch.randint(0, num_classes, (b, -(-h // 16), -(-w // 16)), generator=g)
    mask = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :h, :w]  # any crop (513, 321)
    image = torch.randn(b, 3, h, w, generator=g) + mask.unsqueeze(1).float() * 0.3
    tags = torch.zeros(b, num_classes)
    for i in range(b):
        tags[i, mask[i].unique()] = 1
    return {
        "image": image.to(device), "mask": mask.to(device), "has_mask": torch.ones(b, dtype=torch.bool, device=device),
        "tags": tags.to(device), "name": [f"s{i}" for i in range(b)], "index": torch.arange(b, device=device),
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuStepMemory:
    """The rise of VmHWM over VmRSS across one step (Linux only; None elsewhere)."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        self.libc = None
        try:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = _proc_status_kib("VmHWM") is not None
        except (OSError, AttributeError):
            self.ok = False

    def start(self) -> None:
        if self.ok:
            import gc

            gc.collect()
            self.libc.malloc_trim(0)  # type: ignore[union-attr]
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.rss0 = _proc_status_kib("VmRSS") or 0

    def stop(self) -> float | None:
        if not self.ok:
            return None
        return ((_proc_status_kib("VmHWM") or 0) - self.rss0) / 1024


def parse_method(spec: str) -> tuple[str, str, list[str]]:
    """"u2pl" -> ("u2pl", "u2pl", []); "plain=dupl+dupl.gmm=false" -> ("plain", "dupl", [...])."""
    head, *extra = spec.split("+")
    label, _, method = head.rpartition("=")
    return label or method, method, extra


class Runner:
    def __init__(self, spec: str, preset: str, overrides: list[str], num_classes: int, device: torch.device, step: int) -> None:
        self.name, method, extra = parse_method(spec)
        overrides = [*overrides, *extra]
        # Another method's options (`--set u2pl.x=...`) do not apply to this one.
        overrides = [o for o in overrides if o.split(".", 1)[0].strip() not in set(METHOD_NAMES) - {method}]
        if method == "supervised":
            # A semi-supervised preset may turn on heads its own losses need (U2PL's `rep_head`);
            # the supervised baseline would compute them for nothing and make the ratio unfair.
            overrides = [*overrides, *SUPERVISED_OVERRIDES]
        cfg = build_config(preset, overrides, method)
        self.cfg = cfg
        cls = get_method(method)
        cls.check_config(cfg, num_classes)
        torch.manual_seed(0)
        self.method = cls(cfg, num_classes, [f"c{i}" for i in range(num_classes)]).to(device)
        bl = cfg.data.batch_size
        bu = cfg.data.unlabeled_batch_size or bl
        self.method.setup(TrainContext(total_iters=max(step + 100, cfg.train.iters), labeled_size=1000, unlabeled_size=1000,
                                       labeled_batch=bl, unlabeled_batch=bu, device=device))
        self.speed = resolve_speed(cfg.train, device)  # as the training loop applies them
        if self.speed.channels_last:
            networks_to_channels_last(self.method)
        self.specs = self.method.configure_optimizers(max(step + 100, cfg.train.iters))
        self.compiled = CompiledNetworks(compile_targets(self.method)) if self.speed.compile else None
        crop = tuple(cfg.data.crop_size)
        self.lab = synthetic_batch(bl, crop, num_classes, device, 0)  # type: ignore[arg-type]
        if cls.uses_tags:
            self.lab["gt_mask"] = self.lab.pop("mask")
        self.unl = synthetic_batch(bu, crop, num_classes, device, 1) if cls.uses_unlabeled else None  # type: ignore[arg-type]
        if self.unl is not None and cls.unlabeled_partner:  # FixMatch/UniMatch: the second unlabeled stream
            self.unl["partner"] = synthetic_batch(bu, crop, num_classes, device, 2)  # type: ignore[arg-type]
        if self.speed.channels_last:
            self.lab, self.unl = batch_to_channels_last(self.lab), batch_to_channels_last(self.unl)
        self.images = bl + (bu if self.unl is not None else 0)
        self.device = device
        self.step = step
        self.amp = cfg.train.amp and device.type == "cuda"
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time: less sensitive to other jobs on a shared machine
        self.method.train()

    def switches(self) -> str:
        """The speed switches this runner steps with, in words (recorded with each row)."""
        return f"{self.speed.describe()}, optimizer {'/'.join(optimizer_impl(s.optimizer) for s in self.specs)}"

    def run(self, record: bool) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with cudnn_benchmark(self.speed.cudnn_benchmark):
            for s in self.specs:
                s.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                losses = self.method.training_step(self.lab, self.unl, self.step)
            losses["loss"].backward()
            for s in self.specs:
                s.optimizer.step()
            self.method.after_optimizer_step(self.step)
            sync()
        if record:
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(time.process_time() - c0)


@torch.no_grad()
def eval_throughput(runner: Runner, iters: int) -> float:
    if runner.compiled is not None:  # as validation: eager networks
        with runner.compiled.eager():
            return _eval_throughput(runner, iters)
    return _eval_throughput(runner, iters)


def _eval_throughput(runner: Runner, iters: int) -> float:
    model = runner.method.inference_model().eval()
    x = runner.lab["image"]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        model(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        with torch.autocast(runner.device.type, dtype=torch.bfloat16, enabled=runner.amp):
            model(x)
    sync()
    return iters * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--methods", default="supervised,u2pl")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=None, help="default: the preset's dataset")
    ap.add_argument("--at-step", type=int, default=100000, help="step index passed to methods (past warm-ups)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    device = resolve_device(args.device)
    nc = args.num_classes
    if nc is None:
        nc = {"voc": 21, "cityscapes": 19, "camvid": 11, "demo": 5, "folder": 5}[build_config(args.preset).data.dataset]
    runners = [Runner(m, args.preset, args.overrides, nc, device, args.at_step) for m in args.methods.split(",")]
    for _ in range(args.warmup):
        for r in runners:
            r.run(record=False)
    peaks: dict[str, float] = {}
    cpu_mem = CpuStepMemory() if device.type == "cpu" else None
    for i in range(args.steps):
        for r in runners:  # round-robin: every method sees the same load
            if device.type == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats()
            if cpu_mem is not None and i == 0:
                cpu_mem.start()
            r.run(record=True)
            if device.type == "cuda" and i == 0:
                peaks[r.name] = torch.cuda.max_memory_allocated() / 2**20
            if cpu_mem is not None and i == 0:
                got = cpu_mem.stop()
                if got is not None:
                    peaks[r.name] = got
    base = statistics.median(runners[0].times)
    base_cpu = statistics.median(runners[0].cpu_times)
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        rows.append({
            "method": r.name, "step_s_median": round(med, 4), "step_s_min": round(min(r.times), 4),
            "ratio_to_first": round(med / base, 3),
            "cpu_s_median": round(statistics.median(r.cpu_times), 4),
            "cpu_ratio_to_first": round(statistics.median(r.cpu_times) / base_cpu, 3), "images_per_step": r.images,
            "peak_mem_mib": round(peaks[r.name], 1) if r.name in peaks else None,
            "peak_mem_mib_per_image": round(peaks[r.name] / r.images, 1) if r.name in peaks else None,
            "eval_images_per_s": round(eval_throughput(r, max(2, args.steps // 2)), 2),
            "speed_switches": r.switches(),
        })
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step, {args.preset} on {device} ({args.steps} timed steps each)")
    cols = [c for c in rows[0] if c != "speed_switches"]
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[str(row[c]) for c in cols])
    Console().print(table)
    for row in rows:
        print(f"{row['method']}: {row['speed_switches']}")
    out = args.out or Path(__file__).parent / "results" / f"train_step_{args.preset}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "device": str(device), "torch": torch.__version__, "host": platform.node(),
            "cpu_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "steps": args.steps, "overrides": args.overrides,
            "supervised_overrides": SUPERVISED_OVERRIDES if "supervised" in args.methods.split(",") else [],
            "peak_mem": ("torch.cuda.max_memory_allocated over the first timed step" if device.type == "cuda"
                         else "CPU: rise of VmHWM over VmRSS across the first timed step, after malloc_trim"),
            "crop": list(runners[0].cfg.data.crop_size)}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
