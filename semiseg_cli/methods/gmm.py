"""Batched two-component 1-D Gaussian mixtures fitted by EM, in torch, on the training device.

DuPL's adaptive noise filtering fits, for every image, a mixture of two Gaussians to the
per-pixel losses of its foreground pseudo-labels. The official code calls sklearn once per image
(a device-to-host copy and a Python loop per image per step). Here all images of a batch are
fitted at once: the values are a (B, N) tensor and a (B, N) boolean mask says which entries
belong to each image's sample, so images with different numbers of pixels batch together.

The EM follows sklearn's `GaussianMixture(n_components=2)` as the official code calls it (tol
1e-2): hard responsibilities from a 2-means clustering for the first M-step, then at most `iters`
EM iterations with `reg` added to each variance; a row stops once its mean log-likelihood per
sample changes by less than `tol` from the previous iteration (sklearn's rule, tested after that
iteration's M-step, so a row stops after two iterations at the earliest).
One difference: sklearn starts its k-means from k-means++ (random) and iterates to convergence;
here 20 Lloyd iterations start from each sample's minimum and maximum (deterministic, no random
state per image). On 1-D data the two usually find the same split; they can differ on samples
with more than two modes.

What can go wrong: a sample with fewer than two values has no meaningful mixture — callers must
skip it (see `gmm_noise_mask`). A component can lose all its mass (e.g. all values equal); its
weight then goes to 0 and its mean/variance keep their previous values instead of turning NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class GMM1D:
    """Fitted parameters, one row per sample: `means`, `vars`, `weights` are (B, 2).

    Component 0 has the lower mean ("clean"), component 1 the higher ("noisy"). `n_iter` (B,):
    the EM iterations each row ran (sklearn's `n_iter_`), set by `fit_gmm_1d`.
    """

    means: torch.Tensor
    vars: torch.Tensor
    weights: torch.Tensor
    n_iter: torch.Tensor | None = None

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log(pi_k N(x | mu_k, var_k)) for x (B, M): (B, M, 2)."""
        mu = self.means[:, None, :]
        var = self.vars[:, None, :]
        logw = self.weights.clamp_min(1e-12).log()[:, None, :]
        return logw - 0.5 * (_LOG_2PI + var.log() + (x[..., None] - mu) ** 2 / var)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities p(k | x) for x (B, M): (B, M, 2), rows sum to 1."""
        return torch.softmax(self.log_joint(x), dim=-1)


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means along dim 1 for weights w (B, N, K): (mean (B, K), total weight (B, K))."""
    tot = w.sum(1)
    mean = (w * x[..., None]).sum(1) / tot.clamp_min(1e-12)
    return mean, tot


def kmeans_1d(x: torch.Tensor, mask: torch.Tensor, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """2-means on each row's masked values: (hard assignments (B, N) in {0, 1}, centres (B, 2)).

    Centres start at each row's minimum and maximum, so cluster 1 is the high one. An empty
    cluster keeps its centre.
    """
    big = torch.finfo(x.dtype).max
    lo = torch.where(mask, x, torch.full_like(x, big)).amin(1)
    hi = torch.where(mask, x, torch.full_like(x, -big)).amax(1)
    centres = torch.stack([lo, hi], 1)  # (B, 2)
    assign = torch.zeros_like(x, dtype=torch.long)
    m = mask.to(x.dtype)
    for _ in range(iters):
        assign = ((x - centres[:, 1:2]).abs() < (x - centres[:, 0:1]).abs()).long()
        onehot = torch.nn.functional.one_hot(assign, 2).to(x.dtype) * m[..., None]
        mean, tot = _masked_mean(x, onehot)
        centres = torch.where(tot > 0, mean, centres)
    return assign, centres


def _m_step(
    x: torch.Tensor, resp: torch.Tensor, n: torch.Tensor, reg: float, prev: GMM1D | None
) -> GMM1D:
    """Maximisation: resp (B, N, 2) already zero outside the mask; n (B,) sample sizes."""
    mean, nk = _masked_mean(x, resp)
    var = (resp * (x[..., None] - mean[:, None, :]) ** 2).sum(1) / nk.clamp_min(1e-12) + reg
    if prev is not None:  # a component without mass keeps its parameters instead of collapsing to 0
        empty = nk <= 1e-12
        mean = torch.where(empty, prev.means, mean)
        var = torch.where(empty, prev.vars, var)
    weights = nk / n.clamp_min(1)[:, None]
    return GMM1D(mean, var, weights)


def fit_gmm_1d(x: torch.Tensor, mask: torch.Tensor, iters: int = 10, reg: float = 5e-4, tol: float = 1e-2) -> GMM1D:
    """Fit a 2-component Gaussian mixture to each row of x (B, N) restricted to mask (B, N).

    At most `iters` EM iterations; a row stops (keeps its parameters) once its mean log-likelihood
    changes by less than `tol` (sklearn's rule; `tol=0` runs all `iters`). Rows with fewer than
    two masked values give meaningless parameters; check before use. Computation is in float32 at
    least (losses may arrive as bf16 under autocast).
    """
    if x.shape != mask.shape or x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must both be (B, N)")
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    x = torch.where(mask, x, torch.zeros_like(x))  # padding never enters a sum with weight > 0
    m = mask.to(x.dtype)
    n = m.sum(1)
    assign, centres = kmeans_1d(x, mask)
    resp = torch.nn.functional.one_hot(assign, 2).to(x.dtype) * m[..., None]
    # An empty k-means cluster (all values equal) starts at its centre, not at 0.
    g = _m_step(x, resp, n, reg, GMM1D(centres, torch.full_like(centres, reg), torch.zeros_like(centres)))
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    prev = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        log_joint = g.log_joint(x)
        lower_bound = (torch.logsumexp(log_joint, -1) * m).sum(1) / n.clamp_min(1)  # mean log-likelihood
        new = _m_step(x, torch.softmax(log_joint, -1) * m[..., None], n, reg, g)
        keep = done[:, None]
        g = GMM1D(*(torch.where(keep, old, upd) for old, upd in ((g.means, new.means), (g.vars, new.vars), (g.weights, new.weights))))
        n_iter += (~done).long()
        done = done | ((lower_bound - prev).abs() < tol)
        prev = lower_bound
        if bool(done.all()):  # one host sync per iteration, at most `iters` (10) per step
            break
    # Order the components so that 1 is the high-mean ("noisy") one.
    swap = (g.means[:, 0] > g.means[:, 1])[:, None]
    flip = lambda t: torch.where(swap, t.flip(1), t)  # noqa: E731
    return GMM1D(flip(g.means), flip(g.vars), flip(g.weights), n_iter)


@dataclass
class NoiseFilterResult:
    noise: torch.Tensor  # (B, N) bool: pixels to set to ignore
    fitted: torch.Tensor  # (B,) bool: a mixture was fitted (enough pixels)
    active: torch.Tensor  # (B,) bool: fitted and the two means are more than eta apart
    gmm: GMM1D


def gmm_noise_mask(
    loss: torch.Tensor,
    fg: torch.Tensor,
    eta: float = 1.0,
    gamma: float = 0.9,
    min_pixels: int = 0,
    min_loss: float = 0.0,
    iters: int = 10,
    reg: float = 5e-4,
    tol: float = 1e-2,
) -> NoiseFilterResult:
    """DuPL's adaptive noise filtering for a batch of per-pixel losses.

    loss: (B, N) per-pixel CE of a prediction against its pseudo-label; fg: (B, N) bool,
    foreground pseudo-labelled pixels (label neither background nor ignore).

    Per image: fit the mixture on the foreground losses (code variant: only those above
    `min_loss`, and only when more than `min_pixels` of them exist; 0 turns a rule off). If
    mu_noisy - mu_clean > eta, the foreground pixels whose posterior of the noisy component
    exceeds gamma are noise. Like the official code, the posterior is evaluated for every
    foreground pixel, including those below `min_loss` that the fit never saw.

    Known artefact (paper and code): a Gaussian's tails are symmetric, so when the clean
    component is narrow a pixel with a *very low* loss can be more likely under the wide noisy
    component and get flagged.
    """
    fit_mask = fg & (loss > min_loss) if min_loss > 0 else fg
    count = fit_mask.sum(1)
    fitted = (count > min_pixels) & (count >= 2)
    g = fit_gmm_1d(loss.detach(), fit_mask, iters=iters, reg=reg, tol=tol)
    active = fitted & (g.means[:, 1] - g.means[:, 0] > eta)
    post = g.posterior(loss.detach().float())[..., 1]
    noise = active[:, None] & fg & (post > gamma)
    return NoiseFilterResult(noise, fitted, active, g)
