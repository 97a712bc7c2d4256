"""U2PL's pieces as pure functions of tensors, plus two small buffer-only modules: the memory
bank and `PriorAdjustment`, the one extension beyond the paper (off unless a preset turns it on).

Everything here is vectorised over pixels, queries and classes: no Python loop per pixel, per
query or per class, and no `.item()` (the few data-dependent sizes come from `nonzero`).
Shapes: `B` images, `C` classes, `H, W` input size, `P` flattened pixels at the representation
stride (4), `D` representation width, `Q` queries per class, `N` negatives per query.

See docs/methods_u2pl.md for the formulas, and where this follows the paper rather than the
official code (the negative-key masks, notably).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg_cli.engine import distributed
from semiseg_cli.ops import percentiles

# ----------------------------------------------------------------------------- schedules


def epoch_fraction(step: int, epoch_iters: int, total_iters: int) -> float:
    """`epoch / epochs` with the epoch index counted in whole epochs, as the official code does
    (the schedules move in steps once per epoch, not per iteration)."""
    epoch_iters = max(1, epoch_iters)
    epochs = max(1, math.ceil(total_iters / epoch_iters))
    return min(step // epoch_iters, epochs) / epochs


def drop_percent_at(frac: float, drop_percent: float, end: float = 100.0) -> float:
    """p_t: the entropy percentile above which pseudo-labels are dropped, `drop_percent` at the
    first epoch moving linearly to `end` (the paper: 100, i.e. ignore `100 - drop_percent`% of
    pixels, then fewer; `end = drop_percent` keeps it constant)."""
    return end - (end - drop_percent) * (1.0 - frac)


def alpha_at(frac: float, alpha_0: float) -> float:
    """alpha_t: the percentile splitting reliable (lowest alpha_t%) and unreliable (highest
    alpha_t%) entropies, `alpha_0` at the first epoch falling linearly to 0."""
    return alpha_0 * (1.0 - frac)


# ----------------------------------------------------------------------------- pseudo-labels


def unsup_loss(
    logits: Tensor,
    target: Tensor,
    keep: Tensor,
    ignore_index: int = 255,
    adjust: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the student on the pseudo-labels where `keep` (the pixels below the p_t-th
    entropy percentile, `keep_low_entropy`), normalised as the official code: mean CE over kept
    pixels times `B*H*W / #kept` (a re-weighting that grows the loss as more pixels are dropped).
    Nothing kept gives a zero that still depends on `logits` (DDP needs the graph).

    `adjust` (`(C,)`, `PriorAdjustment.offsets`; None = the paper) is added to every pixel's
    logits inside the loss.
    """
    logits = logits.float()
    if adjust is not None:
        logits = logits + adjust.to(logits.dtype).view(1, -1, *([1] * (logits.dim() - 2)))
    tgt = torch.where(keep, target, torch.full_like(target, ignore_index))
    ce_sum = F.cross_entropy(logits, tgt, ignore_index=ignore_index, reduction="sum")
    kept = keep.sum().clamp(min=1).to(logits.dtype)
    loss = ce_sum / kept
    return loss * (target.numel() / kept)


def reliable_split(ent: Tensor, valid: Tensor, alpha_t: float) -> tuple[Tensor, Tensor]:
    """The contrastive term's (reliable, unreliable) pixels: entropy at or below the alpha_t-th
    percentile of the valid pixels, and at or above the (100 - alpha_t)-th (one threshold pair for
    the whole batch, as the official `np.percentile`)."""
    low, high = percentiles(ent, valid, [alpha_t, 100.0 - alpha_t])
    return valid & (ent <= low), valid & (ent >= high)


