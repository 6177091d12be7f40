"""What a Triton kernel variant costs an SM, from its compile alone: occupancy, budgets, the table.

Shared by tests/test_aot.py (CI, no GPU: ``ptxas -v`` on the PTX Triton made) and bench/gpu.sh
(the same report from a GPU machine's own compiler and driver).  Nothing here imports Triton.

Occupancy (CUDA C Programming Guide, "Technical Specifications per Compute Capability", and the
CUDA occupancy calculator's rules), for a block of ``W`` warps using ``r`` registers a thread and
``s`` bytes of shared memory, on an SM of sm_80 (A100) or sm_90 (H100/H200):

    regs/warp   = ceil(32 r / 256) * 256              registers are allocated to a warp in 256s
    blocks_reg  = floor(floor(65536 / regs/warp) / W)  64K 32-bit registers per SM
    blocks_smem = floor(smem/SM / ceil128(s + 1024))   1 KB a block is reserved by the system (CUDA >= 11)
    blocks_warp = floor(64 / W),  at most 32 blocks    64 warp slots per SM
    warps/SM    = W * min(blocks_reg, blocks_smem, blocks_warp, 32)

with smem/SM = 164 KB (sm_80) and 228 KB (sm_90); a block may use at most 163 / 227 KB.
A streaming kernel needs many warps resident to cover HBM latency: issue 19 asks for >= 32 of 64
(50%) in the fused step, which at 256-thread blocks means <= 64 registers a thread.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

CCS = (80, 90)
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256   # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # per block, opt-in maximum
SMEM_RESERVED = 1024   # per block
SMEM_ALLOC_UNIT = 128

REPO = Path(__file__).resolve().parent.parent
BUDGETS = REPO / "bench" / "triton_budgets.json"
COLUMNS = ("regs", "spill_stores", "spill_loads", "stack", "smem")  # measured, per cc
TABLE_COLUMNS = COLUMNS + ("warps/SM",)                             # + derived, per cc


def occupancy(regs: int, smem: int, num_warps: int, cc: int) -> int:
    """Resident warps per SM (0..64) for a block of ``num_warps`` warps (module docstring)."""
    if smem > SMEM_LIMIT[cc]:
        return 0
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks_reg = (REGS_PER_SM // per_warp) // num_warps
    blocks_smem = (SMEM_PER_SM[cc] // (math.ceil((smem + SMEM_RESERVED) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT)
                   if smem else MAX_BLOCKS_PER_SM)
    blocks = min(blocks_reg, blocks_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)
    return num_warps * blocks


def spill(res) -> int:
    """Bytes a thread of register spill traffic, the larger of stores and loads (what a budget
    bounds); a stack frame alone (a local array) is not a spill."""
    return max(res["spill_stores"], res["spill_loads"])


# ------------------------------------------------------------------------------------ budgets
def load_budgets(path: Path = BUDGETS):
    """(variants {name: {"regs", "spill", "smem"}}, targets [{"match", "regs"?, "spill"?, ...}],
    open {name: reason}) from bench/triton_budgets.json."""
    data = json.loads(Path(path).read_text())
    return data["variants"], data["targets"], data.get("open", {})


def over_budget(res, budget) -> list:
    """What of one compile (one cc) exceeds its variant's budget: ["regs 70 > 64", ...]."""
    got = {"regs": res["regs"], "spill": spill(res), "smem": res["smem"]}
    return [f"{k} {got[k]} > {budget[k]}" for k in ("regs", "spill", "smem") if got[k] > budget[k]]


def targets_for(name: str, is_default: bool, targets) -> list:
    """The issue's acceptance targets that apply to a variant (``match``: a regex on its name;
    ``defaults_only``: only where ``backend="auto"`` runs it)."""
    return [t for t in targets if re.search(t["match"], name) and (is_default or not t.get("defaults_only"))]


def misses_target(budget, target) -> list:
    """Where a budget is looser than a target: ["regs 77 > 64", ...]."""
    return [f"{k} {budget[k]} > {target[k]}" for k in ("regs", "spill", "smem") if k in target and budget[k] > target[k]]


def tightened(budget, measured) -> dict:
    """A budget lowered to a variant's measurements over every cc (never raised).  Registers are
    rounded up to a multiple of 8: occupancy only changes at that step (256 a warp), so the
    budget allows what cannot change warps/SM and catches what can."""
    regs = max(r["regs"] for r in measured)
    new = {"regs": min(budget["regs"], math.ceil(regs / 8) * 8),
           "spill": min(budget["spill"], max(spill(r) for r in measured)),
           "smem": min(budget["smem"], max(r["smem"] for r in measured))}
    return new


# -------------------------------------------------------------------------------------- table
def render_table(results, names, defaults, num_warps, budgets, header: str) -> str:
    """Markdown: one row a variant, per cc the measured columns and warps/SM, then the budget.
    ``results``: {cc: {name: {column: int}}}."""
    cols = [f"sm_{cc} {c}" for cc in CCS for c in TABLE_COLUMNS]
    lines = [header.rstrip(), "",
             "| variant | default | warps | " + " | ".join(cols) + " | budget regs / spill / smem |",
             "|---|---|---:|" + "---:|" * len(cols) + "---|"]
    for name in names:
        cells = []
        for cc in CCS:
            r = results[cc][name]
            cells += [str(r[c]) for c in COLUMNS] + [str(occupancy(r["regs"], r["smem"], num_warps[name], cc))]
        b = budgets.get(name)
        bud = f"{b['regs']} / {b['spill']} / {b['smem']}" if b else "none"
        lines.append(f"| {name} | {'yes' if defaults[name] else 'no'} | {num_warps[name]} | " + " | ".join(cells)
                     + f" | {bud} |")
    return "\n".join(lines) + "\n"


def parse_table(text: str):
    """(triton version, {variant: {cc: {column: int}}}, {variant: "yes"/"no"}, {variant: warps}),
    the measured columns of a table render_table wrote (warps/SM is derived, checked apart)."""
    version = re.search(r"triton ([\w.+-]+)\.", text)
    rows, defaults, warps, occ = {}, {}, {}, {}
    n = len(TABLE_COLUMNS)
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 + len(CCS) * n and cells[2].isdigit():
            vals = [int(c) for c in cells[3:3 + len(CCS) * n]]
            rows[cells[0]] = {cc: dict(zip(TABLE_COLUMNS, vals[i * n:(i + 1) * n])) for i, cc in enumerate(CCS)}
            defaults[cells[0]], warps[cells[0]] = cells[1], int(cells[2])
    return (version.group(1) if version else None), rows, defaults, warps
