"""SHA-256 digests of the C++ backend's random streams and the kernels that draw them in-kernel.

Run as ``python tests/stream_digests.py`` (prints one JSON object): tests/test_stream_digests.py
runs it under every SIMD path this CPU has (FASTDIFF_CPU_SIMD) and checks each digest against the
pinned ones, so a new code path (a wider Philox, a different Box-Muller) can only land when its
streams are bit for bit the ones that were there before it.  The cases cover odd lengths, offsets
that are not a multiple of 4, a quad counter crossing 2^32, both halves of 64-bit seeds, per-sample
keys (5001 elements a sample: quads straddle samples), float16 / bfloat16 outputs, the discrete flip's uniforms and the fused MoLRG trajectory.
"""
import hashlib
import json

import torch

import fastdiff


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def digests() -> dict:
    torch.manual_seed(0)
    out = {}
    for seed, offset, n in [(0, 0, 1), (123, 4, 1023), (2**63 + 5, 4 * 2**32 + 8, 4099),
                            (7, 4 * (2**32 - 50), 100_003), (2**64 - 1, 12, 2**20 + 5)]:
        z = fastdiff.randn(n, generator=fastdiff.Generator(seed, offset), backend="cpp")
        out[f"randn seed={seed} offset={offset} n={n}"] = _digest(z)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 5001).to(dtype)
        score = torch.randn(3, 5001).to(dtype)
        for keys, gen in (("one key", fastdiff.Generator(99, 8)), ("per sample", fastdiff.Generator([5, 2**63 + 1, 17], 4))):
            y = fastdiff.langevin_step(x, score, 0.01, generator=gen, backend="cpp")
            out[f"langevin {dtype} {keys}"] = _digest(y)
    anchor = torch.where(torch.rand(7, 10_001) < 0.5, -1.0, 1.0)
    out["binary_flip (7, 10001)"] = _digest(fastdiff.binary_flip(anchor, 0.7, generator=fastdiff.Generator(4, 8),
                                                               backend="cpp"))
    K, n, d = 3, 48, 4
    bases = torch.linalg.qr(torch.randn(K, n, d, dtype=torch.float64))[0]
    den = fastdiff.denoisers.MoLRG(bases)
    for method, kw in (("ddpm", {"schedule": fastdiff.DDPMSchedule(T=50)}),
                       ("ddim", {"schedule": fastdiff.DDPMSchedule(), "steps": 20, "eta": 1.0})):
        x = fastdiff.sample(den, (37, n), method=method, backend="cpp", fused=True,
                            generator=fastdiff.Generator(2024), progress=False, **kw)
        x = x[0] if isinstance(x, tuple) else x
        out[f"molrg trajectory {method}"] = _digest(x)
    return out


if __name__ == "__main__":
    print(json.dumps(digests(), indent=1, sort_keys=True))