class PriorAdjustment(nn.Module):
    """Label-shift correction of the unsupervised CE (not part of U2PL; logit adjustment, Menon et
    al., ICLR 2021): `offsets() = log(pi_pl) - log(pi_lab)`, added to the student's unlabeled
    logits inside that CE, so its minimiser is the labeled class prior `pi_lab` instead of the
    kept pseudo-labels' `pi_pl`. A class the teacher seldom keeps (a rare class it has only half
    learned) gets a negative offset and stops being pushed down by every other kept pixel.

    State (buffers, so checkpoints and `--resume` keep it): `label_counts`, the labeled pixels
    per class since step 0 (warm-up included; float64, exact well past float32's 2**24), and
    `pl_prior`, an EMA (`momentum` per step, started by the first batch with kept pixels) of the
    kept pseudo-labels' class frequencies. Counts are summed over all ranks without a host sync.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.momentum = momentum
        self.label_counts: Tensor
        self.pl_prior: Tensor
        self.register_buffer("label_counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("pl_prior", torch.zeros(num_classes))

    def count_labels(self, mask: Tensor) -> None:
        """Add a labeled batch's pixels per class (every step, the warm-up's too)."""
        self.label_counts += self._class_counts(mask, (mask >= 0) & (mask < self.num_classes))

    def update(self, pseudo_label: Tensor, keep: Tensor) -> None:
        """Blend this batch's kept pseudo-labels' class frequencies into `pl_prior` (left as it is
        when nothing is kept)."""
        counts = self._class_counts(pseudo_label, keep)
        total = counts.sum()
        cur = counts / total.clamp_min(1)
        m = self.momentum
        new = torch.where(self.pl_prior.sum() > 0, m * self.pl_prior + (1 - m) * cur, cur)
        self.pl_prior.copy_(torch.where(total > 0, new, self.pl_prior))

    def offsets(self) -> Tensor:
        """`log(pi_pl[c]) - log(pi_lab[c])`, (C,) float32 (both priors clamped at 1e-6)."""
        label_prior = self.label_counts / self.label_counts.sum().clamp_min(1)
        eps = 1e-6
        return torch.log(self.pl_prior.float().clamp_min(eps)) - torch.log(label_prior.float().clamp_min(eps))

    def _class_counts(self, labels: Tensor, valid: Tensor) -> Tensor:
        """Pixels per class where `valid`, summed over all ranks (invalid pixels land in an extra
        bin that is dropped)."""
        c = self.num_classes
        counts = torch.bincount(torch.where(valid, labels, c).flatten(), minlength=c + 1)[:c]
        return distributed.all_reduce_sum_(counts.double())


# ----------------------------------------------------------------------------- CutMix


def cutmix_box_mask(
    batch: int, height: int, width: int, area: float = 0.5, align: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """(B, H, W) bool, True inside one random box per sample (the region pasted from the partner).

    The box covers about `area` of the image: its width is uniform in [area*W, W] and its height
    `area*H*W / width`, as the official cutout mask. With `align > 1` the box edges fall on
    multiples of `align` (the representation stride), so the same box, downsampled with nearest
    interpolation, is exact on the stride-4 maps; the area is then rounded to that grid.
    Drawn on the CPU generator: no device sync, reproducible with `torch.manual_seed`.
    """
    if align < 1 or height < align or width < align:
        align = 1
    hu, wu = height // align, width // align
    u = torch.rand(batch, 3, generator=generator)
    w_lo = max(1, math.ceil(area * wu))
    w = (w_lo + (u[:, 0] * (wu - w_lo + 1)).floor()).clamp(max=wu)
    h = (area * hu * wu / w).round().clamp(1, hu)
    x0 = (u[:, 1] * (wu - w + 1)).floor()
    y0 = (u[:, 2] * (hu - h + 1)).floor()
    ys = torch.arange(height).div(align, rounding_mode="floor").view(1, height, 1)
    xs = torch.arange(width).div(align, rounding_mode="floor").view(1, 1, width)
    # Pixels past the last whole grid cell (H not a multiple of align) stay outside the box.
    inside_y = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + h).view(-1, 1, 1)) & (torch.arange(height).view(1, -1, 1) < hu * align)
    inside_x = (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + w).view(-1, 1, 1)) & (torch.arange(width).view(1, 1, -1) < wu * align)
    return inside_y & inside_x


def resize_nearest(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of a (B, H, W) or (B, C, H, W) map of any dtype (labels, masks).

    Every stride-4 label/mask goes through this one function, so they all pick the same source
    pixel (4i, 4j) and stay consistent with each other."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    y = x.unsqueeze(1) if squeeze else x
    dtype = y.dtype
    y = F.interpolate(y.float(), size=tuple(size), mode="nearest")
    y = y.to(dtype)
    return y.squeeze(1) if squeeze else y


def cutmix(box: Tensor, x: Tensor) -> Tensor:
    """Sample i keeps its own pixels outside its box and takes sample (i+1) mod B's inside it.

    `x` is (B, H', W') or (B, C, H', W'); the box is resized (nearest) when H', W' differ, so
    images, labels, confidences, probabilities and stride-4 features move together.
    """
    m = resize_nearest(box, x.shape[-2:]).to(x.device)
    if x.dim() == 4:
        m = m.unsqueeze(1)
    return torch.where(m, x.roll(-1, 0), x)


# ----------------------------------------------------------------------------- contrastive


def class_ranks(prob: Tensor) -> Tensor:
    """(P, C) -> (P, C) long: the rank of each class in the pixel's descending order (0 = argmax).
    Ties are broken by class index (stable sort)."""
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(prob.shape[1], device=prob.device).expand_as(order))
    return ranks


def contrastive_masks(
    label: Tensor,
    prob: Tensor,
    reliable: Tensor,
    unreliable: Tensor,
    is_labeled: Tensor,
    delta_p: float,
    delta_n: float,
    low_rank: int,
    high_rank: int,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel, per-class roles at the representation stride. All inputs flattened to P pixels:
    `label` (P,) ground truth or pseudo-label, `prob` (P, C) teacher probabilities, `reliable`,
    `unreliable`, `is_labeled` (P,) bool. Returns three (P, C) bool masks:

    - `proto`: reliable pixels of class c (their mean teacher feature is c's positive key);
    - `anchor`: those with teacher prob_c > delta_p (the query candidates);
    - `negative`: labeled pixels whose teacher top-`low_rank` includes c but whose label is not c,
      and unlabeled unreliable pixels whose teacher rank for c is in [low_rank, high_rank);
      both with prob_c < delta_n (1.0 in the official config: no filtering).

    This is the paper's definition, per image. The official code's masks differ (its one-hot
    labels and its negative mask's arithmetic); docs/methods_u2pl.md, "Paper vs official code".
    """
    num_classes = prob.shape[1]
    valid = label != ignore_index
    onehot = F.one_hot(torch.where(valid, label, torch.zeros_like(label)), num_classes).bool() & valid[:, None]
    proto = onehot & reliable[:, None]
    anchor = proto & (prob > delta_p)
    ranks = class_ranks(prob)
    neg_l = is_labeled[:, None] & valid[:, None] & (ranks < low_rank) & ~onehot
    neg_u = ~is_labeled[:, None] & unreliable[:, None] & (ranks >= low_rank) & (ranks < high_rank)
    negative = (neg_l | neg_u) & (prob < delta_n)
    return proto, anchor, negative


