"""The CPU cores this process may run on (a container's or `taskset`'s limit, not the machine's count)."""

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
