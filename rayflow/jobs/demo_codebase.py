"""A generated codebase of small Python modules, each with one real defect and real unittest tests.

The demo job and the learning benchmark need work whose outcome is checked by running code, not
by comparing text: a swarm fixes these modules inside sandboxes, and whether a fix worked is what
the tests say. Each module holds a few realistic helpers (parsing, arithmetic, strings,
collections, dates); exactly one of them carries a defect drawn from a family of common mistakes
(an exclusive bound one short, a flipped comparison, a missing ``strip()``...). Every family is
fixed by exactly one of the fixing agent's generic repair strategies
(:data:`rayflow.guest.agents.repairs.STRATEGIES`), and several families fail with the same-looking
output (``Lists differ``, ``<str> != <str>``, ``KeyError``), so trying the right strategy first is
worth learning.

Tests are plain ``unittest`` because a sandbox image has python3 and no pytest. The output is a
function of the seed only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from rayflow.errors import InvalidInputError

DEFAULT_PACKAGE = "app"
#: Healthy helpers placed next to the defective one in every module.
HELPERS_PER_MODULE = 2


@dataclass(frozen=True)
class Snippet:
    """A function and the body of its test case class."""

    function: str
    source: str
    tests: str


@dataclass(frozen=True)
class DefectTemplate:
    """A function with one injected defect, its tests, and the repair that fixes it."""

    family: str
    strategy: str
    snippet: Snippet


@dataclass(frozen=True)
class ModuleInfo:
    """One generated module; ``family`` and ``strategy`` are ground truth for tests and benchmarks."""

    #: ``mod_007``
    name: str
    #: Paths relative to the codebase root, as a sandbox sees them in its work directory.
    module: str
    test: str
    family: str
    strategy: str
    #: The defective function.
    function: str

    def task(self) -> dict[str, str]:
        """The subtask payload for this module (what the fixing agent is told)."""
        return {"module": self.module, "test": self.test}


def _snippet(function: str, source: str, tests: str) -> Snippet:
    return Snippet(function, source.strip("\n") + "\n", tests.strip("\n") + "\n")


# --- defective functions, by family -----------------------------------------------------------
DEFECTS: tuple[DefectTemplate, ...] = (
    DefectTemplate(
        "off_by_one_end",
        "widen_upper_bound",
        _snippet(
            "inclusive_range",
            '''
def inclusive_range(start, stop):
    """Integers from ``start`` to ``stop``, both ends included."""
    return list(range(start, stop))
''',
            """
    def test_includes_both_ends(self):
        self.assertEqual(inclusive_range(1, 4), [1, 2, 3, 4])

    def test_single_value(self):
        self.assertEqual(inclusive_range(3, 3), [3])
""",
        ),
    ),
    DefectTemplate(
        "off_by_one_end",
        "widen_upper_bound",
        _snippet(
            "page",
            '''
def page(items, number, size):
    """Page ``number`` (counted from 1) of ``items``, ``size`` items per page."""
    start = (number - 1) * size
    return items[start:start + size - 1]
''',
            """
    def test_first_page_is_full(self):
        self.assertEqual(page(list(range(10)), 1, 3), [0, 1, 2])

    def test_last_page_is_short(self):
        self.assertEqual(page(list(range(10)), 4, 3), [9])
""",
        ),
    ),
    DefectTemplate(
        "index_from_one",
        "index_minus_one",
        _snippet(
            "nth_word",
            '''
def nth_word(text, n):
    """The ``n``-th word of ``text``, counted from 1."""
    words = text.split()
    return words[n]
''',
            """
    def test_counts_from_one(self):
        self.assertEqual(nth_word("alpha beta gamma", 1), "alpha")

    def test_last_word(self):
        self.assertEqual(nth_word("alpha beta gamma", 3), "gamma")
""",
        ),
    ),
    DefectTemplate(
        "index_from_one",
        "index_minus_one",
        _snippet(
            "last_line",
            '''
def last_line(text):
    """The last line of ``text``."""
    lines = text.splitlines()
    return lines[len(lines)]
''',
            """
    def test_last_of_several(self):
        self.assertEqual(last_line("a\\nb\\nc"), "c")

    def test_single_line(self):
        self.assertEqual(last_line("only"), "only")
