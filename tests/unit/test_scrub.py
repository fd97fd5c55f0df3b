"""Specification of scrubbing: what is redacted, what must survive untouched, and idempotence.

Secret-shaped values are assembled from pieces so that this file itself does not look like it
holds credentials to secret scanners.
"""

from __future__ import annotations

import pytest

from rayflow.memory.scrub import luhn_valid, marker, scrub, shannon_entropy

GITHUB_TOKEN = "gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6q7R8"
GITHUB_PAT = "github" + "_pat_" + "11ABCDEFG0123456789_" + "abcdefghijklmnopqrstuvwxyz0123"
ANTHROPIC_KEY = "sk-" + "ant-api03-" + "abcDEF123456ghiJKL7890mnoPQR"
OPENAI_KEY = "sk-" + "proj-" + "Xy12Ab34Cd56Ef78Gh90Ij12"
SLACK_TOKEN = "xo" + "xb-" + "123456789012-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx"
AWS_KEY_ID = "AK" + "IA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
JWT = (
    "eyJ"
    + "hbGciOiJIUzI1NiJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0"
    + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PEM = (
    "-----BEGIN " + "RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2\nq8xZk1yW0T4pfrhBbX\n"
    "-----END " + "RSA PRIVATE KEY-----"
)
RANDOM_BASE64 = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MEFCQ0RFRkdISUpLTE1O"
RANDOM_HEX_32 = "3f2a9c1e5b7d4f60a8c2e4b6d8f0a1c3"

# (text, secret that must disappear, kind reported)
POSITIVE_CASES = [
    ("mail jane.doe@example.com today", "jane.doe@example.com", "email"),
    (f"key id {AWS_KEY_ID} found", AWS_KEY_ID, "aws_access_key"),
    (f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}", AWS_SECRET, "aws_secret_key"),
    (f"aws_secret: '{AWS_SECRET}'", AWS_SECRET, "aws_secret_key"),
    (f"token {GITHUB_TOKEN} used", GITHUB_TOKEN, "github_token"),
    (f"GH_TOKEN value {GITHUB_PAT}", GITHUB_PAT, "github_token"),
    (f"export ANTHROPIC_API_KEY={ANTHROPIC_KEY}", ANTHROPIC_KEY, "anthropic_key"),
    (f"client = OpenAI(api_key_value) # {OPENAI_KEY}", OPENAI_KEY, "openai_key"),
    (f"slack {SLACK_TOKEN}", SLACK_TOKEN, "slack_token"),
    (f"cookie session={JWT}", JWT, "jwt"),
    (f"key:\n{PEM}\ndone", "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2", "private_key"),
    ("curl -H 'Authorization: Bearer abcdef0123456789abcdef' api", "abcdef0123456789abcdef", "authorization"),
    ("headers = {'auth': 'Bearer QWxhZGRpbjpvcGVuc2VzYW1l99'}", "QWxhZGRpbjpvcGVuc2VzYW1l99", "bearer_token"),
    ("git clone https://bob:s3cretPw@github.com/org/repo.git", "bob:s3cretPw", "url_credentials"),
    ("server 10.0.3.17:8080 refused", "10.0.3.17", "ipv4"),
    ("call +44 20 7946 0958 now", "+44 20 7946 0958", "phone"),
    ("call +1 (555) 123-4567 now", "+1 (555) 123-4567", "phone"),
    ("card 4111 1111 1111 1111 charged", "4111 1111 1111 1111", "credit_card"),
    (f"blob {RANDOM_BASE64} end", RANDOM_BASE64, "high_entropy"),
    (f"value {RANDOM_HEX_32} end", RANDOM_HEX_32, "high_entropy_hex"),
]


@pytest.mark.parametrize(("text", "secret", "kind"), POSITIVE_CASES, ids=[c[2] for c in POSITIVE_CASES])
def test_secret_is_replaced_by_its_marker(text: str, secret: str, kind: str) -> None:
    result = scrub(text)
    assert secret not in result.text
    assert marker(kind) in result.text
    assert result.redactions.get(kind) == 1


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("password=hunter22", "password=[REDACTED:password]", "password"),
        ("DB_PASSWORD: 'p@ss w0rd'", "DB_PASSWORD: '[REDACTED:password]'", "password"),
        ("token: abc123XYZ", "token: [REDACTED:token]", "token"),
        ('{"api_key": "abcd1234"}', '{"api_key": "[REDACTED:api_key]"}', "api_key"),
        ('secret = "s3cr3t"', 'secret = "[REDACTED:secret]"', "secret"),
        ("--password=hunter22 --verbose", "--password=[REDACTED:password] --verbose", "password"),
        ("X-Api-Key: 9f8e7d6c", "X-Api-Key: [REDACTED:api_key]", "api_key"),
        ("mysql --password hunter22 -h db", "mysql --password [REDACTED:password] -h db", "password"),
        ("gh auth login --with-token 'abc123'", "gh auth login --with-token '[REDACTED:token]'", "token"),
    ],
)
def test_assignment_keeps_the_key_name_and_redacts_the_value(text: str, expected: str, kind: str) -> None:
    result = scrub(text)
    assert result.text == expected
    assert result.redactions == {kind: 1}


