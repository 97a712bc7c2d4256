"""`semiseg pseudo-label`: the pure tensor functions by hand, then the command end to end on a
tiny checkpoint (files, formats, value ranges, manifest, resume, overwrite and error rules)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from semiseg_cli.engine.loaders import size_batches
from semiseg_cli.pseudo_label import (
    U16,
    batch_counts,
    normalised_entropy,
    reliable_mask,
    summarise,
)

runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures


def calibrate_checkpoint(path: Path, root: Path) -> None:
    """Give a 2-iteration checkpoint settled BatchNorm statistics (cumulative averages over the
    training images), so its logits are in a realistic range instead of ~1e7 (saturated softmax,
    entropy 0 everywhere), which would make every threshold test trivial."""
    from semiseg_cli.data.transforms import to_tensor
    from semiseg_cli.engine.checkpoint import load_checkpoint, load_for_inference, save_checkpoint

    ckpt = load_checkpoint(path)
    model, cfg, _ = load_for_inference(path)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    images = sorted((root / "images" / "train").glob("*.png"))
    x = torch.stack([to_tensor(Image.open(p).convert("RGB"), cfg.data.mean, cfg.data.std) for p in images])
    model.train()
    with torch.no_grad():
        for chunk in x.split(4):
            model(chunk)
    ckpt["inference_state"] = model.state_dict()
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "semiseg_version")})


@pytest.fixture(scope="module")
def ckpt(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semiseg_cli.config import build_config
    from semiseg_cli.engine.loop import train

    out = tmp_path_factory.mktemp("pl_run")
    cfg = build_config(None, [
        f'data.root="{demo_root}"', 'data.dataset="demo"', "data.crop_size=[64,64]", "data.batch_size=2",
        "data.workers=0", "train.iters=2", "train.val_interval=0", 'model.backbone="resnet18"', f'out="{out}"',
    ], "supervised")
    train(cfg, progress=False)
    calibrate_checkpoint(out / "best.pt", demo_root)
    return out / "best.pt"


@pytest.fixture(scope="module")
def split_file(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six training images with their masks, so accuracy is measured."""
    p = tmp_path_factory.mktemp("pl_split") / "some.txt"
    lines = [f"images/train/train_{i:04d}.png masks/train/train_{i:04d}.png" for i in range(6)]
    p.write_text("\n".join(lines) + "\n")
    return p


