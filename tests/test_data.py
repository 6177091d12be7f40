"""fastdiff.data: the three on-disk formats round-trip (written here with NumPy / PIL / zipfile
directly, in the layouts the tools that make them use, and with fastdiff's writers), corrupt files
and wrong shapes are refused naming the file, per-tile conversion, and the empirical denoiser on
uint8 sets against the float formulation."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import data as D


def _images(N=7, C=3, H=5, W=6, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(N, C, H, W), dtype=np.uint8), g.integers(0, 4, size=N)


def _png(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_npy_round_trips_every_layout(tmp_path, layout):
    u, _ = _images(C=1 if layout == "NHW" else 3)
    a = {"NCHW": u, "NHWC": u.transpose(0, 2, 3, 1), "NHW": u[:, 0]}[layout]
    np.save(tmp_path / "x.npy", a)
    s = D.load(tmp_path / "x.npy")
    assert s.images.dtype == torch.uint8 and torch.equal(s.images, torch.from_numpy(u)) and s.labels is None


def test_npz_with_labels_and_fastdiff_writer(tmp_path):
    u, y = _images()
    np.savez(tmp_path / "a.npz", x=u.transpose(0, 2, 3, 1), y=y)
    s = D.load(tmp_path / "a.npz")
    assert torch.equal(s.images, torch.from_numpy(u)) and s.labels.tolist() == y.tolist()
    D.save_npz(tmp_path / "b.npz", s)
    t = D.load(tmp_path / "b.npz")
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)


def test_ambiguous_layout_needs_the_argument(tmp_path):
    a = np.zeros((2, 3, 4, 3), np.uint8)
    np.save(tmp_path / "x.npy", a)
    with pytest.raises(ValueError, match="layout='NCHW' or layout='NHWC'"):
        D.load(tmp_path / "x.npy")
    assert D.load(tmp_path / "x.npy", layout="NHWC").shape == (3, 3, 4)
    assert D.load(tmp_path / "x.npy", layout="NCHW").shape == (3, 4, 3)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 4, 4), np.float32), "expected uint8 images"),
    (np.zeros((2, 5), np.uint8), r"expected an \(N, H, W\)"),
    (np.zeros((2, 3, 4, 4, 1), np.uint8), r"expected an \(N, H, W\)"),
])
def test_wrong_arrays_are_refused(tmp_path, bad, match):
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(ValueError, match=match):
        D.load(tmp_path / "x.npy")


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    u, _ = _images()
    np.save(tmp_path / "x.npy", u)
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="cut.npy"):
        D.load(tmp_path / "cut.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="junk.npz"):
        D.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "k.npz", pixels=u)
    with pytest.raises(ValueError, match="expected images under one of"):
        D.load(tmp_path / "k.npz")
    np.savez(tmp_path / "l.npz", images=u, labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="expected 7 integer labels"):
        D.load(tmp_path / "l.npz")
    with pytest.raises(ValueError, match="no such file"):
        D.load(tmp_path / "absent.npy")
    with pytest.raises(ValueError, match="expected a folder of PNGs, a .zip"):
        (tmp_path / "a.txt").write_text("x")
        D.load(tmp_path / "a.txt")


# ---------------------------------------------------------------------------------------- PNGs
@pytest.mark.parametrize("C", [1, 3, 4])
def test_png_folder_round_trips_with_class_folders(tmp_path, C):
    u, y = _images(C=C)
    for i in range(len(u)):
        (tmp_path / f"class{y[i]}").mkdir(exist_ok=True)
        (tmp_path / f"class{y[i]}" / f"{i:03d}.png").write_bytes(_png(u[i]))
    s = D.load(tmp_path)
    order = sorted(range(len(u)), key=lambda i: (f"class{y[i]}", i))    # sorted by relative path
    assert torch.equal(s.images, torch.from_numpy(u[order]))
    classes = sorted({f"class{v}" for v in y})
    assert s.classes == classes and s.labels.tolist() == [classes.index(f"class{y[i]}") for i in order]
    D.save_png_folder(tmp_path / "again", s)
    t = D.load(tmp_path / "again")
    assert torch.equal(t.images, s.images) and t.labels.tolist() == s.labels.tolist() and t.classes == s.classes


def test_flat_png_folder_is_unlabelled_and_palette_images_decode(tmp_path):
    u, _ = _images(N=3)
    for i in range(3):
        Image.fromarray(u[i].transpose(1, 2, 0)).convert("P").save(tmp_path / f"{i}.png")
    s = D.load(tmp_path)
    assert s.labels is None and s.shape == (3, 5, 6)


def test_png_folder_errors(tmp_path):
    u, _ = _images(N=2)
    (tmp_path / "0.png").write_bytes(_png(u[0]))
    (tmp_path / "1.png").write_bytes(_png(u[1][:, :4]))
    with pytest.raises(ValueError, match=r"1.png: expected an image of shape \(C, H, W\) = \(3, 5, 6\)"):
        D.load(tmp_path)
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="1.png: not a readable image"):
        D.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG images found"):
        D.load(tmp_path / "empty")


# ---------------------------------------------------------------------------------------- EDM zip
def _edm_zip(path, u, y):
    """The layout of EDM's dataset_tool.py: 00000/img00000000.png ... and dataset.json."""
    with zipfile.ZipFile(path, "w") as zf:
        names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(u))]
        for n, img in zip(names, u):
            zf.writestr(n, _png(img))
        zf.writestr("dataset.json", json.dumps({"labels": None if y is None else [[n, int(v)] for n, v in zip(names, y)]}))


