"""The LLM reviewer: the paper's secondary review by an OpenAI-compatible chat model.

The client is passed in (``LLMReviewer(client=...)``), so one reviewer works against OpenAI, a
DeepSeek or vLLM endpoint, or the test server alike, and nothing here reads the environment. Three
promises shape the code:

* A label comes only from a strict parse of the answer. An answer that is not exactly one project
  label is ``OFF_LABEL`` and goes to a human, so text inside a task cannot make the model produce a
  label outside the set, and a hedged answer is not taken as a vote.
* One bad item (a timeout, a 500, a garbled body) becomes that item's ``FAILED`` outcome after
  bounded retries; the batch goes on.
* Nothing is paid for twice: answers are cached by (model, prompt, text), and a text repeated inside
  a batch is asked once.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from autoannotator.core.labels import LabelSet
from autoannotator.errors import ReviewError
from autoannotator.models.specialists.base import clip_text
from autoannotator.review.base import ReviewItem, ReviewOutcome, ReviewStatus, parse_answer

if TYPE_CHECKING:  # the web app reads prices and the cache from here; only review jobs call an LLM
    import openai

logger = logging.getLogger(__name__)

# Batches at least this long show a progress bar.
PROGRESS_MIN_ITEMS = 50

# Answers are one label; a few tokens spare let us see (and show a human) what a rambling model said.
DEFAULT_MAX_TOKENS = 16
# A raw answer is kept for audit; a model ignoring max_tokens must not fill the database.
MAX_RAW_ANSWER_CHARS = 500
# The longest we wait between two attempts, whatever Retry-After or the exponential backoff say.
MAX_BACKOFF_S = 20.0


def system_prompt(labels: LabelSet) -> str:
    """The paper's system prompt, word for word, so our LLM numbers are comparable with its tables."""
    return (
        "You are an autoclassifier that's responsible for labeling input text. "
        "You must respond with only one of these labels: " + ", ".join(labels) + "."
    )


@dataclass(frozen=True)
class PriceTable:
    """US dollars per million tokens, (input, output), by model name.

    A model is priced by its exact name, else by the longest known name it extends with a dash, so a
    dated snapshot (``gpt-4o-mini-2024-07-18``) costs what its family costs.
    """

    per_million: Mapping[str, tuple[float, float]] = field(hash=False)

    def __post_init__(self) -> None:
        for model, (price_in, price_out) in self.per_million.items():
            if price_in < 0 or price_out < 0:
                raise ValueError(f"prices must not be negative, got {model!r}: {(price_in, price_out)!r}")
        object.__setattr__(self, "per_million", MappingProxyType(dict(self.per_million)))

    @classmethod
    def default(cls) -> PriceTable:
        """List prices of well-known models (mid 2025); pass your own table when yours differ."""
        return cls(
            {
                "gpt-4o-mini": (0.15, 0.60),
                "gpt-4o": (2.50, 10.00),
                "gpt-4.1": (2.00, 8.00),
                "gpt-4.1-mini": (0.40, 1.60),
                "gpt-4.1-nano": (0.10, 0.40),
                "gpt-3.5-turbo": (0.50, 1.50),
                "deepseek-chat": (0.27, 1.10),
            }
        )

    def with_price(self, model: str, price_in: float, price_out: float) -> PriceTable:
        """This table with ``model`` (re)priced: for a deployment whose contract or model differs."""
        return PriceTable({**self.per_million, model: (price_in, price_out)})

    def price(self, model: str) -> tuple[float, float] | None:
        if model in self.per_million:
            return self.per_million[model]
        families = [name for name in self.per_million if model.startswith(name + "-")]
        return self.per_million[max(families, key=len)] if families else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Dollars for one call, or None when the model is not in the table."""
        price = self.price(model)
        if price is None:
            return None
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


@dataclass(frozen=True)
class LLMUsage:
    """Running totals of one reviewer: what the LLM review has cost so far.

    ``calls`` counts HTTP requests sent, retries included (that is what rate limits and bills see);
    ``cache_hits`` counts items answered without a request; ``failures``, ``off_label`` and
    ``unsure`` count items that went to the human queue for each reason.
    """

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    failures: int = 0
    off_label: int = 0
    unsure: int = 0


class ReviewCache:
    """Raw LLM answers by sha256 of (model, system prompt, text), optionally persisted as JSON lines.

    The raw answer is stored, not the verdict, so a cached answer is parsed by today's rules. Texts
    are never written, only their hashes. Each entry is appended as it arrives, so a crash loses at
    most the line being written; a truncated last line is skipped on load. Only answers are cached
    (labelled or off-label): failures are worth asking again.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._answers: dict[str, str] = {}
        self._confidences: dict[str, float] = {}
        self._lock = threading.Lock()
        # How far the file has been read (whole lines only), and which file it was.
        self._offset = 0
        self._inode: int | None = None
        if self.path is not None and self.path.exists():
            self._load(self.path)

    @staticmethod
    def key(model: str, system_prompt: str, text: str) -> str:
        """JSON-encoding the parts first keeps ("ab", "c") and ("a", "bc") apart."""
        return hashlib.sha256(json.dumps([model, system_prompt, text]).encode()).hexdigest()

    def _load(self, path: Path) -> None:
        with path.open("rb") as fh:
            data, self._inode = fh.read(), os.fstat(fh.fileno()).st_ino
        self._read_lines(data)
        self._offset = len(data)
        if data and not data.endswith(b"\n"):
            # End the truncated line, or the next append would glue a good entry onto it.
            with path.open("ab") as f:
                f.write(b"\n")
            self._offset += 1

    def _read_lines(self, data: bytes) -> None:
        skipped = 0
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
                self._answers[str(entry["key"])] = str(entry["answer"])
                if entry.get("confidence") is not None:
                    self._confidences[str(entry["key"])] = float(entry["confidence"])
            except (ValueError, KeyError, TypeError):
                skipped += int(bool(line.strip()))
        if skipped:
            logger.warning("skipped %d unreadable lines in review cache %s", skipped, self.path)

    def refresh(self) -> int:
        """Read the answers other processes appended since this cache last read its file (whole
        lines only); returns the bytes read. A long-lived worker keeps one cache per project and
        calls this before each review, instead of reading the whole file again. A replaced or
        shortened file is read from the start; answers already known are kept (they stay true)."""
        if self.path is None:
            return 0
        with self._lock:
            try:
                fh = self.path.open("rb")
            except FileNotFoundError:
                return 0
            with fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    self._offset, self._inode = 0, st.st_ino
                fh.seek(self._offset)
                data = fh.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for next time
            self._read_lines(whole)
            self._offset += len(whole)
            return len(whole)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key)

    def confidence(self, key: str) -> float | None:
        """The cached answer's probability, when the endpoint reported one."""
        with self._lock:
            return self._confidences.get(key)

    def put(self, key: str, answer: str, confidence: float | None = None) -> None:
        entry: dict[str, Any] = {"key": key, "answer": answer}
        if confidence is not None:
            entry["confidence"] = confidence
        with self._lock:
            self._answers[key] = answer
            if confidence is not None:
                self._confidences[key] = confidence
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)