def test_pem_block_is_redacted_as_one_unit() -> None:
    result = scrub(f"before\n{PEM}\nafter")
    assert result.text == "before\n[REDACTED:private_key]\nafter"


def test_truncated_pem_block_is_redacted_to_the_end() -> None:
    cut = PEM[: PEM.index("-----END")]
    assert scrub("key: " + cut).text == "key: [REDACTED:private_key]"


def test_url_keeps_scheme_and_host() -> None:
    result = scrub("postgres://admin:pw123@db.internal:5432/app")
    assert result.text == "postgres://[REDACTED:url_credentials]@db.internal:5432/app"


def test_counts_add_up_per_kind() -> None:
    result = scrub("a@example.com and b@example.org, server 10.1.2.3")
    assert result.redactions == {"email": 2, "ipv4": 1}
    assert result.total == 3


def test_specific_kind_wins_over_the_assignment_rule() -> None:
    result = scrub(f"api_key = '{ANTHROPIC_KEY}'")
    assert result.text == "api_key = '[REDACTED:anthropic_key]'"
    assert result.redactions == {"anthropic_key": 1}


SAFE_TEXTS = {
    "python": "def f(x): return x + 1\n\nclass Point:\n    x: int = 0\n",
    "code with secret-like names": (
        "def login(password: str, token: Optional[str] = None) -> bool:\n"
        "    token = get_token()\n    secret = self.secret\n    return password == secret\n"
    ),
    "variable references": "password=${DB_PASSWORD} token: $GITHUB_TOKEN api_key=None secret=****",
    "flags without values": "tool --password-file ~/.pw --token -v --api-key $API_KEY",
    "prose after a colon": "error: invalid token: unexpected end of input",
    "limits named like tokens": "max_token=512 max_tokens=100 token_type=bearer",
    "git sha in prose": "Fixed in commit 3f2a9c1e5b7d4f60a8c2e4b6d8f0a1c3e5b7d4f6 on main.",
    "bare 40-hex sha": "cherry-pick 9fceb02d0ae598e95dc970b74767f19372d61af8 then push",
    "sha256 digest": "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "short sha": "HEAD is now at 3f2a9c1 fix parser",
    "md5 with context": "md5 3f2a9c1e5b7d4f60a8c2e4b6d8f0a1c3",
    "versions": "Python 3.11.7, pytest-8.3.3, pluggy-1.5.0, ray==2.40.0, numpy 1.26.4, v1.2.3",
    "four part version": "installed version 10.0.19041.1, version: 4.3.2.1 and pkg==2.40.0.1",
    "loopback and any": "listening on 127.0.0.1:8000 and 0.0.0.0:9000, mask 255.255.255.0",
    "file paths": (
        "/home/user/.venv/lib/python3.11/site-packages/_pytest/python_api.py:123\n"
        "C:\\Users\\dev\\project\\src\\main.py\n./tests/unit/test_scrub.py"
    ),
    "pytest output": (
        "============================= test session starts ==============================\n"
        "platform linux -- Python 3.11.7, pytest-8.3.3, pluggy-1.5.0\n"
        "rootdir: /work/main\ncollected 4 items\n\n"
        "tests/unit/test_x.py ..F.                                                [100%]\n"
        "E       AssertionError: assert 500 == 200\n"
        "FAILED tests/unit/test_x.py::test_get - AssertionError: assert 500 == 200\n"
        "========================= 1 failed, 3 passed in 0.21s =========================="
    ),
    "diff hunk": "@@ -10,7 +10,8 @@ def foo():\n+    return a + 12345",
    "ssh remote": "git@github.com:org/repo.git",
    "uuid": "task 550e8400-e29b-41d4-a716-446655440000 started",
    "long identifiers": "test_distill_failure_yields_lesson_with_error_line TestDistillFailureYieldsLessonWithErrorLine2And3",
    "numbers": "took 1732600000000 ms; ratio 0.4111111111111111; count 4111",
    "arithmetic": "y = x +12 and z = a+1234567",
    "markdown": "## Steps\n1. Run `pytest -q`\n2. Check `git status`",
}


@pytest.mark.parametrize("text", list(SAFE_TEXTS.values()), ids=list(SAFE_TEXTS))
def test_ordinary_text_survives_unchanged(text: str) -> None:
    result = scrub(text)
    assert result.text == text
    assert result.redactions == {}


ALL_SAMPLES = (
    [case[0] for case in POSITIVE_CASES]
    + list(SAFE_TEXTS.values())
    + [
        "password=hunter22 and mail a@b.io from 10.2.3.4 with " + JWT,
        "Authorization: Bearer " + JWT,
        f"https://u:{GITHUB_TOKEN}@github.com",
    ]
)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_scrubbing_twice_changes_nothing_more(text: str) -> None:
    once = scrub(text)
    twice = scrub(once.text)
    assert twice.text == once.text
    assert twice.redactions == {}


def test_empty_text_scrubs_to_empty() -> None:
    result = scrub("")
    assert result.text == "" and result.redactions == {}


def test_luhn_check_accepts_valid_and_rejects_invalid_numbers() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


def test_number_failing_luhn_is_not_treated_as_a_card() -> None:
    assert scrub("order 4111 1111 1111 1112").text == "order 4111 1111 1111 1112"


def test_entropy_of_repeated_character_is_zero_and_grows_with_variety() -> None:
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == 2.0
