"""The generated demo codebase: deterministic, every module really broken, exactly one repair fixes it.

Whether a module fails and whether a repair fixes it is decided by running its real unittest file
in a subprocess (python's own interpreter, no bytecode cache), as the fixing agent does.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from rayflow.errors import InvalidInputError
from rayflow.guest.agents.repairs import STRATEGIES, build_scope, candidates
from rayflow.guest.agents.signature import parse_unittest_output, signature_of
from rayflow.jobs.demo_codebase import (
    DEFECTS,
    FAMILIES,
    HELPERS,
    decompose_codebase,
    generate_codebase,
    write_module,
    write_package,
)


def run_tests(root: Path, test: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-B", "-m", "unittest", test],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def files_of(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.py"))}


def test_the_same_seed_writes_the_same_files(tmp_path):
    first = generate_codebase(tmp_path / "a", 20, seed=5)
    second = generate_codebase(tmp_path / "b", 20, seed=5)
    assert first == second
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


def test_another_seed_writes_another_codebase(tmp_path):
    generate_codebase(tmp_path / "a", 20, seed=5)
    generate_codebase(tmp_path / "b", 20, seed=6)
    assert files_of(tmp_path / "a") != files_of(tmp_path / "b")


def test_every_family_appears_once_modules_outnumber_families(tmp_path):
    modules = generate_codebase(tmp_path, len(FAMILIES), seed=1)
    assert sorted(m.family for m in modules) == sorted(FAMILIES)


def test_each_family_is_fixed_by_one_strategy_and_families_are_many():
    strategy_of = {}
    for defect in DEFECTS:
        assert strategy_of.setdefault(defect.family, defect.strategy) == defect.strategy
    assert 10 <= len(FAMILIES) <= 14
    assert set(strategy_of.values()) <= set(STRATEGIES)


def test_decomposition_gives_one_task_per_generated_module(tmp_path):
    modules = generate_codebase(tmp_path, 12, seed=2)
    assert decompose_codebase(tmp_path) == [m.task() for m in modules]


def test_a_codebase_needs_a_module(tmp_path):
    with pytest.raises(InvalidInputError):
        generate_codebase(tmp_path, 0)


def test_every_generated_module_fails_its_tests_and_only_there(tmp_path):
    modules = generate_codebase(tmp_path, 16, seed=3)
    for module in modules:
        result = run_tests(tmp_path, module.test)
        failures = parse_unittest_output(result.stderr)
        assert result.returncode != 0, module
        assert failures, module
        assert {f.test_class for f in failures} == {"Test" + module.function.title().replace("_", "")}, module


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: f"{d.family}-{d.snippet.function}")
def test_only_the_recorded_strategy_fixes_the_defect(tmp_path, defect):
    write_package(tmp_path)
    helpers = [h for h in HELPERS if h.function in ("truncate", "chunked")]
    info = write_module(tmp_path, "mod_000", defect, [helpers[0], defect.snippet, helpers[1]])
    module_file = tmp_path / info.module
    original = module_file.read_text()
    first = run_tests(tmp_path, info.test)
    assert first.returncode != 0
    scope = build_scope(
        original, (tmp_path / info.test).read_text(), parse_unittest_output(first.stderr), info.module
    )
    fixed_by = set()
    for strategy in STRATEGIES.values():
        for candidate in candidates(strategy, scope):
            module_file.write_text(candidate.apply(original))
            if run_tests(tmp_path, info.test).returncode == 0:
                fixed_by.add(strategy.name)
        module_file.write_text(original)
    assert fixed_by == {defect.strategy}


def test_similar_looking_failures_differ_only_in_the_failing_test(tmp_path):
    """Several families fail with the same message shape, so the test name is what tells them apart."""
    write_package(tmp_path)
    by_function = {d.snippet.function: d for d in DEFECTS}
    signatures = {}
    for index, name in enumerate(("top_scores", "inclusive_range", "page")):
        info = write_module(tmp_path, f"mod_{index:03d}", by_function[name], [by_function[name].snippet])
        failure = parse_unittest_output(run_tests(tmp_path, info.test).stderr)[0]
        signatures[name] = signature_of(failure)
    patterns = {s.exception + s.pattern for s in signatures.values()}
    assert patterns == {"AssertionErrorLists differ: [<num>...] != [<num>...]"}
    assert len({s.digest for s in signatures.values()}) == 3
