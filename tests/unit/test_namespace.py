import pytest

from rayflow.errors import InvalidNamespaceError
from rayflow.namespace import ROOT, namespace_within, normalize_namespace


def test_canonical_form_trims_slashes_and_folds_case():
    assert normalize_namespace("/Swarm/Task-123/") == "swarm/task-123"


@pytest.mark.parametrize(
    "bad",
    ["", "/", "a//b", "a/../b", "..", "./a", "a/.hidden", "acme\u2215startup", "ac\u0430me", "a b", "a/b\x00",
     "x" * 300, "/".join(["a"] * 17)],
)
def test_path_tricks_are_rejected(bad):
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace(bad)


def test_root_is_only_allowed_when_asked_for():
    assert normalize_namespace("", allow_root=True) == ROOT
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace("")


def test_non_string_is_rejected():
    with pytest.raises(InvalidNamespaceError):
        normalize_namespace(["a"])  # type: ignore[arg-type]


def test_prefix_matching_is_by_whole_segments():
    assert namespace_within("swarm/a", "swarm")
    assert namespace_within("swarm", "swarm")
    assert not namespace_within("swarmx/a", "swarm")
    assert namespace_within("anything/at/all", ROOT)
