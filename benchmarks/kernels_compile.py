"""Compile every Triton kernel of calft.kernels for sm_80 (A100) and sm_90 (H100/H200) on a CPU.

    python benchmarks/kernels_compile.py                 # table + benchmarks/results/kernels_compile_sm80_sm90.json
    python benchmarks/kernels_compile.py --out x.json --archs 90

No GPU is needed: `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cap, 32))` lowers each kernel to PTX and runs Triton's bundled ptxas
with `-v`; the ptxas log (printed when `knobs.nvidia.dump_ptxas_log` is set) gives registers
per thread and spill bytes. Variants = what the launch sites use: every kernel x input dtype
(fp32, bf16, fp16) x bias or not, with the constexprs (block sizes, BLOCK_S, DOT_PRECISION) and
num_warps / num_stages that the heuristics of calft.kernels choose for the issue-10 benchmark
shapes (N = 8192; (H, V) = (2048, 151936), (4096, 128256), (896, 151936)) and for a small
calibration batch (N = 88), on 108 SMs (A100) and 132 (H100/H200).

TRITON_INTERPRET must be unset: under it `@triton.jit` returns an InterpretedFunction, which
cannot be lowered. The script removes it from its own environment before importing Triton, so
it works when called from the test suite (tests/conftest.py sets it) as a subprocess. A fresh
Triton cache directory is used so that ptxas really runs (a cache hit prints no log).
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported (see the docstring)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

SHAPES = [(8192, 2048, 151936), (8192, 4096, 128256), (8192, 896, 151936), (88, 896, 151936)]  # (N, H, V)
SMS = {80: 108, 90: 132}  # A100; H100 / H200
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
DATA_PTRS = {"logits_ptr", "grad_ptr", "h_ptr", "w_ptr", "b_ptr", "g_ptr"}  # in the input dtype
INT64_PTRS = {"row_ptr_ptr", "ids_ptr"}


def signature(fn, dtype: str, constexprs: dict):
    """Triton signature + attrs of `fn`: data pointers in `dtype`, CSR indices int64, the rest
    fp32; scalars i32 except inv_tau; pointers and row strides 16-aligned (as torch allocates)."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            assert name in constexprs, f"{fn.__name__}: no value for constexpr {name}"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in DATA_PTRS else "i64" if name in INT64_PTRS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "inv_tau" else "i32"
            if name.endswith("row_stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def variants(cap: int):
    """(kernel fn, dtype, has_bias, constexprs, options) for every launch the heuristics make."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from calft.kernels import linear_sparse_kl as lk
    from calft.kernels import sparse_kl as sk
    from calft.kernels.utils import dot_precision, split_vocab

    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    target = 4 * SMS[cap]  # utils.num_programs_target on that GPU
    out = {}
    for N, H, V in SHAPES:
        bv_s = sk._block_v(V, None)
        _, splits_s = split_vocab(V, bv_s, N, target)
        gather_bh = min(64, max(16, triton.next_power_of_2(H)))
        for dt in DTYPES:
            bn, bv, bh = lk._blocks(N, V, H, dtype=torch_dtype[dt])
            _, splits_l = split_vocab(V, bv, triton.cdiv(N, bn), 2 * target)
            prec = dot_precision(torch_dtype[dt])
            lin_opts = lk._launch_opts(False, torch_dtype[dt])
            rows = [
                (sk.sparse_kl_lse_partial_kernel, dt, None, dict(BLOCK_V=bv_s), dict(num_warps=sk._num_warps(bv_s))),
                (sk.sparse_kl_forward_kernel, dt, None,
                 dict(BLOCK_S=max(2, triton.next_power_of_2(splits_s)), BLOCK_K=sk.BLOCK_K), dict(num_warps=4)),
                (sk.sparse_kl_backward_kernel, dt, None, dict(BLOCK_V=bv_s), dict(num_warps=sk._num_warps(bv_s))),
                (sk.sparse_kl_target_grad_kernel, dt, None, dict(BLOCK_K=sk.BLOCK_K), dict(num_warps=4)),
            ]
            for bias in (False, True):
                common = dict(HAS_BIAS=bias, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=False, DOT_PRECISION=prec)
                rows += [
                    (lk.linear_sparse_kl_lse_partial_kernel, dt, bias, common, lin_opts),
                    (lk.linear_sparse_kl_forward_kernel, dt, bias,
                     dict(HAS_BIAS=bias, BLOCK_S=max(2, triton.next_power_of_2(splits_l)),
                          BLOCK_K=lk.GATHER_BLOCK_K, BLOCK_H=gather_bh), {}),
                    (lk.linear_sparse_kl_dlogits_kernel, dt, bias, common, lin_opts),
                ]
            for fn, d, b, cx, opts in rows:
                key = (fn.__name__, d, b, tuple(sorted(cx.items())), tuple(sorted(opts.items())))
                out.setdefault(key, (fn, d, b, cx, opts))
    return list(out.values())


PTXAS_RE = {
    "n_regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def compile_one(fn, dtype, constexprs, options, cap):
    """Compile for sm_<cap>; returns the parsed ptxas -v numbers, shared memory and seconds."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    sig, attrs = signature(fn, dtype, constexprs)
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                                options=dict(options))
    seconds = time.perf_counter() - t0
    log = buf.getvalue()
    row = {k: int(m.group(1)) if (m := rx.search(log)) else None for k, rx in PTXAS_RE.items()}
    if row["n_regs"] is None:
        raise RuntimeError(f"{fn.__name__}: no ptxas -v log captured (Triton cache hit?):\n{log[-2000:]}")
    row.update(shared_bytes=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
               compile_s=seconds)
    return row


def run(archs, out_path: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas must run for every variant
        for cap in archs:
            for fn, dtype, bias, cx, opts in variants(cap):
                r = compile_one(fn, dtype, cx, opts, cap)
                rows.append(dict(arch=f"sm_{cap}", kernel=fn.__name__, dtype=dtype, bias=bias,
                                 constexprs={k: v for k, v in cx.items()}, options=dict(opts), **r))
    if out_path is not None:
        from benchmarks.common import machine_info, write_json

        import triton

        write_json(out_path, {"benchmark": "kernels_compile", "triton": triton.__version__,
                              "machine": machine_info("cpu"), "shapes_N_H_V": SHAPES, "sms": SMS,
                              "variants": len(rows), "spills": sum(r["spill_stores"] + r["spill_loads"] for r in rows),
                              "rows": rows})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_compile_sm80_sm90.json",
                        help="JSON path ('' = do not write)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run([int(a) for a in args.archs.split(",")], args.out if str(args.out) else None)
    from benchmarks.common import format_table

    print(format_table(rows, [("arch", "arch", ""), ("kernel", "kernel", ""), ("dtype", "dtype", ""),
                              ("bias", "bias", ""), ("num_warps", "warps", "d"), ("n_regs", "regs", "d"),
                              ("spill_stores", "spill st B", "d"), ("spill_loads", "spill ld B", "d"),
                              ("shared_bytes", "smem B", "d"), ("compile_s", "s", ".1f")]))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} variants compiled in {time.perf_counter() - t0:.0f} s; {len(spills)} with spills")
    if str(args.out):
        print(f"wrote {args.out}")
    sys.exit(1 if spills else 0)


if __name__ == "__main__":
    main()
