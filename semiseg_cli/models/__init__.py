"""Segmentation networks built from a `ModelConfig`: `build_model(cfg.model, num_classes)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from semiseg_cli.errors import UserError
from semiseg_cli.models.backbones import Backbone, build_backbone
from semiseg_cli.models.deeplab import DeepLabV2, DeepLabV3Plus, SegModel
from semiseg_cli.models.discriminator import FCDiscriminator

if TYPE_CHECKING:  # config imports the methods, which may import models
    from semiseg_cli.config import ModelConfig

__all__ = [
    "Backbone",
    "DeepLabV2",
    "DeepLabV3Plus",
    "FCDiscriminator",
    "SegModel",
    "build_backbone",
    "build_model",
]

# DeepLab-v2 always runs its backbone at output stride 8 (paper and AdvSemiSeg code);
# `model.output_stride` only applies to DeepLab-v3+.
DEEPLABV2_OUTPUT_STRIDE = 8


def default_aspp_dilations(output_stride: int) -> tuple[int, ...]:
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


def build_model(model_cfg: ModelConfig, num_classes: int) -> SegModel:
    """The network described by `model_cfg`, predicting `num_classes` classes."""
    if num_classes < 1:
        raise UserError(f"the dataset must have at least one class (got {num_classes})")
    from semiseg_cli.models.dpt import ENCODERS, build_dpt  # timm itself is imported only inside build_dpt

    if model_cfg.arch == "dpt":
        return build_dpt(model_cfg, num_classes)
    if model_cfg.backbone in ENCODERS:
        raise UserError(
            f'model.backbone = {model_cfg.backbone!r} is a ViT encoder for model.arch = "dpt" '
            f"(got arch {model_cfg.arch!r}); set model.arch=dpt or a CNN backbone"
        )
    if model_cfg.arch == "deeplabv2":
        if model_cfg.rep_head:
            raise UserError('model.rep_head needs arch = "deeplabv3plus" (DeepLab-v2 has no stride-4 decoder)')
        if model_cfg.low_proj_channels != 48 or model_cfg.aspp_project_kernel != 1:
            raise UserError(
                'model.low_proj_channels and model.aspp_project_kernel need arch = "deeplabv3plus" '
                "(DeepLab-v2 has no decoder or ASPP projection); remove them"
            )
        backbone = build_backbone(
            model_cfg.backbone,
            DEEPLABV2_OUTPUT_STRIDE,
            model_cfg.pretrained,
            model_cfg.deep_stem,
            model_cfg.multi_grid,
        )
        return DeepLabV2(
            backbone,
            num_classes,
            dilations=model_cfg.aspp_dilations or (6, 12, 18, 24),
            branches=model_cfg.v2_branches,
            aux_head=model_cfg.aux_head,
            dropout=model_cfg.dropout,
            align_corners=model_cfg.align_corners,
            freeze_bn=model_cfg.freeze_bn,
        )
    backbone = build_backbone(
        model_cfg.backbone,
        model_cfg.output_stride,
        model_cfg.pretrained,
        model_cfg.deep_stem,
        model_cfg.multi_grid,
    )
    return DeepLabV3Plus(
        backbone,
        num_classes,
        aspp_dilations=model_cfg.aspp_dilations or default_aspp_dilations(model_cfg.output_stride),
        aspp_channels=model_cfg.aspp_channels,
        decoder_channels=model_cfg.decoder_channels,
        dropout=model_cfg.dropout,
        rep_head=model_cfg.rep_head,
        rep_dim=model_cfg.rep_dim,
        aux_head=model_cfg.aux_head,
        low_proj_channels=model_cfg.low_proj_channels,
        aspp_project_kernel=model_cfg.aspp_project_kernel,
        align_corners=model_cfg.align_corners,
        freeze_bn=model_cfg.freeze_bn,
    )