def class_prototypes(feat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean feature per class: `feat` (P, D), `mask` (P, C) -> ((C, D), counts (C,)). Classes
    without pixels get a zero vector (never used: they are not valid classes)."""
    m = mask.to(feat.dtype)
    counts = m.sum(0)
    protos = m.t() @ feat / counts.clamp(min=1).unsqueeze(1)
    return protos, counts


def last_per_class(mask: Tensor, capacity: Tensor) -> tuple[Tensor, Tensor]:
    """The (pixel, class) pairs set in `mask` (P, C), class-major and in pixel order within a
    class, keeping only each class's last `capacity[c]` pairs (older ones would be overwritten
    in the queue anyway). Returns `(pixel index, class)`, each (N,)."""
    nz = mask.t().nonzero()
    cls, pix = nz[:, 0], nz[:, 1]
    counts = torch.bincount(cls, minlength=mask.shape[1])
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(cls.numel(), device=cls.device) - start[cls]
    keep = rank >= (counts - capacity.to(counts.device)).clamp(min=0)[cls]
    return pix[keep], cls[keep]


def sample_anchors(anchor: Tensor, num_queries: int) -> tuple[Tensor, Tensor]:
    """`num_queries` anchor pixels per class, uniformly with replacement among that class's
    candidates (P, C). Returns (C, Q) pixel indices and (C,) bool `has_anchor`; rows of classes
    without candidates hold an arbitrary valid index and must be masked by the caller."""
    nz = anchor.t().nonzero()
    cls, pix = nz[:, 0], nz[:, 1]
    counts = torch.bincount(cls, minlength=anchor.shape[1])
    start = torch.cumsum(counts, 0) - counts
    pix = torch.cat([pix, pix.new_zeros(1)])  # a dummy so that empty classes index safely
    r = torch.rand(anchor.shape[1], num_queries, device=anchor.device)
    idx = start[:, None] + (r * counts[:, None]).long()
    idx = torch.minimum(idx, (start + counts - 1).clamp(min=0)[:, None])
    return pix[idx], counts > 0


def infonce(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Per-class InfoNCE: cosine similarities of each query with its class's positive key and its
    negatives, divided by the temperature, cross-entropy with the positive as target, mean over
    queries. `anchor` (K, Q, D), `positive` (K, D), `negatives` (K, Q, N, D) -> (K,)."""
    a = F.normalize(anchor.float(), dim=-1, eps=1e-8)
    p = F.normalize(positive.float(), dim=-1, eps=1e-8)
    n = negatives.float()
    pos = (a * p[:, None, :]).sum(-1, keepdim=True)  # (K, Q, 1)
    # (a . n) / max(|n|, eps) is cos(a, F.normalize(n)) without writing a normalised copy of the
    # negatives, the step's largest tensor (K*Q*N*D: 21*256*50*256 floats = 275 MB on VOC).
    neg = torch.einsum("kqd,kqnd->kqn", a, n) / torch.linalg.vector_norm(n, dim=-1).clamp(min=1e-8)
    logits = torch.cat([pos, neg], -1) / temperature
    return (torch.logsumexp(logits, -1) - logits[..., 0]).mean(-1)


