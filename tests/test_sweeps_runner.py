"""How a sweep runs (fastdiff.sweeps.runner): the Ray executor against the local one, rows that do
not depend on the batching, devices (CPU, CUDA, bad names)."""
import pytest
import torch

import fastdiff
from fastdiff import sweeps
from fastdiff.sweeps.runner import EXPERIMENTS
from sweeps_helpers import run_cli, stored_table


def test_acceptance_ray_executor_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    grid = {"K": "1,2", "learner": "ksubspaces", "d": "1:4", "N": "2:12:2"}
    local = str(tmp_path / "local.sqlite")
    sweeps.run_sweep("subspace-recovery", grid, trials=5, store=local, progress=False).close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = str(tmp_path / "ray.sqlite")
        sweeps.run_sweep("subspace-recovery", grid, trials=5, store=remote, executor="ray", progress=False).close()
    finally:
        ray.shutdown()
    a, b = stored_table(local, "subspace-recovery"), stored_table(remote, "subspace-recovery")
    assert len(a) == len(b) == 2 * 4 * 6 * 5
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "error"} == {k: v for k, v in y.items() if k != "error"}
        # one Ray worker thread vs this process: the same arithmetic; allow the last bits of BLAS
        assert abs(x["error"] - y["error"]) <= 1e-9 * max(1.0, abs(x["error"]))


def _batched_differently(monkeypatch, experiment, factor):
    """Register ``experiment`` with its batch budget scaled by ``factor`` (the GPU path scales it)."""
    import dataclasses

    exp = EXPERIMENTS[experiment]
    monkeypatch.setitem(EXPERIMENTS, experiment, dataclasses.replace(exp, max_cost=exp.max_cost * factor))


def _well_posed(row):
    """Subspace recovery with more points than K d: below that the K-subspaces seeding breaks ties
    between equally explained points (all of them lie in the span), which rounding decides."""
    return row.get("learner") != "ksubspaces" or row["N"] > row["K"] * row["d"]


def _close_tables(a, b, metrics, rtol, atol):
    """Equal tables: every parameter and non-float metric exactly (success included), the float
    ``metrics`` to ``atol + rtol |y|`` on well-posed rows."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in metrics + ("backend",)} == \
               {k: v for k, v in y.items() if k not in metrics + ("backend",)}
        for m in metrics:
            assert not _well_posed(y) or abs(x[m] - y[m]) <= atol + rtol * abs(y[m]), (m, x, y)


@pytest.mark.parametrize("learner", ["pca", "ksubspaces", "sgd", "adam"])
def test_subspace_rows_do_not_depend_on_the_batching(tmp_path, monkeypatch, learner):
    """A cell's rows are the same whichever cells share its batch (a GPU run batches 16x more):
    each cell reads its own Philox windows, sized by its own N rather than the batch's padding."""
    grid = {"n": 12, "K": 2 if learner in ("ksubspaces", "sgd") else 1, "d": "1,3", "N": "2,5,9", "learner": learner,
            "sgd_steps": 30}
    one = str(tmp_path / "one.sqlite")
    _batched_differently(monkeypatch, "subspace-recovery", 1e-6)     # one cell per batch
    sweeps.run_sweep("subspace-recovery", grid, trials=3, store=one, progress=False, workers=1).close()
    _batched_differently(monkeypatch, "subspace-recovery", 1e9)      # every cell of a key in one batch
    many = str(tmp_path / "many.sqlite")
    sweeps.run_sweep("subspace-recovery", grid, trials=3, store=many, progress=False, workers=1).close()
    # the same arithmetic on differently padded batches: the cpp kernels skip padding, the batched
    # torch GEMMs (sgd, adam) may sum in another order; 30 Adam steps keep that rounding ~1e-6, while
    # 30 plain-SGD steps at lr 0.2 (Algorithm 1) grow it to ~1e-4 relative where N_k < d leaves the
    # loss flat along unspanned directions (measured 9e-5 at K = 2, N = 2)
    rtol = 1e-3 if learner == "sgd" else 1e-4
    _close_tables(stored_table(one, "subspace-recovery"), stored_table(many, "subspace-recovery"), ("error",), rtol, 1e-6)


def test_run_sweep_device_errors(tmp_path):
    store = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="device: expected a torch device"):
        sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="gpu0")
    with pytest.raises(ValueError, match="device: expected 'cpu' or a CUDA device"):
        sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2}, trials=1, store=str(store), device="cuda")
    assert not store.exists()          # refused before the store is touched
    r = run_cli("sweep", "subspace-recovery", "--K", "1", "--d", "1", "--N", "2", "--trials", "1", "--device", "gpu0",
             "--store", str(store), "--out", str(tmp_path), "--no-progress", "--no-plot")
    assert r.returncode == 2 and "device: expected a torch device" in r.stderr


def test_run_sweep_on_cpu_device_records_the_backend(tmp_path):
    store = str(tmp_path / "s.sqlite")
    with sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 2, "N": 4, "learner": "pca,sgd,adam", "sgd_steps": 5},
                          trials=2, store=store, progress=False, device="cpu") as st:
        backends = {r["learner"]: r["backend"] for r in st.rows()}
    from fastdiff import backends as B
    assert backends == {"pca": "cpp" if B.has_kernel("cpp", "ksubspaces", "") else "torch", "sgd": "torch",
                        "adam": "torch"}


