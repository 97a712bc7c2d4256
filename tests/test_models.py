"""Networks: one base test class that every architecture/backbone combination subclasses, then
pretrained loading, the discriminator and DeepLab-v2's branch count. All on CPU at 64x64."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from semiseg_cli.config import ModelConfig
from semiseg_cli.errors import UserError
from semiseg_cli.models import DeepLabV2, DeepLabV3Plus, FCDiscriminator, SegModel, build_model
from semiseg_cli.models.backbones import build_backbone

NUM_CLASSES = 3
SHARED_MOBILENET = "weights/mobilenet_v2_imagenet_features.pth"  # in the shared folder (conftest `shared`)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tiny convolutions run faster on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _stride_size(n: int, stride: int) -> int:
    return math.ceil(n / stride)


class BaseModelTest:
    """Subclass with a `cfg` dict of ModelConfig fields; everything else is shared."""

    cfg: ClassVar[dict[str, Any]] = {}
    export: ClassVar[bool] = False  # ONNX round-trip (only on a few small models, for time)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls) -> SegModel:
        torch.manual_seed(0)
        return build_model(ModelConfig(**cls.cfg), NUM_CLASSES)

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig(**self.cfg)

    def _expected_keys(self) -> set[str]:
        keys = {"logits", "feat"}
        if self.model_cfg.rep_head:
            keys.add("rep")
        if self.model_cfg.aux_head:
            keys.add("aux")
        return keys

    def _check_shapes(self, model: SegModel, out: dict[str, torch.Tensor], b: int, h: int, w: int) -> None:
        cfg = self.model_cfg
        assert set(out) == self._expected_keys()
        assert out["logits"].shape == (b, NUM_CLASSES, h, w)
        os_ = 8 if cfg.arch == "deeplabv2" else cfg.output_stride
        assert out["feat"].shape == (b, model.backbone.out_channels, _stride_size(h, os_), _stride_size(w, os_))
        if "rep" in out:
            assert out["rep"].shape == (b, cfg.rep_dim, _stride_size(h, 4), _stride_size(w, 4))
        if "aux" in out:
            assert out["aux"].shape == (b, NUM_CLASSES, h, w)

    def test_forward_shapes(self, model: SegModel) -> None:
        model.train()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 64, 64))
        self._check_shapes(model, out, 2, 64, 64)
        assert all(torch.isfinite(v).all() for v in out.values())

    def test_backbone_levels(self, model: SegModel) -> None:
        bb = model.backbone
        with torch.no_grad():
            f = bb(torch.randn(2, 3, 64, 64))
        assert f["low"].shape[1:] == (bb.low_channels, 16, 16)
        assert f["mid"].shape[1] == bb.mid_channels
        assert f["out"].shape[1] == bb.out_channels

    def test_backward_reaches_every_parameter(self, model: SegModel) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(2, 3, 64, 64))
        sum(v.float().mean() for k, v in out.items() if k != "feat").backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
        model.zero_grad(set_to_none=True)

    def test_odd_input_size(self, model: SegModel) -> None:
        model.train()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 65, 90))
        self._check_shapes(model, out, 2, 65, 90)

    def test_eval_batch_one_and_predict(self, model: SegModel) -> None:
        model.train()
        x = torch.randn(1, 3, 64, 64)
        pred = model.predict(x)
        assert model.training  # predict restores the mode
        assert pred.shape == (1, 64, 64) and pred.dtype == torch.long
        model.eval()
        with torch.no_grad():
            out = model(x)
        self._check_shapes(model, out, 1, 64, 64)
        assert torch.equal(out["logits"].argmax(1), pred)
        model.train()

    def test_initial_loss_is_near_uniform(self, model: SegModel) -> None:
        """A fresh DeepLab-v3+ must start near uniform scores (CE about ln C). A Kaiming fan_out
        init on the final 1x1 classifier gave logits of std ~2 and a first loss of ~5 on CamVid;
        the large gradients then wrecked the pretrained backbone (baseline 23 mIoU)."""
        if self.model_cfg.arch != "deeplabv3plus":
            pytest.skip("DeepLab-v2 sums raw dilated convs of the backbone (official init)")
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 64, 64))
        target = torch.randint(0, NUM_CLASSES, (2, 64, 64))
        for key in ("logits", "aux"):
            if key in out:
                assert out[key].std() < 0.3, (key, float(out[key].std()))
                ce = float(nn.functional.cross_entropy(out[key], target))
                assert abs(ce - math.log(NUM_CLASSES)) < 0.1, (key, ce)

    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_onnx_export(self, model: SegModel) -> None:
        if not self.export:
            pytest.skip("export checked on a few small models only")
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")

        class Logits(nn.Module):
            def __init__(self, m: SegModel) -> None:
                super().__init__()
                self.m = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.m(x)["logits"]

        wrapped = Logits(model).eval()
        buf = io.BytesIO()
        torch.onnx.export(
            wrapped,
            (torch.randn(1, 3, 64, 64),),
            buf,
            dynamo=False,
            input_names=["image"],
            dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}},
        )
        x = torch.randn(1, 3, 65, 90)
        got = ort.InferenceSession(buf.getvalue()).run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = wrapped(x).numpy()
        assert got.shape == want.shape and abs(got - want).max() < 1e-3
        model.train()


class TestV3PlusResNet18OS16(BaseModelTest):
    cfg = {"backbone": "resnet18", "output_stride": 16, "rep_head": True, "aux_head": True, "rep_dim": 32}
    export = True


class TestV3PlusResNet18OS8(BaseModelTest):
    cfg = {"backbone": "resnet18", "output_stride": 8, "aspp_channels": 64, "decoder_channels": 64}


class TestV3PlusResNet50U2PL(BaseModelTest):
    """U2PL's network layout on ResNet-50 (ResNet-101 is only shape-tested, for time)."""

    cfg = {
        "backbone": "resnet50",
        "output_stride": 8,
        "deep_stem": True,
        "multi_grid": (2, 2, 4),
        "rep_head": True,
        "aux_head": True,
    }


