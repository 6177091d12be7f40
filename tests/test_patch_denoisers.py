"""The local and equivariant local patch denoisers against a pixel-by-pixel float64 reference
(explicit window indexing, not unfold) and a dense float64 ``unfold`` reference (every logit at once)
for every mode and boundary (zero, circular, boundary-broken), odd and size-1 shapes, random shapes,
N = 1, float32, per-sample levels, uint8 sets, NaN propagation; the exact identities (circular,
P = image size: local = global, equivariant = global over all cyclic shifts); label-conditional
subsets, patch schedules, sampling through fastdiff.sample, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import data as D
from fastdiff import dispatch
from fastdiff.denoisers.patch import PatchDenoiser, patch_denoise
from fastdiff.reference import denoisers as R


def _case(seed, B, N, C, H, W):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
            torch.randn(N, C, H, W, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["local", "equivariant"])
@pytest.mark.parametrize("boundary", ["zero", "circular", "broken"])
@pytest.mark.parametrize("shape,P,chunk", [((2, 3, 2, 4, 5), 3, 2), ((1, 1, 1, 1, 1), 1, None),
                                           ((3, 2, 1, 3, 3), 5, 1), ((1, 4, 3, 2, 7), 3, None),
                                           ((2, 2, 1, 7, 6), 5, None), ((1, 1, 2, 5, 9), 3, None)])
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
    (dict(patch=5, mode="pspc"), "pspc mode averages P x P crops inside the image"),
    (dict(patch=3, mode="pspc", boundary="circular"), "pspc mode averages"),
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


def _dense_unfold(x, Y, alpha, sigma, P, mode, boundary):
    """Every logit at once in float64: unfold all patches, (B, L, N, L) squared distances, a mask of
    the (p, q) pairs allowed (local: q = p; broken: same in-image mask of the window; else all)."""
    B, C, H, W = x.shape
    N, L, r = Y.shape[0], H * W, P // 2
    pad = (lambda z: F.pad(z, (r,) * 4, mode="circular")) if boundary == "circular" else (lambda z: F.pad(z, (r,) * 4))
    Xp, Yp = F.unfold(pad(x), P).transpose(1, 2), F.unfold(pad(Y), P).transpose(1, 2)        # (B, L, D), (N, L, D)
    d2 = ((Xp[:, :, None, None, :] - alpha * Yp[None, None]) ** 2).sum(-1)                      # (B, L, N, L)
    inside = F.unfold(F.pad(torch.ones(1, 1, H, W, dtype=x.dtype), (r,) * 4), P)[0].T            # (L, P P)
    if mode == "local":
        allowed = torch.eye(L, dtype=torch.bool)
    elif boundary == "broken":
        allowed = (inside[:, None, :] == inside[None, :, :]).all(-1)
    else:
        allowed = torch.ones(L, L, dtype=torch.bool)
    logits = (-d2 / (2 * sigma**2)).masked_fill(~allowed[None, :, None, :], -math.inf).reshape(B, L, N * L)
    w = torch.softmax(logits, -1)
    centres = Y.flatten(2).transpose(1, 2).reshape(N * L, C)
    return (w @ centres).transpose(1, 2).reshape(B, C, H, W)


def test_dense_reference_agrees_with_the_pixel_reference():
    x, Y = _case(7, 2, 3, 2, 4, 5)
    for mode in ("local", "equivariant"):
        for boundary in ("zero", "circular", "broken"):
            torch.testing.assert_close(_dense_unfold(x, Y, 0.8, 0.6, 3, mode, boundary),
                                       R.patch_denoise(x, Y, 0.8, 0.6, patch=3, mode=mode, boundary=boundary),
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_against_the_unfold_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, N, C = (int(v) for v in torch.randint(1, 4, (3,), generator=g))
    H, W = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
    P = int(torch.randint(0, 4, (1,), generator=g)) * 2 + 1
    mode = ("local", "equivariant")[seed % 2]
    boundary = ("zero", "circular", "broken")[seed % 3]
    if boundary == "circular" and P // 2 > min(H, W):
        P = 2 * min(H, W) + 1
    alpha, sigma = 0.5 + float(torch.rand(1, generator=g)), 0.3 + float(torch.rand(1, generator=g))
    x, Y = _case(seed, B, N, C, H, W)
    chunk = int(torch.randint(1, N + 1, (1,), generator=g)) if seed % 4 else None
    got = patch_denoise(x, Y, alpha, sigma, patch=P, mode=mode, boundary=boundary, chunk=chunk)
    torch.testing.assert_close(got, _dense_unfold(x, Y, alpha, sigma, P, mode, boundary), rtol=1e-11, atol=1e-11)
    # float32 against the float64 result: logits of size ~D / sigma^2 summed in float32
    got32 = patch_denoise(x.float(), Y.float(), alpha, sigma, patch=P, mode=mode, boundary=boundary, chunk=chunk)
    torch.testing.assert_close(got32.double(), got, rtol=1e-3, atol=1e-3)


def test_broken_boundary_structure():
    """Boundary-broken ELS: interior patches see only interior patches (so a training set whose
    interior holds one value gives that value inside), a local machine's broken = zero, and with a
    patch at least the image's side every window is its own class: equivariant = local."""
    x, Y = _case(3, 2, 4, 1, 6, 7)
    Y2 = Y.clone()
    Y2[:, :, 1:-1, 1:-1] = 0.25
    inner = patch_denoise(x, Y2, 0.9, 0.7, patch=3, mode="equivariant", boundary="broken")[:, :, 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.full_like(inner, 0.25), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patch_denoise(x, Y, 0.9, 0.7, patch=3, boundary="broken"),
                               patch_denoise(x, Y, 0.9, 0.7, patch=3, boundary="zero"), rtol=0, atol=0)
    torch.testing.assert_close(patch_denoise(x, Y, 0.9, 0.7, patch=7, mode="equivariant", boundary="broken"),
                               patch_denoise(x, Y, 0.9, 0.7, patch=7, mode="local"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["local", "equivariant"])
def test_a_nan_pixel_poisons_exactly_the_pixels_whose_patch_holds_it(mode):
    x, Y = _case(11, 2, 3, 1, 6, 5)
    clean = patch_denoise(x, Y, 0.8, 0.5, patch=3, mode=mode)
    x[1, 0, 2, 3] = math.nan
    got = patch_denoise(x, Y, 0.8, 0.5, patch=3, mode=mode)
    hit = torch.zeros_like(x, dtype=torch.bool)
    hit[1, 0, 1:4, 2:5] = True
    assert torch.isnan(got[hit]).all() and not torch.isnan(got[~hit]).any()
    torch.testing.assert_close(got[~hit], clean[~hit], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["local", "equivariant"])
def test_label_conditional_subsets(mode):
    s = D.synthetic(14, (1, 5, 6), classes=3, seed=2)
    x = torch.randn(5, 1, 5, 6, dtype=torch.float64)
    labels = torch.tensor([2, 0, 2, 1, 0])
    sig = torch.tensor([0.4, 0.9, 1.3, 0.6, 0.8], dtype=torch.float64)
    got = patch_denoise(x, s, 0.9, sig, patch=3, mode=mode, boundary="broken", labels=labels)
    for b in range(5):
        sub = s.float(dtype=torch.float64)[s.labels == labels[b]]
        want = R.patch_denoise(x[b:b + 1], sub, 0.9, float(sig[b]), patch=3, mode=mode, boundary="broken")
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-12, atol=1e-12)
    one = patch_denoise(x, s, 0.9, 0.7, patch=3, mode=mode, labels=1, output="eps")
    torch.testing.assert_close(one, patch_denoise(x, s.with_label(1), 0.9, 0.7, patch=3, mode=mode, output="eps"))
    den = PatchDenoiser(s, 3, mode=mode, labels=labels)
    torch.testing.assert_close(den(x, 0.9, 0.7), patch_denoise(x, s, 0.9, 0.7, patch=3, mode=mode, labels=labels))