CUDA_GRIDS = [   # (experiment, grid, trials, metrics, rtol, atol)
    ("subspace-recovery", {"n": 24, "K": 1, "d": "1,4", "N": "2,6,12", "learner": "pca"}, 4, ("error",), 1e-3, 1e-5),
    ("subspace-recovery", {"n": 24, "K": 2, "d": "1,4", "N": "4,12,24", "learner": "ksubspaces"}, 4, ("error",),
     1e-3, 1e-5),
    # 300 Adam steps amplify rounding: the errors agree to the SGD noise floor (~0.01), success exactly
    ("subspace-recovery", {"n": 24, "K": 1, "d": "1,4", "N": "6,12", "learner": "adam"}, 4, ("error",), 0.0, 5e-3),
    # Algorithm 1 (4000 plain SGD steps, contractive for K = 1 at N >= d + 2): the same tolerance
    ("subspace-recovery", {"n": 24, "K": 1, "d": "1,4", "N": "6,12", "learner": "sgd"}, 4, ("error",), 0.0, 5e-3),
    ("jacobian-rank", {"n": 16, "K": 2, "d": 3, "level": "0,9,17", "samples": 8}, 2, ("ratio",), 0.0, 0.07),
    ("memorization", {"n": 16, "d": 2, "N": "2,32", "samples": 64, "T": 200}, 2, ("memorized", "generalization"),
     0.0, 0.05),
    ("linear-diffusion", {"n": 8, "N": "8,64", "T": 200, "mc_samples": 512}, 2, ("kl_mc", "kl_mc_se"), 1e-3, 1e-4),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("experiment,grid,trials,metrics,rtol,atol", CUDA_GRIDS)
def test_sweep_on_cuda_matches_cpu(tmp_path, experiment, grid, trials, metrics, rtol, atol):
    """device='cuda': the same instances (drawn on the CPU), the same Philox noise (Triton draws the
    CPU's stream), so the table equals the CPU's up to float rounding."""
    cpu, gpu = str(tmp_path / "cpu.sqlite"), str(tmp_path / "gpu.sqlite")
    sweeps.run_sweep(experiment, grid, trials=trials, store=cpu, progress=False).close()
    sweeps.run_sweep(experiment, grid, trials=trials, store=gpu, progress=False, device="cuda").close()
    a, b = stored_table(gpu, experiment), stored_table(cpu, experiment)
    assert all(r["backend"].endswith("on cuda") for r in a)
    _close_tables(a, b, metrics, rtol, atol)


class _SlowEvictDict(dict):
    """The packed-bases cache with a wider window between picking the oldest key and evicting it,
    as a busy worker thread would have: an unlocked check-then-pop raises KeyError in the second."""

    def pop(self, *args):
        import time

        time.sleep(2e-4)
        return super().pop(*args)


class _SharedDenoiser:
    """One MoLRG denoiser shared by every batch: each call passes a fresh view of its bases (as a
    sampler indexing per-instance bases does), so every call is a new cache key and evicts one."""

    def __init__(self, K=3, n=8, d=2, count=20):
        g = torch.Generator().manual_seed(5)
        self.U = torch.linalg.qr(torch.randn(count, K, n, d, generator=g, dtype=torch.float64))[0]
        self.U32 = self.U.float()

    def __call__(self, x, i):
        return fastdiff.molrg_denoise(x, list(self.U32[i].unbind(0)), 0.9, 0.4, backend="torch")


def test_thread_workers_share_a_denoiser(tmp_path, monkeypatch):
    """issue 16: the memorization sweep's thread workers, sharing a denoiser, raced on the
    packed-bases cache (KeyError from a double eviction).  Here the runner's own thread executor
    runs 24 batches on 4 workers through one shared denoiser; every result is checked against the
    float64 reference (a stale or crossed cache entry would be a wrong result, not an error)."""
    from fastdiff.denoisers import _cache
    from fastdiff.reference import denoisers as R
    from fastdiff.sweeps.runner import Experiment, Param

    den = _SharedDenoiser()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    refs = [R.molrg_denoise(x.double(), list(den.U[i].unbind(0)), 0.9, 0.4) for i in range(den.U.shape[0])]

    def run_batch(cells, seeds, trials, device):
        rows = []
        for ci, c in enumerate(cells):
            err = 0.0
            for r in range(40):
                i = (7 * c["i"] + r) % len(refs)
                err = max(err, float((den(x, i).double() - refs[i]).abs().max()))
            rows += [{"cell_index": ci, "trial": t, "err": err} for t in range(trials)]
        return rows, "torch"

    exp = Experiment(name="shared-denoiser", params=(Param("i", int, (0,)),), metrics=(("err", float),),
                     run_batch=run_batch, check=lambda c: None, batch_key=lambda c: (c["i"],))
    monkeypatch.setitem(EXPERIMENTS, exp.name, exp)
    monkeypatch.setattr(_cache, "_PACK_CACHE", _SlowEvictDict())
    with sweeps.run_sweep(exp.name, {"i": "0:23"}, trials=1, store=str(tmp_path / "s.sqlite"), progress=False,
                          workers=4) as st:
        rows = st.rows()
    assert len(rows) == 24
    # float32 MoLRG against float64: a few ulps of |x| ~ 1 (a crossed entry would be O(1))
    assert max(r["err"] for r in rows) < 1e-5, rows
    assert len(_cache._PACK_CACHE) <= 16
