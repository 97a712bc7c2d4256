"""The training loop: checkpoints, exact resume, NaN stop, run-folder rules, torchrun on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg_cli.engine.checkpoint import load_checkpoint, load_for_inference
from semiseg_cli.engine.loop import TrainingDiverged, train
from semiseg_cli.errors import UserError
from semiseg_cli.methods.supervised import Supervised
from tests.method_harness import make_cfg

REPO = Path(__file__).resolve().parents[1]


def _cfg(demo_root: Path, out: Path, *extra: str):
    return make_cfg("supervised", root=str(demo_root), out=str(out), overrides=['data.labeled="1/2"', *extra])


def test_train_writes_run_folder_and_checkpoint_round_trips(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(_cfg(demo_root, out), progress=False)
    assert res.step == 4
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("val_mIoU" in r for r in records)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4 and ckpt["class_names"] and ckpt["config"]["method"] == "supervised"
    model, cfg, _ = load_for_inference(out / "last.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["inference_state"][k]), k
    assert cfg.train.iters == 4
    mapped = load_checkpoint(out / "last.pt", mmap=True)  # what `train --resume` reads for the config
    assert mapped["config"] == ckpt["config"] and mapped["step"] == 4
    for k, v in ckpt["inference_state"].items():
        assert torch.equal(mapped["inference_state"][k], v), k


def test_resume_continues_exactly_where_it_stopped(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = train(_cfg(demo_root, tmp_path / "full"), progress=False)
    assert full.step == 4

    original = Supervised.training_step

    def killed_at_3(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        if step == 2:
            raise KeyboardInterrupt  # stands in for a kill right after the step-2 checkpoint
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(Supervised, "training_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(demo_root, tmp_path / "cut"), progress=False)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    monkeypatch.setattr(Supervised, "training_step", original)
    train(_cfg(demo_root, tmp_path / "cut"), resume=True, progress=False)

    a = load_checkpoint(tmp_path / "full" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["method_state"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) >= 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Supervised.training_step

    def nan_at_3(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        losses = original(self, labeled, unlabeled, step)
        if step == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(Supervised, "training_step", nan_at_3)
    with pytest.raises(TrainingDiverged, match="non-finite at step 3"):
        train(_cfg(demo_root, tmp_path / "nan"), progress=False)
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in ckpt["method_state"].values())


def test_run_folder_is_never_overwritten_silently(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_cfg(demo_root, out), progress=False)
    with pytest.raises(UserError, match="not empty"):
        train(_cfg(demo_root, out), progress=False)
    with pytest.raises(UserError, match="contradict"):
        train(_cfg(demo_root, out), resume=True, overwrite=True, progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(_cfg(demo_root, tmp_path / "fresh"), resume=True, progress=False)
    train(_cfg(demo_root, out), overwrite=True, progress=False)


def test_methods_that_need_unlabeled_data_refuse_a_fully_labeled_split(demo_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg("u2pl", root=str(demo_root), out=str(tmp_path / "u"))
    with pytest.raises(UserError, match="needs unlabeled images"):
        train(cfg, progress=False)


def run_two_cpu_ranks(script: Path) -> None:
    """Run `script` under torchrun with two gloo ranks on a free port; fail with its stderr."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_two_cpu_processes_end_with_identical_weights(demo_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, torch\n"
        "from semiseg_cli.engine import distributed\n"
        "from semiseg_cli.engine.loop import train\n"
        "from tests.method_harness import make_cfg\n"
        f"cfg = make_cfg('supervised', root={str(demo_root)!r}, out={str(tmp_path / 'ddp')!r},"
        " overrides=['data.labeled=\"1/2\"', 'train.iters=3'])\n"
        "res = train(cfg, progress=False)\n"
        "assert res.main == (os.environ['RANK'] == '0') and not distributed.is_dist()  # train() ended the group\n"
        f"torch.save(res.method.state_dict(), {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.pt')\n"
    )
    run_two_cpu_ranks(script)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The checkpoint is written once, by rank 0, without DDP prefixes.
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert not any(k.startswith("module.") or ".module." in k for k in ckpt["inference_state"])


