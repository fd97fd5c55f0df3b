"""A local stand-in for a model API: the Anthropic Messages wire protocol, answering after a fixed delay.

Why: the swarm's benchmarks and tests need agents whose work is "one model call of 2 s", as an LLM
API would give, on a machine that cannot reach any model service. The stand-in speaks the real
protocol (``POST /v1/messages`` with ``x-api-key`` and ``anthropic-version`` headers, a
``message`` object back, typed ``error`` objects on bad requests) so the real client library can
drive it, and it answers deterministically: the reply names the prompt's length and a digest of it.

Each request is served on its own thread, so ten concurrent calls all take the delay once, as
they would against a real API.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Largest request body accepted (bytes); larger ones get a typed error, not a crash.
MAX_BODY_BYTES = 1024 * 1024


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def prompt_text(request: dict[str, Any]) -> str:
    """The text of the request's user turns (string content or text blocks)."""
    parts: list[str] = []
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return "\n".join(parts)


def reply_for(request: dict[str, Any]) -> dict[str, Any]:
    """A Messages API ``message`` answering ``request`` deterministically."""
    text = prompt_text(request)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    answer = f"answer {digest} to a prompt of {len(text)} characters"
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": str(request.get("model", "standin")),
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": max(1, len(text) // 4), "output_tokens": max(1, len(answer) // 4)},
    }


def validate(request: Any) -> str | None:
    """Why ``request`` is not a valid Messages request, or ``None``."""
    if not isinstance(request, dict):
        return "the body must be a JSON object"
    if not isinstance(request.get("model"), str):
        return "model: field required"
    if not isinstance(request.get("max_tokens"), int) or request["max_tokens"] < 1:
        return "max_tokens: a positive integer is required"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    return None


class ModelStandin:
    """The server: ``with ModelStandin(delay_s=2.0) as model: model.url``."""

    def __init__(self, delay_s: float = 2.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        #: Most requests being answered at the same moment (a real API serves calls concurrently).
        self.peak_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                return None

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:20]}")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - the http.server naming
                if self.path.split("?")[0] != "/v1/messages":
                    self._send(404, error_body("not_found_error", f"no route {self.path}"))
                    return
                if not self.headers.get("x-api-key") and not self.headers.get("authorization"):
                    self._send(401, error_body("authentication_error", "x-api-key header is required"))
                    return
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY_BYTES:
                    self._send(413, error_body("request_too_large", "request body too large"))
                    return
                try:
                    request = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    self._send(400, error_body("invalid_request_error", "the body is not JSON"))
                    return
                problem = validate(request)
                if problem is not None:
                    self._send(400, error_body("invalid_request_error", problem))
                    return
                with standin._lock:
                    standin._in_flight += 1
                    standin.peak_in_flight = max(standin.peak_in_flight, standin._in_flight)
                # The model's latency: this is the stand-in's whole point, the work of the call.
                time.sleep(standin.delay_s)
                with standin._lock:
                    standin._in_flight -= 1
                    standin.calls += 1
                self._send(200, reply_for(request))

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-standin", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> ModelStandin:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ModelStandin:  # noqa: PYI034 - not meant to be subclassed
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
