"""The Triton kernels compile for sm_80 (A100) and sm_90 (H100/H200) on this CPU, without spills.

benchmarks/kernels_compile.py does the work (every kernel at every dtype / bias / constexpr set
the launch heuristics choose for the benchmark shapes; Triton's bundled ptxas with -v). It runs as
a subprocess, one per architecture in parallel: TRITON_INTERPRET=1 (set by conftest.py for the
interpreter tests) turns @triton.jit into an InterpretedFunction, which cannot be lowered, so
the script drops it before importing Triton.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    procs = {cap: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "kernels_compile.py"),
                                    "--archs", str(cap), "--out", str(tmp_path / f"sm{cap}.json")],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cap in (80, 90)}
    for cap, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        rows = json.loads((tmp_path / f"sm{cap}.json").read_text())["rows"] if (tmp_path / f"sm{cap}.json").exists() else []
        spills = [f"{r['kernel']} {r['dtype']} bias={r['bias']}: {r['spill_stores']}/{r['spill_loads']} B"
                  for r in rows if r["spill_stores"] or r["spill_loads"]]
        assert proc.returncode == 0 and not spills, f"sm_{cap}: {spills}\n{out[-4000:]}"
        kernels = {r["kernel"] for r in rows}
        assert len(kernels) == 7 and {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}, kernels
        assert all(r["n_regs"] <= 255 for r in rows)
