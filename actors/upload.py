"""A job's packed upload in Ray's object store, fetched by the actors that unpack it.

The driver packs a job's repository once (:func:`rayflow.swarm.job.packed_job`) and
:func:`put_upload` puts the archive into the object store. What travels to the coordinator and
its workers is an :class:`~rayflow.swarm.upload.UploadSource` whose fetch is an
:class:`ObjectStoreArchive`: the ``ObjectRef`` inside it is not resolved when the job or plan is
passed to an actor (Ray resolves only top-level arguments), so only a worker that prepares a
sandbox fetches the bytes, from whichever node holds them, with ``ray.get`` in its own process.
"""

from __future__ import annotations

from typing import Any

import ray

from rayflow.config import DEFAULT_MAX_UPLOAD_BYTES
from rayflow.errors import TransportError
from rayflow.swarm.upload import FETCH, UploadSource

#: How long fetching an archive from the object store may take (hundreds of MiB across nodes).
FETCH_TIMEOUT_S = 600.0


class ObjectStoreArchive:
    """A fetch of a packed upload held in Ray's object store; it pickles with its ``ObjectRef``."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __call__(self) -> bytes:
        try:
            data = ray.get(self.ref, timeout=FETCH_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise TransportError(
                f"the job's upload could not be fetched from the object store: {exc}", ref=self.ref.hex()
            ) from exc
        if not isinstance(data, bytes):
            raise TransportError("the object store holds no packed upload here", ref=self.ref.hex())
        return data

    def __repr__(self) -> str:
        return f"ObjectStoreArchive({self.ref.hex()})"


def put_upload(data: bytes, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> UploadSource:
    """Put a packed upload into the object store (owned by the caller, freed once nobody holds
    the returned source); returns the source workers fetch it with."""
    return UploadSource.from_fetch(ObjectStoreArchive(ray.put(data)), size=len(data), max_bytes=max_bytes)


def in_object_store(source: UploadSource | None) -> bool:
    """Whether ``source`` already names an archive in the object store."""
    return source is not None and source.kind == FETCH and isinstance(source.fetch, ObjectStoreArchive)
