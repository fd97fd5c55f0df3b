"""Realistic-looking coding tasks, trajectories and lessons, generated deterministically from a seed.

The demo, the benchmarks and the tests need text that behaves like real agent memory: recurring
tools, error types and components in varied combinations, so that embeddings cluster the way real
ones do (random vectors would make nearest-neighbour recall meaningless). Same seed, same text,
on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rayflow.wire.memory_records import Step, Trajectory

COMPONENTS = (
    "config loader",
    "http client",
    "retry policy",
    "sqlite migration",
    "cli parser",
    "json serializer",
    "auth middleware",
    "rate limiter",
    "task scheduler",
    "cache layer",
    "csv importer",
    "websocket handler",
    "template renderer",
    "date parser",
    "payment webhook",
    "search indexer",
    "log formatter",
    "s3 uploader",
    "graphql resolver",
    "feature flag client",
    "password hasher",
    "email sender",
    "pdf exporter",
    "image resizer",
    "queue consumer",
    "metrics exporter",
    "plugin loader",
    "diff engine",
    "lock manager",
    "session store",
)
MODULES = (
    "app/config.py",
    "src/client/http.py",
    "core/retry.py",
    "db/migrations/0007_add_index.py",
    "cli/main.py",
    "serde/json_codec.py",
    "web/middleware/auth.py",
    "limits/token_bucket.py",
    "sched/worker.py",
    "cache/lru.py",
    "io/csv_import.py",
    "ws/handler.py",
    "render/templates.py",
    "util/dates.py",
    "billing/webhooks.py",
    "search/indexer.py",
    "logging/fmt.py",
    "storage/s3.py",
    "api/resolvers.py",
    "flags/client.py",
)
ERRORS = (
    (
        "ModuleNotFoundError",
        "No module named 'yaml'",
        "add the missing dependency to pyproject and reinstall",
    ),
    ("ImportError", "cannot import name 'Mapping' from 'collections'", "import Mapping from collections.abc"),
    ("KeyError", "'timeout'", "read optional settings with .get and a documented default"),
    ("TypeError", "unsupported operand type(s) for +: 'NoneType' and 'int'", "guard the None case first"),
    ("AssertionError", "assert 3 == 4", "fix the off-by-one in the loop bound"),
    ("TimeoutError", "operation timed out after 30s", "add a deadline and retry with backoff"),
    ("PermissionError", "[Errno 13] Permission denied: '/var/lib/app'", "write under a user-owned state dir"),
    ("ConnectionRefusedError", "[Errno 111] Connection refused", "wait for the service's health check"),
    (
        "UnicodeDecodeError",
        "'utf-8' codec can't decode byte 0xff",
        "open the file in binary or detect encoding",
    ),
    ("RecursionError", "maximum recursion depth exceeded", "replace recursion with an explicit stack"),
    ("ValueError", "invalid literal for int() with base 10: ''", "validate input before converting"),
    ("AttributeError", "'NoneType' object has no attribute 'read'", "check the open() result and path"),
    ("json.JSONDecodeError", "Expecting value: line 1 column 1 (char 0)", "handle empty bodies explicitly"),
    ("sqlite3.OperationalError", "database is locked", "use WAL mode and a busy timeout"),
    (
        "FileNotFoundError",
        "[Errno 2] No such file or directory: 'fixtures/data.csv'",
        "resolve paths from __file__",
    ),
)
TOOLS = ("pytest", "mypy", "ruff", "pip", "git", "docker", "tox", "coverage", "hypothesis", "alembic")
VERBS = ("fix", "add tests for", "refactor", "speed up", "add type hints to", "document", "harden", "port")
DOMAINS = ("backend", "data", "infra", "frontend", "security")
STRATEGIES = (
    "reproduce the failure with a minimal failing test before touching the code",
    "read the full traceback from the bottom and open the first frame inside the project",
    "bisect recent commits with git bisect run and the failing test",
    "pin the flaky dependency and record why in the lock file",
    "run mypy in strict mode on the changed module to find the wrong call",
    "use hypothesis to search for the input that breaks the parser",
    "add a regression test named for the bug, then make it pass",
    "check the environment variables and config precedence first",
    "replace the shared mutable default argument with None and build inside",
    "isolate the network call behind an interface and fake it in tests",
    "profile with py-spy before optimising and keep the benchmark",
    "split the function so each part can be tested alone",
)


@dataclass(frozen=True)
class LessonText:
    """Text of one memory item."""

    title: str
    description: str
    content: str
    domain: str
    tags: tuple[str, ...]
    success: bool


def lesson_texts(n: int, seed: int = 7) -> list[LessonText]:
    """``n`` varied lessons of the kind agents distil from coding tasks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        component = rng.choice(COMPONENTS)
        module = rng.choice(MODULES)
        exc, message, remedy = rng.choice(ERRORS)
        tool = rng.choice(TOOLS)
        verb = rng.choice(VERBS)
        strategy = rng.choice(STRATEGIES)
        success = rng.random() < 0.7
        if success:
            title = f"{verb.capitalize()} the {component}: {strategy.split(' ')[0]} first"
            description = f"When asked to {verb} the {component} in {module}, {strategy}."
            content = (
                f"Task {i}: {verb} the {component} ({module}). The run hit {exc}: {message}. "
                f"What worked: {strategy}; then {remedy}. Verified with {tool} "
                f"({rng.randint(3, 180)} passed)."
            )
        else:
            title = f"Avoid: {exc} in the {component} after a blind edit"
            description = f"A change to {module} failed with {exc}; {remedy} before retrying."
            content = (
                f"Task {i}: tried to {verb} the {component} in {module} without reproducing first. "
                f"{tool} failed: {exc}: {message}. Lesson: {remedy}, and {strategy}."
            )
        tags = tuple(sorted({tool, exc.split(".")[-1].lower(), component.split(" ")[0]}))
        out.append(LessonText(title, description, content, rng.choice(DOMAINS), tags, success))
    return out


