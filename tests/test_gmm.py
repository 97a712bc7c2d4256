"""The batched torch EM against a plain per-image numpy EM, and DuPL's filtering rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg_cli.methods.gmm import fit_gmm_1d, gmm_noise_mask

# ----------------------------------------------------------------------------- reference


def reference_gmm(
    x: np.ndarray, iters: int, reg: float = 5e-4, tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One sample, written out plainly: 2-means from (min, max), one hard M-step, then EM steps
    until sklearn's rule stops it (|change of the mean log-likelihood| < tol, tested after the
    M-step) or `iters` ran. Returns (means, vars, weights, iterations run)."""
    x = x.astype(np.float64)
    c = np.array([x.min(), x.max()])
    for _ in range(20):
        a = (np.abs(x - c[1]) < np.abs(x - c[0])).astype(int)
        for k in range(2):
            if (a == k).any():
                c[k] = x[a == k].mean()
    resp = np.stack([a == 0, a == 1], 1).astype(np.float64)

    def m_step(resp: np.ndarray, prev: tuple) -> tuple:
        nk = resp.sum(0)
        mu = np.array([(resp[:, k] * x).sum() / max(nk[k], 1e-12) for k in range(2)])
        var = np.array([(resp[:, k] * (x - mu[k]) ** 2).sum() / max(nk[k], 1e-12) + reg for k in range(2)])
        for k in range(2):  # an empty component keeps its previous parameters
            if nk[k] <= 1e-12:
                mu[k], var[k] = prev[0][k], prev[1][k]
        return mu, var, nk / len(x)

    mu, var, w = m_step(resp, (c, np.full(2, reg), np.zeros(2)))
    prev_lb, n_iter = -np.inf, 0
    for _ in range(iters):
        logp = np.stack(
            [math.log(max(w[k], 1e-12)) - 0.5 * (math.log(2 * math.pi) + np.log(var[k]) + (x - mu[k]) ** 2 / var[k]) for k in range(2)], 1
        )
        top = logp.max(1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logp - top).sum(1))
        lb = log_norm.mean()
        resp = np.exp(logp - log_norm[:, None])
        mu, var, w = m_step(resp, (mu, var, w))
        n_iter += 1
        if abs(lb - prev_lb) < tol:
            break
        prev_lb = lb
    order = np.argsort(mu)
    return mu[order], var[order], w[order], n_iter


def reference_posterior(x: np.ndarray, mu: np.ndarray, var: np.ndarray, w: np.ndarray) -> np.ndarray:
    p = np.stack([w[k] * np.exp(-0.5 * (x - mu[k]) ** 2 / var[k]) / np.sqrt(2 * np.pi * var[k]) for k in range(2)], 1)
    return p / p.sum(1, keepdims=True)


def two_gaussians(rng: np.random.Generator, n_clean: int, n_noisy: int, mu=(0.3, 3.0), sd=(0.1, 0.5)) -> np.ndarray:
    return np.concatenate([rng.normal(mu[0], sd[0], n_clean), rng.normal(mu[1], sd[1], n_noisy)])


# ----------------------------------------------------------------------------- EM


def _ragged(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in samples)
    x = torch.full((len(samples), n), 1e3)  # padding: must never matter
    mask = torch.zeros(len(samples), n, dtype=torch.bool)
    for i, s in enumerate(samples):
        x[i, : len(s)] = torch.from_numpy(s).float()
        mask[i, : len(s)] = True
    return x, mask