def test_a_value_logged_on_some_steps_is_averaged_over_those_steps_only(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Supervised.training_step

    def sometimes(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        losses = original(self, labeled, unlabeled, step)
        if step % 2 == 0:
            losses["only_even"] = torch.tensor(1.0)
        return losses

    monkeypatch.setattr(Supervised, "training_step", sometimes)
    train(_cfg(demo_root, tmp_path / "r", "train.log_interval=4"), progress=False)
    rec = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"only_even"' in l]
    assert rec and rec[0]["only_even"] == 1.0


def test_torchrun_u2pl_ranks_share_student_teacher_and_memory_bank(demo_root: Path, tmp_path: Path) -> None:
    """Two gloo ranks past the supervised warm-up, so the EMA teacher, the memory bank (fed
    through `all_gather_cat`) and the contrastive loss all run. After every optimizer step, before
    the end-of-run buffer broadcast could hide a difference, both ranks hold the same student
    weights, the same teacher (weights and BN statistics) and the same queues; so do the final
    states, and the one checkpoint holds them. (The student's own BN statistics are per rank
    between forwards on CPU, by design: DDP broadcasts rank 0's at each forward.)"""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, torch\n"
        "from semiseg_cli.engine.loop import train\n"
        "from semiseg_cli.methods.u2pl import U2PL\n"
        "from tests.method_harness import make_cfg\n"
        "snaps = []\n"
        "orig = U2PL.after_optimizer_step\n"
        "def spy(self, step):\n"
        "    orig(self, step)\n"
        "    copy = lambda d: {k: v.detach().clone() for k, v in d.items()}\n"
        "    snaps.append({'step': step, 'student': copy(dict(self.model.named_parameters())),\n"
        "                  'teacher': copy(self.teacher.module.state_dict()), 'bank': copy(self.bank.state_dict())})\n"
        "U2PL.after_optimizer_step = spy\n"
        f"cfg = make_cfg('u2pl', root={str(demo_root)!r}, out={str(tmp_path / 'ddp')!r}, overrides=["
        "'data.labeled=\"1/2\"', 'model.backbone=\"mobilenet_v2\"', 'model.rep_dim=16', 'u2pl.queue_size=64',"
        " 'u2pl.queue_size_background=96', 'u2pl.num_queries=8', 'u2pl.num_negatives=4', 'u2pl.sup_only_iters=1',"
        " 'u2pl.teacher_reset_iters=1', 'u2pl.delta_p=0.0', 'train.iters=4', 'train.ckpt_interval=100'])\n"
        "res = train(cfg, progress=False)\n"
        "m = res.method\n"
        "final = {'student': m.model.state_dict(), 'teacher': m.teacher.module.state_dict(), 'bank': m.bank.state_dict()}\n"
        f"torch.save({{'snaps': snaps, 'final': final}}, {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.pt')\n"
    )
    run_two_cpu_ranks(script)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [s["step"] for s in r0["snaps"]] == [s["step"] for s in r1["snaps"]] == [0, 1, 2, 3]
    for a, b in [*zip(r0["snaps"], r1["snaps"]), (r0["final"], r1["final"])]:
        for part in ("student", "teacher", "bank"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (a.get("step", "final"), part, k)
    first, last = r0["snaps"][0], r0["snaps"][-1]
    assert int(r0["snaps"][1]["bank"]["fill"].sum()) > 0 and not torch.equal(r0["snaps"][1]["bank"]["bank"], last["bank"]["bank"])  # pushed each semi step
    w = next(k for k in last["teacher"] if k.endswith("weight"))
    assert not torch.equal(first["teacher"][w], last["teacher"][w])  # the teacher moved (reset, then EMA)
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["has_teacher"] and int(ckpt["method_state"]["ema_updates"]) == 3
    for k, v in r0["final"]["bank"].items():
        assert torch.equal(ckpt["method_state"][f"bank.{k}"], v), k
    for k, v in r0["final"]["teacher"].items():
        assert torch.equal(ckpt["inference_state"][k], v), k
    for k, v in r0["final"]["student"].items():
        assert torch.equal(ckpt["student_state"][k], v), k
