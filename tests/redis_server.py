"""A private Redis for one test session: started on a free loopback port, stopped at the end.

Why a private one: the suite flushes databases as it goes, and a Redis that merely happens to listen
on 6379 belongs to somebody (a developer's own backend, another project, another test run). The
session's server is started from Debian's ``redis-server`` (``make test`` installs it where it is
missing), keeps nothing on disk, binds 127.0.0.1 only, and dies with the test process. Two test runs
on one machine each get their own, so they never see each other's keys.

Usage::

    with RedisServer(tmp_dir) as server:      # ~50 ms to start
        client = server.client()              # redis.Redis on database 0
        url = server.url(3)                   # redis://127.0.0.1:<port>/3 for spawned processes
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from autoannotator.demo.processes import DIE_WITH_PARENT
from tests.ports import free_port


class RedisServerError(RuntimeError):
    """The private Redis did not start: the message says why and ends with its log's tail."""


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, owned by the test session."""

    def __init__(self, data_dir: Path, *, executable: str | None = None, start_timeout_s: float = 20.0):
        self.data_dir = Path(data_dir)
        self.executable = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.start_timeout_s = start_timeout_s
        self.log_path = self.data_dir / "redis.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        running = self._process is not None and self._process.poll() is None
        return f"RedisServer(port={self.port}, running={running})"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def start(self, attempts: int = 3) -> RedisServer:
        """Start the server and wait until it answers PING; a port taken between our probe and
        Redis's bind is replaced by a fresh one, up to ``attempts`` times."""
        if not Path(self.executable).is_file():
            raise RedisServerError(
                f"{self.executable} is absent: the test suite starts its own Redis; "
                "run `make install-redis` (Debian's redis-server) or put redis-server on PATH"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            if self._spawn_and_wait():
                atexit.register(self.stop)
                return self
            self.stop()
            if attempt == attempts:
                break
        raise RedisServerError(f"redis-server did not answer on 127.0.0.1:{self.port}{self._tail()}")

    def _spawn_and_wait(self) -> bool:
        argv = [
            self.executable,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--databases", "16",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=DIE_WITH_PARENT,
        )
        deadline = time.monotonic() + self.start_timeout_s
        probe = self.client()
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # typically "Address already in use": the caller tries another port
            with contextlib.suppress(redis.RedisError):
                if probe.ping():
                    return True
            time.sleep(0.02)
        return False

    def _tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return f" (no log at {self.log_path})"
        text = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return f"\n--- last {lines} lines of {self.log_path} ---\n{text}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Idempotent."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
