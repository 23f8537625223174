"""The weighted sum of linear and task arithmetic compiled ahead of time (AOTInductor), for CPU workers: a
shared library on disk that any process loads in milliseconds, without importing the compiler.

Eager, the sum makes 3K + 2 passes over each block (widen, subtract and multiply-add per model, widen the base,
narrow the result): 1.3-2.1x the float32-resident path on CPU. Compiled, it is one pass over the sources as
stored (merge/fused.py: _weighted_sum, the same function and compiler flags, so the same bits). But torch.compile
costs each process ~6 s even with inductor's cache warm (its import and first trace), ~22 s on a machine's
first compile, which is why CPU workers use it only from 1B parameters (merge.specs.FUSED_CPU_PARAMS).

A package holds one variant: the number of task vectors and the dtypes of the base, the sources and the result.
A search worker that lacks one starts a background process that builds it (once per machine, torch version and
variant: a lock file keeps other workers from building it too), merges in eager ops meanwhile, and switches to
the package when it appears; its bits do not change. A build that fails leaves a `.failed` note beside the log
and is not retried until that note is deleted. Packages live in $EVOMERGE_KERNEL_CACHE, else
$XDG_CACHE_HOME/evomerge/kernels (~/.cache/evomerge/kernels).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from evomerge.merge import fused

log = logging.getLogger(__name__)

RECHECK_S = 2.0  # how often a worker looks for a package that another process is building
STALE_LOCK_S = 30 * 60  # a build lock this old is abandoned (builds took 15-32 s on a 2-core box)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Variant:
    """What one package computes: out (dtype `out`) = base + sum_i coef_i (source_i - base) over K sources."""

    base: str
    sources: tuple[str, ...]
    out: str

    @classmethod
    def of(cls, out: Tensor, base: Tensor, sources: Sequence[Tensor]) -> Variant | None:
        names = [_DTYPES.get(t.dtype) for t in (out, base, *sources)]
        return None if None in names else cls(names[1], tuple(names[2:]), names[0])

    @property
    def name(self) -> str:
        return f"weighted_sum-k{len(self.sources)}-{self.base}-{'.'.join(self.sources)}-to-{self.out}"


def cache_dir() -> Path:
    explicit = os.environ.get("EVOMERGE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge" / "kernels"


@functools.cache
def _fingerprint() -> str:
    """What a package depends on besides its variant: torch, the kernel's source and flags, the CPU (the library
    uses its vector instructions)."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    parts = [torch.__version__, inspect.getsource(fused._weighted_sum), inspect.getsource(build),
             repr(fused._OPTIONS["weighted_sum"]),
             platform.machine(), platform.processor(), flags]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def package_path(variant: Variant, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{variant.name}-{_fingerprint()}.pt2"


# -- building (in its own process) ------------------------------------------------------------------------------
class _WeightedSum(torch.nn.Module):
    def forward(self, out: Tensor, base: Tensor, sources: list[Tensor], coef: Tensor):
        fused._weighted_sum(out, base, sources, coef)
        return ()


def build(variant: Variant, path: Path) -> None:
    """Compile `variant` into the package at `path` (written under a temporary name, then renamed: a reader never
    sees half a package). Took 32 s on a 2-core box's first build, 15 s with inductor's own cache warm."""
    n = torch.export.Dim("n", min=2)
    # the compiler sizes its loops by the example: a large one gets the threaded (OpenMP) loop a model's tensors need
    example = [torch.zeros(1 << 20, dtype=_BY_NAME[d]) for d in (variant.out, variant.base, *variant.sources)]
    coef = torch.zeros(len(variant.sources))
    program = torch.export.export(_WeightedSum(), (example[0], example[1], example[2:], coef),
                                  dynamic_shapes=({0: n}, {0: n}, [{0: n}] * len(variant.sources), None))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")  # the packager wants .pt2
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                 inductor_configs=fused._OPTIONS["weighted_sum"])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _lock_is_stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
        host, pid = lock.read_text().split()
    except (OSError, ValueError):  # gone, or being written this instant
        return False
    if age > STALE_LOCK_S:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