@pytest.mark.parametrize("labelled", [True, False])
def test_edm_zip_round_trips(tmp_path, labelled):
    u, y = _images(N=9)
    _edm_zip(tmp_path / "d.zip", u, y if labelled else None)
    s = D.load(tmp_path / "d.zip")
    assert torch.equal(s.images, torch.from_numpy(u))
    assert (s.labels.tolist() == y.tolist()) if labelled else s.labels is None
    D.save_edm_zip(tmp_path / "e.zip", s)
    t = D.load(tmp_path / "e.zip")
    assert torch.equal(t.images, s.images) and (t.labels is None) == (not labelled)


def test_edm_zip_errors(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="bad.zip: not a readable zip"):
        D.load(tmp_path / "bad.zip")
    u, y = _images(N=2)
    with zipfile.ZipFile(tmp_path / "lab.zip", "w") as zf:
        zf.writestr("a.png", _png(u[0]))
        zf.writestr("b.png", _png(u[1]))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(ValueError, match="dataset.json: expected a label for every image"):
        D.load(tmp_path / "lab.zip")


# ---------------------------------------------------------------------------------------- the set
def test_float_tiles_and_subsets():
    s = D.synthetic(23, (2, 3, 3), classes=3, seed=4)
    full = s.float(dtype=torch.float64)
    ref = s.images.double() * (2 / 255) - 1
    assert torch.allclose(full, ref, rtol=0, atol=1e-15) and full.min() >= -1 and full.max() <= 1
    tiles = list(s.tiles(5, dtype=torch.float64, flatten=True))
    assert [t for t, _ in tiles] == [0, 5, 10, 15, 20]
    assert torch.equal(torch.cat([x for _, x in tiles]), full.reshape(23, -1))
    assert torch.allclose(s.float(3, 4, value_range=(0.0, 1.0)), s.images[3:4].float() / 255)
    for c in range(3):
        sub = s.with_label(c)
        assert (sub.labels == c).all() and len(sub) == int((s.labels == c).sum())
    with pytest.raises(ValueError, match="no image has label 7"):
        s.with_label(7)
    with pytest.raises(ValueError, match="tile: expected a positive int"):
        next(s.tiles(0))
    with pytest.raises(ValueError, match="value_range"):
        s.float(value_range=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"images: expected a uint8 tensor \(N, C, H, W\)"):
        D.ImageSet(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="labels: expected 2 integer labels"):
        D.ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_synthetic_is_seeded_and_class_structured():
    a, b, c = D.synthetic(200, seed=1), D.synthetic(200, seed=1), D.synthetic(200, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.shape == (3, 32, 32) and set(a.labels.tolist()) <= set(range(10))
    x = a.float(flatten=True, dtype=torch.float64)
    means = torch.stack([x[a.labels == k].mean(0) for k in range(10)])
    within = torch.stack([(x[a.labels == k] - means[k]).pow(2).sum(1).mean() for k in range(10)]).mean()
    between = torch.pdist(means).pow(2).mean()
    assert between > 3 * within   # the classes are told apart by their templates


def test_digits():
    pytest.importorskip("sklearn")
    s = D.digits()
    assert len(s) == 1797 and s.shape == (1, 8, 8) and s.labels.bincount().tolist()[0] == 178
    from sklearn.datasets import load_digits
    assert torch.equal(s.images[:, 0].double(), torch.from_numpy(np.rint(load_digits().images * 255 / 16)))


@pytest.mark.parametrize("N,chunk", [(1, None), (37, 8), (64, 64)])
def test_empirical_denoiser_on_uint8_sets_matches_the_float_data(N, chunk):
    """Each chunk converted as it is read gives the float64 answer of the whole float set."""
    s = D.synthetic(N, (1, 3, 5), seed=N)
    x = torch.randn(6, 15, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    y = s.float(dtype=torch.float64, flatten=True)
    for out in ("x0", "eps", "score"):
        got = fastdiff.empirical_denoise(x, s, 0.8, 0.3, output=out, chunk=chunk)
        want = fastdiff.empirical_denoise(x, y, 0.8, 0.3, output=out)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    emp = fastdiff.denoisers.Empirical(s)
    assert (emp.N, emp.n) == (N, 15)
    torch.testing.assert_close(emp(x.float(), 0.8, 0.3), fastdiff.empirical_denoise(x.float(), y.float(), 0.8, 0.3))
    d, i = emp.nearest(x, k=1)
    assert torch.equal(i, torch.cdist(x, y).argmin(1, keepdim=True))
    with pytest.raises(ValueError, match="data: expected images of n = 16 values"):
        fastdiff.empirical_denoise(torch.randn(2, 16), s, 0.8, 0.3)
