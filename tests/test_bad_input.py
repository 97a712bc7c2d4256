"""Bad input, one class of failure at a time (the hardening issue's list, in its order).

Every case asserts what a user sees: a non-zero exit (or the documented warning and exit 0), one
line on stderr naming the file / field / value and what to do, no traceback — and, for a
refusal, an output tree byte-identical before and after. Data are generated; models are tiny.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from tests.cli_checks import one_line_error

runner = CliRunner()
TINY = [
    "--set", 'model.backbone="resnet18"', "--set", "model.aspp_channels=32", "--set", "model.decoder_channels=32",
    "--crop-size", "64", "--batch-size", "2", "--set", "data.workers=0", "--iters", "2",
    "--set", "train.val_interval=0", "--device", "cpu",
]


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root` with its bytes (files) or None (folders): compare before/after."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def warned(result: Any, *fragments: str) -> list[str]:
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert any(all(f in ln for f in fragments) for ln in lines), (fragments, result.stderr)
    return lines


def refused_cleanly(tmp_path: Path, args: list[str], *fragments: str) -> str:
    before = snapshot(tmp_path)
    err = one_line_error(runner.invoke(app, args), *fragments)
    assert snapshot(tmp_path) == before, "a refused command changed the output tree"
    return err


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semiseg_cli.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("bad_demo") / "demo", n_train=12, n_val=4, size=64, seed=0)


@pytest.fixture(scope="module")
def run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-iteration supervised run folder on the demo set."""
    out = tmp_path_factory.mktemp("bad_run") / "run"
    r = runner.invoke(app, ["train", "--root", str(demo), "--labeled", "1/2", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    return out


def _train(demo: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--root", str(demo), "--labeled", "1/2", "--out", str(out), *TINY, *extra]


# ----------------------------------------------------------------------------- 1. output paths


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_1_every_writing_command_checks_its_output_location_first(where: str, demo: Path, run: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    blocker = work / "f"
    blocker.write_text("a file\n")
    if where == "file":
        target = blocker
    elif where == "under_file":
        target = blocker / "out"
    else:
        target = Path("/proc/semiseg-no-such-dir/out")
    ckpt = str(run / "best.pt")
    commands = [
        ["train", "--root", str(demo), "--labeled", "1/2", "--out", str(target), *TINY],
        ["prepare-splits", "--dataset", "demo", "--root", str(demo), "--labeled", "1/2", "--out", str(target)],
        ["demo-data", "--out", str(target), "--n-train", "2", "--n-val", "1", "--size", "32"],
        ["pseudo-label", "-c", ckpt, "--split", "val", "--out", str(target), "--workers", "0"],
        ["eval", "-c", ckpt, "--json", str(target if where != "file" else work), "--workers", "0"],
        ["export", "-c", ckpt, "--onnx", str(target if where != "file" else work)],
    ]
    for args in commands:
        if where == "file" and args[0] in ("eval", "export"):
            fragment = "folder"  # a folder where a file should go
        else:
            fragment = str(target if where != "file" else blocker)
        before = snapshot(work)
        one_line_error(runner.invoke(app, args), fragment)
        assert snapshot(work) == before, args[0]
    assert not Path("/proc/semiseg-no-such-dir").exists()


def test_1_eval_checks_its_outputs_before_evaluating(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.inference as inference

    def no_eval(*a: Any, **k: Any) -> None:
        raise AssertionError("evaluation ran before the output check")

    monkeypatch.setattr(inference, "evaluate", no_eval)
    (tmp_path / "f").write_text("x")
    refused_cleanly(tmp_path, ["eval", "-c", str(run / "best.pt"), "--json", str(tmp_path / "f" / "r.json"), "--workers", "0"], "is a file")


# ----------------------------------------------------------------------------- 2. values torch would choke on


BAD_VALUES = [
    (["--set", "optim.momentum=-1"], "optim.momentum"),
    (["--set", "optim.betas=[2, 2]"], "optim.betas[0]"),
    (["--set", "model.dropout=2"], "model.dropout"),
    (["--set", "model.aspp_channels=0"], "model.aspp_channels"),
    (["--set", "eval.scales=[-1]"], "eval.scales[0]"),
    (["--set", "eval.stride=[0, 0]"], "eval.stride[0]"),
    (["--iters", "99999999999999999999999"], "train.iters"),
    (["--set", "optim.poly_power=-1"], "optim.poly_power"),
    (["--set", "train.ohem_min_kept=-5"], "train.ohem_min_kept"),
    (["--method", "u2pl", "--set", "u2pl.sup_only_iters=5"], "u2pl.sup_only_iters (5) is not below train.iters (2)"),
]


@pytest.mark.parametrize("extra, fragment", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
@pytest.mark.parametrize("dry", [False, True], ids=["train", "dry-run"])
def test_2_out_of_range_values_are_refused_by_train_and_dry_run_alike(extra: list[str], fragment: str, dry: bool, demo: Path, tmp_path: Path) -> None:
    args = _train(demo, tmp_path / "run", *extra) + (["--dry-run"] if dry else [])
    refused_cleanly(tmp_path, args, fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--crop-size", "0"], "eval.crop_size"),
    (["--workers", "-1"], "data.workers"),
    (["--batch-size", "0"], "eval.batch_size"),
])
def test_2_eval_options_are_validated_like_the_config(extra: list[str], fragment: str, run: Path, tmp_path: Path) -> None:
    refused_cleanly(tmp_path, ["eval", "-c", str(run / "best.pt"), "--mode", "slide", *extra], fragment)


def test_2_dry_run_passes_what_train_starts(demo: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, _train(demo, tmp_path / "run", "--method", "u2pl", "--set", "u2pl.sup_only_iters=1", "--dry-run"))
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3. text that is not UTF-8


def test_3_text_files_that_are_not_utf8(make_tree: Any, demo: Path, tmp_path: Path) -> None:
    root = make_tree["folder"](tmp_path / "data")
    (root / "classes.txt").write_bytes("fond\nchâteau\nrivière\n".encode("latin-1"))
    refused_cleanly(tmp_path, ["prepare-splits", "--dataset", "folder", "--root", str(root), "--labeled", "2", "--out", str(tmp_path / "s")],
                    "classes.txt is not UTF-8 text", "save it as UTF-8")
    split = tmp_path / "labeled.txt"
    split.write_bytes("images/train/train_0000.png masks/train/train_0000.png # caf\xe9\n".encode("latin-1"))
    refused_cleanly(tmp_path, ["train", "--root", str(demo), "--labeled-list", str(split), "--out", str(tmp_path / "r"), *TINY],
                    "labeled.txt is not UTF-8 text")


# ----------------------------------------------------------------------------- 4. errors inside DataLoader workers


def test_4_a_user_error_in_a_worker_is_its_own_one_line_message(run: Path, demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(demo, root)
    victim = root / "images" / "val" / "val_0002.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # header intact, pixels truncated: fails only when decoded
    err = refused_cleanly(tmp_path, ["eval", "-c", str(run / "best.pt"), "--root", str(root), "--workers", "2"], "val_0002.png")
    assert "DataLoader" not in err and "Original Traceback" not in err and len(err) < 400, err


def test_4_the_unwrapping_keeps_the_original_message() -> None:
    from torch._utils import ExceptionWrapper

    from semiseg_cli.errors import UserError

    try:
        raise UserError("mask x.png has label values [7] outside 0..2 and 255; run prepare-splits")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(UserError) as info:
        wrapped.reraise()
    assert str(info.value) == "mask x.png has label values [7] outside 0..2 and 255; run prepare-splits"


# ----------------------------------------------------------------------------- 6. the validation split, up front


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_6_a_truncated_val_image_is_refused_before_anything_is_written(demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(demo, root)
    Image.open(root / "images" / "val" / "val_0001.png").convert("RGB").save(root / "images" / "val" / "v.jpg", quality=90)
    (root / "images" / "val" / "val_0001.png").unlink()
    shutil.move(root / "masks" / "val" / "val_0001.png", root / "masks" / "val" / "v.png")
    _truncate(root / "images" / "val" / "v.jpg")
    refused_cleanly(tmp_path, ["prepare-splits", "--dataset", "demo", "--root", str(root), "--labeled", "1/2", "--out", str(tmp_path / "s")],
                    "images/val/v.jpg", "truncated")
    refused_cleanly(tmp_path, ["train", "--root", str(root), "--labeled", "1/2", "--out", str(tmp_path / "r"), *TINY],
                    "val (val): images/val/v.jpg")


def test_6_the_final_checkpoint_is_written_before_the_final_validation(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.engine.loop as loop
    from semiseg_cli.errors import UserError

    out = tmp_path / "run"

    def broken(*a: Any, **k: Any) -> None:
        raise UserError("cannot read image val_0003.png: broken data stream")

    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", broken)
    r = runner.invoke(app, _train(demo, out))
    one_line_error(r, "val_0003.png", mid_run=True)
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 2
    assert not (out / "best.pt").exists()
    monkeypatch.setattr(loop, "evaluate", real)
    r = runner.invoke(app, ["train", "--out", str(out), "--resume", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (out / "best.pt").is_file() and "mIoU" in r.stdout
    assert any("val_mIoU" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


# ----------------------------------------------------------------------------- 7. leftovers


def test_7_a_failed_start_leaves_no_run_folder_and_the_same_command_then_works(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg_cli.errors import UserError
    from semiseg_cli.methods.supervised import Supervised

    out = tmp_path / "run"
    real = Supervised.training_step

    def fails(self: Any, *a: Any, **k: Any) -> Any:
        raise UserError("cannot read image train_0001.png: broken data stream")

    monkeypatch.setattr(Supervised, "training_step", fails)
    before = snapshot(tmp_path)
    one_line_error(runner.invoke(app, _train(demo, out)), "train_0001.png")
    assert snapshot(tmp_path) == before and not out.exists()
    monkeypatch.setattr(Supervised, "training_step", real)
    r = runner.invoke(app, _train(demo, out))
    assert r.exit_code == 0, r.output


def test_7_stale_temp_files_of_our_naming_are_removed_and_nothing_else(tmp_path: Path) -> None:
    import subprocess
    import sys

    from semiseg_cli.io import TMP_MARK, clean_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".last.pt{TMP_MARK}{dead}-abcd.pt"
    live = tmp_path / f".last.pt{TMP_MARK}{os.getppid()}-abcd.pt"  # a running writer's file stays
    other = tmp_path / ".last.pt.tmp"  # not ours
    for p in (stale, live, other):
        p.write_text("x")
    assert clean_stale_temps(tmp_path) == [stale]
    assert live.exists() and other.exists()


# ----------------------------------------------------------------------------- 8. divergence


def test_8_non_finite_weights_stop_the_run_and_are_never_saved(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg_cli.methods.supervised import Supervised

    def poison(self: Any, step: int) -> None:
        bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))  # the loss stays finite; the statistics do not

    monkeypatch.setattr(Supervised, "after_optimizer_step", poison)
    out = tmp_path / "run"
    r = runner.invoke(app, _train(demo, out, "--lr", "0.5"))
    err = one_line_error(r, "inf/NaN", "running_var", "--lr 0.05 --overwrite", mid_run=True)
    assert r.exit_code == 3 and "then --resume" not in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_8_a_labeled_list_without_masks_says_there_are_no_labeled_pixels(demo: Path, tmp_path: Path) -> None:
    split = tmp_path / "labeled.txt"
    split.write_text("images/train/train_0000.png\nimages/train/train_0001.png\n")
    refused_cleanly(tmp_path, ["train", "--root", str(demo), "--labeled-list", str(split), "--out", str(tmp_path / "r"), *TINY],
                    "none of the 2 labeled images has a mask", "no labeled pixels")


# ----------------------------------------------------------------------------- 9. typed option values


def test_9_option_values_reach_the_config_as_typed(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--root", "data\\new", "--out", 'my "run"', "--dry-run"])
    assert r.exit_code == 0, r.output
    cfg = tomllib.loads(r.stdout)
    assert cfg["data"]["root"] == "data\\new" and cfg["out"] == 'my "run"'


# ----------------------------------------------------------------------------- 10. file modes


def test_10_outputs_follow_the_umask(demo: Path, tmp_path: Path) -> None:
    from semiseg_cli.engine.checkpoint import save_checkpoint

    old = os.umask(0o027)
    try:
        r = runner.invoke(app, ["prepare-splits", "--dataset", "demo", "--root", str(demo), "--labeled", "1/2", "--out", str(tmp_path / "s")])
        assert r.exit_code == 0, r.output
        save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    for p in (tmp_path / "s" / "labeled.txt", tmp_path / "c.pt"):
        assert p.stat().st_mode & 0o777 == 0o640, (p, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------- 11. questionable input


def test_11_orphan_masks_and_symlink_loops_are_warned_about(make_tree: Any, tmp_path: Path) -> None:
    root = make_tree["folder"](tmp_path / "data")
    shutil.copy(root / "masks" / "train" / "img0.png", root / "masks" / "train" / "lost.png")
    loop = root / "images" / "train" / "loop.png"
    loop.symlink_to(loop)
    r = runner.invoke(app, ["prepare-splits", "--dataset", "folder", "--root", str(root), "--labeled", "2", "--out", str(tmp_path / "s")])
    warned(r, "have no image", "lost.png")
    warned(r, "symlink", "loop.png")


def test_11_duplicates_overlaps_and_oversized_batches_are_warned_about(demo: Path, tmp_path: Path) -> None:
    lab = tmp_path / "labeled.txt"
    unl = tmp_path / "unlabeled.txt"
    pair = "images/train/train_0000.png masks/train/train_0000.png\n"
    lab.write_text(pair + pair + "images/train/train_0001.png masks/train/train_0001.png\n")
    unl.write_text("images/train/train_0000.png\nimages/train/train_0002.png\n")
    r = runner.invoke(app, ["train", "--method", "u2pl", "--root", str(demo), "--labeled-list", str(lab), "--unlabeled-list", str(unl),
                            "--out", str(tmp_path / "r"), *TINY, "--batch-size", "3", "--set", "u2pl.sup_only_iters=1"])
    warned(r, "labeled.txt", "line 2 repeats line 1")
    warned(r, "both labeled and unlabeled", "train_0000.png")
    warned(r, "labeled batch (3) is larger than the labeled pool (2 images)")


def test_11_binary_0_255_masks_are_refused_with_the_fix(make_tree: Any, tmp_path: Path) -> None:
    root = make_tree["folder"](tmp_path / "data")
    (root / "classes.txt").write_text("background\nobject\n")
    for m in (root / "masks" / "train").glob("*.png"):
        arr = np.array(Image.open(m))
        Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8)).save(m)
    refused_cleanly(tmp_path, ["prepare-splits", "--dataset", "folder", "--root", str(root), "--labeled", "2", "--out", str(tmp_path / "s")],
                    "only class 0 (background) and 255", "store it as 1")


def test_11_tags_identical_for_every_image_are_refused(demo: Path, tmp_path: Path) -> None:
    from semiseg_cli.data import get_layout

    pairs = get_layout("demo", demo).list_pairs("train")
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({img: [1, 2] for img, _ in pairs}))
    refused_cleanly(tmp_path, ["train", "--method", "dupl", "--root", str(demo), "--out", str(tmp_path / "r"), *TINY,
                               "--set", f'data.tags_file="{tags}"'], "same tags (disc, box)")


# ----------------------------------------------------------------------------- 12. other


def test_12_every_preset_named_in_help_readme_and_docs_exists() -> None:
    import re

    from semiseg_cli.config import list_presets

    repo = Path(__file__).resolve().parents[1]
    texts = [runner.invoke(app, [c, "--help"], terminal_width=400).stdout for c in ("train", "eval", "pseudo-label", "export")]
    texts += [p.read_text() for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md")), repo / "Makefile"]]
    named = set(re.findall(r"\b((?:supervised|u2pl|advsemiseg|dupl|fixmatch|unimatch|unimatch_v2)_[a-z0-9-]+(?:-os\d+)?_\d+x[\d+]+-\w+_[\w-]+?-\d+(?:x\d+)?)\b", "\n".join(texts)))
    assert named, "the pattern found no preset names"
    assert named <= set(list_presets()), sorted(named - set(list_presets()))


def test_12_python_floor_matches_the_code() -> None:
    repo = Path(__file__).resolve().parents[1]
    floor = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    uses_tomllib = any("import tomllib" in p.read_text() for p in (repo / "semiseg_cli").rglob("*.py"))
    assert not uses_tomllib or floor.strip() == ">=3.11", floor


def test_12_errors_stay_on_one_line_off_a_terminal(tmp_path: Path) -> None:
    long_name = "x" * 150
    r = runner.invoke(app, ["train", "--preset", str(tmp_path / f"{long_name}.toml")], terminal_width=80)
    one_line_error(r, long_name)


def test_12_training_prints_plain_progress_lines_off_a_terminal(demo: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, _train(demo, tmp_path / "r", "--set", "train.log_interval=1"))
    assert r.exit_code == 0, r.output
    assert "step 1/2  loss" in r.stderr and "step 2/2  loss" in r.stderr, r.stderr


def test_12_a_method_section_on_another_method_names_the_method(tmp_path: Path) -> None:
    refused_cleanly(tmp_path, ["train", "--set", "u2pl.unsup_weight=0.5", "--dry-run"],
                    "belongs to method u2pl", "method is supervised", "--method u2pl")


def test_12_a_checkpoint_with_changed_bytes_is_refused(run: Path, tmp_path: Path) -> None:
    import zipfile

    bad = tmp_path / "bad.pt"
    shutil.copy(run / "best.pt", bad)
    with zipfile.ZipFile(bad) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(bad, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        pos = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x55]))
    refused_cleanly(tmp_path, ["eval", "-c", str(bad), "--workers", "0"], "bad.pt")


def test_12_best_pt_is_slim_and_last_pt_resumes(run: Path) -> None:
    best = torch.load(run / "best.pt", weights_only=False)
    last = torch.load(run / "last.pt", weights_only=False)
    assert "optimizers" not in best and "method_state" not in best and best["resumable"] is False
    assert "optimizers" in last and last["resumable"] is True
    assert (run / "best.pt").stat().st_size < 0.75 * (run / "last.pt").stat().st_size


def test_12_eval_names_a_folder_given_as_checkpoint(run: Path, tmp_path: Path) -> None:
    d = tmp_path / "some_dir.pt"
    d.mkdir()
    refused_cleanly(tmp_path, ["eval", "-c", str(d)], "is a folder")
