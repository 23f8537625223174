"""Find lm-eval tasks by name and build them once, with local data files resolved against their YAML.

Convention (fitness/README.md): a task YAML reads local data with the standard
`dataset_path: json` and `dataset_kwargs: {data_files: {<split>: <path>}}`; a relative path is relative to
the directory of the YAML file that sets `dataset_kwargs` (the task's own file, or the file it `include`s),
never to the current working directory. Built-in lm-eval tasks are looked up only when a name is not found
in the include paths, and read their datasets from the local HF datasets cache.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import io
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import evomerge
from evomerge.errors import FitnessError

# the project's own task folder (absent when evomerge is installed as a plain package)
PROJECT_TASKS = Path(evomerge.__file__).resolve().parents[1] / "fitness"

_QUIET_LOGGERS = ("lm_eval", "datasets", "fsspec", "filelock")


def default_include_paths() -> list[Path]:
    return [PROJECT_TASKS] if PROJECT_TASKS.is_dir() else []


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence lm-eval's and datasets' INFO/WARNING logs, and the progress bars they draw on stderr.

    The bars (dataset generation, request building) cannot be switched off by an argument, so stderr is
    redirected while the block runs; log records still reach their handlers (which hold the real stream).
    """
    if not enabled:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def chatty_loggers() -> list[logging.Logger]:
    """The lm-eval and datasets loggers that exist now (for `muted`)."""
    return [
        lg for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and any(name == q or name.startswith(q + ".") for q in _QUIET_LOGGERS)
    ]


@contextlib.contextmanager
def muted(loggers: Sequence[logging.Logger]) -> Iterator[None]:
    """Like `quiet` for the logs only, and cheap enough for every call: `Logger.setLevel` clears the level
    caches of every logger (milliseconds with transformers imported), so this flips `disabled` instead."""
    flipped = [lg for lg in loggers if not lg.disabled]
    for lg in flipped:
        lg.disabled = True
    try:
        yield
    finally:
        for lg in flipped:
            lg.disabled = False


