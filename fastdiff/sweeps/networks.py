"""Trained-network learners (seed 002 Sec. 4.1 "Learning the MoLRG distribution with U-Net", App.
E.2, Fig. 5a): a small U-Net on MoLRG data arranged as images (n = 48 as 3 x 4 x 4) and an MLP,
trained on EDM's denoising loss, sampled with EDM's 18-step Heun (:func:`fastdiff.sample`, the fused
steps over a callable model) and scored with the paper's generalization (GL) score, its eq. 21
(docs/math.md section 4b):

    GL = mean_j min_i ||y_j - x_i|| / mean_j min_i ||x'_j - x_i||

(x_i the N training points, y_j M samples of the trained model, x'_j M fresh MoLRG samples of the
same law): about 0 when the model reproduces its training points, about 1 when its samples sit as far
from them as new data do.

Every network of a batch (one per instance: cells x trials) is trained at once: the layers carry a
leading instance axis (grouped convolutions, batched matmuls), each instance draws its own
minibatches, noise levels and noise from its cell's Philox windows and its weights from its own
seed, and the loss is the sum of the instances' losses, so an instance's gradient, Adam update and
samples do not depend on which others share its batch (up to float rounding).

The experiment ``network-generalization`` (``fastdiff sweep network-generalization``) runs the
learners over (d, N): metrics ``gl`` (the score), ``memorized`` (the nearest / second-nearest rule of
:mod:`fastdiff.sweeps.memorization`), ``off_support`` (the samples' energy off the true subspaces,
ibid.: GL alone cannot tell new-and-right from new-and-wrong), ``loss`` (the final training loss) and
``N_over_d``; :func:`transition_point` and :func:`linear_fit` turn a table into the transition
``N*(d)`` and its fit (bench/network_transition.py).
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fastdiff
from fastdiff.sweeps.params import check_at_least_one, check_d_fits, check_orthogonal_fits, molrg_shape, training_samples
from fastdiff.sweeps.runner import Experiment, Param, register
from fastdiff.sweeps.streams import normals

__all__ = ["ARCHS", "UNet", "MLP", "EDMDenoiser", "make_networks", "gl_score", "train", "edm_sample", "molrg_fresh",
           "transition_point", "linear_fit"]

ARCHS = ("unet", "mlp")
# EDM (Karras et al. 2022) Table 1: preconditioning, the training noise law ln sigma ~ N(P_mean, P_std^2)
SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
# Philox windows of a cell (fastdiff.sweeps.streams numbers 0-3, memorization 7)
_S_TRAIN, _S_FRESH, _S_XT = 9, 10, 11
_GROUPS = 4     # GroupNorm groups per instance


# =========================================================================== instance-batched layers
def _uniform(gens: Sequence[torch.Generator], shape, bound: float) -> torch.Tensor:
    """(I, *shape) uniform in [-bound, bound], instance i from ``gens[i]`` (its own stream)."""
    return torch.stack([(torch.rand(shape, generator=g) * 2 - 1) * bound for g in gens])


class _Linear(nn.Module):
    """I independent affine maps: x (I, B, fin) -> (I, B, fout), torch's default init per instance."""

    def __init__(self, gens, fin: int, fout: int, scale: float = 1.0):
        super().__init__()
        b = 1.0 / math.sqrt(fin)
        self.weight = nn.Parameter(_uniform(gens, (fin, fout), b * scale))
        self.bias = nn.Parameter(_uniform(gens, (1, fout), b * scale))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class _Conv(nn.Module):
    """I independent k x k convolutions on (B, I cin, H, W) -> (B, I cout, H, W): one grouped conv."""

    def __init__(self, gens, cin: int, cout: int, k: int = 3, scale: float = 1.0):
        super().__init__()
        self.I, self.k = len(gens), k
        b = scale / math.sqrt(cin * k * k)
        self.weight = nn.Parameter(_uniform(gens, (cout, cin, k, k), b).flatten(0, 1))
        self.bias = nn.Parameter(_uniform(gens, (cout,), b).flatten())

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=self.k // 2, groups=self.I)


class _Norm(nn.Module):
    """GroupNorm with up to ``_GROUPS`` groups (the most that divide c) inside each instance's
    channels, never across instances."""

    def __init__(self, I: int, c: int):
        super().__init__()
        self.groups = I * max(g for g in range(1, _GROUPS + 1) if c % g == 0)
        self.weight = nn.Parameter(torch.ones(I * c))
        self.bias = nn.Parameter(torch.zeros(I * c))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight, self.bias)


