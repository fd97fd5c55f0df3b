"""Redaction of secrets and personal data from text before it is stored or shown to a model.

Why here and not in the store alone: memory items are distilled from agent transcripts, which
routinely contain tokens from environment dumps, credentials in URLs and e-mail addresses from
git logs. Whatever reaches the ReasoningBank is retrieved into other agents' prompts, so a
secret stored once leaks many times.

Each finding is replaced by a stable marker ``[REDACTED:<kind>]``; the marker never matches a
rule again, and :func:`scrub` repeats its rules until nothing changes, so scrubbing is
idempotent: ``scrub(scrub(x).text).text == scrub(x).text``.

Rules run from the most specific (a PEM block, a GitHub token) to the most generic (a long
high-entropy string), so a finding is reported under its most precise kind. Deliberate choices,
each covered by a test:

- Assignments (``password=...``, ``"api_key": "..."``, ``--token=...``, ``--token abc``) keep
  the key name and lose only the value. Values that are code rather than data stay: ``None``,
  type names (``token: str``), calls (``get_token()``), attribute paths (``self.password``),
  variable references (``$DB_PASSWORD``) and masks (``****``). After a colon, a lone
  lower-case word stays too, because ``invalid token: unexpected`` is prose far more often
  than a secret. Keys must end in the keyword, so ``max_tokens=100`` is left alone.
- IPv6 addresses are not recognised.
- IPv4 addresses are redacted (internal addresses map a private network) except loopback,
  ``0.0.0.0`` and netmasks; four-part numbers after ``version``/``v``/``==`` are versions.
- Phone numbers are only recognised in international ``+<country>`` form: bare digit runs are
  far more often numbers in code or logs than phone numbers.
- Card numbers must start with 2-6, have 13-19 digits and pass the Luhn check.
- Pure-hex strings of 40 or 64 characters are kept: they are git object ids and SHA-256
  digests, which are not secrets and which lessons need to cite. Other long hex strings are
  kept after words such as ``commit``, ``sha``, ``hash`` or ``id``, and otherwise redacted
  when their entropy is high (hex API keys exist). A 40-hex secret therefore survives unless
  it sits in an assignment such as ``token=...``, which the assignment rule catches.
- The last-resort base64 rule needs upper case, lower case and at least two digits in a run of
  32+ characters with high entropy and without the long lower-case runs of CamelCase names;
  ``/`` ends a run, so file paths are never candidates.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: Rule passes after which scrubbing stops even if something still changed (never reached in
#: practice: a marker matches no rule).
MAX_PASSES = 3


def marker(kind: str) -> str:
    """The text that replaces a finding of ``kind``."""
    return f"[REDACTED:{kind}]"


_MARKER_PREFIX = "[REDACTED:"


@dataclass(frozen=True)
class ScrubResult:
    """Scrubbed text and how many findings of each kind were replaced."""

    text: str
    redactions: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Number of replacements of any kind."""
        return sum(self.redactions.values())


@dataclass(frozen=True)
class _Rule:
    kind: str | Callable[[re.Match[str]], str]
    pattern: re.Pattern[str]
    #: The group that is replaced; the rest of the match is kept as it was.
    secret_group: int | str | Callable[[re.Match[str]], str] = 0
    #: Returns True for a match that must stay as it is.
    keep: Callable[[re.Match[str]], bool] | None = None


# --- building blocks of the rules ----------------------------------------------------------------
def shannon_entropy(text: str) -> float:
    """Bits per character of ``text`` from its own character frequencies."""
    if not text:
        return 0.0
    counts = Counter(text)
    size = len(text)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum used by payment cards."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _before(match: re.Match[str], width: int) -> str:
    """The text just before a match, on the same line."""
    start = match.start()
    chunk = match.string[max(0, start - width) : start]
    return chunk.rsplit("\n", 1)[-1]


def _after(match: re.Match[str], width: int = 1) -> str:
    return match.string[match.end() : match.end() + width]


# --- assignments ------------------------------------------------------------------------------
_ASSIGNMENT_KEYWORDS = (
    r"passw(?:or)?d|pwd|passphrase|secret(?:[_-]?key)?|client[_-]?secret|token"
    r"|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
)
_ASSIGNMENT = re.compile(
    r"(?i)(?P<key>\b[\w.-]{0,40}?(?:" + _ASSIGNMENT_KEYWORDS + r"))\b[\"']?"
    r"[ \t]*(?P<sep>[:=])(?![=:])[ \t]*"
    r"(?:[rbfu]{1,2}(?=[\"']))?"
    r"(?:(?P<quote>[\"'])(?P<quoted>[^\"'\n]+)(?P=quote)|(?P<bare>[^\s\"'`,;()\[\]{}<>]+))"
)
#: Bare values that name a type or a constant rather than holding a secret.
_CODE_WORDS = frozenset(
    {
        "none", "null", "nil", "true", "false", "undefined", "str", "string", "bytes", "int", "bool",
        "dict", "list", "tuple", "optional", "any", "secretstr", "self", "cls", "required",
    }
)  # fmt: skip
_DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_REFERENCE_START = ("$", "%(", "{{", "<", "@")


