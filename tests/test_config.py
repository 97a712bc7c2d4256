"""Presets and config validation: every shipped preset loads; bad input names the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from semiseg_cli.config import build_config, config_to_toml, list_presets, validate
from semiseg_cli.errors import UserError


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_validates_and_round_trips(name: str) -> None:
    cfg = build_config(name)
    again = validate(tomllib.loads(config_to_toml(cfg)))
    assert again.model_dump() == cfg.model_dump()


def test_presets_cover_every_method_and_dataset() -> None:
    names = list_presets()
    for method in ("supervised", "u2pl", "advsemiseg", "dupl"):
        assert any(n.startswith(method + "_") for n in names), method
    for ds in ("demo", "camvid", "voc", "cityscapes"):
        assert any(ds in n for n in names), ds


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.bogus=1", "unknown key 'data.bogus'"),
        ("train.iters=0", "train.iters"),
        ('model.backbone="vgg16"', "model.backbone"),
        ("optim.lr=-1", "optim.lr"),
        ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
        ("data.crop_size=[4, 4]", "data.crop_size"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(UserError) as e:
        build_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_method_section_is_chosen_by_the_method_field() -> None:
    with pytest.raises(UserError, match="belongs to method u2pl, but this config's method is supervised; add --method u2pl"):
        build_config(None, ["u2pl.drop_percent=50"], "supervised")
    cfg = build_config(None, ["u2pl.drop_percent=50"], "u2pl")
    assert cfg.u2pl.drop_percent == 50


def test_switching_method_keeps_the_shared_sections() -> None:
    cfg = build_config("supervised_mbv2-os16_1x4-300it_camvid-176x224", ["train.iters=7"], "u2pl")
    assert cfg.method == "u2pl" and cfg.data.dataset == "camvid" and cfg.train.iters == 7


def test_unknown_preset_and_bad_set_syntax() -> None:
    with pytest.raises(UserError, match="unknown preset"):
        build_config("no-such-preset")
    with pytest.raises(UserError, match="section.key=value"):
        build_config(None, ["train.iters"])


def test_preset_base_composition_and_loops(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('base = "b.toml"\n[train]\niters = 3\n')
    (tmp_path / "b.toml").write_text('method = "supervised"\n[train]\nseed = 9\niters = 100\n')
    cfg = build_config(str(tmp_path / "a.toml"))
    assert cfg.train.iters == 3 and cfg.train.seed == 9
    (tmp_path / "c.toml").write_text('base = "d.toml"\n')
    (tmp_path / "d.toml").write_text('base = "c.toml"\n')
    with pytest.raises(UserError, match="loops"):
        build_config(str(tmp_path / "c.toml"))


def test_invalid_toml_is_a_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[train\niters = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        build_config(str(p))


def test_presets_name_shared_files_through_semiseg_shared(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A preset that names `$SEMISEG_SHARED/...` works from any folder: the token becomes the
    shared folder beside the repository, or the environment variable when it is set."""
    from semiseg_cli.config import shared_dir

    monkeypatch.delenv("SEMISEG_SHARED", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = build_config("supervised_mbv2-os16_1x4-300it_camvid-176x224")
    repo = Path(__file__).resolve().parents[1]
    assert Path(cfg.data.root) == repo.parent / "shared" / "data" / "camvid" == shared_dir() / "data" / "camvid"
    assert cfg.model.pretrained == str(repo.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth")
    monkeypatch.setenv("SEMISEG_SHARED", str(tmp_path / "elsewhere"))
    cfg = build_config("u2pl_mbv2-os16_1x4+4-1200it_camvid-176x224", ['data.root="${SEMISEG_SHARED}/cv"'])
    assert cfg.data.root == str(tmp_path / "elsewhere" / "cv")
    assert cfg.model.pretrained.startswith(str(tmp_path / "elsewhere"))
