"""Benchmark of the ReasoningBank hub over QUIC: latency, 0-RTT, throughput, token checks.

Run from the repository root: ``python benchmarks/rpc.py [--quick] [--out FILE]``.

The hub runs in its own process (``rayflow hub serve``) over a bank filled with generated lessons
(100k items; 20k with ``--quick``); the client runs in this process; everything is on loopback.
The baseline, measured in the same run, is a bare aioquic echo (``quic_echo.py``, another process)
of the same number of bytes a search moves, over the same TLS set-up.

* ``handshake_ms``: a new client's full handshake plus its first call (``health``).
* ``zero_rtt_ms``: reconnecting with the session ticket, first idempotent call sent as early data.
* ``search_*``: ``search`` with a text query, k=10, tenant-scoped; ``inproc_search_p50_ms`` is the
  same retrieval called in-process on the same bank.
* ``throughput_ops_s_c8``: 8 clients (8 QUIC connections) searching concurrently.
* ``jwt_check_us_amortized``: the hub's per-call token check with its verified-token cache.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import msgpack
import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, percentile_ms, write_result  # noqa: E402
from memory import TENANT, build_bank  # noqa: E402
from quic_echo import client_connection  # noqa: E402

from rayflow.auth.issuer import TokenIssuer  # noqa: E402
from rayflow.auth.keys import KeyRing  # noqa: E402
from rayflow.auth.revocation import RevocationList  # noqa: E402
from rayflow.auth.verifier import TokenVerifier  # noqa: E402
from rayflow.config import load_config  # noqa: E402
from rayflow.hub.server import revocations_path, signing_keys_path  # noqa: E402
from rayflow.jobs.synthetic_tasks import lesson_texts, task_query  # noqa: E402
from rayflow.memory.bank import ReasoningBank  # noqa: E402
from rayflow.memory.embedding import HashingEmbedder  # noqa: E402
from rayflow.wire.hub_client import HubClient  # noqa: E402

READ_WRITE = ["reasoningbank:read", "reasoningbank:write"]


def start_process(args: list[str], ready: callable) -> subprocess.Popen:  # type: ignore[valid-type]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[2:4]} did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    return proc


async def measure(
    endpoint: dict, ca_pem: bytes, token: str, echo_port: int, echo_ca: bytes, queries: list[str], n_c8: int
) -> dict[str, float]:
    host, port = endpoint["host"], endpoint["port"]
    results: dict[str, float] = {}

    # Full handshake + first call, on fresh clients.
    full = []
    for _ in range(20):
        client = HubClient(host, port, ca_pem=ca_pem, token=token)
        t0 = time.perf_counter()
        await client.health()
        full.append(time.perf_counter() - t0)
        await client.close()
    results["handshake_ms"] = percentile_ms(full, 50)

    # 0-RTT: reconnect with the ticket and send the first idempotent call as early data.
    client = HubClient(host, port, ca_pem=ca_pem, token=token)
    await client.health()
    early, accepted = [], 0
    for _ in range(20):
        t0 = time.perf_counter()
        await client.rpc.reconnect()
        await client.health()
        early.append(time.perf_counter() - t0)
        handshake = client.rpc.last_handshake
        accepted += int(bool(handshake and handshake.early_data_accepted))
    results["zero_rtt_ms"] = percentile_ms(early, 50)
    results["zero_rtt_ratio"] = results["zero_rtt_ms"] / results["handshake_ms"]
    results["zero_rtt_accepted_fraction"] = accepted / 20

    # Search latency on one warm connection; remember how many bytes a search moves.
    for q in queries[:30]:
        await client.search(q, k=10)
    samples, moved = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = await client.search(q, k=10)
        samples.append(time.perf_counter() - t0)
        moved.append(len(msgpack.packb(hits, use_bin_type=True)))
    results["search_p50_ms"] = percentile_ms(samples, 50)
    results["search_p99_ms"] = percentile_ms(samples, 99)
    payload_bytes = int(np.median(moved))
    results["search_response_bytes"] = payload_bytes

    # Throughput: 8 clients, each on its own connection, searching concurrently.
    clients = [HubClient(host, port, ca_pem=ca_pem, token=token) for _ in range(8)]
    for c in clients:
        await c.health()

    async def worker(c: HubClient, offset: int) -> None:
        for i in range(n_c8):
            await c.search(queries[(offset + i) % len(queries)], k=10)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c, 37 * i) for i, c in enumerate(clients)))
    results["throughput_ops_s_c8"] = 8 * n_c8 / (time.perf_counter() - t0)
    for c in clients + [client]:
        await c.close()

    # Baseline: bare aioquic echo of the same size.
    payload = bytes(payload_bytes)
    async with client_connection(echo_port, echo_ca) as echo:
        for _ in range(30):
            await echo.echo(payload)
        samples = []
        for _ in queries:
            t0 = time.perf_counter()
            await echo.echo(payload)
            samples.append(time.perf_counter() - t0)
    results["echo_p50_ms"] = percentile_ms(samples, 50)
    results["search_vs_echo_ratio"] = results["search_p50_ms"] / results["echo_p50_ms"]
    return results


def main() -> None:
    args = parse_args("rpc", __doc__.splitlines()[0])
    console = Console()
    n_items = 20_000 if args.quick else 100_000
    n_queries = 300 if args.quick else 1000
    n_c8 = 40 if args.quick else 150
    rng = random.Random(3)
    queries = [task_query(rng) for _ in range(n_queries)]
    metrics: dict[str, float | int | bool] = {"n_items": n_items}
    with tempfile.TemporaryDirectory(prefix="rayflow-rpc-bench-") as tmp:
        state = Path(tmp) / "hub"
        texts = lesson_texts(n_items, seed=1)
        vectors = HashingEmbedder().embed([f"{t.title}\n{t.description}\n{t.content}" for t in texts])
        bank, _ = build_bank(state, texts, vectors, console, f"{n_items} items")
        bank.close()

        # In-process baseline on the same bank, before the hub owns it.
        config = load_config({"state_dir": state}, env={})
        with ReasoningBank(state, config=config) as inproc:
            for q in queries[:30]:
                inproc.retrieve(TENANT, q, k=10)
            samples = []
            for q in queries:
                t0 = time.perf_counter()
                inproc.retrieve(TENANT, q, k=10)
                samples.append(time.perf_counter() - t0)
        metrics["inproc_search_p50_ms"] = percentile_ms(samples, 50)

        ring = KeyRing.load_or_create(signing_keys_path(state))
        issuer = TokenIssuer(ring)
        token = issuer.issue("bench-agent", TENANT, ["*"], READ_WRITE, ttl_s=3600)
        revocations = RevocationList(revocations_path(state))
        verifier = TokenVerifier(ring, issuer=issuer.issuer, audience=issuer.audience, revocations=revocations)
        verifier.verify(token)
        calls = 200_000
        metrics["jwt_check_us_amortized"] = timeit.timeit(lambda: verifier.verify(token), number=calls) / calls * 1e6
        verifier.clear_cache()
        metrics["jwt_check_us_uncached"] = timeit.timeit(
            lambda: (verifier.clear_cache(), verifier.verify(token)), number=200
        ) / 200 * 1e6
        revocations.close()

        console.print("starting the hub and the echo server")
        endpoint_file = state / "hub-endpoint.json"
        hub = start_process(
            [sys.executable, "-m", "rayflow", "hub", "serve", "--port", "0", "--state-dir", str(state)],
            lambda p: endpoint_file.exists(),
        )
        echo_port: list[int] = []

        def echo_ready(proc: subprocess.Popen) -> bool:
            line = proc.stdout.readline()
            if line.strip().isdigit():
                echo_port.append(int(line))
            return bool(echo_port)

        echo = start_process(
            [sys.executable, str(Path(__file__).with_name("quic_echo.py")), str(Path(tmp) / "echo-tls")], echo_ready
        )
        try:
            endpoint = json.loads(endpoint_file.read_text())
            ca_pem = Path(endpoint["ca"]).read_bytes()
            echo_ca = (Path(tmp) / "echo-tls" / "ca.pem").read_bytes()
            results = asyncio.run(measure(endpoint, ca_pem, token, echo_port[0], echo_ca, queries, n_c8))
            metrics.update(results)
        finally:
            for proc in (hub, echo):
                proc.terminate()
                proc.wait(timeout=60)
    for key, value in list(metrics.items()):
        if isinstance(value, float):
            metrics[key] = round(value, 4)
    metrics["meets_search_p50"] = metrics["search_p50_ms"] <= 1.5
    metrics["meets_search_p99"] = metrics["search_p99_ms"] <= 5.0
    metrics["meets_echo_ratio"] = metrics["search_vs_echo_ratio"] <= 2.0
    metrics["meets_zero_rtt_ratio"] = metrics["zero_rtt_ratio"] <= 0.6
    metrics["meets_jwt_check"] = metrics["jwt_check_us_amortized"] <= 10.0
    write_result("rpc", args.quick, metrics, args.out, console)


if __name__ == "__main__":
    main()
