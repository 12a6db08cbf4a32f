"""Microbenchmark of the sparse soft-target KL: calft vs the baselines, forward and forward+backward.

    python -m benchmarks.kernels --quick                 # CPU, small shapes, ~1 min
    python -m benchmarks.kernels                         # CPU, acceptance shapes, ~5 min
    python -m benchmarks.kernels --device cuda           # GPU (bf16), SmolLM2/Qwen3/Llama-3 shapes
    python -m benchmarks.kernels --list                  # the cases, without running them

Two ops: "loss" (logits [N, V] given: calft.losses.soft_target_kl) and "linear" (hidden [N, H] and
LM head [V, H]: calft.losses.linear_soft_target_kl). Baselines, measured in the same run and
imported from tests/test_losses.py (where their values are checked against the float64
reference): "loop" = one log_softmax + index_select per trained position; "dense" = KL over
materialized logits with a dense target; "compiled" = torch.compile of "dense"; "liger" =
Liger-Kernel's fused linear cross-entropy (CUDA, K = 1, when installed). "calft" uses the default
backend (Triton on CUDA, torch on CPU); on CUDA "calft-torch" forces the torch path.
Reported: median ms after warm-up, peak extra memory (benchmarks/common.py says how it is
measured), and each baseline's time and memory relative to calft. On CUDA also the achieved
GB/s (loss: the logits are read once forward, read + gradient written backward) or TFLOP/s
(linear: 2NVH flops per matmul; 1 forward, 3 backward with a trainable head) against H200 peaks.
Rows N are the trained positions (a calibration batch: 8 prompts x ~11 answer positions = 88).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# `python benchmarks/X.py` puts benchmarks/ first on sys.path, where this file would shadow the
# `kernels` package that transformers probes for: put the repository root there instead.
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.common import (cpu_memory_env, format_table, machine_info, peak_extra_bytes,
                               time_fn, write_json)
from calft.losses import SparseTargets, linear_soft_target_kl, soft_target_kl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_losses import dense_kl, dense_linear_kl, per_position_loop_kl  # noqa: E402

# H200 SXM peaks (NVIDIA datasheet): HBM3e bandwidth and dense bf16 tensor-core throughput. The
# datasheet's 989 TFLOP/s is not reached by any real matmul; on CUDA the run also measures what a
# plain bf16 torch.mm of 8192^3 achieves on the same GPU (measured_bf16_mm_flop_s, about 790 TFLOP/s
# on an H200 here) and reports each fused kernel's throughput against that too.
H200_HBM_BYTES_PER_S = 4.8e12
H200_BF16_FLOP_PER_S = 989e12


@dataclass
class Case:
    op: str  # "loss" or "linear"
    N: int
    V: int
    K: int
    H: int = 0
    methods: tuple = ("calft", "loop", "dense", "compiled")
    note: str = ""
    results: list = field(default_factory=list)

    @property
    def name(self) -> str:
        h = f" H={self.H}" if self.op == "linear" else ""
        return f"{self.op} N={self.N} V={self.V}{h} K={self.K}"


def cpu_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("loss", 32, 32768, 11), Case("linear", 256, 8192, 11, H=256)]
    return [
        Case("loss", 88, 151936, 11, note="acceptance: calft >= 20x faster than loop (fwd+bwd)"),
        Case("loss", 88, 49152, 1, methods=("calft", "loop", "dense")),
        Case("loss", 88, 49152, 1000, methods=("calft", "loop", "dense")),
        Case("linear", 88, 151936, 11, H=1024, methods=("calft", "loop", "dense")),
        Case("linear", 2048, 49152, 11, H=576, methods=("calft", "dense"),
             note="acceptance: calft peak extra memory <= 1/8 of dense"),
    ]


def issue10_cases() -> list[Case]:
    """The GPU-readiness shapes (issue 10): N = 8192; (H, V) of Qwen3-1.7B, Llama-3-8B and
    Qwen3-0.6B-like heads; K = 11 (digit tries) and K = 1000 (3-digit tokens); the hard-target
    fused baselines (Liger FLCE, Apple CCE) at K = 1 where importable."""
    cases = []
    for H, V in ((2048, 151936), (4096, 128256), (896, 151936)):
        for K in (11, 1000):
            cases.append(Case("linear", 8192, V, K, H=H, methods=("calft", "dense", "compiled")))
        cases.append(Case("linear", 8192, V, 1, H=H, methods=("calft", "dense", "liger", "cce")))
    return cases


def cuda_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("loss", 8192, 151936, 11), Case("linear", 8192, 151936, 11, H=2048)]
    base = ("calft", "calft-torch", "dense")
    cases = [
        Case("loss", 88, 151936, 11, methods=("calft", "calft-torch", "loop", "dense")),
        Case("loss", 8192, 151936, 11, methods=base + ("compiled",), note="target: >= 70% of HBM"),
        Case("loss", 8192, 151936, 1, methods=base),
        Case("loss", 8192, 151936, 1000, methods=base),
        Case("loss", 8192, 128256, 11, methods=base),
        Case("linear", 88, 49152, 11, H=576, methods=("calft", "calft-torch", "loop", "dense")),
        Case("linear", 88, 151936, 11, H=1024, methods=("calft", "loop", "dense")),
        Case("linear", 2048, 49152, 11, H=576, methods=base),
        Case("linear", 2048, 151936, 11, H=1024, methods=base),
        Case("linear", 8192, 151936, 11, H=2048, methods=base + ("compiled",),
             note="target: faster than compiled, >= 50% bf16 peak, memory <= 10% of dense"),
        Case("linear", 8192, 151936, 1, H=2048, methods=("calft", "dense", "liger")),
        Case("linear", 2048, 151936, 1000, H=2048, methods=("calft", "dense")),
        Case("linear", 8192, 128256, 11, H=4096, methods=("calft", "dense")),
    ]
    return cases


# ------------------------------------------------------------------------------------------------
# Setup factory: one function builds every input of a case.

def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random inputs with realistic scales; targets: K consecutive ids per row (digits are
    consecutive token ids too) at a random offset, random probabilities summing to 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # big tensors are drawn where they live
    N, V, K = case.N, case.V, case.K
    start = torch.randint(0, V - K + 1, (N, 1), generator=g)
    ids = (start + torch.arange(K)).reshape(-1)
    p = torch.rand(N, K, generator=g) + 0.05
    probs = (p / p.sum(1, keepdim=True)).reshape(-1)
    row_ptr = torch.arange(N + 1, dtype=torch.int64) * K
    targets = SparseTargets(row_ptr, ids, probs).to(device)
    out = {"targets": targets, "labels": ids.reshape(N, K)[:, 0].to(device)}
    if case.op == "loss":
        out["logits"] = (torch.randn(N, V, generator=gd, device=device) * 2).to(dtype)
    else:
        H = case.H
        out["hidden"] = torch.randn(N, H, generator=gd, device=device).to(dtype)
        out["weight"] = (torch.randn(V, H, generator=gd, device=device) / H**0.5).to(dtype)
    return out


def loss_fn(method: str, case: Case, compiled_cache: dict):
    """fn(inputs) -> scalar loss (mean over rows) for one method."""
    if case.op == "loss":
        table = {
            "calft": lambda x: soft_target_kl(x["logits"], x["targets"], validate=False),
            "calft-torch": lambda x: soft_target_kl(x["logits"], x["targets"], validate=False,
                                                    backend="torch"),
            "loop": lambda x: per_position_loop_kl(x["logits"], x["targets"]),
            "dense": lambda x: dense_kl(x["logits"], x["targets"]),
        }
        dense = dense_kl
    else:
        table = {
            "calft": lambda x: linear_soft_target_kl(x["hidden"], x["weight"], x["targets"],
                                                     validate=False),
            "calft-torch": lambda x: linear_soft_target_kl(x["hidden"], x["weight"], x["targets"],
                                                           validate=False, backend="torch"),
            "loop": lambda x: per_position_loop_kl(x["hidden"] @ x["weight"].t(), x["targets"]),
            "dense": lambda x: dense_linear_kl(x["hidden"], x["weight"], x["targets"]),
            "liger": _liger_fn(),
            "cce": _cce_fn(),
        }
        dense = dense_linear_kl
    if method == "compiled":
        # One compiled function per op; dynamic=False so each shape gets its own specialization.
        key = case.op
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(dense, dynamic=False)
        fn = compiled_cache[key]
        if case.op == "loss":
            return lambda x: fn(x["logits"], x["targets"])
        return lambda x: fn(x["hidden"], x["weight"], x["targets"])
    return table[method]


def _liger_fn():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    ce = LigerFusedLinearCrossEntropyLoss()
    return lambda x: ce(x["weight"], x["hidden"], x["labels"])


def _cce_fn():
    """Apple's Cut Cross-Entropy (hard targets), when the cut_cross_entropy wheel is installed."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["labels"])


