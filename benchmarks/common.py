"""Shared plumbing of the benchmarks and examples: provenance, timing, peak memory, JSON output.

Every result JSON carries ``run``: the command line, git commit (and whether the tracked tree
was dirty), UTC date, wall time and machine (``provenance``, ``write_result_json``).

Timing: ``time.perf_counter`` around the call; on CUDA the device is synchronised before the
clock is read on both ends (kernels are asynchronous, so without it one times the launches).

Peak memory:
* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated`` (bytes
  held by tensors through the caching allocator; the cache itself is not counted).
* CPU: ``tracemalloc`` does not see torch's allocations (they bypass Python's allocator), so we
  use the kernel's resident-set high-water mark instead: writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0); after
  the call, ``VmHWM - VmRSS(before)`` is the peak extra resident memory of the call (tensors,
  allocator slack, thread stacks; pages freed before the peak do not count twice). Where
  ``clear_refs`` is not writable we fall back to the ``resource.getrusage`` maxrss delta, which
  under-reports when an earlier call of the same process had a higher peak (method recorded).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------- provenance
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state() -> dict:
    """``{"commit": sha (without git: $MSAR_COMMIT, else "unknown"), "dirty": bool or None}``.
    ``dirty``: tracked files differ from the commit (untracked files are ignored: results and
    outputs are written into the tree)."""
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        # A copy of the tree without .git (a remote GPU machine, say): the caller may name the
        # commit it copied in MSAR_COMMIT; whether that copy was dirty is then not known here.
        return {"commit": os.environ.get("MSAR_COMMIT") or "unknown", "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def command_line() -> str:
    """How this process was started, as one would retype it: ``python -m pkg.mod args`` for a
    module run with ``-m``, else ``python path/to/script.py args``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name != "__main__" else sys.argv[:1]
    return " ".join([os.path.basename(sys.executable)] + head + sys.argv[1:])


def provenance(command: str | None = None, device: Any = None) -> dict:
    """What produced a result: the command line, the code (git commit and whether the tracked
    tree was dirty), when (UTC), and the machine.

    ``command``: the command line to record (default: this process's own, see ``command_line``).
    ``device``: where the work ran (``torch.device`` or str); default ``"cpu"``.
    """
    device = torch.device(device if device is not None else "cpu")
    g = git_state()
    machine = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "loadavg": list(os.getloadavg()),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    return {"command": command if command is not None else command_line(), "commit": g["commit"], "dirty": g["dirty"],
            "date": _utc(time.time()), "machine": machine}


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def write_result_json(path: str, payload: dict, started_at: float, command: str | None = None,
                      device: Any = None) -> str:
    """Write ``payload`` plus ``"run": provenance(...) + {"started", "wall_time_s"}`` as JSON to ``path``.

    ``started_at``: ``time.time()`` taken when the run began (``wall_time_s`` is measured from it).
    Non-finite floats become ``null``, numpy scalars and tensors plain JSON. Returns ``path``.
    """
    return _write(path, payload, _run_record(started_at, command, device))


def _run_record(started_at: float, command: str | None, device: Any) -> dict:
    if not 1e9 < started_at <= time.time():
        raise ValueError(f"started_at={started_at!r} is not a time.time() value of this run")
    run = provenance(command, device)
    run["started"] = _utc(started_at)
    run["wall_time_s"] = round(time.time() - started_at, 3)
    return run


def _write(path: str, payload: dict, run: dict) -> str:
    if "run" in payload:
        raise ValueError("payload already has a 'run' key; the provenance record is added as 'run'")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable({**payload, "run": run}), f, indent=1)
    return path


def machine_info(device: torch.device) -> dict:
    """Start record of a benchmark run (pass it to ``write_result``): where and when it began.
    ``loadavg`` matters: CPU timings taken on a loaded machine are slower than on an idle one."""
    return {"device": device, "started_at": time.time(), "loadavg_start": list(os.getloadavg())}


