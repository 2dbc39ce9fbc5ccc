"""Is this machine quiet enough to time anything? A warning, never a refusal.

Benchmarks compare ratios measured in one run, which only holds when nothing else competes
for the cores. Two traps seen on the 2-core dev machines: other processes (a test suite, a
second benchmark) and Linux's scheduler autogroups — with
``/proc/sys/kernel/sched_autogroup_enabled`` = 1 the scheduler shares the CPU between
*sessions* first, so ``nice`` on the other jobs does not protect a timed run (a generation
benchmark ran 8x slower beside a niced test suite). Stop the other jobs (or set autogroup to
0 as root while timing) before trusting a figure.
"""

from __future__ import annotations

import os
from pathlib import Path


def load_warning(threshold: float = 0.5) -> str | None:
    """A sentence describing why timings may be off, or None when the machine looks idle."""
    try:
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if load1 < threshold:
        return None
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    grouped = autogroup.exists() and autogroup.read_text().strip() == "1"
    msg = (f"the 1-minute load average is {load1:.1f} on {os.cpu_count()} CPUs: other processes "
           "compete for the cores and the timings below will be off")
    if grouped:
        msg += " (sched_autogroup_enabled=1: `nice` on them does not help; stop them)"
    return msg


def warn_if_busy() -> None:
    msg = load_warning()
    if msg:
        print(f"WARNING: {msg}", flush=True)