def invoke(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp.png", ".tmp.json", ".tmp.npz", ".tmp.jpg", ".tmp.jsonl", ".tmp.txt"))]


# ----------------------------------------------------------------------------- pure functions


def test_normalised_entropy_is_zero_for_one_hot_and_one_for_uniform() -> None:
    p = torch.zeros(1, 4, 1, 3)
    p[0, 2, 0, 0] = 1.0  # one-hot
    p[0, :, 0, 1] = 0.25  # uniform
    p[0, :2, 0, 2] = 0.5  # two classes tied: ln 2 / ln 4 = 0.5
    ent = normalised_entropy(p)
    assert torch.allclose(ent[0, 0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6)
    assert torch.equal(normalised_entropy(torch.ones(1, 1, 2, 2)), torch.zeros(1, 2, 2))  # one class


def test_drop_percent_drops_the_highest_entropy_pixels_of_each_image() -> None:
    conf = torch.ones(2, 2, 2)
    ent = torch.tensor([[[0.1, 0.5], [0.9, 0.3]], [[0.01, 0.02], [0.03, 0.04]]])
    keep = reliable_mask(conf, ent, drop_percent=25)  # 1 of 4 pixels per image
    assert keep.tolist() == [[[True, True], [False, True]], [[True, True], [True, False]]]
    keep = reliable_mask(conf, ent, drop_percent=50)
    assert keep.tolist() == [[[True, False], [False, True]], [[True, True], [False, False]]]
    # Ties with the threshold are kept: a saturated image keeps everything instead of nothing.
    assert reliable_mask(conf, torch.zeros(2, 2, 2), drop_percent=25).all()
    assert not reliable_mask(conf, ent, drop_percent=100).any()


def test_min_confidence_and_drop_percent_both_apply() -> None:
    conf = torch.tensor([[[0.5, 0.95], [0.99, 0.97]]])
    ent = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    assert reliable_mask(conf, ent, min_confidence=0.9).tolist() == [[[False, True], [True, True]]]
    assert reliable_mask(conf, ent, min_confidence=0.9, drop_percent=50).tolist() == [[[False, True], [True, False]]]


def test_batch_counts_by_hand() -> None:
    label = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [2, 2]]])
    keep = torch.tensor([[[True, False], [True, True]], [[True, True], [False, False]]])
    conf = torch.tensor([[[0.5, 0.6], [0.7, 0.8]], [[1.0, 1.0], [1.0, 1.0]]])
    gt = torch.tensor([[[0, 0], [1, 255]], [[2, 1], [255, 255]]])
    c = batch_counts(label, keep, conf, gt, 3)
    assert c["hist"].tolist() == [[1, 2, 1], [0, 0, 4]]
    assert c["reliable_hist"].tolist() == [[1, 1, 1], [0, 0, 2]]
    assert torch.allclose(c["conf_sum"], torch.tensor([[0.5, 1.3, 0.8], [0.0, 0.0, 4.0]], dtype=torch.float64))
    assert c["gt_hist"].tolist() == [[2, 1, 0], [0, 1, 1]]
    assert c["inter"].tolist() == [[1, 1, 0], [0, 0, 1]]
    assert c["pred_valid"].tolist() == [[1, 2, 0], [0, 0, 2]]
    assert c["reliable_valid"].tolist() == [[1, 1, 0], [0, 0, 2]]
    assert c["reliable_correct"].tolist() == [[1, 1, 0], [0, 0, 1]]
    recs = [{"counts": {k: v[b].tolist() for k, v in c.items()}} for b in range(2)]
    s = summarise(recs, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(3 / 5)  # inter 3 of 5 valid pixels
    assert s["per_class"]["c"]["accuracy"] == pytest.approx(1 / 2)  # reliable c pixels with gt: 2, correct 1
    assert s["per_class"]["b"]["iou"] == pytest.approx(1 / (2 + 2 - 1))


def test_size_batches_never_mix_sizes() -> None:
    sizes = [(10, 10), (20, 10), (10, 10), (10, 10), (20, 10)]
    assert size_batches(range(5), sizes, 2) == [[0, 2], [3], [1, 4]]
    assert size_batches([1, 3], sizes, 8) == [[1], [3]]


# ----------------------------------------------------------------------------- the command


def test_dump_writes_every_file_with_the_documented_ranges(ckpt: Path, demo_root: Path, split_file: Path, tmp_path: Path) -> None:
    from semiseg_cli.data import build_dataset, get_layout, read_split_file
    from semiseg_cli.engine.checkpoint import load_for_inference
    from semiseg_cli.inference import InferenceSettings, predict_probs

    out = tmp_path / "pl"
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", split_file, "--out", out, "--drop-percent", 20,
                          "--overlays", "--workers", 0, "--batch-size", 4)
    assert code == 0, output
    assert "pixels %" in output and "mIoU" in output  # the summary table
    layout = get_layout("demo", demo_root)
    model, cfg, _ = load_for_inference(ckpt)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["image"] for r in manifest] == [f"images/train/train_{i:04d}.png" for i in range(6)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scales"]["confidence"]["scale"] == U16 and meta["identity"]["settings"]["drop_percent"] == 20
    assert len(meta["identity"]["weights_sha256"]) == 64 and meta["identity"]["step"] == 2
    for rec in manifest:
        stem = Path(rec["image"]).with_suffix("").as_posix()
        lab_im = Image.open(out / "labels" / f"{stem}.png")
        assert lab_im.mode == "P"
        assert lab_im.getpalette()[:6] == [c for rgb in layout.palette[:2] for c in rgb]
        lab = np.array(lab_im)
        conf_im = Image.open(out / "confidence" / f"{stem}.png")
        assert conf_im.mode == "I;16"
        conf = np.array(conf_im).astype(np.float64) / U16
        ent = np.array(Image.open(out / "entropy" / f"{stem}.png")).astype(np.float64) / U16
        assert (out / "overlays" / f"{stem}.jpg").is_file()
        assert (out / "records" / f"{stem}.json").is_file()
        assert set(np.unique(lab)) <= set(range(5)) | {255}
        dropped = (lab == 255).mean()
        assert 0.18 <= dropped <= 0.2  # 20% per image; ties with the threshold are kept
        assert conf.min() >= 1 / 5 - 1e-4 and conf.max() <= 1.0 and 0 <= ent.min() and ent.max() <= 1.0
        # The labels are the model's argmax, the maps its max probability and normalised entropy.
        x = build_dataset(cfg.data, [(rec["image"], None)], train=False)[0]["image"][None]
        probs = predict_probs(model, x, InferenceSettings())[0]
        kept = lab != 255
        assert (probs.argmax(0).numpy()[kept] == lab[kept]).mean() > 0.999
        assert np.abs(probs.max(0).values.numpy() - conf).max() < 1e-4
        assert np.abs(normalised_entropy(probs[None])[0].numpy() - ent).max() < 1e-4
        # Dropped pixels are the uncertain ones.
        assert ent[~kept].min() >= ent[kept].max() - 1e-4
        # Manifest numbers agree with the files and the ground truth.
        gt = layout.read_mask(rec["mask"])
        assert rec["reliable_fraction"] == pytest.approx(kept.mean(), abs=1e-6)
        assert rec["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-4)
        assert sum(rec["class_hist"]) == 64 * 64
        valid = gt != 255
        assert rec["accuracy"] == pytest.approx((probs.argmax(0).numpy() == gt)[valid].mean(), abs=1e-3)
        assert 0 <= rec["miou"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and 0.79 < summary["reliable_fraction"] <= 0.82
    # split.txt feeds `semiseg train --labeled-list`: paths resolve against the dataset root.
    pairs = read_split_file(out / "split.txt", demo_root)
    ds = build_dataset(cfg.data, pairs, train=False)
    item = ds[0]
    stem0 = Path(pairs[0][0]).with_suffix("").as_posix()
    assert torch.equal(item["mask"], torch.from_numpy(np.array(Image.open(out / "labels" / f"{stem0}.png")).astype(np.int64)))
    assert no_temp_files(out)


def test_npz_format_split_name_and_tta(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pl"
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", "val", "--out", out, "--format", "npz",
                          "--min-confidence", 0.5, "--scales", "0.75,1.0", "--flip", "--workers", 1, "--batch-size", 3)
    assert code == 0, output
    files = sorted((out / "confidence").rglob("*.npz"))
    assert len(files) == 4  # the demo val split
    for f in files:
        conf = np.load(f)["confidence"]
        ent = np.load(out / "entropy" / f.relative_to(out / "confidence"))["entropy"]
        lab = np.array(Image.open(out / "labels" / f.relative_to(out / "confidence").with_suffix(".png")))
        assert conf.dtype == np.float16 and ent.dtype == np.float16 and conf.shape == (64, 64)
        assert 0.2 - 1e-3 <= conf.min() and conf.max() <= 1.0 and 0 <= ent.min() and ent.max() <= 1.0
        clear = np.abs(conf.astype(np.float32) - 0.5) > 1e-3  # float16 rounds 0.4998 to 0.5
        assert np.array_equal((lab == 255)[clear], (conf < 0.5)[clear])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scales"]["confidence"]["scale"] == 1.0
    assert meta["identity"]["settings"]["scales"] == [0.75, 1.0] and meta["identity"]["settings"]["flip"] is True


def test_resume_skips_finished_images_and_rebuilds_the_manifest(ckpt: Path, split_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pl"
    args = ("pseudo-label", "-c", ckpt, "--split", split_file, "--out", out, "--workers", 0)
    assert invoke(*args)[0] == 0
    labels = sorted((out / "labels").rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in labels}
    # An interrupted run: one image lost its entropy map, another its record; the manifest is stale.
    (out / "entropy" / "images/train/train_0002.png").unlink()
    (out / "records" / "images/train/train_0004.json").unlink()
    (out / "manifest.jsonl").write_text((out / "manifest.jsonl").read_text().splitlines()[0] + "\n")
    code, output = invoke(*args)
    assert code == 0, output
    assert "2 images labelled, 4 already done" in " ".join(output.split())
    redone = {p for p in labels if p.stat().st_mtime_ns != mtimes[p]}
    assert {p.name for p in redone} <= {"train_0002.png", "train_0004.png"}
    manifest = [json.loads(line)["image"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [f"images/train/train_{i:04d}.png" for i in range(6)]
    assert len((out / "split.txt").read_text().splitlines()) == 6


def test_a_resumed_dump_predicts_each_image_in_the_batch_it_had_uninterrupted(
    ckpt: Path, split_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batched kernels may round differently for another batch composition (CI's CPU did), so a
    # resume that re-batched the remaining images would not be bit-identical to one run.
    import semiseg_cli.pseudo_label.runner as plr

    seen: list[list[int]] = []
    real = plr._process_batch

    def spy(model, batch, *args):  # type: ignore[no-untyped-def]
        seen.append([int(i) for i in batch["index"]])
        return real(model, batch, *args)

    monkeypatch.setattr(plr, "_process_batch", spy)
    out = tmp_path / "pl"
    args = ("pseudo-label", "-c", ckpt, "--split", split_file, "--out", out, "--workers", 0, "--batch-size", 3)
    assert invoke(*args)[0] == 0
    full_batches, seen[:] = list(seen), []
    assert any(len(b) > 1 for b in full_batches), full_batches
    victim = next(b for b in full_batches if len(b) > 1)[1]  # not the first image of its batch
    stem = f"images/train/train_{victim:04d}"
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    for sub in ("labels", "confidence", "entropy"):
        (out / sub / f"{stem}.png").unlink()
    (out / "records" / f"{stem}.json").unlink()
    code, output = invoke(*args)
    assert code == 0, output
    assert seen == [b for b in full_batches if victim in b]
    assert "1 images labelled, 5 already done" in " ".join(output.split())
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before


def test_other_checkpoint_or_settings_are_refused_without_overwrite(ckpt: Path, split_file: Path, tmp_path: Path) -> None:
    from semiseg_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "pl"
    base = ("pseudo-label", "--split", split_file, "--out", out, "--workers", 0)
    assert invoke(*base, "-c", ckpt)[0] == 0
    code, output = invoke(*base, "-c", ckpt, "--min-confidence", 0.9)
    assert code != 0 and "other settings" in error_line(output) and "--overwrite" in error_line(output)
    other = tmp_path / "other.pt"
    c = load_checkpoint(ckpt)
    key = next(k for k in c["inference_state"] if k.endswith("classifier.4.bias") or k.endswith("bias"))
    c["inference_state"][key] = c["inference_state"][key] + 1.0
    save_checkpoint(other, {k: v for k, v in c.items() if k not in ("format", "format_version", "semiseg_version")})
    code, output = invoke(*base, "-c", other)
    assert code != 0 and "another checkpoint" in error_line(output)
    # A copy of the same checkpoint elsewhere is the same identity (weights hash): resumes.
    shutil.copy(ckpt, tmp_path / "copy.pt")
    code, output = invoke(*base, "-c", tmp_path / "copy.pt")
    assert code == 0 and "0 images labelled, 6 already done" in " ".join(output.split())
    code, output = invoke(*base, "-c", other, "--overwrite")
    assert code == 0, output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["identity"]["checkpoint"] == str(other.resolve())
    # A folder of unrelated files is never written into without --overwrite, and --overwrite
    # removes only what pseudo-label owns.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", split_file, "--out", foreign, "--workers", 0)
    assert code != 0 and "not empty" in error_line(output)
    assert invoke("pseudo-label", "-c", ckpt, "--split", split_file, "--out", foreign, "--workers", 0, "--overwrite")[0] == 0
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_errors_are_one_line_and_leave_nothing_half_written(ckpt: Path, demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pl"
    code, output = invoke("pseudo-label", "-c", tmp_path / "missing.pt", "--split", "val", "--out", out)
    assert code != 0 and "does not exist" in error_line(output) and not out.exists()

    bad_split = tmp_path / "bad.txt"
    bad_split.write_text("images/train/train_0000.png\nimages/train/nope.png\n")
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", bad_split, "--out", out)
    assert code != 0 and "nope.png" in error_line(output) and not out.exists()

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    (root / "images/train/train_0001.png").write_bytes(b"not a png at all")
    split = tmp_path / "s.txt"
    split.write_text("".join(f"images/train/train_{i:04d}.png\n" for i in range(4)))
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", split, "--out", out, "--root", root, "--workers", 0)
    assert code != 0 and "train_0001.png" in error_line(output)
    assert not out.exists()  # caught by the header check, before anything is written

    # A file whose header is fine but whose data is cut short fails mid-run, in a worker: the
    # images done so far stay complete and the manifest lists exactly those.
    data = (demo_root / "images/train/train_0001.png").read_bytes()
    (root / "images/train/train_0001.png").write_bytes(data[: len(data) // 2])
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", split, "--out", out, "--root", root, "--workers", 1, "--batch-size", 1)
    assert code != 0 and "train_0001.png" in error_line(output) and "rerun" in error_line(output)
    manifest = [json.loads(line)["image"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert "images/train/train_0001.png" not in manifest and "images/train/train_0000.png" in manifest
    assert not (out / "labels/images/train/train_0001.png").exists()
    assert no_temp_files(out)
    # Fixing the file and rerunning completes the folder.
    shutil.copy(demo_root / "images/train/train_0001.png", root / "images/train/train_0001.png")
    code, output = invoke("pseudo-label", "-c", ckpt, "--split", split, "--out", out, "--root", root, "--workers", 0)
    assert code == 0, output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    assert not math.isnan(json.loads((out / "summary.json").read_text())["mean_confidence"])


def test_labels_for_training_use_the_stored_encoding_where_it_differs(cityscapes_root: Path, demo_root: Path) -> None:
    from semiseg_cli.data import get_layout

    assert get_layout("demo", demo_root).training_encoding() is None  # class ids are stored as is
    layout = get_layout("cityscapes", cityscapes_root)
    enc = layout.training_encoding()
    assert enc is not None and enc[0] == 7 and enc[18] == 33 and enc[255] == 255
    ids = np.array(list(range(19)) + [255], np.uint8)
    assert np.array_equal(layout._lut[enc[ids]], ids)  # reading them back gives the class ids


def test_the_ema_teacher_is_used_when_the_checkpoint_has_one(demo_root: Path, split_file: Path, tmp_path: Path) -> None:
    """A U2PL checkpoint: pseudo-labels come from the teacher by default (auto), and
    --weights student really switches to the student's weights."""
    from semiseg_cli.config import build_config
    from semiseg_cli.engine.checkpoint import load_checkpoint, load_for_inference
    from semiseg_cli.engine.loop import train
    from semiseg_cli.pseudo_label import weights_digest

    run = tmp_path / "u2pl"
    cfg = build_config(None, [
        f'data.root="{demo_root}"', 'data.dataset="demo"', "data.crop_size=[64,64]", "data.batch_size=2",
        'data.labeled="1/2"', "data.workers=0", "train.iters=3", "train.val_interval=0", 'model.backbone="resnet18"',
        "model.rep_head=true", "u2pl.sup_only_iters=1", "u2pl.teacher_reset=false", f'out="{run}"',
    ], "u2pl")
    train(cfg, progress=False)
    ck = run / "last.pt"
    raw = load_checkpoint(ck)
    assert raw["has_teacher"] and raw["student_state"] is not None
    teacher, _, _ = load_for_inference(ck, weights="teacher")
    student, _, _ = load_for_inference(ck, weights="student")
    assert weights_digest(teacher) != weights_digest(student)  # two EMA updates apart
    metas = {}
    for name, extra in (("auto", []), ("student", ["--weights", "student"])):
        out = tmp_path / name
        code, output = invoke("pseudo-label", "-c", ck, "--split", split_file, "--out", out, "--workers", 0, *extra)
        assert code == 0, output
        metas[name] = json.loads((out / "meta.json").read_text())["identity"]
    assert metas["auto"]["weights"] == "teacher" and metas["auto"]["weights_sha256"] == weights_digest(teacher)
    assert metas["student"]["weights"] == "student" and metas["student"]["weights_sha256"] == weights_digest(student)
    code, output = invoke("pseudo-label", "-c", ck, "--split", split_file, "--out", tmp_path / "x", "--weights", "bogus")
    assert code != 0 and "--weights" in error_line(output)
