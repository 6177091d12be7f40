"""Roofline of every GPU kernel at its benchmark shapes: what a first H100 / H200 run should show.

For each kernel and shape of the benchmarks (bench/test_bench_*.py, the same group names), the
fewest bytes the kernel must move through HBM (each input read once, each output written once,
operands reused from L2 counted once) and the FLOPs it does, and the time they imply at peak:

    t = max(bytes / HBM bandwidth, FLOPs / arithmetic peak)       (the roofline bound)

Peaks, SXM parts (NVIDIA H100 and H200 datasheets, dense): HBM 3.35 TB/s (H100, HBM3) and
4.8 TB/s (H200, HBM3e); float32 on the CUDA cores 67 TFLOP/s; TF32 tensor cores 495 TFLOP/s;
float64 34 TFLOP/s (vector; the SVD computes in float64).  The MoLRG and trajectory dots run
"ieee" float32 (no tensor cores: TF32 misses their 1e-5 bound), so their ceiling is the float32
one; the TF32 column says what the tf32x3 option could reach (3 dots a product).  A measured time
within ~1.3x of `t` is as good as the hardware allows; far above it, the resource table
(bench/results/triton-resources.md: occupancy, spills) is the first place to look.

    python bench/roofline.py            rewrite bench/results/roofline.md
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "roofline.md"
PEAK = {  # bytes/s, FLOP/s
    "H100": {"hbm": 3.35e12, "fp32": 67e12, "tf32": 495e12, "fp64": 34e12},
    "H200": {"hbm": 4.8e12, "fp32": 67e12, "tf32": 495e12, "fp64": 34e12},
}

# fused steps (bench/test_bench_steps.py): n = 2^22 float32, (tensors read, Philox noise?)
STEP_N = 1 << 22
STEPS = {
    "ddpm_step (noise)": (2, True), "ddim_step eta=1 (noise)": (2, True), "ddim_step eta=0": (2, False),
    "euler_step": (2, False), "euler_ancestral_step (noise)": (2, True), "heun_step corrector": (3, False),
    "edm_churn (noise)": (1, True), "langevin_step (noise)": (2, True), "ou_reverse_step (noise)": (2, True),
}
MOLRG = [(4096, 48, 3, 8), (1024, 256, 8, 16), (256, 3072, 10, 64)]  # bench/test_bench_denoise.py (B, n, K, d)
SVD = [(16384, 64, 64, 4), (16384, 32, 32, 4), (16384, 64, 64, 8), (4096, 128, 128, 4), (1024, 256, 256, 8)]
TRAJ = [(1, 1024, 48, 3, 8, 1000), (256, 64, 48, 3, 8, 200)]  # bench/test_bench_sampling.py (I, B, n, K, d, T)


def _pow2(v: int) -> int:
    return 1 << (int(v) - 1).bit_length()


def rows():
    """(kernel, shape, bytes, FLOPs, compute peak key, note)."""
    out = []
    for case, (reads, noise) in STEPS.items():
        # reads + 1 write of 4 B an element; FLOPs: a multiply-add a term (Philox is integer work:
        # ~10 rounds of 2 32-bit mul.wide a quad of 4 normals, plus log/sqrt/cos a pair)
        terms = reads + noise
        out.append(("fused step", f"{case} n=2^22 float32", 4 * STEP_N * (reads + 1), 2 * terms * STEP_N, "fp32",
                    "Philox in-kernel" if noise else ""))
    for B, n, K, d in MOLRG:
        D = K * d
        # forward: x read, out written, U (n, D) once (L2-resident across programs), w (B, K) written;
        # FLOPs as the benchmark counts them: U^T x and U c, 2 n D each
        fwd = 4 * (2 * B * n + n * D + B * K)
        out.append(("molrg fwd", f"(B,n,K,d)=({B},{n},{K},{d})", fwd, 4 * B * n * D, "fp32", ""))
        # backward: x, G, U, w read; dx, q, dP written; then dU = G^T q + x^T dP (two GEMMs reading
        # G, q, x, dP again and writing dU): 3x the forward's FLOPs, as the benchmark counts
        bwd = 4 * (3 * B * n + n * D + B * K + 2 * B * D) + 4 * (2 * B * n + 2 * B * D + n * D)
        out.append(("molrg fwd+bwd", f"(B,n,K,d)=({B},{n},{K},{d})", fwd + bwd, 12 * B * n * D, "fp32", ""))
    for B, m, n, itemsize in SVD:
        # A read, S written, the (B, 2 N) float64 scratch written and read; Householder
        # bidiagonalization 4 m n^2 - 4/3 n^3 (as bench/test_bench_svd_gpu.py counts), in float64
        nbytes = itemsize * B * (m * n + n) + 2 * 8 * B * 2 * n
        flops = B * (4 * m * n * n - 4 * n ** 3 / 3)
        dt = "float32" if itemsize == 4 else "float64"
        note = "bisection extra"
        if _pow2(m) * _pow2(n) > 128 * 64:
            # kernels/svd.py streams the tile through its workspace: step k reads the active block
            # (M - k) x (N - k) twice and writes it once, sum_k = M N^2 / 2 - N^3 / 6 words (float64)
            ws = 3 * 8 * B * (max(m, n) * min(m, n) ** 2 / 2 - min(m, n) ** 3 / 6)
            note += f"; streamed: +{ws / 1e9:.1f} GB workspace traffic (L2)"
        out.append(("svd", f"({B},{m},{n}) {dt}", nbytes, flops, "fp64", note))
    for I, B, n, K, d, T in TRAJ:
        D = K * d
        # one launch for T steps: x read and written once, U per instance once, the (T, 8) coefficient
        # and (T, 5) index tables; per step one posterior mean (4 n D a row) and the update (~6 n a row)
        nbytes = 4 * (2 * I * B * n + I * n * D) + T * (8 * 4 + 5 * 8)
        flops = I * B * T * (4 * n * D + 6 * n)
        # T dependent steps a program: with fewer programs than SMs x resident blocks (1024 rows
        # at 16-32 a tile is 32-64 programs) the run is latency-bound far above this roof
        out.append(("trajectory", f"ddpm (I,B,n,K,d,T)=({I},{B},{n},{K},{d},{T})", nbytes, flops, "fp32",
                    "Philox in-kernel; T serial steps a program"))
    return out


def _fmt_t(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table() -> str:
    lines = ["# Roofline: bytes, FLOPs and the time they imply at H100 / H200 peak", "",
             "Written by `python bench/roofline.py` (the method and the peaks are in its docstring); no GPU has",
             "run these kernels yet, so this is the written expectation a first run is judged against",
             "(`bash bench/gpu.sh` prints it beside the measured times). `bound`: which roof the kernel",
             "meets first; intensity in FLOP/byte (the ridge points: H100 20 FLOP/B float32, 10 float64;",
             "H200 14 and 7).", "",
             "| kernel | shape | MB moved | GFLOP | FLOP/B | peak | H100 time | H200 time | bound | note |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for kernel, shape, nbytes, flops, peak, note in rows():
        t = {g: max(nbytes / p["hbm"], flops / p[peak]) for g, p in PEAK.items()}
        bound = "memory" if nbytes / PEAK["H200"]["hbm"] >= flops / PEAK["H200"][peak] else "compute"
        lines.append(f"| {kernel} | {shape} | {nbytes / 1e6:.2f} | {flops / 1e9:.3f} | {flops / nbytes:.2f} | {peak} | "
                     f"{_fmt_t(t['H100'])} | {_fmt_t(t['H200'])} | {bound} | {note} |")
    lines += ["", "TF32 (tf32x3: 3 TF32 dots a float32 product) would put the MoLRG rows' compute roof at",
              f"{PEAK['H200']['tf32'] / 3 / 1e12:.0f} TFLOP/s instead of {PEAK['H200']['fp32'] / 1e12:.0f}; "
              "the library launches the \"ieee\" dots."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = table()
    if sys.argv[1:] == ["--print"]:
        print(text)
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
