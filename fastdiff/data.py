"""Training sets as researchers keep them on disk, held as uint8 and converted to floats per tile.

An :class:`ImageSet` is N images as a uint8 tensor (N, C, H, W) (a quarter of float32's memory: a
CIFAR-10 training set is 150 MB, not 600 MB) and optional integer labels.  The empirical and
patch denoisers read it a tile at a time through :meth:`ImageSet.float` / :meth:`ImageSet.tiles`,
so the float copy of the whole set never exists.  Pixel values map to ``[-1, 1]`` by default
(``x = 2 u / 255 - 1``, EDM's and diffusers' convention).

Loaders, each refusing a corrupt file or an unexpected shape with a ValueError naming the file:

- :func:`load_array`: NumPy ``.npy`` (an (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 array) and
  ``.npz`` (images under ``images`` / ``x`` / ``arr_0``, optional labels under ``labels`` / ``y`` /
  ``arr_1``);
- :func:`load_png_folder`: a folder of PNGs, sorted by path; one level of class sub-folders gives the
  labels (torchvision's ``ImageFolder`` convention);
- :func:`load_edm_zip`: the zip EDM's ``dataset_tool.py`` writes (PNGs, sorted by name, labels in
  ``dataset.json`` as ``{"labels": [[name, label], ...]}`` or ``null``);
- :func:`load`: any of the three by what ``path`` is;
- :func:`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; ships with
  scikit-learn, no download), the real data set that works offline;
- :func:`synthetic`: a seeded CIFAR-shaped set with class structure, for tests and benchmarks.

:func:`save_npz`, :func:`save_png_folder` and :func:`save_edm_zip` write the same formats.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ImageSet", "load", "load_array", "load_png_folder", "load_edm_zip", "digits", "synthetic",
           "save_npz", "save_png_folder", "save_edm_zip"]

PathLike = Union[str, os.PathLike]
_IMAGE_KEYS = ("images", "x", "arr_0")
_LABEL_KEYS = ("labels", "y", "arr_1")
_CHANNELS = (1, 3, 4)
_PIL_MODES = {"L": 1, "RGB": 3, "RGBA": 4}


class ImageSet:
    """N images, uint8 (N, C, H, W), with optional int64 labels (N,) and class names.

    ``float(start, stop)`` is the only conversion: ``lo + (hi - lo) u / 255`` on the requested rows,
    so callers stream a large set tile by tile.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                 classes: Optional[Sequence[str]] = None, source: str = ""):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected a uint8 tensor (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if images.shape[0] < 1:
            raise ValueError("images: expected at least one image")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (images.shape[0],):
                raise ValueError(f"labels: expected {images.shape[0]} integer labels (one per image), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            labels = labels.to(torch.int64)
        self.images = images
        self.labels = labels
        self.classes = list(classes) if classes is not None else None
        self.source = source

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def n(self) -> int:
        """Dimension of one flattened image, C H W."""
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        lab = f", {len(torch.unique(self.labels))} labels" if self.labels is not None else ""
        src = f", from {self.source!r}" if self.source else ""
        return f"ImageSet(N={len(self)}, C,H,W={self.shape}{lab}{src})"

    # ------------------------------------------------------------------ selection
    def __getitem__(self, index) -> "ImageSet":
        """Rows ``index`` (an int, a slice, an index or boolean tensor) as a new set sharing memory where torch does."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        labels = self.labels[index] if self.labels is not None else None
        return ImageSet(self.images[index], labels, classes=self.classes, source=self.source)

    def with_label(self, label: int) -> "ImageSet":
        """The images of one class (the label-conditional subset)."""
        if self.labels is None:
            raise ValueError("label: this set has no labels")
        keep = self.labels == int(label)
        if not bool(keep.any()):
            raise ValueError(f"label: no image has label {label} (labels present: "
                             f"{torch.unique(self.labels).tolist()})")
        return self[keep]

    # ------------------------------------------------------------------ conversion
    def float(self, start: int = 0, stop: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
              device=None, value_range: Tuple[float, float] = (-1.0, 1.0), flatten: bool = False) -> torch.Tensor:
        """Rows ``start:stop`` as floats ``lo + (hi - lo) u / 255``, (M, C, H, W) or (M, C H W) with ``flatten``."""
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range: expected (lo, hi) with hi > lo, got {value_range}")
        u = self.images[start:stop].to(device=device, dtype=dtype)
        out = u.mul_((hi - lo) / 255.0).add_(lo)
        return out.reshape(out.shape[0], -1) if flatten else out

    def tiles(self, tile: int = 4096, **float_kwargs) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(start, rows)`` for consecutive tiles of ``tile`` images, each converted by :meth:`float`."""
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile: expected a positive int, got {tile!r}")
        for start in range(0, len(self), tile):
            yield start, self.float(start, start + tile, **float_kwargs)


# ====================================================================== array files
def _to_nchw(a: np.ndarray, layout: str, where: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 images (0..255), got dtype {a.dtype} "
                         "(convert floats in [0, 1] with (a * 255).round().astype(np.uint8))")
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise ValueError(f"{where}: expected an (N, H, W), (N, H, W, C) or (N, C, H, W) array, got shape {a.shape}")
    if layout not in ("auto", "NCHW", "NHWC"):
        raise ValueError(f"layout: expected 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if layout == "auto":
        first, last = a.shape[1] in _CHANNELS, a.shape[3] in _CHANNELS
        if first == last:
            raise ValueError(f"{where}: cannot tell channels-first from channels-last in shape {a.shape}; "
                             "pass layout='NCHW' or layout='NHWC'")
        layout = "NCHW" if first else "NHWC"
    return a if layout == "NCHW" else a.transpose(0, 3, 1, 2)


def load_array(path: PathLike, *, layout: str = "auto") -> ImageSet:
    """A ``.npy`` array or ``.npz`` archive of uint8 images (see the module docstring for the keys)."""
    path = Path(path)
    key = lkey = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                files = z.files
                key = next((k for k in _IMAGE_KEYS if k in files), None)
                lkey = next((k for k in _LABEL_KEYS if k in files), None)
                images = z[key] if key is not None else None
                labels = z[lkey] if lkey is not None else None
        else:
            key, images, labels = "", np.load(path, allow_pickle=False), None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy's own: truncated, pickled, not npy
        raise ValueError(f"{path}: not a readable NumPy file ({e})") from None
    if key is None:
        raise ValueError(f"{path}: expected images under one of {_IMAGE_KEYS}, found keys {files}")
    images = _to_nchw(np.asarray(images), layout, str(path))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],):
            raise ValueError(f"{path}: expected {images.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), labels, source=str(path))


def save_npz(path: PathLike, images: ImageSet) -> None:
    """``images`` as an ``.npz`` with ``images`` (N, C, H, W) uint8 and, if labelled, ``labels``."""
    arrays = {"images": images.images.numpy()}
    if images.labels is not None:
        arrays["labels"] = images.labels.numpy()
    np.savez(path, **arrays)


# ====================================================================== PNG images
def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in _PIL_MODES:
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where}: not a readable image ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack(arrays: List[np.ndarray], names: List[str], where: str) -> torch.Tensor:
    if not arrays:
        raise ValueError(f"{where}: no PNG images found")
    shape = arrays[0].shape
    for a, name in zip(arrays, names):
        if a.shape != shape:
            raise ValueError(f"{name}: expected an image of shape (C, H, W) = {shape} like {names[0]}, got {a.shape}")
    return torch.from_numpy(np.stack(arrays))


def _encode_png(chw: torch.Tensor) -> bytes:
    from PIL import Image
    a = chw.numpy()
    im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def load_png_folder(root: PathLike) -> ImageSet:
    """Every ``*.png`` under ``root``, sorted by relative path.  If every image sits in a direct
    sub-folder, the sorted sub-folder names are the classes and each image's label is its folder's
    index; otherwise the set is unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root: expected a folder of PNG images, got {str(root)!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    arrays = [_decode_png(p.read_bytes(), str(p)) for p in files]
    images = _stack(arrays, [str(p) for p in files], str(root))
    rel = [p.relative_to(root) for p in files]
    labels = classes = None
    if all(len(r.parts) == 2 for r in rel):
        classes = sorted({r.parts[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[r.parts[0]] for r in rel], dtype=torch.int64)
    return ImageSet(images, labels, classes=classes, source=str(root))


def save_png_folder(root: PathLike, images: ImageSet) -> None:
    """One PNG per image, ``root/<label>/<index>.png`` if labelled (class names from ``images.classes``), else ``root/<index>.png``."""
    root = Path(root)
    for i in range(len(images)):
        if images.labels is not None:
            lab = int(images.labels[i])
            folder = root / (images.classes[lab] if images.classes else f"{lab:05d}")
        else:
            folder = root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}.png").write_bytes(_encode_png(images.images[i]))


# ====================================================================== EDM dataset zip
def load_edm_zip(path: PathLike) -> ImageSet:
    """The zip of EDM's ``dataset_tool.py``: PNG members sorted by name, labels from ``dataset.json``."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable zip file ({e})") from None
    with zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
        try:
            arrays = [_decode_png(zf.read(n), f"{path}:{n}") for n in names]
            meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else None
        except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt member ({e})") from None
    images = _stack(arrays, [f"{path}:{n}" for n in names], str(path))
    labels = None
    if meta is not None and meta.get("labels") is not None:
        try:
            by_name = {str(k): int(v) for k, v in meta["labels"]}
            labels = torch.tensor([by_name[n] for n in names], dtype=torch.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: dataset.json: expected a label for every image as [name, int] pairs ({e!r})") from None
    return ImageSet(images, labels, source=str(path))


def save_edm_zip(path: PathLike, images: ImageSet) -> None:
    """``images`` in EDM's zip layout: ``00000/img00000000.png`` (1000 to a folder) and ``dataset.json``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        names = []
        for i in range(len(images)):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            zf.writestr(name, _encode_png(images.images[i]))
            names.append(name)
        labels = None if images.labels is None else [[n, int(l)] for n, l in zip(names, images.labels)]
        zf.writestr("dataset.json", json.dumps({"labels": labels}))


def load(path: PathLike, **kwargs) -> ImageSet:
    """A folder of PNGs, an EDM ``.zip``, or a ``.npy`` / ``.npz`` array, by what ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return load_png_folder(p)
    if not p.exists():
        raise ValueError(f"path: no such file or folder: {str(p)!r}")
    if p.suffix == ".zip":
        return load_edm_zip(p)
    if p.suffix in (".npy", ".npz"):
        return load_array(p, **kwargs)
    raise ValueError(f"path: expected a folder of PNGs, a .zip, .npy or .npz file, got {str(p)!r}")


# ====================================================================== built-in sets
def digits() -> ImageSet:
    """scikit-learn's 8x8 handwritten digits: 1797 grey images (1, 8, 8), labels 0-9.  Its pixel
    values 0..16 map to ``round(255 v / 16)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("digits: needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    u = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(torch.from_numpy(u), torch.from_numpy(d.target.astype(np.int64)),
                    classes=[str(c) for c in d.target_names], source="sklearn digits")


def synthetic(N: int, shape: Tuple[int, int, int] = (3, 32, 32), *, classes: int = 10, seed: int = 0) -> ImageSet:
    """N seeded uint8 images of ``shape`` with class structure: each class is a smooth random
    template (a 4x4 grid upsampled bilinearly), each image its class's template plus pixel noise."""
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N: expected a positive int, got {N!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes: expected a positive int, got {classes!r}")
    C, H, W = shape
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(classes, C, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    labels = torch.randint(classes, (N,), generator=g)
    x = templates[labels] + 0.15 * torch.randn(N, C, H, W, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, labels, classes=[str(c) for c in range(classes)], source=f"synthetic(seed={seed})")
