"""Benchmark of the link emulator: the round-trip time it adds against what was asked for.

Run from the repository root, as root: ``python benchmarks/link_emulator.py [--quick] [--out FILE]``.

Real parts: the isolated cluster's network (:mod:`clusters.netns_fabric`: two node namespaces,
two region bridges, a router namespace with TUN devices) and the emulator process
(:mod:`clusters.link_emulator`) that every packet between the regions passes through. A UDP echo
server runs in one node's namespace, a client in the other's; each sample is one datagram's
round trip, sent one at a time at a steady rate (the rate the cluster's own traffic and the tests
use, and a ten times higher one).

The baseline, measured in the same run on the same path: the emulator with the link set to 0 ms
(``floor_p50_ms``): what the path costs with nothing asked for (veths, bridges, the TUN devices
and the emulator's own Python handling of each packet). The figure of merit is the *added error*:
``measured p50 - floor p50 - asked``, which the cluster promises to keep within 2 ms.

* ``rtt_<asked>_p50_ms`` / ``_p99_ms``: measured round trips for a link of ``asked`` ms;
* ``error_<asked>_ms``: the added error at that setting; ``max_abs_error_ms`` over every setting
  and rate; ``within_2ms``: whether all of them are within 2 ms;
* ``floor_p50_ms``: the baseline above;
* ``<...>_fast``: the same at the higher packet rate.

Writes ``benchmarks/results/link_emulator.json`` and a plot (``link_emulator.png``) of measured
against asked round-trip times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO_ROOT))

from common import parse_args, percentile_ms, write_result

from clusters import link_emulator, netns_fabric

NAME = "link_emulator"
SUBNET = "100.95.0.0/16"
PORT = 9977

def measure(fabric: netns_fabric.Fabric, count: int, interval_s: float) -> list[float]:
    us, eu = fabric.nodes
    out = subprocess.run(
        netns_fabric.run_in_node(
            us, [sys.executable, "-m", "clusters.udp_probe", "ping", eu.address, str(PORT), str(count), str(interval_s)]
        ),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=count * (interval_s + 1.5) + 30,
        check=True,
    ).stdout.split()
    return [float(x) for x in out if x != "lost"]


def plot(points: list[tuple[float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    asked = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(asked, asked, "--", color="grey", label="asked")
    ax.errorbar(asked, [p[1] for p in points], yerr=[[0] * len(points), [p[2] - p[1] for p in points]],
                fmt="o", capsize=4, label="measured above the floor (p50, bar to p99)")  # fmt: skip
    ax.set_xlabel("link round-trip time asked (ms)")
    ax.set_ylabel("round-trip time added (ms)")
    ax.set_title("link emulator: asked vs measured")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = parse_args(NAME, "Round-trip time the link emulator adds, against what was asked")
    console = Console()
    if os.geteuid() != 0:
        console.print("[red]needs root (network namespaces, TUN devices)[/red]")
        return 1
    settings = [0.0, 10.0, 40.0] if args.quick else [0.0, 5.0, 10.0, 40.0, 100.0, 200.0]
    count = 40 if args.quick else 200
    rates = {"": 0.02, "_fast": 0.002}  # 50 and 500 round trips a second
    fabric = netns_fabric.plan_fabric("rayflow-bench-link", [("us-west", 1), ("eu-central", 1)], SUBNET)
    netns_fabric.teardown(fabric.prefix)
    work = Path(tempfile.mkdtemp(prefix="rf-linkbench-"))
    spec_path, control = work / "spec.json", work / "control.sock"
    spec_path.write_text(json.dumps(fabric.emulator_spec([{"between": ["us-west", "eu-central"], "rtt_ms": 0}])))
    metrics: dict[str, float | bool | int] = {}
    emulator = server = None
    try:
        netns_fabric.apply(fabric)
        emulator = subprocess.Popen(
            ["ip", "netns", "exec", fabric.router_namespace, sys.executable, "-m", "clusters.link_emulator",
             "--spec", str(spec_path), "--control", str(control), "--ready-file", str(work / "ready")],
            cwd=REPO_ROOT,
        )  # fmt: skip
        while not (work / "ready").exists():
            if emulator.poll() is not None:
                raise RuntimeError("the link emulator did not start")
            time.sleep(0.05)
        server = subprocess.Popen(
            netns_fabric.run_in_node(fabric.nodes[1], [sys.executable, "-m", "clusters.udp_probe", "serve", str(PORT)]),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        measure(fabric, 10, 0.01)  # warm-up: ARP, caches
        samples: dict[tuple[float, str], list[float]] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("measuring", total=len(settings) * len(rates))
            for asked in settings:
                link_emulator.control_request(
                    control, {"op": "set", "between": ["us-west", "eu-central"], "rtt_ms": asked}
                )
                for suffix, interval in rates.items():
                    progress.update(task, description=f"link {asked:g} ms, {1 / interval:.0f} round trips/s")
                    samples[(asked, suffix)] = measure(fabric, count, interval)
                    progress.advance(task)
        errors = []
        points = []
        for suffix in rates:
            floor = percentile_ms(samples[(0.0, suffix)], 50)
            metrics[f"floor_p50_ms{suffix}"] = round(floor, 3)
            for asked in settings:
                got = samples[(asked, suffix)]
                p50, p99 = percentile_ms(got, 50), percentile_ms(got, 99)
                key = f"{asked:g}"
                metrics[f"rtt_{key}_p50_ms{suffix}"] = round(p50, 3)
                metrics[f"rtt_{key}_p99_ms{suffix}"] = round(p99, 3)
                metrics[f"lost_{key}{suffix}"] = count - len(got)
                if asked > 0:
                    error = p50 - floor - asked
                    metrics[f"error_{key}_ms{suffix}"] = round(error, 3)
                    errors.append(error)
                    if not suffix:
                        points.append((asked, p50 - floor, p99 - floor))
        metrics["max_abs_error_ms"] = round(max(abs(e) for e in errors), 3)
        metrics["within_2ms"] = all(abs(e) <= 2.0 for e in errors)
        metrics["samples_per_setting"] = count
        png = args.out.with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(points, png)
        console.print(f"plot: {png}")
    finally:
        for process in (server, emulator):
            if process is not None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
        netns_fabric.teardown(fabric.prefix)
    write_result(NAME, args.quick, metrics, args.out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
