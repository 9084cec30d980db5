"""What every benchmark shares: repeated timing, summary statistics, the machine, the report files.

A benchmark returns a `Result`: a name, a list of rows (one per configuration
measured, each figure a `summarise` dict of median/min/max over runs), notes and
the settings it ran with. `write_report` stores it as ``<name>.json`` and
``<name>.md`` under the output folder, with the machine described, so a number
never travels without the hardware and library versions that produced it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

#: Distributions whose versions go in every report (the ones the hot paths run on).
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "fastavro", "astropy", "isal", "confluent-kafka",
             "fastapi", "uvicorn", "httpx")


@dataclass
class Result:
    """One benchmark's outcome.

    Attributes
    ----------
    name : str
        ``decode``, ``infer``, ``e2e`` or ``api``.
    rows : list of dict
        One row per configuration; figures are `summarise` dicts.
    columns : list of (key, header)
        Row keys shown in the markdown table, in order, with their headers.
    settings : dict
        How it ran (message counts, repeats, batch sizes...).
    notes : list of str
        What a reader must know (fallbacks taken, targets met or missed...).
    targets : dict
        Target name -> {"target": ..., "measured": ..., "met": bool}.
    """

    name: str
    rows: list[dict] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    targets: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"benchmark": self.name, "settings": self.settings, "rows": self.rows,
                "targets": self.targets, "notes": self.notes}


def summarise(values: Iterable[float], digits: int = 6) -> dict:
    """Median, min and max of one figure over runs (the runs are kept too)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarise: no runs to summarise")
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def time_calls(call: Callable[[], Any], min_seconds: float, min_calls: int = 1) -> tuple[float, int]:
    """Call ``call`` until ``min_seconds`` have passed and ``min_calls`` were made.

    Returns
    -------
    (seconds per call, calls made)
    """
    calls = 0
    start = time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= min_seconds:
            return elapsed / calls, calls


# --- the machine ------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    """GPUs that nvidia-smi reports (name, memory), or none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine() -> dict:
    """CPU model and cores, memory, GPUs (or none), ONNX Runtime providers, library versions, load."""
    libraries = {name: _version(name) for name in LIBRARIES}
    libraries = {k: v for k, v in libraries.items() if v is not None}
    providers: list[str] = []
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        pass
    try:
        import confluent_kafka

        libraries["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        pass
    gpus = _gpus()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": gpus or "none",
        "onnxruntime_providers": providers,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": libraries,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was around the run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- report files -----------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if isinstance(value, dict) and "median" in value:
        return f"{_number(value['median'])} ({_number(value['min'])}–{_number(value['max'])})"
    if isinstance(value, float):
        return _number(value)
    return "" if value is None else str(value)


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(result: Result, context: dict) -> str:
    """A short markdown table of ``result`` (medians, with min–max over runs in brackets)."""
    m = context["machine"]
    lines = [f"### bench {result.name}", "",
             f"{context['started']} → {context['finished']}; {m['cpu']}, {m['cores']} cores, "
             f"GPU: {', '.join(m['gpu']) if isinstance(m['gpu'], list) else m['gpu']}; "
             f"load average before/after: {context['load_before']} / {context['load_after']}", ""]
    if result.rows and result.columns:
        lines.append("| " + " | ".join(h for _, h in result.columns) + " |")
        lines.append("|" + "|".join("---" for _ in result.columns) + "|")
        for row in result.rows:
            lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in result.columns) + " |")
        lines.append("")
        lines.append("Figures: median over runs, (min–max) in brackets.")
    for name, t in result.targets.items():
        lines.append(f"- target {name}: {t['target']} — measured {_cell(t['measured'])} — "
                     f"{'met' if t['met'] else 'MISSED'}")
    for note in result.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_report(result: Result, out_dir: str | os.PathLike, context: dict) -> dict:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {**result.to_dict(), "machine": context["machine"], "started": context["started"],
                "finished": context["finished"], "load_average_before": context["load_before"],
                "load_average_after": context["load_after"], "command": context["command"]}
    (out / f"{result.name}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / f"{result.name}.md").write_text(markdown(result, context))
    return document


def run_and_report(name: str, bench: Callable[[], Result], out_dir: str | os.PathLike,
                   machine_info: dict | None = None) -> tuple[dict, str]:
    """Run one benchmark, with the time and load around it; write its report.

    Returns
    -------
    (JSON document, markdown text)
    """
    context = {"machine": machine_info or machine(), "started": utc_now(), "load_before": load_average(),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    result = bench()
    if result.name != name:
        raise RuntimeError(f"benchmark {name!r} returned a result named {result.name!r}")
    context.update(finished=utc_now(), load_after=load_average())
    document = write_report(result, out_dir, context)
    return document, markdown(result, context)
