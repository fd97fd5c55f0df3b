"""Reads and validates the config of a local multi-region Ray cluster.

Why validate by hand instead of trusting Ray: a typo such as ``cpu: 2`` would otherwise be
ignored silently and the cluster would come up with defaults, and a duplicate region would
give two nodes the same region resource and make region placement ambiguous. Every problem
is reported with the path of the offending value (``regions[1].cpus``).

Why YAML: the config is edited by people, who want comments, and rayflow supports Python
3.10, which has no ``tomllib``. PyYAML is already installed as a dependency of Ray.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from actors.placement import region_resource
from rayflow.errors import ConfigError

#: Ray's own lower bound for a node's object store (75 MiB).
MIN_OBJECT_STORE_MB = 75

# Region and cluster names end up in Ray label values, resource names and directory names,
# so they follow Ray's label value syntax: alphanumerics with '-', '_' or '.' inside.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")

_CLUSTER_KEYS = frozenset({"name", "head_port", "object_store_mb", "regions", "isolation", "subnet", "links"})
_LINK_KEYS = frozenset({"between", "rtt_ms", "jitter_ms", "loss"})
#: How far apart the nodes are: ``none`` (one host's loopback and disk), ``netns`` (each node in
#: network and mount namespaces of its own; regions joined through the link emulator).
ISOLATIONS = ("none", "netns")
DEFAULT_SUBNET = "100.90.0.0/16"
_REGION_KEYS = frozenset({"name", "nodes", "cpus"})


@dataclass(frozen=True)
class RegionSpec:
    """One region: ``nodes`` Ray nodes, each with ``cpus`` CPUs, all tagged with ``name``."""

    name: str
    nodes: int = 1
    cpus: int = 1

    @property
    def resource(self) -> str:
        """The custom resource name that pins work to this region, e.g. ``region:us-west``."""
        return region_resource(self.name)


@dataclass(frozen=True)
class LinkSpec:
    """The emulated link between two regions (isolated clusters only): delay, jitter and loss of
    every IP packet between them, in both directions."""

    between: tuple[str, str]
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def to_emulator(self) -> dict[str, Any]:
        return {
            "between": list(self.between),
            "rtt_ms": self.rtt_ms,
            "jitter_ms": self.jitter_ms,
            "loss": self.loss,
        }


@dataclass(frozen=True)
class ClusterSpec:
    """A whole local cluster; the first node of the first region is the head."""

    regions: tuple[RegionSpec, ...]
    name: str = "rayflow-local"
    head_port: int = 6380
    object_store_mb: int = 150
    isolation: str = "none"
    subnet: str = DEFAULT_SUBNET
    links: tuple[LinkSpec, ...] = ()

    @property
    def node_count(self) -> int:
        """How many Ray nodes the cluster has, head included."""
        return sum(region.nodes for region in self.regions)


def load_cluster_config(path: Path) -> ClusterSpec:
    """Read a YAML cluster config from ``path`` and validate it.

    Raises :class:`ConfigError` when the file is missing, is not YAML, or fails validation.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read cluster config {path}: {exc.strerror}", path=str(path)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster config {path} is not valid YAML: {exc}", path=str(path)) from exc
    try:
        return parse_cluster_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", path=str(path), **exc.details) from exc


