"""Data-loading speed switches: the decoded-image cache, the JPEG draft decode, pinned memory,
persistent workers and prefetch. None may change a batch (or, for the draft, anything but the
pixels of a downscaled JPEG), the sample order, or the RNG streams an exact resume relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_cli.config import DataConfig, build_config
from semiseg_cli.data import SegDataset, TrainTransform, build_dataset, get_layout
from semiseg_cli.data import datasets as datasets_mod
from semiseg_cli.data import decoded
from semiseg_cli.data.reading import read_rgb_scaled, scaled_size
from semiseg_cli.engine.loaders import LoaderSettings, PersistentPasses, eval_loader, infinite_loader, loader_settings, to_device
from semiseg_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _smooth(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder dataset of 6 smooth 96x72 JPEGs with 3-class masks, one image without a mask."""
    root = tmp_path_factory.mktemp("jpeg")
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for k in range(6):
        _smooth(rng, 96, 72).save(root / "images" / "train" / f"im{k}.jpg", quality=92)
        mask = np.kron(rng.integers(0, 3, (9, 12)), np.ones((8, 8), int)).astype(np.uint8)
        mask[0] = 255
        if k != 5:
            Image.fromarray(mask).save(root / "masks" / "train" / f"im{k}.png")
    return root


def _pairs(root: Path) -> list[tuple[str, str | None]]:
    pairs = get_layout("folder", root).list_pairs("train")
    return [(img, m if (root / m).is_file() else None) for img, m in pairs]  # type: ignore[operator]


def _train_ds(root: Path, **kw) -> SegDataset:  # type: ignore[no-untyped-def]
    layout = get_layout("folder", root)
    return SegDataset(layout, _pairs(root), TrainTransform((40, 48), (0.5, 2.0)), resize=kw.pop("resize", 0.75), **kw)


def _batches(ds: SegDataset, n: int, workers: int = 0, opts: LoaderSettings | bool = False, start: int = 0) -> list[dict]:
    it = infinite_loader(ds, 2, workers, seed=3, stream=0, start=start, pin=opts)
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["name"] == y["name"]
        for k in ("image", "mask", "valid", "tags", "index", "has_mask"):
            assert torch.equal(x[k], y[k]), k


# ----------------------------------------------------------------------------- the cache


def test_cached_batches_equal_uncached_ones_in_process_and_from_a_forked_worker(jpeg_root: Path) -> None:
    plain = _batches(_train_ds(jpeg_root, cache=False), 6)  # 12 samples: two passes over the 6 images
    lazily = _train_ds(jpeg_root, cache=True)
    _same(plain, _batches(lazily, 6))  # workers = 0: filled as read, then served from memory
    cache = lazily.decoded_cache()
    assert cache is not None and cache.filled.all()
    assert not cache.get(0).image.flags.writeable  # a transform writing into it would fail, not corrupt
    forked = _train_ds(jpeg_root, cache=True)
    _same(plain, _batches(forked, 6, workers=1))
    assert forked.decoded_cache().filled.all()  # filled in this process before the worker started


def test_cached_items_keep_given_tags_and_the_mask_derived_ones(jpeg_root: Path) -> None:
    a, b = _train_ds(jpeg_root, cache=False, resize=1.0), _train_ds(jpeg_root, cache=True, resize=1.0)
    assert b.fill_cache() == 6
    given = {img: [2] for img, _ in a.pairs}
    a.tags, b.tags = given, dict(given)
    assert torch.equal(torch.stack([a[i]["tags"] for i in range(6)]), torch.stack([b[i]["tags"] for i in range(6)]))
    a.tags = b.tags = None
    for i in range(6):
        assert torch.equal(a[i]["tags"], b[i]["tags"]), i
    assert b[5]["tags"].sum() == 0 and not b[5]["has_mask"]  # no mask: no tags, all-ignore mask


