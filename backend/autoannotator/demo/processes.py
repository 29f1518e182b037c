"""The demo's process supervisor: start children in their own process groups, record them in
``pids.json``, and stop exactly those (and whatever they forked) by pid and start time.

Generic enough that the end-to-end tests start their Label Studio and Redis with
:data:`DIE_WITH_PARENT` and wait with :func:`poll_until` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from autoannotator.demo.config import DemoError

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, pgrp, ...), or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks: with the pid, it names one process for good."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and is the process that started at ``ticks``."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in {"Z", "X"}:
        return False
    return ticks is None or int(stat[19]) == ticks


def _live_processes() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] not in {"Z", "X"}:
                found[int(entry.name)] = stat
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [pid for pid, stat in _live_processes().items() if int(stat[2]) == pgid]


def family(pid: int) -> dict[int, int]:
    """``pid``'s live descendants and process-group members, as pid -> start ticks.

    Descendants matter because a process group is not enough: rq's work horse (the fork that runs
    a job) calls ``setpgrp()``, so it leaves its worker's group, and outlives a killed worker.
    """
    procs = _live_processes()
    children: dict[int, list[int]] = {}
    for p, stat in procs.items():
        children.setdefault(int(stat[1]), []).append(p)
    found = {p for p, stat in procs.items() if int(stat[2]) == pid}
    todo = [pid, *found]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    found.discard(pid)
    return {p: int(procs[p][19]) for p in found}


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when its parent (the demo, a test session) dies, even by
    SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


DIE_WITH_PARENT = die_with_parent if sys.platform.startswith("linux") else None
"""``preexec_fn`` for ``subprocess.Popen``: :func:`die_with_parent` where Linux has it."""


@dataclass
class Child:
    """A process the demo started, leader of its own process group."""

    name: str
    pid: int
    ticks: int | None
    log: str
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    log_offset: int = 0  # where this run's output starts in the (appended) log

    def output(self) -> str:
        """What this process wrote to its log so far."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return alive(self.pid, self.ticks)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "pgid": self.pid,
            "start_ticks": self.ticks,
            "log": self.log,
        }


