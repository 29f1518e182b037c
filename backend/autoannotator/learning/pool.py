"""The verified pool: every label a reviewer vouched for, the data that continual refinement learns from.

Items arrive one at a time from reviews (an LLM, a human in Label Studio, a simulated human in
experiments) and in bulk from the cold-start seed set. Three rules make the pool safe to train on:

* **Precedence.** A human label (or the seed's, or a simulated human's) beats an LLM label for the
  same item; an LLM never overrides a human; a newer human label replaces an older one, because an
  annotator who edits an annotation means the edit.
* **A fixed held-out split.** Whether an item is held out depends only on a hash of (seed, key), so
  it never changes with arrival order or restarts: a held-out item is never trained on, and the
  evaluation that gates a new version always measures items no version has seen. Seed items are the
  exception: the first version trained on them, so they cannot judge it.
* **Nothing verified is lost.** With a ``path``, every change is appended to a JSONL log (flushed
  and fsynced before it takes effect in memory) and replayed on start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError, CorruptStoreError, LabelMappingError

logger = logging.getLogger(__name__)


class Source(StrEnum):
    """Who vouched for a label. Only the LLM's labels are overridable by the others."""

    SEED = "seed"
    HUMAN = "human"
    LLM = "llm"
    LLM_SEED = "llm-seed"  # a seed task the LLM labelled for the fully automatic start
    ORACLE = "oracle"

    @property
    def authoritative(self) -> bool:
        """Whether this source speaks for a human (the seed set and the oracle simulate one)."""
        return self not in (Source.LLM, Source.LLM_SEED)


@dataclass(frozen=True)
class VerifiedItem:
    """One verified label. ``seq`` grows with every change of text or label, so "new since" is a number."""

    key: str
    text: str
    label: str
    source: Source
    added_at: float
    seq: int