class TestV3PlusMobileNetV2OS8(BaseModelTest):
    cfg = {"backbone": "mobilenet_v2", "output_stride": 8, "aux_head": True}
    export = True


class TestV3PlusMobileNetV2OS16(BaseModelTest):
    cfg = {"backbone": "mobilenet_v2", "output_stride": 16, "rep_head": True}


class TestV2ResNet18(BaseModelTest):
    cfg = {"arch": "deeplabv2", "backbone": "resnet18", "aux_head": True}
    export = True


class TestV2ResNet18TwoBranches(BaseModelTest):
    cfg = {"arch": "deeplabv2", "backbone": "resnet18", "v2_branches": 2}


class TestV2ResNet18FrozenBNAlignCorners(BaseModelTest):
    """AdvSemiSeg-style options: the shared checks still hold (every trainable parameter gets a
    gradient; the frozen BN ones are not trainable)."""

    cfg = {"arch": "deeplabv2", "backbone": "resnet18", "aux_head": True, "freeze_bn": "all", "align_corners": True}


# ----------------------------------------------------------------------------- structure


def test_resnet101_shapes_at_tiny_input() -> None:
    m = build_model(ModelConfig(backbone="resnet101", output_stride=16), NUM_CLASSES).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 33, 40))
    assert out["logits"].shape == (1, NUM_CLASSES, 33, 40)
    assert out["feat"].shape == (1, 2048, 3, 3)


