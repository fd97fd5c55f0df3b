"""Error signatures: what a failing unittest run says, reduced to a key that recurs across modules.

Why a signature and not the raw output: the same kind of defect fails with different values in
every module (``[1, 2] != [1, 2, 3]`` here, ``[4] != [4, 5]`` there), and a memory keyed by raw
text would never match twice. The signature keeps what identifies the kind of failure (the
exception type, the shape of its message, which test failed) and abstracts what varies (string
and number literals, element counts). Its text is the memory search query; its digest is an exact
key stored as a tag.

Standard library only: this runs inside a sandbox.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: Python type names kept verbatim in messages: they say what kind of value went wrong.
TYPE_NAMES = frozenset(
    {"NoneType", "int", "float", "str", "bytes", "list", "dict", "tuple", "set", "bool", "object"}
)
#: Longest normalized message kept in a signature; the start of a message carries its shape.
MAX_PATTERN_CHARS = 160

_HEADER = re.compile(r"^(FAIL|ERROR): (\S+) \(([^)]*)\)\s*$")
_FRAME = re.compile(r'^  File "([^"]+)", line (\d+), in (\S+)')
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"(?<![\w<])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w>])")
_PAIR_REPEATS = re.compile(r"(<(?:str|num)>: <(?:str|num)>)(?:, \1)+")
_REPEATS = re.compile(r"(<(?:str|num)>)(?:, \1)+")


@dataclass(frozen=True)
class Frame:
    """One traceback frame: file, line and function."""

    path: str
    line: int
    function: str


@dataclass(frozen=True)
class TestFailure:
    """One failed or errored test of a unittest run."""

    #: ``test_x`` (the method name).
    test_name: str
    #: ``tests.test_mod_001.TestX.test_x`` (dotted id as unittest prints it).
    test_id: str
    #: ``"FAIL"`` (an assertion failed) or ``"ERROR"`` (an exception escaped).
    kind: str
    #: Exception class name, e.g. ``AssertionError``.
    exception: str
    #: First line of the exception message.
    message: str
    frames: tuple[Frame, ...]

    @property
    def test_class(self) -> str:
        """The test case class name, when the id names one."""
        parts = self.test_id.split(".")
        return parts[-2] if len(parts) >= 2 and parts[-1] == self.test_name else parts[-1]


@dataclass(frozen=True)
class ErrorSignature:
    """The recurring key of a failure: exception, message shape and the failing test."""

    exception: str
    pattern: str
    test_name: str

    @property
    def text(self) -> str:
        """The searchable form, e.g. ``AssertionError: <str> != <str> in test_pads_month``."""
        return f"{self.exception}: {self.pattern} in {self.test_name}"

    @property
    def digest(self) -> str:
        """A short stable hash of :attr:`text`, used as an exact-match tag."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def parse_unittest_output(output: str) -> list[TestFailure]:
    """The failures a ``python -m unittest`` run printed, in the order it printed them."""
    lines = output.splitlines()
    failures: list[TestFailure] = []
    index = 0
    while index < len(lines):
        header = _HEADER.match(lines[index])
        index += 1
        if header is None:
            continue
        kind, name, detail = header.groups()
        test_id = detail if detail.endswith(name) else f"{detail}.{name}"
        frames: list[Frame] = []
        exception, message = "", ""
        while index < len(lines) and not lines[index].startswith("Traceback"):
            if _HEADER.match(lines[index]):
                break
            index += 1
        in_traceback = index < len(lines) and lines[index].startswith("Traceback")
        index += 1 if in_traceback else 0
        while in_traceback and index < len(lines):
            line = lines[index]
            frame = _FRAME.match(line)
            if frame:
                frames.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
            elif line and not line.startswith(" "):
                exception, _, message = line.partition(":")
                message = message.strip()
                break
            index += 1
        failures.append(TestFailure(name, test_id, kind, exception.strip(), message, tuple(frames)))
    return failures


def normalize_message(message: str) -> str:
    """``message`` with literals abstracted: quoted text becomes ``<str>`` (type names stay),
    numbers ``<num>``, and runs of equal markers (or ``key: value`` pairs) collapse to one
    followed by ``...``."""

    def quoted(match: re.Match[str]) -> str:
        inner = match.group(0)[1:-1]
        return match.group(0) if inner in TYPE_NAMES else "<str>"

    text = _QUOTED.sub(quoted, message.strip())
    text = _NUMBER.sub("<num>", text)
    text = _PAIR_REPEATS.sub(r"\1...", text)
    text = _REPEATS.sub(r"\1...", text)
    return text[:MAX_PATTERN_CHARS]


def signature_of(failure: TestFailure) -> ErrorSignature:
    """The signature of one test failure."""
    return ErrorSignature(
        failure.exception or "UnknownError", normalize_message(failure.message), failure.test_name
    )