def test_auto_caches_only_what_fits_and_true_refuses_what_cannot(jpeg_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need = decoded.DecodedCache.bytes_for([(72, 54)] * 6, [True] * 5 + [False])
    monkeypatch.setattr(decoded, "available_memory", lambda: 100 * need)
    assert _train_ds(jpeg_root, cache="auto").decoded_cache() is not None  # 1% of the memory
    monkeypatch.setattr(decoded, "available_memory", lambda: 2 * need)
    ds = _train_ds(jpeg_root, cache="auto", cache_ram_fraction=0.25)
    assert ds.decoded_cache() is None and ds.fill_cache() == 0  # half the memory: more than a quarter
    assert ds[0]["image"].shape == (3, 40, 48)  # still loads, decoding each time
    monkeypatch.setattr(decoded, "available_memory", lambda: None)
    assert _train_ds(jpeg_root, cache="auto").decoded_cache() is None  # unknown memory: no cache
    monkeypatch.setattr(decoded, "available_memory", lambda: need // 2)
    with pytest.raises(UserError, match="cache_decoded = true needs") as e:
        _train_ds(jpeg_root, cache=True).decoded_cache()
    assert "\n" not in str(e.value)


def test_a_worker_never_starts_a_cache_of_its_own(jpeg_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _train_ds(jpeg_root, cache=True)
    monkeypatch.setattr(datasets_mod, "get_worker_info", lambda: object())
    assert ds.decoded_cache() is None and ds[0]["image"].shape == (3, 40, 48)
    monkeypatch.undo()
    assert ds.decoded_cache() is not None  # decided later, in the process that builds the loaders


def test_only_training_datasets_cache(demo_root: Path) -> None:
    cfg = DataConfig(dataset="demo", root=str(demo_root), crop_size=(32, 32))
    pairs = get_layout("demo", demo_root).list_pairs("train")[:2]
    assert build_dataset(cfg, pairs, train=True).cache_mode == "auto"
    assert build_dataset(cfg, pairs, train=False).cache_mode is False


# ----------------------------------------------------------------------------- the JPEG draft


def test_draft_only_when_downsizing_jpegs_and_the_size_is_the_full_decode_one(jpeg_root: Path, tmp_path: Path) -> None:
    path = jpeg_root / "images" / "train" / "im0.jpg"
    with Image.open(path) as im:
        full = im.convert("RGB")
    for factor, reduced_expected in ((0.5, True), (0.3, True), (0.75, False)):
        img, stored, reduced = read_rgb_scaled(path, factor)
        assert stored == (96, 72) and img.size == scaled_size((96, 72), factor) and reduced is reduced_expected
        ref = np.asarray(full.resize(img.size, Image.BILINEAR), np.int16)
        diff = np.abs(np.asarray(img, np.int16) - ref)
        if reduced:
            assert diff.mean() < 6  # resampling noise, not another picture
        else:
            assert diff.max() == 0  # nothing to gain below a factor of 2: the full decode
    with pytest.raises(ValueError):
        read_rgb_scaled(path, 1.0)
    png = tmp_path / "x.png"
    full.save(png)
    img, _, reduced = read_rgb_scaled(png, 0.5)
    assert not reduced and np.array_equal(np.asarray(img), np.asarray(full.resize((48, 36), Image.BILINEAR)))

    layout = get_layout("folder", jpeg_root)
    pairs = _pairs(jpeg_root)
    on = SegDataset(layout, pairs, TrainTransform((16, 16)), resize=0.5, jpeg_draft=True)
    off = SegDataset(layout, pairs, TrainTransform((16, 16)), resize=0.5)
    same_size = SegDataset(layout, pairs, TrainTransform((16, 16)), resize=1.0, jpeg_draft=True)
    assert on.uses_draft(pairs[0][0]) and not off.uses_draft(pairs[0][0]) and not same_size.uses_draft(pairs[0][0])
    assert not on.uses_draft("images/train/a.png")
    a, b = on.decode(0), off.decode(0)
    assert a.image.shape == b.image.shape == (36, 48, 3)
    assert np.array_equal(a.mask, b.mask) and a.present == b.present  # masks never go through the draft
    assert not np.array_equal(a.image, b.image)
    c, d = same_size.decode(0), SegDataset(layout, pairs, TrainTransform((16, 16))).decode(0)
    assert np.array_equal(c.image, d.image)


# ----------------------------------------------------------------------------- loader switches


def test_defaults_and_cpu_settings() -> None:
    d = DataConfig()
    assert (d.pin_memory, d.persistent_workers, d.prefetch_factor) == (True, True, 2)
    assert (d.cache_decoded, d.cache_ram_fraction, d.jpeg_draft) == ("auto", 0.25, False)
    assert loader_settings(d, torch.device("cpu")) == LoaderSettings(pin=False, persistent=True, prefetch=2)
    assert loader_settings(d, torch.device("cuda")).pin  # pinned only where a CUDA copy follows
    assert not loader_settings(DataConfig(pin_memory=False), torch.device("cuda")).pin
    batch = {"image": torch.ones(2, 3), "name": ["a", "b"]}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["image"], batch["image"]) and moved["name"] == ["a", "b"]


@pytest.mark.parametrize(
    "assignment, field",
    [
        ("data.cache_decoded=1", "data.cache_decoded"),
        ('data.cache_decoded="yes"', "data.cache_decoded"),
        ("data.cache_ram_fraction=0", "data.cache_ram_fraction"),
        ("data.cache_ram_fraction=0.95", "data.cache_ram_fraction"),
        ("data.prefetch_factor=0", "data.prefetch_factor"),
        ('data.pin_memory="sometimes"', "data.pin_memory"),
        ("data.jpeg_draft=2", "data.jpeg_draft"),
    ],
)
def test_bad_values_are_refused_in_one_line(assignment: str, field: str) -> None:
    with pytest.raises(UserError) as e:
        build_config(None, [assignment])
    assert field in str(e.value) and "\n" not in str(e.value)


def test_workers_prefetch_and_a_late_start_keep_the_sample_order(jpeg_root: Path) -> None:
    ref = _batches(_train_ds(jpeg_root, cache=False), 5)
    _same(ref, _batches(_train_ds(jpeg_root, cache=False), 5, workers=2, opts=LoaderSettings(prefetch=1)))
    _same(ref, _batches(_train_ds(jpeg_root, cache="auto"), 5, workers=2, opts=LoaderSettings(prefetch=4)))
    _same(ref[3:], _batches(_train_ds(jpeg_root, cache=False), 2, workers=1, start=3))  # what a resume reads


def test_persistent_evaluation_passes_draw_from_the_rng_as_fresh_loaders_do(demo_root: Path) -> None:
    cfg = DataConfig(dataset="demo", root=str(demo_root))
    ds = build_dataset(cfg, get_layout("demo", demo_root).list_pairs("val"), train=False)

    def passes(opts: LoaderSettings | bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(5)
        loader = eval_loader(ds, 2, 1, opts)
        images = [torch.cat([b["image"] for b in loader]) for _ in range(2)]
        return images, torch.rand(4)  # where the global stream stands after two validations

    fresh_images, fresh_rng = passes(False)
    persistent = eval_loader(ds, 2, 1, LoaderSettings(persistent=True))
    assert isinstance(persistent, PersistentPasses) and persistent.loader.persistent_workers
    kept_images, kept_rng = passes(LoaderSettings(persistent=True))
    assert torch.equal(fresh_rng, kept_rng)
    for a, b in zip(fresh_images + kept_images, fresh_images * 2):
        assert torch.equal(a, b)
    assert not isinstance(eval_loader(ds, 2, 0, LoaderSettings(persistent=True)), PersistentPasses)  # no workers


def test_bench_loader_tiny_runs(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_loader.py"), "--tiny", "--workers", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {(r["scenario"], r["variant"]) for r in data["results"]}
    assert rows == {("voc", "plain"), ("voc", "cache")}  # resize 1: no draft rows
    row = data["results"][0]
    assert row["samples_per_s"] > 0 and "ratio_u2pl_labeled" in row and "ratio_u2pl_all" in row
    assert data["meta"]["scenarios"]["voc"]["gpu"]["step_s"]["u2pl"] > 0


def test_resume_with_workers_persistent_validation_and_the_cache_is_bit_identical(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semiseg_cli.engine.checkpoint import load_checkpoint
    from semiseg_cli.engine.loop import train
    from semiseg_cli.methods.supervised import Supervised
    from tests.method_harness import make_cfg

    def cfg(out: Path):  # type: ignore[no-untyped-def]
        return make_cfg("supervised", root=str(demo_root), out=str(out), overrides=[
            'data.labeled="1/2"', "data.workers=1", "train.val_interval=1", "data.cache_decoded=true"])

    train(cfg(tmp_path / "full"), progress=False)
    original = Supervised.training_step

    def killed_at_3(self, labeled, unlabeled, step):  # type: ignore[no-untyped-def]
        if step == 2:
            raise KeyboardInterrupt  # a kill right after the step-2 checkpoint and validation
        return original(self, labeled, unlabeled, step)

    monkeypatch.setattr(Supervised, "training_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(Supervised, "training_step", original)
    train(cfg(tmp_path / "cut"), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["method_state"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
