"""Finding a subtask's result in the hub after its worker was lost.

Workers store each result under ``swarm/<job>/results/<subtask>`` before answering the
coordinator. A worker that dies between the two (its node lost, its actor killed) has done the
work; the coordinator looks here before giving the subtask to another worker, so the work is not
repeated and the subtask still appears exactly once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from rayflow.errors import RayflowError
from rayflow.swarm.job import subtask_result_namespace
from rayflow.wire.subtasks import Subtask, SubtaskResult

log = logging.getLogger("rayflow.swarm.recovery")


def result_from_item(item: Any, subtask: Subtask) -> SubtaskResult | None:
    """The result recorded in a hub item, if the item is ``subtask``'s result record."""
    if not isinstance(item, dict):
        return None
    try:
        data = json.loads(item.get("content") or "")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("subtask_id") != subtask.id or data.get("index") != subtask.index:
        return None
    return SubtaskResult.from_dict(data)


def find_recorded_result(client: Any, results_namespace: str, subtask: Subtask) -> SubtaskResult | None:
    """``subtask``'s recorded result from the hub, or ``None`` (also when the hub cannot be asked)."""
    try:
        hits = client.search(
            f"result of {subtask.id}",
            k=3,
            namespace=subtask_result_namespace(results_namespace, subtask.id),
            domain="swarm-result",
        )
    except RayflowError as exc:
        log.warning("could not ask the hub for %s's result: %s", subtask.id, exc)
        return None
    for hit in hits or []:
        found = result_from_item(hit.get("item") if isinstance(hit, dict) else None, subtask)
        if found is not None:
            return found
    return None
