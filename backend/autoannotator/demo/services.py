"""The services the demo runs, each started under its supervisor and waited for until it answers:
Redis (unless one listens already), Label Studio headless, and the backend under gunicorn with
its three rq workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from autoannotator.demo.config import Credentials, DemoConfig, DemoError
from autoannotator.demo.label_studio import PortTakenError, ls_argv, ls_environment, ls_probe
from autoannotator.demo.processes import Processes, port_open
from autoannotator.demo.report import Console


class Services:
    """Starts each service once, on loopback, in ``data_dir``; :class:`Processes` stops them."""

    def __init__(self, config: DemoConfig, data_dir: Path, procs: Processes, console: Console) -> None:
        self.config = config
        self.data_dir = data_dir
        self.procs = procs
        self.console = console

    def start_redis(self) -> None:
        """Use the Redis on the port, or start one; either way empty the demo's database."""
        import redis

        port = self.config.redis_port
        if port_open(port):
            self.console.say(f"Redis: using the one listening on 127.0.0.1:{port}")
        else:
            server = shutil.which("redis-server")
            if server is None:
                raise DemoError(
                    f"nothing listens on 127.0.0.1:{port} and redis-server is not installed: "
                    "apt-get install redis-server (make demo does it)"
                )
            (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.data_dir / "redis")]
            child = self.procs.spawn("redis", argv, dict(os.environ), self.data_dir)
            self.procs.wait("Redis to answer", lambda: port_open(port), 30)
            self.console.say(f"Redis: started on 127.0.0.1:{port} (pid {child.pid})")
        client = redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=2)
        try:
            client.flushdb()
        except redis.RedisError as exc:
            raise DemoError(f"Redis at 127.0.0.1:{port} refused the demo: {exc}") from None
        self.console.say(
            f"Redis: database {self.config.redis_db} is the demo's; emptied (queues, counters, flags)"
        )

    def start_label_studio(self, creds: Credentials) -> None:
        """LS from ``.venv-ls`` with the admin login of ``creds``, its SQLite database in the data dir."""
        executable = self.config.ls_executable
        if not executable.is_file():
            raise DemoError(f"{executable} is absent: run `make install-ls` (make demo does it)")
        if port_open(self.config.ls_port):
            raise DemoError(f"port {self.config.ls_port} is taken by another program; pass --ls-port")
        url = self.config.ls_url
        ls_dir = self.data_dir / "label-studio"
        first = not (ls_dir / "label_studio.sqlite3").is_file()
        (ls_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.console.say(
            f"Label Studio: starting on {url} "
            + (
                "(first start: it migrates a new database, ~45 s)"
                if first
                else "(database kept from the last run)"
            )
        )
        child = self.procs.spawn(
            "label-studio",
            ls_argv(executable, self.config.ls_port),
            ls_environment(ls_dir, url, creds.ls_email, creds.ls_password, creds.ls_token),
            ls_dir,
        )

        def healthy() -> bool:
            try:
                return ls_probe(child.output(), url, self.config.ls_port) is None
            except PortTakenError as exc:
                raise DemoError(f"{exc}; pass --ls-port") from None

        started = time.monotonic()
        self.procs.wait(
            "Label Studio to answer /health/",
            healthy,
            600,
            lambda: self.console.progress(f"Label Studio: starting ({time.monotonic() - started:.0f} s)"),
        )
        self.console.say(f"Label Studio: up in {time.monotonic() - started:.0f} s (pid {child.pid})")

    def start_backend(self, env: dict[str, str], creds: Credentials) -> None:
        """The backend under gunicorn, one rq worker for ingest and review, one for training, one for
        labelling runs."""
        if port_open(self.config.backend_port):
            raise DemoError(
                f"port {self.config.backend_port} is taken by another program; pass --backend-port"
            )
        bindir = Path(sys.executable).parent
        gunicorn = [
            str(bindir / "gunicorn"),
            # Sync workers (a forward pass in a gunicorn thread runs slower: BENCHMARKS.md, 4); two,
            # so that a webhook finds one free while the first /predict labels every task.
            "--workers", "2",
            "--bind", f"127.0.0.1:{self.config.backend_port}",
            "--timeout", "300",  # a first /predict loads the models and labels every task at once
            "--graceful-timeout", "10",
            "--no-control-socket",  # else gunicorn 27 binds ~/.gunicorn/gunicorn.ctl, one per user
            "--preload",  # the workers share the app's imports (README, Deploy)
            "autoannotator.service.app:create_app()",
        ]  # fmt: skip
        worker = str(bindir / "autoannotator")
        backend = self.procs.spawn("backend", gunicorn, env, self.data_dir)
        review = self.procs.spawn(
            "worker-review", [worker, "worker", "--queues", "ingest,review"], env, self.data_dir
        )
        train = self.procs.spawn("worker-train", [worker, "worker", "--queues", "train"], env, self.data_dir)
        label = self.procs.spawn("worker-label", [worker, "worker", "--queues", "label"], env, self.data_dir)
        url = self.config.backend_url
        auth = creds.basic_auth()

        def healthy() -> bool:
            request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Basic {auth}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    return bool(json.loads(response.read()).get("redis") == "up")
            except (OSError, ValueError):
                return False

        self.procs.wait(
            "the backend to answer /health",
            healthy,
            180,
            lambda: self.console.progress("backend: starting gunicorn"),
        )
        self.console.say(
            f"backend: gunicorn on {url} (pid {backend.pid}), rq workers "
            f"ingest,review (pid {review.pid}), train (pid {train.pid}) and label (pid {label.pid})"
        )
