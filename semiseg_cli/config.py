"""Run configuration: pydantic v2 models, TOML presets and command-line overrides.

A preset is a TOML file in `presets/` (or any path). It is merged with overrides
(`--set section.key=value` and the shortcut options), then validated once. Unknown keys are an
error naming the key (`extra="forbid"`), and the `method` field picks the method's own section
through a discriminated union. The fully resolved config is written into every run folder and
into every checkpoint, so later commands need nothing but the checkpoint.
"""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from semiseg_cli.errors import UserError

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bounds shared by several fields. Values outside them fail deep inside torch (or silently run
# something else), so they are refused here with the field's name.
MAX_ITERS = 10**9
Pos = Annotated[int, Field(ge=1)]
PosFloat = Annotated[float, Field(gt=0)]
Side = Annotated[int, Field(ge=8, le=16384)]
Scale = Annotated[float, Field(gt=0, le=8)]
Unit = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the images are and how training crops are made."""

    dataset: Literal["voc", "cityscapes", "camvid", "folder", "demo", "yolo", "coco"] = "demo"
    root: str = "demo_data"
    # Class names for layouts that do not carry them in a fixed place (one name per line, or a
    # YOLO `data.yaml` with `names:`); None: the layout's own file (classes.txt, data.yaml ...).
    classes_file: str | None = None
    # Colour masks (folder layout): a palette file mapping RGB colours to classes; None: masks
    # hold class ids (or `palette.txt` in the root, when present, names the colours).
    palette_file: str | None = None
    # Generic presets: fill data.resize, data.crop_size, eval.batch_size and the MobileNetV2's
    # ImageNet weights from the training pool's image sizes at start (engine/auto_defaults.py);
    # the run folder's config.toml holds the values chosen (and auto = false).
    auto: bool = False
    # Pool the labeled/unlabeled split is drawn from, and the split used for validation.
    train_split: str = "train"
    val_split: str = "val"
    # Another pool whose other images join the unlabeled ones (U2PL's VOC classic setting:
    # labeled drawn from `train`, the rest of `train_aug` unlabeled). None: only train_split.
    unlabeled_split: str | None = None
    # Either split files written by `prepare-splits` ...
    labeled_list: str | None = None
    unlabeled_list: str | None = None
    # Validation images as a split file (val.txt from `prepare-splits --val`); None: val_split.
    val_list: str | None = None
    # ... or a fraction/count; the split is then drawn at train time with `split_seed`.
    labeled: str | None = None
    split_seed: int = Field(0, ge=0)
    # Image-level tags file (DuPL); `None` derives tags from the masks.
    tags_file: str | None = None
    # Resize every image by this factor when read (CamVid at half resolution: 0.5).
    resize: float = 1.0
    crop_size: tuple[Side, Side] = (128, 128)
    scale_range: tuple[Scale, Scale] = (0.5, 2.0)
    flip: bool = True
    batch_size: int = Field(8, ge=1, le=4096)
    unlabeled_batch_size: int | None = Field(None, ge=1, le=4096)
    workers: int = Field(2, ge=0, le=256)
    # Loading speed; none of these changes a batch (docs/presets.md, "Data loading"). Pinned
    # batches and non-blocking copies on CUDA devices; workers kept between validation passes and
    # batches in flight per worker, both with workers > 0; decoded training images kept in memory
    # ("auto": when they fit cache_ram_fraction of the free memory); JPEGs decoded at reduced size
    # when data.resize < 1 (changes pixels by resampling noise, hence off by default).
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = Field(2, ge=1, le=64)
    cache_decoded: Union[Literal["auto"], bool] = "auto"
    cache_ram_fraction: float = Field(0.25, gt=0, le=0.9)
    jpeg_draft: bool = False
    ignore_index: int = IGNORE_INDEX
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PosFloat, PosFloat, PosFloat] = IMAGENET_STD

    @field_validator("resize")
    @classmethod
    def _resize_positive(cls, v: float) -> float:
        if not 0 < v <= 4:
            raise ValueError("must be in (0, 4]")
        return v

    @field_validator("cache_decoded", mode="before")
    @classmethod
    def _cache_mode(cls, v: Any) -> Any:
        if not (v == "auto" or isinstance(v, bool)):
            raise ValueError('must be "auto", true or false')
        return v

    @field_validator("scale_range")
    @classmethod
    def _scale_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be two positive numbers, low <= high")
        return v

    @field_validator("crop_size")
    @classmethod
    def _crop_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError("both sides must be at least 8 pixels")
        return v


class ModelConfig(Section):
    """The segmentation network."""

    # "dpt": a ViT encoder (timm, the `timm` extra) under a DPT head, UniMatch V2's network
    # (models/dpt.py); its backbones are the DINOv2 ViTs and "vit_tiny14" (random init, CPU demo).
    arch: Literal["deeplabv3plus", "deeplabv2", "dpt"] = "deeplabv3plus"
    backbone: Literal[
        "resnet18", "resnet50", "resnet101", "mobilenet_v2",
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "vit_tiny14",
    ] = "resnet18"
    output_stride: Literal[8, 16] = 16
    deep_stem: bool = False
    multi_grid: tuple[Pos, Pos, Pos] | None = None
    # "imagenet" (torchvision download, for users), a path to a local state dict, or none.
    # arch "dpt": the backbone's own name ("dinov2_vitb14": DINOv2 through timm, needs a network),
    # a local .pth/.safetensors state dict, or none.
    pretrained: str | None = None
    aspp_dilations: tuple[Pos, ...] | None = Field(None, min_length=1)  # None: (6,12,18) at OS16, (12,24,36) at OS8
    aspp_channels: int = Field(256, ge=1)
    decoder_channels: int = Field(256, ge=1)
    # Layer1 projection width (DeepLab-v3+ paper: 48; U2PL: 256, its heads then take 512 channels)
    # and the ASPP projection's kernel (paper: 1; U2PL: 3). DeepLab-v3+ only.
    low_proj_channels: int = Field(48, ge=1)
    aspp_project_kernel: Literal[1, 3] = 1
    dropout: float = Field(0.1, ge=0, lt=1)
    rep_head: bool = False  # U2PL representation head
    rep_dim: int = Field(256, ge=1)
    aux_head: bool = False  # auxiliary classifier on layer3 (Cityscapes recipe)
    # DeepLab-v2 classifier: the paper sums all four branches; the official code only two.
    v2_branches: Literal[2, 4] = 4
    sync_bn: bool = True  # only has an effect under torchrun
    # Bilinear resizes of the network's maps (decoder, logits to the input size, AdvSemiSeg's
    # discriminator map, evaluation's resize back to the image): PyTorch's default False, or True
    # as the official U2PL, UniMatch and AdvSemiSeg code. Train and evaluate with the same value.
    align_corners: bool = False
    # The backbone's BatchNorm: "none" trains it; "affine" freezes scale/shift (AdvSemiSeg's
    # official DeepLab-v2; statistics still follow the batch); "all" also freezes and uses the
    # running statistics (caffe DeepLab-v2). Meant for pretrained backbones.
    freeze_bn: Literal["none", "affine", "all"] = "none"


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    head_lr_mult: float = Field(10.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[Unit, Unit] = (0.9, 0.999)
    poly_power: float = Field(0.9, ge=0, le=10)  # 0: constant LR; negative would raise it
    warmup_iters: int = Field(0, ge=0, le=MAX_ITERS)
    # How torch computes the step (a speed switch, the same update up to float rounding): "auto"
    # is fused kernels on CUDA where torch has them for the optimizer, foreach otherwise on CUDA,
    # and the plain per-parameter loop on the CPU (torch's own CPU default). May change on --resume.
    impl: Literal["auto", "fused", "foreach", "plain"] = "auto"


class TrainConfig(Section):
    iters: int = Field(1000, ge=1, le=MAX_ITERS)
    grad_accum: int = Field(1, ge=1, le=1024)
    amp: bool = True  # bf16 autocast; only on CUDA
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = Field(0.7, gt=0, le=1)
    ohem_min_kept: int = Field(100000, ge=1)
    aux_weight: float = Field(0.4, ge=0)
    log_interval: int = Field(10, ge=1)
    val_interval: int = Field(500, ge=0)  # 0: validate only at the end
    ckpt_interval: int = Field(500, ge=1)
    deterministic: bool = False
    # TensorBoard event files in RUN/tensorboard/ when the optional tensorboard package is
    # installed (`train --no-tensorboard`: false); without the package nothing is written.
    tensorboard: bool = True
    # Speed switches (engine/perf.py, docs/presets.md): none changes results beyond float
    # rounding, except that compiled networks may draw dropout masks from inductor's own random
    # numbers (the same distribution, other masks); each may change on --resume.
    # channels_last: NHWC memory format for the networks and the input images ("auto": on CUDA). cudnn_benchmark: cuDNN picks its fastest
    # kernels for the fixed training crop ("auto": on CUDA unless `deterministic`; validation,
    # whose images vary in size, runs without it). compile: torch.compile the networks for the
    # training steps (opt-in); where it fails, one warning line and the run goes on eagerly.
    channels_last: Literal["auto", True, False] = "auto"
    cudnn_benchmark: Literal["auto", True, False] = "auto"
    compile: bool = False

    @field_validator("cudnn_benchmark")
    @classmethod
    def _benchmark_is_not_deterministic(cls, v: Any, info: ValidationInfo) -> Any:
        if v is True and info.data.get("deterministic"):
            raise ValueError("true contradicts train.deterministic = true (autotuned kernels are not "
                             "deterministic); set one of them to false, or cudnn_benchmark = \"auto\"")
        return v


class EvalConfig(Section):
    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[Side, Side] | None = None  # slide window; defaults to data.crop_size
    stride: tuple[Pos, Pos] | None = None  # slide stride; defaults to 2/3 of the window
    scales: tuple[Scale, ...] = Field((1.0,), min_length=1)
    flip: bool = False
    batch_size: int = Field(1, ge=1, le=4096)


class RunBase(Section):
    name: str = "run"
    out: str = "runs/run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


class SupervisedConfig(RunBase):
    method: Literal["supervised"] = "supervised"


# Method sections live beside their methods; imported here so the union below is complete.
from semiseg_cli.methods.params import (  # noqa: E402
    AdvSemiSegParams, CAMBaselineParams, DuPLParams, FixMatchParams, U2PLParams, UniMatchParams, UniMatchV2Params,
)


class U2PLConfig(RunBase):
    method: Literal["u2pl"]
    u2pl: U2PLParams = U2PLParams()


class AdvSemiSegConfig(RunBase):
    method: Literal["advsemiseg"]
    advsemiseg: AdvSemiSegParams = AdvSemiSegParams()


class DuPLConfig(RunBase):
    method: Literal["dupl"]
    dupl: DuPLParams = DuPLParams()


class CAMBaselineConfig(RunBase):
    method: Literal["cam_baseline"]
    cam_baseline: CAMBaselineParams = CAMBaselineParams()


class FixMatchConfig(RunBase):
    method: Literal["fixmatch"]
    fixmatch: FixMatchParams = FixMatchParams()


class UniMatchConfig(RunBase):
    method: Literal["unimatch"]
    unimatch: UniMatchParams = UniMatchParams()


class UniMatchV2Config(RunBase):
    method: Literal["unimatch_v2"]
    unimatch_v2: UniMatchV2Params = UniMatchV2Params()


RunConfig = Annotated[
    Union[
        SupervisedConfig, U2PLConfig, AdvSemiSegConfig, DuPLConfig, CAMBaselineConfig, FixMatchConfig, UniMatchConfig,
        UniMatchV2Config,
    ],
    Field(discriminator="method"),
]
METHOD_NAMES = ("supervised", "u2pl", "advsemiseg", "dupl", "cam_baseline", "fixmatch", "unimatch", "unimatch_v2")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunConfig)


# ----------------------------------------------------------------------------- presets


SHARED_TOKENS = ("${SEMISEG_SHARED}", "$SEMISEG_SHARED")


def shared_dir() -> Path:
    """The project's shared data folder: $SEMISEG_SHARED, else `shared/` beside the repository.

    Presets name shared files as `$SEMISEG_SHARED/data/camvid`, so they work from any current
    folder (a path relative to the current folder would not), and a user with the data elsewhere
    sets one variable."""
    env = os.environ.get("SEMISEG_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared"


def expand_shared(value: Any) -> Any:
    """`$SEMISEG_SHARED` (or `${SEMISEG_SHARED}`) replaced by `shared_dir()` in every string of a
    raw config, nested sections included."""
    if isinstance(value, dict):
        return {k: expand_shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_shared(v) for v in value]
    if isinstance(value, str):
        for token in SHARED_TOKENS:
            if token in value:
                value = value.replace(token, str(shared_dir()))
    return value


def presets_dir() -> Path:
    env = os.environ.get("SEMISEG_PRESETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    d = presets_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise UserError(f"preset file {p} does not exist; give a path to a .toml file or a preset name")
        return p
    candidate = presets_dir() / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = list_presets()
    close = [k for k in known if name_or_path in k]
    hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
    raise UserError(f"unknown preset {name_or_path!r}{hint}; list them with `semiseg train --list-presets`")


def load_toml(path: Path) -> dict[str, Any]:
    from semiseg_cli.io import read_text

    text = read_text(path, "preset")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"preset {path} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_preset(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset may start from another one (`base = "name"`), then override a few fields.

    A preset whose `method` differs from its base's keeps the base's data/model/optim/train/eval
    sections but not the base method's own section (as `--method` does): a method's settings
    never carry over to another method, so the preset states the ones it wants."""
    raw = load_toml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = resolve_preset(str(base)) if not str(base).endswith(".toml") else (path.parent / str(base))
    if base_path.resolve() in _seen:
        raise UserError(f"preset {path.name}: base chain loops back to {base_path.name}")
    parent = load_preset(base_path, _seen + (path.resolve(),))
    parent.pop("name", None)
    parent_method = parent.get("method", "supervised")
    if raw.get("method", parent_method) != parent_method:
        parent.pop(parent_method, None)
    return _merge(parent, raw)


def _parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.lower() in ("none", "null"):
            return None
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `section.key=value` (the value parsed as TOML) to a raw config dict in place."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} must look like section.key=value, e.g. --set train.iters=200")
    key, value = assignment.split("=", 1)
    set_value(raw, key, _parse_value(value.strip()))


