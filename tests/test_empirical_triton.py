"""The Triton empirical scan's own paths (kernels/empirical.py), beyond the contract test
(tests/test_empirical_scan.py, which runs every backend of the row on the default plan):

* acc in the output buffer (the large-n path), forced on small shapes by lowering ACC_REGISTER_MAX
  and ACC_CHUNK (as tests/test_svd_triton.py forces the SVD's streamed kernel): ragged chunks, a
  single chunk, float32 and uint8 data;
* the split of N over programs and its merge, forced to several counts, with splits that hold
  fewer rows than kc (empty candidate slots that the merge must rank below every real row);
* the candidate set at its limit (kc = 64 = MAX_KC, kc = N), ties (repeated rows), NaN rows;
* the kc limit: the row's fits, a forced backend's refusal, auto's fallback.

Against the same float64 dense formula as the contract test, with its tolerances (1e-4 on the
log-sum-exp and the softmax mean; float32 scores of O(10) values).
"""
import math

import pytest
import torch

from conftest import HAS_CUDA
from fastdiff import dispatch
from fastdiff.ops import empirical as op
from test_empirical_scan import _check, _inputs, _reference

triton = pytest.importorskip("triton")
if not dispatch.exists("empirical", "triton"):
    pytest.skip("no Triton empirical kernel here", allow_module_level=True)

from fastdiff.kernels import empirical as E  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _run(B, N, n, kc, seed, *, soft=True, want_acc=True, uint8=False, splits=None, lo=-1.0, hi=1.0, data=None):
    xh, d, center, g1, g2, h = _inputs(B, N, n, torch.float32, seed, uint8=uint8)
    data = d if data is None else data
    ref = _reference(xh, data, center, g1, g2, h, lo, hi, kc)
    out = E.empirical_scan(*(t.to(DEVICE) for t in (xh, data, center, g1, g2, h)), lo, hi, soft, want_acc, kc,
                           None, splits=splits)
    out = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in out)
    _check(out, ref, torch.float32, kc, soft, want_acc, scale=1.0 if uint8 else 3.0)
    return out


def test_the_row_declares_the_kernels_candidate_limit():
    assert op.TRITON_MAX_KC == E.MAX_KC
    impl = next(i for i in dispatch.OPS["empirical"].impls if i.backend == "triton")
    assert impl.fits(kc=E.MAX_KC) == (True, "")
    ok, why = impl.fits(kc=E.MAX_KC + 1)
    assert not ok and f"at most {E.MAX_KC}" in why
    assert str(E.MAX_KC) in impl.limit


STREAMED = [(3, 40, 37, 5), (17, 50, 130, 8), (1, 1, 1, 1), (20, 33, 16, 0), (5, 70, 64, 64)]


@pytest.mark.parametrize("shape", STREAMED, ids=[f"{b}x{N}x{n}-kc{k}" for b, N, n, k in STREAMED])
def test_accumulator_in_the_output_buffer(shape, monkeypatch):
    """ACC_REGISTER_MAX = 0 sends every n through the read-scale-add-write path; 16-column chunks cross
    ragged chunk ends (n = 37, 130) or fit once (n = 1, 16); two splits, so two programs a row block."""
    monkeypatch.setattr(E, "ACC_REGISTER_MAX", 0)
    monkeypatch.setattr(E, "ACC_CHUNK", 16)
    B, N, n, kc = shape
    p = E.plan(B, N, n, kc, torch.device(DEVICE), splits=2)
    assert not p["ACC_IN_REGISTERS"] and p["BLOCK_D"] == 16
    _run(B, N, n, kc, 40 + n, splits=2)


def test_accumulator_in_the_output_buffer_reads_uint8(monkeypatch):
    monkeypatch.setattr(E, "ACC_REGISTER_MAX", 0)
    monkeypatch.setattr(E, "ACC_CHUNK", 16)
    _run(6, 45, 27, 5, 7, uint8=True)
    _run(6, 45, 27, 0, 8, uint8=True, lo=0.0, hi=1.0)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 100])