def make_openai_client(base_url: str, api_key: str | None, timeout: float) -> openai.OpenAI:
    """A client for an OpenAI-compatible endpoint, built from explicit settings only.

    Local servers (vLLM, Ollama) take no key; a placeholder is sent then, because without one the
    ``openai`` library would fall back to reading ``OPENAI_API_KEY`` from the environment. The
    library's own retries are off: :class:`LLMReviewer` does its own.
    """
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=0)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, or ``Retry-After`` seconds or date)."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


def answer_probability(response: Any) -> float | None:
    """The probability the model gave its whole answer: exp of the sum of its tokens'
    log-probabilities; None when the endpoint sent none (not asked, or not supported)."""
    try:
        tokens = response.choices[0].logprobs.content
    except (AttributeError, IndexError, TypeError):
        return None
    if not tokens:
        return None
    try:
        return math.exp(sum(float(t.logprob) for t in tokens))
    except (AttributeError, TypeError, ValueError):
        return None


def _read(response: Any) -> tuple[str, int, int]:
    """Content and token counts of a chat completion; :class:`ReviewError` when it is not one."""
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError, KeyError):
        raise ReviewError("malformed response: no choices[0].message in the body") from None
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    return ("" if content is None else str(content)), prompt_tokens, completion_tokens


