"""A real local HTTP server that speaks enough of the OpenAI chat completions API for our tests.

Why not mock the client: the reviewers' promises (retries, timeouts, no double retries inside the
``openai`` library, what ends up in the request) only hold if a real ``openai.OpenAI`` client talks
to a real socket. This server is that socket. It runs ``http.server.ThreadingHTTPServer`` on
127.0.0.1 with an OS-chosen port in a daemon thread, and stops when its ``with`` block ends.

Usage from any test::

    from tests.openai_server import OpenAIServer, Reply

    with OpenAIServer(answer=lambda text: "bullish") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test-key")
        server.script(Reply(status=429, retry_after=0.05), Reply(content="maybe"))
        ...  # first request gets a 429, the second answers "maybe", later ones call ``answer``
        assert server.requests[0].authorization == "Bearer test-key"
        assert server.requests[0].user_text == "..."

Endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``; anything else is a 404 with an
OpenAI-style error body. Every request is recorded (:class:`RecordedRequest`), including the ones
answered with an error, so tests can count calls and read what was sent.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Usage = tuple[int, int]


@dataclass(frozen=True)
class Reply:
    """How the server treats one upcoming request; the defaults give a normal, well-formed answer.

    ``status``: answer with this HTTP status and an OpenAI-style error body (429, 500, 503, 400...).
    ``retry_after``: with ``status``, send a ``Retry-After`` header of this many seconds.
    ``delay_s``: sleep before answering (to trip the client's timeout, or to overlap requests).
    ``malformed``: answer 200 with a body that claims to be JSON but is not.
    ``content``: answer 200 with this message content instead of what ``answer`` says.
    ``usage``: report these (prompt_tokens, completion_tokens) instead of the server's count.
    """

    status: int | None = None
    retry_after: float | None = None
    delay_s: float = 0.0
    malformed: bool = False
    content: str | None = None
    usage: Usage | None = None


@dataclass
class RecordedRequest:
    """One request as the server saw it, recorded on arrival (so a request still sleeping counts).

    ``reply_status`` is None until the reply starts going out (it is set before the first byte is
    written, so a client that has read its reply always finds it set), and -1 when none went out
    (the client hung up first, or the server stopped).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    reply_status: int | None = None

    @property
    def authorization(self) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == "authorization"), None)

    def _messages(self, role: str) -> list[str]:
        messages = self.body.get("messages", []) if isinstance(self.body, dict) else []
        return [str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") == role]

    @property
    def system_prompt(self) -> str | None:
        found = self._messages("system")
        return found[0] if found else None

    @property
    def user_text(self) -> str | None:
        found = self._messages("user")
        return found[-1] if found else None


_LABELS_IN_PROMPT = re.compile(r"one of these labels: (.*)\.\s*$", re.DOTALL)


def labels_in_prompt(system_prompt: str | None) -> list[str]:
    """The labels a system prompt in the paper's wording offers, in order ([] when it is not one)."""
    found = _LABELS_IN_PROMPT.search(system_prompt or "")
    return [s.strip() for s in found.group(1).split(",")] if found else []


def keyword_answer(system_prompt: str | None, text: str) -> str:
    """The default answer: the first offered label the text mentions, else the first offered label.

    Deterministic and independent of the project, so an end-to-end test of any label set gets
    plausible labels without scripting anything.
    """
    labels = labels_in_prompt(system_prompt)
    lowered = text.lower()
    for label in labels:
        if label.lower() in lowered:
            return label
    return labels[0] if labels else "unknown"


def rough_usage(body: dict[str, Any], content: str) -> Usage:
    """Token counts that grow with the input like a tokenizer's do (about four characters a token)."""
    chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []) if isinstance(m, dict))
    return chars // 4 + 1, len(content) // 4 + 1