def test_splits_merge_to_the_one_pass_answer(splits):
    """N = 100 rows in 7 tiles: 1, 2, 3 and 7 splits (100: clamped to 7, one tile each, fewer rows
    than kc = 20 in every split: the merge must take real rows before empty slots)."""
    B, N, n, kc = 19, 100, 24, 20
    p = E.plan(B, N, n, kc, torch.device(DEVICE), splits=splits)
    assert p["splits"] == min(splits, 7)
    _run(B, N, n, kc, 3, splits=splits)


def test_default_plan_splits_within_the_datas_size():
    """Automatic splits: enough programs for the device, each split >= MIN_TILES tiles, splits x B <= N."""
    dev = torch.device("cpu")
    assert E.plan(4, 16 * 40, 8, 0, dev)["splits"] == min(E.INTERPRETER_SMS * E.PROGRAMS_PER_SM, 10)
    assert E.plan(64, 100, 8, 0, dev)["splits"] == 1          # N // B = 1
    big = E.plan(256, 50000, 3072, 6, dev)
    assert big["splits"] * 256 <= 50000 and big["tiles_per_split"] >= E.MIN_TILES
    assert not big["ACC_IN_REGISTERS"] and E.plan(256, 50000, 192, 6, dev)["ACC_IN_REGISTERS"]


@pytest.mark.parametrize("kc", [1, 2, 63, 64])
def test_candidates_up_to_the_limit(kc):
    """kc from 1 to MAX_KC (KC_PAD 1 .. 64); N = 64 with kc = 64 keeps every row."""
    B, N, n = 9, 64, 11
    best_i = _run(B, N, n, kc, 70 + kc, splits=3)[4]
    if kc == N:
        assert torch.equal(best_i.sort(1).values, torch.arange(N).expand(B, N))


def test_candidates_with_repeated_rows():
    """Every row twice: ties in every score; the set must hold distinct rows with their own scores."""
    g = torch.Generator().manual_seed(4)
    half = torch.randn(30, 12, generator=g)
    data = torch.cat([half, half])
    _run(7, 60, 12, 9, 5, data=data, splits=2)


def test_candidates_only_and_softmax_only():
    _run(13, 90, 20, 6, 9, soft=False, want_acc=False, splits=2)
    _run(13, 90, 20, 0, 10, soft=True, want_acc=False)


def test_nan_training_row_is_no_candidate_and_poisons_the_softmax(monkeypatch):
    """A NaN training row ranks below every real row (N > kc: it is never kept) and makes every
    query's l / acc NaN; on the buffer path too."""
    B, N, n, kc = 5, 40, 6, 4
    xh, data, center, g1, g2, h = _inputs(B, N, n, torch.float32, 21)
    data[17, 2] = math.nan
    for register_max in (E.ACC_REGISTER_MAX, 0):
        monkeypatch.setattr(E, "ACC_REGISTER_MAX", register_max)
        m, l, acc, best_v, best_i, ymax2 = (t.cpu() for t in E.empirical_scan(
            *(t.to(DEVICE) for t in (xh, data, center, g1, g2, h)), -1.0, 1.0, True, True, kc, None, splits=2))
        assert bool((torch.isnan(l) | torch.isnan(acc).any(1)).all())
        assert not bool((best_i == 17).any()) and bool(torch.isfinite(best_v).all())
        assert math.isnan(ymax2.item())


