"""Tile sweep of the fused LM head + sparse KL (calft.kernels.linear_sparse_kl) on a GPU, bf16.

    python -m benchmarks.tune_linear_kl --out results.json            # the default shapes below
    python -m benchmarks.tune_linear_kl --tests BEST                  # then the GPU kernel tests at the best

Each candidate (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) replaces the module's bf16
launch constants (GPU_BLOCK_*, GPU_NUM_*), which the forward LSE kernel and the backward
dlogits kernel both read at launch. For each shape: forward and forward+backward time (median of
CUDA-event timings after a warm-up) and the largest deviation of loss and gradients from the
current default's, so a faster tile that computed something else is caught. `--tests` reruns
tests/test_kernels_gpu.py (compiled, every dtype) with the best candidate in place.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.kernels import Case, make_inputs  # noqa: E402
from calft.losses import linear_soft_target_kl  # noqa: E402

CANDIDATES = [  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); the first is the default
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 3), (128, 256, 32, 8, 4),
    (128, 128, 64, 8, 4), (128, 128, 32, 4, 5),
]
SHAPES = [(8192, 2048, 151936, 11), (8192, 4096, 128256, 11), (8192, 896, 151936, 11)]


def set_tiles(mod, tiles):
    mod.GPU_BLOCK_N, mod.GPU_BLOCK_V, mod.GPU_BLOCK_H, mod.GPU_NUM_WARPS, mod.GPU_NUM_STAGES = tiles


def cuda_ms(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_shape(N, H, V, K):
    x = make_inputs(Case("linear", N, V, K, H=H), torch.bfloat16, "cuda")
    h, w = x["hidden"].requires_grad_(True), x["weight"].requires_grad_(True)

    def fwd():
        return linear_soft_target_kl(h, w, x["targets"], validate=False)

    def fwd_bwd():
        h.grad = w.grad = None
        fwd().backward()

    fwd_bwd()
    out = (fwd().detach().float(), h.grad.float(), w.grad.float())
    return {"fwd_ms": cuda_ms(fwd), "fwd_bwd_ms": cuda_ms(fwd_bwd)}, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON with every candidate's timings")
    ap.add_argument("--tests", action="store_true", help="run the GPU kernel tests at the fastest candidate")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    import calft.kernels.linear_sparse_kl as mod

    rows, reference = [], {}
    for tiles in CANDIDATES:
        set_tiles(mod, tiles)
        row = {"tiles": tiles, "shapes": {}}
        try:
            for shape in SHAPES:
                timing, out = run_shape(*shape)
                ref = reference.setdefault(shape, out)
                timing["max_rel_dev"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                            for a, b in zip(out, ref))
                row["shapes"][str(shape)] = timing
                print(f"{tiles} N,H,V,K={shape}: fwd {timing['fwd_ms']:.2f} ms, fwd+bwd {timing['fwd_bwd_ms']:.2f} ms, "
                      f"max rel dev {timing['max_rel_dev']:.2e}", flush=True)
        except Exception as e:  # a tile that does not compile (shared memory, registers) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{tiles}: {row['error']}", flush=True)
        torch.cuda.empty_cache()
        rows.append(row)
    ok = [r for r in rows if "error" not in r and all(s["max_rel_dev"] < 2e-2 for s in r["shapes"].values())]
    best = min(ok, key=lambda r: sum(s["fwd_bwd_ms"] for s in r["shapes"].values()))
    print(f"fastest (sum of fwd+bwd over shapes): {best['tiles']}")
    if args.out:
        args.out.write_text(json.dumps({"candidates": rows, "best": best["tiles"],
                                        "device": torch.cuda.get_device_name()}, indent=1))
    if args.tests:
        import pytest

        set_tiles(mod, best["tiles"])
        return pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py", "tests/test_kernels.py", "-m", "gpu"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