class OpenAIServer:
    """A scriptable OpenAI-compatible server; use it as a context manager.

    ``answer`` maps the last user message to the assistant's content; without it the server uses
    :func:`keyword_answer`. ``usage`` maps (request body, content) to token counts; without it,
    :func:`rough_usage`. Misbehaviours come from :meth:`script` (one per upcoming request, in order)
    and, once the script is used up, from :meth:`always` (for "500 forever" and the like).
    """

    def __init__(
        self,
        answer: Callable[[str], str] | None = None,
        *,
        usage: Callable[[dict[str, Any], str], Usage] | None = None,
        probability: Callable[[str], float] | None = None,
    ) -> None:
        self._answer = answer
        self._usage = usage or rough_usage
        # With ``probability`` (user text -> the answer's probability) the server returns token
        # log-probabilities when a request asks for them; without it, never (as many endpoints do).
        self._probability = probability
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._always: Reply | None = None
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue misbehaviours for the next requests, one reply per request, first in first out."""
        with self._lock:
            self._script.extend(replies)

    def always(self, reply: Reply | None) -> None:
        """Treat every request past the script this way (``None`` goes back to normal answers)."""
        with self._lock:
            self._always = reply

    def reset(self) -> None:
        """Forget the script, the standing misbehaviour, the recorded requests and the in-flight peak."""
        with self._lock:
            self._script.clear()
            self._always = None
            self._requests.clear()
            self._max_in_flight = 0

    # -- what happened ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def completions(self) -> list[RecordedRequest]:
        """Only the chat completion requests."""
        return [r for r in self.requests if r.path.rstrip("/").endswith("/chat/completions")]

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was handling at the same moment."""
        with self._lock:
            return self._max_in_flight

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, without the ``/v1`` prefix."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it in a `with` block")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """What to pass as ``base_url`` to ``openai.OpenAI``."""
        return self.url + "/v1"

    def start(self) -> OpenAIServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._stopping.clear()
        # A short poll interval keeps stop() (which waits for the serving loop to notice) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.02,), name="openai-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests still sleeping in ``delay_s`` are cut short and get no reply."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------

    def _next_reply(self) -> Reply:
        with self._lock:
            if self._script:
                return self._script.popleft()
            return self._always or Reply()

    def _enter(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _replying(self, record: RecordedRequest, status: int) -> None:
        with self._lock:
            record.reply_status = status

    def _leave(self, record: RecordedRequest, status: int) -> None:
        with self._lock:
            self._in_flight -= 1
            if status == -1 or record.reply_status is None:
                record.reply_status = status

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        record = RecordedRequest("POST", "", {}, body)
        text = record.user_text or ""
        if reply.content is not None:
            content = reply.content
        elif self._answer is not None:
            content = self._answer(text)
        else:
            content = keyword_answer(record.system_prompt, text)
        prompt_tokens, completion_tokens = reply.usage or self._usage(body, content)
        logprobs = None
        if body.get("logprobs") and self._probability is not None:
            logprobs = {"content": _tokens(content, self._probability(text)), "refusal": None}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", "unknown")),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _tokens(content: str, probability: float) -> list[dict[str, Any]]:
    """The answer as two tokens whose log-probabilities add up to log(``probability``)."""
    half = max(1, len(content) // 2)
    pieces = [p for p in (content[:half], content[half:]) if p]
    each = math.log(probability) / len(pieces)
    return [{"token": p, "logprob": each, "bytes": list(p.encode()), "top_logprobs": []} for p in pieces]


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_exceeded"}


def _error(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    _record: RecordedRequest

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest's output clean; the recorded requests are the log."""

    def do_GET(self) -> None:
        self._handle(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self._handle(body)

    def _handle(self, body: Any) -> None:
        owner = self.owner
        path = self.path.split("?", 1)[0].rstrip("/")
        is_completion = self.command == "POST" and path.endswith("/chat/completions")
        reply = owner._next_reply() if is_completion else Reply()
        status = 200
        record = RecordedRequest(self.command, self.path, dict(self.headers.items()), body)
        self._record = record
        owner._enter(record)
        try:
            if reply.delay_s and owner._stopping.wait(reply.delay_s):
                status = -1  # the server is stopping: no reply
                return
            if self.command == "GET" and path.endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]})
            elif not is_completion:
                status = 404
                self._send(404, _error(404, f"no route for {self.command} {self.path}"))
            elif reply.status is not None:
                status = reply.status
                extra = {} if reply.retry_after is None else {"Retry-After": f"{reply.retry_after:g}"}
                self._send(status, _error(status, f"scripted HTTP {status}"), extra)
            elif not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                status = 400
                self._send(400, _error(400, "the body must be a JSON object with a `messages` list"))
            elif reply.malformed:
                self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [', {})
            else:
                self._send(200, owner._completion(body, reply))
        except (BrokenPipeError, ConnectionResetError):
            status = -1  # the client gave up (its timeout) before the reply went out
        finally:
            owner._leave(record, status)

    def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), extra or {})

    def _send_raw(self, status: int, data: bytes, extra: dict[str, str]) -> None:
        # Recorded before the reply is written: the client may read it and look at the record
        # before this handler thread runs again.
        self.owner._replying(self._record, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
