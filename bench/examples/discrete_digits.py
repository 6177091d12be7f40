"""Binarized digits under binary-flip noise (seed 003's "chain of noisy digits / chain of denoised digits").

The data: scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), thresholded at 8 of 16
into ``x in {-1, 1}^64``.  The model: their empirical law (:class:`fastdiff.denoisers.BinaryEmpirical`),
whose smoothed law ``q(y) prop. sum_n exp(alpha x_n.y)`` is exact.  The chain: discrete Langevin on
``q`` (``fastdiff.discrete_langevin``, fused flips); each noisy state ``y_t`` is denoised by
``sign(E[x | y_t])``.  The noisy chain walks between digits, the denoised one jumps from digit to digit.

    python bench/examples/discrete_digits.py [--alpha 1.0] [--eta 2.0] [--steps 60] [--method two_stage] [--out chain.png]

Without scikit-learn installed it says so and exits 0 (scikit-learn is not a fastdiff dependency);
:func:`run` takes any ``data`` (N, 64) in {-1, 1} too.
"""
from __future__ import annotations

import argparse
import sys

import torch

import fastdiff
from fastdiff.denoisers import BinaryEmpirical


def load_digits_binary() -> torch.Tensor:
    """scikit-learn's 8x8 digits as (1797, 64) float32 in {-1, 1} (pixel > 8 of 16); ImportError without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("bench/examples/discrete_digits.py needs scikit-learn for its digits (pip install scikit-learn)") from e
    img = torch.from_numpy(load_digits().data).float()
    return torch.where(img > 8, 1.0, -1.0)


def run(data=None, *, alpha: float = 1.0, eta: float = 2.0, steps: int = 60, chains: int = 4,
        method: str = "two_stage", metropolis: bool = False, seed: int = 0) -> dict:
    """The noisy chain ``(steps + 1, chains, d)``, its denoised chain (same shape), and for each
    denoised state the index of the training point it equals (-1: none) and the Hamming distance
    to the nearest one."""
    data = load_digits_binary() if data is None else data
    model = BinaryEmpirical(data)
    y0 = fastdiff.binary_flip(model.sample(chains, generator=seed), alpha, generator=fastdiff.Generator(seed))
    traj = fastdiff.discrete_langevin(model, y0, alpha, steps=steps, eta=eta, method=method, metropolis=metropolis,
                                      generator=fastdiff.Generator(seed + 1), return_trajectory=True, progress=False)
    T, B, d = traj.shape
    den = model.denoise(traj.reshape(T * B, d), alpha).reshape(T, B, d)
    dist = (d - den.reshape(T * B, d) @ data.T.to(den.dtype)) / 2          # Hamming distances to every training point
    hmin, idx = dist.min(1)
    idx = torch.where(hmin == 0, idx, torch.full_like(idx, -1))
    return {"noisy": traj, "denoised": den, "nearest": idx.reshape(T, B), "hamming": hmin.reshape(T, B)}


def _ascii(img: torch.Tensor) -> str:
    return "\n".join("".join("#" if v > 0 else "." for v in row) for row in img.reshape(8, 8).tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--eta", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="two_stage", choices=fastdiff.discrete.METHODS)
    p.add_argument("--metropolis", action="store_true")
    p.add_argument("--out", default=None, help="save the two chains as a PNG (needs matplotlib)")
    a = p.parse_args(argv)
    try:
        data = load_digits_binary()
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    r = run(data, alpha=a.alpha, eta=a.eta, steps=a.steps, method=a.method, metropolis=a.metropolis, chains=1)
    frames = list(range(0, a.steps + 1, max(1, a.steps // 8)))
    print(f"{a.method} chain, alpha={a.alpha}, eta={a.eta}: denoised state = training digit at "
          f"{int((r['nearest'][:, 0] >= 0).sum())} of {a.steps + 1} steps")
    if a.out:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(2, len(frames), figsize=(1.2 * len(frames), 2.6))
        for j, t in enumerate(frames):
            for i, key in enumerate(("noisy", "denoised")):
                ax[i, j].imshow(r[key][t, 0].reshape(8, 8), cmap="gray_r", vmin=-1, vmax=1)
                ax[i, j].axis("off")
        ax[0, 0].set_title("noisy", fontsize=7, loc="left")
        ax[1, 0].set_title("denoised", fontsize=7, loc="left")
        fig.savefig(a.out, dpi=150, bbox_inches="tight")
        print(f"written {a.out}")
    else:
        for t in frames:
            print(f"step {t}:\n" + "\n".join(f"{n}   {dn}" for n, dn in zip(_ascii(r["noisy"][t, 0]).split("\n"),
                                                                          _ascii(r["denoised"][t, 0]).split("\n"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