def method_available(method: str, case: Case, device: str, skip_compile: bool) -> str | None:
    """None if the method runs here, else why not."""
    if method == "compiled" and skip_compile:
        return "--no-compile"
    if method == "liger":
        if device != "cuda":
            return "Liger-Kernel needs CUDA"
        if case.K != 1:
            return "Liger is hard-target only (K=1)"
        if _liger_fn() is None:
            return "liger_kernel not installed"
    if method == "cce":
        if device != "cuda":
            return "Cut Cross-Entropy needs CUDA"
        if case.K != 1:
            return "CCE is hard-target only (K=1)"
        if _cce_fn() is None:
            return "cut_cross_entropy not installed"
    return None


def prepare(method: str, case: Case, args, compiled_cache: dict):
    """Inputs (leaves requiring grad) and the forward / forward+backward closures."""
    inputs = make_inputs(case, getattr(torch, args.dtype), args.device)
    leaves = [inputs[k] for k in ("logits", "hidden", "weight") if k in inputs]
    for t in leaves:
        t.requires_grad_(True)
    f = loss_fn(method, case, compiled_cache)

    def fwd():
        f(inputs)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        f(inputs).backward()

    return leaves, fwd, fwd_bwd


def measure_memory(cases: list[Case], args, compiled_cache: dict) -> dict:
    """{case name: {method: peak extra bytes of one forward+backward, after one warm-up}}."""
    peaks = {}
    for case in cases:
        for method in case.methods:
            if method_available(method, case, args.device, args.no_compile):
                continue
            leaves, fwd, fwd_bwd = prepare(method, case, args, compiled_cache)
            # Warm-up: lazy initialization out of the measurement (a forward suffices, except
            # for torch.compile, whose backward graph is compiled on the first backward).
            fwd_bwd() if method == "compiled" else fwd()
            for t in leaves:
                t.grad = None  # freed before the baseline is read, so it is not under-counted
            peaks.setdefault(case.name, {})[method] = peak_extra_bytes(fwd_bwd, args.device)
            print(f"  memory {case.name:40s} {method:12s} {peaks[case.name][method] / 2**20:9.1f} MB",
                  flush=True)
            del leaves, fwd, fwd_bwd
    return peaks


