"""The speed switches (train.channels_last, train.cudnn_benchmark, train.compile, optim.impl):
defaults as documented, bad values refused in one line, and the same results as the plain path
on tiny models, through one method step and through the loop, resume included. The loop runs
use dropout 0: compiled networks may draw dropout masks from inductor's own random numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import tests.test_cam_baseline as t_cam
import tests.test_dupl as t_dupl
import tests.test_u2pl as t_u2pl
import tests.test_unimatch_v2 as t_v2
from semiseg_cli.config import build_config
from semiseg_cli.engine import loop, perf
from semiseg_cli.engine.checkpoint import load_checkpoint
from semiseg_cli.engine.setup import resolve_run_config
from semiseg_cli.errors import UserError
from semiseg_cli.methods.base import Method, make_optimizer, optimizer_impl, resolve_optimizer_impl
from tests.method_harness import batches_for, build_method, make_cfg

NO_DROPOUT = ["model.dropout=0.0"]
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- defaults and bounds


def test_defaults_resolve_as_documented() -> None:
    cfg = build_config(None)
    assert (cfg.train.channels_last, cfg.train.cudnn_benchmark, cfg.train.compile, cfg.optim.impl) == ("auto", "auto", False, "auto")
    assert perf.resolve_speed(cfg.train, CPU) == perf.SpeedSettings(channels_last=False, cudnn_benchmark=False, compile=False)
    # On CUDA (resolution only: nothing touches a GPU here) both are on, benchmark not when deterministic.
    cuda = torch.device("cuda")
    assert perf.resolve_speed(cfg.train, cuda) == perf.SpeedSettings(True, True, False)
    det = build_config(None, ["train.deterministic=true"]).train
    assert perf.resolve_speed(det, cuda) == perf.SpeedSettings(True, False, False)
    forced = build_config(None, ["train.channels_last=true", "train.cudnn_benchmark=false", "train.compile=true"]).train
    assert perf.resolve_speed(forced, CPU) == perf.SpeedSettings(True, False, True)
    # optim.impl = auto: plain on the CPU (torch's own default there), fused on CUDA where torch has it.
    assert resolve_optimizer_impl("auto", torch.optim.SGD, on_cuda=False) == "plain"
    assert resolve_optimizer_impl("auto", torch.optim.SGD, on_cuda=True) == "fused"
    assert resolve_optimizer_impl("auto", torch.optim.AdamW, on_cuda=True) == "fused"
    assert resolve_optimizer_impl("auto", torch.optim.Adamax, on_cuda=True) == "foreach"  # no fused kernels
    m = build_method(make_cfg("supervised"), 4)
    assert [optimizer_impl(s.optimizer) for s in m.configure_optimizers(4)] == ["plain"]
    adv = build_method(make_cfg("advsemiseg", overrides=["optim.impl=\"foreach\""]), 4)
    assert [optimizer_impl(s.optimizer) for s in adv.configure_optimizers(4)] == ["foreach", "foreach"]  # D's Adam too


@pytest.mark.parametrize("setting, key", [
    ('train.channels_last="maybe"', "train.channels_last"),
    ('train.cudnn_benchmark="fast"', "train.cudnn_benchmark"),
    ("train.compile=3", "train.compile"),
    ('optim.impl="apex"', "optim.impl"),
])
def test_bad_values_are_refused_in_one_line(setting: str, key: str) -> None:
    with pytest.raises(UserError) as e:
        build_config(None, [setting])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_benchmark_and_deterministic_contradict_each_other() -> None:
    with pytest.raises(UserError, match="train.cudnn_benchmark.*deterministic") as e:
        build_config(None, ["train.deterministic=true", "train.cudnn_benchmark=true"])
    assert "\n" not in str(e.value)
    assert build_config(None, ["train.deterministic=true"]).train.cudnn_benchmark == "auto"  # auto: off there


# ----------------------------------------------------------------------------- channels_last, one step

# Each method at settings where every loss term runs (the method test modules' own).
METHODS = {
    "supervised": ([], 0),
    "u2pl": (t_u2pl.TestU2PL.overrides, t_u2pl.TestU2PL.step),
    "fixmatch": (["fixmatch.conf_thresh=0.0"], 0),
    "unimatch": (["unimatch.conf_thresh=0.0"], 0),
    "advsemiseg": (["advsemiseg.semi_start=0"], 0),
    "dupl": (t_dupl.TestDuPL.overrides, 0),
    "cam_baseline": (t_cam.TestCAMBaseline.overrides, 0),
    "unimatch_v2": (t_v2.TestUniMatchV2.overrides, 0),
}


# AdvSemiSeg casts its logits to float32 for the discriminator, so it runs in float32 here.
FLOAT32_ONLY = {"advsemiseg"}


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch.to(dtype) if isinstance(batch, torch.Tensor) and batch.is_floating_point() else batch


def _step(method: Any, lab: dict[str, Any], unl: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the same draws (CutMix boxes, strong views) for both layouts
    loss = method.training_step(lab, unl, step)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(METHODS))
def test_channels_last_step_gives_the_plain_loss_and_gradients(name: str) -> None:
    """In float64, where rounding cannot hide a real difference (in float32 it grows towards
    the input through a random-init network, and near-uniform predictions put pixels on the
    thresholds and argmax ties that rounding flips)."""
    if name == "unimatch_v2" and importlib.util.find_spec("timm") is None:
        pytest.fail("timm is a test dependency (semiseg[test]); the DPT network needs it")
    overrides, step = METHODS[name]
    dtype = torch.float32 if name in FLOAT32_ONLY else torch.float64
    cfg = make_cfg(name, overrides=[*overrides, "model.dropout=0.3"])  # channel-wise masks: the same in both layouts
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        m = build_method(cfg, 4).to(dtype)
        m.train()
        lab, unl = (_cast(b, dtype) for b in batches_for(m, 4))
        if channels_last:
            perf.networks_to_channels_last(m)
            lab, unl = perf.batch_to_channels_last(lab), perf.batch_to_channels_last(unl)
            convs = [p for p in m.parameters() if p.dim() == 4]
            assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
            assert lab["image"].is_contiguous(memory_format=torch.channels_last)
        runs.append(_step(m, lab, unl, step))
    (loss0, g0), (loss1, g1) = runs
    assert g0.keys() == g1.keys()
    if dtype == torch.float64:
        assert torch.allclose(loss0, loss1, rtol=1e-9, atol=1e-12), (loss0, loss1)
        for k in g0:
            assert (g0[k] - g1[k]).abs().max() <= 1e-6 * g0[k].abs().max() + 1e-10, k
    else:  # float32: the gradient as a whole (single tensors cancel through the discriminator)
        assert torch.allclose(loss0, loss1, rtol=1e-4, atol=1e-6), (loss0, loss1)
        diff = sum(float((g0[k] - g1[k]).square().sum()) for k in g0) ** 0.5
        assert diff <= 2e-2 * sum(float(g0[k].square().sum()) for k in g0) ** 0.5


def test_batch_conversion_leaves_masks_tags_and_names() -> None:
    b = {"image": torch.randn(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.long), "name": ["a", "b"],
         "partner": {"image": torch.randn(2, 3, 8, 8), "tags": torch.ones(2, 4)}}
    out = perf.batch_to_channels_last(b)
    assert out["image"].is_contiguous(memory_format=torch.channels_last) and not out["image"].is_contiguous()
    assert out["partner"]["image"].is_contiguous(memory_format=torch.channels_last)
    assert out["mask"] is b["mask"] and out["name"] is b["name"] and out["partner"]["tags"] is b["partner"]["tags"]
    assert perf.batch_to_channels_last(None) is None


# ----------------------------------------------------------------------------- optimizer implementations


@pytest.mark.parametrize("cls, hyper", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    (torch.optim.AdamW, {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 1e-4}),
    (torch.optim.Adam, {"lr": 0.01, "betas": (0.5, 0.99)}),  # AdvSemiSeg's discriminator
])
def test_optimizer_impls_give_the_same_parameters(cls: type, hyper: dict[str, Any]) -> None:
    results = {}
    for impl in ("plain", "foreach", "fused"):
        torch.manual_seed(0)
        # No bias before the BN: its gradient is rounding noise, which Adam's normalisation amplifies.
        net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        net.to(memory_format=torch.channels_last)
        groups = [{"params": list(net[0].parameters()), "lr": hyper["lr"]}, {"params": list(net[1:].parameters()), "lr": hyper["lr"] * 10}]
        opt = make_optimizer(cls, groups, impl, **hyper)
        assert optimizer_impl(opt) == impl
        for i in range(3):
            opt.zero_grad()
            torch.manual_seed(i)
            net(torch.randn(2, 3, 6, 6)).square().mean().backward()
            opt.step()
        results[impl] = [p.detach().clone() for p in net.parameters()]
    for impl in ("foreach", "fused"):
        for a, b in zip(results["plain"], results[impl]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), impl


def test_fused_where_torch_has_none_warns_once_and_uses_foreach(capsys: pytest.CaptureFixture[str]) -> None:
    p = [nn.Parameter(torch.randn(3))]
    opt = make_optimizer(torch.optim.Adamax, p, "fused", lr=0.1)
    assert optimizer_impl(opt) == "foreach"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "optim.impl" in lines[0] and "foreach" in lines[0]


def test_resumed_optimizer_takes_this_runs_impl_and_layout() -> None:
    net = nn.Conv2d(3, 4, 3)
    old = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=False)
    net(torch.randn(1, 3, 5, 5)).sum().backward()
    old.step()
    saved = old.state_dict()
    net.to(memory_format=torch.channels_last)  # the resumed run converts before loading
    new = make_optimizer(torch.optim.SGD, net.parameters(), "foreach", lr=0.1, momentum=0.9)
    new.load_state_dict(perf.adopt_optimizer_impl(saved, new))
    perf.match_state_layout(new)
    assert optimizer_impl(new) == "foreach"
    buf = new.state[net.weight]["momentum_buffer"]
    assert buf.stride() == net.weight.stride() and torch.equal(buf, old.state[next(iter(old.state))]["momentum_buffer"])
    assert saved["param_groups"][0]["foreach"] is False  # the checkpoint's own dict is left alone


# ----------------------------------------------------------------------------- through the loop


def _cfg(demo_root: Path, out: Path, *extra: str, iters: int = 4) -> Any:
    # Constant LR so that a 2-iteration run resumed to 4 follows the 4-iteration run's schedule; a
    # small one, because these runs test the loop's wiring of the switches, not their numerics
    # (the float64 tests above do): at a large one four steps of SGD on batch-2 BatchNorm amplify
    # float32 rounding beyond any fixed tolerance on some data.
    return make_cfg("supervised", root=str(demo_root), out=str(out), overrides=[
        'data.labeled="1/2"', *NO_DROPOUT, "optim.poly_power=0", "optim.lr=0.001", f"train.iters={iters}", *extra])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["method_state"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=tol, atol=tol), k


def _assert_same_run(a: Path, b: Path) -> None:
    """The same run up to float32 rounding: every logged loss within 1e-3 (the fourth step
    differs by ~2e-4 under channels_last), the weights as a whole within 1e-3. Single tensors
    are no measure here: BatchNorm biases a few 1e-4 in size, updated from gradients that
    cancel, differ by a third of themselves after four steps, and the running variances of
    the ASPP pooling branch are variances of two pooled values per channel (batch 2), which
    rounding moves by several per cent; they are left out."""
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=1e-3)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    keys = [k for k in wa if wa[k].is_floating_point() and not k.endswith("running_var")]
    diff = sum(float((wa[k].float() - wb[k].float()).square().sum()) for k in keys) ** 0.5
    assert diff <= 1e-3 * sum(float(wa[k].float().square().sum()) for k in keys) ** 0.5
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not wa[k].is_floating_point())  # step counters


@pytest.fixture(scope="module")
def plain_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perf") / "plain"
    loop.train(_cfg(demo_root, out, "train.val_interval=2"), progress=False)
    return out


def test_channels_last_and_foreach_through_the_loop_match_plain(demo_root: Path, tmp_path: Path, plain_run: Path) -> None:
    out = tmp_path / "fast"
    loop.train(_cfg(demo_root, out, "train.val_interval=2", "train.channels_last=true", 'optim.impl="foreach"'), progress=False)
    _assert_same_run(plain_run, out)
    assert torch.backends.cudnn.benchmark is False  # the global flag is back as it was


def test_resume_may_switch_them_and_continues_the_same_run(demo_root: Path, tmp_path: Path, plain_run: Path) -> None:
    out = tmp_path / "cut"
    loop.train(_cfg(demo_root, out, "train.val_interval=2", iters=2), progress=False)
    stored = load_checkpoint(out / "last.pt")["config"]
    assert stored["train"]["channels_last"] == "auto"
    cfg = resolve_run_config(None, None, [f'out="{out}"', "train.iters=4", "train.channels_last=true",
                                          'optim.impl="foreach"', "train.cudnn_benchmark=false"], {}, resume=True)
    assert cfg.train.channels_last is True and cfg.optim.impl == "foreach"
    loop.train(cfg, resume=True, progress=False)
    _assert_same_run(plain_run, out)


# ----------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Any:
    import torch._dynamo

    torch._dynamo.reset()
    yield monkeypatch
    torch._dynamo.reset()


def _compile_warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning: train.compile")]


def test_compiled_loop_matches_plain(demo_root: Path, tmp_path: Path, plain_run: Path, fresh_dynamo: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The real network through dynamo and AOTAutograd (the `aot_eager` backend: inductor's
    code generation takes a minute per graph on a CPU; the next test runs inductor itself on a
    tiny network). Validation at step 2 runs the networks eagerly in between."""
    fresh_dynamo.setattr(perf, "COMPILE_KWARGS", {"backend": "aot_eager"})
    out = tmp_path / "compiled"
    res = loop.train(_cfg(demo_root, out, "train.val_interval=2", "train.compile=true"), progress=False)
    assert _compile_warnings(capsys.readouterr().err) == []
    _assert_same_run(plain_run, out)
    assert res.method.model._compiled_call_impl is None  # released: the returned method runs eagerly


