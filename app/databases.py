"""The published DuckDB files of a data dir, opened read-only and reopened when a precompute run publishes.

A precompute run publishes `<data_dir>/db/<name>.duckdb` with os.replace, so a new publication is a new
inode at the same path. `DataDir.files()` re-lists the folder at most once per `rescan_seconds` and opens
only files whose (inode, size, mtime) changed; requests already running keep the DataFile they started
with, and a replaced file is closed once nothing references it.

Every file is attached (`ATTACH ... (READ_ONLY)`) under its own alias to one in-memory DuckDB instance of
the process, rather than opened with duckdb.connect(path): DuckDB caches instances by path, so connect()
on a replaced file would return the old instance, and its old data, while any connection to it is alive;
an alias keeps reading the inode it attached, and a new publication is attached under a new alias. One
instance rather than one per file: an ATTACH costs ~2 ms, a new instance ~25 ms, which was most of a
server's start-up over 100 files.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import sqlalchemy as sa
from duckdb_engine import ConnectionWrapper

from featurescope.explanations import is_side_file, side_path

T = TypeVar("T")


class _SharedInstance:
    """The process's DuckDB instance that published files are attached to; its own connection only attaches,
    detaches and hands out cursors, under a lock (requests query through cursors, each on its own)."""

    def __init__(self) -> None:
        self._root: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def attach(self, path: Path) -> str:
        with self._lock:
            if self._root is None:
                self._root = duckdb.connect(":memory:", config={"threads": 1})
            alias = f"published_{next(self._numbers)}"
            self._root.execute(f"ATTACH ? AS {alias} (READ_ONLY)", [str(path)])
            return alias

    def cursor(self, alias: str) -> duckdb.DuckDBPyConnection:
        with self._lock:
            cursor = self._root.cursor()
        cursor.execute(f"USE {alias}")
        return cursor

    def detach(self, alias: str) -> None:
        with self._lock:
            try:
                self._root.execute(f"DETACH {alias}")
            except duckdb.Error:  # still the default of a cursor nobody closed: it goes with the process
                pass


_INSTANCE = _SharedInstance()


@dataclass(frozen=True)
class FileSignature:
    inode: int
    size: int
    mtime_ns: int
    side: tuple[int, int, int] | None = None  # the run's explanations file (featurescope/explanations.py), if any

    @classmethod
    def of(cls, stat: os.stat_result, side: os.stat_result | None = None) -> "FileSignature":
        return cls(stat.st_ino, stat.st_size, stat.st_mtime_ns,
                   (side.st_ino, side.st_size, side.st_mtime_ns) if side is not None else None)


class DataFile:
    """One published database, read-only, with a SQLAlchemy engine whose pooled connections are cursors of
    the shared DuckDB instance using this file's alias. `cached` keeps what is computed from it (catalog,
    vocab, contexts, histograms): the file never changes under a DataFile, a new publication gets a new one."""

    def __init__(self, path: Path, signature: FileSignature, pool_size: int = 8) -> None:
        self.path, self.signature, self.name = path, signature, path.stem
        self._cache: dict[Hashable, Any] = {}
        self._cache_lock = threading.RLock()  # a build may read another cached result of the same file
        self.alias = alias = _INSTANCE.attach(path)
        # Explanations are written beside a published run, never into it (`featurescope explain` replaces the
        # side file atomically per batch): its signature is part of this file's, so a new batch is a new DataFile.
        self.explanations_alias: str | None = None  # queries name its tables `<explanations_alias>.<table>`
        if signature.side is not None:
            try:
                self.explanations_alias = _INSTANCE.attach(side_path(path))
            except duckdb.Error:  # replaced between the listing and now: the next scan attaches the new one
                pass

        def new_connection() -> ConnectionWrapper:
            return ConnectionWrapper(_INSTANCE.cursor(alias))

        self.engine = sa.create_engine("duckdb://", creator=new_connection, pool_size=pool_size, max_overflow=pool_size,
                                       pool_reset_on_return=None)
        dialect = self.engine.dialect
        # duckdb_engine opts out of SQLAlchemy's compiled-statement cache; the explorer only runs SELECTs on
        # core tables, which compile the same way every time, and compiling them anew cost ~4 ms a page.
        dialect._supports_statement_cache = True
        # The file is read-only and never changes under this DataFile, so each SELECT is consistent on its
        # own: skip the BEGIN/ROLLBACK round trips (~1 ms a request).
        dialect.do_begin = _no_transaction
        dialect.do_rollback = _no_transaction
        weakref.finalize(self, _close, self.engine, [a for a in (alias, self.explanations_alias) if a])

    def connect(self) -> sa.Connection:
        return self.engine.connect()

    @property
    def has_explanations(self) -> bool:
        return self.explanations_alias is not None

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A plain DuckDB cursor on this file (its explanations as `<explanations_alias>.*`); close it after use."""
        return _INSTANCE.cursor(self.alias)

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """build() once per file and key, however many threads ask at once; later calls read it without a lock."""
        try:
            return self._cache[key]
        except KeyError:
            pass
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = build()
        return self._cache[key]

    def __repr__(self) -> str:
        return f"DataFile({str(self.path)!r})"


