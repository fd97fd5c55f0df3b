"""Text embedders for the ReasoningBank: the protocol, the default feature-hashing embedder, and lookup by name.

Why a hashing embedder is the default: the ReasoningBank must work offline, in a sandbox, with no
model download and no heavy dependency, and it must give the same vector for the same text on
every machine forever (vectors are stored, and an index built on one host is queried on another).
Feature hashing of words, word bigrams and character n-grams gives exactly that, and it is
lexically meaningful: texts that share words and word pieces land close together. A real sentence
model (:class:`rayflow.memory.minilm.MiniLMEmbedder`) can be chosen instead when it is installed.

Every embedder has a stable ``name`` that is stored next to the vectors, so a database opened
later rebuilds the same embedder with :func:`embedder_from_name` instead of silently mixing two
vector spaces.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np

from rayflow.errors import ConfigError

__all__ = [
    "DEFAULT_DIM",
    "Embedder",
    "HashingEmbedder",
    "default_embedder",
    "embed_one",
    "embedder_from_name",
]

DEFAULT_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed dimension.

    ``name`` identifies the vector space (model and dimension) and is persisted with the vectors;
    two embedders with the same name must give the same vector for the same text.

    ``embed`` returns an array of shape ``(len(texts), dim)`` and dtype float32 whose rows have
    L2 norm 1. A row is all zeros only when its text has no features at all (empty, whitespace,
    or punctuation only for the hashing embedder); cosine similarity with such a row is 0.
    """

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into a ``(len(texts), dim)`` float32 array of unit (or zero) rows."""
        ...


def embed_one(embedder: Embedder, text: str) -> np.ndarray:
    """Embed a single text and return its 1-d float32 vector of length ``embedder.dim``."""
    return embedder.embed([text])[0]


# --- feature hashing -------------------------------------------------------------------------

_HASHING_NAME_PREFIX = "hashing-ngram-v1-"

# Relative weights of the feature families. The whole word carries the most meaning; the parts of
# a code identifier and word bigrams add precision; the character n-grams of a word (its block is
# scaled to this total L2 norm, so long words do not drown short ones) catch inflections and typos.
_WORD_WEIGHT = 1.0
_STOPWORD_WEIGHT = 0.25
_PART_WEIGHT = 0.8
_BIGRAM_WEIGHT = 0.6
_CHAR_BLOCK_WEIGHT = 1.0

_CHAR_NGRAM_SIZES = (3, 4, 5)
# Tokens longer than this are usually hashes, base64 or minified blobs: their character n-grams
# would only add noise (and cost), so such tokens contribute their whole-word feature alone.
_MAX_CHAR_NGRAM_TOKEN_LEN = 40

# Very common English function words: they still count (with a low weight) so that a text made
# of them is not empty, but they add no character n-grams and cannot make unrelated texts similar.
_STOPWORDS = frozenset(
    {
        "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "if",
        "in", "into", "is", "it", "its", "of", "on", "or", "so", "than", "that", "the", "then",
        "there", "these", "this", "those", "to", "was", "were", "will", "with",
    }
)  # fmt: skip

_TOKEN_RE = re.compile(r"\w+")
# Splits an ASCII identifier piece at its camelCase humps: "HTTPServerError" -> HTTP, Server, Error;
# "getUTF8String" -> get, UTF8, String. Digits stay with their letters ("utf8", "x86"), so hex ids
# and version tags are not shredded into single characters. Non-ASCII words are split on
# underscores only, since their case rules differ.
_CAMEL_PART_RE = re.compile(r"[A-Z0-9]+(?=[A-Z][a-z])|[A-Z]?[a-z0-9]+|[A-Z0-9]+")

_TOKEN_CACHE_SIZE = 1 << 16
_FEATURE_CACHE_SIZE = 1 << 17
_BIGRAM_CACHE_SIZE = 1 << 17


def _digest_feature(feature: str, dim: int) -> tuple[int, float]:
    """Map a feature string to ``(bucket, sign)`` deterministically on every machine.

    blake2b (not Python's salted ``hash()``) keeps vectors identical across processes. The low bits
    pick the bucket and the top bit picks the sign, so collisions cancel out on average instead of
    piling up positive mass in popular buckets.
    """
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, (1.0 if value >> 63 else -1.0)


#: Words and character n-grams recur across many different tokens, and a cache hit is several
#: times cheaper than the digest. Bigrams bypass this cache (they have their own) so their long
#: tail does not evict the n-grams.
_hash_feature = lru_cache(maxsize=_FEATURE_CACHE_SIZE)(_digest_feature)


def _identifier_parts(token: str) -> list[str]:
    """The lower-cased sub-words of a code identifier (snake_case and camelCase), or [] for a plain word."""
    pieces = [piece for piece in token.split("_") if piece]
    parts: list[str] = []
    for piece in pieces:
        if piece.isascii():
            parts.extend(_CAMEL_PART_RE.findall(piece))
        else:
            parts.append(piece)
    lowered = [part.lower() for part in parts]
    if len(lowered) <= 1:
        return []
    return lowered


def _char_ngrams(word: str) -> list[str]:
    """Character 3..5-grams of ``word`` with boundary markers, so prefixes and suffixes are distinct."""
    marked = f"<{word}>"
    return [marked[i : i + size] for size in _CHAR_NGRAM_SIZES for i in range(len(marked) - size + 1)]


class _TokenFeatures:
    """The hashed features one raw token contributes, precomputed once and reused for every text."""

    __slots__ = ("buckets", "lower", "values")

    def __init__(self, lower: str, buckets: np.ndarray, values: np.ndarray) -> None:
        self.lower = lower
        self.buckets = buckets
        self.values = values


@lru_cache(maxsize=_TOKEN_CACHE_SIZE)
def _token_features(token: str, dim: int) -> _TokenFeatures:
    """Whole word, identifier parts and character n-grams of one raw (case-preserved) token."""
    lower = token.lower()
    if lower in _STOPWORDS:
        features = [("w:" + lower, _STOPWORD_WEIGHT)]
    else:
        features = [("w:" + lower, _WORD_WEIGHT)]
        parts = _identifier_parts(token)
        if parts:
            part_weight = _PART_WEIGHT / math.sqrt(len(parts))
            features.extend(("w:" + part, part_weight) for part in parts)
        grams = [
            gram
            for word in (parts or [lower])
            if len(word) <= _MAX_CHAR_NGRAM_TOKEN_LEN
            for gram in _char_ngrams(word)
        ]
        if grams:
            gram_weight = _CHAR_BLOCK_WEIGHT / math.sqrt(len(grams))
            features.extend(("c:" + gram, gram_weight) for gram in grams)
    weighted: dict[int, float] = {}
    for feature, weight in features:
        bucket, sign = _hash_feature(feature, dim)
        weighted[bucket] = weighted.get(bucket, 0.0) + sign * weight
    buckets = np.fromiter(weighted.keys(), dtype=np.int32, count=len(weighted))
    values = np.fromiter(weighted.values(), dtype=np.float32, count=len(weighted))
    return _TokenFeatures(lower, buckets, values)


@lru_cache(maxsize=_BIGRAM_CACHE_SIZE)
def _bigram_feature(first: str, second: str, dim: int) -> tuple[int, float]:
    """Bucket and signed weight of the word bigram ``first second`` (both lower-cased)."""
    bucket, sign = _digest_feature(f"b:{first} {second}", dim)
    return bucket, sign * _BIGRAM_WEIGHT


_SMALL_TF_WEIGHTS = tuple(1.0 + math.log(count) if count > 0 else 0.0 for count in range(64))


def _sublinear_tf(count: int) -> float:
    """1 + log(tf): a word said five times matters more than once, but not five times more."""
    return _SMALL_TF_WEIGHTS[count] if count < 64 else 1.0 + math.log(count)


class HashingEmbedder:
    """Deterministic, dependency-free embedder by signed feature hashing (the default).

    Features, on NFKC-normalised text lower-cased per token:

    * each word (``\\w+`` run), with common function words down-weighted;
    * the snake_case / camelCase parts of code identifiers, in addition to the whole identifier;
    * word bigrams;
    * character 3..5-grams inside each word (or each identifier part), with boundary markers.

    Each distinct word and bigram is weighted by sublinear term frequency, hashed with blake2b into
    ``dim`` signed buckets, and the row is L2-normalised. Per-token feature lists are cached, so
    embedding many texts over a shared vocabulary costs little more than tokenising them.
    """

    #: Texts are hashed in chunks of this many rows so the dense scratch matrix stays small.
    chunk_rows = 2048

    def __init__(self, dim: int = DEFAULT_DIM) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
            raise ConfigError(f"embedding dimension must be an integer >= 2, got {dim!r}", dim=dim)
        self.dim = dim
        self.name = f"{_HASHING_NAME_PREFIX}{dim}"

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into unit rows; a text with no word characters gives an all-zero row."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single str; use embed_one()")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.chunk_rows):
            chunk = texts[start : start + self.chunk_rows]
            out[start : start + len(chunk)] = self._embed_chunk(chunk)
        return out

    def _embed_chunk(self, texts: Sequence[str]) -> np.ndarray:
        """Gather every text's cached feature arrays, then sum them into a matrix with one bincount."""
        dim = self.dim
        token_features = _token_features
        bigram_feature = _bigram_feature
        tf_weight = _sublinear_tf
        find_tokens = _TOKEN_RE.findall
        bucket_arrays: list[np.ndarray] = []
        value_arrays: list[np.ndarray] = []
        token_weights: list[float] = []
        tokens_per_row: list[int] = []
        bigram_buckets: list[int] = []
        bigram_values: list[float] = []
        bigrams_per_row: list[int] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__} at position {row}")
            if not text.isascii():
                # ASCII is already NFKC-stable; only other text pays for normalisation.
                text = unicodedata.normalize("NFKC", text)
            tokens = find_tokens(text)
            token_counts = Counter(tokens)
            lower_of: dict[str, str] = {}
            for token, count in token_counts.items():
                features = token_features(token, dim)
                lower_of[token] = features.lower
                bucket_arrays.append(features.buckets)
                value_arrays.append(features.values)
                token_weights.append(tf_weight(count))
            tokens_per_row.append(len(token_counts))
            lowers = [lower_of[token] for token in tokens]
            bigram_counts = Counter(pairwise(lowers))
            for (first, second), count in bigram_counts.items():
                bucket, value = bigram_feature(first, second, dim)
                bigram_buckets.append(bucket)
                bigram_values.append(value * tf_weight(count))
            bigrams_per_row.append(len(bigram_counts))

        size = len(texts) * dim
        row_offsets = np.arange(len(texts), dtype=np.int64) * dim
        dense = np.zeros(size, dtype=np.float64)
        if bucket_arrays:
            lengths = np.fromiter(map(len, bucket_arrays), dtype=np.int64, count=len(bucket_arrays))
            token_offsets = np.repeat(row_offsets, tokens_per_row)
            flat = np.concatenate(bucket_arrays) + np.repeat(token_offsets, lengths)
            values = np.concatenate(value_arrays) * np.repeat(np.asarray(token_weights), lengths)
            dense += np.bincount(flat, weights=values, minlength=size)
        if bigram_buckets:
            flat = np.asarray(bigram_buckets, dtype=np.int64) + np.repeat(row_offsets, bigrams_per_row)
            dense += np.bincount(flat, weights=bigram_values, minlength=size)
        matrix = dense.reshape(len(texts), dim)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        np.divide(matrix, norms, out=matrix, where=norms > 0)
        return matrix.astype(np.float32)


# --- choosing an embedder --------------------------------------------------------------------


def default_embedder(dim: int = DEFAULT_DIM) -> Embedder:
    """The embedder used when none is configured: :class:`HashingEmbedder` of ``dim``."""
    return HashingEmbedder(dim)


def embedder_from_name(name: str) -> Embedder:
    """Rebuild the embedder whose ``name`` was stored with a database's vectors.

    Raises :class:`~rayflow.errors.ConfigError` for a name this version does not know, or when the
    named model is not installed, so a store never mixes vectors from two different spaces.
    """
    if name.startswith(_HASHING_NAME_PREFIX):
        suffix = name[len(_HASHING_NAME_PREFIX) :]
        if suffix.isdigit() and not suffix.startswith("0"):
            return HashingEmbedder(int(suffix))
        raise ConfigError(f"malformed hashing embedder name {name!r}", name=name)

    from rayflow.memory.minilm import MINILM_NAME, MiniLMEmbedder

    if name == MINILM_NAME:
        return MiniLMEmbedder()
    raise ConfigError(
        f"unknown embedder {name!r}; known: '{_HASHING_NAME_PREFIX}<dim>', '{MINILM_NAME}'", name=name
    )
