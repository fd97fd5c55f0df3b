"""`rayflow hub serve`, `rayflow token issue|revoke` and `rayflow audit` as real processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rayflow.errors import AuthError
from rayflow.wire.hub_client import SyncHubClient

pytestmark = pytest.mark.integration


def rayflow(state_dir, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "rayflow", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def served_hub(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayflow", "hub", "serve", "--port", "0", "--region", "local",
         "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    endpoint_file = tmp_path / "hub-endpoint.json"
    for _ in range(600):  # bounded wait for start-up (Python imports, key and certificate generation)
        if endpoint_file.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert endpoint_file.exists(), proc.communicate(timeout=10)
    yield tmp_path, json.loads(endpoint_file.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_served_hub_with_cli_tokens_revocation_and_audit(served_hub):
    state_dir, endpoint = served_hub
    ca = open(endpoint["ca"], "rb").read()
    token = rayflow(state_dir, "token", "issue", "--tenant", "acme", "--sub", "cli-agent").strip()
    with SyncHubClient(endpoint["host"], endpoint["port"], ca_pem=ca, token=token) as hub:
        stored = hub.store_pattern(namespace="cli", title="From the CLI", content="tokens from the command line")
        assert hub.search("tokens command line", k=1)[0]["item"]["id"] == stored["id"]
        rayflow(state_dir, "token", "revoke", token)
        refused = None
        for _ in range(50):  # the hub re-reads the deny-list at most every half second
            try:
                hub.health()
            except AuthError as error:
                refused = error
                break
            time.sleep(0.1)
        assert refused is not None and refused.details.get("reason") == "revoked"
    wanted = {("cli-agent", "store_pattern", "ok"), ("cli-agent", "search", "ok")}
    seen: set = set()
    for _ in range(20):  # audit records are written in batches every 0.2 s: poll, bounded
        audit = json.loads(rayflow(state_dir, "audit", "--tenant", "acme", "--json"))
        seen = {(r["actor"], r["op"], r["outcome"]) for r in audit}
        if wanted <= seen:
            break
    assert wanted <= seen