def cpu_peaks_in_child(argv: list[str]) -> dict:
    """Run the memory pass in a child process with the allocator setting it needs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peaks.json"
        cmd = [sys.executable, "-m", "benchmarks.kernels", *argv, "--memory-out", str(path)]
        subprocess.run(cmd, env=cpu_memory_env(), cwd=ROOT, check=True)
        return json.loads(path.read_text())


def run_case(case: Case, args, compiled_cache: dict, peaks: dict) -> None:
    dtype = getattr(torch, args.dtype)
    for method in case.methods:
        why = method_available(method, case, args.device, args.no_compile)
        if why:
            case.results.append({"method": method, "skipped": why})
            continue
        leaves, fwd, fwd_bwd = prepare(method, case, args, compiled_cache)
        row = {"method": method}
        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            timing = time_fn(fn, args.device, warmup=args.warmup, repeats=args.repeats,
                             budget_s=args.budget)
            row[f"{mode}_ms"] = 1e3 * timing["median_s"]
            row[f"{mode}_first_call_ms"] = 1e3 * timing["first_call_s"]
            row[f"{mode}_samples_ms"] = [1e3 * s for s in timing["samples_s"]]
            row[f"{mode}_repeats"] = timing["repeats"]
        if args.device == "cuda":
            for t in leaves:
                t.grad = None
            peaks.setdefault(case.name, {})[method] = peak_extra_bytes(fwd_bwd, args.device)
        peak = peaks.get(case.name, {}).get(method)
        row["fwd_bwd_peak_mb"] = None if peak is None else peak / 2**20
        if args.device == "cuda":
            add_throughput(row, case, dtype, getattr(args, "mm_flop_s", None))
        case.results.append(row)
        del leaves, fwd, fwd_bwd
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {case.name:40s} {method:12s} fwd {row['fwd_ms']:10.2f} ms   fwd+bwd "
              f"{row['fwd_bwd_ms']:10.2f} ms", flush=True)
    ours = next((r for r in case.results if r["method"] == "calft" and "fwd_ms" in r), None)
    for r in case.results:
        if ours and "fwd_ms" in r:
            r["fwd_bwd_time_vs_calft"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
            r["fwd_time_vs_calft"] = r["fwd_ms"] / ours["fwd_ms"]
            if r.get("fwd_bwd_peak_mb") and ours.get("fwd_bwd_peak_mb"):
                r["peak_vs_calft"] = r["fwd_bwd_peak_mb"] / ours["fwd_bwd_peak_mb"]


def measure_bf16_mm_flop_s(n: int = 8192, repeats: int = 10) -> float:
    """What a dense bf16 matmul achieves on this GPU: the practical compute ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) * 1e-3)


