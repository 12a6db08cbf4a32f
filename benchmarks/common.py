"""Shared benchmark helpers: timing, peak memory, machine info, the table and the JSON file.

Timing: median wall time over `repeats` calls after `warmup` calls (CUDA: synchronized).
Peak memory: the extra bytes a call holds at its peak, over what was live before it:
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    memory_allocated() before the call (exact for the caching allocator's tensors).
  * CPU: torch keeps no statistics for its CPU allocator, so we read the kernel's peak resident
    set: /proc/self/clear_refs ("5") resets VmHWM to the current VmRSS, and the peak of the call
    is VmHWM - VmRSS(before). For this to track tensors, freed memory must go back to the OS
    at once: glibc serves allocations above MALLOC_MMAP_THRESHOLD_ with mmap and returns them on
    free, and fixing the threshold (64 KiB) stops glibc from raising it dynamically.
    `cpu_memory_env()` is the environment for a child process that measures. Untouched
    pages are not counted (torch.empty never written is free), which is also true of real RAM.
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

MMAP_THRESHOLD = "65536"


def cpu_memory_env() -> dict:
    """Environment for a child process that measures CPU peak memory (module docstring).
    Timing stays in a process with glibc's default policy: a fixed threshold would turn every
    allocation above 64 KiB into fresh, page-faulting memory and slow allocation-heavy code."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, *, warmup: int = 1, repeats: int = 5, budget_s: float | None = None) -> dict:
    """Median seconds of fn() over `repeats` calls after `warmup` calls, plus every sample.

    budget_s caps the timed calls for slow baselines: repeats becomes
    max(1, budget_s // (last warm-up time)), recorded in the result."""
    first = last = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - t0
        first = last if i == 0 else first
    if budget_s is not None and last:
        repeats = max(1, min(repeats, int(budget_s // last)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "samples_s": samples, "first_call_s": first,
            "repeats": repeats}


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD
    except OSError:
        return False


def peak_extra_bytes(fn, device: str):
    """Extra bytes at the peak of one fn() call (module docstring); None if not measurable."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not cpu_peak_supported():
        return None
    base = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _proc_status_kb("VmHWM") - base) * 1024


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Text table; columns = (key, header, format spec). Missing values print as '-'."""
    def cell(row, key, spec):
        v = row.get(key)
        return "-" if v is None else format(v, spec) if spec else str(v)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
