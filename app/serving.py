"""Run the explorer on uvicorn: in this process, or as N worker processes (`featurescope serve --workers N`).

Each worker binds its own listening socket with SO_REUSEPORT, so the kernel spreads new connections over
the workers. uvicorn's own multi-worker mode shares one socket instead, and a worker that wakes up first
accepts a whole burst of connections: measured with 8 keep-alive clients, all 8 landed on one of two
workers in one benchmark pass out of three, which then ran at the speed of one process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from typing import Any

import uvicorn

from featurescope.app.settings import Settings
from featurescope.errors import FeatureScopeError

FAST_EXIT_SECONDS = 5.0  # a worker that dies sooner than this after starting is not restarted: it would again
MAX_DEFAULT_WORKERS = 8


def default_workers(live: bool) -> int:
    """Stored pages only: a process per core (at most MAX_DEFAULT_WORKERS). Live encoding: one process,
    which holds each model once."""
    return 1 if live else min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)


def serve(settings: Settings, preloaded: dict[str, Any] | None = None) -> None:
    """Serve until interrupted. `preloaded` models ({id: LoadedModel}) are shared with live encoding, in
    one process only (each worker process would load its own)."""
    from featurescope.app.live import LiveService
    from featurescope.app.main import create_app

    if settings.workers == 1 or not hasattr(socket, "SO_REUSEPORT") or sys.platform != "linux":
        if settings.workers > 1:
            print("This platform cannot spread connections with SO_REUSEPORT: serving from one process.")
        uvicorn.run(create_app(settings, LiveService(settings, preloaded)), host=settings.host, port=settings.port,
                    log_level="warning")
        return
    _check_port_free(settings)
    _supervise(settings)


def _check_port_free(settings: Settings) -> None:
    """Bind once without SO_REUSEPORT: that fails if anything listens on the port, another FeatureScope
    included, which the workers' SO_REUSEPORT sockets would otherwise silently share the port with."""
    try:
        _listening_socket(settings, reuse_port=False).close()
    except OSError as exc:
        raise FeatureScopeError(f"Cannot serve on {settings.host}:{settings.port}: {exc.strerror or exc}. "
                                "Is another server running there? Choose another port with --port.") from None


def _listening_socket(settings: Settings, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    return sock


def _worker(settings_json: str, ready: Any, slot: int) -> None:
    """One server process. It reads the data dir before it listens, then marks its slot in the shared
    `ready` flags, which every worker's /-/health reads."""
    from featurescope.app.main import create_app

    settings = Settings.from_json(settings_json)
    sock = _listening_socket(settings)
    app = create_app(settings, on_ready=lambda: ready.__setitem__(slot, 1), readiness=lambda: (sum(ready), len(ready)))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])  # handles SIGINT/SIGTERM itself: finishes open requests, then returns


def _supervise(settings: Settings) -> None:
    """Start the workers, restart one that dies, stop them all on SIGINT/SIGTERM."""
    context = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads or DuckDB handles
    stopping = False

    ready = context.Array("b", settings.workers, lock=False)  # a flag per worker slot: set once it serves

    def start(slot: int) -> tuple[multiprocessing.Process, float]:
        ready[slot] = 0
        process = context.Process(target=_worker, args=(settings.to_json(), ready, slot), name="featurescope-worker",
                                  daemon=False)
        process.start()
        return process, time.monotonic()

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers = [start(slot) for slot in range(settings.workers)]
    try:
        while not stopping:
            multiprocessing.connection.wait([p.sentinel for p, _ in workers], timeout=0.5)
            for i, (process, started) in enumerate(workers):
                if process.is_alive() or stopping:
                    continue
                if time.monotonic() - started < FAST_EXIT_SECONDS:
                    print(f"A server worker exited with code {process.exitcode} right after starting; stopping.",
                          file=sys.stderr)
                    stopping = True
                    break
                print(f"A server worker exited with code {process.exitcode}; starting a new one.", file=sys.stderr)
                workers[i] = start(i)
    finally:
        for process, _ in workers:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for process, _ in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