class MemoryBank(nn.Module):
    """Per-class FIFO queues of detached teacher features, as fixed-size ring buffers.

    One flat `(sum of sizes, D)` buffer with per-class offsets, so the background queue can be
    larger (50000 vs 30000) without every class paying for it. `ptr[c]` is where class c writes
    next, `fill[c]` how many of its slots hold features (slots `[0, fill)` until it wraps). All
    state is buffers: it moves with `.to(device)` and round-trips through `state_dict`.

    Memory: VOC (21 classes, D=256, fp32) needs 20*30000 + 50000 rows = 0.67 GB on the device.
    """

    def __init__(self, sizes: list[int], dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        sizes_t = torch.tensor(sizes, dtype=torch.long)
        self.register_buffer("bank", torch.zeros(int(sizes_t.sum()), dim, dtype=dtype))
        self.register_buffer("sizes", sizes_t)
        self.register_buffer("offsets", torch.cumsum(sizes_t, 0) - sizes_t)
        self.register_buffer("ptr", torch.zeros(len(sizes), dtype=torch.long))
        self.register_buffer("fill", torch.zeros(len(sizes), dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return int(self.sizes.numel())

    @torch.no_grad()
    def push(self, keys: Tensor, classes: Tensor) -> None:
        """Append `keys` (N, D) to the queues of `classes` (N,), oldest first within a class; a
        class receiving more than its size keeps only its newest `size` keys."""
        if classes.numel() == 0:
            return
        # Only the (small) index tensors are sorted and filtered; the keys are gathered once, as
        # whole rows, and written with index_copy_ (the slots are distinct within one push).
        order = torch.sort(classes, stable=True).indices
        classes = classes[order]
        counts = torch.bincount(classes, minlength=self.num_classes)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(classes.numel(), device=classes.device) - start[classes]
        dropped = (counts - self.sizes).clamp(min=0)
        keep = (rank >= dropped[classes]).nonzero().flatten()
        c = classes[keep]
        j = rank[keep] - dropped[c]
        pos = self.offsets[c] + (self.ptr[c] + j) % self.sizes[c]
        self.bank.index_copy_(0, pos, keys.index_select(0, order[keep]).to(self.bank.dtype))
        written = torch.minimum(counts, self.sizes)
        self.ptr.copy_((self.ptr + written) % self.sizes)
        self.fill.copy_(torch.minimum(self.fill + counts, self.sizes))

    def ordered(self, c: int) -> Tensor:
        """Class c's queue, oldest first (for inspection and tests; not used in training)."""
        size, fill, ptr, off = (int(self.sizes[c]), int(self.fill[c]), int(self.ptr[c]), int(self.offsets[c]))
        if fill < size:
            return self.bank[off : off + fill]
        idx = (torch.arange(size, device=self.bank.device) + ptr) % size
        return self.bank[off + idx]

    @torch.no_grad()
    def sample(self, classes: Tensor, n: int) -> Tensor:
        """`n` keys per class, uniformly with replacement among the filled slots: (K,) -> (K, n, D).
        Classes with an empty queue return slot 0 of their region (mask them by `fill > 0`)."""
        f = self.fill[classes].clamp(min=1)
        r = torch.rand(classes.numel(), n, device=self.bank.device)
        idx = self.offsets[classes, None] + (r * f[:, None]).long()
        idx = torch.minimum(idx, (self.offsets[classes] + f - 1)[:, None])
        # index_select copies whole rows (faster than advanced indexing on the CPU).
        return self.bank.index_select(0, idx.flatten()).view(*idx.shape, -1)


def contrastive_loss(
    rep: Tensor,
    rep_teacher: Tensor,
    proto_mask: Tensor,
    anchor_mask: Tensor,
    bank: MemoryBank,
    num_queries: int,
    num_negatives: int,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """U2PL's contrastive term from the student features `rep` (P, D, with grad), the teacher's
    `rep_teacher` (P, D), the masks of `contrastive_masks` and the (already updated) bank.

    Valid classes have at least one reliable pixel; each contributes the InfoNCE of its queries
    when it has anchor candidates and a non-empty queue, else 0; the sum is divided by the number
    of valid classes, and the loss is 0 with fewer than two valid classes (official behaviour).
    Returns `(loss, number of valid classes)`; the loss always depends on `rep` (DDP needs it).
    """
    protos, counts = class_prototypes(rep_teacher.float(), proto_mask)
    valid = counts > 0
    n_valid = valid.sum()
    idx, has_anchor = sample_anchors(anchor_mask, num_queries)
    active = (valid & has_anchor & (bank.fill > 0)).nonzero().flatten()
    if active.numel() == 0:
        return rep.sum() * 0.0, n_valid
    anchors = rep.index_select(0, idx[active].flatten()).view(active.numel(), num_queries, -1)  # (K, Q, D), with grad
    negatives = bank.sample(active, num_queries * num_negatives).view(active.numel(), num_queries, num_negatives, -1)
    per_class = infonce(anchors, protos[active], negatives, temperature)
    loss = per_class.sum() / n_valid.clamp(min=1)
    loss = torch.where(n_valid > 1, loss, torch.zeros_like(loss))  # still depends on `rep`
    return loss, n_valid
