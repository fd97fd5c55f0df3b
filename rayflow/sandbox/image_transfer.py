"""Moving the sandbox image between Docker engines, and deciding which engines need it.

Why move an image rather than build it everywhere: a build (:func:`rayflow.sandbox.image.build_sandbox_image`)
makes a Debian root filesystem with ``debootstrap``, which takes about a minute and needs the
Debian mirror; an engine that already holds the current image can instead export it
(``docker save``) and another engine load it (``docker load``) in seconds, with no network but
the cluster's own. The Ray side (:func:`actors.fleet.ensure_image_on_nodes`) carries the bytes
through the object store; this module holds the Docker and the planning parts, with no Ray.

Why engines, not nodes: several Ray nodes may share one engine (nodes started on one machine
talk to the same ``dockerd``), so an engine is named by what it says of itself (:func:`engine_id`)
and an image is made current once per engine; the other nodes of that engine share it.

Why check after loading: an archive could hold another image than the one asked for (a tag
moved on the source meanwhile, a truncated stream), and a node could run other rayflow files
than the source and so expect another content hash. A load therefore checks the loaded image's
tag and hash label against the source's and then :func:`~rayflow.sandbox.image.image_status`
on the loading engine, and raises a typed error saying what differs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError, PayloadTooLargeError, RayflowError
from rayflow.sandbox.image import (
    DEFAULT_TAG,
    HASH_LABEL,
    ImageStatus,
    _client,
    _drop_replaced,
    _find_image,
    _labels,
    image_status,
)

#: Largest image archive moved through the object store unless told otherwise. The sandbox image
#: is about 140 MB; the bound keeps a wrong tag (a huge image) from filling the object store.
DEFAULT_MAX_IMAGE_BYTES = 1 << 30

#: What happened to the image on a node (:attr:`NodeImageRecord.action`).
CURRENT = "current"  # its engine already had the current image
BUILT = "built"  # the image was built on this node (no engine had it)
LOADED = "loaded"  # the image was exported elsewhere and loaded into this node's engine
SHARED = "shared"  # its engine was made current through another node (built or loaded there)
ACTIONS = (CURRENT, BUILT, LOADED, SHARED)


# --- records (plain data) ----------------------------------------------------------------------
@dataclass(frozen=True)
class EngineImage:
    """What one probe of an engine found: its id, and whether it holds the current image."""

    engine_id: str
    present: bool
    current: bool
    #: Seconds the probe took (asking the engine and hashing the shipped files).
    seconds: float


@dataclass(frozen=True)
class ImageProbe:
    """A probe's finding on one Ray node: which engine the node uses and what that engine holds."""

    node_id: str
    region: str
    engine_id: str
    present: bool
    current: bool
    seconds: float

    @property
    def engine_key(self) -> str:
        """The engine's id, or the node's own name when the engine gave none (counted alone)."""
        return self.engine_id or f"node:{self.node_id}"


@dataclass(frozen=True)
class NodeImageRecord:
    """What making the image current took on one node, for the run's report."""

    node_id: str
    region: str
    engine_id: str
    #: One of :data:`ACTIONS`.
    action: str
    #: Seconds spent on this node: the probe, plus its build, export or load.
    seconds: float
    #: Bytes of image archive exported from (the source) or loaded into (a loading node) this node.
    bytes_moved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TransferPlan:
    """Which node builds, which exports and which load, so every engine holds the current image."""

    #: The node that builds the image, when no engine holds it current.
    build_on: str | None
    #: The node whose engine's image is exported (once), when some engine lacks it; the builder
    #: when there was nothing to export from.
    export_from: str | None
    #: One node of each other engine that lacks the image, in node order.
    load_on: tuple[str, ...]
    #: Every probed node's action once the plan is carried out.
    actions: Mapping[str, str] = field(default_factory=dict)

    @property
    def moves(self) -> bool:
        """Whether any bytes go through the object store."""
        return bool(self.load_on)


@dataclass(frozen=True)
class ExportedImage:
    """An image archive (``docker save`` with its tag) and what the loading side checks it against."""

    tag: str
    image_id: str
    #: The source's ``rayflow.image-hash`` label ("" when it has none).
    image_hash: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


# --- planning (pure) ----------------------------------------------------------------------------
def plan_image_transfers(probes: Iterable[ImageProbe]) -> TransferPlan:
    """Decide, from one probe per node, what makes every engine hold the current image.

    Nodes are grouped by engine; an engine counts as current only when every node of it found
    the image current (a node that expects another hash is then loaded into, and its check says
    why it still differs). If every engine is current nothing moves. Otherwise one node exports
    the image once — the first node (by id) of the first current engine, or, when no engine
    holds it, the first node of the first engine, which builds it first — and one node of every
    other lacking engine loads it. Nodes of an engine made current through another node are
    ``shared``.
    """
    by_engine: dict[str, list[ImageProbe]] = {}
    for probe in sorted(probes, key=lambda p: p.node_id):
        by_engine.setdefault(probe.engine_key, []).append(probe)
    current = [key for key, nodes in by_engine.items() if all(p.current for p in nodes)]
    lacking = [key for key in by_engine if key not in current]
    actions = {p.node_id: CURRENT for key in current for p in by_engine[key]}
    if not lacking:
        return TransferPlan(None, None, (), actions)
    build_on: str | None = None
    if current:
        export_from = by_engine[current[0]][0].node_id
    else:
        builder_engine = lacking.pop(0)
        build_on = export_from = by_engine[builder_engine][0].node_id
        for probe in by_engine[builder_engine]:
            actions[probe.node_id] = BUILT if probe.node_id == build_on else SHARED
    load_on = []
    for key in lacking:
        target, *others = by_engine[key]
        load_on.append(target.node_id)
        actions[target.node_id] = LOADED
        actions.update({p.node_id: SHARED for p in others})
    return TransferPlan(build_on, export_from if load_on else None, tuple(load_on), actions)


