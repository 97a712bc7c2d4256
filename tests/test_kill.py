"""`kill -9` in the middle of a write, then the same command again.

A child process runs the real command with one file write patched to write half a file and then
SIGKILL its own process, exactly what an out-of-memory kill or a pulled plug does. The rerun must
leave no temporary file anywhere, and its result must equal an uninterrupted run, byte for byte.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.cli_checks import temp_files

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = [
    "--set", 'model.backbone="resnet18"', "--set", "model.aspp_channels=32", "--set", "model.decoder_channels=32",
    "--crop-size", "64", "--batch-size", "2", "--set", "data.workers=0", "--iters", "4",
    "--set", "train.val_interval=2", "--set", "train.ckpt_interval=2", "--device", "cpu", "--labeled", "1/2",
]

# Patches `target` ("module:attr" or "module:Class.method", a callable that writes to a path) so that its `n`-th call writes
# half of its bytes to the path and then kills the process; then runs the semiseg CLI.
CHILD = textwrap.dedent(
    """
    import importlib, os, signal, sys
    module, attr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mod = importlib.import_module(module)
    *owners, attr = attr.split(".")
    for name in owners:  # "Image.save": a method of a class in the module
        mod = getattr(mod, name)
    real = getattr(mod, attr)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            path = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, os.PathLike)))
            with open(path, "wb") as f:
                f.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(mod, attr, dying)
    from semiseg_cli.cli import app
    app(sys.argv[4:], prog_name="semiseg")
    """
)


def run_killed(target: str, nth: int, args: list[str]) -> None:
    module, attr = target.split(":")
    p = subprocess.run([sys.executable, "-c", CHILD, module, attr, str(nth), *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


def semiseg(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "semiseg_cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_kill_during_a_checkpoint_write_then_resume_is_bit_identical(demo_root: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    semiseg("train", "--root", str(demo_root), "--out", str(full), *TRAIN_ARGS)
    # torch.save is called for best.pt (step 2), last.pt (step 2), then last.pt at step 4: die there.
    run_killed("torch:save", 3, ["train", "--root", str(demo_root), "--out", str(cut), *TRAIN_ARGS])
    left = temp_files(cut)
    assert left, "the kill should have left a temporary file behind"
    assert torch.load(cut / "last.pt", weights_only=False)["step"] == 2  # the previous checkpoint survived
    semiseg("train", "--out", str(cut), "--resume", "--device", "cpu")
    assert temp_files(cut) == []
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(cut / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in a["method_state"].items():
        assert torch.equal(v, b["method_state"][k]), k


@pytest.fixture(scope="module")
def ckpt(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kill_ckpt") / "run"
    semiseg("train", "--root", str(demo_root), "--out", str(out), *TRAIN_ARGS, "--iters", "2")
    return out / "best.pt"


def assert_same_dump(full: Path, cut: Path) -> None:
    for sub in ("labels", "confidence", "entropy", "records"):
        fa = sorted(p.relative_to(full) for p in (full / sub).rglob("*") if p.is_file())
        fb = sorted(p.relative_to(cut) for p in (cut / sub).rglob("*") if p.is_file())
        assert fa == fb and fa, sub
        for rel in fa:
            assert (full / rel).read_bytes() == (cut / rel).read_bytes(), rel
    for name in ("manifest.jsonl", "summary.json"):
        assert (full / name).read_bytes() == (cut / name).read_bytes(), name
    # split.txt points into the dump folder: the same lines, but for the folder's name.
    assert (full / "split.txt").read_text().replace("/full/", "/cut/") == (cut / "split.txt").read_text()


def test_kill_during_a_pseudo_label_dump_then_rerun_equals_an_uninterrupted_dump(ckpt: Path, tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    # --writers 0: the files are written in the process the patch below kills.
    args = ["-c", str(ckpt), "--split", "train", "--workers", "0", "--writers", "0", "--batch-size", "2", "--drop-percent", "20"]
    semiseg("pseudo-label", *args, "--out", str(full))
    # Pillow writes each image's label PNG (the maps are stored PNGs written directly): die in the
    # 3rd label, after the first two images are complete.
    run_killed("PIL.Image:Image.save", 3, ["pseudo-label", *args, "--out", str(cut)])
    assert temp_files(cut), "the kill should have left a temporary file behind"
    semiseg("pseudo-label", *args, "--out", str(cut))
    assert temp_files(cut) == []
    assert_same_dump(full, cut)


# Kills the parent right after its `n`-th job went to the writer processes (jobs in flight), after
# writing the writers' pids to PIDS_FILE; then runs the semiseg CLI.
CHILD_POOL = textwrap.dedent(
    """
    import json, os, signal, sys
    from semiseg_cli.pseudo_label import pool
    n, pids_file = int(sys.argv[1]), sys.argv[2]
    real = pool.WriterPool.submit
    calls = [0]

    def dying(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            with open(pids_file, "w") as f:
                json.dump(self.pids, f)
            os.kill(os.getpid(), signal.SIGKILL)

    pool.WriterPool.submit = dying
    from semiseg_cli.cli import app
    app(sys.argv[3:], prog_name="semiseg")
    """
)


def test_kill_of_a_pseudo_label_dump_with_writer_processes_leaves_none_behind_and_resumes(ckpt: Path, tmp_path: Path) -> None:
    import json
    import os
    import time

    full, cut, pids_file = tmp_path / "full", tmp_path / "cut", tmp_path / "pids.json"
    args = ["-c", str(ckpt), "--split", "train", "--workers", "0", "--batch-size", "2", "--drop-percent", "20"]
    semiseg("pseudo-label", *args, "--writers", "0", "--out", str(full))
    p = subprocess.run([sys.executable, "-c", CHILD_POOL, "5", str(pids_file), "pseudo-label", *args, "--writers", "2", "--out", str(cut)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    pids = json.loads(pids_file.read_text())
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

    deadline = time.monotonic() + 30  # orphaned writers finish what they hold, then exit by themselves
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "writer processes outlived their parent"
    semiseg("pseudo-label", *args, "--writers", "2", "--out", str(cut))
    assert temp_files(cut) == []
    assert_same_dump(full, cut)
