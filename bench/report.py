"""What every benchmark writes beside its table: its results and the machine they come from, as JSON.

Benchmarks are run from the repository root as modules (`python -m bench.NAME`), so they share this.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name and the int8 matrix instructions it offers, which decide how far batching gains.

    platform.processor() is empty on Linux, and two x86_64 VMs here differ about fivefold in batched int8 speed.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())}
    name = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    extras = [flag for flag in ("avx512_vnni", "amx_int8") if flag in flags]
    return f"{name} ({', '.join(extras)})" if extras else name


def host() -> dict:
    """The machine as it was when the results were written: speed numbers mean little without it."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
    }


def write_json(path: str | Path, results: dict, quiet: bool = False) -> Path:
    """`results` and `host()` as indented JSON at `path` (its folder made if need be)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results | {"host": host()}, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print(f"wrote {out}")
    return out


def ratio_text(value: float | None, base: float | None, width: int) -> str:
    """`value ÷ base` as "1.23×", right-aligned in `width` characters; blank where there is nothing to compare
    (a missing number, or a base of 0)."""
    if value is None or not base:
        return " " * width
    return f"{value / base:>{width - 1}.2f}×"