def test_aspp_default_dilations_follow_output_stride() -> None:
    def rates(os_: int) -> list[int]:
        m = build_model(ModelConfig(backbone="mobilenet_v2", output_stride=os_), NUM_CLASSES)
        assert isinstance(m, DeepLabV3Plus)
        return [b[0].dilation[0] for b in m.aspp.branches[1:]]

    assert rates(16) == [6, 12, 18]
    assert rates(8) == [12, 24, 36]
    m = build_model(ModelConfig(backbone="mobilenet_v2", aspp_dilations=(2, 4)), NUM_CLASSES)
    assert [b[0].dilation[0] for b in m.aspp.branches[1:]] == [2, 4]


def test_multi_grid_multiplies_layer4_rates_as_u2pl() -> None:
    bb = build_backbone("resnet50", 8, multi_grid=(2, 2, 4))
    assert [blk.conv2.dilation[0] for blk in bb.layer4] == [4, 8, 16]
    assert all(blk.conv2.padding == blk.conv2.dilation for blk in bb.layer4)


def test_resnet18_dilation_keeps_torchvision_names_and_shapes() -> None:
    bb = build_backbone("resnet18", 8)
    ref = {k: v.shape for k, v in tvm.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in bb.state_dict().items()} == ref
    assert [blk.conv1.stride for blk in bb.layer3] == [(1, 1), (1, 1)]
    assert bb.layer4[1].conv2.dilation == (4, 4)


def test_deep_stem_layout() -> None:
    bb = build_backbone("resnet18", 16, deep_stem=True)
    convs = [m for m in bb.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (3, 3)),
        (64, 64, (3, 3)),
        (64, 128, (3, 3)),
    ]
    assert bb.layer1[0].conv1.in_channels == 128


def test_config_errors_are_user_errors() -> None:
    with pytest.raises(UserError, match="rep_head"):
        build_model(ModelConfig(arch="deeplabv2", rep_head=True), NUM_CLASSES)
    with pytest.raises(UserError, match="multi_grid"):
        build_model(ModelConfig(backbone="resnet18", multi_grid=(1, 2, 4)), NUM_CLASSES)
    with pytest.raises(UserError, match="deep_stem"):
        build_model(ModelConfig(backbone="mobilenet_v2", deep_stem=True), NUM_CLASSES)
    with pytest.raises(UserError, match="v2_branches"):
        build_model(ModelConfig(arch="deeplabv2", aspp_dilations=(6,)), NUM_CLASSES)


def test_deep_stem_with_imagenet_is_refused_before_any_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*a: Any, **k: Any) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr("semiseg_cli.models.backbones._imagenet_state", no_download)
    with pytest.raises(UserError, match="deep stem"):
        build_model(ModelConfig(backbone="resnet50", deep_stem=True, pretrained="imagenet"), NUM_CLASSES)


# ----------------------------------------------------------------------------- pretrained


@pytest.fixture(scope="module")
def resnet18_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return tvm.resnet18(weights=None).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 3},
    ],
    ids=["plain", "state_dict-module-backbone", "model-backbone"],
)
def test_local_state_dict_loads(tmp_path: Path, resnet18_weights: dict[str, torch.Tensor], wrap: Any) -> None:
    path = tmp_path / "r18.pth"
    torch.save(wrap(resnet18_weights), path)
    bb = build_backbone("resnet18", 8, pretrained=str(path))
    n = len(bb.state_dict())
    assert bb.pretrained_report == (n, n)  # everything but fc.* matched
    assert torch.equal(bb.layer4[1].conv2.weight, resnet18_weights["layer4.1.conv2.weight"])


def test_whole_model_checkpoint_feeds_backbone(tmp_path: Path) -> None:
    src = build_model(ModelConfig(backbone="mobilenet_v2"), NUM_CLASSES)
    path = tmp_path / "seg.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = build_model(ModelConfig(backbone="mobilenet_v2", pretrained=str(path)), NUM_CLASSES)
    assert torch.equal(dst.backbone.features[5].conv[0][0].weight, src.backbone.features[5].conv[0][0].weight)


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth does not exist"):
        build_model(ModelConfig(pretrained=str(missing)), NUM_CLASSES)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        build_backbone("resnet18", pretrained=str(bad))


