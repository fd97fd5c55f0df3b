"""Generic repair strategies: source transformations that fix common kinds of Python defect.

Each strategy knows one kind of mistake (an exclusive range end, a flipped comparison, a missing
``strip()``...) and proposes *candidates*: one concrete edit of the module's source per place
the pattern occurs. A strategy knows nothing about a particular module; it applies wherever its
pattern is found. Why one candidate per site: a comparison flipped everywhere at once would break
the correct ones too, so the agent tries sites one at a time, nearest to the failure first.

Sites are looked for only in the *target functions*: those the failing tests call and those the
traceback passes through. Edits replace exact source segments (positions from :mod:`ast`), so
everything else in the file keeps its formatting.

Standard library only: this runs inside a sandbox.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from rayflow.guest.agents.signature import TestFailure


@dataclass(frozen=True)
class Edit:
    """Replace characters ``start:end`` of a source with ``text`` (``start == end`` inserts)."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Candidate:
    """One proposed repair: a strategy applied at one site."""

    strategy: str
    #: Source line of the site (for ordering and reports).
    line: int
    edits: tuple[Edit, ...]
    #: What the edit does, e.g. ``range stop 'n' -> 'n + 1'``.
    description: str

    def apply(self, source: str) -> str:
        """``source`` with this candidate's edits made (edits never overlap)."""
        result = source
        for edit in sorted(self.edits, key=lambda e: (e.start, e.end), reverse=True):
            result = result[: edit.start] + edit.text + result[edit.end :]
        return result


class SourceMap:
    """Character offsets of AST positions (which count UTF-8 bytes within a line)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._lines = source.splitlines(keepends=True)
        self._starts = [0]
        for line in self._lines:
            self._starts.append(self._starts[-1] + len(line))

    def offset(self, lineno: int, col_bytes: int) -> int:
        line = self._lines[lineno - 1] if lineno - 1 < len(self._lines) else ""
        return self._starts[lineno - 1] + len(line.encode()[:col_bytes].decode(errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        start = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return start, end

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end]

    def line_start(self, lineno: int) -> int:
        return self._starts[lineno - 1]

    def indent_of(self, lineno: int) -> str:
        line = self._lines[lineno - 1]
        return line[: len(line) - len(line.lstrip())]


@dataclass(frozen=True)
class RepairScope:
    """Where and with what knowledge strategies look for sites."""

    source: str
    tree: ast.Module
    #: The functions the failure implicates (all module functions when none is known).
    functions: tuple[ast.FunctionDef | ast.AsyncFunctionDef, ...]
    #: The first failure of the test run, when there is one.
    failure: TestFailure | None = None
    #: Identifier-like string constants of the module and its tests (candidate dict keys).
    known_strings: tuple[str, ...] = ()
    #: Module line nearest to the failure (deepest traceback frame in the module), if any.
    focus_line: int | None = None

    @property
    def map(self) -> SourceMap:
        return SourceMap(self.source)


@dataclass(frozen=True)
class Strategy:
    """A named generic repair."""

    name: str
    #: One line saying what the repair does; stored with memories.
    summary: str
    find: Callable[[RepairScope, SourceMap], Iterable[Candidate]]


# --- scope ------------------------------------------------------------------------------------
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def build_scope(
    source: str, test_source: str, failures: Sequence[TestFailure], module_path: str
) -> RepairScope:
    """The repair scope for a module, its test file and the failures of a test run."""
    tree = ast.parse(source)
    test_tree = ast.parse(test_source)
    functions = {
        node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    module_name = PurePath(module_path).as_posix()
    implicated: set[str] = set()
    focus_line = None
    for failure in failures:
        module_frames = [f for f in failure.frames if PurePath(f.path).as_posix().endswith(module_name)]
        implicated.update(f.function for f in module_frames)
        if module_frames and focus_line is None:
            focus_line = module_frames[-1].line
        implicated.update(_called_names(_test_method(test_tree, failure)))
    chosen = tuple(fn for name, fn in functions.items() if name in implicated) or tuple(functions.values())
    strings = {
        node.value
        for node in (*ast.walk(tree), *ast.walk(test_tree))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _IDENTIFIER.match(node.value)
    }
    return RepairScope(
        source=source,
        tree=tree,
        functions=chosen,
        failure=failures[0] if failures else None,
        known_strings=tuple(sorted(strings)),
        focus_line=focus_line,
    )


def _test_method(test_tree: ast.Module, failure: TestFailure) -> ast.AST | None:
    for node in test_tree.body:
        if isinstance(node, ast.ClassDef) and node.name == failure.test_class:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == failure.test_name:
                    return item
    return None


def _called_names(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            if isinstance(call.func, ast.Name):
                names.add(call.func.id)
            elif isinstance(call.func, ast.Attribute):
                names.add(call.func.attr)
    return names


def candidates(strategy: Strategy, scope: RepairScope) -> list[Candidate]:
    """Every site of ``strategy`` in ``scope``, nearest to the failure first (then by line)."""
    found = list(strategy.find(scope, scope.map))
    focus = scope.focus_line
    return sorted(found, key=lambda c: (abs(c.line - focus) if focus else 0, c.line))


# --- walking ----------------------------------------------------------------------------------
def _nodes(scope: RepairScope) -> Iterator[ast.AST]:
    """Nodes of the target functions, outside f-strings (whose inner positions are unreliable)."""
    for function in scope.functions:
        inside_fstrings = {
            id(inner)
            for node in ast.walk(function)
            if isinstance(node, ast.JoinedStr)
            for inner in ast.walk(node)
            if inner is not node
        }
        for node in ast.walk(function):
            if id(node) not in inside_fstrings:
                yield node


_SAFE_OPERANDS = (ast.Name, ast.Constant, ast.Call, ast.Attribute, ast.Subscript)
_ADDITIVE_OR_TIGHTER = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def _operand(text: str, node: ast.AST) -> str:
    """``text`` of ``node``, parenthesized unless it binds at least as tightly as ``+``."""
    if isinstance(node, _SAFE_OPERANDS):
        return text
    if isinstance(node, ast.BinOp) and isinstance(node.op, _ADDITIVE_OR_TIGHTER):
        return text
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return text
    return f"({text})"


def _replace(source_map: SourceMap, node: ast.AST, text: str) -> Edit:
    start, end = source_map.span(node)
    return Edit(start, end, text)


def _body_insertion(
    source_map: SourceMap, function: ast.FunctionDef | ast.AsyncFunctionDef
) -> tuple[int, str]:
    """Offset and indentation where statements go at the start of ``function``'s body."""
    body = function.body
    first = body[0]
    is_docstring = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    target = body[1] if is_docstring and len(body) > 1 else first
    if is_docstring and len(body) == 1:
        return source_map.line_start(first.end_lineno + 1), source_map.indent_of(first.lineno)  # type: ignore[operator]
    return source_map.line_start(target.lineno), source_map.indent_of(target.lineno)