class VerifiedPool:
    """Verified items by key, with precedence, a fixed held-out split and an optional durable log.

    "Trained" is a watermark on ``seq``: items whose text or label changed after the last
    :meth:`mark_trained` are the new ones, the rest can be replayed. All methods take one lock, so a
    webhook thread may add while a training thread reads.
    """

    def __init__(
        self, labels: LabelSet, path: Path | None = None, holdout_fraction: float = 0.2, seed: int = 0
    ) -> None:
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.labels = labels
        self.path = Path(path) if path is not None else None
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self._lock = threading.RLock()
        self._reset()
        if self.path is not None and self.path.exists():
            self._replay(self.path)

    def _reset(self) -> None:
        self._items: dict[str, VerifiedItem] = {}
        # Keys that ever arrived as seed items: the cold-start version trained on them.
        self._seed_keys: set[str] = set()
        self._seq = 0
        self._trained_seq = 0
        # How far this pool has read its log, and which file that was (a log replaced by another
        # file, or cut shorter, is read again from the start). A file is known by its inode and by
        # the random id in its first line: a deleted log's inode is often reused by the next file.
        self._log_offset = 0
        self._log_inode: int | None = None
        self._log_id: str | None = None

    def refresh(self) -> int:
        """Catch up with the events other processes appended to the log since this pool last read or
        wrote it; returns the bytes read. A long-lived worker keeps its pool and calls this under
        the project's pool lock, instead of replaying the whole log for every annotation.

        Replaying an event this pool applied already changes nothing, so an append that raced ahead
        of its own bookkeeping is harmless: the log's order wins.
        """
        with self._lock:
            if self.path is None:
                return 0
            try:
                with open(self.path, "rb") as fh:
                    size, identity = os.fstat(fh.fileno()).st_size, _identity(fh)
            except FileNotFoundError:
                self._reset()
                return 0
            if identity != (self._log_inode, self._log_id) or size < self._log_offset:
                self._reset()
                self._replay(self.path)
                return size
            if size == self._log_offset:
                return 0
            start = self._log_offset
            self._replay(self.path, start)
            return self._log_offset - start

    # ------------------------------------------------------------------ writing

    def add(self, key: str, text: str, label: str, source: Source = Source.HUMAN) -> bool:
        """Record a verified label; False when precedence keeps the existing one or nothing differs."""
        return self.add_many([(key, text, label)], source) == 1

    def add_many(self, rows: Iterable[tuple[str, str, str]], source: Source = Source.HUMAN) -> int:
        """Record ``(key, text, label)`` rows from one source; returns how many changed the pool.

        Every row is validated before any is applied, so a bad row leaves the pool as it was.
        """
        source = Source(source)
        checked = [self._check(key, text, label) for key, text, label in rows]
        with self._lock:
            now = time.time()
            events: list[dict[str, Any]] = []
            staged: dict[str, VerifiedItem] = {}
            seq = self._seq
            for key, text, label in checked:
                old = staged.get(key) or self._items.get(key)
                if old is not None and old.source.authoritative and not source.authoritative:
                    continue
                if old is not None and (old.text, old.label, old.source) == (text, label, source):
                    continue
                if old is not None and (old.text, old.label) == (text, label):
                    # Only the provenance changed (a human confirmed an LLM label): nothing new to learn.
                    item = VerifiedItem(key, text, label, source, old.added_at, old.seq)
                else:
                    seq += 1
                    item = VerifiedItem(key, text, label, source, now, seq)
                staged[key] = item
                events.append({"op": "put", **asdict(item), "source": item.source.value})
            if not events:
                return 0
            self._append(events)
            for item in staged.values():
                self._apply(item)
            logger.debug("pool: %d of %d %s rows changed the pool", len(events), len(checked), source.value)
            return len(events)

    def remove(self, keys: Iterable[str]) -> int:
        """Forget these items (a person deleted the annotation behind them); returns how many.

        A removal is not growth: it does not count toward β. Versions already trained on the item
        keep what they learnt; the next training no longer sees it.
        """
        with self._lock:
            gone = sorted({k for k in keys if k in self._items})
            if not gone:
                return 0
            self._append([{"op": "del", "key": k, "at": time.time()} for k in gone])
            for key in gone:
                del self._items[key]
            return len(gone)

    def mark_trained(self, upto: int | None = None) -> None:
        """Declare everything up to ``upto`` (default: everything now) trained on.

        A trainer passes the :attr:`last_seq` it read before collecting data, so items that arrive
        while it trains stay new for the next round.
        """
        with self._lock:
            mark = self._seq if upto is None else min(int(upto), self._seq)
            if mark <= self._trained_seq:
                return
            self._append([{"op": "mark", "seq": mark, "at": time.time()}])
            self._trained_seq = mark

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def items(self) -> list[VerifiedItem]:
        """All items in the order of their last change."""
        with self._lock:
            return sorted(self._items.values(), key=lambda it: it.seq)

    def get(self, key: str) -> VerifiedItem | None:
        with self._lock:
            return self._items.get(key)

    def growth_since_training(self) -> int:
        """Items added or relabelled since the last :meth:`mark_trained` (held-out ones included)."""
        with self._lock:
            return sum(1 for it in self._items.values() if it.seq > self._trained_seq)

    def is_holdout(self, key: str) -> bool:
        """Whether ``key`` is reserved for evaluation: fixed by a hash, whatever the arrival order."""
        with self._lock:
            if key in self._seed_keys:
                return False
        digest = hashlib.blake2b(f"{self.seed}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64 < self.holdout_fraction

    def train_items(self) -> list[VerifiedItem]:
        return [it for it in self.items() if not self.is_holdout(it.key)]

    def holdout_items(self) -> list[VerifiedItem]:
        return [it for it in self.items() if self.is_holdout(it.key)]

    def new_train_items(self) -> list[VerifiedItem]:
        """Training items added or relabelled since the last :meth:`mark_trained`."""
        with self._lock:
            mark = self._trained_seq
            return [it for it in self.train_items() if it.seq > mark]

    def replay_sample(self, n: int, rng_seed: int = 0) -> list[VerifiedItem]:
        """Up to ``n`` older training items drawn uniformly, so fine-tuning on new items does not forget.

        The draw is reproducible from ``rng_seed``; when fewer than ``n`` older items exist, all are returned.
        """
        if n < 0:
            raise ValueError(f"a replay sample needs n >= 0, got {n}")
        with self._lock:
            mark = self._trained_seq
            older = [it for it in self.train_items() if it.seq <= mark]
        if n >= len(older):
            return older
        return random.Random(rng_seed).sample(older, n)

    # -------------------------------------------------------------- internals

    def _check(self, key: str, text: str, label: str) -> tuple[str, str, str]:
        if not isinstance(key, str) or not key:
            raise BadInputError(f"a verified item needs a non-empty string key, got {key!r}")
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"item {key!r} has an empty text; an empty text cannot be learned from")
        self.labels.index(label)  # LabelMappingError naming the label and the project's labels
        return key, text, label

    def _apply(self, item: VerifiedItem) -> None:
        self._items[item.key] = item
        if item.source is Source.SEED:
            self._seed_keys.add(item.key)
        self._seq = max(self._seq, item.seq)

    def _append(self, events: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_id: str | None = None
        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events).encode("utf-8")
        with open(self.path, "a+b") as fh:  # appends go to the end, reads anywhere
            before = fh.seek(0, os.SEEK_END)
            if before == 0:  # a new log: its first line names it
                new_id = uuid.uuid4().hex
                data = _header(new_id) + data
            else:
                identity = _identity(fh)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            inode = os.fstat(fh.fileno()).st_ino
        if before == 0:
            in_step = self._log_inode is None and self._log_offset == 0  # it had read no other log
            identity = (inode, new_id)
        else:
            in_step = before == self._log_offset and identity == (self._log_inode, self._log_id)
        if in_step:
            # Nothing unread before our events: the pool has read its log up to its end.
            self._log_offset = before + len(data)
            self._log_inode, self._log_id = identity

    def _replay(self, path: Path, start: int = 0) -> None:
        """Apply the log's events from byte ``start`` (0: rebuild the pool from the whole log). A torn
        last line (a crash mid-write) is cut off the file.

        Only an undecodable *last* line counts as torn; anything wrong earlier, or a whole event that
        does not fit (an unknown label), is refused, because silently dropping it would lose a label.
        """
        with open(path, "rb") as fh:
            identity = _identity(fh)  # of the very file read, whichever way the replay ends
            fh.seek(start)
            raw = fh.read()
        lines = raw.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        offset = start
        where = "" if start == 0 else f" (from byte {start})"
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    if number < len(lines):
                        raise CorruptStoreError(
                            f"{path}:{number}{where} is not JSON ({exc}); the log is damaged before its "
                            "end: restore it from a backup or move it aside"
                        ) from exc
                    logger.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                    with open(path, "r+b") as fh:
                        fh.truncate(offset)
                        fh.flush()
                        os.fsync(fh.fileno())
                    self._log_offset = offset
                    self._log_inode, self._log_id = identity
                    return
                self._replay_event(event, f"{path}:{number}{where}")
            offset += len(line) + 1
        if raw and not raw.endswith(b"\n"):
            with open(path, "ab") as fh:  # the last event is whole but its newline was lost
                fh.write(b"\n")
        self._log_offset = offset
        self._log_inode, self._log_id = identity

    def _replay_event(self, event: Any, where: str) -> None:
        try:
            if event["op"] == LOG_HEADER_OP:  # the log's name, read by _identity
                return
            if event["op"] == "mark":
                self._trained_seq = max(self._trained_seq, int(event["seq"]))
                return
            if event["op"] == "del":
                self._items.pop(str(event["key"]), None)
                return
            if event["op"] != "put":
                raise ValueError(f"unknown op {event['op']!r}")
            source = Source(event["source"])
            added_at, seq = float(event["added_at"]), int(event["seq"])
            key, text, label = event["key"], event["text"], event["label"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{where} is not a pool event: {exc!r}") from exc
        try:
            self._check(key, text, label)
        except LabelMappingError as exc:
            raise LabelMappingError(
                f"{where}: {exc}. The pool was recorded for another label set; "
                "open it with the labels it was written with"
            ) from exc
        except BadInputError as exc:
            raise CorruptStoreError(f"{where}: {exc}") from exc
        self._apply(VerifiedItem(key, text, label, source, added_at, seq))


LOG_HEADER_OP = "log"
_HEADER_BYTES = 128


def _header(log_id: str) -> bytes:
    """The first line of a new log: a random id that tells this file from any later one."""
    return (json.dumps({"op": LOG_HEADER_OP, "id": log_id, "at": time.time()}) + "\n").encode("utf-8")


def _identity(fh: Any) -> tuple[int, str | None]:
    """``(inode, id)`` of an open log; the id is None for a log written before logs had one."""
    first = os.pread(fh.fileno(), _HEADER_BYTES, 0).split(b"\n", 1)[0]
    log_id = None
    try:
        event = json.loads(first)
        if isinstance(event, dict) and event.get("op") == LOG_HEADER_OP:
            log_id = str(event["id"])
    except (ValueError, KeyError):
        pass
    return os.fstat(fh.fileno()).st_ino, log_id
