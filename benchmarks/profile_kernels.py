"""Where the time of the fused LM head + sparse KL goes on a GPU: torch.profiler over a few
forward+backward calls, CUDA kernels sorted by their total time.

    python -m benchmarks.profile_kernels                       # N=8192, H=2048, V=151936, K=11
    python -m benchmarks.profile_kernels --H 4096 --V 128256 --K 1000 --out profile.txt

The inputs are benchmarks.kernels' (same setup factory), bf16. The table names each kernel
(Triton kernels by their function name, cuBLAS GEMMs by theirs), its calls and total CUDA time, so
a missed target in the benchmark can be traced to the kernel that spends the time.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.kernels import Case, prepare  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=8192, help="trained rows")
    parser.add_argument("--H", type=int, default=2048, help="hidden size")
    parser.add_argument("--V", type=int, default=151936, help="vocabulary size")
    parser.add_argument("--K", type=int, default=11, help="target entries per row")
    parser.add_argument("--method", default="calft", help="a benchmarks.kernels method (calft, dense, compiled, ...)")
    parser.add_argument("--calls", type=int, default=5, help="profiled forward+backward calls (after 2 warm-ups)")
    parser.add_argument("--rows", type=int, default=20, help="kernels listed")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    case = Case("linear", args.N, args.V, args.K, H=args.H, methods=(args.method,))
    bench_args = argparse.Namespace(dtype="bfloat16", device="cuda")
    _, _, fwd_bwd = prepare(args.method, case, bench_args, {})
    for _ in range(2):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            fwd_bwd()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows)
    header = f"{args.method} linear N={args.N} H={args.H} V={args.V} K={args.K} bf16, {args.calls} fwd+bwd calls"
    print(header)
    print(table)
    if args.out:
        args.out.write_text(header + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
