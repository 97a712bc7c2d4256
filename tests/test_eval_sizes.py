"""Evaluation over images of different sizes: same-size batches, sharded, and `eval`'s options.

One tiny CPU checkpoint (2 iterations, 32-channel heads) is trained once for the module on a
generated folder dataset whose val split holds three image sizes, interleaved; its final
validation already runs through the size-batched loader at eval.batch_size=4.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from semiseg_cli.engine.loaders import SizeBatchedEval, dataset_sizes, eval_loader, image_sizes, size_batches
from tests.cli_checks import one_line_error

runner = CliRunner()
# (width, height) of the val images, in file order: three sizes, interleaved.
VAL_SIZES = [(48, 48), (64, 40), (48, 48), (40, 56), (64, 40), (48, 48), (40, 56)]
TINY = [
    "--set", 'data.dataset="folder"', "--set", 'model.backbone="resnet18"', "--set", "model.aspp_channels=32",
    "--set", "model.decoder_channels=32", "--crop-size", "64", "--batch-size", "2", "--set", "data.workers=0",
    "--iters", "2", "--set", "train.val_interval=0", "--set", "eval.batch_size=4", "--device", "cpu",
]


def make_sized_tree(base: Path) -> Path:
    """Folder layout, 3 classes: 4 train images of 64x64 and the val images of VAL_SIZES."""
    rng = np.random.default_rng(7)
    root = base / "sized"
    for split, sizes in (("train", [(64, 64)] * 4), ("val", VAL_SIZES)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"im{i}.png")
            mask = np.kron(rng.integers(0, 3, ((h + 7) // 8, (w + 7) // 8)), np.ones((8, 8), np.int64))[:h, :w]
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"im{i}.png")
    (root / "classes.txt").write_text("background\nthing\nstuff\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, best.pt) of a 2-iteration supervised run on the sized tree."""
    base = tmp_path_factory.mktemp("eval_sizes")
    root = make_sized_tree(base)
    out = base / "run"
    r = runner.invoke(app, ["train", "--root", str(root), "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert (out / "best.pt").is_file()
    return root, out / "best.pt"


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_size_batches_never_mix_sizes_and_cover_each_index_once(world: int, batch: int) -> None:
    sizes = VAL_SIZES * 3 + [(17, 19)]
    seen: Counter[int] = Counter()
    for rank in range(world):
        sampler = SizeBatchedEval(sizes, batch, rank=rank, world=world)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert batches == list(SizeBatchedEval(sizes, batch, rank=rank, world=world))  # deterministic
        assert batches == list(sampler)  # and the same on every pass (validation runs many times)
        for b in batches:
            assert 1 <= len(b) <= batch
            assert len({sizes[i] for i in b}) == 1, b
            assert all(i % world == rank for i in b)  # this rank's disjoint shard
        seen.update(i for b in batches for i in b)
    assert seen == Counter(range(len(sizes)))  # every image exactly once across ranks


def test_all_different_sizes_run_at_batch_one() -> None:
    sizes = [(10 + i, 20) for i in range(5)]
    assert size_batches(range(5), sizes, 4) == [[0], [1], [2], [3], [4]]
    assert size_batches([3, 1], [(8, 8)] * 5, 4) == [[3, 1]]  # first-seen order kept


def test_eval_loader_stacks_same_size_batches(trained: tuple[Path, Path]) -> None:
    from semiseg_cli.config import validate
    from semiseg_cli.data import build_dataset, get_layout

    root, _ = trained
    cfg = validate({"data": {"dataset": "folder", "root": str(root)}})
    ds = build_dataset(cfg.data, get_layout("folder", root).list_pairs("val"), train=False)
    assert dataset_sizes(ds) == VAL_SIZES
    shapes = [tuple(b["image"].shape) for b in eval_loader(ds, 4, 0, False)]
    assert sorted(s[0] for s in shapes) == [2, 2, 3]
    assert {(s[3], s[2]) for s in shapes} == set(VAL_SIZES)


def test_unreadable_header_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from semiseg_cli.data import get_layout
    from semiseg_cli.errors import UserError

    root = make_sized_tree(tmp_path)
    bad = root / "images" / "val" / "im3.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="im3.png"):
        image_sizes(get_layout("folder", root), [p[0] for p in get_layout("folder", root).list_pairs("val")])


# ----------------------------------------------------------------------------- eval end to end


def test_eval_batch_size_and_workers_do_not_change_the_metrics(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, ckpt = trained
    reports = {}
    for batch, workers in ((1, 0), (4, 0), (4, 2)):
        out = tmp_path / f"r{batch}-{workers}.json"
        r = runner.invoke(app, ["eval", "-c", str(ckpt), "--batch-size", str(batch), "--workers", str(workers), "--json", str(out)])
        assert r.exit_code == 0, r.output
        reports[batch, workers] = json.loads(out.read_text())
    ref = reports[1, 0]
    assert ref["images"] == len(VAL_SIZES) and ref["weights"] == "student"
    for key, rep in reports.items():
        for field in ("mIoU", "aAcc", "mAcc", "per_class", "images"):
            assert rep[field] == ref[field], (key, field)
    # The same through --set, and the table title says which weights were evaluated.
    r = runner.invoke(app, ["eval", "-c", str(ckpt), "--set", "eval.batch_size=3", "--set", "data.workers=0"])
    assert r.exit_code == 0, r.output
    assert "student weights" in " ".join(r.stdout.split())


def test_weights_label() -> None:
    from semiseg_cli.eval_report import weights_label

    assert weights_label("auto", True) == ("teacher", "EMA teacher weights (auto)")
    assert weights_label("teacher", True) == ("teacher", "EMA teacher weights")
    assert weights_label("student", True) == ("student", "student weights")
    assert weights_label("auto", False) == ("student", "student weights")


BAD_OPTIONS = [
    (["--crop-size", "0"], "eval.crop_size"),
    (["--workers", "-1"], "data.workers"),
    (["--batch-size", "0"], "eval.batch_size"),
    (["--set", "eval.scales=[-1]"], "eval.scales"),
    (["--set", "eval.batch_size=0"], "eval.batch_size"),
    (["--set", "data.resize=0"], "data.resize"),
    (["--set", "eval.bogus=1"], "eval.bogus"),
    (["--set", 'model.backbone="resnet50"'], "eval accepts only"),
    (["--set", "data.crop_size=[64, 64]"], "eval accepts only"),
    (["--set", "train.iters=3"], "eval accepts only"),
    (["--set", "eval.batch_size"], "section.key=value"),
    (["--scales", "0,1"], "--scales"),
    (["--weights", "ema"], "--weights"),
]


@pytest.mark.parametrize("args, fragment", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_eval_options_fail_before_the_model_loads(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], fragment: str
) -> None:
    import semiseg_cli.engine.checkpoint as checkpoint

    def no_model(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(checkpoint, "load_for_inference", no_model)
    _, ckpt = trained
    rep, png = tmp_path / "rep.json", tmp_path / "cm.png"
    r = runner.invoke(app, ["eval", "-c", str(ckpt), "--json", str(rep), "--confusion-png", str(png), "--workers", "0", *args])
    assert fragment in one_line_error(r)
    assert not rep.exists() and not png.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths_fail_before_the_model_loads(trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_for_inference", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    _, ckpt = trained
    folder = tmp_path / "a_folder"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    existing = tmp_path / "old.json"
    existing.write_text("old")
    cases = [
        (["--json", str(folder)], "is a folder"),
        (["--confusion-png", str(a_file / "cm.png")], "is a file"),
        (["--json", str(existing)], "--overwrite"),
        (["--json", str(tmp_path / "same.x"), "--confusion-png", str(tmp_path / "same.x")], "same file"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--json", str(locked / "sub" / "rep.json")], "not writable"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, fragment in cases:
        r = runner.invoke(app, ["eval", "-c", str(ckpt), "--workers", "0", *args])
        assert fragment in one_line_error(r), args
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any(folder.iterdir())
    assert existing.read_text() == "old" and a_file.read_text() == "keep"
    if os.geteuid() != 0:
        assert not any((tmp_path / "locked").iterdir())


def test_unreadable_val_image_fails_before_the_model_loads(trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semiseg_cli.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_for_inference", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    _, ckpt = trained
    root = make_sized_tree(tmp_path / "data")
    (root / "images" / "val" / "im5.png").write_bytes(b"\x89PNG truncated")
    rep = tmp_path / "rep.json"
    r = runner.invoke(app, ["eval", "-c", str(ckpt), "--root", str(root), "--workers", "0", "--json", str(rep)])
    assert "im5.png" in one_line_error(r)
    assert not rep.exists()


def test_checkpoint_folder_says_to_pass_a_file_inside_it(trained: tuple[Path, Path]) -> None:
    _, ckpt = trained
    r = runner.invoke(app, ["eval", "-c", str(ckpt.parent)])
    err = one_line_error(r)
    assert "is a folder" in err and "best.pt" in err and "does not exist" not in err
