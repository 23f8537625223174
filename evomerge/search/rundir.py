"""The run directory: everything a run needs to be inspected, resumed after a crash, and exported.

Layout (all names fixed):

    RUN_DIR/
      run.json          marker: format version, evomerge version, creation time, the config's SHA-256
      config.yaml       the run config as validated (snapshot; the run never re-reads the user's file, and refuses
                        a snapshot edited since: see config_text)
      calibration.json  copy of the IRT calibration the objectives are estimated with (if any)
      ledger.sqlite     every evaluation (see ledger.py); -wal/-shm files next to it while open
      run.lock          flock'ed by the driver that owns the run (released by the kernel if it dies)
      logs/             driver and worker logs

`RunDir.create` builds the directory in a hidden temporary sibling and renames it into place, so a
failure (or a bad config found late) leaves no run directory behind, and an existing one is never
touched. `RunDir.open` is for resume, status and export.

Nothing here is a pickle, and nothing is ever unpickled: a run directory may come from someone else. The
optimizer's state is not stored at all; `resume` rebuilds it by replaying the seeded ask/tell loop against the
ledger (see session.drive). Run directories of earlier versions hold an algorithm.pkl: it is ignored.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.errors import EvomergeError
from evomerge.io.paths import check_writable
from evomerge.search.ledger import Ledger

RUN_FORMAT = 1
MARKER = "run.json"
CONFIG = "config.yaml"
CALIBRATION = "calibration.json"
LEDGER = "ledger.sqlite"
LOCK = "run.lock"
LOGS = "logs"


class RunDirError(EvomergeError):
    """A path is not a (complete) run directory, already exists, or a checkpoint cannot be read."""


class RunDirLockedError(RunDirError):
    """Another live driver holds the run directory."""


def _fsync_dir(path: Path) -> None:
    # Makes a rename/creation inside `path` durable (POSIX: the directory entry lives in the parent).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one.

    Temp file in the same directory + fsync + os.replace + fsync of the directory.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RunDir:
    """A run directory on disk. Get one with `RunDir.create(...)` or `RunDir.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    # ---- paths ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def calibration_path(self) -> Path | None:
        p = self.path / CALIBRATION
        return p if p.exists() else None

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def config_text(self) -> str:
        """The config snapshot, checked against the digest recorded when the run was created: a run's config is
        fixed (its genomes, seeds and ledger mean something only under it)."""
        text = self.config_path.read_text(encoding="utf-8")
        recorded = self.info().get("config_sha256")  # None in run directories of earlier versions
        if recorded is not None and _sha256(text) != recorded:
            raise RunDirError(
                f"{self.config_path}: edited after the run was created (it no longer matches the digest in "
                f"{MARKER}); a run keeps the config it started with: undo the edit, or start a new run from the "
                f"edited config with `evomerge search {self.config_path} --run-dir NEW_DIR`")
        return text

    def info(self) -> dict[str, Any]:
        """The contents of run.json (format, evomerge version, created)."""
        return json.loads((self.path / MARKER).read_text(encoding="utf-8"))

    # ---- create / open -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, config_text: str, calibration_path: str | Path | None = None) -> RunDir:
        """Make a new run directory at `path`, atomically.

        `config_text` is the validated run config, stored verbatim. `path` must not exist, or be an empty
        directory. Everything is built in a hidden sibling and renamed into place at the end: on any
        failure nothing is left at `path` (an existing `path` is left as it was), and directories created
        above it for the purpose are removed again.
        """
        path = Path(path).absolute()
        check_writable(path, "run directory")
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise RunDirError(
                f"{path}: already exists; resume it with `evomerge resume {path}`, "
                "or choose another output directory"
            )
        calibration = Path(calibration_path) if calibration_path is not None else None
        if calibration is not None and not calibration.is_file():
            raise RunDirError(f"{calibration}: calibration file not found; run `evomerge calibrate` first or fix the path")

        made_parents: list[Path] = []  # created here, removed again on failure (deepest first)
        parent = path.parent
        while not parent.exists():
            made_parents.append(parent)
            parent = parent.parent
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            for p in reversed(made_parents):
                p.mkdir()
            tmp.mkdir()
            (tmp / CONFIG).write_text(config_text, encoding="utf-8")
            if calibration is not None:
                shutil.copyfile(calibration, tmp / CALIBRATION)
            (tmp / LOGS).mkdir()
            Ledger.open(tmp / LEDGER, create=True).close()
            marker = {"format": RUN_FORMAT, "evomerge": __version__, "created": time.time(),
                      "config_sha256": _sha256(config_text)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
            try:
                # Replaces an empty directory; fails (ENOTEMPTY/EEXIST/ENOTDIR) if something appeared there.
                os.rename(tmp, path)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise RunDirError(f"{path}: already exists (created meanwhile); choose another output directory") from e
                raise
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in made_parents:  # deepest first; only if still empty
                try:
                    p.rmdir()
                except OSError:
                    break
            raise
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (for resume, status, export), with a clear error if it is not one."""
        path = Path(path)
        if not path.exists():
            raise RunDirError(f"{path}: no such run directory; start a run with `evomerge search CONFIG`")
        if not path.is_dir():
            raise RunDirError(f"{path}: is a file, not a run directory")
        marker = path / MARKER
        if not marker.is_file():
            raise RunDirError(
                f"{path}: not an evomerge run directory (no {MARKER}); pass the directory `evomerge search` created"
            )
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            fmt = info["format"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunDirError(f"{marker}: unreadable run marker ({e}); the run directory is damaged") from e
        if fmt != RUN_FORMAT:
            raise RunDirError(
                f"{path}: run directory format {fmt}, this evomerge reads format {RUN_FORMAT}; "
                f"use evomerge {info.get('evomerge', '?')} (which made it) or start a new run"
            )
        missing = [name for name in (CONFIG, LEDGER) if not (path / name).is_file()]
        if missing:
            raise RunDirError(f"{path}: incomplete run directory, missing {', '.join(missing)}")
        return cls(path)

    def open_ledger(self) -> Ledger:
        return Ledger.open(self.ledger_path, create=False)

    # ---- lock ----------------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Take the run's lock (non-blocking), or RunDirLockedError if another live driver holds it.

        flock is released by the kernel when its holder dies, so a killed driver never blocks a resume.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirLockedError(
                f"{self.path}: in use by another driver ({holder}); wait for it to finish or stop it first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """`with run.locked(): ...` holds the lock for the block."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    def log_path(self, name: str) -> Path:
        """A file under logs/ (the directory is created with the run)."""
        return self.logs_dir / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"
