"""Versioned ensembles on disk: built aside, published by swapping one pointer, never rewritten.

Layout under ``root``::

    versions/v0001/ensemble.json    manifest: version, labels, member sub-directories in vote order, ...
    versions/v0001/<member>/        one specialist directory per member
    CURRENT                         the served version's name, replaced with os.replace
    history.jsonl                   one line per publish, rejected or failed training attempt
    NEXT                            the last allocated version number
    .lock                           fcntl lock that serialises allocation, publishing and history

A version is built in a hidden temporary sibling and moved into ``versions/`` in one ``os.replace``,
so a reader sees a whole version or none. Serving processes read ``CURRENT`` and load the version it
names; since published directories are never written again, a process still serving an older version
is never disturbed by a newer one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.errors import SpecialistLoadError
from autoannotator.models.ensemble import (
    ENSEMBLE_FILE,
    Ensemble,
    load_ensemble,
    read_manifest,
    write_manifest,
)
from autoannotator.models.specialists import Specialist
from autoannotator.models.specialists.base import staged_dir

logger = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"v(\d{4,})")
# Member sub-directory names end up in paths: keep them to one plain path component.
MEMBER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MEMBER_NAME_MAX = 100
STAGING_PREFIX = ".tmp-"


def member_name(index: int, source: str | Path) -> str:
    """The sub-directory name of the ``index``-th member brought in from ``source`` (a hub id or a
    directory): ``m<index>-<last part of source>``, reduced to what :data:`MEMBER_PATTERN` allows.

    A member of an earlier version keeps its kind name (``.../v0001/m2-ngram-linear`` becomes
    ``m0-ngram-linear`` at index 0, not ``m0-m2-ngram-linear``).
    """
    stem = re.sub(r"^m\d+-", "", Path(str(source)).name)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:MEMBER_NAME_MAX].strip("-.")
    return f"m{index}-{stem or 'model'}"


def check_member_names(names: Sequence[str]) -> None:
    """Refuse member names that are not one plain path component, or that repeat."""
    bad = [m for m in names if not isinstance(m, str) or not MEMBER_PATTERN.fullmatch(m)]
    if bad:
        raise ValueError(f"member names {bad!r} must be plain names of letters, digits, '.', '_', '-'")
    repeated = sorted({m for m in names if list(names).count(m) > 1})
    if repeated:
        raise ValueError(f"member names {repeated!r} repeat; every member needs a directory of its own")


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old content or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a torn last line (a crash mid-append) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            logger.warning("%s: skipping a torn last line", path)
    return out


class Registry:
    """The versions of one project's ensemble, and which one is served."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # --------------------------------------------------------------- allocation

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock across threads and processes (flock locks one open file description)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def next_version(self) -> str:
        """Reserve the next version name (``v0001``, ``v0002``, ...); no two callers ever get the same.

        The counter lives in ``NEXT`` because a name must stay reserved while its version is still
        being trained, before any directory exists. A failed attempt leaves a gap in the numbering.
        """
        with self._locked():
            counter = self.root / "NEXT"
            last = int(counter.read_text().strip()) if counter.exists() else 0
            existing = [self._number(v) for v in self.versions()]
            number = max([last, *existing]) + 1
            _write_atomic(counter, f"{number}\n")
        return f"v{number:04d}"

    @staticmethod
    def _number(version: str) -> int:
        match = VERSION_PATTERN.fullmatch(version)
        if match is None:
            raise ValueError(f"{version!r} is not a version name like 'v0001'")
        return int(match.group(1))

    def path(self, version: str) -> Path:
        """Where ``version`` lives; the name is checked, so it can never point outside ``versions/``."""
        self._number(version)
        return self.versions_dir / version

    # ----------------------------------------------------------------- building

    def stage(self, version: str) -> AbstractContextManager[Path]:
        """A temporary directory to build ``version`` in, moved into place only if the block succeeds.

        On an exception the directory is removed, and an existing version is never overwritten.
        """
        return staged_dir(self.path(version))

    def save_ensemble(
        self,
        labels: LabelSet,
        members: Mapping[str, Callable[[Path], Specialist]],
        *,
        note: str = "",
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
        publish: bool = True,
    ) -> str:
        """Build a new version whose members are written straight into it, and (by default) publish it.

        ``members`` maps each member's sub-directory name, in vote order, to a function that writes
        that member into the directory it is given and returns it, e.g.
        ``{"ngram": lambda d: NgramSpecialist.untrained(labels).fit(texts, ys, d)}``; nothing is copied.
        """
        if not members:
            raise ValueError("an ensemble needs at least one member")
        check_member_names(list(members))
        version = self.next_version()
        with self.stage(version) as tmp:
            built = [build(tmp / sub) for sub, build in members.items()]
            Ensemble(built, labels, version=version)  # refuses members whose labels differ
            write_manifest(
                tmp,
                version=version,
                labels=labels,
                members=list(members),
                parent=parent,
                metrics=metrics,
                note=note,
            )
        if publish:
            self.publish(version, {"reason": note or "saved", "metrics_new": dict(metrics or {})})
        return version

    def discard_stale_stages(self, older_than_s: float = 24 * 3600) -> list[str]:
        """Remove staging directories left by a process killed mid-build; returns their names.

        An exception cleans up after itself; only a hard kill leaves one behind, invisible to
        :meth:`versions` but taking disk space. The age guard spares a build still in progress.
        """
        if not self.versions_dir.is_dir():
            return []
        removed = []
        for entry in self.versions_dir.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and time.time() - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    # --------------------------------------------------------------- publishing

    def publish(self, version: str, details: dict[str, Any] | None = None) -> None:
        """Serve ``version`` from now on (also how to roll back) and note it in the history.

        However the version was built, its member names must pass :func:`check_member_names`.
        """
        manifest = read_manifest(self.path(version))  # a version must be complete before it is served
        check_member_names(manifest["members"])
        with self._locked():
            previous = self.current()
            _write_atomic(self.root / "CURRENT", f"{version}\n")
            self._append_history(
                {
                    **(details or {}),
                    "event": "publish",
                    "version": version,
                    "previous": previous,
                    "promoted": True,
                }
            )
        logger.info("published %s (previous %s)", version, previous)

    def current(self) -> str | None:
        """The served version, or None before the first publish."""
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        self._number(name)
        return name

    def load(self, version: str, labels: LabelSet, *, serving: bool = False) -> Ensemble:
        """A version's ensemble; ``serving`` to predict only, weights in the forward passes' precision."""
        directory = self.path(version)
        if not directory.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise SpecialistLoadError(f"no version {version!r} under {self.versions_dir} (known: {known})")
        return load_ensemble(directory, labels, serving=serving)

    def manifest(self, version: str) -> dict[str, Any]:
        return read_manifest(self.path(version))

    def versions(self) -> list[str]:
        """Complete versions in order; staging directories and anything unrecognised are left out."""
        if not self.versions_dir.is_dir():
            return []
        names = [
            p.name
            for p in self.versions_dir.iterdir()
            if VERSION_PATTERN.fullmatch(p.name) and (p / ENSEMBLE_FILE).is_file()
        ]
        return sorted(names, key=self._number)

    # ------------------------------------------------------------------ history

    def record(self, entry: dict[str, Any]) -> None:
        """Append an attempt that did not publish (rejected, failed) to the history."""
        with self._locked():
            self._append_history(entry)

    def history(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.root / "history.jsonl")

    def _append_history(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"at": time.time(), **entry}, sort_keys=True, default=str) + "\n"
        with open(self.root / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
