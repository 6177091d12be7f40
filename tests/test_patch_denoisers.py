"""The local and equivariant local patch denoisers against a pixel-by-pixel float64 reference
(explicit window indexing, not unfold) for every mode and boundary, odd and size-1 shapes, float32,
per-sample levels, uint8 sets; the exact identities (circular, P = image size: local = global,
equivariant = global over all cyclic shifts); patch schedules, sampling through fastdiff.sample,
and bad input."""
import pytest
import torch

import fastdiff
from fastdiff import data as D
from fastdiff.denoisers.patch import PatchDenoiser, patch_denoise
from fastdiff.reference import denoisers as R


def _case(seed, B, N, C, H, W):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
            torch.randn(N, C, H, W, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["local", "equivariant"])
@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("shape,P,chunk", [((2, 3, 2, 4, 5), 3, 2), ((1, 1, 1, 1, 1), 1, None),
                                           ((3, 2, 1, 3, 3), 5, 1), ((1, 4, 3, 2, 7), 3, None)])
def test_against_the_pixel_by_pixel_reference(mode, boundary, shape, P, chunk):
    B, N, C, H, W = shape
    x, Y = _case(sum(shape) + P, B, N, C, H, W)
    got = patch_denoise(x, Y, 0.8, 0.7, patch=P, mode=mode, boundary=boundary, chunk=chunk)
    want = R.patch_denoise(x, Y, 0.8, 0.7, patch=P, mode=mode, boundary=boundary)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_per_sample_levels_flat_input_and_outputs():
    x, Y = _case(5, 3, 6, 2, 5, 4)
    a, s = torch.tensor([0.9, 0.5, 0.7]), torch.tensor([0.3, 1.2, 0.6])
    want = torch.stack([R.patch_denoise(x[b:b + 1], Y, float(a[b]), float(s[b]), patch=3, mode="equivariant")[0]
                        for b in range(3)])
    got = patch_denoise(x.float().reshape(3, -1), Y.float(), a, s, patch=3, mode="equivariant")
    assert got.shape == (3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().reshape(want.shape), want, rtol=2e-5, atol=2e-5)
    eps = patch_denoise(x, Y, a.double(), s.double(), patch=3, output="eps")
    x0 = patch_denoise(x, Y, a.double(), s.double(), patch=3)
    torch.testing.assert_close(eps, (x - a.double()[:, None, None, None] * x0) / s.double()[:, None, None, None])
    score = patch_denoise(x, Y, a.double(), s.double(), patch=3, output="score")
    torch.testing.assert_close(score, -eps / s.double()[:, None, None, None])


def test_uint8_image_sets():
    s = D.synthetic(9, (3, 5, 5), seed=3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for mode in ("local", "equivariant"):
        torch.testing.assert_close(patch_denoise(x, s, 0.8, 0.5, patch=3, mode=mode, chunk=4),
                                   patch_denoise(x, s.float(dtype=torch.float64), 0.8, 0.5, patch=3, mode=mode),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H", [3, 5])
def test_circular_whole_image_patch_local_is_the_global_denoiser(H):
    """Each circular H x H patch (H odd) holds every pixel once, so each pixel's weights are the
    global softmax: the local machine is the empirical denoiser exactly (to rounding)."""
    x, Y = _case(H, 4, 7, 2, H, H)
    got = patch_denoise(x, Y, 0.9, 0.8, patch=H, boundary="circular")
    want = fastdiff.empirical_denoise(x.reshape(4, -1), Y.reshape(7, -1), 0.9, 0.8).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # zero boundary: a patch of side 2H - 1 covers the whole image from any pixel
    torch.testing.assert_close(patch_denoise(x, Y, 0.9, 0.8, patch=2 * H - 1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H", [3, 5])
def test_circular_whole_image_patch_equivariant_is_global_over_all_shifts(H):
    """With circular H x H patches every training patch is a cyclic shift of a training image and its
    centre pixel that shift's value at p: the equivariant machine is the empirical denoiser of the
    N H^2 shifted images."""
    x, Y = _case(10 + H, 2, 3, 2, H, H)
    shifts = torch.stack([torch.roll(Y, (u, v), dims=(2, 3)) for u in range(H) for v in range(H)], 1)
    want = fastdiff.empirical_denoise(x.reshape(2, -1), shifts.reshape(3 * H * H, -1), 0.7, 0.9).reshape(x.shape)
    got = patch_denoise(x, Y, 0.7, 0.9, patch=H, mode="equivariant", boundary="circular")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_patch_schedule_and_sampling():
    s = D.synthetic(20, (1, 6, 6), classes=2, seed=1)
    den = PatchDenoiser(s, lambda sigma: 5 if sigma > 1.0 else 3, mode="equivariant")
    x = torch.randn(2, 36)
    assert den.patch_at(2.0) == 5 and den.patch_at(torch.tensor([0.5, 0.5])) == 3
    torch.testing.assert_close(den(x, 1.0, 2.0), patch_denoise(x, s, 1.0, 2.0, patch=5, mode="equivariant"))
    with pytest.raises(ValueError, match="one noise level for the batch"):
        den(x, 1.0, torch.tensor([0.5, 2.0]))
    out = fastdiff.sample(PatchDenoiser(s, 3), (4, 36), fastdiff.KarrasSchedule(8, sigma_max=20.0), "euler",
                          generator=fastdiff.Generator(0), progress=False)
    assert out.shape == (4, 36) and torch.isfinite(out).all()
    local = PatchDenoiser(s.with_label(1), 3)   # a label-conditional model: the class's subset
    assert repr(local).startswith("PatchDenoiser(N=")


@pytest.mark.parametrize("kw,match", [
    (dict(patch=2), "patch: expected an odd int >= 1"),
    (dict(patch=0), "patch: expected an odd int >= 1"),
    (dict(patch=3, mode="global"), "mode: expected one of"),
    (dict(patch=3, boundary="reflect"), "boundary: expected one of"),
    (dict(patch=3, output="v"), "output: expected one of"),
    (dict(patch=11, boundary="circular"), "a circular boundary wraps at most once"),
    (dict(patch=3, chunk=0), "chunk: expected a positive int"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        patch_denoise(torch.randn(2, 1, 4, 4), torch.randn(3, 1, 4, 4), 1.0, 0.5, **kw)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 4, 4\) or \(B, 16\)"):
        patch_denoise(torch.randn(2, 15), torch.randn(3, 1, 4, 4), 1.0, 0.5, patch=3)
    with pytest.raises(ValueError, match=r"data: expected an \(N, C, H, W\) tensor"):
        patch_denoise(torch.randn(2, 16), torch.randn(3, 16), 1.0, 0.5, patch=3)
    with pytest.raises(ValueError, match="sigma"):
        patch_denoise(torch.randn(2, 16), torch.randn(3, 1, 4, 4), 1.0, -0.5, patch=3)
    with pytest.raises(ValueError, match="patch: expected an odd int >= 1 or a callable"):
        PatchDenoiser(torch.randn(3, 1, 4, 4), 4)
