"""Drawing, writing and reading labeled/unlabeled splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg_cli.data import (
    DatasetProblems,
    amount_dirname,
    draw_split,
    get_layout,
    parse_amounts,
    prepare_splits,
    read_split_file,
    write_split_files,
)
from semiseg_cli.errors import UserError

POOL = [(f"images/{i:03d}.png", f"masks/{i:03d}.png") for i in range(40)]


def test_parse_amounts() -> None:
    assert parse_amounts("1/8") == ["1/8"]
    assert parse_amounts(" 1/8, 1/4 ,92,0.5,1.0,1") == ["1/8", "1/4", "92", "0.5", "1.0", "1"]
    for bad, needle in [("0", "at least 1"), ("3/2", r"in \(0, 1\]"), ("abc", "not a number"), ("1/0", "not a number"),
                        ("", "no labeled amount"), ("1/8,,1/4", "empty item"), ("1/8,2/16", "listed twice")]:
        with pytest.raises(UserError, match=needle):
            parse_amounts(bad)


def test_draw_split_counts_partition_and_determinism() -> None:
    lab, unl = draw_split(POOL, "1/8", seed=0)
    assert len(lab) == 5 and len(unl) == 35
    assert sorted(lab + unl) == sorted(POOL) and not set(lab) & set(unl)
    assert lab == sorted(lab) and unl == sorted(unl)
    assert draw_split(list(reversed(POOL)), "1/8", seed=0) == (lab, unl)  # input order is irrelevant
    assert draw_split(POOL, "1/8", seed=1)[0] != lab
    assert len(draw_split(POOL, "7", seed=0)[0]) == 7
    assert len(draw_split(POOL, "1/100", seed=0)[0]) == 1  # rounds to 0: at least one
    assert draw_split(POOL, "1.0", seed=0) == (POOL, [])
    with pytest.raises(UserError, match="asks for 41 images but the pool has only 40"):
        draw_split(POOL, "41", seed=0)


def test_draw_split_ignores_global_random_state() -> None:
    import random

    random.seed(1)
    a = draw_split(POOL, "1/4", 3)
    random.seed(2)
    np.random.seed(2)
    assert draw_split(POOL, "1/4", 3) == a


def test_amount_dirname() -> None:
    assert amount_dirname("1/8") == "1_8" and amount_dirname("183") == "183"


def test_write_is_byte_identical_and_never_silently_replaced(tmp_path: Path) -> None:
    lab, unl = draw_split(POOL, "1/4", 0)
    paths = write_split_files(tmp_path / "a", lab, unl + [("images/x.png", None)])
    assert [p.name for p in paths] == ["labeled.txt", "unlabeled.txt"]
    lab2, unl2 = draw_split(POOL, "1/4", 0)
    write_split_files(tmp_path / "b", lab2, unl2 + [("images/x.png", None)])
    for name in ("labeled.txt", "unlabeled.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = (tmp_path / "a" / "unlabeled.txt").read_text()
    assert text.endswith("images/x.png\n") and text.startswith(f"{unl[0][0]} {unl[0][1]}\n")
    write_split_files(tmp_path / "a", lab, unl + [("images/x.png", None)])  # same content: fine
    other = draw_split(POOL, "1/4", 1)
    with pytest.raises(UserError, match="labeled.txt already exists .*--overwrite"):
        write_split_files(tmp_path / "a", *other)
    write_split_files(tmp_path / "a", *other, overwrite=True)
    assert (tmp_path / "a" / "labeled.txt").read_text().split("\n")[0] == " ".join(other[0][0])


def test_read_split_file(folder_root: Path, tmp_path: Path) -> None:
    pairs = get_layout("folder", folder_root).list_pairs("train")[:3] + [("images/extra/u0.png", None)]
    write_split_files(tmp_path, pairs[:2], pairs[2:])
    assert read_split_file(tmp_path / "labeled.txt", folder_root) == pairs[:2]
    assert read_split_file(tmp_path / "unlabeled.txt", folder_root) == pairs[2:]
    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\n/images/train/img0.png masks/train/img0.png\na b c\n")
    with pytest.raises(UserError, match="bad.txt line 3: expected `image \\[mask\\]`, got 3 fields"):
        read_split_file(bad, folder_root)
    bad.write_text("images/train/img0.png\nimages/train/nope.png masks/train/img0.png\n")
    with pytest.raises(UserError, match="bad.txt line 2: images/train/nope.png does not exist under"):
        read_split_file(bad, folder_root)
    with pytest.raises(UserError, match="split file .*missing.txt does not exist"):
        read_split_file(tmp_path / "missing.txt", folder_root)


def test_prepare_splits_one_and_several_amounts(demo_root: Path, tmp_path: Path) -> None:
    one = prepare_splits("demo", demo_root, ["1/4"], 0, tmp_path / "one", tags=True)
    assert [p.name for p in one] == ["labeled.txt", "unlabeled.txt", "tags.json"]
    assert len(read_split_file(one[0], demo_root)) == 3 and len(read_split_file(one[1], demo_root)) == 9
    tags = json.loads(one[2].read_text())
    assert len(tags) == 12 and all(0 in ids for ids in tags.values())  # background kept outside VOC
    again = prepare_splits("demo", demo_root, ["1/4"], 0, tmp_path / "again", tags=True)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in again]
    several = prepare_splits("demo", demo_root, ["1/4", "6"], 0, tmp_path / "many")
    assert sorted(p.relative_to(tmp_path / "many").as_posix() for p in several) == [
        "1_4/labeled.txt", "1_4/unlabeled.txt", "6/labeled.txt", "6/unlabeled.txt"]
    with pytest.raises(UserError, match="--overwrite"):
        prepare_splits("demo", demo_root, ["1/4"], 1, tmp_path / "one")


def test_prepare_splits_voc_tags_leave_out_background(voc_root: Path, tmp_path: Path) -> None:
    paths = prepare_splits("voc", voc_root, ["1"], 0, tmp_path, tags=True)
    tags = json.loads(paths[2].read_text())
    assert tags == {f"JPEGImages/2007_00000{k}.jpg": [k + 5] for k in (1, 2, 3)}


def test_prepare_splits_reports_problems_and_writes_nothing(make_tree: dict, tmp_path: Path) -> None:
    root = make_tree["folder"](tmp_path / "data")
    (root / "masks" / "train" / "img0.png").unlink()
    Image.new("L", (5, 5)).save(root / "masks" / "train" / "img1.png")
    with pytest.raises(DatasetProblems) as err:
        prepare_splits("folder", root, ["1/2"], 0, tmp_path / "out")
    assert len(err.value.problems) == 2 and "\n" not in str(err.value)
    assert str(err.value).startswith("2 problems in the train split of") and "img0.png" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="asks for 99 images"):
        prepare_splits("folder", make_tree["folder"](tmp_path / "ok"), ["1/2", "99"], 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unlabeled_split_adds_the_other_pool_images_as_unlabeled(voc_root: Path, tmp_path: Path) -> None:
    # U2PL's VOC classic setting: labeled drawn from `train` (1-3), the rest of `train_aug`
    # (1, 2, 3, 6) unlabeled; an image is matched by its path, whatever folder its mask is in.
    paths = prepare_splits("voc", voc_root, ["1"], 0, tmp_path / "a", split="train", unlabeled_split="train_aug")
    labeled = (tmp_path / "a" / "labeled.txt").read_text().split("\n")[:-1]
    unlabeled = (tmp_path / "a" / "unlabeled.txt").read_text().split("\n")[:-1]
    assert len(paths) == 2 and len(labeled) == 1 and len(unlabeled) == 3
    lab_img = labeled[0].split()[0]
    imgs = [ln.split()[0] for ln in unlabeled]
    assert lab_img not in imgs and len(set(imgs)) == 3
    assert "JPEGImages/2007_000006.jpg" in imgs  # from train_aug only
    # Without it, the unlabeled images are only the train pool's other two.
    prepare_splits("voc", voc_root, ["1"], 0, tmp_path / "b", split="train")
    assert len((tmp_path / "b" / "unlabeled.txt").read_text().split("\n")[:-1]) == 2
    assert (tmp_path / "b" / "labeled.txt").read_text() == (tmp_path / "a" / "labeled.txt").read_text()
    # The training loop draws the same pools from the config.
    from semiseg_cli.config import build_config
    from semiseg_cli.data.layouts import get_layout
    from semiseg_cli.engine.run_data import resolve_pools

    cfg = build_config(None, ['data.dataset="voc"', f'data.root="{voc_root}"', 'data.labeled="1"',
                              'data.unlabeled_split="train_aug"'], "u2pl")
    lab, unl = resolve_pools(cfg, get_layout("voc", voc_root), uses_tags=False)
    assert [p[0] for p in lab] == [lab_img] and [p[0] for p in unl] == imgs
