"""The C++ empirical scan (csrc/empirical.cpp) where its blocking matters, beyond the contract test
(tests/test_empirical_scan.py, whose float64 reference, inputs and checks this reuses): several
data tiles of 256 rows with a ragged last one, several query blocks and a ragged register tile,
both OpenMP threads (each a range of tiles, merged per query), kc = N, float64, uint8, NaN rows,
and the kernel's own argument errors.  Tolerances: those of the contract test (see its docstring)."""
import math

import pytest
import torch

from fastdiff import dispatch
from fastdiff.ops.empirical import empirical_scan
from test_empirical_scan import _check, _inputs, _reference

pytestmark = pytest.mark.skipif(not dispatch.exists("empirical", "cpp"), reason="fastdiff._C not built")


def _threads(k):
    """Context: torch.get_num_threads() == k inside (the launcher passes it to the kernel)."""
    class _T:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(k)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _T()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(70, 5000, 200), (13, 1037, 17), (1, 600, 1)], ids=["70x5000x200", "13x1037x17", "1x600x1"])
def test_cpp_blocked_sizes_match_float64_and_torch(dtype, shape):
    """B = 70: 7 query blocks of 60 / 30 and a ragged register tile; N = 5000: 20 tiles, the last of
    136 rows (not a multiple of the 16-row panels); n = 200: not a multiple of 16 (padded columns)."""
    B, N, n = shape
    xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, B + N + n)
    ref = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, 6)
    out = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=6)
    _check(out, ref, dtype, 6, True, True, scale=3.0)
    tor = empirical_scan("torch", xh, data, center, g1, g2, h, kc=6)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out[0] + out[1].log(), tor[0] + tor[1].log(), rtol=0, atol=tol * (1 + tor[0].abs().max().item()))
    torch.testing.assert_close(out[2] / out[1][:, None], tor[2] / tor[1][:, None], rtol=0, atol=tol * 3.0)
    assert torch.equal(out[4].sort(1).values, tor[4].sort(1).values)   # random data: no ties among the top 6


def test_cpp_kc_equals_n_keeps_every_row():
    B, N, n = 7, 700, 33   # 3 tiles, both threads
    for dtype in (torch.float32, torch.float64):
        xh, data, center, g1, g2, h = _inputs(B, N, n, dtype, 21)
        ref = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, N)
        for soft in (True, False):
            out = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=N, soft=soft, want_acc=soft)
            _check(out, ref, dtype, N, soft, soft, scale=3.0)
            assert torch.equal(out[4].sort(1).values, torch.arange(N).expand(B, N))
            assert bool((out[3][:, :-1] >= out[3][:, 1:]).all())           # returned best first


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_cpp_one_thread_and_two_agree(uint8):
    """Two threads split the tiles and merge (m, l, acc, candidates): the same candidates as one
    thread, and the softmax to rounding (the sums run in another order)."""
    B, N, n = 40, 3000, 48
    xh, data, center, g1, g2, h = _inputs(B, N, n, torch.float32, 8, uint8=uint8)
    with _threads(1):
        one = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=6)
    with _threads(2):
        two = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=6)
    assert torch.equal(one[4], two[4]) and torch.equal(one[3], two[3])   # V does not depend on the split
    assert torch.equal(one[5], two[5])
    torch.testing.assert_close(two[0] + two[1].log(), one[0] + one[1].log(), rtol=0, atol=1e-4)
    torch.testing.assert_close(two[2] / two[1][:, None], one[2] / one[1][:, None], rtol=0, atol=1e-5)
    ref = _reference(xh, data, center, g1, g2, h, -1.0, 1.0, 6)
    _check(two, ref, torch.float32, 6, True, True, scale=3.0 if not uint8 else 1.0)


def test_cpp_nan_rows_across_tiles_and_threads():
    """A NaN query: that query's m, l and acc are all NaN (the max is NaN-sticky); a NaN training row
    in the last tile (the second thread's range): every query's."""
    B, N, n = 9, 2000, 40
    xh, data, center, g1, g2, h = _inputs(B, N, n, torch.float32, 4)
    xh[4, 7] = math.nan
    with _threads(2):
        m, l, acc, bv, bi, _ = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=3)
        nan = torch.isnan(m) & torch.isnan(l) & torch.isnan(acc).all(1)
        assert nan.tolist() == [b == 4 for b in range(B)]
        assert bool((bi >= 0).all()) and bool((bi < N).all())                # even the NaN query's
        data[1990, 3] = math.nan
        m, l, acc, *_ = empirical_scan("cpp", xh, data, center, g1, g2, h, kc=3)
        assert bool((torch.isnan(m) & torch.isnan(l) & torch.isnan(acc).all(1)).all())


def test_cpp_kernel_rejects_bad_arguments():
    from fastdiff.kernels import cpp

    xh, data, center, g1, g2, h = _inputs(3, 10, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="kc = 11 outside"):
        cpp.empirical_scan(xh, data, center, g1, g2, h, -1.0, 1.0, True, True, 11, None)
    out = cpp.empirical_scan(xh[:0], data, center, g1[:0], g2[:0], h[:0], -1.0, 1.0, True, True, 2, None)
    assert [t.shape for t in out[:5]] == [(0,), (0,), (0, 4), (0, 2), (0, 2)]   # an empty batch
    from fastdiff import _C
    with pytest.raises(ValueError, match="dtype must be 0"):
        _C.empirical_scan(xh.data_ptr(), data.data_ptr(), center.data_ptr(), g1.data_ptr(), g2.data_ptr(),
                          h.data_ptr(), 2, False, 3, 10, 4, -1.0, 1.0, True, False, 0, xh.data_ptr(),
                          xh.data_ptr(), 0, 0, 0, xh.data_ptr(), 0, 0, 1)
    with pytest.raises(ValueError, match="need B >= 0 and N, n >= 1"):
        _C.empirical_scan(xh.data_ptr(), data.data_ptr(), center.data_ptr(), g1.data_ptr(), g2.data_ptr(),
                          h.data_ptr(), 0, False, 3, 0, 4, -1.0, 1.0, True, False, 0, xh.data_ptr(),
                          xh.data_ptr(), 0, 0, 0, xh.data_ptr(), 0, 0, 1)
    for cols, msg in (([4], r"cols\[0\] = 4 outside \[0, n = 4\)"), ([0, -1], r"cols\[1\] = -1 outside"),
                      ([], "need ncol >= 1")):
        c = torch.tensor(cols + [0], dtype=torch.int64)         # a valid pointer even for "no columns"
        with pytest.raises(ValueError, match=msg):
            _C.empirical_scan(xh.data_ptr(), data.data_ptr(), center.data_ptr(), g1.data_ptr(), g2.data_ptr(),
                              h.data_ptr(), 0, False, 3, 10, 4, -1.0, 1.0, True, True, 0, xh.data_ptr(),
                              xh.data_ptr(), torch.empty(3, 4).data_ptr(), 0, 0, xh.data_ptr(), c.data_ptr(),
                              len(cols), 1)
