"""Each method's own preset section.

Where the paper and the official code differ, both values are reachable and the default is the
paper's (see docs/methods.md). Kept apart from the method code so that validating a preset does
not need to import the training machinery.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    """A method's section. `REMOVED` maps each option removed from it to the one behaviour that
    remains: a config holding that value (every run folder and checkpoint written before the
    removal) still loads, the key dropped; any other value is refused, saying what to do."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    SECTION: ClassVar[str] = ""
    REMOVED: ClassVar[dict[str, object]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_removed(cls, data: object) -> object:
        if not isinstance(data, dict) or not cls.REMOVED:
            return data
        data = dict(data)
        for key, kept in cls.REMOVED.items():
            if key in data:
                value = data.pop(key)
                if (tuple(value) if isinstance(value, list) else value) != kept:
                    raise ValueError(
                        f"{cls.SECTION}.{key} = {value!r} was removed (docs/methods_{cls.SECTION}.md, \"Removed options\"); "
                        f"only its former behaviour {kept!r} remains: delete the key"
                    )
        return data


class U2PLParams(_Params):
    """U2PL (CVPR 2022). Values from the paper unless a field says otherwise; see
    docs/methods_u2pl.md for each formula and where the official code differs."""

    SECTION: ClassVar[str] = "u2pl"

    # Options removed (no preset used them, no measurement supported them), with the behaviour
    # that remains; docs/methods_u2pl.md, "Removed options".
    REMOVED: ClassVar[dict[str, object]] = {
        "ema_buffers": True,  # BatchNorm statistics are averaged by the EMA
        "unsup_norm": "official",  # mean CE over kept pixels x B*H*W / #kept
        "strong_photometric": False,  # the strong view is CutMix alone
        "negative_mask": "paper",  # the paper's negative keys
        "pseudo_label_align": "none",  # no distribution alignment
        "align_momentum": 0.99,  # the prior adjustment's running prior: momentum 0.99 per step
    }

    # Supervised-only warm-up: only the labeled loss, no teacher. None = one epoch (the VOC
    # recipe's sup_only_epoch = 1); 0 = none (the Cityscapes recipe).
    sup_only_iters: int | None = Field(None, ge=0)
    # Reset the teacher to the student at every step of the first semi-supervised epoch, as the
    # official code does; `teacher_reset_iters` says how long (None = one epoch).
    teacher_reset: bool = True
    teacher_reset_iters: int | None = Field(None, ge=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)  # max decay; min(1 - 1/(t+1), ema_decay)
    unsup_weight: float = Field(1.0, ge=0)
    drop_percent: float = Field(80.0, ge=0, le=100)  # entropy percentile p_0 (then -> drop_percent_end)
    # Where p_t ends at the last epoch: 100 (the paper: every pseudo-label kept by the end);
    # = drop_percent keeps dropping the same share of high-entropy pixels throughout (not in U2PL;
    # docs/methods_u2pl.md, "Beyond the paper").
    drop_percent_end: float = Field(100.0, ge=0, le=100)
    cutmix_prob: float = Field(0.5, ge=0, le=1)  # one coin per batch, as the official code
    cutmix_area: float = Field(0.5, gt=0, lt=1)
    # CutMix box edges on multiples of this (the representation stride), so the box is exact on
    # the stride-4 teacher features; 1 = any pixel (the official code's boxes).
    cutmix_align: int = Field(4, ge=1)
    contrastive: bool = True
    contrastive_weight: float = Field(0.1, ge=0)  # paper 0.1, official code 1.0 (trained as 1/world_size)
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
    # Where the labeled half of the contrastive inputs (probabilities for the labeled negatives,
    # features for prototypes and the labeled keys queued) comes from: "teacher" = a teacher
    # forward over cat(labeled, weak unlabeled), as the paper and official code; "student" = the
    # student's own forward, detached, so the teacher sees the unlabeled images only (about one
    # forward pass over B images fewer per step; not the paper's method).
    labeled_keys: Literal["teacher", "student"] = "teacher"
    # Label-shift correction of the unsupervised CE (not in U2PL; logit adjustment, Menon et al.
    # 2021): the student's unlabeled logits get log(pi_pl[c]) - log(pi_lab[c]) added inside that
    # loss, pi_pl the running class frequencies of the kept pseudo-labels and pi_lab the labeled
    # pixels'. false = the paper. `PriorAdjustment` in u2pl_losses.py; docs/methods_u2pl.md.
    unsup_prior_adjust: bool = False
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
    map gates self-training on unlabeled pixels. Every option is set by a preset or is a
    paper-vs-code switch (or a guard rail named in the D-accuracy warnings); see
    docs/methods_advsemiseg.md, "Options".
    """

    SECTION: ClassVar[str] = "advsemiseg"

    lambda_adv: float = Field(0.01, ge=0)  # labeled adversarial weight: paper/README 0.01, code default 0.1
    lambda_semi_adv: float = Field(0.001, ge=0)  # unlabeled adversarial weight (from step 0, paper and code)
    lambda_semi: float = Field(0.1, ge=0)  # confidence-masked self-training weight
    semi_start: int = Field(5000, ge=0)  # self-training starts at this step (VOC recipe of 20k)
    t_semi: float = Field(0.2, ge=0, le=1)  # keep pixels with sigmoid(D) >= t_semi
    # Train D on the unlabeled predictions too (fake, never ignored), as the official code does
    # (`--D-remain`, default on); false: fake maps from labeled predictions only.
    d_remain: bool = True
    d_lr: float = Field(1e-4, gt=0)  # Adam (betas 0.9, 0.99), poly decay with optim.poly_power
    # Guard rails against the known GAN instability: step D (or G) only every k-th step. On
    # off-steps that network's loss terms are weighted 0 and its optimizer does not step.
    d_update_every: int = Field(1, ge=1)
    g_update_every: int = Field(1, ge=1)
    # Warn (once) when D's pixel accuracy stays >= 99% (G's adversarial signal is saturated) or
    # within 2 points of 50% (D's confidence map is noise) for this many consecutive steps.
    warn_window: int = Field(200, ge=1)

    # Options removed by the simplification (no preset set them, none was a paper-vs-code
    # switch), with the value that is now fixed.
    REMOVED: ClassVar[dict[str, object]] = {
        "semi_start_adv": 0,  # the unlabeled adversarial term runs from step 0
        "d_betas": (0.9, 0.99),  # D's Adam betas
        "d_channels": 64,  # D's first conv width (ndf)
    }



class CAMParams(_Params):
    """What DuPL and its single-network baseline share: one sub-network's structure, its CAMs,
    the thresholds and their schedule, PAR, and the segmentation loss on the pseudo-labels. See
    docs/methods_dupl.md. Paper values unless a comment says otherwise; "code" marks the official
    implementation's choice where it differs (reachable, not the default)."""

    # Paper: ViT-B/16 (DeiT-B, ImageNet-1k). "cnn" uses model.backbone/output_stride/pretrained
    # so the method runs on a CPU; it is the default because a randomly initialised ViT learns
    # nothing useful in a CPU budget. VOC/COCO presets set "vit_b_16" with vit_pretrained.
    backbone: Literal["vit_b_16", "cnn"] = "cnn"
    vit_pretrained: str | None = None  # "imagenet" (torchvision ViT-B/16) or a DeiT-B/ViT-B state dict path
    # ViT-B/16 block (of 12) of the auxiliary classifier: the 3rd-last; the CNN uses its "mid" features.
    aux_layer: int = Field(-3, ge=-12, le=11)
    seg_channels: int = Field(512, ge=1)  # LargeFOV width
    seg_dilation: int = Field(5, ge=1)
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)  # each with its horizontal flip
    tau_low: float = Field(0.25, ge=0, le=1)
    tau_high_start: float = Field(0.70, ge=0, le=1)  # cosine descent from seg_start to the last step
    tau_high_end: float = Field(0.55, ge=0, le=1)
    # Code: per-class targets (fixed_tau_classes keep tau_high_start) and an image's threshold is
    # the max over its tags. VOC code recipe: per_class_tau=true, fixed_tau_classes=[1,2,3,4,9,19].
    per_class_tau: bool = False
    fixed_tau_classes: tuple[int, ...] = ()  # dataset class ids (1..C-1)
    par_iters: int = Field(10, ge=0)  # 0 disables the refinement
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_w1: float = Field(0.3, gt=0)
    par_w2: float = Field(0.01, ge=0)
    par_downscale: int = Field(2, ge=1)  # code refines at half resolution
    seg_weight: float = Field(0.2, ge=0)
    seg_start: int = Field(2000, ge=0)  # pseudo-label supervision of the heads (and the tau_h descent) starts here
    # "ce": plain cross-entropy over labelled pixels; "balanced" (code): mean of the background CE
    # and the foreground CE, so background does not dominate.
    seg_loss: Literal["ce", "balanced"] = "ce"
    # Compute the CAM pseudo-labels before seg_start too, only to log their mIoU against gt_mask
    # (costs the multi-scale CAM passes on every step of the warm-up).
    log_cam_miou: bool = True

    @model_validator(mode="after")
    def _thresholds(self) -> "CAMParams":
        if not self.tau_low < self.tau_high_end <= self.tau_high_start:
            raise ValueError(
                f"need tau_low < tau_high_end <= tau_high_start (got {self.tau_low}, {self.tau_high_end}, {self.tau_high_start})"
            )
        if not self.cam_scales or min(self.cam_scales) <= 0:
            raise ValueError("cam_scales must be a non-empty list of positive scales")
        if self.par_iters and (not self.par_dilations or min(self.par_dilations) < 1):
            raise ValueError("par_dilations must be a non-empty list of positive integers (or par_iters = 0)")
        if self.fixed_tau_classes and not self.per_class_tau:
            raise ValueError("fixed_tau_classes only applies with per_class_tau = true")
        return self