def task_query(rng: random.Random) -> str:
    """A task description as a coordinator would hand it to an agent."""
    component = rng.choice(COMPONENTS)
    exc, message, _ = rng.choice(ERRORS)
    return f"{rng.choice(VERBS)} the {component}: tests fail with {exc}: {message}"


def trajectory(rng: random.Random, *, task_id: str, success: bool, namespace: str = "swarm") -> Trajectory:
    """A plausible agent trajectory for one task, ending in success or failure."""
    component = rng.choice(COMPONENTS)
    module = rng.choice(MODULES)
    exc, message, remedy = rng.choice(ERRORS)
    strategy = rng.choice(STRATEGIES)
    query = f"Fix the {component} in {module}: CI fails with {exc}"
    failing = (
        f"============================= test session starts ==============================\n"
        f"collected 24 items\n\ntests/test_{module.split('/')[-1]} ..F\n\n"
        f'Traceback (most recent call last):\n  File "{module}", line {rng.randint(10, 300)}, in load\n'
        f"{exc}: {message}\n=========================== 1 failed, 23 passed in 0.91s ==========="
    )
    steps = [
        Step(f"run pytest -x tests/ for the {component}", failing),
        Step(f"open {module} and read the failing frame", f"found the call that raises {exc}"),
    ]
    if success:
        passed = "============================== 24 passed in 0.87s =============================="
        steps += [
            Step(f"apply fix: {remedy}", f"edited {module}"),
            Step("run pytest -q", passed),
        ]
        return Trajectory(
            task_id=task_id,
            query=query,
            steps=tuple(steps),
            namespace=namespace,
            domain="backend",
            agent_id=f"agent-{rng.randint(1, 8)}",
            exit_code=0,
            tests_passed=24,
            tests_failed=0,
            final_output=f"Fixed: {remedy}. Strategy: {strategy}. {passed}",
        )
    steps += [
        Step("apply a guess without reproducing", f"edited {module}"),
        Step("run pytest -q", failing),
    ]
    return Trajectory(
        task_id=task_id,
        query=query,
        steps=tuple(steps),
        namespace=namespace,
        domain="backend",
        agent_id=f"agent-{rng.randint(1, 8)}",
        exit_code=1,
        tests_passed=23,
        tests_failed=1,
        final_output=failing,
    )
