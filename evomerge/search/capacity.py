"""What memory the search's workers will get: free memory per GPU, host RAM per node, workers per node (no torch).

GPU workers: the free memory of each GPU, stated (`--device-memory 80GB`) or measured with torch.cuda.mem_get_info
in a short child process: a CUDA context opened in the driver would hold ~0.5 GiB of the GPU the workers need
for the whole run, and the driver never imports torch. CPU workers: /proc/meminfo MemAvailable (or a stated
`--host-memory`), shared by the workers of the node. Joining a cluster (--address) without a stated size, the
workers' memory is unknown here: the plan is printed, nothing is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from evomerge.cpus import usable_cpus
from evomerge.errors import EvomergeError

GPU_QUERY_TIMEOUT_S = 120
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE_HELP = "e.g. 80GB (10^9 bytes), 79.2GiB or 80G (2^30 bytes)"


@dataclass(frozen=True)
class Workers:
    """The workers of one node and the memory each will get."""

    gpu: bool  # GPU workers (else CPU workers: everything in host RAM)
    per_node: int  # workers on one node (they share its RAM; host placement pins a copy each)
    gpus_each: float  # workers.gpus_per_worker as the pool will use it (>1: split by layers; <1: GPUs shared)
    device_free: int | None  # free bytes on each GPU; None: unknown
    host_available: int | None  # host RAM the node's workers share; None: unknown
    source: str  # where the numbers came from, for the table's caption

    @property
    def split(self) -> int:
        """GPUs one worker's model is split over (by layers). 1 for now: a worker materializes and scores on one
        device even when it reserves more (splitting the live model by layers is not built yet), so planning
        with the split would promise memory a worker cannot use."""
        return 1

    @property
    def per_gpu(self) -> int:
        """Workers that share one GPU (fractional gpus_per_worker)."""
        return max(1, int(1 / self.gpus_each)) if 0 < self.gpus_each < 1 else 1


def parse_size(text: str, option: str) -> int:
    """'80GB', '79.2GiB', '80G', '512MiB' -> bytes; anything else is a one-line error naming the option."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise EvomergeError(f"{option}: {text!r} is not a memory size: give a number and a unit, {SIZE_HELP}")
    return int(float(m.group(1)) * _UNITS[unit])


def mem_available() -> int | None:
    """/proc/meminfo MemAvailable in bytes (what can be allocated without swapping); None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def nvidia_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process (cheap: no driver call, no torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def gpu_free_bytes() -> list[int]:
    """Free bytes of each visible GPU (torch.cuda.mem_get_info in a child process); [] when none or unknown."""
    if not nvidia_present():
        return []
    code = ("import json, torch; print(json.dumps([torch.cuda.mem_get_info(i)[0] "
            "for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=GPU_QUERY_TIMEOUT_S, check=True)
        return [int(v) for v in json.loads(out.stdout.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return []


def workers_for(config, *, device: str | None = None, in_process: bool = False, address: str | None = None,
                device_memory: int | None = None, host_memory: int | None = None,
                workers: int | None = None) -> Workers:
    """The workers `search` would start with these options (as RayPool and LocalPool choose them) and the memory
    each gets. device_memory/host_memory: stated sizes (bytes) instead of this machine's; workers: per node."""
    w = config.workers
    local = address is None  # a private Ray on this machine: its memory is the workers'
    if in_process:
        gpu = bool(device and device.startswith("cuda"))
    elif device is not None:
        gpu = device.startswith("cuda")
    else:
        gpu = device_memory is not None or w.gpus_per_worker > 0 or (w.count is None and local and nvidia_present())
    gpus_each = (w.gpus_per_worker or 1.0) if gpu else 0.0
    free = []
    if gpu and device_memory is None and local:
        free = gpu_free_bytes()
    if in_process:
        per_node = 1
    elif workers is not None:
        per_node = workers
    elif w.count is not None:
        per_node = w.count
    elif gpu:  # one per GPU (RayPool's default), shared GPUs hold several
        per_node = max(1, int(len(free) / gpus_each)) if free else 1
    else:
        per_node = max(1, usable_cpus() // 2)
    device_free = device_memory if device_memory is not None else (min(free) if free else None)
    host = host_memory if host_memory is not None else (mem_available() if local else None)
    said = []
    if gpu:
        said.append("GPU memory: " + ("stated (--device-memory)" if device_memory is not None else
                                      "free now (torch.cuda.mem_get_info)" if free else "unknown (give --device-memory)"))
    said.append("host RAM: " + ("stated (--host-memory)" if host_memory is not None else
                                "MemAvailable now" if host is not None else "unknown (give --host-memory)"))
    return Workers(gpu, per_node, gpus_each, device_free, host, "; ".join(said))


__all__ = ["SIZE_HELP", "Workers", "gpu_free_bytes", "mem_available", "parse_size", "workers_for"]