class CAMBaselineParams(CAMParams):
    """The single-network weak baseline DuPL's ablation starts from: one sub-network whose head
    learns from its own refined CAM pseudo-labels. Every field is DuPL's, with DuPL's default;
    docs/methods_dupl.md, "The single-network baseline"."""

    SECTION: ClassVar[str] = "cam_baseline"


class DuPLParams(CAMParams):
    """DuPL (CVPR 2024), weakly supervised from image-level tags: two sub-networks (each as
    `CAMParams` describes) with cross supervision, discrepancy, GMM noise filtering and
    consistency. See docs/methods_dupl.md.

    Paper values unless a comment says otherwise; "code" marks the official implementation's
    choice where it differs (reachable, not the default).
    """

    SECTION: ClassVar[str] = "dupl"

    # Options removed (no preset used them, no measurement supported them), with the behaviour
    # that remains; docs/methods_dupl.md, "Removed options".
    REMOVED: ClassVar[dict[str, object]] = {
        "gmm_guard_low": False,  # low-loss pixels may be filtered, as paper and code
        "strong_flip_prob": 1.0,  # the strong view is always flipped, as the code
        "single_net": False,  # always two sub-networks with cross supervision; the baseline is method cam_baseline
    }

    # Which segmentation head `eval` uses: sub-net 1 (official evaluation) or the mean of both.
    inference: Literal["net1", "mean"] = "net1"
    discrepancy: Literal["paper", "code"] = "paper"  # -log(1 - cos) | 1 + cos; cosine per channel
    discrepancy_weight: float = Field(0.1, ge=0)
    consistency: bool = True
    consistency_weight: float = Field(0.05, ge=0)
    consistency_thresh: float = Field(0.9, ge=0, le=1)  # clean-view confidence for a target
    # Strong view: RandAugment colour ops (n ops of magnitude m out of 30; code n=5, m=10), then a
    # horizontal flip (always, as the code) and a resize (code: 0.75).
    strong_ops: int = Field(5, ge=0)
    strong_magnitude: float = Field(10.0, ge=0, le=30)
    strong_scale: float = Field(0.75, gt=0, le=2)
    gmm: bool = True
    gmm_start: int = Field(8000, ge=0)  # noise filtering and consistency start here (not before seg_start)
    gmm_eta: float = Field(1.0, ge=0)  # filter only if mu_noisy - mu_clean > eta
    gmm_gamma: float = Field(0.9, ge=0, le=1)  # paper 0.9, code 0.95
    gmm_min_pixels: int = Field(0, ge=0)  # code: 1000 (fit only with more foreground pixels than this); 0 = off
    gmm_min_loss: float = Field(0.0, ge=0)  # code: 0.1 (fit only on losses above this); 0 = off
    # EM iterations at most (sklearn max_iter); each image stops earlier once its mean
    # log-likelihood changes by < 1e-2 (the code's sklearn tol).
    gmm_iters: int = Field(10, ge=1)
    gmm_reg: float = Field(5e-4, gt=0)  # added to the variances (sklearn reg_covar)