def add_throughput(row: dict, case: Case, dtype: torch.dtype, mm_flop_s: float | None = None) -> None:
    """Achieved bandwidth (loss) or matmul throughput (linear) against the H200 peaks."""
    N, V = case.N, case.V
    if case.op == "loss":
        elt = torch.empty((), dtype=dtype).element_size()
        fwd_bytes, bwd_bytes = N * V * elt, 3 * N * V * elt  # read; + read and write grad
        row["fwd_gb_s"] = fwd_bytes / row["fwd_ms"] * 1e-6
        row["fwd_bwd_gb_s"] = bwd_bytes / row["fwd_bwd_ms"] * 1e-6
        row["fwd_bwd_hbm_frac"] = row["fwd_bwd_gb_s"] * 1e9 / H200_HBM_BYTES_PER_S
        row["fwd_hbm_frac"] = row["fwd_gb_s"] * 1e9 / H200_HBM_BYTES_PER_S
    else:
        mm = 2 * N * V * case.H
        row["fwd_tflop_s"] = mm / row["fwd_ms"] * 1e-9
        row["fwd_bwd_tflop_s"] = 4 * mm / row["fwd_bwd_ms"] * 1e-9
        row["fwd_bwd_peak_frac"] = row["fwd_bwd_tflop_s"] * 1e12 / H200_BF16_FLOP_PER_S
        if mm_flop_s:
            row["fwd_bwd_mm_frac"] = row["fwd_bwd_tflop_s"] * 1e12 / mm_flop_s


def acceptance(cases: list[Case], device: str) -> list[dict]:
    """The issue's acceptance checks that this run can evaluate."""
    def get(case, method, key):
        r = next((r for r in case.results if r["method"] == method), {})
        return r.get(key)

    checks = []
    for c in cases:
        if device == "cuda" and c.op == "linear" and c.N == 8192 and "compiled" in c.methods:
            # the GPU targets: fwd+bwd within 1.5x of torch.compile(dense) at <= 10% of its memory
            t = get(c, "compiled", "fwd_bwd_time_vs_calft")  # compiled time / calft time
            m = get(c, "compiled", "peak_vs_calft")  # compiled peak / calft peak
            checks += [
                {"check": f"{c.name}: calft fwd+bwd time <= 1.5x torch.compile(dense)",
                 "value": None if t is None else 1 / t, "pass": t is not None and 1 / t <= 1.5},
                {"check": f"{c.name}: calft peak memory <= 10% of torch.compile(dense)",
                 "value": None if m is None else 1 / m, "pass": m is not None and 1 / m <= 0.1},
            ]
        if device == "cuda" and c.op == "linear" and c.N == 8192 and c.K == 1:
            for other in ("liger", "cce"):
                t = get(c, other, "fwd_bwd_time_vs_calft")
                if t is not None:
                    checks.append({"check": f"{c.name}: calft fwd+bwd no slower than {other} (time {other}/calft)",
                                   "value": t, "pass": t >= 1.0})
        if device == "cpu" and c.op == "loss" and c.N == 88 and c.V == 151936 and c.K <= 11:
            ratio = get(c, "loop", "fwd_bwd_time_vs_calft")
            checks.append({"check": f"{c.name}: loop / calft fwd+bwd time >= 20", "value": ratio,
                           "pass": ratio is not None and ratio >= 20})
        if device == "cpu" and c.op == "linear" and (c.N, c.V, c.H) == (2048, 49152, 576):
            ratio = get(c, "dense", "peak_vs_calft")
            checks.append({"check": f"{c.name}: dense / calft peak memory >= 8", "value": ratio,
                           "pass": ratio is not None and ratio >= 8})
        if device == "cuda" and c.op == "loss" and (c.N, c.V) == (8192, 151936) and c.K == 11:
            frac = get(c, "calft", "fwd_bwd_hbm_frac")
            checks.append({"check": f"{c.name}: fwd+bwd >= 70% of HBM bandwidth", "value": frac,
                           "pass": frac is not None and frac >= 0.7})
        if device == "cuda" and c.op == "linear" and (c.N, c.V, c.H, c.K) == (8192, 151936, 2048, 11):
            frac = get(c, "calft", "fwd_bwd_peak_frac")
            vs = get(c, "compiled", "fwd_bwd_time_vs_calft")
            mem = get(c, "dense", "peak_vs_calft")
            checks += [
                {"check": f"{c.name}: >= 50% of bf16 peak", "value": frac,
                 "pass": frac is not None and frac >= 0.5},
                {"check": f"{c.name}: faster than compiled dense", "value": vs,
                 "pass": vs is not None and vs > 1},
                {"check": f"{c.name}: peak memory <= 10% of dense", "value": mem,
                 "pass": mem is not None and mem >= 10},
            ]
    return checks


