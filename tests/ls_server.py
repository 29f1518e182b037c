"""A real Label Studio server for end-to-end tests, started from the project's own ``.venv-ls``.

Why a real one: Label Studio (LS) is the other half of every promise the backend makes (configs it
accepts, tasks it stores, predictions it shows), and its behaviour is only known by asking it. It
lives in its own virtualenv (``make install-ls``) because it pins Django, rq and redis-py versions
that must not leak into the backend's environment; the backend talks to it only over HTTP.

Usage::

    with LabelStudioServer(tmp_dir) as ls:      # cold start ~30-45 s (migrations): reuse it
        client = ls.client()                    # label_studio_sdk.LabelStudio, legacy token
        project = client.projects.create(title="t", label_config=xml)

Everything comes from ``docs/label-studio.md``: SQLite in ``data_dir``, an admin user and a legacy
API token created at start from the environment, no signup, no network calls (version check,
analytics, Sentry), an ML backend and webhooks on 127.0.0.1 allowed. LS writes its output to
``data_dir/label-studio.log``; a start that fails or times out raises with that log's tail.

Tokens (measured with label-studio-sdk 2.1.2): ``LabelStudio(api_key=token)`` works with our legacy
token: the SDK sends a key that is not a JWT as ``Authorization: Token <key>`` (a JWT would be taken
for a personal access token and refreshed). The deprecated ``label_studio_sdk.Client`` works too, but
new code should not use it. ``Authorization: Bearer <legacy token>`` is refused with 401. The token
never appears in a repr, and is masked in the log tail of an error.

Stray writes are fenced into ``data_dir`` as well: LS writes a user id under ``~/.config`` even with
analytics off and SQLite puts temporary files in ``/var/tmp``, so XDG dirs and TMPDIR point inside it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from label_studio_sdk import LabelStudio

from autoannotator.demo.label_studio import PortTakenError, ls_argv, ls_environment, ls_probe
from autoannotator.demo.processes import DIE_WITH_PARENT
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
LS_EXECUTABLE = REPO / ".venv-ls" / "bin" / "label-studio"

# Variables of the caller's environment that would steer LS or its Python away from what we set.


class LabelStudioError(RuntimeError):
    """Label Studio did not start: the message says why and ends with its log's tail."""


class LabelStudioServer:
    """One LS process on 127.0.0.1 with a fresh SQLite database under ``data_dir``."""

    username = "admin@example.com"

    def __init__(
        self,
        data_dir: Path,
        *,
        executable: Path = LS_EXECUTABLE,
        port: int | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.executable = Path(executable)
        self._port_given = port is not None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)  # 40 hex chars: the legacy token format LS expects
        self.password = secrets.token_urlsafe(16)
        self.start_timeout_s = start_timeout_s
        self.log_path = self.data_dir / "label-studio.log"
        self.startup_s: float | None = None  # seconds from spawn to a healthy /health/, once started
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this attempt's output starts in the (appended) log

    def __repr__(self) -> str:
        running = self._process is not None and self._process.poll() is None
        return f"LabelStudioServer(url={self.url!r}, data_dir={str(self.data_dir)!r}, running={running})"

    def environment(self) -> dict[str, str]:
        """The environment LS runs with: the same as ``make demo``'s (one definition of a headless,
        loopback-only LS that writes nothing outside its data dir)."""
        return ls_environment(self.data_dir, self.url, self.username, self.password, self.token)

    def start(self, attempts: int = 3) -> LabelStudioServer:
        """Spawn LS and wait until ``GET /health/`` says UP; raise :class:`LabelStudioError` if not.

        A port chosen by us that another process grabs first is replaced by a fresh one, up to
        ``attempts`` times; a port the caller gave is not. ``startup_s`` counts from the first spawn.
        """
        if self._process is not None:
            raise LabelStudioError(f"{self!r} was already started")
        if not self.executable.is_file():
            raise LabelStudioError(f"{self.executable} is absent: run `make install-ls` first")
        (self.data_dir / "tmp").mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait(began + self.start_timeout_s)
                break
            except PortTakenError:
                if self._port_given or attempt == attempts:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = time.monotonic() - began
        return self

    def _spawn_and_wait(self, deadline: float) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                ls_argv(self.executable, self.port),
                cwd=self.data_dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches every child
                preexec_fn=DIE_WITH_PARENT,
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, deadline: float) -> None:
        assert self._process is not None
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise LabelStudioError(
                    f"label-studio exited with code {code} before it was healthy{self._tail()}"
                )
            try:
                waiting = ls_probe(self._output(), self.url, self.port)
            except PortTakenError as exc:
                raise PortTakenError(f"{exc}{self._tail()}") from None
            if waiting is None:
                return
            last = waiting
            time.sleep(0.5)
        raise LabelStudioError(
            f"label-studio at {self.url} was not healthy after {self.start_timeout_s:.0f} s ({last})"
            + self._tail()
        )

    def _output(self) -> str:
        """What this attempt's process has written to the log so far ("" if nothing yet)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return f"\n(no log at {self.log_path})"
        text = self._output()
        tail = "\n".join(text.splitlines()[-lines:]).replace(self.token, "<token>")
        return f"\n--- last {lines} lines of {self.log_path} ---\n{tail}"

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop LS's whole process group: SIGTERM, then SIGKILL after ``timeout_s``. Idempotent."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlive the leader (there should be none) still hold the group id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def client(self) -> LabelStudio:
        """An SDK client logged in with the legacy token (sent as ``Authorization: Token ...``)."""
        return LabelStudio(base_url=self.url, api_key=self.token)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
