"""`semiseg pseudo-label`: the pure tensor functions by hand, then the command end to end on a
tiny checkpoint (files, formats, value ranges, manifest, resume, overwrite and error rules), then
the device-side outputs against the host pipeline they replace and a numpy reference, the writer
pool (bounds, errors, dead workers), the same bytes for any number of writers, and the writer
bench at a tiny size."""

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
from tests.cli_checks import no_temp_files

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


# ----------------------------------------------------------------------------- device-side outputs


def smooth_probs(b: int, c: int, h: int, w: int, scale: float, seed: int) -> torch.Tensor:
    """Probabilities like a network's: random logits at 1/4 resolution, upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, max(1, h // 4), max(1, w // 4), generator=g) * scale
    return torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)


def host_pipeline(probs: torch.Tensor, c: int, fmt: str, min_conf: float | None, drop: float | None,
                  encoding: np.ndarray, rgb: np.ndarray, colours: np.ndarray) -> dict[str, np.ndarray]:
    """What earlier versions computed: thresholds on the device, then the int32 maps cast to
    uint16, the stored encoding and the overlay with numpy on the host."""
    from semiseg_cli.pseudo_label.writer import overlay

    conf, label = probs.max(1)
    ent = normalised_entropy(probs)
    keep = reliable_mask(conf, ent, min_conf, drop)
    lab = torch.where(keep, label, torch.full_like(label, 255)).to(torch.uint8).numpy()
    if fmt == "png":
        cq = (conf * U16).round_().to(torch.int32).numpy().astype(np.uint16)
        eq = (ent * U16).round_().to(torch.int32).numpy().astype(np.uint16)
    else:
        cq, eq = conf.half().numpy(), ent.half().numpy()
    ov = np.stack([overlay(rgb[b], lab[b], colours) for b in range(len(lab))])
    return {"label": lab, "confidence": cq, "entropy": eq, "train_label": encoding[lab], "overlay": ov}


@pytest.mark.parametrize("fmt,min_conf,drop", [("png", None, None), ("png", None, 20.0), ("png", 0.6, 35.0), ("npz", 0.5, None)])
def test_device_outputs_equal_the_host_pipeline_and_a_numpy_reference(fmt: str, min_conf: float | None, drop: float | None) -> None:
    from semiseg_cli.pseudo_label.quantise import host_arrays, pixel_outputs, to_host
    from semiseg_cli.pseudo_label.writer import overlay_colours

    b, c, h, w = 3, 7, 19, 26
    probs = smooth_probs(b, c, h, w, 3.0, seed=1)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    colours = overlay_colours([tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(c)])
    encoding = np.full(256, 255, np.uint8)
    encoding[:c] = rng.permutation(200)[:c].astype(np.uint8)
    arrays, counts = pixel_outputs(probs, c, fmt, min_conf, drop, encoding=torch.from_numpy(encoding),
                                   rgb=torch.from_numpy(rgb), colours=torch.from_numpy(colours))
    host, event = to_host(arrays)
    assert event is None
    got = host_arrays(host)
    want = host_pipeline(probs, c, fmt, min_conf, drop, encoding, rgb, colours)
    assert set(got) == set(want)
    for k in want:  # bit for bit what was written before
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # An independent float64 numpy reference: equal up to float32 rounding.
    p = probs.double().numpy()
    conf_r, label_r = p.max(1), p.argmax(1)
    ent_r = np.clip(-(p * np.log(p + 1e-10)).sum(1) / np.log(c), 0, 1)
    keep_r = np.ones_like(conf_r, bool) if min_conf is None else conf_r >= min_conf
    near = np.zeros_like(keep_r)
    if min_conf is not None:
        near |= np.abs(conf_r - min_conf) < 1e-5
    if drop:
        n = h * w
        n_drop = round(n * drop / 100)
        for i in range(b):
            thresh = np.sort(ent_r[i].ravel())[n - n_drop - 1]
            keep_r[i] &= ent_r[i] <= thresh
            near[i] |= np.abs(ent_r[i] - thresh) < 1e-5
    lab = got["label"]
    assert np.array_equal(lab != 255, keep_r) or np.array_equal((lab != 255)[~near], keep_r[~near])
    assert np.array_equal(lab[keep_r & ~near], label_r[keep_r & ~near])
    if fmt == "png":
        assert np.abs(got["confidence"].astype(int) - np.round(conf_r * U16)).max() <= 1
        assert np.abs(got["entropy"].astype(int) - np.round(ent_r * U16)).max() <= 1
    else:
        assert np.abs(got["confidence"].astype(np.float64) - conf_r).max() < 1e-3
    assert counts["hist"].sum() == b * h * w
    assert counts["reliable_hist"].sum().item() == int((lab != 255).sum())


def test_maps_are_clamped_before_the_16_bit_cast() -> None:
    from semiseg_cli.pseudo_label.quantise import quantise_u16

    x = torch.tensor([0.0, 0.5, 1.0, 1.00001, -1e-6])
    assert quantise_u16(x).numpy().view(np.uint16).tolist() == [0, 32768, 65535, 65535, 0]


def test_counts_without_a_host_sync_equal_bincount() -> None:
    from semiseg_cli.pseudo_label.stats import _bincount

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (5000,), generator=g)
    wts = torch.rand(5000, generator=g, dtype=torch.float64)
    # The CUDA formula, run on the CPU: index_add_ into zeros.
    assert torch.equal(torch.zeros(60, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx)), torch.bincount(idx, minlength=60))
    assert torch.allclose(torch.zeros(60, dtype=torch.float64).index_add_(0, idx, wts), torch.bincount(idx, wts, minlength=60))
    assert torch.equal(_bincount(idx, 60), torch.bincount(idx, minlength=60))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_outputs_on_cuda_match_the_cpu() -> None:
    from semiseg_cli.pseudo_label.quantise import host_arrays, pixel_outputs, to_host

    probs = smooth_probs(4, 19, 64, 96, 4.0, seed=2)
    gt = torch.randint(0, 19, (4, 64, 96))
    cpu_a, cpu_c = pixel_outputs(probs, 19, "png", 0.5, 20.0, gt=gt)
    gpu_a, gpu_c = pixel_outputs(probs.cuda(), 19, "png", 0.5, 20.0, gt=gt.cuda())
    host, event = to_host({**gpu_a, **{"c." + k: v for k, v in gpu_c.items()}})
    event.synchronize()
    got, want = host_arrays(host), host_arrays(cpu_a)
    assert (got["label"] == want["label"]).mean() > 0.999
    assert np.abs(got["confidence"].astype(int) - want["confidence"].astype(int)).max() <= 1
    assert np.abs(got["entropy"].astype(int) - want["entropy"].astype(int)).max() <= 1
    for k in ("hist", "gt_hist"):
        assert torch.equal(host["c." + k], cpu_c[k]), k


# ----------------------------------------------------------------------------- writers


def test_stored_16_bit_pngs_decode_to_the_values_written(tmp_path: Path) -> None:
    from semiseg_cli.pseudo_label.writer import _save_map_png

    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 5), (17, 64)):
        a = rng.integers(0, 65536, shape, dtype=np.uint16)
        a.flat[0] = 65535
        for level in (0, 1, 6):
            p = tmp_path / f"m{level}.png"
            _save_map_png(p, a, level)
            im = Image.open(p)
            assert im.mode == "I;16" and im.size == (shape[1], shape[0])
            assert np.array_equal(np.array(im), a), (shape, level)


def _copy_job(pool: object, i: int, path: Path, **meta: object) -> dict[str, np.ndarray]:
    arrays = {"a": np.full((5, 7 + i), i, np.uint16), "b": np.arange(i + 3, dtype=np.uint8)}

    def fill(views: dict[str, np.ndarray]) -> None:
        for k, a in arrays.items():
            np.copyto(views[k], a)

    pool.submit(i, {"path": str(path), **meta}, [(k, a.dtype, a.shape) for k, a in arrays.items()], fill, label=f"job {i}")  # type: ignore[attr-defined]
    return arrays


@pytest.mark.parametrize("shared", [True, False])
def test_the_writer_pool_bounds_the_jobs_in_flight(tmp_path: Path, shared: bool) -> None:
    import pl_pool_tasks

    from semiseg_cli.pseudo_label.pool import WriterPool

    pool = WriterPool(pl_pool_tasks.copy, None, workers=2, depth=2, shared=shared)
    try:
        seen, expected = [], {}
        for i in range(12):
            arrays = _copy_job(pool, i, tmp_path / f"{i}.bin", sleep=0.05)
            expected[i] = b"".join(arrays[k].tobytes() for k in sorted(arrays))
            seen.append(pool.in_flight)
        pool.close()
    finally:
        pool.terminate()
    assert pool.bound == 4 and max(seen) <= 4 and pool.peak_in_flight <= 4
    assert pool.wait_s > 0.05  # submit blocked while both workers held two jobs
    assert sorted(pool.completed) == list(range(12))  # type: ignore[type-var]
    for i, data in expected.items():
        assert (tmp_path / f"{i}.bin").read_bytes() == data


def test_a_writer_exception_is_one_line_and_the_other_jobs_finish(tmp_path: Path) -> None:
    import pl_pool_tasks

    from semiseg_cli.pseudo_label.pool import PoolError, WriterPool

    pool = WriterPool(pl_pool_tasks.copy, None, workers=2, depth=2)
    try:
        with pytest.raises(PoolError) as err:
            for i in range(30):
                _copy_job(pool, i, tmp_path / f"{i}.bin", sleep=0.02, fail=i == 3)
            pool.close()
        with pytest.raises(PoolError):  # later calls keep failing, without hanging
            pool.close()
    finally:
        pool.terminate()
    msg = str(err.value)
    assert "\n" not in msg and "job 3" in msg and "RuntimeError: injected failure" in msg
    assert 3 not in pool.completed and {0, 1, 2} <= set(pool.completed)
    done = {int(p.stem) for p in tmp_path.glob("*.bin")}
    assert done == set(pool.completed) and len(done) < 30  # stopped taking jobs after the error


def test_a_writer_process_that_dies_is_reported_not_waited_for(tmp_path: Path) -> None:
    import pl_pool_tasks

    from semiseg_cli.pseudo_label.pool import PoolError, WriterPool

    pool = WriterPool(pl_pool_tasks.copy, None, workers=1, depth=2)
    try:
        _copy_job(pool, 0, tmp_path / "0.bin")
        _copy_job(pool, 1, tmp_path / "1.bin", die=True)
        with pytest.raises(PoolError, match="killed by signal 9.* while writing job 1"):
            pool.drain()
    finally:
        pool.terminate()
    assert pool.completed == [0] and pool.dead_pids == pool.pids


def test_a_writer_killed_mid_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    import pl_pool_tasks

    from semiseg_cli.pseudo_label.pool import PoolError, WriterPool
    from semiseg_cli.pseudo_label.writer import Writer

    w = Writer(tmp_path, "png", [(0, 0, 0)], writers=1)
    w.pool.terminate()  # type: ignore[union-attr]
    w.pool = WriterPool(pl_pool_tasks.die_mid_write, w.ctx, 1)
    w.submit(0, "x", {"files": {}}, {"label": np.zeros((2, 2), np.uint8)})
    with pytest.raises(PoolError, match="killed by signal 9"):
        w.close()
    assert (tmp_path / "labels").is_dir() and no_temp_files(tmp_path)
    assert w.records == {}


def test_writer_processes_do_not_import_torch(tmp_path: Path) -> None:
    import pl_pool_tasks

    from semiseg_cli.pseudo_label.pool import WriterPool

    pool = WriterPool(pl_pool_tasks.modules, None, workers=1)
    try:
        pool.submit(0, {"path": str(tmp_path / "m.json")}, [], lambda v: None)
        pool.close()
    finally:
        pool.terminate()
    mods = json.loads((tmp_path / "m.json").read_text())
    assert "numpy" in mods and not [m for m in mods if m.startswith("torch")], mods


def dump_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("meta.json", "split.txt")}


def test_any_number_of_writers_writes_the_same_bytes(ckpt: Path, split_file: Path, tmp_path: Path) -> None:
    base = ("pseudo-label", "-c", ckpt, "--split", split_file, "--workers", 0, "--overlays", "--drop-percent", 20, "--batch-size", 4)
    dumps = {}
    for n in (0, 1, 2):
        out = tmp_path / f"w{n}"
        code, output = invoke(*base, "--out", out, "--writers", n)
        assert code == 0, output
        dumps[n] = dump_bytes(out)
        assert (out / "split.txt").read_text() == (tmp_path / "w0" / "split.txt").read_text().replace("/w0/", f"/w{n}/")
    assert dumps[0] == dumps[1] == dumps[2]
    assert len([k for k in dumps[0] if k.startswith("records/")]) == 6
    # --map-compression 1 (Pillow, the files of earlier versions): other map bytes, same pixels,
    # every other file the same.
    out = tmp_path / "l1"
    assert invoke(*base, "--out", out, "--writers", 2, "--map-compression", 1)[0] == 0
    l1 = dump_bytes(out)
    assert l1.keys() == dumps[0].keys()
    for k, data in l1.items():
        if k.startswith(("confidence/", "entropy/")):
            assert data != dumps[0][k]
            assert np.array_equal(np.array(Image.open(out / k)), np.array(Image.open(tmp_path / "w0" / k)))
        else:
            assert data == dumps[0][k], k


@pytest.mark.parametrize("writers", [0, 2])
def test_a_write_error_mid_run_is_one_line_and_keeps_the_finished_images(ckpt: Path, split_file: Path, tmp_path: Path, writers: int) -> None:

    out = tmp_path / "pl"
    args = ("pseudo-label", "-c", ckpt, "--split", split_file, "--out", out, "--workers", 0, "--writers", writers, "--batch-size", 2)
    assert invoke(*args)[0] == 0
    stem = "images/train/train_0003"
    for sub in ("labels", "entropy"):
        (out / sub / f"{stem}.png").unlink()
    (out / "records" / f"{stem}.json").unlink()
    (out / "entropy" / f"{stem}.png").mkdir()  # a folder where a file goes: the rename fails in the writer
    code, output = invoke(*args)
    assert code != 0
    line = error_line(output)
    assert f"entropy/{stem}.png" in line and "folder" in line
    manifest = [json.loads(x)["image"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 5 and f"{stem}.png" not in manifest
    assert no_temp_files(out)
    (out / "entropy" / f"{stem}.png").rmdir()
    code, output = invoke(*args)
    assert code == 0 and "1 images labelled, 5 already done" in " ".join(output.split())


def test_writer_options_are_checked() -> None:
    code, output = invoke("pseudo-label", "-c", "x.pt", "--split", "val", "--out", "o", "--writers", -1)
    assert code != 0 and "--writers" in error_line(output)
    code, output = invoke("pseudo-label", "-c", "x.pt", "--split", "val", "--out", "o", "--map-compression", 10)
    assert code != 0 and "--map-compression" in error_line(output)


def test_the_writer_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    dest = tmp_path / "plw.json"
    r = subprocess.run([sys.executable, str(repo / "bench/bench_pl_writers.py"), "--tiny", "--threads", "1", "--work", str(tmp_path / "w"),
                        "--out", str(dest)], cwd=repo, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(dest.read_text())
    assert {row["writers"] for row in res["writer_stage"]} >= {0, 1}
    assert all(row["images_per_s"] > 0 and row["bytes_per_image"] > 0 for row in res["writer_stage"])
    for s in res["writers_needed"]:
        assert s["per_worker_images_per_s"] > 0 and set(s["workers_needed"]) == set(res["targets_images_per_s"])
    e2e = res["end_to_end"]
    writers = {v["writers"] for v in e2e["variants"]}
    assert e2e["pure_inference_s"] > 0 and 0 in writers and max(writers) >= 1
    assert all(v["images"] == e2e["images"] and v["ratio"] > 0 for v in e2e["variants"])
    assert "writers needed" in r.stdout and "pure inference" in r.stdout