""",
        ),
    ),
    DefectTemplate(
        "wrong_comparison",
        "flip_comparison",
        _snippet(
            "largest",
            '''
def largest(values):
    """The largest of ``values``."""
    best = values[0]
    for value in values[1:]:
        if value < best:
            best = value
    return best
''',
            """
    def test_finds_the_largest(self):
        self.assertEqual(largest([3, 9, 2]), 9)

    def test_single_value(self):
        self.assertEqual(largest([4]), 4)
""",
        ),
    ),
    DefectTemplate(
        "wrong_comparison",
        "flip_comparison",
        _snippet(
            "is_overdue",
            '''
def is_overdue(due_day, today):
    """True when ``today`` is past ``due_day`` (both day numbers)."""
    return today < due_day
''',
            """
    def test_later_day_is_overdue(self):
        self.assertTrue(is_overdue(5, 7))

    def test_due_day_itself_is_not_overdue(self):
        self.assertFalse(is_overdue(5, 5))

    def test_earlier_day_is_not_overdue(self):
        self.assertFalse(is_overdue(5, 3))
""",
        ),
    ),
    DefectTemplate(
        "boundary",
        "toggle_inclusive",
        _snippet(
            "in_range",
            '''
def in_range(value, low, high):
    """True when ``low <= value <= high`` (both bounds included)."""
    return low <= value < high
''',
            """
    def test_upper_bound_is_included(self):
        self.assertTrue(in_range(10, 1, 10))

    def test_lower_bound_is_included(self):
        self.assertTrue(in_range(1, 1, 10))

    def test_above_is_excluded(self):
        self.assertFalse(in_range(11, 1, 10))
""",
        ),
    ),
    DefectTemplate(
        "boundary",
        "toggle_inclusive",
        _snippet(
            "is_passing",
            '''
def is_passing(score, threshold=50):
    """True when ``score`` reaches ``threshold``."""
    return score > threshold
''',
            """
    def test_threshold_itself_passes(self):
        self.assertTrue(is_passing(50))

    def test_high_score_passes(self):
        self.assertTrue(is_passing(80))

    def test_low_score_fails(self):
        self.assertFalse(is_passing(49))
""",
        ),
    ),
    DefectTemplate(
        "missing_strip",
        "strip_split_parts",
        _snippet(
            "parse_tags",
            '''
def parse_tags(text):
    """Tags from a comma-separated list, empty ones dropped."""
    return [tag for tag in text.split(",") if tag]
''',
            """
    def test_ignores_spaces_around_tags(self):
        self.assertEqual(parse_tags("red, green ,blue"), ["red", "green", "blue"])

    def test_drops_empty_tags(self):
        self.assertEqual(parse_tags("a,,b"), ["a", "b"])
""",
        ),
    ),
    DefectTemplate(
        "missing_strip",
        "strip_split_parts",
        _snippet(
            "parse_pairs",
            '''
def parse_pairs(line):
    """``"a=1; b=2"`` as a dict of strings."""
    pairs = {}
    for chunk in line.split(";"):
        key, value = chunk.split("=")
        pairs[key] = value
    return pairs
''',
            """
    def test_ignores_spaces_around_pairs(self):
        self.assertEqual(parse_pairs("host = db; port=5432"), {"host": "db", "port": "5432"})

    def test_single_pair(self):
        self.assertEqual(parse_pairs("a=1"), {"a": "1"})
""",
        ),
    ),
    DefectTemplate(
        "true_division",
        "floor_division",
        _snippet(
            "middle",
            '''
def middle(items):
    """The middle item of ``items`` (the later of the two middles for an even length)."""
    return items[len(items) / 2]
''',
            """
    def test_odd_length(self):
        self.assertEqual(middle([1, 2, 3]), 2)

    def test_even_length(self):
        self.assertEqual(middle([1, 2, 3, 4]), 3)