def _no_transaction(connection: Any) -> None:
    return None


def _close(engine: sa.Engine, aliases: list[str]) -> None:
    engine.dispose()
    for alias in aliases:
        _INSTANCE.detach(alias)


@dataclass(frozen=True)
class FileProblem:
    name: str
    error: str
    saes: tuple[tuple[str, str], ...] = ()  # (model id, SAE id) it holds, when that much could be read
    runs: tuple[str, ...] = ()  # the run ids of those SAEs


class DataDir:
    """The *.duckdb files of one folder, as DataFiles, kept current by cheap rescans."""

    def __init__(self, folder: Path, rescan_seconds: float = 1.0) -> None:
        self.folder, self.rescan_seconds = Path(folder), rescan_seconds
        self._files: tuple[DataFile, ...] = ()
        self._problems: tuple[FileProblem, ...] = ()
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def files(self) -> tuple[tuple[DataFile, ...], tuple[FileProblem, ...]]:
        """The current files and the ones that could not be opened. Rescans when due; while one request
        rescans, the others keep using the previous list rather than wait - except before the first scan
        has finished, when there is no previous list: they wait for it, so no request ever answers from
        an empty catalog."""
        if time.monotonic() - self._scanned_at >= self.rescan_seconds:
            if self._scanned_at == float("-inf"):
                with self._lock:
                    if self._scanned_at == float("-inf"):
                        self._rescan()
            elif self._lock.acquire(blocking=False):
                try:
                    self._rescan()
                finally:
                    self._lock.release()
        return self._files, self._problems

    def refresh(self) -> tuple[tuple[DataFile, ...], tuple[FileProblem, ...]]:
        """Re-list the folder now, after any rescan in progress: for a lookup that missed, which may name a
        file published since the last scan or being attached by another request right now."""
        with self._lock:
            self._rescan()
        return self._files, self._problems

    def _rescan(self) -> None:
        current = {f.path: f for f in self._files}
        files, problems = [], []
        for path, signature in _listing(self.folder):
            known = current.get(path)
            if known is not None and known.signature == signature:
                files.append(known)
                continue
            try:
                files.append(DataFile(path, signature))
            except duckdb.Error as exc:
                problems.append(FileProblem(path.name, f"cannot be opened read-only: {exc}"))
        self._files, self._problems = tuple(files), tuple(problems)
        self._scanned_at = time.monotonic()


def _listing(folder: Path) -> list[tuple[Path, FileSignature]]:
    """Published files, newest first. Hidden and temporary names are a writer's work in progress."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(".duckdb") or is_side_file(entry.name) \
                or not entry.is_file():
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:  # replaced or removed between scandir and stat
            continue
        try:
            side = os.stat(side_path(entry.path))
        except FileNotFoundError:
            side = None
        found.append((Path(entry.path), FileSignature.of(stat, side)))
    found.sort(key=lambda item: (-item[1].mtime_ns, item[0].name))
    return found