class Processes:
    """Start children in their own process groups, record them in ``pids.json``, stop them all."""

    def __init__(self, data_dir: Path, out: TextIO) -> None:
        self.pids_file = data_dir / "pids.json"
        self.log_dir = data_dir / "logs"
        self.out = out
        self.children: list[Child] = []
        self.owner = False  # whether this demo wrote pids.json (a refused second demo did not)
        self.hidden: list[str] = []  # masked in the log tails of errors: passwords, tokens

    def clean_stale(self) -> list[str]:
        """Stop what a previous demo on this data dir left running (it crashed or was killed);
        refuse if that demo itself still runs. Only processes recorded there *and* still the same
        process (pid and start time) are touched."""
        if not self.pids_file.is_file():
            return []
        try:
            recorded = json.loads(self.pids_file.read_text())
        except ValueError:
            recorded = {}
        owner = recorded.get("demo") or {}
        if owner.get("pid") and owner["pid"] != os.getpid() and alive(owner["pid"], owner.get("start_ticks")):
            raise DemoError(
                f"a demo already runs on {self.pids_file.parent} (pid {owner['pid']}); "
                "stop it with Ctrl-C there (or kill -INT it), or pass another --data-dir"
            )
        stopped = []
        for item in reversed(recorded.get("children") or []):
            child = Child(item["name"], int(item["pid"]), item.get("start_ticks"), item.get("log", ""))
            if alive(child.pid, child.ticks):
                self._stop(child)
                stopped.append(f"{child.name} (pid {child.pid})")
        self.pids_file.unlink(missing_ok=True)
        return stopped

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log_name: str | None = None
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{log_name or name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C reaches the demo only
                preexec_fn=DIE_WITH_PARENT,
            )
        child = Child(name, popen.pid, start_ticks(popen.pid), str(log_path), popen, offset)
        self.children.append(child)
        self.write()
        return child

    def write(self) -> None:
        """Record this demo and its children (the demo itself first: a second demo then refuses)."""
        me = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}
        text = json.dumps({"demo": me, "children": [c.record() for c in self.children]}, indent=2)
        self.pids_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.pids_file)
        self.owner = True

    def stop_all(self) -> None:
        """Workers and backend first, then Label Studio, Redis last (the workers need it to stop)."""
        order = ("worker", "backend", "label-studio", "redis")

        def rank(child: Child) -> int:
            return next((i for i, name in enumerate(order) if child.name.startswith(name)), 0)

        by_rank: dict[int, list[Child]] = {}
        for child in self.children:
            by_rank.setdefault(rank(child), []).append(child)
        for _, batch in sorted(by_rank.items()):  # the processes of one rank stop side by side
            started = time.monotonic()
            for child in batch:
                if child.running() or group_members(child.pid):
                    print(f"  stopping {child.name} (pid {child.pid})", file=self.out, flush=True)
            with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                list(pool.map(self._stop, batch))
            logger.debug("stopped %s in %.1fs", [c.name for c in batch], time.monotonic() - started)
        self.children.clear()
        if self.owner:
            self.pids_file.unlink(missing_ok=True)
            self.owner = False

    @staticmethod
    def _stop(child: Child, term_s: float = 10.0) -> None:
        """SIGTERM to the child's group; a second SIGTERM after 3 s (an rq worker then stops at
        once, killing the job it runs: a training is simply redone by the next run); SIGKILL to
        the group and every descendant seen on the way after ``term_s``; reap the child."""
        known: dict[int, int] = {}
        orphans_told = False

        def gone() -> bool:
            nonlocal orphans_told
            if child.popen is not None:
                child.popen.poll()
            if child.running():
                known.update(family(child.pid))
                return False
            orphans = [p for p, t in known.items() if alive(p, t)]
            if orphans and not orphans_told:  # the leader is gone, what it forked outside its group not
                orphans_told = True
                for pid in orphans:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
            return not group_members(child.pid) and not orphans

        known.update(family(child.pid))
        started = time.monotonic()
        for sig, at in ((signal.SIGTERM, 0.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, term_s)):
            while time.monotonic() - started < at:
                if gone():
                    return
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)
            if sig == signal.SIGKILL:
                for pid, ticks in known.items():
                    if alive(pid, ticks):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not gone():
            time.sleep(0.1)
        if child.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(5)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.running()]

    def wait(
        self,
        what: str,
        check: Callable[[], T | None],
        timeout_s: float,
        between: Callable[[], object] | None = None,
    ) -> T:
        """:func:`poll_until` ``check`` holds, but give up as soon as a child died (its log tail in
        the error: waiting longer is pointless) and after ``timeout_s``. ``between`` runs after
        each miss (a progress line)."""

        def watch() -> None:
            for child in self.dead():
                raise DemoError(f"{child.name} exited{log_tail(child.log, hidden=self.hidden)}")
            if between is not None:
                between()

        value = poll_until(check, timeout_s, watch)
        if not value:
            raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        return value


def poll_until(
    check: Callable[[], T],
    timeout_s: float,
    between: Callable[[], object] | None = None,
    every_s: float = 0.5,
) -> T | None:
    """Call ``check`` until it returns something truthy, and return that; None after ``timeout_s``.
    ``between`` runs after each miss: a progress line, or a raise when waiting is pointless (a child
    died). The demo's waits and the e2e tests' share it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if between is not None:
            between()
        time.sleep(every_s)
    return None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: str | Path, lines: int = 30, hidden: Iterable[str] = ()) -> str:
    """The end of a child's log, to append to an error message; ``hidden`` strings (passwords,
    tokens) are masked, since the message lands on a console and maybe in a CI log."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"\n(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    for secret in hidden:
        if secret:
            tail = tail.replace(secret, "***")
    return f"\n--- last {lines} lines of {path} ---\n{tail}"
