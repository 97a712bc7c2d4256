"""`semiseg export --onnx`: a self-contained file with metadata whose logits match PyTorch at
sizes other than the export example, the overwrite rule, fp16, and the failure paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semiseg_cli.cli import app

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

runner = CliRunner()


def invoke(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def _calibrate(path: Path, out: Path, root: Path) -> None:
    """Settled BatchNorm statistics (see tests/test_pseudo_label.py): logits in a realistic range
    instead of ~1e7, which overflows float16."""
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
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "semiseg_version")})


@pytest.fixture(scope="module")
def ckpts(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"raw": 2 iterations from scratch, "calibrated": the same with settled BN, "saturated": calibrated
    with its class scores scaled by 1e6}."""
    from semiseg_cli.config import build_config
    from semiseg_cli.engine.loop import train

    out = tmp_path_factory.mktemp("export_run")
    cfg = build_config(None, [
        f'data.root="{demo_root}"', 'data.dataset="demo"', "data.crop_size=[64,64]", "data.batch_size=2",
        "data.workers=0", "train.iters=2", "train.val_interval=0", 'model.backbone="resnet18"', f'out="{out}"',
    ], "supervised")
    train(cfg, progress=False)
    _calibrate(out / "best.pt", out / "calibrated.pt", demo_root)
    _saturate(out / "calibrated.pt", out / "saturated.pt")
    return {"raw": out / "best.pt", "calibrated": out / "calibrated.pt", "saturated": out / "saturated.pt"}


def _saturate(path: Path, out: Path) -> None:
    """The calibrated checkpoint with its class-score conv scaled by 1e6: logits far beyond
    float16's range (65504), whatever the short training run left them at."""
    from semiseg_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    state = ckpt["inference_state"]
    last = [k for k in state if k.startswith("classifier.") and k.endswith(".weight")][-1]
    state[last] = state[last] * 1e6
    state[last.replace(".weight", ".bias")] = state[last.replace(".weight", ".bias")] * 1e6
    save_checkpoint(out, {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "semiseg_version")})


def _torch_logits(ckpt: Path, x: torch.Tensor) -> np.ndarray:
    from semiseg_cli.engine.checkpoint import load_for_inference

    model, _, _ = load_for_inference(ckpt)
    with torch.no_grad():
        return model(x)["logits"].numpy()


def test_export_is_dynamic_self_contained_and_documented(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    code, output = invoke("export", "-c", ckpts["calibrated"], "--onnx", path)
    assert code == 0, output
    assert "argmax agreement" in output and "70x90" in " ".join(output.split())  # the check ran and printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one file, no external data, no temp
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 18
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["class_names"]) == ["background", "disc", "box", "triangle", "stripes"]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and len(json.loads(meta["std"])) == 3
    assert meta["input_layout"].startswith("NCHW float32 RGB normalised")
    assert meta["method"] == "supervised" and meta["semiseg_version"] and "preset" in meta
    assert meta["weights"] == "student" and meta["precision"] == "fp32"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 45, 77), (1, 3, 128, 64)):  # neither the example nor the built-in check
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        ref = _torch_logits(ckpts["calibrated"], x)
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999

    # An existing file is never replaced silently.
    before = path.stat().st_mtime_ns
    code, output = invoke("export", "-c", ckpts["calibrated"], "--onnx", path, "--exporter", "legacy")
    assert code != 0 and "--overwrite" in error_line(output)
    assert path.stat().st_mtime_ns == before


def test_fp16_legacy_exporter_halves_the_file_and_still_agrees(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "half.onnx"
    path.write_text("an older export")
    code, output = invoke("export", "-c", ckpts["calibrated"], "--onnx", path, "--fp16", "--exporter", "legacy", "--overwrite")
    assert code == 0, output
    assert "argmax agreement" in output
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["precision"] == "fp16" and meta["exporter"] == "legacy"
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    n_params = sum(p.numel() for p in torch.load(ckpts["calibrated"], weights_only=False)["inference_state"].values())
    assert path.stat().st_size < 2.5 * n_params  # ~2 bytes per weight, not 4


def test_a_failed_check_exits_4_and_writes_nothing(ckpts: dict[str, Path], tmp_path: Path) -> None:
    # Logits ~1e6 times the calibrated ones overflow float16 to inf; the check must catch it.
    x = torch.randn(1, 3, 40, 48)
    assert np.abs(_torch_logits(ckpts["saturated"], x)).max() > 65504  # the premise: float16 overflows
    path = tmp_path / "bad.onnx"
    code, output = invoke("export", "-c", ckpts["saturated"], "--onnx", path, "--fp16", "--exporter", "legacy")
    assert code == 4
    assert "non-finite" in error_line(output) and "drop --fp16" in error_line(output)
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_and_missing_extra_are_one_line(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = invoke("export", "-c", tmp_path / "nope.pt", "--onnx", tmp_path / "m.onnx")
    assert code != 0 and "does not exist" in error_line(output)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code, output = invoke("export", "-c", ckpts["calibrated"], "--onnx", tmp_path / "m.onnx")
    assert code != 0
    assert "onnxruntime" in error_line(output) and "export extra" in error_line(output)
    assert not (tmp_path / "m.onnx").exists()