def test_limits_refused_clearly(monkeypatch):
    xh, data, center, g1, g2, h = (t.to(DEVICE) for t in _inputs(3, 80, 5, torch.float32, 1))
    with pytest.raises(ValueError, match=f"at most {E.MAX_KC} candidates"):
        E.empirical_scan(xh, data, center, g1, g2, h, -1.0, 1.0, True, True, E.MAX_KC + 1, None)
    with pytest.raises(TypeError, match="xh: .*float32"):
        E.empirical_scan(xh.double(), data, center, g1, g2, h, -1.0, 1.0, True, True, 2, None)
    with pytest.raises(TypeError, match="data: expected float32 or uint8"):
        E.empirical_scan(xh, data.double(), center, g1, g2, h, -1.0, 1.0, True, True, 2, None)
    with pytest.raises(ValueError, match="g1"):
        E.empirical_scan(xh, data, center, g1[:2], g2, h, -1.0, 1.0, True, True, 2, None)
    with pytest.raises(ValueError, match="tune"):
        E.empirical_scan(xh, data, center, g1, g2, h, -1.0, 1.0, True, True, 2, None, tune={"KC_PAD": 4})
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 16"):
        E.empirical_scan(xh, data, center, g1, g2, h, -1.0, 1.0, True, True, 2, None, tune={"BLOCK_N": 8})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="xh: expected a CUDA tensor"):
        E.empirical_scan(*(t.cpu() for t in (xh, data, center, g1, g2, h)), -1.0, 1.0, True, True, 2, None)


def test_dispatch_refuses_a_forced_triton_and_auto_falls_back():
    """k = 32 neighbours: kc = 66 > 64.  Forced triton: a ValueError naming the limit; auto on CUDA
    (the table's decision, no GPU needed to ask it): torch; within the limit: triton."""
    from fastdiff.denoisers import empirical_posterior

    cuda = torch.device("cuda")
    assert dispatch.choose("empirical", "auto", cuda, torch.float32, kc=66) == "torch"
    assert dispatch.choose("empirical", "auto", cuda, torch.float32, kc=64) == "triton"
    with pytest.raises(ValueError, match="at most 64 candidates"):
        dispatch.choose("empirical", "triton", torch.device(DEVICE), torch.float32, kc=66)
    g = torch.Generator().manual_seed(2)
    x, Y = torch.randn(3, 8, generator=g), torch.randn(200, 8, generator=g)
    with pytest.raises(ValueError, match="at most 64 candidates"):
        empirical_posterior(x.to(DEVICE), Y.to(DEVICE), 1.0, 0.5, outputs=("neighbors",), k=32, backend="triton")
    got = empirical_posterior(x.to(DEVICE), Y.to(DEVICE), 1.0, 0.5, outputs=("x0", "neighbors"), k=31, backend="triton")
    ref = empirical_posterior(x.double(), Y.double(), 1.0, 0.5, outputs=("x0", "neighbors"), k=31, backend="torch")
    assert torch.equal(got.indices.cpu(), ref.indices)
    torch.testing.assert_close(got.x0.cpu().double(), ref.x0, rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs ~2.2 GB of GPU memory and a real GPU's speed")
def test_offsets_past_2_pow_31():
    """uint8 data with N n > 2^31: the last rows (byte offsets past int32) are found and weighed."""
    n = 3072
    N = (1 << 31) // n + 4096
    data = torch.randint(0, 256, (N, n), dtype=torch.uint8, device="cuda")
    rows = torch.tensor([0, N // 2, N - 1], device="cuda")
    center = torch.zeros(n, device="cuda")
    xh = data[rows].float() * (2 / 255) - 1                       # queries at three training rows
    ones = torch.ones(3, device="cuda")
    m, l, acc, best_v, best_i, _ = E.empirical_scan(xh, data, center, ones * 0.5, ones * 0.25, ones * 0.0,
                                                    -1.0, 1.0, True, True, 2, None)
    assert torch.equal(best_i[torch.arange(3, device="cuda"), best_v.argmax(1)], rows)
    # g1 = 2 g2: the logits are -(1/4)||x - y||^2 + ...: the own row dominates (distances ~ n / 3 apart)
    torch.testing.assert_close(acc / l[:, None], xh, rtol=0, atol=1e-4)
