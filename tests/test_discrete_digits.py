"""The binarized-digits example (bench/examples/discrete_digits.py): runs on any binary data; on
scikit-learn's digits only where scikit-learn is installed (it is not a dependency)."""
import importlib.util
import pathlib

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "bench" / "examples" / "discrete_digits.py"


def _example():
    spec = importlib.util.spec_from_file_location("discrete_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chain_on_synthetic_binary_images():
    """Ten random 'digits' (8x8 binary): the denoised chain lands on training images (exact
    memorization of the empirical law at this alpha), the noisy one stays binary."""
    ex = _example()
    gen = torch.Generator().manual_seed(0)
    data = torch.where(torch.rand(10, 64, generator=gen) < 0.5, 1.0, -1.0)
    r = ex.run(data, alpha=0.8, eta=1.5, steps=12, chains=3)
    assert r["noisy"].shape == r["denoised"].shape == (13, 3, 64)
    assert set(r["noisy"].unique().tolist()) <= {-1.0, 1.0}
    assert float((r["nearest"] >= 0).double().mean()) > 0.8
    for t in range(13):  # nearest really is a training image at Hamming distance 0
        for b in range(3):
            k = int(r["nearest"][t, b])
            if k >= 0:
                assert torch.equal(r["denoised"][t, b], data[k])


def test_main_skips_cleanly_or_runs(capsys):
    ex = _example()
    assert ex.main(["--steps", "4"]) == 0
    out = capsys.readouterr().out
    try:
        import sklearn  # noqa: F401
    except ImportError:
        assert out.startswith("skipped: bench/examples/discrete_digits.py needs scikit-learn")
    else:
        assert "denoised state = training digit" in out


def test_sklearn_digits():
    pytest.importorskip("sklearn")
    ex = _example()
    data = ex.load_digits_binary()
    assert data.shape == (1797, 64)
    r = ex.run(data, steps=6, chains=2)
    assert r["denoised"].shape == (7, 2, 64)
