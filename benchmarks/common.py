"""What every benchmark shares: argument parsing, machine description, percentiles, the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(name: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="CI-sized run (under 3 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON result file")
    return parser.parse_args()


def machine() -> dict[str, Any]:
    """Enough about the machine to tell two result files apart."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "processor": platform.processor() or platform.machine(),
    }


def percentile_ms(samples_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s) * 1000.0, q))


def write_result(name: str, quick: bool, metrics: dict[str, Any], out: Path, console: Console) -> None:
    """Print the metrics as a table and write the contract's JSON document."""
    table = Table(title=f"benchmark: {name}{' (quick)' if quick else ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "quick": quick, "machine": machine(), "metrics": metrics}
    out.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {out}")