def image_check_summary(
    tag: str,
    records: Sequence[NodeImageRecord],
    *,
    checked_at: float,
    seconds: float,
    earlier: bool = False,
) -> dict[str, Any]:
    """The ``images`` entry of a run's summary (what :func:`rayflow.wire.synthesis.health_lines` reads).

    ``checked_at`` is when the check started (seconds since the epoch), ``seconds`` how long it took
    in all; ``earlier`` marks a check made for an earlier job on the same image and nodes.
    """
    return {
        "image": tag,
        "checked_at": checked_at,
        "seconds": round(seconds, 3),
        "earlier": earlier,
        "nodes": [record.to_dict() for record in records],
    }


# --- Docker (I/O) -------------------------------------------------------------------------------
def engine_id(client: Any) -> str:
    """Who this engine is, so nodes answering the same share one engine and an image made current
    through one of them is current for all ("" if the engine says nothing of itself).

    ``docker info``'s ``ID`` alone is not enough: engines before Docker 23 derive it from the
    machine's trust key (``/etc/docker/key.json``), which every ``dockerd`` started on that machine
    shares, and machines cloned from one disk image share it too. So the id is joined with the
    engine's data root (two engines of one machine never share one) and its host name.
    """
    try:
        info = client.info()
    except Exception as exc:  # the SDK raises DockerException, requests' or OS errors
        raise ConfigError(f"the Docker engine did not say who it is: {exc}") from exc
    ident, host, root = (str(info.get(key) or "") for key in ("ID", "Name", "DockerRootDir"))
    if not (ident or root):
        return ""
    return f"{ident} ({host}:{root})"


def probe_engine_image(tag: str = DEFAULT_TAG, *, client: Any | None = None) -> EngineImage:
    """Which engine this is and whether it holds ``tag`` current (``image_status``), timed."""
    started = time.monotonic()
    own_client = client is None
    client = client or _client()
    try:
        status = image_status(tag, client=client)
        return EngineImage(engine_id(client), status.present, status.current, time.monotonic() - started)
    finally:
        if own_client:
            client.close()


def export_image(
    tag: str = DEFAULT_TAG, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, client: Any | None = None
) -> ExportedImage:
    """``tag`` as a ``docker save`` archive in memory (its tag kept, so a load restores it).

    Read as a stream and stopped as soon as it passes ``max_bytes``: the bytes are meant for Ray's
    object store, which an unexpectedly large image must not fill. Raises
    :class:`~rayflow.errors.PayloadTooLargeError` then, :class:`~rayflow.errors.ConfigError` when the
    engine lacks ``tag``.
    """
    import docker

    own_client = client is None
    client = client or _client()
    try:
        image = _find_image(client, tag)
        if image is None:
            raise ConfigError(f"image {tag} is not in this engine; nothing to export")
        data = bytearray()
        try:
            stream = image.save(named=tag)
            try:
                for chunk in stream:
                    data += chunk
                    if len(data) > max_bytes:
                        raise PayloadTooLargeError(
                            f"image {tag} is larger than the {max_bytes} bytes allowed to move between engines",
                            tag=tag,
                            max_bytes=max_bytes,
                            size_bytes_at_least=len(data),
                        )
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except docker.errors.APIError as exc:
            raise RayflowError(f"docker save of {tag} failed: {exc}", tag=tag) from exc
        return ExportedImage(tag, str(image.id), _labels(image).get(HASH_LABEL, ""), bytes(data))
    finally:
        if own_client:
            client.close()


def load_image(
    data: bytes,
    *,
    tag: str,
    image_hash: str,
    client: Any | None = None,
    source_dir: Path | None = None,
) -> ImageStatus:
    """Load a :func:`export_image` archive into this engine and check it is the image expected.

    The archive must bring ``tag`` with the hash label ``image_hash`` (the source's), and the image
    must then be current here (:func:`~rayflow.sandbox.image.image_status`, with this node's rayflow
    files); otherwise a :class:`~rayflow.errors.RayflowError` says what differs. An image the load
    replaced under ``tag`` is removed unless something still uses it, as a rebuild would.
    """
    import docker

    own_client = client is None
    client = client or _client()
    try:
        replaced = _find_image(client, tag)
        try:
            loaded = client.images.load(data)
        except (docker.errors.APIError, docker.errors.ImageLoadError) as exc:
            raise RayflowError(f"docker load of {tag} failed: {exc}", tag=tag) from exc
        image = next((candidate for candidate in loaded if tag in (candidate.tags or [])), None)
        if image is None:
            brought = sorted(t for candidate in loaded for t in candidate.tags or []) or [
                c.id for c in loaded
            ]
            raise RayflowError(f"the archive loaded {brought}, not {tag}", tag=tag)
        found = _labels(image).get(HASH_LABEL, "")
        if found != image_hash:
            raise RayflowError(
                f"the loaded {tag} carries {HASH_LABEL}={found or '(none)'}, the source's is {image_hash or '(none)'}",
                tag=tag,
            )
        _drop_replaced(client, replaced.id if replaced is not None else None, image.id)
        status = image_status(tag, client=client, source_dir=source_dir)
        if not status.current:
            raise RayflowError(
                f"the loaded {tag} is not current here: it carries {HASH_LABEL}={found}, this node's rayflow "
                f"expects {status.expected_hash} (do the nodes run different rayflow files?)",
                tag=tag,
            )
        return status
    finally:
        if own_client:
            client.close()