def set_value(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` to an already typed `value` in a raw config dict, in place.

    Command-line options (`--root`, `--out`, `--iters`, ...) come through here, never through
    TOML text, so a path holding backslashes or quotes stays exactly what the user typed."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {key!r} has an empty key; use section.key=value")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]

    def dotted(parts: tuple[Any, ...]) -> str:  # ("data", "crop_size", 0) -> "data.crop_size[0]"
        out = ""
        for x in parts:
            out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
        return out

    loc = dotted(tuple(first["loc"]))
    # Drop the union tag pydantic inserts (e.g. "u2pl.") at the front of the location.
    tag = first["loc"][0] if first["loc"] else None
    if tag in METHOD_NAMES and len(first["loc"]) > 1:
        loc = dotted(tuple(first["loc"][1:]))
    kind = first["type"]
    section = loc.split(".", 1)[0]
    if kind == "extra_forbidden" and section in METHOD_NAMES and tag in METHOD_NAMES and section != tag:
        msg = (
            f"{loc!r} in {source} belongs to method {section}, but this config's method is {tag}; "
            f"add --method {section} (or --set method={section}), or drop the [{section}] settings"
        )
    elif kind == "extra_forbidden":
        msg = f"unknown key {loc!r} in {source}; check the spelling against docs/presets.md"
    elif kind == "union_tag_invalid":
        msg = f"method must be one of {', '.join(METHOD_NAMES)} in {source}"
    elif kind == "union_tag_not_found":
        msg = f"{source} has no method; add method = \"supervised\" (or {', '.join(METHOD_NAMES[1:])})"
    else:
        got = first.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
        msg = f"invalid value for {loc} in {source}: {first['msg']}{got_s}"
    extra = len(err.errors()) - 1
    return msg + (f" [+{extra} more problem{'s' if extra > 1 else ''}]" if extra > 0 else "")


def validate(raw: dict[str, Any], source: str = "config") -> Any:
    raw = copy.deepcopy(raw)
    raw.setdefault("method", "supervised")
    try:
        cfg = _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None
    return cfg


def build_config(
    preset: str | None,
    overrides: list[str] | None = None,
    method: str | None = None,
    values: dict[str, Any] | None = None,
) -> Any:
    """Load a preset (or the defaults), switch method if asked, apply the `--set` overrides
    (TOML text) and then `values` (typed, from command-line options), validate."""
    if preset:
        path = resolve_preset(preset)
        raw = load_preset(path)
        source = f"preset {path.name}"
        raw.setdefault("name", path.stem)
    else:
        raw, source = {}, "config"
    if method:
        if method not in METHOD_NAMES:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
        if raw.get("method", "supervised") != method:
            # Keep the data/model/optim/train sections, drop the other method's own section.
            for m in METHOD_NAMES:
                raw.pop(m, None)
            raw["method"] = method
    for ov in overrides or []:
        apply_override(raw, ov)
    for key, value in (values or {}).items():
        set_value(raw, key, value)
    return validate(expand_shared(raw), source + (" with overrides" if overrides or values else ""))


def config_to_toml(cfg: Any) -> str:
    """Serialise a validated config as TOML (the resolved config written into run folders)."""
    data = cfg.model_dump(mode="json")
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(type(v))

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            if v is None:
                continue  # TOML has no null: absent means default None
            lines.append(f"{k} = {fmt(v)}")
        for k, v in subs.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(data, "")
    return "\n".join(lines).lstrip() + "\n"


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a config stored in a checkpoint."""
    return validate(data, "checkpoint config")


# What a resumed run may change: where it runs, how long, how often it logs/validates/saves,
# how it is evaluated. Everything else (data, model, optimiser, method) must stay as it was.
RESUME_MAY_CHANGE = (
    "out", "name", "train.iters", "train.device", "train.log_interval", "train.val_interval",
    "train.ckpt_interval", "train.tensorboard", "data.root", "data.workers", "eval.",
    # Loader switches: the same batches (data.jpeg_draft changes pixels, so it is not here).
    "data.pin_memory", "data.persistent_workers", "data.prefetch_factor", "data.cache_decoded", "data.cache_ram_fraction",
    # The speed switches: the same run up to float rounding (a changed device changes more).
    "train.channels_last", "train.cudnn_benchmark", "train.compile", "optim.impl",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two validated configs."""
    fa, fb = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def resume_config(stored: dict[str, Any], overrides: list[str], requested: Any | None, values: dict[str, Any] | None = None) -> Any:
    """The config a resumed run continues with: its own (stored in last.pt) with `overrides`
    applied. `requested` (the preset and options given with --resume, when a preset or method
    was named) must describe the same run. Changing anything outside RESUME_MAY_CHANGE is refused:
    a resumed run would silently no longer be the run that was started."""
    raw = copy.deepcopy(stored)
    for ov in overrides:
        apply_override(raw, ov)
    for key, value in (values or {}).items():
        set_value(raw, key, value)
    cfg = validate(raw, "the run's stored config with overrides")
    original = config_from_dict(stored)
    changed = set(config_differences(original, cfg))
    if requested is not None:
        changed |= set(config_differences(requested, cfg))
    bad = sorted(k for k in changed if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE))
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise UserError(
            f"--resume continues the run with its own config, but {shown} would change; drop those options "
            "(a resumed run may only change train.iters, device, intervals, data.root/workers, eval settings and the speed switches) "
            "or start a new run with --out elsewhere"
        )
    return cfg
