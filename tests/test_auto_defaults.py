"""The generic preset: `train --dataset X` without a preset sizes resize, crop, eval batch and the
backbone's weights from the data, keeps whatever the user set, and stores plain values."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app
from semiseg_cli.engine.setup import resolve_run_config

runner = CliRunner()


def folder_tree(root: Path, size: tuple[int, int], n: int = 4) -> Path:
    """A folder layout with `n` train and 2 val images of `size` (w, h) and blank masks."""
    w, h = size
    for split, count in (("train", n), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (w, h), (i * 40, 90, 30)).save(root / "images" / split / f"{split}{i}.png")
            mask = Image.new("L", (w, h), 0)
            mask.paste(1, (0, 0, w // 2, h))
            mask.save(root / "masks" / split / f"{split}{i}.png")
    (root / "classes.txt").write_text("background\nthing\n")
    return root


def resolve(root: Path, *sets: str, values: dict | None = None) -> tuple[object, list[str]]:
    notes: list[str] = []
    cfg = resolve_run_config("generic_mbv2-os16_8+8-4000it_auto", "u2pl", list(sets),
                             {"data.root": str(root), "data.labeled": "1/2", **(values or {})}, notes=notes)
    return cfg, notes


def test_large_photos_are_resized_to_1024_and_cropped_at_512(tmp_path: Path) -> None:
    cfg, notes = resolve(folder_tree(tmp_path / "d", (2000, 1500)))
    assert cfg.data.resize == pytest.approx(1024 / 2000)
    # 1500 * 0.512 = 768 on the shorter side, capped at 512; eval: 2^21 / (1024 * 768) = 2.67 -> 2.
    assert cfg.data.crop_size == (512, 512) and cfg.eval.batch_size == 2
    assert cfg.data.auto is False and len(notes) == 4 and all("=" in n for n in notes)


def test_small_images_keep_their_size_and_get_a_multiple_of_16(tmp_path: Path) -> None:
    cfg, _ = resolve(folder_tree(tmp_path / "d", (200, 150)))
    assert cfg.data.resize == 1.0 and cfg.data.crop_size == (144, 144)
    assert cfg.eval.batch_size == 16  # 2^21 / 30000 = 70, capped at 16


def test_what_the_user_sets_is_never_changed(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "d", (2000, 1500))
    cfg, notes = resolve(root, "data.resize=1.0", "eval.batch_size=3", values={"data.crop_size": [96, 128]})
    assert cfg.data.resize == 1.0 and cfg.data.crop_size == (96, 128) and cfg.eval.batch_size == 3
    assert [n.split(" =")[0] for n in notes] == ["model.pretrained"]


def test_backbone_weights_shared_file_then_torchvision_cache_then_random_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision.models as tvm

    root = folder_tree(tmp_path / "d", (64, 64))
    shared = tmp_path / "shared"
    (shared / "weights").mkdir(parents=True)
    monkeypatch.setenv("SEMISEG_SHARED", str(shared))
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    cfg, _ = resolve(root)
    assert cfg.model.pretrained is None
    assert "no ImageNet MobileNetV2 weights found" in capsys.readouterr().err
    cached = hub / "checkpoints" / Path(tvm.MobileNet_V2_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve(root)[0].model.pretrained == "imagenet"
    (shared / "weights" / "mobilenet_v2_imagenet_features.pth").write_bytes(b"")
    assert resolve(root)[0].model.pretrained == str(shared / "weights" / "mobilenet_v2_imagenet_features.pth")
    # An explicit choice stays, even none.
    assert resolve(root, "model.pretrained=none")[0].model.pretrained is None


@pytest.mark.realdata
def test_train_dataset_without_a_preset_prints_its_choices_and_stores_plain_values(tmp_path: Path, shared: Any) -> None:
    weights = shared.require("weights/mobilenet_v2_imagenet_features.pth")
    root = folder_tree(tmp_path / "d", (96, 80), n=4)
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--root", str(root), "--method", "supervised", "--labeled", "1/2",
            "--iters", "2", "--batch-size", "2", "--set", "data.workers=0", "--set", "train.val_interval=2",
            "--device", "cpu", "--out", str(run)]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    assert "auto: data.crop_size = [80, 80]" in dry.stderr and not run.exists()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    stored = tomllib.loads((run / "config.toml").read_text())
    assert stored["data"]["auto"] is False and stored["data"]["crop_size"] == [80, 80]
    assert Path(stored["model"]["pretrained"]).resolve() == weights.resolve()
    # The stored config is a plain preset: training from it again chooses nothing.
    again = runner.invoke(app, ["train", "--preset", str(run / "config.toml"), "--out", str(tmp_path / "r2"), "--dry-run"])
    assert again.exit_code == 0 and "auto:" not in again.stderr


def test_the_generic_preset_resolves_on_a_flat_colour_folder(tmp_path: Path) -> None:
    """A flat folder (images/ + RGB masks/ + palette.txt, no split folders): the pool is `train`,
    so the generic preset measures it and the palette gives the classes."""
    from semiseg_cli.data import layout_for
    from tests.test_own_data import make_flat_colour_tree

    root = make_flat_colour_tree(tmp_path / "flat", n=6, size=40)
    notes: list[str] = []
    cfg = resolve_run_config(None, "unimatch", [], {"data.dataset": "folder", "data.root": str(root), "data.labeled": "1/2"}, notes=notes)
    assert cfg.data.auto is False  # no preset named: plain defaults, nothing filled
    cfg = resolve_run_config("generic_mbv2-os16_8+8-4000it_auto", "unimatch", [],
                             {"data.dataset": "folder", "data.root": str(root), "data.labeled": "1/2"}, notes=notes)
    assert cfg.data.crop_size == (64, 64)  # 40-pixel images: the crop's lower bound
    assert cfg.eval.batch_size == 16 and any(n.startswith("data.crop_size") for n in notes)
    assert layout_for(cfg.data).num_classes == 3