def write_result(name: str, info: dict, config: dict, figures: dict, out_dir: str | None = None,
                 tag: str = "") -> str:
    """Write ``{config, figures, run}`` to ``<out_dir>/<name>[_tag].json`` (``run``: see
    ``write_result_json``; its machine record adds the load average at start and end); returns the path."""
    out_dir = out_dir or os.path.join(RESULTS, name)
    run = _run_record(info["started_at"], None, info["device"])
    run["machine"]["loadavg_start"] = info["loadavg_start"]
    run["machine"]["loadavg_end"] = run["machine"].pop("loadavg")
    return _write(os.path.join(out_dir, f"{name}{'_' + tag if tag else ''}.json"), {"config": config, "figures": figures}, run)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


# ---------------------------------------------------------------------------- devices
def pick_device(gpu: bool) -> torch.device:
    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu was given but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def setup_threads(threads: int | None) -> None:
    """Default: all cores (the reference numbers were taken with torch's default threads)."""
    if threads:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall times, and the CPU time the process consumed (all its threads) per run: on a shared
    machine the CPU time is the load-robust figure (with 1 thread it is close to idle wall time)."""

    median_s: float
    min_s: float
    runs_s: list
    cpu_s: list

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "runs_s": self.runs_s,
                "process_cpu_s": self.cpu_s, "median_process_cpu_s": float(np.median(self.cpu_s))}


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(float(np.median(runs)), float(np.min(runs)), runs, cpu)


def wait_for_quiet(max_load: float, timeout_s: float) -> dict:
    """Wait (up to ``timeout_s``) until the 1-minute load average drops below ``max_load``;
    returns what was seen, for the record. ``max_load <= 0`` disables waiting."""
    t0 = time.time()
    while max_load > 0 and os.getloadavg()[0] >= max_load and time.time() - t0 < timeout_s:
        time.sleep(5)
    return {"waited_s": time.time() - t0, "loadavg": list(os.getloadavg()), "max_load": max_load}


# ---------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(key + r":\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict:
    """Run ``fn()`` once and return ``{"peak_mb": float, "method": str}`` (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": (peak - base) / 2**20, "peak_total_mb": peak / 2**20,
                "method": "torch.cuda.max_memory_allocated minus allocated before"}
    if _reset_hwm():
        before = _proc_status_kb("VmRSS")
        fn()
        hwm = _proc_status_kb("VmHWM")
        if before is not None and hwm is not None:
            return {"peak_mb": (hwm - before) / 1024, "rss_before_mb": before / 1024,
                    "method": "VmHWM after minus VmRSS before, VmHWM reset via /proc/self/clear_refs"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (after - before) / 1024,
            "method": "getrusage ru_maxrss delta (lower bound: only counts a new process-wide peak)"}


# ---------------------------------------------------------------------------- fits
def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least squares on ``log y = b log x + c``: returns exponent b, prefactor, Pearson r of the logs."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2:
        return {"exponent": float("nan"), "prefactor": float("nan"), "pearson_r": float("nan")}
    b, c = np.polyfit(lx, ly, 1)
    r = float(np.corrcoef(lx, ly)[0, 1]) if len(lx) > 2 else float("nan")
    return {"exponent": float(b), "prefactor": float(np.exp(c)), "pearson_r": r}


def savefig(fig, name: str, out_dir: str | None = None, tag: str = "") -> str:
    """Lay out, write ``<out_dir>/<name>[_tag].png`` and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    out_dir = out_dir or os.path.join(RESULTS, name)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}{'_' + tag if tag else ''}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def add_common_args(p) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, ~2 minutes on 2 CPU cores")
    p.add_argument("--gpu", action="store_true", help="run on CUDA (adds the largest sizes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<name>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (the test suite uses it to save time)")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="before each timed measurement wait until the 1-min load average is below this (0: no wait)")
    p.add_argument("--wait-timeout", type=float, default=300.0, help="longest wait for --wait-load, seconds")