class LLMReviewer:
    """Labels uncertain items with a chat model through an injected ``openai.OpenAI`` client.

    Requests run on a thread pool, at most ``max_concurrency`` at once for this reviewer (across
    concurrent ``review`` calls too). 429, 408, 5xx, connection errors, timeouts and malformed bodies
    are retried ``max_retries`` times with exponential backoff and jitter (or after ``Retry-After``),
    never waiting more than ``max_backoff_s``; other 4xx fail at once, since asking again cannot
    help. ``prices`` defaults to :meth:`PriceTable.default`.

    ``min_confidence`` > 0 asks the endpoint for token log-probabilities: an answer whose probability
    is below it is ``UNSURE`` and goes to a person. Where the endpoint returns none, every answer
    counts as sure, as with ``min_confidence`` = 0.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        labels: LabelSet,
        *,
        prices: PriceTable | None = None,
        max_concurrency: int = 4,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = MAX_BACKOFF_S,
        timeout_s: float = 30.0,
        cache: ReviewCache | None = None,
        temperature: float = 0.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        name: str | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        if not model.strip():
            raise ValueError("model must be a model name, got an empty string")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries!r}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff must not be negative, got {backoff_s!r} / {max_backoff_s!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens!r}")
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence!r}")
        self.name = name or f"llm:{model}"
        self.model = model
        self.labels = labels
        self.prices = prices if prices is not None else PriceTable.default()
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.cache = cache
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.min_confidence = min_confidence
        # Asked for only when they decide something: some endpoints refuse the parameter.
        self._logprobs: dict[str, Any] = {"logprobs": True} if min_confidence > 0 else {}
        self.system_prompt = system_prompt(labels)
        # The library's retries would multiply ours (4 x 3 requests per item); ours are the only ones.
        self._client = client.with_options(max_retries=0, timeout=timeout_s)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._usage = LLMUsage()
        self._rng = random.Random()
        self._warned_unpriced = False

    @property
    def usage(self) -> LLMUsage:
        with self._lock:
            return self._usage

    def _add(self, **deltas: float) -> None:
        with self._lock:
            current = self._usage
            self._usage = replace(current, **{k: getattr(current, k) + v for k, v in deltas.items()})

    def review(self, items: Sequence[ReviewItem]) -> list[ReviewOutcome]:
        """One outcome per item, in order; a failing item becomes a ``FAILED`` outcome, never an exception."""
        texts = [clip_text(item.text) for item in items]
        keys = [ReviewCache.key(self.model, self.system_prompt, text) for text in texts]
        first: dict[str, int] = {}  # cache key -> index of the one item whose text is asked
        for i, key in enumerate(keys):
            if key not in first and not self._cached(key):
                first[key] = i
        logger.info("%s: reviewing %d items, %d to ask the model", self.name, len(items), len(first))
        fresh: dict[str, ReviewOutcome] = {}
        if first:
            workers = min(self.max_concurrency, len(first))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-review") as pool:
                answers = pool.map(lambda i: self._ask_safely(items[i], texts[i]), first.values())
                # A bar only for long batches (an LLM-only pass over a stream), not for a chunk's few items.
                bar = tqdm(answers, total=len(first), desc=f"{self.name} review", unit="item", leave=False,
                           disable=len(first) < PROGRESS_MIN_ITEMS)  # fmt: skip
                fresh = dict(zip(first, bar, strict=True))
        outcomes = []
        for i, (item, key) in enumerate(zip(items, keys, strict=True)):
            if first.get(key) == i:
                outcomes.append(fresh[key])
            elif key in fresh and fresh[key].status is ReviewStatus.FAILED:
                outcomes.append(self._failed(item, fresh[key].detail))
            else:
                outcomes.append(self._from_cache(item, key, fresh.get(key)))
        return outcomes

    def _cached(self, key: str) -> bool:
        """Whether the cache can answer: it holds the answer and, when answers need a probability,
        the probability too (an answer cached before the floor was set is asked again)."""
        if self.cache is None or self.cache.get(key) is None:
            return False
        return self.min_confidence == 0 or self.cache.confidence(key) is not None

    def _from_cache(self, item: ReviewItem, key: str, fresh: ReviewOutcome | None) -> ReviewOutcome:
        """A free outcome: from the persistent cache, or a repeat of a text asked in this batch."""
        if fresh is not None:
            answer, confidence = fresh.raw_answer, fresh.confidence
        else:
            answer = self.cache.get(key) if self.cache else None
            confidence = self.cache.confidence(key) if self.cache else None
        self._add(cache_hits=1)
        return self._verdict(item, answer or "", 0, 0, 0.0, cached=True, confidence=confidence)

    def _ask_safely(self, item: ReviewItem, text: str) -> ReviewOutcome:
        """The boundary for one item: whatever goes wrong, the batch gets an outcome for it."""
        try:
            return self._ask(item, text)
        except Exception as exc:
            logger.error("%s: item %s failed unexpectedly", self.name, item.key, exc_info=True)
            return self._failed(item, f"unexpected {type(exc).__name__}: {exc}")

    def _ask(self, item: ReviewItem, text: str) -> ReviewOutcome:
        if not text.strip():
            return self._failed(item, "empty text: nothing for the model to label")
        messages: list[Any] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": text},
        ]
        import openai

        detail = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                with self._slots:
                    self._add(calls=1)
                    response = self._client.chat.completions.create(
                        model=self.model,
                        messages=messages,
                        temperature=self.temperature,
                        max_tokens=self.max_tokens,
                        **self._logprobs,
                    )
                content, prompt_tokens, completion_tokens = _read(response)
                confidence = answer_probability(response) if self.min_confidence > 0 else None
            except openai.APIStatusError as exc:
                detail = f"HTTP {exc.status_code}: {exc.message}"
                if exc.status_code not in (408, 429) and exc.status_code < 500:
                    return self._failed(item, detail)
                retry_after = _retry_after_s(exc.response.headers)
            except openai.APITimeoutError:
                detail = f"timed out after {self.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                detail = f"connection error: {exc.message}"
            except (
                json.JSONDecodeError,
                UnicodeDecodeError,
                ReviewError,
                openai.APIResponseValidationError,
            ) as exc:
                detail = f"malformed response from the API: {exc}"
            else:
                cost = self._cost(prompt_tokens, completion_tokens)
                self._add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)
                outcome = self._verdict(
                    item, content, prompt_tokens, completion_tokens, cost, cached=False, confidence=confidence
                )
                if self.cache is not None:
                    self.cache.put(ReviewCache.key(self.model, self.system_prompt, text), content, confidence)
                return outcome
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                logger.debug(
                    "%s: item %s attempt %d failed (%s); retrying in %.2f s",
                    self.name,
                    item.key,
                    attempt + 1,
                    detail,
                    delay,
                )
                time.sleep(delay)
        return self._failed(item, f"{detail} (gave up after {self.max_retries + 1} attempts)")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        # Jitter keeps parallel workers that failed together from retrying together.
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        with self._lock:
            return base * (0.5 + 0.5 * self._rng.random())

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        cost = self.prices.cost(self.model, prompt_tokens, completion_tokens)
        if cost is None:
            with self._lock:
                warn, self._warned_unpriced = not self._warned_unpriced, True
            if warn:
                logger.warning("%s: no price for model %r; its cost is counted as 0", self.name, self.model)
            return 0.0
        return cost

    def _verdict(
        self,
        item: ReviewItem,
        answer: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost: float,
        *,
        cached: bool,
        confidence: float | None = None,
    ) -> ReviewOutcome:
        label = parse_answer(answer, self.labels)
        status = ReviewStatus.LABELLED if label is not None else ReviewStatus.OFF_LABEL
        if label is None:
            self._add(off_label=1)
        elif confidence is not None and confidence < self.min_confidence:
            self._add(unsure=1)
            return ReviewOutcome(
                key=item.key,
                label=None,
                status=ReviewStatus.UNSURE,
                reviewer=self.name,
                raw_answer=answer[:MAX_RAW_ANSWER_CHARS],
                detail=f"the model gave {label!r} a probability of {confidence:.2f}, "
                f"below the floor of {self.min_confidence:g}",
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost=cost,
                cached=cached,
                confidence=confidence,
            )
        return ReviewOutcome(
            key=item.key,
            label=label,
            status=status,
            reviewer=self.name,
            raw_answer=answer[:MAX_RAW_ANSWER_CHARS],
            detail=""
            if label is not None
            else "the model gave no answer"
            if not answer.strip()
            else "the answer is not exactly one of the project's labels",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            cached=cached,
            confidence=confidence,
        )

    def _failed(self, item: ReviewItem, detail: str) -> ReviewOutcome:
        self._add(failures=1)
        logger.warning("%s: item %s goes to a human: %s", self.name, item.key, detail)
        return ReviewOutcome(item.key, None, ReviewStatus.FAILED, self.name, detail=detail)


def build_reviewer(
    base_url: str,
    api_key: str | None,
    model: str,
    labels: LabelSet,
    *,
    price: tuple[float, float] | None = None,
    timeout_s: float = 30.0,
    max_concurrency: int = 4,
    cache: ReviewCache | None = None,
    min_confidence: float = 0.0,
) -> LLMReviewer:
    """The LLM reviewer as the workers and ``autoannotator simulate --review llm`` build it: the
    built-in price table, with ``model`` repriced when ``price`` (input, output per million tokens)
    is given."""
    prices = PriceTable.default()
    if price is not None:
        prices = prices.with_price(model, *price)
    return LLMReviewer(
        make_openai_client(base_url, api_key or None, timeout_s),
        model,
        labels,
        prices=prices,
        max_concurrency=max_concurrency,
        timeout_s=timeout_s,
        cache=cache,
        min_confidence=min_confidence,
    )