def resolve_data_files(cfg: dict[str, Any], base_dir: Path, yaml_path: Path, task: str) -> dict[str, Any]:
    """Return `cfg` with relative `dataset_kwargs.data_files` made absolute against `base_dir`.

    Raises FitnessError naming the YAML and the path when a local data file does not exist.
    """
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or kwargs.get("data_files") is None:
        return cfg

    def fix(p: str) -> str:
        if "://" in str(p):  # hf://, https://, s3://: not ours to resolve
            return p
        path = Path(p).expanduser()
        path = path if path.is_absolute() else Path(os.path.normpath(base_dir / path))
        if not (path.exists() or (any(c in str(path) for c in "*?[") and glob.glob(str(path)))):
            raise FitnessError(
                f"{yaml_path}: task {task!r} reads data file {p!r}, but {path} does not exist: "
                f"fix dataset_kwargs.data_files (relative paths are relative to {base_dir})"
            )
        return str(path)

    def fix_any(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return fix(v)

    files = kwargs["data_files"]
    files = {split: fix_any(v) for split, v in files.items()} if isinstance(files, dict) else fix_any(files)
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": files}}


def _kwargs_origin(yaml_path: Path) -> Path:
    """The directory of the YAML file whose `dataset_kwargs` wins after lm-eval merges `include`s
    (the file's own keys win, then the last include that sets it, recursively)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path = Path(yaml_path).resolve()
    own = load_yaml(yaml_path, resolve_func=False, recursive=False)
    if "dataset_kwargs" in own or "include" not in own:
        return yaml_path.parent
    includes = own["include"] if isinstance(own["include"], list) else [own["include"]]
    for inc in reversed(includes):
        inc_path = Path(inc) if Path(inc).is_absolute() else yaml_path.parent / inc
        merged = load_yaml(inc_path, resolve_func=False, recursive=True)
        if "dataset_kwargs" in merged:
            return _kwargs_origin(inc_path)
    return yaml_path.parent


class TaskLoader:
    """Index of task YAMLs in the include paths (plus lm-eval's built-ins, indexed only when needed)."""

    def __init__(self, include_paths: Sequence[str | Path] = (), *, debug: bool = False) -> None:
        """debug: keep lm-eval's and datasets' logs and progress bars while indexing and building."""
        from lm_eval.tasks import TaskManager

        self.debug = debug

        self.include_paths = [Path(p).expanduser().resolve() for p in include_paths]
        for p in self.include_paths:
            if not p.is_dir():
                raise FitnessError(f"task folder {p} does not exist: give a folder of lm-eval task YAMLs")
        with quiet(not debug):
            self.manager = TaskManager(include_path=[str(p) for p in self.include_paths], include_defaults=False)
        self._with_defaults = None  # built on first use: indexing lm-eval's ~10k built-in YAMLs takes seconds

    def _full_manager(self):
        from lm_eval.tasks import TaskManager

        if self._with_defaults is None:
            with quiet(not self.debug):
                self._with_defaults = TaskManager(
                    include_path=[str(p) for p in self.include_paths] or None, include_defaults=True
                )
        return self._with_defaults

    def _entry(self, name: str):
        entry = self.manager.task_index.get(name)
        if entry is not None:
            return entry, self.manager
        if not _mentioned_in_builtin_yaml(name):  # ~1 s scan instead of a ~5-20 s index build
            return None, self.manager
        full = self._full_manager()
        return full.task_index.get(name), full

    def load(self, name: str, fewshot_seed: int | None = 1234):
        """Build the task `name` (its dataset read once); few-shot sampling seeded like lm-eval's default."""
        from lm_eval.tasks._index import Kind
        from lm_eval.tasks._yaml_loader import load_yaml

        entry, manager = self._entry(name)
        if entry is None:
            raise self._unknown(name)
        if entry.kind in (Kind.GROUP, Kind.TAG):
            members = sorted(entry.tags) if entry.kind == Kind.TAG else _group_members(entry)
            raise FitnessError(
                f"{name!r} is an lm-eval {entry.kind.name.lower()}, not a task: name its tasks instead "
                f"({', '.join(members[:20])}{', ...' if len(members) > 20 else ''})"
            )
        try:
            with quiet(not self.debug):
                if entry.yaml_path is None:  # a Python task without YAML: nothing to resolve
                    task = manager.load([name])["tasks"][name]
                else:
                    cfg = load_yaml(entry.yaml_path, resolve_func=True)
                    cfg = resolve_data_files(cfg, _kwargs_origin(entry.yaml_path), entry.yaml_path, name)
                    for key in ("tag", "group", "task_list"):  # index structure, not task config
                        cfg.pop(key, None)
                    task = manager.load([cfg])["tasks"][name]
        except FitnessError:
            raise
        except Exception as e:  # dataset missing from the cache, bad YAML, ...: one line, naming the task
            where = entry.yaml_path or "lm-eval"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FitnessError(
                f"task {name!r} ({where}) could not be built: {type(e).__name__}: {first} "
                "(with no network, its data must be a local file or in the local HF datasets cache)"
            ) from e
        if fewshot_seed is not None:
            task.set_fewshot_seed(seed=fewshot_seed)
        return task

    def _unknown(self, name: str) -> FitnessError:
        local = sorted(n for n, e in self.manager.task_index.items() if e.kind.name in ("TASK", "PY_TASK"))
        known = self._with_defaults.all_tasks if self._with_defaults is not None else local
        close = difflib.get_close_matches(name, local, n=3) or difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        where = ", ".join(str(p) for p in self.include_paths) or "no task folders"
        return FitnessError(
            f"unknown task {name!r}: {hint}tasks in {where}: {', '.join(local) or 'none'} "
            "(lm-eval's built-in tasks are found by their exact names, e.g. hellaswag)"
        )


def _mentioned_in_builtin_yaml(name: str) -> bool:
    """Whether any of lm-eval's built-in task YAMLs contains `name` as a word (a task, group or tag name
    always appears literally in one): a cheap test before indexing them all."""
    import lm_eval.tasks

    word = re.compile(rb"(?<![\w.-])" + re.escape(name.encode()) + rb"(?![\w.-])")
    root = Path(lm_eval.tasks.__file__).parent
    return any(word.search(p.read_bytes()) for p in root.rglob("*.yaml"))


def _group_members(entry) -> list[str]:
    members = (entry.cfg or {}).get("task") or []
    return [m if isinstance(m, str) else str(m.get("task") or m.get("group")) for m in members]