""",
        ),
    ),
    DefectTemplate(
        "true_division",
        "floor_division",
        _snippet(
            "bucket",
            '''
def bucket(value, width):
    """The lower edge of the ``width``-wide bucket that ``value`` falls in."""
    return value / width * width
''',
            """
    def test_rounds_down_to_the_edge(self):
        self.assertEqual(bucket(7, 5), 5)

    def test_edge_maps_to_itself(self):
        self.assertEqual(bucket(10, 5), 10)
""",
        ),
    ),
    DefectTemplate(
        "none_not_handled",
        "guard_none",
        _snippet(
            "first_word",
            '''
def first_word(text):
    """The first word of ``text``; None when there is no text."""
    return text.split()[0]
''',
            """
    def test_first_word(self):
        self.assertEqual(first_word("hello world"), "hello")

    def test_none_gives_none(self):
        self.assertIsNone(first_word(None))
""",
        ),
    ),
    DefectTemplate(
        "none_not_handled",
        "guard_none",
        _snippet(
            "email_domain",
            '''
def email_domain(address):
    """The lower-cased domain of an e-mail ``address``; None for a missing address."""
    return address.split("@")[1].lower()
''',
            """
    def test_domain_is_lower_cased(self):
        self.assertEqual(email_domain("ada@Example.ORG"), "example.org")

    def test_none_gives_none(self):
        self.assertIsNone(email_domain(None))
""",
        ),
    ),
    DefectTemplate(
        "sort_order",
        "reverse_sort",
        _snippet(
            "top_scores",
            '''
def top_scores(scores, n=3):
    """The ``n`` highest ``scores``, highest first."""
    return sorted(scores)[:n]
''',
            """
    def test_highest_first(self):
        self.assertEqual(top_scores([5, 1, 9, 7], 2), [9, 7])

    def test_default_keeps_three(self):
        self.assertEqual(top_scores([5, 1, 9, 7]), [9, 7, 5])
""",
        ),
    ),
    DefectTemplate(
        "sort_order",
        "reverse_sort",
        _snippet(
            "most_common",
            '''
def most_common(counts):
    """The names in ``counts`` (name -> count), most frequent first."""
    return [name for name, _ in sorted(counts.items(), key=lambda item: item[1])]
''',
            """
    def test_most_frequent_first(self):
        self.assertEqual(most_common({"a": 2, "b": 5, "c": 1}), ["b", "a", "c"])
""",
        ),
    ),
    DefectTemplate(
        "wrong_key",
        "closest_key",
        _snippet(
            "full_name",
            '''
def full_name(person):
    """``"First Last"`` from a person record."""
    first = person["first"]
    last = person["lastname"]
    return f"{first} {last}"
''',
            """
    def test_joins_first_and_last(self):
        self.assertEqual(full_name({"first": "Ada", "last": "Lovelace"}), "Ada Lovelace")
""",
        ),
    ),
    DefectTemplate(
        "wrong_key",
        "closest_key",
        _snippet(
            "order_total",
            '''
def order_total(order):
    """The sum of quantity times price over the lines of ``order``."""
    return sum(line["qty"] * line["unit_price"] for line in order["lines"])
''',
            """
    def test_sums_the_lines(self):
        order = {"lines": [{"qty": 2, "price": 3}, {"qty": 1, "price": 10}]}
        self.assertEqual(order_total(order), 16)

    def test_empty_order(self):
        self.assertEqual(order_total({"lines": []}), 0)
""",
        ),
    ),
    DefectTemplate(
        "mutable_default",
        "fresh_mutable_default",
        _snippet(
            "add_tag",
            '''
def add_tag(tag, tags=[]):
    """``tags`` with ``tag`` appended (a new list when none is given)."""
    tags.append(tag)
    return tags
''',
            """
    def test_calls_do_not_share_a_list(self):
        add_tag("a")
        self.assertEqual(add_tag("b"), ["b"])

    def test_appends_to_a_given_list(self):
        self.assertEqual(add_tag("b", ["a"]), ["a", "b"])