class FixMatchParams(_Params):
    """FixMatch for segmentation as the UniMatch paper's baseline (Sohn et al. 2020; Yang et al.
    2023, official fixmatch.py). See docs/methods_unimatch.md."""

    SECTION: ClassVar[str] = "fixmatch"

    # Confidence threshold tau on the weak view's pseudo-labels: 0.95 (VOC/COCO); the official
    # Cityscapes recipe uses 0 (every pixel).
    conf_thresh: float = Field(0.95, ge=0, le=1)
    cutmix_prob: float = Field(0.5, ge=0, le=1)  # per image, as the official code


class UniMatchParams(FixMatchParams):
    """UniMatch (CVPR 2023): FixMatch with two strong views and a feature-perturbation stream.
    The loss weights are the paper's: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2."""

    SECTION: ClassVar[str] = "unimatch"

    fp_dropout: float = Field(0.5, ge=0, lt=1)  # Dropout2d on the encoder's low and last features


class UniMatchV2Params(FixMatchParams):
    """UniMatch V2 (arXiv 2410.10777): an EMA teacher labels the weak view; two strong views in
    one student forward with complementary channel dropout on the encoder's features. The loss
    weights are the paper's: (L_x + (L_s1 + L_s2) / 2) / 2. See docs/methods_unimatch.md."""

    SECTION: ClassVar[str] = "unimatch_v2"

    # The teacher's EMA decay at step t is min(1 - 1/(t+1), ema_decay), parameters and buffers.
    ema_decay: float = Field(0.996, gt=0, lt=1)