def _positional_args(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    return [a for a in (*function.args.posonlyargs, *function.args.args) if a.arg not in ("self", "cls")]


def _defaults(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[ast.arg, ast.expr]]:
    """(parameter, default) pairs of ``function``."""
    positional = [*function.args.posonlyargs, *function.args.args]
    pairs = list(zip(positional[len(positional) - len(function.args.defaults) :], function.args.defaults))
    pairs += [(a, d) for a, d in zip(function.args.kwonlyargs, function.args.kw_defaults) if d is not None]
    return pairs


# --- strategies -------------------------------------------------------------------------------
def _widen_upper_bound(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        bound: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            if 1 <= len(node.args) <= 3:
                bound = node.args[0] if len(node.args) == 1 else node.args[1]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            bound = node.slice.upper
        if bound is not None:
            text = source_map.text(bound)
            new = f"{_operand(text, bound)} + 1"
            yield Candidate(
                "widen_upper_bound", bound.lineno, (_replace(source_map, bound, new),), f"{text!r} -> {new!r}"
            )


def _index_minus_one(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if not isinstance(node, ast.Subscript) or isinstance(node.slice, (ast.Slice, ast.Tuple)):
            continue
        index = node.slice
        if isinstance(index, ast.Constant) and not isinstance(index.value, int):
            continue
        text = source_map.text(index)
        new = f"{_operand(text, index)} - 1"
        yield Candidate(
            "index_minus_one", index.lineno, (_replace(source_map, index, new),), f"[{text}] -> [{new}]"
        )


def _compare_rewrites(
    name: str, swaps: dict[type[ast.cmpop], type[ast.cmpop]]
) -> Callable[[RepairScope, SourceMap], Iterator[Candidate]]:
    def find(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
        for node in _nodes(scope):
            if not isinstance(node, ast.Compare):
                continue
            for position, op in enumerate(node.ops):
                if type(op) not in swaps:
                    continue
                ops = list(node.ops)
                ops[position] = swaps[type(op)]()
                new = ast.unparse(ast.Compare(node.left, ops, node.comparators))
                old = source_map.text(node)
                yield Candidate(name, node.lineno, (_replace(source_map, node, new),), f"{old!r} -> {new!r}")

    return find


def _guard_none(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for function in scope.functions:
        offset, indent = _body_insertion(source_map, function)
        for arg in _positional_args(function):
            text = f"{indent}if {arg.arg} is None:\n{indent}    return None\n"
            yield Candidate(
                "guard_none",
                function.lineno,
                (Edit(offset, offset, text),),
                f"return None when {arg.arg} is None",
            )


def _strip_split_parts(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("split", "rsplit")
        ):
            old = source_map.text(node)
            new = f"[part.strip() for part in {old}]"
            yield Candidate(
                "strip_split_parts",
                node.lineno,
                (_replace(source_map, node, new),),
                f"strip the parts of {old}",
            )


def _lowercase_compare(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if not (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.Eq, ast.NotEq))
        ):
            continue
        sides = (node.left, node.comparators[0])
        if any(isinstance(s, ast.Constant) and not isinstance(s.value, str) for s in sides):
            continue
        left, right = (ast.Call(ast.Attribute(s, "lower", ast.Load()), [], []) for s in sides)
        new = ast.unparse(ast.Compare(left, node.ops, [right]))
        yield Candidate("lowercase_compare", node.lineno, (_replace(source_map, node, new),), f"-> {new!r}")


def _floor_division(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            gap_start, gap_end = source_map.span(node.left)[1], source_map.span(node.right)[0]
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Div):
            gap_start, gap_end = source_map.span(node.target)[1], source_map.span(node.value)[0]
        else:
            continue
        slash = source_map.source.find("/", gap_start, gap_end)
        if slash >= 0:
            yield Candidate("floor_division", node.lineno, (Edit(slash, slash + 1, "//"),), "'/' -> '//'")


def _reverse_sort(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if not isinstance(node, ast.Call):
            continue
        is_sort = (isinstance(node.func, ast.Name) and node.func.id == "sorted") or (
            isinstance(node.func, ast.Attribute) and node.func.attr == "sort"
        )
        if not is_sort:
            continue
        reverse = next((k for k in node.keywords if k.arg == "reverse"), None)
        if reverse is None:
            close = source_map.span(node)[1] - 1
            separator = ", " if node.args or node.keywords else ""
            edit = Edit(close, close, f"{separator}reverse=True")
            description = "add reverse=True"
        elif isinstance(reverse.value, ast.Constant) and isinstance(reverse.value.value, bool):
            new = str(not reverse.value.value)
            edit = _replace(source_map, reverse.value, new)
            description = f"reverse={new}"
        else:
            old = source_map.text(reverse.value)
            edit = _replace(source_map, reverse.value, f"not ({old})")
            description = f"reverse=not ({old})"
        yield Candidate("reverse_sort", node.lineno, (edit,), description)


def _missing_key(failure: TestFailure | None) -> str | None:
    if failure is None or failure.exception != "KeyError":
        return None
    try:
        key = ast.literal_eval(failure.message)
    except (ValueError, SyntaxError):
        return None
    return key if isinstance(key, str) else None


def _closest_key(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    missing = _missing_key(scope.failure)
    for node in _nodes(scope):
        key: ast.Constant | None = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            key = node.args[0]
        if key is None or not isinstance(key.value, str):
            continue
        if missing is not None and key.value != missing:
            continue
        others = [s for s in scope.known_strings if s != key.value]
        match = difflib.get_close_matches(key.value, others, n=1, cutoff=0.6)
        if match:
            old = source_map.text(key)
            quote = old[0] if old[:1] in ("'", '"') else '"'
            new = f"{quote}{match[0]}{quote}"
            yield Candidate(
                "closest_key", key.lineno, (_replace(source_map, key, new),), f"key {old} -> {new}"
            )


def _is_mutable_literal(node: ast.expr) -> bool:
    if isinstance(node, (ast.List, ast.Dict, ast.Set)):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("list", "dict", "set")
        and not node.args
    )


def _fresh_mutable_default(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for function in scope.functions:
        offset, indent = _body_insertion(source_map, function)
        for arg, default in _defaults(function):
            if not _is_mutable_literal(default):
                continue
            literal = source_map.text(default)
            fresh = f"{indent}if {arg.arg} is None:\n{indent}    {arg.arg} = {literal}\n"
            edits = (_replace(source_map, default, "None"), Edit(offset, offset, fresh))
            yield Candidate(
                "fresh_mutable_default",
                function.lineno,
                edits,
                f"{arg.arg}={literal} -> a new {literal} per call",
            )


def _zero_pad_format(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for function in scope.functions:
        for node in ast.walk(function):
            if not isinstance(node, ast.JoinedStr):
                continue
            values = []
            changed = False
            for part in node.values:
                if (
                    isinstance(part, ast.FormattedValue)
                    and part.format_spec is None
                    and part.conversion == -1
                ):
                    part = ast.FormattedValue(part.value, -1, ast.JoinedStr([ast.Constant("02d")]))
                    changed = True
                values.append(part)
            if changed:
                new = ast.unparse(ast.JoinedStr(values))
                yield Candidate(
                    "zero_pad_format", node.lineno, (_replace(source_map, node, new),), f"-> {new}"
                )


def _raise_value_error(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for node in _nodes(scope):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        name = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(name, ast.Name) and name.id != "ValueError":
            yield Candidate(
                "raise_value_error",
                node.lineno,
                (_replace(source_map, name, "ValueError"),),
                f"raise {name.id} -> ValueError",
            )


def _flip_bool_default(scope: RepairScope, source_map: SourceMap) -> Iterator[Candidate]:
    for function in scope.functions:
        for arg, default in _defaults(function):
            if isinstance(default, ast.Constant) and isinstance(default.value, bool):
                new = str(not default.value)
                yield Candidate(
                    "flip_bool_default",
                    function.lineno,
                    (_replace(source_map, default, new),),
                    f"{arg.arg}={new}",
                )


_FLIPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.Gt,
    ast.Gt: ast.Lt,
    ast.LtE: ast.GtE,
    ast.GtE: ast.LtE,
}
_INCLUSIVE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
}

#: Every strategy, in the agent's default order (most common kinds of defect first).
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "widen_upper_bound",
            "add 1 to a range stop or slice end (exclusive bound one short)",
            _widen_upper_bound,
        ),
        Strategy(
            "index_minus_one",
            "subtract 1 from an index (1-based or length used as a 0-based index)",
            _index_minus_one,
        ),
        Strategy(
            "flip_comparison",
            "reverse a comparison (< and >, <= and >=)",
            _compare_rewrites("flip_comparison", _FLIPS),
        ),
        Strategy(
            "toggle_inclusive",
            "make a bound inclusive or exclusive (< and <=, > and >=)",
            _compare_rewrites("toggle_inclusive", _INCLUSIVE),
        ),
        Strategy("guard_none", "return None early when an argument is None", _guard_none),
        Strategy("strip_split_parts", "strip whitespace from the parts of a split", _strip_split_parts),
        Strategy("lowercase_compare", "compare strings case-insensitively", _lowercase_compare),
        Strategy("floor_division", "use integer division // instead of /", _floor_division),
        Strategy("reverse_sort", "reverse the order of a sort", _reverse_sort),
        Strategy("flip_bool_default", "negate a boolean default argument", _flip_bool_default),
        Strategy(
            "fresh_mutable_default",
            "give a mutable default argument a fresh value per call",
            _fresh_mutable_default,
        ),
        Strategy("closest_key", "use the nearest known key instead of a missing dict key", _closest_key),
        Strategy(
            "raise_value_error",
            "raise ValueError for bad input instead of another exception",
            _raise_value_error,
        ),
        Strategy("zero_pad_format", "zero-pad the numbers of an f-string to two digits", _zero_pad_format),
    )
}
DEFAULT_ORDER: tuple[str, ...] = tuple(STRATEGIES)