""",
        ),
    ),
    DefectTemplate(
        "mutable_default",
        "fresh_mutable_default",
        _snippet(
            "count_words",
            '''
def count_words(text, counts={}):
    """Occurrences of each word of ``text``, added to ``counts`` when given."""
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts
''',
            """
    def test_calls_do_not_share_counts(self):
        count_words("a b a")
        self.assertEqual(count_words("b"), {"b": 1})

    def test_adds_to_given_counts(self):
        self.assertEqual(count_words("x y", {"z": 1}), {"z": 1, "x": 1, "y": 1})
""",
        ),
    ),
    DefectTemplate(
        "string_format",
        "zero_pad_format",
        _snippet(
            "iso_date",
            '''
def iso_date(year, month, day):
    """``YYYY-MM-DD`` for a date."""
    return f"{year}-{month}-{day}"
''',
            """
    def test_pads_month_and_day(self):
        self.assertEqual(iso_date(2024, 3, 5), "2024-03-05")

    def test_two_digit_month_and_day(self):
        self.assertEqual(iso_date(1999, 12, 31), "1999-12-31")
""",
        ),
    ),
    DefectTemplate(
        "string_format",
        "zero_pad_format",
        _snippet(
            "clock",
            '''
def clock(minutes):
    """``HH:MM`` for a number of minutes after midnight."""
    hours, mins = divmod(minutes, 60)
    return f"{hours}:{mins}"
''',
            """
    def test_pads_hours_and_minutes(self):
        self.assertEqual(clock(545), "09:05")

    def test_afternoon(self):
        self.assertEqual(clock(1000), "16:40")
""",
        ),
    ),
    DefectTemplate(
        "exception_type",
        "raise_value_error",
        _snippet(
            "to_meters",
            '''
def to_meters(value, unit):
    """``value`` in ``unit`` (m, km or cm) converted to meters; ValueError for other units."""
    factors = {"m": 1, "km": 1000, "cm": 0.01}
    if unit not in factors:
        raise KeyError(f"unknown unit {unit!r}")
    return value * factors[unit]
''',
            """
    def test_converts_kilometers(self):
        self.assertEqual(to_meters(2, "km"), 2000)

    def test_rejects_unknown_units(self):
        with self.assertRaises(ValueError):
            to_meters(1, "parsec")
""",
        ),
    ),
    DefectTemplate(
        "exception_type",
        "raise_value_error",
        _snippet(
            "parse_percent",
            '''
def parse_percent(text):
    """``"45%"`` as 0.45; ValueError when the text is not a percentage."""
    if not text.endswith("%"):
        raise TypeError(f"not a percentage: {text!r}")
    return float(text[:-1]) / 100
''',
            """
    def test_parses_a_percentage(self):
        self.assertEqual(parse_percent("45%"), 0.45)

    def test_rejects_a_plain_number(self):
        with self.assertRaises(ValueError):
            parse_percent("45")
""",
        ),
    ),
    DefectTemplate(
        "wrong_default",
        "flip_bool_default",
        _snippet(
            "sort_names",
            '''
def sort_names(names, descending=True):
    """``names`` sorted case-insensitively, A to Z unless ``descending``."""
    return sorted(names, key=str.lower, reverse=descending)
''',
            """
    def test_a_to_z_by_default(self):
        self.assertEqual(sort_names(["bob", "Alice", "carol"]), ["Alice", "bob", "carol"])

    def test_descending_on_request(self):
        self.assertEqual(sort_names(["bob", "Alice", "carol"], descending=True), ["carol", "bob", "Alice"])
""",
        ),
    ),
    DefectTemplate(
        "wrong_default",
        "flip_bool_default",
        _snippet(
            "slugify",
            '''
def slugify(title, lowercase=False):
    """``title`` as a URL slug: words joined by dashes, lower-cased unless told otherwise."""
    slug = "-".join(title.split())
    return slug.lower() if lowercase else slug
''',
            """
    def test_lower_cased_by_default(self):
        self.assertEqual(slugify("Hello World"), "hello-world")

    def test_case_kept_on_request(self):
        self.assertEqual(slugify("Hello World", lowercase=False), "Hello-World")
