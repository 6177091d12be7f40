"""fastdiff.sample(..., "ou_reverse"): the reverse Ornstein-Uhlenbeck SDE (seed 003) as table rows.
The rows against the step function they fold (ou_reverse_step), the sampled variance against the
exact Gaussian law of the recursion, Euler-Maruyama's first order against the data law, bad input."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import gaussian_exact as G
from fastdiff.denoisers import Gaussian
from fastdiff.sampling import trajectory_table

LAM = torch.tensor([4.0, 1.0, 0.25, 0.01], dtype=torch.float64)


def test_rows_are_the_ou_reverse_step():
    den = Gaussian(torch.zeros(4, dtype=torch.float64), torch.diag(LAM))
    x0 = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    times = [2.0, 1.2, 0.7, 0.3, 0.0]
    noise = torch.randn(4, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x0.clone()
    for k, (t, tn) in enumerate(zip(times, times[1:])):
        a, s = np.exp(-t), np.sqrt(1 - np.exp(-2 * t))
        y = fastdiff.ou_reverse_step(y, den(y, a, s), t - tn, prediction="x0", alpha=a, sigma=s, noise=noise[k])
    rows = trajectory_table(times, "ou_reverse")
    assert len(rows) == 4
    np.testing.assert_allclose([r.level for r in rows], [(np.exp(-t), np.sqrt(1 - np.exp(-2 * t))) for t in times[:-1]],
                               rtol=1e-14)
    z = x0.clone()
    for k, r in enumerate(rows):
        z = r.cx * z + r.cm * den(z, *r.level) + r.cz * noise[k]
    torch.testing.assert_close(z, y, rtol=1e-12, atol=1e-12)


def test_sampled_variance_is_the_exact_law_of_the_recursion():
    den = Gaussian(torch.zeros(4, dtype=torch.float64), torch.diag(LAM))
    # the law of the recursion is exact at any step count: 50 steps test what 200 would, in a quarter
    # of the time (the sampler's per-step cost dominates here, not M)
    steps = 50
    table = trajectory_table(5.0, "ou_reverse", steps=steps)
    m, v = G.gaussian_sampler_law(LAM, table)
    M = 40000
    x = fastdiff.sample(den, (M, 4), 5.0, "ou_reverse", steps=steps, dtype=torch.float64,
                        generator=fastdiff.Generator(3), progress=False)
    se = v * np.sqrt(2.0 / M)
    assert ((x.var(0) - v).abs() < 5 * se).all(), (x.var(0), v)
    assert (x.mean(0).abs() < 5 * (v / M).sqrt()).all()


def test_first_order_convergence_to_the_data():
    """W2 of the exact law to N(0, diag(LAM)) falls as 1 / steps (Euler-Maruyama, weak order 1)."""
    Ns = [800, 1600, 3200]
    err = [float(G.w2(*G.gaussian_sampler_law(LAM, trajectory_table(8.0, "ou_reverse", steps=n)),
                      torch.zeros(4, dtype=torch.float64), LAM)) for n in Ns]
    slope = -np.polyfit(np.log(Ns), np.log(err), 1)[0]
    assert abs(slope - 1) < 0.15, (err, slope)


@pytest.mark.parametrize("schedule,kw,match", [
    (0.0, {}, "schedule: expected finite times decreasing strictly"),
    ([1.0, 1.0, 0.0], {}, "schedule: expected finite times decreasing strictly"),
    ([1.0, 0.5, -0.1], {}, "schedule: expected finite times decreasing strictly"),
    ([1.0, 0.5, 0.0], {"steps": 5}, r"steps: expected None or len\(schedule\) - 1 = 2"),
    (2.0, {"steps": 0}, "steps: expected a positive int"),
])
def test_bad_schedules(schedule, kw, match):
    with pytest.raises(ValueError, match=match):
        trajectory_table(schedule, "ou_reverse", **kw)