def _take_lock(lock: Path) -> bool:
    """Create `lock` (it says this host and process); False where another live build holds it."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _lock_is_stale(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    return False


def _builder_main(spec: str) -> int:
    """`python -m evomerge.worker.precompiled SPEC`: build one package, holding its lock (taken by the process
    that started this one, which wrote its own pid there: it is handed over), at a low priority."""
    job = json.loads(spec)
    variant, path = Variant(job["base"], tuple(job["sources"]), job["out"]), Path(job["path"])
    lock = path.with_name(path.name + ".lock")
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    try:
        os.nice(10)  # the worker that started it goes on merging and scoring
    except OSError:
        pass
    try:
        build(variant, path)
        path.with_name(path.name + ".log").unlink(missing_ok=True)
        return 0
    except BaseException as e:
        path.with_name(path.name + ".failed").write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        lock.unlink(missing_ok=True)


# -- using them (in a worker) -----------------------------------------------------------------------------------
class PrecompiledSums:
    """A worker's view of the package cache: loads the packages it finds, and (build=True) starts a background
    build for a variant it lacks."""

    def __init__(self, *, build: bool, root: Path | None = None) -> None:
        self.build = build
        self.root = root or cache_dir()
        self._loaded: dict[Variant, object] = {}
        self._unusable: set[Variant] = set()
        self._looked: dict[Variant, float] = {}
        self._builders: dict[Variant, subprocess.Popen] = {}
        self.calls = 0  # tensors merged by a package (for tests and benchmarks)

    def weighted_sum(self, out: Tensor, base: Tensor, sources: Sequence[Tensor], coefs: Sequence[float]) -> bool:
        """out = base + sum_i coefs_i (sources_i - base) by the package for this variant: True where it ran, False
        where there is none yet (nothing written; the caller merges in eager ops)."""
        tensors, n = [out, base, *sources], out.numel()
        # the library trusts its arguments: flat, contiguous, of one length (and of the variant's dtypes, below)
        if not sources or out.device.type != "cpu" or n < 2 or \
                not all(t.is_contiguous() and t.numel() == n for t in tensors):
            return False
        variant = Variant.of(out, base, sources)
        if variant is None or variant in self._unusable:
            return False
        runner = self._loaded.get(variant) or self._find(variant)
        if runner is None:
            return False
        runner.run([out.view(-1), base.view(-1), *(s.view(-1) for s in sources),
                    torch.tensor(coefs, dtype=torch.float32)])
        self.calls += 1
        return True

    def _find(self, variant: Variant):
        now = time.monotonic()
        if now - self._looked.get(variant, -RECHECK_S) < RECHECK_S:
            return None
        self._looked[variant] = now
        path = package_path(variant, self.root)
        if path.is_file():
            try:
                runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
            except Exception as e:  # noqa: BLE001  (a package from elsewhere, or damaged: merge without it)
                self._give_up(variant, f"could not load {path} ({type(e).__name__}: {e}); delete it to rebuild")
                return None
            self._loaded[variant] = runner
            log.info("weighted sums of %s: precompiled kernel %s", variant.name, path)
            return runner
        failed, builder = path.with_name(path.name + ".failed"), self._builders.get(variant)
        code = builder.poll() if builder is not None else None
        if code == 0:  # it finished since is_file() above
            self._looked.pop(variant)
        elif code is not None and not failed.is_file():  # killed, say
            path.with_name(path.name + ".lock").unlink(missing_ok=True)
            self._give_up(variant, f"the build of {path.name} ended with code {code} "
                                   f"(log: {path.name}.log)")
        elif failed.is_file():
            reason = failed.read_text().strip().splitlines()[-1:] or ["?"]
            self._give_up(variant, f"building {path.name} failed ({reason[0]}; log: {path.name}.log); "
                                   f"delete {failed} to try again",
                          loud=variant in self._builders)  # a failure noted by an earlier run was reported there
        elif self.build and variant not in self._builders:
            self._start_build(variant, path)
        return None

    def _give_up(self, variant: Variant, why: str, loud: bool = True) -> None:
        self._unusable.add(variant)
        log.log(logging.WARNING if loud else logging.INFO, "linear and task arithmetic merge in eager ops: %s", why)

    def _start_build(self, variant: Variant, path: Path) -> None:
        lock = path.with_name(path.name + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _take_lock(lock):
                return  # another process is building it: _find will see the package appear
        except OSError as e:  # a cache directory this process cannot write
            self._give_up(variant, f"could not build in {path.parent} ({e}); set EVOMERGE_KERNEL_CACHE to a "
                                   "writable directory")
            return
        spec = json.dumps({**asdict(variant), "path": str(path)})
        try:
            with open(path.with_name(path.name + ".log"), "w") as out:
                self._builders[variant] = subprocess.Popen(
                    [sys.executable, "-m", "evomerge.worker.precompiled", spec], stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            lock.unlink(missing_ok=True)
            self._give_up(variant, f"could not start a build ({e})")
            return
        log.info("building the precompiled kernel %s in the background (pid %d)", path.name,
                 self._builders[variant].pid)

    def wait(self, timeout: float = 600.0) -> None:
        """Wait for the builds this process started (tests and benchmarks)."""
        for proc in self._builders.values():
            proc.wait(timeout)
        self._looked.clear()


if __name__ == "__main__":
    sys.exit(_builder_main(sys.argv[1]))
