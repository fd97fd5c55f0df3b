"""An agent whose work is one model call, reading and writing memory around it (runs in a sandbox).

The patterns benchmark's agent (the design's Diagram 9): recall what memory holds for the prompt,
ask the model (an Anthropic Messages API endpoint, over plain HTTP with the standard library: the
image carries no client library), and store the answer as a new memory. Task fields: ``prompt``,
``model_port`` and optionally ``model_host`` (default: the hub's host as this sandbox reaches it,
which is where services on the same machine are found), ``memory`` (bool), ``namespace``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from rayflow.errors import ConfigError, TransportError

API_VERSION = "2023-06-01"
MODEL = "claude-standin"


def call_model(url: str, prompt: str, timeout_s: float = 60.0) -> str:
    """The text of the model's reply to ``prompt`` (Messages API)."""
    body = json.dumps(
        {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/messages",
        data=body,
        headers={
            "content-type": "application/json",
            "x-api-key": os.environ.get("ANTHROPIC_API_KEY", "sandbox"),
            "anthropic-version": API_VERSION,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            message = json.loads(response.read())
    except OSError as exc:
        raise TransportError(f"the model API did not answer: {exc}") from exc
    return "".join(block.get("text", "") for block in message.get("content") or [] if block.get("type") == "text")


def answer(context: Any) -> dict[str, Any]:
    task = context.task
    host = task.get("model_host") or os.environ.get("RAYFLOW_HUB_HOST") or "127.0.0.1"
    if not task.get("model_port"):
        raise ConfigError("the task names no model_port")
    prompt = str(task.get("prompt") or "")
    namespace = str(task.get("namespace") or "bench/answers")
    hits: list[Any] = []
    if task.get("memory"):
        hits = list(context.memory.search(prompt, k=3, namespace=namespace))
    recalled = "\n".join(hit["item"]["content"] for hit in hits)
    text = call_model(f"http://{host}:{int(task['model_port'])}", f"{recalled}\n\n{prompt}".strip())
    if task.get("memory"):
        context.memory.store_pattern(namespace=namespace, title=prompt[:80] or "answer", content=text,
                                     domain="bench")
    return {"text": text, "memory_hits": len(hits), "attempts": 1}
