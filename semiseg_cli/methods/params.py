"""Each method's own preset section.

Where the paper and the official code differ, both values are reachable and the default is the
paper's (see docs/methods.md). Kept apart from the method code so that validating a preset does
not need to import the training machinery.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class U2PLParams(_Params):
    """U2PL (CVPR 2022). Values from the paper unless a field says otherwise; see
    docs/methods_u2pl.md for each formula and where the official code differs."""

    # Supervised-only warm-up: only the labeled loss, no teacher. None = one epoch (the VOC
    # recipe's sup_only_epoch = 1); 0 = none (the Cityscapes recipe).
    sup_only_iters: int | None = Field(None, ge=0)
    # Reset the teacher to the student at every step of the first semi-supervised epoch, as the
    # official code does; `teacher_reset_iters` says how long (None = one epoch).
    teacher_reset: bool = True
    teacher_reset_iters: int | None = Field(None, ge=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)  # max decay; min(1 - 1/(t+1), ema_decay)
    # Average BatchNorm statistics too; false copies them from the student. (The official code
    # averages parameters only and lets a train-mode teacher forward update its statistics.)
    ema_buffers: bool = True
    unsup_weight: float = Field(1.0, ge=0)
    drop_percent: float = Field(80.0, ge=0, le=100)  # entropy percentile p_0 (then -> 100)
    # "official": mean CE over kept pixels x (B*H*W / #kept), as the official code; "mean": the
    # plain mean over kept pixels.
    unsup_norm: Literal["official", "mean"] = "official"
    cutmix_prob: float = Field(0.5, ge=0, le=1)  # one coin per batch, as the official code
    cutmix_area: float = Field(0.5, gt=0, lt=1)
    # CutMix box edges on multiples of this (the representation stride), so the box is exact on
    # the stride-4 teacher features; 1 = any pixel (the official code's boxes).
    cutmix_align: int = Field(4, ge=1)
    contrastive: bool = True
    contrastive_weight: float = Field(0.1, ge=0)  # paper 0.1, official code 1.0
    alpha_0: float = Field(20.0, ge=0, le=50)  # reliable/unreliable percentile, -> 0
    delta_p: float = Field(0.3, ge=0, le=1)  # anchor threshold on teacher probability
    delta_n: float = Field(1.0, ge=0, le=1)  # negatives need prob < delta_n (official: 1, no filter)
    low_rank: int = Field(3, ge=1)
    high_rank: int = Field(20, ge=2)
    num_queries: int = Field(256, ge=1)
    num_negatives: int = Field(50, ge=1)
    temperature: float = Field(0.5, gt=0)
    queue_size: int = Field(30000, ge=1)
    queue_size_background: int = Field(50000, ge=1)  # class 0's queue
    # The schedules (p_t and alpha_t) are "per epoch" in the paper; epochs are counted in
    # iterations of this length (0: the unlabeled pool size divided by the unlabeled batch).
    epoch_iters: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ranks(self) -> "U2PLParams":
        if self.high_rank <= self.low_rank:
            raise ValueError(f"high_rank ({self.high_rank}) must be greater than low_rank ({self.low_rank})")
        return self


class AdvSemiSegParams(_Params):
    """AdvSemiSeg (BMVC 2018). Paper values unless a field says otherwise.

    The discriminator sees softmax maps (fake) and one-hot ground truth (real); its confidence
    map gates self-training on unlabeled pixels. See docs/methods_advsemiseg.md.
    """

    lambda_adv: float = Field(0.01, ge=0)  # labeled adversarial weight: paper/README 0.01, code default 0.1
    lambda_semi_adv: float = Field(0.001, ge=0)  # unlabeled adversarial weight
    lambda_semi: float = Field(0.1, ge=0)  # confidence-masked self-training weight
    semi_start: int = Field(5000, ge=0)  # self-training starts at this step (VOC recipe of 20k)
    semi_start_adv: int = Field(0, ge=0)  # unlabeled adversarial term starts here (code default 0)
    t_semi: float = Field(0.2, ge=0, le=1)  # keep pixels with sigmoid(D) >= t_semi; 0.1 in some recipes
    # Train D on the unlabeled predictions too (fake, never ignored), as the official code does
    # (`--D-remain`, default on); false: fake maps from labeled predictions only.
    d_remain: bool = True
    d_lr: float = Field(1e-4, gt=0)  # Adam, poly decay with optim.poly_power
    d_betas: tuple[float, float] = (0.9, 0.99)
    d_channels: int = Field(64, ge=1)  # first conv width (ndf); then x2, x4, x8
    # Guard rails against the known GAN instability: step D (or G) only every k-th step. On
    # off-steps that network's loss terms are weighted 0 and its optimizer does not step.
    d_update_every: int = Field(1, ge=1)
    g_update_every: int = Field(1, ge=1)
    # Warn (once) when D's pixel accuracy stays >= 99% (G's adversarial signal is saturated) or
    # within 2 points of 50% (D's confidence map is noise) for this many consecutive steps.
    warn_window: int = Field(200, ge=1)


class DuPLParams(_Params):
    """DuPL (CVPR 2024), weakly supervised from image-level tags."""

    backbone: Literal["vit_b_16", "cnn"] = "cnn"
    vit_pretrained: str | None = None  # "imagenet" or a path to a DeiT-B/ViT-B state dict
    aux_layer: int = -3  # auxiliary classifier on the 3rd-last block
    seg_channels: int = 512
    seg_dilation: int = 5
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    tau_low: float = 0.25
    tau_high_start: float = 0.70
    tau_high_end: float = 0.55
    per_class_tau: bool = False  # official code: keep 0.70 for some classes, max over classes
    fixed_tau_classes: tuple[int, ...] = ()
    par_iters: int = Field(10, ge=0)
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_w1: float = 0.3
    par_w2: float = 0.01
    discrepancy: Literal["paper", "code"] = "paper"  # -log(1-cos) | 1+cos per channel
    discrepancy_weight: float = 0.1
    seg_weight: float = 0.2
    seg_start: int = Field(2000, ge=0)
    consistency: bool = True
    consistency_weight: float = 0.05
    consistency_thresh: float = 0.9
    gmm: bool = True
    gmm_start: int = Field(8000, ge=0)  # consistency also starts here
    gmm_eta: float = 1.0
    gmm_gamma: float = 0.9  # paper 0.9, code 0.95
    gmm_min_pixels: int = Field(0, ge=0)  # code: 1000
    gmm_min_loss: float = 0.0  # code: 0.1
    gmm_iters: int = Field(30, ge=1)