class _TinySeg(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _TinyTeacherStudent(Method):
    """A two-network method (student + a teacher of the same class) small enough for inductor on a CPU."""

    name = "tiny"

    @classmethod
    def build_inference_model(cls, cfg: Any, num_classes: int) -> nn.Module:
        return _TinySeg(num_classes)

    def __init__(self, cfg: Any, num_classes: int, class_names: list[str]) -> None:
        super().__init__(cfg, num_classes, class_names)
        self.teacher = _TinySeg(num_classes).requires_grad_(False)

    def training_step(self, labeled: dict[str, Any], unlabeled: Any, step: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher(labeled["image"]).argmax(1)
        logits = self.model(labeled["image"])
        loss = nn.functional.cross_entropy(logits, labeled["mask"]) + nn.functional.cross_entropy(logits, target)
        return {"loss": loss}


def _tiny_iterations(compile_on: bool, iters: int = 3) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    cfg = make_cfg("supervised", overrides=NO_DROPOUT)
    torch.manual_seed(0)
    m = _TinyTeacherStudent(cfg, 3, ["a", "b", "c"])
    m.train()
    specs = m.configure_optimizers(iters)
    compiled = perf.CompiledNetworks(perf.compile_targets(m)) if compile_on else None
    run = SimpleNamespace(method=m, specs=specs, compiled=compiled, device=CPU, amp=False, run_dir=Path("."), cfg=cfg)
    g = torch.Generator().manual_seed(1)
    batches = [({"image": torch.randn(2, 3, 16, 16, generator=g), "mask": torch.randint(0, 3, (2, 16, 16), generator=g)}, None)
               for _ in range(iters)]
    losses = []
    for step in range(iters):
        it = iter([batches[step]])
        out = loop._iteration(run, lambda: next(it), 1, step)  # type: ignore[arg-type]
        for s in specs:
            s.optimizer.step()
        losses.append(float(out["loss"][0]))
    return losses, {k: v.clone() for k, v in m.state_dict().items()}, compiled


def test_inductor_compiles_a_tiny_method_or_falls_back_with_one_warning(fresh_dynamo: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """torch.compile's default backend where this machine can run it (a C compiler on the CPU);
    where it cannot, the fallback: one warning line, then the same results eagerly."""
    plain_losses, plain_state, _ = _tiny_iterations(False)
    losses, state, compiled = _tiny_iterations(True)
    warnings = _compile_warnings(capsys.readouterr().err)
    targets = compiled.modules
    assert len(targets) == 2 and {type(t) for t in targets} == {_TinySeg}  # student and teacher
    if compiled.active:
        assert warnings == []
    else:
        assert len(warnings) == 1, warnings
    assert losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    _assert_close(plain_state, state)
    with compiled.eager():
        assert all(t._compiled_call_impl is None for t in targets)
    compiled.release()


def _failing_backend(gm: Any, example_inputs: Any) -> Any:
    raise RuntimeError("no C compiler here (a test backend)")


def _failing_backward_backend() -> Any:
    from torch._dynamo.backends.common import aot_autograd

    def bw(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("backward lowering failed (a test backend)")

    return aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=bw)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failed_compile_warns_once_and_the_run_goes_on_eagerly(where: str, demo_root: Path, tmp_path: Path, plain_run: Path,
                                                                 fresh_dynamo: Any, capsys: pytest.CaptureFixture[str]) -> None:
    backend = _failing_backend if where == "forward" else _failing_backward_backend()
    fresh_dynamo.setattr(perf, "COMPILE_KWARGS", {"backend": backend})
    out = tmp_path / where
    res = loop.train(_cfg(demo_root, out, "train.val_interval=2", "train.compile=true"), progress=False)
    warnings = _compile_warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and "training goes on without it" in warnings[0], warnings
    assert res.step == 4
    # The failed first iteration ran again from the same batches, RNG and state: the plain run.
    _assert_close(_weights(plain_run), _weights(out))
    assert _losses(out) == _losses(plain_run)


def test_errors_that_are_not_the_compilers_still_stop_the_run(demo_root: Path, tmp_path: Path, fresh_dynamo: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A diverged loss under compile is the run's problem, not a reason to fall back."""
    from semiseg_cli.methods.supervised import Supervised

    fresh_dynamo.setattr(perf, "COMPILE_KWARGS", {"backend": "eager"})
    original = Supervised.training_step

    def nan_loss(self: Any, labeled: Any, unlabeled: Any, step: int) -> Any:
        losses = original(self, labeled, unlabeled, step)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(Supervised, "training_step", nan_loss)
    with pytest.raises(loop.TrainingDiverged):
        loop.train(_cfg(demo_root, tmp_path / "nan", "train.compile=true"), progress=False)


# ----------------------------------------------------------------------------- the bench


def test_flops_bench_runs_at_a_tiny_size_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "flops.json"
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "bench" / "bench_flops.py"), "--device", "cpu", "--tiny", "--methods", "supervised,u2pl",
           "--variants", "plain,channels_last,fused", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["method"], r["variant"]) for r in rows] == [
        (m, v) for m in ("supervised", "u2pl") for v in ("plain", "channels_last", "fused")]
    for r in rows:
        assert "error" not in r, r
        assert r["tflop_per_step"] > 0 and r["achieved_tflops"] > 0 and r["step_s_median"] > 0
    assert rows[1]["speed_switches"].startswith("channels_last on") and rows[2]["speed_switches"].endswith("optimizer fused")
    assert rows[0]["tflop_per_step"] == rows[2]["tflop_per_step"]  # counted once: the same arithmetic
    assert rows[3]["tflop_per_step"] > rows[0]["tflop_per_step"]  # U2PL: twice the images and a teacher
    assert res["memory_fit"]["result"] == "needs CUDA"
    assert "achieved_tflops" in done.stdout