def test_unrelated_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=r"other\.pth match only 0 of"):
        build_backbone("resnet18", pretrained=str(path))


@pytest.mark.realdata
@pytest.mark.parametrize("os_", [8, 16])
def test_shared_mobilenet_weights_load_fully(os_: int, shared: Any) -> None:
    weights = shared.require(SHARED_MOBILENET)
    bb = build_backbone("mobilenet_v2", os_, pretrained=str(weights))
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    assert bb.pretrained_report == (len(sd), len(bb.state_dict()))
    assert all(torch.equal(v, sd[k]) for k, v in bb.state_dict().items())


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_architecture() -> None:
    d = FCDiscriminator(NUM_CLASSES, ndf=8)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 32), (32, 64), (64, 1)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    acts = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in d.modules())
    # The last conv is the output: no activation after it.
    assert isinstance(list(d.net)[-1], nn.Conv2d)


@pytest.mark.parametrize("size", [(64, 64), (65, 90)])
def test_discriminator_output_shape(size: tuple[int, int]) -> None:
    d = FCDiscriminator(NUM_CLASSES)
    prob = torch.softmax(torch.randn(2, NUM_CLASSES, *size), dim=1)
    out = d(prob)
    assert out.shape == (2, 1, *size)
    out.mean().backward()
    assert all(p.grad is not None for p in d.parameters())


# ----------------------------------------------------------------------------- DeepLab-v2


