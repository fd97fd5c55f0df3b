"""How rayflow names regions to Ray: a custom resource and a node label per region.

A node that serves region ``us-west`` carries the resource ``region:us-west`` (so work can be
pinned there with a tiny amount of it) and the label ``rayflow/region=us-west`` (so people and
tools can read which region a node is in). The local launcher in ``clusters/`` tags nodes with
these same names, and actors are placed with them.
"""

from __future__ import annotations

from collections.abc import Mapping

REGION_RESOURCE_PREFIX = "region:"
REGION_LABEL_KEY = "rayflow/region"
#: How much of a region resource one actor or task asks for: enough to pin it, too little to limit
#: how many share the node.
REGION_PIN_AMOUNT = 0.01


def region_resource(region: str) -> str:
    """The custom resource that marks a node as serving ``region``."""
    return f"{REGION_RESOURCE_PREFIX}{region}"


def pin_to_region(region: str) -> dict[str, float]:
    """``resources=`` for ``.options()`` that place an actor or task in ``region``."""
    return {region_resource(region): REGION_PIN_AMOUNT}


def region_of(labels: Mapping[str, str] | None, resources: Mapping[str, float] | None = None) -> str:
    """The region a node serves, from its labels (``rayflow/region``) or else its resources
    (``region:<name>``); ``""`` when it names none (or names several through resources)."""
    region = (labels or {}).get(REGION_LABEL_KEY, "")
    if region:
        return str(region)
    prefix = REGION_RESOURCE_PREFIX
    named = [key[len(prefix) :] for key in (resources or {}) if key.startswith(prefix)]
    return named[0] if len(named) == 1 else ""