def parse_cluster_config(data: Any) -> ClusterSpec:
    """Validate an already-parsed config mapping and build the :class:`ClusterSpec`."""
    if not isinstance(data, Mapping):
        raise ConfigError("the cluster config must be a mapping with a 'regions' list", key="")
    _reject_unknown_keys(data, _CLUSTER_KEYS, where="")

    name = _name(data.get("name", ClusterSpec.name), key="name")
    head_port = _int_in_range(
        data.get("head_port", ClusterSpec.head_port), key="head_port", low=1, high=65535
    )
    object_store_mb = _int_in_range(
        data.get("object_store_mb", ClusterSpec.object_store_mb),
        key="object_store_mb",
        low=MIN_OBJECT_STORE_MB,
        high=None,
    )

    raw_regions = data.get("regions")
    if not isinstance(raw_regions, list) or not raw_regions:
        raise ConfigError("'regions' must be a non-empty list of regions", key="regions")
    regions: list[RegionSpec] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_regions):
        region = _parse_region(raw, where=f"regions[{index}]")
        if region.name in seen:
            raise ConfigError(
                f"regions[{index}].name: region {region.name!r} is listed twice", key=f"regions[{index}].name"
            )
        seen.add(region.name)
        regions.append(region)

    isolation = data.get("isolation", "none")
    if isolation not in ISOLATIONS:
        raise ConfigError(
            f"isolation: must be one of {', '.join(ISOLATIONS)}, got {isolation!r}", key="isolation"
        )
    subnet = _subnet(data.get("subnet", DEFAULT_SUBNET))
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise ConfigError("links: must be a list of {between: [a, b], rtt_ms, jitter_ms, loss}", key="links")
    if raw_links and isolation != "netns":
        raise ConfigError("links: emulated links need `isolation: netns`", key="links")
    links: list[LinkSpec] = []
    joined: set[frozenset[str]] = set()
    for index, raw in enumerate(raw_links):
        link = _parse_link(raw, seen, where=f"links[{index}]")
        pair = frozenset(link.between)
        if pair in joined:
            raise ConfigError(f"links[{index}]: the link {link.between[0]} - {link.between[1]} is listed twice",
                              key=f"links[{index}]")  # fmt: skip
        joined.add(pair)
        links.append(link)

    return ClusterSpec(
        regions=tuple(regions),
        name=name,
        head_port=head_port,
        object_store_mb=object_store_mb,
        isolation=isolation,
        subnet=subnet,
        links=tuple(links),
    )


def _subnet(value: Any) -> str:
    import ipaddress

    try:
        network = ipaddress.IPv4Network(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"subnet: {value!r} is not an IPv4 network such as 100.90.0.0/16", key="subnet"
        ) from None
    if (
        network.prefixlen != 16
        or not network.is_private
        and not network.subnet_of(ipaddress.IPv4Network("100.64.0.0/10"))
    ):
        raise ConfigError(f"subnet: must be a private or shared-address /16, got {value}", key="subnet")
    return str(network)


def _parse_link(raw: Any, regions: set[str], where: str) -> LinkSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a link must be a mapping with 'between' and 'rtt_ms'", key=where)
    _reject_unknown_keys(raw, _LINK_KEYS, where=f"{where}.")
    between = raw.get("between")
    if not (isinstance(between, list) and len(between) == 2 and all(isinstance(x, str) for x in between)):
        raise ConfigError(f"{where}.between: must name two regions", key=f"{where}.between")
    for name in between:
        if name not in regions:
            raise ConfigError(
                f"{where}.between: {name!r} is not a region of this cluster", key=f"{where}.between"
            )
    if between[0] == between[1]:
        raise ConfigError(f"{where}.between: a link joins two different regions", key=f"{where}.between")
    return LinkSpec(
        between=(between[0], between[1]),
        rtt_ms=_number_in_range(raw.get("rtt_ms", 0.0), f"{where}.rtt_ms", 0.0, 60_000.0),
        jitter_ms=_number_in_range(raw.get("jitter_ms", 0.0), f"{where}.jitter_ms", 0.0, 60_000.0),
        loss=_number_in_range(raw.get("loss", 0.0), f"{where}.loss", 0.0, 1.0),
    )


def _number_in_range(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low:g} and {high:g}, got {value}", key=key)
    return float(value)


def _parse_region(raw: Any, where: str) -> RegionSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a region must be a mapping with 'name', 'nodes', 'cpus'", key=where)
    _reject_unknown_keys(raw, _REGION_KEYS, where=f"{where}.")
    if "name" not in raw:
        raise ConfigError(f"{where}.name: every region needs a name", key=f"{where}.name")
    return RegionSpec(
        name=_name(raw["name"], key=f"{where}.name"),
        nodes=_int_in_range(raw.get("nodes", RegionSpec.nodes), key=f"{where}.nodes", low=1, high=None),
        cpus=_int_in_range(raw.get("cpus", RegionSpec.cpus), key=f"{where}.cpus", low=1, high=None),
    )


def _reject_unknown_keys(data: Mapping[Any, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})",
            key=f"{where}{unknown[0]}",
        )


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid name (1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit)",
            key=key,
        )
    return value


def _int_in_range(value: Any, key: str, low: int, high: int | None) -> int:
    # bool is an int subclass, but `cpus: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}", key=key)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        qualifier = "a positive number" if low == 1 and high is None else f"a number {bound}"
        raise ConfigError(f"{key}: must be {qualifier}, got {value}", key=key)
    return value
