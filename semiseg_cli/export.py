"""`semiseg export --onnx`: one self-contained ONNX file of the inference network, checked.

The exported graph takes `image` (N,3,H,W float32, RGB, normalised with the training mean/std)
with dynamic N, H and W and returns `logits` (N,C,H,W float32) at the input size; the EMA
teacher's weights are exported when the checkpoint has one. Class names, mean/std, the input
layout, preset, method and versions go into the model's `metadata_props`, so the file is all a
deployment needs.

After export the file is run with onnxruntime on random inputs whose shapes differ from the
export example (batch 1 and 3, sides that are not multiples of 16), and compared with PyTorch:
max |logit difference| and argmax agreement are printed, and an agreement below the goal
(99.9% of pixels in fp32, 99% with --fp16) fails with exit code 4 and leaves no file behind.

What can go wrong:
- An exporter that bakes the example size into the graph (a traced `x.shape` turned into a
  constant) runs at that size and fails or silently mis-sizes at any other: the check runs two
  other sizes for that reason.
- Both torch exporters work on these networks with torch 2.14 (measured: identical logits to
  ~1e-5 relative at 70x90 and 33x47). The default is the torch.export-based exporter
  (`dynamo=True`), torch's supported path since 2.9; `--exporter legacy` (TorchScript tracing,
  deprecated) is kept because it is 2-10x faster to export and a fallback if the new one fails.
- fp16 halves the file, but activations above 65504 overflow to inf (a network whose BatchNorm
  statistics never settled, e.g. after a few iterations from scratch, does): the check catches it.
"""

import contextlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from semiseg_cli import __version__
from semiseg_cli.errors import UserError
from semiseg_cli.io import check_output_file

DEFAULT_OPSET = 18
EXAMPLE_SHAPE = (2, 3, 64, 96)  # export example: batch 2 (a batch of 1 invites specialisation), H != W
CHECK_SHAPES = ((1, 3, 70, 90), (3, 3, 61, 97))  # both differ from the example in every dynamic axis
GOAL_FP32 = 0.999
GOAL_FP16 = 0.99
INPUT_LAYOUT = "NCHW float32 RGB normalised: (pixel / 255 - mean) / std"
EXPORTERS = ("dynamo", "legacy")


class ExportCheckFailed(UserError):
    """The exported file does not reproduce PyTorch's predictions closely enough."""

    exit_code = 4


def _wrapper_class() -> Any:
    from torch import nn

    class LogitsOnly(nn.Module):
        """The network with one output: `logits`. With `half`, weights are float16 inside, but
        input and output stay float32 so the file is a drop-in replacement."""

        def __init__(self, model: nn.Module, half: bool = False) -> None:
            super().__init__()
            self.model = model
            self.half_inside = half

        def forward(self, x: Any) -> Any:
            if self.half_inside:
                return self.model(x.half())["logits"].float()
            return self.model(x)["logits"]

    return LogitsOnly


def require_onnx(exporter: str) -> None:
    """One-line error naming the extra when an ONNX package is missing."""
    import importlib

    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if exporter == "dynamo" else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}, from the export extra: pip install 'semiseg[export]'")


@dataclass
class ShapeCheck:
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_logit: float
    agreement: float
    finite: bool

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-12)


@dataclass
class ExportReport:
    path: Path
    opset: int
    exporter: str
    precision: str
    size_bytes: int
    seconds: float
    goal: float
    checks: list[ShapeCheck] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.finite and c.agreement >= self.goal for c in self.checks)


def _export_graph(module: Any, example: Any, path: Path, exporter: str, opset: int) -> None:
    """Run one torch exporter into `path` with dynamic batch, height and width."""
    import torch

    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = torch.export.Dim.DYNAMIC
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_shapes={"x": {0: dyn, 2: dyn, 3: dyn}}, external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
            )


def _name_dims(model: Any) -> None:
    """Call the dynamic axes batch/height/width everywhere (the dynamo exporter says s0, s1, ...)."""
    names = {0: "batch", 2: "height", 3: "width"}
    rename: dict[str, str] = {}
    for axis, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if axis in names and dim.dim_param:
            rename[dim.dim_param] = names[axis]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _metadata(cfg: Any, ckpt: dict[str, Any], weights: str, precision: str, exporter: str, opset: int) -> dict[str, str]:
    return {
        "class_names": json.dumps(list(ckpt["class_names"])),
        "num_classes": str(ckpt["num_classes"]),
        "mean": json.dumps(list(cfg.data.mean)),
        "std": json.dumps(list(cfg.data.std)),
        "input_layout": INPUT_LAYOUT,
        "output": "logits NCHW float32 at the input size; argmax over C = class id",
        "preset": cfg.name,
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "architecture": f"{cfg.model.arch} {cfg.model.backbone}" + ("" if cfg.model.arch == "dpt" else f" os{cfg.model.output_stride}"),
        "weights": weights,
        "step": str(ckpt.get("step")),
        "precision": precision,
        "exporter": exporter,
        "opset": str(opset),
        "semiseg_version": __version__,
    }


