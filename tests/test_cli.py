"""The CLI through Typer's runner: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from semiseg_cli import __version__
from semiseg_cli.cli import app
from tests.cli_checks import one_line_error

runner = CliRunner()
TINY = [
    "--set", 'model.backbone="resnet18"', "--set", "model.aspp_channels=32", "--set", "model.decoder_channels=32",
    "--crop-size", "64", "--batch-size", "2", "--set", "data.workers=0", "--iters", "2",
    "--set", "train.val_interval=0", "--device", "cpu",
]


def test_version_and_help_list_every_command() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("prepare-splits", "train", "pseudo-label", "eval", "export"):
        assert cmd in r.stdout, cmd


def test_train_dry_run_prints_the_resolved_config() -> None:
    r = runner.invoke(app, ["train", "--preset", "supervised_r18-os16_1x4-400it_demo-96", "--dry-run", "--iters", "7", "--method", "u2pl"])
    assert r.exit_code == 0, r.output
    assert 'method = "u2pl"' in r.stdout and "iters = 7" in r.stdout and "[u2pl]" in r.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
        (["--preset", "no-such-preset"], "unknown preset"),
        (["--method", "mixmatch"], "unknown method"),
        (["--crop-size", "abc"], "--crop-size"),
        (["--labeled", "1/8", "--labeled-list", "x.txt"], "contradict"),
        (["--device", "cuda:7"], None),
    ],
)
def test_train_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], fragment: str | None) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--out", str(out), *args])
    err = one_line_error(r, code=2)
    if fragment:
        assert fragment in err
    assert not out.exists()


def test_prepare_splits_is_byte_identical_and_refuses_changes(demo_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = runner.invoke(app, ["prepare-splits", "--dataset", "demo", "--root", str(demo_root), "--labeled", "1/4", "--seed", "3", "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert (a / "labeled.txt").read_bytes() == (b / "labeled.txt").read_bytes()
    assert (a / "unlabeled.txt").read_bytes() == (b / "unlabeled.txt").read_bytes()
    r = runner.invoke(app, ["prepare-splits", "--dataset", "demo", "--root", str(demo_root), "--labeled", "1/4", "--seed", "4", "--out", str(a)])
    assert "--overwrite" in one_line_error(r, code=2)
    r = runner.invoke(app, ["prepare-splits", "--dataset", "demo", "--root", str(demo_root), "--labeled", "1/4,2", "--seed", "0", "--out", str(tmp_path / "multi")])
    assert r.exit_code == 0 and (tmp_path / "multi" / "1_4" / "labeled.txt").is_file() and (tmp_path / "multi" / "2" / "labeled.txt").is_file()


def test_prepare_splits_reports_every_problem_and_writes_nothing(make_tree, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image
    import numpy as np

    root = make_tree["folder"](tmp_path)
    (root / "masks" / "train" / "img1.png").unlink()  # missing mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "train" / "img2.png")  # size mismatch
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(root / "masks" / "train" / "img3.png")  # out of range
    out = tmp_path / "splits"
    r = runner.invoke(app, ["prepare-splits", "--dataset", "folder", "--root", str(root), "--labeled", "2", "--out", str(out)])
    assert r.exit_code == 2
    for name in ("img1", "img2", "img3"):
        assert name in r.stderr, name
    assert "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())


def test_train_then_eval_end_to_end(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--root", str(demo_root), "--labeled", "1/2", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert (out / "best.pt").is_file() and "mIoU" in r.stdout
    rep = tmp_path / "report.json"
    png = tmp_path / "cm.png"
    r = runner.invoke(app, ["eval", "-c", str(out / "best.pt"), "--json", str(rep), "--confusion-png", str(png), "--flip", "--scales", "0.5,1.0", "--workers", "0"])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["protocol"] == {"mode": "whole", "scales": [0.5, 1.0], "flip": True, "crop_size": None}
    assert 0.0 <= report["mIoU"] <= 1.0 and set(report["per_class"]) == {"background", "disc", "box", "triangle", "stripes"}
    assert png.is_file()
    # Existing outputs are not overwritten without --overwrite; slide mode works.
    r = runner.invoke(app, ["eval", "-c", str(out / "best.pt"), "--json", str(rep), "--workers", "0"])
    assert "--overwrite" in one_line_error(r, code=2)
    r = runner.invoke(app, ["eval", "-c", str(out / "best.pt"), "--mode", "slide", "--crop-size", "48", "--workers", "0"])
    assert r.exit_code == 0, r.output
    # Resuming a finished run does nothing and says so; a second plain run refuses the folder.
    r = runner.invoke(app, ["train", "--root", str(demo_root), "--labeled", "1/2", "--out", str(out), *TINY])
    assert "not empty" in one_line_error(r, code=2)


def test_eval_errors(tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", "-c", str(tmp_path / "nope.pt")])
    assert "does not exist" in one_line_error(r, code=2)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["eval", "-c", str(bad)])
    assert "cannot be read" in one_line_error(r, code=2)
    r = runner.invoke(app, ["eval", "-c", str(bad), "--mode", "tiles"])
    assert "--mode" in one_line_error(r, code=2)


def test_error_messages_keep_square_brackets(tmp_path: Path) -> None:
    # A message such as "pip install 'semiseg[export]'" must not lose its brackets to markup.
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--set", "data.crop_size=[4, 4]"])
    assert "data.crop_size[0]" in one_line_error(r, code=2)


def test_resume_takes_the_runs_own_config_and_refuses_changes(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--root", str(demo_root), "--labeled", "1/2", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    # No preset and no options but --iters: the run's stored config (64-px crops, 32-ch heads,
    # ResNet-18) is used, not the defaults, and training continues to the new length.
    r = runner.invoke(app, ["train", "--out", str(out), "--resume", "--iters", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import torch

    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["config"]["data"]["crop_size"] == [64, 64]
    assert ckpt["config"]["model"]["decoder_channels"] == 32 and ckpt["config"]["train"]["iters"] == 3
    before = (out / "last.pt").read_bytes()
    # Anything that would make it another run is refused in one line, and nothing changes.
    for args, key in ((["--lr", "0.5"], "optim.lr"), (["--set", "model.dropout=0.3"], "model.dropout"),
                      (["--preset", "supervised_r18-os16_1x4-400it_demo-96"], "data.crop_size")):
        r = runner.invoke(app, ["train", "--out", str(out), "--resume", "--iters", "4", *args])
        assert key in one_line_error(r, code=2), args
    assert (out / "last.pt").read_bytes() == before


def test_bad_input_with_overwrite_keeps_the_previous_run(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--root", str(demo_root), "--labeled", "1/2", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for args in (["--root", str(tmp_path / "nowhere")], ["--root", str(demo_root), "--set", f'model.pretrained="{tmp_path / "no.pth"}"']):
        r = runner.invoke(app, ["train", "--labeled", "1/2", "--out", str(out), "--overwrite", *TINY, *args])
        one_line_error(r, code=2)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files, args
    # A new folder is not even created.
    r = runner.invoke(app, ["train", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new"), *TINY])
    one_line_error(r, code=2)
    assert not (tmp_path / "new").exists()
