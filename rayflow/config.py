"""The one typed configuration object: arguments, then ``RAYFLOW_*`` environment, then defaults.

Defaults work on a laptop with nothing else installed. Every field of a section can be set from
the environment as ``RAYFLOW_<SECTION>_<FIELD>`` (for example ``RAYFLOW_MEMORY_MMR_LAMBDA=0.5``),
or for top-level fields ``RAYFLOW_<FIELD>`` (``RAYFLOW_STATE_DIR``). Wrong values raise
:class:`~rayflow.errors.ConfigError` naming the variable, instead of surfacing later as an odd
failure deep inside a component.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayflow.errors import ConfigError

ENV_PREFIX = "RAYFLOW_"
#: Default bound on a job's upload (its repository) packed as one archive: 512 MiB.
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class MemoryConfig:
    """How the ReasoningBank stores, indexes and ranks memory."""

    #: Embedding model name (see ``rayflow.memory.embedding.embedder_from_name``).
    embedder: str = "hashing-ngram-v1-384"
    #: "full" fsyncs every commit (survives power loss); "normal" survives a process kill only.
    durability: str = "full"
    #: Upper bound on one text field, in UTF-8 bytes; larger input is refused, never truncated.
    max_text_bytes: int = 64 * 1024
    #: Score weights: similarity, recency, reliability.
    weight_similarity: float = 0.65
    weight_recency: float = 0.15
    weight_reliability: float = 0.20
    #: Half-life of the recency bonus, in days.
    recency_half_life_days: float = 30.0
    #: MMR trade-off: 1.0 ranks by score alone, 0.0 by diversity alone.
    mmr_lambda: float = 0.7
    #: Candidates fetched from the index per result before re-ranking.
    oversample: int = 3
    #: Weight of the stored confidence as a Beta prior, in pseudo-observations.
    prior_strength: float = 2.0
    #: HNSW parameters.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    #: 192 is where recall@10 reaches 0.95 at 100k items of hashed n-gram vectors (benchmarks/memory.py).
    hnsw_ef_search: int = 192
    #: Consolidation: cosine at or above which two same-outcome items are duplicates.
    duplicate_threshold: float = 0.92
    #: Cosine at or above which opposite-outcome items are linked as contradicting.
    contradiction_threshold: float = 0.80
    #: Items with reliability below this and idle for ``stale_after_days`` are pruned.
    prune_below_reliability: float = 0.25
    stale_after_days: float = 30.0
    #: Save the HNSW files after this many index changes (SQLite stays the source of truth).
    index_save_every: int = 2000

    def __post_init__(self) -> None:
        if self.durability not in ("full", "normal"):
            raise ConfigError(f"memory.durability must be 'full' or 'normal', not {self.durability!r}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ConfigError(f"memory.mmr_lambda must be within [0, 1], not {self.mmr_lambda}")
        for name in ("weight_similarity", "weight_recency", "weight_reliability"):
            if getattr(self, name) < 0:
                raise ConfigError(f"memory.{name} must not be negative")
        for name in ("max_text_bytes", "oversample", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"memory.{name} must be positive")
        if self.recency_half_life_days <= 0 or self.prior_strength <= 0:
            raise ConfigError("memory.recency_half_life_days and memory.prior_strength must be positive")


@dataclass(frozen=True)
class Config:
    """Everything rayflow reads from its surroundings."""

    #: Where databases, index files and secrets live (created 0700).
    state_dir: Path = field(default_factory=lambda: Path.home() / ".rayflow")
    #: This process's replica id in change records; generated and persisted when empty.
    replica_id: str = ""
    #: Largest packed upload (a job's repository) a swarm sends to its workers, in bytes.
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if self.max_upload_bytes <= 0:
            raise ConfigError("max_upload_bytes must be positive")


def load_config(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config` from ``overrides`` (dotted keys such as ``"memory.mmr_lambda"``),
    then ``env`` (default: ``os.environ``), then defaults."""
    env = os.environ if env is None else env
    overrides = dict(overrides or {})
    top: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for f in dataclasses.fields(MemoryConfig):
        key = f"memory.{f.name}"
        var = f"{ENV_PREFIX}MEMORY_{f.name.upper()}"
        if key in overrides:
            memory[f.name] = _coerce(overrides.pop(key), f.type, key)
        elif var in env:
            memory[f.name] = _coerce(env[var], f.type, var)
    for f in dataclasses.fields(Config):
        if f.name == "memory":
            continue
        var = f"{ENV_PREFIX}{f.name.upper()}"
        if f.name in overrides:
            top[f.name] = _coerce(overrides.pop(f.name), f.type, f.name)
        elif var in env:
            top[f.name] = _coerce(env[var], f.type, var)
    if overrides:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(overrides))}")
    return Config(memory=MemoryConfig(**memory), **top)


def _coerce(value: Any, annotation: Any, source: str) -> Any:
    kind = _resolve(annotation)
    try:
        if kind is Path:
            return Path(value).expanduser()
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot read {value!r} as {kind.__name__}") from exc
    raise ConfigError(f"{source}: unsupported setting type {annotation!r}")


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):
        names = {"Path": Path, "int": int, "float": float, "str": str, "bool": bool}
        if annotation in names:
            return names[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _resolve(args[0])
    return annotation