def _noise_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """(I, B) -> (I, B, dim): cos/sin of c_noise at frequencies 1 .. 16 (c_noise = ln(sigma)/4 spans ~[-2, 1])."""
    freqs = 2.0 ** torch.linspace(0, 4, dim // 2, dtype=c_noise.dtype, device=c_noise.device)
    a = c_noise[..., None] * freqs
    return torch.cat([a.cos(), a.sin()], -1)


class _Embed(nn.Module):
    def __init__(self, gens, dim: int):
        super().__init__()
        self.dim = dim
        self.l1, self.l2 = _Linear(gens, dim, dim), _Linear(gens, dim, dim)

    def forward(self, c_noise):
        return self.l2(F.silu(self.l1(_noise_embedding(c_noise, self.dim))))


class _ResBlock(nn.Module):
    """norm-SiLU-conv, + the noise embedding (per channel), norm-SiLU-conv, + skip (1 x 1 conv if cin != cout)."""

    def __init__(self, gens, cin: int, cout: int, emb: int):
        super().__init__()
        I = len(gens)
        self.I, self.cout = I, cout
        self.n1, self.c1 = _Norm(I, cin), _Conv(gens, cin, cout)
        self.e = _Linear(gens, emb, cout)
        self.n2, self.c2 = _Norm(I, cout), _Conv(gens, cout, cout)
        self.skip = _Conv(gens, cin, cout, k=1) if cin != cout else None

    def forward(self, x, emb):                     # x (B, I cin, H, W), emb (I, B, E)
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.e(emb).permute(1, 0, 2).reshape(h.shape[0], self.I * self.cout, 1, 1)
        h = self.c2(F.silu(self.n2(h)))
        return h + (x if self.skip is None else self.skip(x))


def _cat(a, b, I):
    """Concatenate channels instance by instance: (B, I ca, H, W), (B, I cb, H, W) -> (B, I (ca + cb), H, W)."""
    B, _, H, W = a.shape
    return torch.cat([a.view(B, I, -1, H, W), b.view(B, I, -1, H, W)], 2).view(B, -1, H, W)


class UNet(nn.Module):
    """I small U-Nets ``F(x, c_noise)`` on images (C, 4, 4), ``C = n / 16`` (n = 48: 3 x 4 x 4, seed 002
    App. E.2): input conv, a residual block at 4 x 4 (width w), average-pool to 2 x 2, blocks of width
    2w (encoder, middle), nearest upsampling, a block on [up, skip] back to w, output conv (init scaled
    by 1e-2, so the preconditioned denoiser starts near c_skip x).  ``x`` (I, B, n), ``c_noise`` (I, B)."""

    def __init__(self, n: int, width: int = 16, emb: int = 32, seeds: Sequence[int] = (0,)):
        super().__init__()
        if n % 16:
            raise ValueError(f"n: the U-Net arranges n as (n / 16) x 4 x 4 images, expected n divisible by 16, got {n}")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.I, self.n, self.C = len(gens), n, n // 16
        w = width
        self.embed = _Embed(gens, emb)
        self.inp = _Conv(gens, self.C, w)
        self.enc1 = _ResBlock(gens, w, w, emb)
        self.enc2 = _ResBlock(gens, w, 2 * w, emb)
        self.mid = _ResBlock(gens, 2 * w, 2 * w, emb)
        self.dec = _ResBlock(gens, 3 * w, w, emb)
        self.norm = _Norm(self.I, w)
        self.out = _Conv(gens, w, self.C, scale=1e-2)

    def forward(self, x, c_noise):
        I, B, n = x.shape
        emb = self.embed(c_noise)
        h = x.permute(1, 0, 2).reshape(B, I * self.C, 4, 4)
        s = self.enc1(self.inp(h), emb)                                   # (B, I w, 4, 4)
        h = self.mid(self.enc2(F.avg_pool2d(s, 2), emb), emb)            # (B, I 2w, 2, 2)
        h = self.dec(_cat(F.interpolate(h, scale_factor=2.0, mode="nearest"), s, I), emb)
        h = self.out(F.silu(self.norm(h)))
        return h.reshape(B, I, n).permute(1, 0, 2)


class MLP(nn.Module):
    """I MLPs ``F(x, c_noise)``: [x, embedding] -> ``depth`` SiLU layers of ``4 width`` units -> n."""

    def __init__(self, n: int, width: int = 16, emb: int = 32, seeds: Sequence[int] = (0,), depth: int = 3):
        super().__init__()
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.I, h = len(gens), 4 * width
        self.embed = _Embed(gens, emb)
        self.layers = nn.ModuleList([_Linear(gens, n + emb if i == 0 else h, h) for i in range(depth)])
        self.out = _Linear(gens, h, n, scale=1e-2)

    def forward(self, x, c_noise):
        h = torch.cat([x, self.embed(c_noise)], -1)
        for layer in self.layers:
            h = F.silu(layer(h))
        return self.out(h)


class EDMDenoiser(nn.Module):
    """EDM's preconditioned denoiser (Karras et al. 2022, Table 1, eq. 7):
    ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = s_d^2 / (sigma^2 + s_d^2)``,
    ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``, ``c_in = 1 / sqrt(sigma^2 + s_d^2)``,
    ``c_noise = ln(sigma) / 4``; x (I, B, n), sigma broadcastable to (I, B)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        sd2, s2 = self.sigma_data ** 2, sigma.square()
        c_skip = (sd2 / (s2 + sd2))[..., None]
        c_out = (sigma * self.sigma_data / (s2 + sd2).sqrt())[..., None]
        c_in = (s2 + sd2).rsqrt()[..., None]
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / 4)


def make_networks(arch: str, n: int, seeds: Sequence[int], width: int = 16) -> EDMDenoiser:
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    net = UNet(n, width, seeds=seeds) if arch == "unet" else MLP(n, width, seeds=seeds)
    return EDMDenoiser(net)


# =========================================================================== training and sampling
def train(model: EDMDenoiser, data: torch.Tensor, counts: Sequence[int], draws, steps: int, batch: int = 64,
          lr: float = 1e-3, progress: bool = True) -> torch.Tensor:
    """Train the I networks of ``model`` on EDM's loss (Karras et al. 2022, eq. 2 and Table 1):
    ``E_{x, sigma, eps} lambda(sigma) ||D(x + sigma eps; sigma) - x||^2 / n`` with
    ``ln sigma ~ N(-1.2, 1.2^2)``, ``lambda = (sigma^2 + s_d^2) / (sigma s_d)^2``, x uniform over the
    instance's ``counts[i]`` training points ``data[i, :counts[i]]`` (data (I, Nmax, n)), minibatches of
    ``batch`` with replacement; Adam (lr, betas 0.9 / 0.999).  ``draws(step)`` returns the step's
    normals (I, batch, n + 2): index, log-sigma and noise draws of every instance.  Returns the
    last 10% of steps' mean loss per instance (I,)."""
    I, _, n = data.shape
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    cnt = torch.as_tensor(list(counts), dtype=torch.long)[:, None]
    tail = max(1, steps // 10)
    acc = torch.zeros(I, dtype=torch.float64)
    sd2 = model.sigma_data ** 2
    for s in tqdm(range(steps), desc="train", unit="step", leave=False, disable=None if progress else True,
                  mininterval=1.0):
        z = draws(s)
        idx = (torch.special.ndtr(z[..., 0]) * cnt).long().clamp_(max=cnt - 1)   # uniform over the N points
        x0 = torch.gather(data, 1, idx[..., None].expand(I, batch, n))
        sigma = (P_MEAN + P_STD * z[..., 1]).exp()
        weight = (sigma.square() + sd2) / (sigma * model.sigma_data).square()
        err = (model(x0 + sigma[..., None] * z[..., 2:], sigma) - x0).square().mean(-1)   # (I, batch)
        per = (weight * err).mean(-1)                                                      # (I,)
        opt.zero_grad(set_to_none=True)
        per.sum().backward()    # sum: each instance's gradient is that of its own loss
        opt.step()
        if s >= steps - tail:
            acc += per.detach().double()
    return acc / tail


def edm_sample(model: EDMDenoiser, x_T: torch.Tensor, steps: int = 18) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1; ``steps`` levels, rho = 7, sigma
    0.002 .. 80) from ``x_T`` (I, M, n) (already scaled by sigma_max): :func:`fastdiff.sample` over the
    callable model, one fused ``heun_step`` per level."""
    sched = fastdiff.KarrasSchedule(steps, SIGMA_MIN, SIGMA_MAX, RHO)

    @torch.no_grad()
    def den(x, alpha, sigma):   # VE: alpha = 1
        return model(x, sigma)

    return fastdiff.sample(den, x_T, sched, "heun", progress=False)


# =========================================================================== the GL score
def gl_score(samples: torch.Tensor, train_data: torch.Tensor, fresh: torch.Tensor) -> float:
    """The GL score (seed 002 eq. 21, after Zhang et al. 2023; docs/math.md section 4b) of ``samples``
    (M, n) against the training set ``train_data`` (N, n), normalized by ``fresh`` (M', n) new draws of
    the data's law: ``mean_j min_i ||y_j - x_i|| / mean_j min_i ||x'_j - x_i||``, float64."""
    for name, t in (("samples", samples), ("train_data", train_data), ("fresh", fresh)):
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != train_data.shape[-1]:
            raise ValueError(f"{name}: expected a non-empty (rows, n = {train_data.shape[-1]}) matrix, got "
                             f"{tuple(t.shape)}")
    X = train_data.double()
    gen = fastdiff.nearest_neighbors(samples.double(), X, 1)[0][:, 0].mean()
    new = fastdiff.nearest_neighbors(fresh.double(), X, 1)[0][:, 0].mean()
    if not new > 0:
        raise ValueError("fresh: every fresh sample coincides with a training point (the score is undefined)")
    return float(gen / new)


def molrg_fresh(U: torch.Tensor, M: int, seed: int, trials: int) -> torch.Tensor:
    """``M`` new MoLRG draws (T, M, n) from the bases U (T, K, n, d), components uniform, from the
    cell's own window: ``x = U_k a``, ``a ~ N(0, I_d)``."""
    T, K, n, d = U.shape
    z = normals(seed, _S_FRESH, trials, M * (d + 1)).split([M * d, M], dim=1)
    a = z[0].reshape(T, M, d).double()
    k = (torch.special.ndtr(z[1]) * K).long().clamp_(max=K - 1)                # (T, M)
    Uk = U.double()[torch.arange(T)[:, None], k]                                # (T, M, n, d)
    return (Uk @ a[..., None])[..., 0]


def transition_point(Ns: Sequence[float], gl: Sequence[float], level: float = 0.5) -> float:
    """The N at which the GL-vs-N curve (``Ns`` increasing, ``gl`` their mean scores) first reaches
    ``level``: linear interpolation between the grid points around the first crossing; NaN if the curve
    never reaches it, ``Ns[0]`` if it starts above."""
    if len(Ns) != len(gl) or len(Ns) < 1 or any(b <= a for a, b in zip(Ns, Ns[1:])):
        raise ValueError(f"Ns, gl: expected equal-length lists with Ns increasing, got {list(Ns)} and {list(gl)}")
    if gl[0] >= level:
        return float(Ns[0])
    for (n0, g0), (n1, g1) in zip(zip(Ns, gl), zip(Ns[1:], gl[1:])):
        if g1 >= level:
            return float(n0 + (level - g0) * (n1 - n0) / (g1 - g0))
    return float("nan")


def linear_fit(d: Sequence[float], N: Sequence[float]) -> Dict[str, float]:
    """Least squares ``N = slope d + intercept`` and the RMS residual; ``ratio``: the fit through the
    origin ``N = ratio d`` (``sum d N / sum d^2``) and its RMS residual ``ratio_rms``."""
    x, y = torch.tensor(d, dtype=torch.float64), torch.tensor(N, dtype=torch.float64)
    if x.shape != y.shape or x.numel() < 2 or bool(torch.isnan(y).any()):
        raise ValueError(f"d, N: expected two or more finite (d, N) pairs, got {list(d)} and {list(N)}")
    A = torch.stack([x, torch.ones_like(x)], 1)
    slope, intercept = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    ratio = float((x * y).sum() / x.square().sum())
    return {"slope": slope, "intercept": intercept, "rms": float((A @ torch.tensor([slope, intercept],
            dtype=torch.float64) - y).square().mean().sqrt()), "ratio": ratio,
            "ratio_rms": float((ratio * x - y).square().mean().sqrt())}


# =========================================================================== the experiment
def _init_seed(seed: int, trial: int) -> int:
    """The weight-init seed of trial ``trial`` of a cell: a function of the two only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{trial}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _run_batch(cells: List[Dict], seeds: List[int], trials: int, device=torch.device("cpu")):
    from fastdiff.sweeps.memorization import memorized, off_support
    from fastdiff.sweeps.subspace import molrg_instances

    p0 = cells[0]
    n, K, d, batch, M = p0["n"], p0["K"], p0["d"], p0["batch"], p0["samples"]
    # sigma_data = 0.5: E ||x||^2 = d, so x scale 0.5 sqrt(n / d) (the GL score is scale-free)
    scale = SIGMA_DATA * math.sqrt(n / d)
    Us, Xs, fresh, xT, init = [], [], [], [], []
    Nmax = max(c["N"] for c in cells)
    for c, seed in zip(cells, seeds):
        U, X, _ = molrg_instances(n, K, d, c["N"], 0.0, "orthogonal", seed, trials)
        Us.append(U)
        Xs.append(F.pad(X, (0, 0, 0, Nmax - c["N"])) * scale)
        fresh.append(molrg_fresh(U, M, seed, trials) * scale)
        xT.append(SIGMA_MAX * normals(seed, _S_XT, trials, M * n).reshape(trials, M, n))
        init += [_init_seed(seed, t) for t in range(trials)]
    data = torch.cat(Xs).to(device)
    counts = [c["N"] for c in cells for _ in range(trials)]
    model = make_networks(p0["arch"], n, init, p0["width"]).to(device)

    def draws(step):   # each cell's own window, one sub-window per step
        return torch.cat([normals(seed, _S_TRAIN, trials, batch * (n + 2), step=step) for seed in seeds]
                         ).reshape(-1, batch, n + 2).to(device)

    loss = train(model, data, counts, draws, p0["steps"], batch, p0["lr"])
    y = edm_sample(model, torch.cat(xT).to(device), p0["heun_steps"]).cpu()
    fresh = torch.cat(fresh)
    _, energy = off_support(y, torch.cat(Us))   # a ratio: the scale does not matter
    rows = []
    for b in range(len(counts)):
        X = data[b, :counts[b]].cpu()
        rows.append({"cell_index": b // trials, "trial": b % trials, "gl": gl_score(y[b], X, fresh[b]),
                     "memorized": float(memorized(y[b], X).double().mean()), "loss": float(loss[b]),
                     "off_support": float(energy[b]), "N_over_d": counts[b] / d})
    return rows, "torch"


def _check(c: Dict) -> None:
    check_at_least_one(c, ("n", "K", "d", "N", "width", "steps", "batch", "samples", "heun_steps"))
    check_d_fits(c)
    check_orthogonal_fits(c)
    if c["arch"] == "unet" and c["n"] % 16:
        raise ValueError(f"--n: the U-Net arranges n as (n / 16) x 4 x 4 images, expected n divisible by 16, "
                         f"got {c['n']}")
    if not c["lr"] > 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {c['lr']}")


register(Experiment(
    name="network-generalization",
    description="GL score (seed 002 eq. 21) of a U-Net or MLP trained on MoLRG data vs N/d (seed 002 Fig. 5a)",
    params=(
        *molrg_shape((48,), (2,), (2, 4, 6), "subspaces of the MoLRG data"),
        training_samples((2, 4, 8, 16, 24, 32, 48, 64, 96), "training samples (total over the K components)"),
        Param("arch", str, ("unet",), "unet ((n/16) x 4 x 4 images) or mlp", ARCHS),
        Param("width", int, (16,), "unet: channels at 4 x 4 (2x at 2 x 2); mlp: hidden units / 4"),
        Param("steps", int, (1000,), "Adam steps on EDM's loss"),
        Param("batch", int, (64,), "minibatch (drawn with replacement from the N points)"),
        Param("lr", float, (2e-3,), "Adam learning rate"),
        Param("samples", int, (128,), "samples per instance for the GL score (and as many fresh data)"),
        Param("heun_steps", int, (18,), "EDM Heun levels (seed 002 App. D.2: 18)"),
    ),
    metrics=(("gl", float), ("memorized", float), ("off_support", float), ("loss", float), ("N_over_d", float)),
    run_batch=_run_batch,
    check=_check,
    batch_key=lambda c: tuple((k, v) for k, v in c.items() if k != "N"),
    instance_cost=lambda c: c["steps"] * c["batch"] * c["width"] ** 2 / 3.0e7,
    instance_bytes=lambda c: 4.0 * (c["batch"] + c["samples"]) * c["n"] * 40 * c["width"] + 8.0 * c["N"] * c["n"],
    max_cost=64.0,
))