""",
        ),
    ),
    DefectTemplate(
        "case_sensitive",
        "lowercase_compare",
        _snippet(
            "count_word",
            '''
def count_word(text, word):
    """How often ``word`` occurs in ``text``, ignoring case."""
    return sum(1 for token in text.split() if token == word)
''',
            """
    def test_ignores_case(self):
        self.assertEqual(count_word("The cat saw the dog", "the"), 2)

    def test_absent_word(self):
        self.assertEqual(count_word("a b c", "z"), 0)
""",
        ),
    ),
    DefectTemplate(
        "case_sensitive",
        "lowercase_compare",
        _snippet(
            "has_flag",
            '''
def has_flag(flags, name):
    """True when ``name`` is among ``flags``, ignoring case."""
    for flag in flags:
        if flag == name:
            return True
    return False
''',
            """
    def test_ignores_case(self):
        self.assertTrue(has_flag(["Verbose", "debug"], "verbose"))

    def test_absent_flag(self):
        self.assertFalse(has_flag(["debug"], "verbose"))
""",
        ),
    ),
)

# --- healthy helpers --------------------------------------------------------------------------
HELPERS: tuple[Snippet, ...] = (
    _snippet(
        "word_count",
        '''
def word_count(text):
    """The number of whitespace-separated words in ``text``."""
    return len(text.split())
''',
        """
    def test_counts_words(self):
        self.assertEqual(word_count("one two  three"), 3)
""",
    ),
    _snippet(
        "celsius_to_fahrenheit",
        '''
def celsius_to_fahrenheit(celsius):
    """``celsius`` degrees in Fahrenheit."""
    return celsius * 9 / 5 + 32
''',
        """
    def test_boiling_point(self):
        self.assertEqual(celsius_to_fahrenheit(100), 212)
""",
    ),
    _snippet(
        "days_in_month",
        '''
def days_in_month(year, month):
    """Days in ``month`` of ``year`` (Gregorian calendar)."""
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31
''',
        """
    def test_february_of_a_leap_year(self):
        self.assertEqual(days_in_month(2024, 2), 29)

    def test_february_of_a_century(self):
        self.assertEqual(days_in_month(1900, 2), 28)

    def test_april(self):
        self.assertEqual(days_in_month(2023, 4), 30)
""",
    ),
    _snippet(
        "unique_sorted",
        '''
def unique_sorted(values):
    """The distinct ``values`` in ascending order."""
    return sorted(set(values))
''',
        """
    def test_drops_duplicates(self):
        self.assertEqual(unique_sorted([3, 1, 3, 2]), [1, 2, 3])
""",
    ),
    _snippet(
        "truncate",
        '''
def truncate(text, width):
    """``text`` cut to ``width`` characters, ending in an ellipsis when cut."""
    if len(text) <= width:
        return text
    return text[:width - 3] + "..."
''',
        """
    def test_short_text_is_kept(self):
        self.assertEqual(truncate("short", 10), "short")

    def test_long_text_is_cut(self):
        self.assertEqual(truncate("a long sentence", 8), "a lon...")
""",
    ),
    _snippet(
        "parse_bool",
        '''
def parse_bool(text):
    """True for the usual spellings of yes (1, true, yes, on), in any case."""
    return text.strip().lower() in ("1", "true", "yes", "on")
''',
        """
    def test_yes_spellings(self):
        self.assertTrue(parse_bool(" Yes "))

    def test_other_text_is_false(self):
        self.assertFalse(parse_bool("nope"))
""",
    ),
    _snippet(
        "mean",
        '''
def mean(values):
    """The arithmetic mean of ``values``."""
    return sum(values) / len(values)
''',
        """
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 6]), 3)
""",
    ),
    _snippet(
        "chunked",
        '''
def chunked(items, size):
    """``items`` in consecutive lists of ``size`` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
