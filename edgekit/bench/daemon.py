"""Servers under measurement: `edgekit serve` (or any HTTP server) in a subprocess on 127.0.0.1, started, waited
for until it answers, and stopped, for the benchmark scripts (scripts/bench_serve.py, scripts/bench_worker_rss.py).

Standard library only: the health poll is urllib, so benchmarks on a board need nothing beyond the runtime.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess listening on 127.0.0.1:``port``; its output goes to ``log_path`` (or the caller's stderr)."""

    def __init__(self, name: str, command: Sequence[str], port: int, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()
        out = log_path.open("wb") if log_path is not None else sys.stderr
        try:
            self.proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})
        finally:
            if log_path is not None:
                out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, path: str = "/health", timeout: float = 600.0) -> float:
        """Seconds from start until ``path`` answers 200 (loading, verification and golden checks included)."""
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {path} within {timeout:.0f} s")

    def rss(self, children: bool = True) -> int:
        import psutil

        process = psutil.Process(self.proc.pid)
        total = process.memory_info().rss
        if children:
            total += sum(c.memory_info().rss for c in process.children(recursive=True))
        return total

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def serve_command(models: Path, port: int, *extra: str) -> list[str]:
    """`edgekit serve` on ``port`` for the bundles in ``models``, never unloading, quiet; ``extra`` flags appended."""
    return [sys.executable, "-m", "edgekit", "serve", "--models", str(models), "--port", str(port), "--idle-unload-s", "0",
            "--log-level", "warning", *extra]


def start_daemon(models: Path, *extra: str, name: str = "edgekit", log_path: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600.0) -> ServerProcess:
    """`edgekit serve` started and answering /health 200 (stopped again if it never does)."""
    port = free_port()
    server = ServerProcess(name, serve_command(models, port, *extra), port, log_path, env)
    try:
        server.wait_ready(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_daemon(models: Path, *extra: str, **options) -> Iterator[ServerProcess]:
    """``start_daemon`` for a ``with`` block; the daemon is stopped (SIGTERM) when the block ends."""
    server = start_daemon(models, *extra, **options)
    try:
        yield server
    finally:
        server.stop()