def _assignment_value(match: re.Match[str]) -> str:
    return match.group("quoted") if match.group("quoted") is not None else match.group("bare")


def _assignment_secret_group(match: re.Match[str]) -> str:
    return "quoted" if match.group("quoted") is not None else "bare"


def _keep_assignment(match: re.Match[str]) -> bool:
    value = _assignment_value(match)
    if value.startswith(_REFERENCE_START) or set(value) <= set("*xX.•-"):
        return True
    if match.group("quoted") is not None:
        return False
    key = match.group("key").lower()
    if value.lower() in _CODE_WORDS or _DOTTED_PATH.fullmatch(value):
        return True
    if _after(match) in ("(", "[", "."):
        return True
    if value.isdigit() and len(value) < 8 and "pass" not in key and "pwd" not in key:
        return True  # max_token=512 and friends are limits, not secrets
    return match.group("sep") == ":" and re.fullmatch(r"[a-z]{1,12}", value) is not None


#: ``--password hunter2``: a command-line flag followed by its value after a space.
_FLAG_VALUE = re.compile(
    r"(?i)(?<![\w-])(?P<key>--[\w-]{0,40}?(?:" + _ASSIGNMENT_KEYWORDS + r"))(?![\w-])[ \t]+"
    r"(?:(?P<quote>[\"'])(?P<quoted>[^\"'\n]+)(?P=quote)|(?P<bare>[^\s\"'-][^\s\"']*))"
)


def _keep_flag_value(match: re.Match[str]) -> bool:
    return _assignment_value(match).startswith(_REFERENCE_START)


def _assignment_kind(match: re.Match[str]) -> str:
    key = match.group("key").lower()
    if "pass" in key or "pwd" in key:
        return "password"
    if "token" in key:
        return "token"
    if re.search(r"api[_-]?key|apikey|access[_-]?key", key):
        return "api_key"
    if "private" in key:
        return "private_key"
    return "secret"


# --- network and personal data ----------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w)(?!\.\d)")
_VERSION_BEFORE = re.compile(r"(?i)(?:\b(?:version|ver|v)\s*[:=]?|==|>=|<=|~=|!=|@)\s*$")


def _keep_ipv4(match: re.Match[str]) -> bool:
    address = match.group(0)
    if address.startswith(("127.", "255.")) or address == "0.0.0.0":
        return True
    return bool(_VERSION_BEFORE.search(_before(match, 16)))


_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")


def _keep_email(match: re.Match[str]) -> bool:
    # git@github.com:org/repo is an ssh remote, not a person.
    return match.group(0).split("@", 1)[0] == "git"


_PHONE = re.compile(r"(?<![\w+/.=-])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w])")


def _keep_phone(match: re.Match[str]) -> bool:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return not 8 <= digits <= 15


_CARD = re.compile(r"(?<![\w.])[2-6]\d(?:[ -]?\d){11,17}(?![\w.])")


def _keep_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return not (13 <= len(digits) <= 19 and luhn_valid(digits))


# --- last-resort high-entropy strings ---------------------------------------------------------
_HEX_RUN = re.compile(r"(?<![\w-])[0-9a-fA-F]{32,}(?![\w-])")
_HASH_CONTEXT = re.compile(
    r"(?i)\b(?:commit|sha(?:1|256|512)?|hash|digest|checksum|md5|revision|rev|etag|uuid|id|object|blob|tree)\b"
)
#: Git object ids (SHA-1) and SHA-256 digests.
_DIGEST_LENGTHS = (40, 64)
HEX_ENTROPY_BITS = 3.0


def _keep_hex(match: re.Match[str]) -> bool:
    run = match.group(0)
    if len(run) in _DIGEST_LENGTHS or _HASH_CONTEXT.search(_before(match, 32)):
        return True
    if run.isdigit() or not any(ch.isdigit() for ch in run):
        return True
    return shannon_entropy(run.lower()) < HEX_ENTROPY_BITS