def check_with_onnxruntime(path: Path, reference: Any, shapes: Sequence[tuple[int, ...]] = CHECK_SHAPES, seed: int = 0) -> list[ShapeCheck]:
    """Logits of the file (onnxruntime, CPU) against `reference` (a torch module) on random inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    checks = []
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = reference(x).float().numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportCheckFailed(f"the exported model returns shape {got.shape} for input {shape}, PyTorch {ref.shape}; the graph is not dynamic in H/W, try --exporter legacy")
        finite = bool(np.isfinite(got).all())
        diff = float(np.abs(got - ref).max()) if finite else math.inf
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        checks.append(ShapeCheck(tuple(shape), diff, float(np.abs(ref).max()), agree, finite))
    return checks


def run_export(
    checkpoint: Path,
    onnx_path: Path,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    exporter: str = "dynamo",
    weights: str = "auto",
    min_agreement: float | None = None,
    overwrite: bool = False,
    console: Any = None,
) -> ExportReport:
    if weights not in ("auto", "teacher", "student"):
        raise UserError(f"--weights must be auto, teacher or student (got {weights!r})")
    if exporter not in EXPORTERS:
        raise UserError(f"--exporter must be dynamo or legacy (got {exporter!r})")
    if not 7 <= opset <= 23:
        raise UserError(f"--opset {opset} is outside what the torch exporters write; use 17 or 18")
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise UserError(f"--onnx {onnx_path} is a folder; give a file name like model.onnx")
    check_output_file(onnx_path, overwrite, "--onnx")
    goal = min_agreement if min_agreement is not None else (GOAL_FP16 if fp16 else GOAL_FP32)
    if not 0 <= goal <= 1:
        raise UserError(f"--min-agreement must be in [0, 1] (got {goal})")
    require_onnx(exporter)

    import copy

    import onnx
    import torch

    from semiseg_cli.engine.checkpoint import load_for_inference
    from semiseg_cli.io import atomic_path, clean_stale_temps

    model, cfg, ckpt = load_for_inference(checkpoint, "cpu", weights)
    used = "teacher" if (weights != "student" and ckpt.get("has_teacher")) else "student"
    LogitsOnly = _wrapper_class()
    reference = LogitsOnly(model).eval()
    module = LogitsOnly(copy.deepcopy(model).half(), half=True).eval() if fp16 else reference
    precision = "fp16" if fp16 else "fp32"
    example = torch.randn(*EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))

    t0 = time.perf_counter()
    clean_stale_temps(onnx_path.parent)  # an export killed earlier
    with atomic_path(onnx_path) as tmp:
        try:
            _export_graph(module, example, tmp, exporter, opset)
        except Exception as e:  # exporter internals raise many types; the user's move is the same
            first = (str(e).strip().splitlines() or [""])[0][:200]
            other = "legacy" if exporter == "dynamo" else "dynamo"
            raise UserError(f"the {exporter} ONNX exporter failed ({type(e).__name__}: {first}); try --exporter {other}") from None
        proto = onnx.load(str(tmp), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise UserError("the exporter wrote the weights to a separate data file; this model is too large for one self-contained ONNX file (2 GB)")
        _name_dims(proto)
        meta = _metadata(cfg, ckpt, used, precision, exporter, opset)
        onnx.helper.set_model_props(proto, meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        seconds = time.perf_counter() - t0
        checks = check_with_onnxruntime(tmp, reference)
        report = ExportReport(onnx_path, opset, exporter, precision, tmp.stat().st_size, seconds, goal, checks, meta)
        if console is not None:
            print_report(report, console)
        if not report.ok:
            worst = min(checks, key=lambda c: (c.finite, c.agreement))
            why = "non-finite logits (float16 overflow?)" if not worst.finite else f"argmax agreement {100 * worst.agreement:.3f}% < {100 * goal:.3f}%"
            hint = "drop --fp16" if fp16 else "try --exporter " + ("legacy" if exporter == "dynamo" else "dynamo")
            raise ExportCheckFailed(f"onnxruntime check failed at input {worst.shape}: {why}; no file written; {hint}")
    return report


def print_report(report: ExportReport, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"onnxruntime vs PyTorch ({report.precision}, {report.exporter} exporter, opset {report.opset})")
    for col in ("input", "max |diff|", "max |logit|", "relative", "argmax agreement %"):
        table.add_column(col, justify="right")
    for c in report.checks:
        table.add_row("x".join(map(str, c.shape)), f"{c.max_abs_diff:.3g}", f"{c.max_abs_logit:.3g}",
                      f"{c.relative:.2e}", f"{100 * c.agreement:.3f}")
    table.caption = f"goal: agreement >= {100 * report.goal:.1f}% of pixels on every input"
    console.print(table)