''',
        """
    def test_last_chunk_is_short(self):
        self.assertEqual(chunked([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]])
""",
    ),
)

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(d.family for d in DEFECTS))


# --- rendering --------------------------------------------------------------------------------
def _class_name(function: str) -> str:
    return "Test" + "".join(part.capitalize() for part in function.split("_"))


def render_module(name: str, snippets: list[Snippet]) -> str:
    """The source of module ``name`` holding ``snippets``' functions."""
    names = ", ".join(s.function for s in snippets)
    header = f'"""Small helpers of the demo application ({name}): {names}."""\n'
    return header + "".join("\n\n" + s.source for s in snippets)


def render_tests(package: str, name: str, snippets: list[Snippet]) -> str:
    """The unittest file of module ``name``: one test case class per function."""
    imports = ", ".join(s.function for s in snippets)
    parts = [
        f'"""Tests of {package}.{name}."""\n\nimport unittest\n\nfrom {package}.{name} import {imports}\n'
    ]
    for snippet in snippets:
        parts.append(f"\n\nclass {_class_name(snippet.function)}(unittest.TestCase):\n{snippet.tests}")
    parts.append('\n\nif __name__ == "__main__":\n    unittest.main()\n')
    return "".join(parts)


def plan_codebase(n_modules: int, seed: int = 0) -> list[tuple[str, DefectTemplate, list[Snippet]]]:
    """(module name, defect, functions in file order) for each module: the pure part of generation.

    Families are dealt round-robin over a seeded permutation, so any ``n_modules`` at least the
    number of families covers every family; the template within a family, the helpers and the
    order of functions are drawn from the seed.
    """
    if n_modules < 1:
        raise InvalidInputError("a codebase needs at least one module", n_modules=n_modules)
    rng = random.Random(seed)
    families = list(FAMILIES)
    rng.shuffle(families)
    by_family = {family: [d for d in DEFECTS if d.family == family] for family in FAMILIES}
    plan = []
    for index in range(n_modules):
        defect = rng.choice(by_family[families[index % len(families)]])
        snippets = [defect.snippet, *rng.sample(HELPERS, HELPERS_PER_MODULE)]
        rng.shuffle(snippets)
        plan.append((f"mod_{index:03d}", defect, snippets))
    return plan


def write_package(root: Path, package: str = DEFAULT_PACKAGE) -> None:
    """Create ``root/<package>/`` and ``root/tests/`` as importable packages."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", package):
        raise InvalidInputError("package must be a lower-case Python identifier", package=package)
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / "tests").mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text('"""The demo application: small helper modules."""\n')
    (root / "tests" / "__init__.py").write_text('"""Tests of the demo application."""\n')


def write_module(
    root: Path, name: str, defect: DefectTemplate, snippets: list[Snippet], package: str = DEFAULT_PACKAGE
) -> ModuleInfo:
    """Write module ``name`` (holding ``snippets``, one of them ``defect``'s) and its tests."""
    module = f"{package}/{name}.py"
    test = f"tests/test_{name}.py"
    (root / module).write_text(render_module(name, snippets))
    (root / test).write_text(render_tests(package, name, snippets))
    return ModuleInfo(name, module, test, defect.family, defect.strategy, defect.snippet.function)


def generate_codebase(
    root: Path, n_modules: int, seed: int = 0, *, package: str = DEFAULT_PACKAGE
) -> list[ModuleInfo]:
    """Write ``root/<package>/mod_NNN.py`` and ``root/tests/test_mod_NNN.py`` for ``n_modules``
    modules (deterministic from ``seed``) and return what was written."""
    root = Path(root)
    plan = plan_codebase(n_modules, seed)
    write_package(root, package)
    return [write_module(root, name, defect, snippets, package) for name, defect, snippets in plan]


def decompose_codebase(root: Path) -> list[dict[str, str]]:
    """One task per module under ``root`` that has a test file: ``{"module", "test"}``, sorted."""
    root = Path(root)
    tasks = []
    for module in sorted(root.glob("*/mod_*.py")):
        test = root / "tests" / f"test_{module.name}"
        if test.is_file():
            tasks.append(
                {"module": module.relative_to(root).as_posix(), "test": test.relative_to(root).as_posix()}
            )
    return tasks