_BASE64_RUN = re.compile(r"(?<![\w+=-])[A-Za-z0-9+_-]{32,}={0,2}(?![\w+=-])")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
BASE64_ENTROPY_BITS = 4.0
#: Mean length of lower-case runs from which a string reads as CamelCase words; random
#: base64url of 32 characters stays below it 99.7% of the time.
CAMEL_CASE_LOWER_RUN = 3.5


def _keep_base64(match: re.Match[str]) -> bool:
    run = match.group(0).rstrip("=")
    if _UUID.fullmatch(run):
        return True
    has_upper = any(ch.isupper() for ch in run)
    has_lower = any(ch.islower() for ch in run)
    digits = sum(ch.isdigit() for ch in run)
    if not (has_upper and has_lower and digits >= 2):
        return True
    # Identifiers and slugs are full of separators; random base64url has few.
    if (run.count("_") + run.count("-")) * 8 > len(run):
        return True
    # CamelCase names are made of words: long lower-case runs, which random text rarely has.
    lower_runs = [len(found) for found in re.findall(r"[a-z]+", run)]
    if sum(lower_runs) / len(lower_runs) >= CAMEL_CASE_LOWER_RUN:
        return True
    return shannon_entropy(run) < BASE64_ENTROPY_BITS


def _keep_openai(match: re.Match[str]) -> bool:
    return not any(ch.isdigit() for ch in match.group(0)[3:])


# --- the rules, most specific first -----------------------------------------------------------
_RULES: tuple[_Rule, ...] = (
    _Rule(
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
    ),
    _Rule(
        "url_credentials",
        re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,30}://(?P<secret>[^\s/?#@:]+:[^\s/?#@]+)@"),
        "secret",
    ),
    _Rule("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")),
    _Rule(
        "aws_access_key",
        re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}\b"),
    ),
    _Rule(
        "aws_secret_key",
        re.compile(
            r"(?i)\baws_?secret\w*[\"']?[ \t]*[:=][ \t]*[\"']?(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
        ),
        "secret",
    ),
    _Rule("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})\b")),
    _Rule("anthropic_key", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}")),
    _Rule(
        "openai_key",
        re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
        keep=_keep_openai,
    ),
    _Rule("slack_token", re.compile(r"\b(?:xox[abposr]-[A-Za-z0-9-]{10,}|xapp-\d-[A-Za-z0-9-]{10,})")),
    _Rule(
        "authorization",
        re.compile(
            r"(?i)\b(?:proxy-)?authorization[\"']?[ \t]*[:=][ \t]*[\"']?"
            r"(?:(?:bearer|basic|token|digest)[ \t]+)?(?P<secret>[^\s\"',;]{8,})"
        ),
        "secret",
    ),
    _Rule("bearer_token", re.compile(r"\b[Bb]earer[ \t]+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)"), "secret"),
    _Rule(_assignment_kind, _ASSIGNMENT, _assignment_secret_group, _keep_assignment),
    _Rule(_assignment_kind, _FLAG_VALUE, _assignment_secret_group, _keep_flag_value),
    _Rule("email", _EMAIL, keep=_keep_email),
    _Rule("credit_card", _CARD, keep=_keep_card),
    _Rule("phone", _PHONE, keep=_keep_phone),
    _Rule("ipv4", _IPV4, keep=_keep_ipv4),
    _Rule("high_entropy_hex", _HEX_RUN, keep=_keep_hex),
    _Rule("high_entropy", _BASE64_RUN, keep=_keep_base64),
)


def _apply(rule: _Rule, text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        group = rule.secret_group(match) if callable(rule.secret_group) else rule.secret_group
        secret = match.group(group)
        if secret.startswith(_MARKER_PREFIX) or (rule.keep is not None and rule.keep(match)):
            return match.group(0)
        kind = rule.kind(match) if callable(rule.kind) else rule.kind
        counts[kind] += 1
        start, end = match.span(group)
        whole_start = match.start()
        return match.group(0)[: start - whole_start] + marker(kind) + match.group(0)[end - whole_start :]

    return rule.pattern.sub(replace, text)


def scrub(text: str) -> ScrubResult:
    """Replace secrets and personal data in ``text`` with ``[REDACTED:<kind>]`` markers."""
    counts: Counter[str] = Counter()
    for _ in range(MAX_PASSES):
        before = sum(counts.values())
        for rule in _RULES:
            text = _apply(rule, text, counts)
        if sum(counts.values()) == before:
            break
    return ScrubResult(text=text, redactions=dict(counts))


def scrub_text(text: str) -> str:
    """Just the scrubbed text, for callers that do not need the counts."""
    return scrub(text).text
