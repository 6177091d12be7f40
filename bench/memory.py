"""Peak memory growth of the training-set denoisers (issue 17, acceptance 5: under 4x the inputs).

Each case runs in a fresh subprocess: import, one small warm-up call (libraries' code and pools
loaded), then the inputs are built and the resident set size read (``/proc/self/statm``); after one
call at full size the growth is the peak resident set (``VmHWM`` of ``/proc/self/status``, a high-water
mark) minus that reading.  Not ``getrusage``'s ``ru_maxrss``: Linux carries it over fork and exec, so
a worker started by a parent that had imported torch (300 MB resident) reported the parent's size as
its own peak, about 60 MiB of "growth" that no call made.  On CUDA the same with
``torch.cuda.max_memory_allocated``.  Writes bench/results/memory.md.

    python bench/memory.py [--device cpu|cuda] [--out bench/results/memory.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# (name, the call as Python source over x, data; input sizes in the worker)
CASES = {
    "posterior": "fastdiff.denoisers.empirical_posterior(x, data, 0.8, 0.5 * n ** 0.5, "
                 "outputs=('x0', 'logp', 'neighbors'), backend=backend)",
    "denoise": "fastdiff.empirical_denoise(x, data, 0.8, 0.5 * n ** 0.5, backend=backend)",
    "equivariant": "patch_denoise(x, data, 1.0, 0.5, patch=P, mode='equivariant')",
    "equivariant-broken": "patch_denoise(x, data, 1.0, 0.5, patch=P, mode='equivariant', boundary='broken')",
    "local": "patch_denoise(x, data, 1.0, 0.5, patch=P, mode='local')",
    "pspc": "patch_denoise(x, data, 1.0, 0.5, patch=P, mode='pspc')",
}
_PATCH_SIZES = [((1, 28, 28), 1000, 2, 5), ((1, 28, 28), 10000, 2, 5), ((1, 8, 8), 10000, 16, 5)]   # bench/test_bench_denoise.py's largest
SIZES = {"posterior": [(256, 50000, 192)], "denoise": [(256, 50000, 192)],
         **{case: _PATCH_SIZES for case in ("equivariant", "equivariant-broken", "local", "pspc")}}
PATCH_CASES = ("equivariant", "equivariant-broken", "local", "pspc")

_WORKER = r"""
import json, sys, torch, fastdiff
from fastdiff.denoisers.patch import patch_denoise
case, size, backend, device, call = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def inputs(size, scale=1):
    g = torch.Generator().manual_seed(0)
    if case in ("equivariant", "equivariant-broken", "local", "pspc"):
        (C, H, W), N, B, P = size
        N = max(1, N // scale)
        return (torch.randn(B, C, H, W, generator=g).to(device),
                (torch.rand(N, C, H, W, generator=g) * 2 - 1).to(device), P, H * W)
    B, N, n = size
    return torch.randn(max(1, B // scale), n, generator=g).to(device), torch.randn(max(1, N // scale), n, generator=g).to(device), 0, n
x, data, P, n = inputs(size, scale=50)
with torch.no_grad():
    eval(call)                                     # warm-up at 1/50 the size
del x, data
x, data, P, n = inputs(size)
in_bytes = x.numel() * x.element_size() + data.numel() * data.element_size()
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:
    before = rss()
with torch.no_grad():
    out = eval(call)
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
else:
    with open("/proc/self/status") as f:          # VmHWM: this process image's peak (see the docstring)
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"inputs": in_bytes, "growth": peak - before}))
"""


def measure(case: str, size, backend: str = "auto", device: str = "cpu") -> dict:
    """{"inputs": bytes, "growth": bytes} of one call of ``case`` at ``size`` in a fresh process."""
    arg = json.dumps([case, size, backend, device, CASES[case]])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    r = subprocess.run([sys.executable, "-c", _WORKER, arg], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{case} {size} ({backend}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _backends(device: str):
    from fastdiff import dispatch

    return [b for b in ("torch", "cpp", "triton") if dispatch.exists("empirical", b) and
            device in next(i for i in dispatch.OPS["empirical"].impls if i.backend == b).devices]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.md"))
    args = ap.parse_args(argv)
    rows = []
    for case, sizes in SIZES.items():
        for size in sizes:
            for backend in (_backends(args.device) if case not in PATCH_CASES else ["auto"]):
                r = measure(case, size, backend, args.device)
                ratio = r["growth"] / r["inputs"]
                rows.append(f"| {case} | {size} | {backend} | {r['inputs'] / 2**20:.1f} | {r['growth'] / 2**20:.1f} "
                            f"| {ratio:.2f} | {'yes' if ratio < 4 else 'NO'} |")
                print(rows[-1], flush=True)
    text = ["# Peak memory growth of the training-set denoisers (issue 17, acceptance 5)", "",
            f"Command: `python bench/memory.py --device {args.device}`; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores.  Growth = peak resident set (CPU; the allocator's peak on CUDA) during one "
            "call minus the resident set with the inputs built, one fresh process per row (bench/memory.py).", "",
            "| case | size | backend | inputs MiB | growth MiB | growth / inputs | < 4x |", "|---|---|---|---|---|---|---|",
            *rows, ""]
    Path(args.out).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
