"""The speed switches of a training run (`train.channels_last`, `train.cudnn_benchmark`,
`train.compile`; `optim.impl` is applied where the optimizers are built, methods/base.py).

None of them changes what is computed beyond float rounding, with one possible exception:
compiled networks may draw dropout masks from inductor's own random numbers (element-wise
dropout does; the channel-wise `Dropout2d` of the DeepLab networks drew the eager masks in a
CPU check), so a compiled run may draw other masks from the same distribution; with
`model.dropout = 0` it agrees with the eager run to float rounding. channels_last draws the
same masks: channel-wise masks, of shape (N, C, 1, 1), are laid out alike in both formats.
What each does:
- channels_last: the method's networks (student, teacher, discriminator) and every 4-D image
  tensor of a batch, right after its copy to the device, in NHWC memory format, the layout
  cuDNN's bf16 tensor-core convolutions run natively;
- cudnn_benchmark: cuDNN times its kernels once per input shape and keeps the fastest; the
  training crop is fixed, so that happens once, while validation (images of varying sizes)
  runs without it;
- compile: `nn.Module.compile()` on the student and its copies (EMA teachers), in place, so
  state-dict keys do not change; validation runs them eagerly. A compile that fails (no C
  compiler, an unsupported platform or operator) prints one warning line, and the iteration
  it failed in is run again eagerly from the same batches and RNG state (`CompiledNetworks`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from semiseg_cli.engine import distributed
from semiseg_cli.errors import warn


@dataclass(frozen=True)
class SpeedSettings:
    """The switches as they apply on one device ("auto" resolved)."""

    channels_last: bool
    cudnn_benchmark: bool
    compile: bool

    def describe(self) -> str:
        on = lambda b: "on" if b else "off"  # noqa: E731
        return f"channels_last {on(self.channels_last)}, cudnn.benchmark {on(self.cudnn_benchmark)}, compile {on(self.compile)}"


def resolve_speed(train_cfg: Any, device: torch.device) -> SpeedSettings:
    """`auto` means on for CUDA (cudnn_benchmark: unless `deterministic`), off on the CPU."""
    cuda = device.type == "cuda"
    cl = train_cfg.channels_last
    bench = train_cfg.cudnn_benchmark
    return SpeedSettings(
        channels_last=cuda if cl == "auto" else bool(cl),
        cudnn_benchmark=(cuda and not train_cfg.deterministic) if bench == "auto" else bool(bench),
        compile=bool(train_cfg.compile),
    )


# --------------------------------------------------------------------------- memory format


def networks_to_channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D floating parameter and buffer of `module` in channels_last, in place: the
    Parameter objects stay the same (optimizers built before or after see them), values and
    state-dict keys too. (`Module.to(memory_format=...)` would also try 5-D tensors, which
    channels_last cannot hold, e.g. DuPL's PAR kernels.)"""
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if p.dim() == 4 and p.is_floating_point():
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
            for name, b in m.named_buffers(recurse=False):
                if b.dim() == 4 and b.is_floating_point():
                    setattr(m, name, b.contiguous(memory_format=torch.channels_last))
    return module


def batch_to_channels_last(batch: Any) -> Any:
    """Every 4-D floating tensor of a batch (nested dicts included: the unlabeled batch's
    `partner`) in channels_last; masks, tags and names as they are."""
    if isinstance(batch, dict):
        return {k: batch_to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.is_floating_point():
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


# --------------------------------------------------------------------------- cuDNN autotuning


@contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark = on` inside, the previous value restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------- torch.compile


def compile_targets(method: nn.Module) -> list[nn.Module]:
    """The student network (`method.model`, unwrapped from DDP) and every module of the method
    of the same class (its EMA teachers), outermost only. Discriminators and other helpers stay
    eager: they are small, and AdvSemiSeg's toggles `requires_grad` on it every step, which
    would recompile it each time."""
    student = distributed.unwrap(method.model)  # type: ignore[arg-type]
    named = [(n, m) for n, m in method.named_modules() if type(m) is type(student)]
    outer = [(n, m) for n, m in named if not any(n != o and n.startswith(o + ".") for o, _ in named)]
    return [m for _, m in outer]


# What `nn.Module.compile` is given; tests swap in a backend of their own.
COMPILE_KWARGS: dict[str, Any] = {}


class CompiledNetworks:
    """The compiled networks of one run, and the way back to eager.

    `nn.Module.compile()` keeps the module (and its state-dict keys) and routes its calls
    through `torch.compile`; setting the module's `_compiled_call_impl` back to None (what
    `nn.Module.__call__` checks) runs it eagerly again, for validation (`eager()`) or for good
    (`fall_back()`). torch compiles lazily, at the first call of each new input shape, so a
    failure shows inside a training step: the loop then calls `fall_back(error)` and runs the
    iteration again (loop.py, `_iteration`)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.active = False
        self.first = True  # no iteration has completed compiled yet
        self._calls: list[Any] = []
        try:
            for m in modules:
                m.compile(**COMPILE_KWARGS)
            self._calls = [m._compiled_call_impl for m in modules]
            self.active = True
        except Exception as e:  # noqa: BLE001 - torch.compile itself refused (an old Python, ...)
            self.fall_back(e)

    def fall_back(self, error: BaseException) -> None:
        """One warning line naming the root cause; every network eager from now on."""
        cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps it
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first = (str(cause).strip().splitlines() or [""])[0][:240]
        warn(f"train.compile: torch.compile failed ({type(cause).__name__}: {first}); training goes on without it")
        self.release()

    def release(self) -> None:
        """Eager for good (the end of the run, or a failure)."""
        for m in self.modules:
            m._compiled_call_impl = None
        self.active = False
        self._calls = []

    @contextmanager
    def eager(self) -> Iterator[None]:
        """The networks eager inside (validation: images of many sizes would each compile)."""
        if not self.active:
            yield
            return
        for m in self.modules:
            m._compiled_call_impl = None
        try:
            yield
        finally:
            if self.active:
                for m, c in zip(self.modules, self._calls):
                    m._compiled_call_impl = c


# --------------------------------------------------------------------------- resume


def adopt_optimizer_impl(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state with this run's `foreach`/`fused` flags in its param groups.

    `Optimizer.load_state_dict` takes every group setting from the saved state, these flags
    too, so without this a resumed run would keep the implementation it was saved with (a run
    saved on the CPU would step plain on a GPU), whatever `optim.impl` says now."""
    groups = []
    for g_saved, g_now in zip(saved["param_groups"], optimizer.param_groups):
        g = dict(g_saved)
        for key in ("foreach", "fused"):
            if key in g_now:
                g[key] = g_now[key]
        groups.append(g)
    return {**saved, "param_groups": groups}


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state tensors (momentum, moments) in the memory format of their parameter: a
    state saved from a contiguous run and resumed in channels_last (or back) is re-laid out,
    so fused and foreach kernels see matching strides."""
    for p, state in optimizer.state.items():
        for k, v in list(state.items()):
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