@pytest.mark.parametrize("tol", [0.0, 1e-2])
def test_batched_em_matches_reference_with_ragged_images(tol: float) -> None:
    rng = np.random.default_rng(0)
    samples = [two_gaussians(rng, 300, 100), two_gaussians(rng, 50, 150, mu=(1.0, 2.5), sd=(0.3, 0.2)), two_gaussians(rng, 120, 7)]
    x, mask = _ragged(samples)
    g = fit_gmm_1d(x, mask, iters=10, tol=tol)
    probe = torch.linspace(-0.5, 4.0, 19)
    post = g.posterior(probe.expand(len(samples), -1))
    for i, s in enumerate(samples):
        mu, var, w, n_iter = reference_gmm(s, iters=10, tol=tol)
        assert int(g.n_iter[i]) == n_iter
        np.testing.assert_allclose(g.means[i].numpy(), mu, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g.vars[i].numpy(), var, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(g.weights[i].numpy(), w, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(post[i].numpy(), reference_posterior(probe.numpy(), mu, var, w), atol=1e-4)
    # and the mixture found what generated the data
    assert abs(g.means[0, 0] - 0.3) < 0.05 and abs(g.means[0, 1] - 3.0) < 0.15
    assert abs(g.weights[0, 0] - 0.75) < 0.02
    assert torch.allclose(post.sum(-1), torch.ones(()))


def test_em_stops_per_image_at_sklearn_tolerance() -> None:
    """sklearn's rule (the official code's tol 1e-2): an image stops once its mean log-likelihood
    changes by less than tol, after two iterations at the earliest; the others go on."""
    rng = np.random.default_rng(8)
    easy = two_gaussians(rng, 300, 300, mu=(0.2, 4.0), sd=(0.05, 0.05))  # 2-means already finds it
    hard = two_gaussians(rng, 300, 300, mu=(1.0, 1.6), sd=(0.4, 0.4))  # overlapping: EM keeps moving
    x, mask = _ragged([easy, hard])
    g = fit_gmm_1d(x, mask, iters=10, tol=1e-2)
    assert int(g.n_iter[0]) == 2 and int(g.n_iter[1]) > 2
    # a stopped image's parameters are those of exactly its own number of iterations
    for i in range(2):
        alone = fit_gmm_1d(x[i : i + 1], mask[i : i + 1], iters=int(g.n_iter[i]), tol=0.0)
        assert torch.allclose(g.means[i], alone.means[0], atol=1e-6) and torch.allclose(g.vars[i], alone.vars[0], atol=1e-6)
    assert (fit_gmm_1d(x, mask, iters=10, tol=0.0).n_iter == 10).all()  # tol 0: every iteration runs
    assert int(fit_gmm_1d(x, mask, iters=10, tol=1e9).n_iter.max()) == 2  # the first change is from -inf


def test_em_survives_constant_sample() -> None:
    x = torch.full((1, 50), 0.7)
    g = fit_gmm_1d(x, torch.ones_like(x, dtype=torch.bool), iters=5)
    assert not bool(gmm_noise_mask(x, torch.ones_like(x, dtype=torch.bool), eta=1e-4).active[0])
    assert torch.isfinite(g.means).all() and torch.isfinite(g.vars).all()
    assert torch.allclose(g.means, torch.full_like(g.means, 0.7))


# ----------------------------------------------------------------------------- filtering rules


def _image(values: np.ndarray, n_bg: int = 0, bg_loss: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.cat([torch.from_numpy(values).float(), torch.full((n_bg,), bg_loss)])
    fg = torch.cat([torch.ones(len(values), dtype=torch.bool), torch.zeros(n_bg, dtype=torch.bool)])
    return loss[None], fg[None]


def test_filters_the_high_loss_mode_of_foreground_only() -> None:
    rng = np.random.default_rng(1)
    values = two_gaussians(rng, 400, 100)
    loss, fg = _image(values, n_bg=30)
    res = gmm_noise_mask(loss, fg, eta=1.0, gamma=0.9)
    assert bool(res.active[0])
    noise = res.noise[0]
    assert not noise[500:].any(), "background pixels (even with high loss) are never filtered"
    assert noise[:400].float().mean() < 0.01  # clean mode kept
    assert noise[400:500].float().mean() > 0.95  # noisy mode filtered


def test_no_filtering_when_modes_are_closer_than_eta() -> None:
    rng = np.random.default_rng(2)
    loss, fg = _image(two_gaussians(rng, 300, 300, mu=(0.3, 0.9), sd=(0.1, 0.1)))
    res = gmm_noise_mask(loss, fg, eta=1.0)
    assert bool(res.fitted[0]) and not bool(res.active[0]) and not res.noise.any()
    # the same data with a small eta is filtered: the rule, not the fit, decided
    assert gmm_noise_mask(loss, fg, eta=0.3).noise.any()


def test_min_pixels_rule() -> None:
    rng = np.random.default_rng(3)
    loss, fg = _image(two_gaussians(rng, 40, 20))
    assert gmm_noise_mask(loss, fg, min_pixels=0).noise.any()
    res = gmm_noise_mask(loss, fg, min_pixels=1000)  # code rule: more than 1000 pixels needed
    assert not bool(res.fitted[0]) and not res.noise.any()


def test_min_loss_rule_excludes_low_losses_from_the_fit() -> None:
    rng = np.random.default_rng(4)
    values = np.concatenate([np.full(400, 0.01), rng.normal(0.6, 0.05, 200), rng.normal(3.0, 0.3, 100)])
    loss, fg = _image(values)
    with_rule = gmm_noise_mask(loss, fg, min_loss=0.1)
    without = gmm_noise_mask(loss, fg, min_loss=0.0)
    assert abs(float(with_rule.gmm.means[0, 0]) - 0.6) < 0.05
    assert float(without.gmm.means[0, 0]) < 0.4  # the 0.01 pixels pull the clean mean down


def test_near_zero_loss_can_be_flagged_as_in_paper_and_code() -> None:
    """The Gaussian-tail artefact is kept (no guard): with a narrow clean component, a loss of
    0 is more likely under the wide noisy one (docs/methods_dupl.md, "What can go wrong")."""
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.normal(0.5, 0.02, 500), rng.normal(3.0, 1.0, 200), [0.0]])
    loss, fg = _image(values)
    assert bool(gmm_noise_mask(loss, fg).noise[0, -1])


def test_batch_rows_are_independent() -> None:
    rng = np.random.default_rng(6)
    a, fa = _image(two_gaussians(rng, 300, 100))
    b, fb = _image(rng.normal(0.3, 0.1, 400))
    both = gmm_noise_mask(torch.cat([a, b]), torch.cat([fa, fb]))
    assert torch.equal(both.noise[0], gmm_noise_mask(a, fa).noise[0])
    assert not both.noise[1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_losses_are_fitted_in_float32(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(7)
    loss, fg = _image(two_gaussians(rng, 300, 100))
    res = gmm_noise_mask(loss.to(dtype), fg)
    assert res.gmm.means.dtype == torch.float32 and bool(res.active[0])