def test_deeplabv2_two_branches_is_a_prefix_of_four() -> None:
    torch.manual_seed(0)
    four = build_model(ModelConfig(arch="deeplabv2", backbone="resnet18", v2_branches=4), NUM_CLASSES).eval()
    two = build_model(ModelConfig(arch="deeplabv2", backbone="resnet18", v2_branches=2), NUM_CLASSES).eval()
    assert isinstance(four, DeepLabV2) and isinstance(two, DeepLabV2)
    assert [c.dilation[0] for c in four.classifier] == [6, 12, 18, 24]
    assert [c.dilation[0] for c in two.classifier] == [6, 12]
    result = two.load_state_dict(four.state_dict(), strict=False)
    assert not result.missing_keys
    assert sorted(result.unexpected_keys) == [f"classifier.{i}.{p}" for i in (2, 3) for p in ("bias", "weight")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        o4, o2 = four(x), two(x)
        extra = four.classifier[2](o4["feat"]) + four.classifier[3](o4["feat"])
        extra = nn.functional.interpolate(extra, size=(64, 64), mode="bilinear", align_corners=False)
    assert not torch.allclose(o4["logits"], o2["logits"])
    assert torch.allclose(o4["logits"], o2["logits"] + extra, atol=1e-5)


def test_the_representation_head_does_not_change_the_init_of_the_rest() -> None:
    """Same seed, with and without U2PL's representation head: every shared weight is equal, so a
    U2PL run and its supervised baseline start from the same network."""
    from semiseg_cli.config import ModelConfig
    from semiseg_cli.models import build_model

    states = []
    for rep in (False, True):
        torch.manual_seed(0)
        states.append(build_model(ModelConfig(backbone="resnet18", aspp_channels=32, decoder_channels=32, rep_head=rep, aux_head=True), 5).state_dict())
    plain, with_rep = states
    assert any(k.startswith("rep.") for k in with_rep) and not any(k.startswith("rep.") for k in plain)
    for k, v in plain.items():
        assert torch.equal(v, with_rep[k]), k


# ----------------------------------------------------------------------------- initialisation


# sha256 of the state dict (names and bytes, in order) of models built with torch.manual_seed(0)
# and 5 classes, recorded before the deep stem and the DeepLab heads shared one initialiser
# (`init_conv_bn`). RNG streams may change between torch releases, so other versions skip.
_INIT_VERSIONS = ("2.14.1", "0.29.1")
_INIT_HASHES = {
    "v3p_r18_os16_rep_aux": (
        dict(backbone="resnet18", output_stride=16, rep_head=True, aux_head=True, aspp_channels=32, decoder_channels=32, rep_dim=16),
        "8a522d241f0234fdb2e2093a14c37e2a753a9c578f9e3b02a5495b3a7ac60b68",
    ),
    "v3p_r18_os8_deepstem": (
        dict(backbone="resnet18", output_stride=8, deep_stem=True, aspp_channels=32, decoder_channels=32),
        "5eac22fb75e15135f6879e2bc90a81a714b2ee7c5fd8deb97b11f511420470b3",
    ),
    "v3p_mbv2_os16_rep": (
        dict(backbone="mobilenet_v2", output_stride=16, rep_head=True, aux_head=True, aspp_channels=32, decoder_channels=32, rep_dim=16),
        "1d307371705d4ff77c268ab8f94097ebf918a29ad56116997720b05693e8040e",
    ),
    "v3p_mbv2_os8_u2pl": (
        dict(backbone="mobilenet_v2", output_stride=8, low_proj_channels=64, aspp_project_kernel=3, aspp_channels=32, decoder_channels=32),
        "22abe0fa15a8db40e337c09789e50b95f411987742543f88d65aabc49150729f",
    ),
    "v2_r18_aux": (dict(arch="deeplabv2", backbone="resnet18", aux_head=True), "58ce3b7ff694afce65212e8fb7c4a7b03922b8a9fac0cdad3356b3d15b1e5b36"),
    "v2_r18_2br": (dict(arch="deeplabv2", backbone="resnet18", v2_branches=2), "75662768d6e1ca55159c4ceda7572b41855f746c732593d430ecb0bfdff4803f"),
}


def _state_hash(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(_INIT_HASHES))
def test_same_seed_gives_the_recorded_initial_weights(case: str) -> None:
    import torchvision

    versions = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
    if versions != _INIT_VERSIONS:
        pytest.skip(f"hashes recorded with torch/torchvision {_INIT_VERSIONS}, running {versions}")
    kw, expected = _INIT_HASHES[case]
    torch.manual_seed(0)
    assert _state_hash(build_model(ModelConfig(**kw), 5)) == expected
    # Freezing BN and align_corners change no weight.
    torch.manual_seed(0)
    assert _state_hash(build_model(ModelConfig(**kw, freeze_bn="all", align_corners=True), 5)) == expected


# ----------------------------------------------------------------------------- align_corners


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv2"])
def test_align_corners_reaches_the_logits_resize(arch: str) -> None:
    kw: dict[str, Any] = dict(arch=arch, backbone="resnet18", aux_head=True, aspp_channels=32, decoder_channels=32)
    torch.manual_seed(0)
    off = build_model(ModelConfig(**kw), NUM_CLASSES).eval()
    on = build_model(ModelConfig(**kw, align_corners=True), NUM_CLASSES).eval()
    on.load_state_dict(off.state_dict())
    assert on.align_corners and not off.align_corners
    x = torch.randn(1, 3, 65, 90)
    with torch.no_grad():
        a, b = off(x), on(x)
    for key in ("logits", "aux"):
        assert a[key].shape == b[key].shape == (1, NUM_CLASSES, 65, 90)
        assert not torch.allclose(a[key], b[key]), key
    assert torch.equal(a["feat"], b["feat"])  # the backbone does not resize


def test_align_corners_reaches_the_discriminator_resize() -> None:
    torch.manual_seed(0)
    off = FCDiscriminator(NUM_CLASSES, ndf=8)
    on = FCDiscriminator(NUM_CLASSES, ndf=8, align_corners=True)
    on.load_state_dict(off.state_dict())
    prob = torch.softmax(torch.randn(1, NUM_CLASSES, 70, 90), 1)
    with torch.no_grad():
        a, b = off(prob), on(prob)
    assert a.shape == b.shape == (1, 1, 70, 90) and not torch.allclose(a, b)


def test_inference_resizes_logits_with_the_models_align_corners() -> None:
    from semiseg_cli.config import build_config
    from semiseg_cli.inference import InferenceSettings, predict_probs

    cfg = build_config(None, ["model.align_corners=true"])
    assert InferenceSettings.from_config(cfg).align_corners is True
    assert InferenceSettings.from_config(build_config(None, [])).align_corners is False

    class Coarse(nn.Module):
        """Returns logits at a quarter of the input size, so predict_probs must resize them."""

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            torch.manual_seed(0)
            return {"logits": torch.randn(x.shape[0], NUM_CLASSES, x.shape[2] // 4, x.shape[3] // 4)}

    x = torch.zeros(1, 3, 64, 88)
    a = predict_probs(Coarse(), x, InferenceSettings(align_corners=False))
    b = predict_probs(Coarse(), x, InferenceSettings(align_corners=True))
    assert a.shape == b.shape == (1, NUM_CLASSES, 64, 88) and not torch.allclose(a, b)


# ----------------------------------------------------------------------------- frozen BN


def _backbone_bns(model: SegModel) -> list[nn.Module]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _head_bns(model: SegModel) -> list[nn.Module]:
    bb = {id(m) for m in model.backbone.modules()}
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in bb]


def _running(mods: list[nn.Module]) -> list[torch.Tensor]:
    return [t.clone() for m in mods for t in (m.running_mean, m.running_var)]


def _frozen_model(mode: str) -> SegModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", aux_head=True, aspp_channels=32, decoder_channels=32, freeze_bn=mode), NUM_CLASSES)


def test_freeze_bn_all_keeps_statistics_and_affine_through_train() -> None:
    from semiseg_cli.methods.base import build_optimizer
    from semiseg_cli.config import OptimConfig

    model = _frozen_model("all")
    model.train()  # what the loop's method.train() does: must not unfreeze
    bns, heads = _backbone_bns(model), _head_bns(model)
    assert bns and heads
    assert all(not m.training for m in bns) and all(m.training for m in heads)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert all(p.requires_grad for m in heads for p in m.parameters())
    before, affine = _running(bns), [p.clone() for m in bns for p in m.parameters()]
    head_before = _running(heads)

    spec = build_optimizer(model, OptimConfig(lr=0.1), 10)
    in_opt = {id(p) for g in spec.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for m in bns for p in m.parameters()}
    out = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    sum(v.float().mean() for k, v in out.items() if k != "feat").backward()
    assert all(p.grad is None for m in bns for p in m.parameters())
    spec.optimizer.step()

    assert all(torch.equal(a, b) for a, b in zip(before, _running(bns)))
    assert all(torch.equal(a, b) for a, b in zip(affine, [p for m in bns for p in m.parameters()]))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, _running(heads)))  # heads' BN still trains
    # predict() restores train mode, and the frozen BN with it.
    model.predict(torch.randn(1, 3, 64, 64))
    assert model.training and all(not m.training for m in bns)


def test_freeze_bn_affine_tracks_statistics_as_the_official_code() -> None:
    model = _frozen_model("affine")
    model.train()
    bns = _backbone_bns(model)
    assert all(m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = _running(bns)
    out = model(torch.randn(2, 3, 64, 64))
    out["logits"].mean().backward()
    assert all(p.grad is None for m in bns for p in m.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, _running(bns)))


def test_freeze_bn_survives_syncbn_conversion() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_frozen_model("all"))
    model.train()
    bns = _backbone_bns(model)  # type: ignore[arg-type]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) and not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = _running(bns)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, b) for a, b in zip(before, _running(bns)))


def test_freeze_bn_none_is_the_default_and_trains_everything() -> None:
    model = _frozen_model("none")
    model.train()
    assert ModelConfig().freeze_bn == "none" and ModelConfig().align_corners is False
    assert all(m.training and all(p.requires_grad for p in m.parameters()) for m in _backbone_bns(model))