def test_label_errors():
    s = D.synthetic(6, (1, 4, 4), classes=2, seed=0)
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match="labels: label-conditional denoising needs data as an ImageSet"):
        patch_denoise(x, s.float(), 1.0, 0.5, patch=3, labels=0)
    with pytest.raises(ValueError, match="labels: label-conditional denoising needs data as an ImageSet"):
        patch_denoise(x, D.ImageSet(s.images), 1.0, 0.5, patch=3, labels=0)
    with pytest.raises(ValueError, match=r"labels: expected one integer label or 3"):
        patch_denoise(x, s, 1.0, 0.5, patch=3, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels: expected one integer label or 3"):
        patch_denoise(x, s, 1.0, 0.5, patch=3, labels=0.5)
    with pytest.raises(ValueError, match="label: no image has label 7"):
        patch_denoise(x, s, 1.0, 0.5, patch=3, labels=7)
    with pytest.raises(ValueError, match="labels: label-conditional denoising needs data as an ImageSet"):
        PatchDenoiser(s.float(), 3, labels=0)


def test_scan_backends():
    """Every empirical-scan backend that exists here gives the same machine (float64 rounding; float32
    to its own)."""
    x, Y = _case(4, 2, 5, 2, 5, 6)
    for boundary in ("zero", "broken"):
        want = _dense_unfold(x, Y, 0.8, 0.5, 3, "equivariant", boundary)
        for backend in ("auto", "torch", "cpp"):
            if backend != "auto" and not dispatch.exists("empirical", backend):
                continue
            got = patch_denoise(x, Y, 0.8, 0.5, patch=3, mode="equivariant", boundary=boundary, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            got32 = patch_denoise(x.float(), Y.float(), 0.8, 0.5, patch=3, mode="equivariant", boundary=boundary,
                                  backend=backend)
            torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        patch_denoise(x, Y, 0.8, 0.5, patch=3, mode="equivariant", backend="nope")