COLUMNS = [
    ("case", "case", ""), ("method", "method", ""), ("fwd_ms", "fwd ms", ".2f"),
    ("fwd_bwd_ms", "fwd+bwd ms", ".2f"), ("fwd_bwd_peak_mb", "peak MB", ".1f"),
    ("fwd_bwd_time_vs_calft", "time/calft", ".2f"), ("peak_vs_calft", "mem/calft", ".2f"),
]
CUDA_COLUMNS = [("fwd_bwd_gb_s", "GB/s", ".0f"), ("fwd_bwd_hbm_frac", "HBM frac", ".2f"),
                ("fwd_bwd_tflop_s", "TFLOP/s", ".0f"), ("fwd_bwd_peak_frac", "bf16 frac", ".2f"),
                ("fwd_bwd_mm_frac", "of torch.mm", ".2f")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (a smoke run)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="input dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median; default 3 cpu / 10 cuda)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (>= 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--shapes", choices=("default", "issue10"), default="default",
                        help="issue10 = N=8192 x (H,V) in (2048,151936), (4096,128256), (896,151936), K=11/1000, "
                             "plus Liger/CCE at K=1 (meant for --device cuda)")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<device>[_quick].json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on cpu: per-core numbers that a busy shared machine "
                             "does not distort through thread-pool barriers; 0 = torch's default)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed calls per measurement at most (fewer repeats for slow baselines)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--memory-out", type=Path, default=None, help=argparse.SUPPRESS)  # child process
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call includes compilation)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (2 if args.quick else 3 if args.device == "cpu" else 10)
    cases = issue10_cases() if args.shapes == "issue10" else (cuda_cases if args.device == "cuda" else cpu_cases)(args.quick)
    cases = [c for c in cases if args.only in c.name]
    if args.list:
        for c in cases:
            print(f"{c.name:45s} methods={','.join(c.methods)}  {c.note}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled_cache: dict = {}
    if args.memory_out is not None:  # the CPU memory pass (a child of the run below)
        write_json(args.memory_out, measure_memory(cases, args, compiled_cache))
        return 0
    suffix = "_quick" if args.quick else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels_{args.device}{suffix}.json"
    print(f"device={args.device} dtype={args.dtype} repeats={args.repeats} warmup={args.warmup} "
          f"threads={torch.get_num_threads()}", flush=True)
    peaks = cpu_peaks_in_child(raw_argv) if args.device == "cpu" else {}
    if args.device == "cuda":
        args.mm_flop_s = measure_bf16_mm_flop_s()
        print(f"bf16 torch.mm 8192^3 on this GPU: {args.mm_flop_s * 1e-12:.0f} TFLOP/s", flush=True)
    for c in cases:
        run_case(c, args, compiled_cache, peaks)
    rows = [dict(r, case=c.name) for c in cases for r in c.results if "fwd_ms" in r]
    columns = COLUMNS + (CUDA_COLUMNS if args.device == "cuda" else [])
    print()
    print(format_table(rows, columns))
    skipped = [f"{c.name} {r['method']}: {r['skipped']}" for c in cases for r in c.results if "skipped" in r]
    if skipped:
        print("skipped: " + "; ".join(skipped))
    checks = acceptance(cases, args.device)
    for chk in checks:
        value = "-" if chk["value"] is None else f"{chk['value']:.3g}"
        print(f"[{'PASS' if chk['pass'] else 'FAIL'}] {chk['check']} (measured {value})")
    payload = {
        "benchmark": "kernels", "device": args.device, "dtype": args.dtype, "quick": args.quick,
        "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "machine": machine_info(args.device),
        "peaks": {"h200_hbm_bytes_per_s": H200_HBM_BYTES_PER_S, "h200_bf16_flop_per_s": H200_BF16_FLOP_PER_S,
                  "measured_bf16_mm_flop_s": getattr(args, "mm_flop_s", None)},
        "cases": [asdict(c) | {"name": c.name} for c in cases], "acceptance": checks,
    }
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
