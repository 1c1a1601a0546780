"""The Export preview at scale: `plan_workspace_export` on a synthetic 100,000-image workspace.

The workspace is built like ``bench/scale.py`` builds its own (image rows in the images table,
no files: planning never opens a file; synthetic vectors stored with `save_vectors`, here
16-d so clustering is quick), clustered with k=20 and labeled with `labels.start_session`.
Then, in one process:

* baseline: `labels.current_labels` (the labels reader the plan is built on: its floor);
* ``plan_workspace_export`` with the default options and with a 0.8/0.2 split (median of 3);
* ``export_warnings`` on that plan;
* the per-row ``Workspace.source_path`` the plan used before (one SQLite connection per row),
  timed on 5,000 rows and extrapolated to N, for the ratio.

With ``--workspace PATH`` the same calls are timed on an existing labeled workspace (e.g.
the 1M one ``bench/million.py`` builds; copy it first, the bench only reads it).

Usage::

    python bench/export_plan.py [--n 100000] [--workspace PATH]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scale import image_rows_workspace  # bench/ is on sys.path: run as `python bench/...`

from imgcluster import labels
from imgcluster.clustering import cluster
from imgcluster.export import export_warnings, plan_workspace_export
from imgcluster.features import save_vectors
from imgcluster.workspace import Workspace

BACKBONE = "synthetic"
DIM = 16
#: Issue 11 / 15: the preview under 1 s at 100k images, under 5 s at 1M.
TARGET_SECONDS = 1.0
TARGET_SECONDS_1M = 5.0


def build_workspace(folder: Path, n: int, *, k: int = 20, seed: int = 0) -> Workspace:
    """``n`` image rows, their vectors, one clustering run and a labeling session."""
    ws, shas = image_rows_workspace(folder, n)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, DIM))
    vectors = centres[rng.integers(k, size=n)] + 0.3 * rng.normal(size=(n, DIM))
    save_vectors(ws, BACKBONE, shas, vectors.astype(np.float32))
    run = cluster(ws, BACKBONE, k)
    labels.start_session(ws, run.id, actor="bench")
    return ws


#: CPU seconds of each timed call, by name (wall time is unreliable on a shared, busy machine).
CPU: dict[int, float] = {}


def median_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Median wall seconds of ``repeat`` calls (their median CPU seconds go to `CPU`)."""
    times, cpu, value = [], [], None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU[len(CPU)] = statistics.median(cpu)
    return statistics.median(times), value


def run(n: int, folder: Path, existing: Path | None = None) -> list[tuple[str, float]]:
    start = time.perf_counter()
    if existing is None:
        ws = build_workspace(folder, n)
        print(
            f"setup: {n:,} images labeled in {time.perf_counter() - start:.1f} s", file=sys.stderr
        )
    else:
        ws = Workspace(existing)
        n = ws.image_counts()["ok"]
    rows: list[tuple[str, float]] = []
    base, current = median_time(lambda: labels.current_labels(ws))
    rows.append(("baseline: labels.current_labels", base))
    seconds, plan = median_time(lambda: plan_workspace_export(ws))
    rows.append(("plan_workspace_export (default options)", seconds))
    assert existing is not None or plan.n_files == n, plan.n_files
    seconds, split_plan = median_time(lambda: plan_workspace_export(ws, split="0.8,0.2"))
    rows.append(("plan_workspace_export (split 0.8,0.2)", seconds))
    seconds, _ = median_time(lambda: export_warnings(split_plan))
    rows.append(("export_warnings(plan)", seconds))
    sample = [row.relpath for row in current[:5000]]
    seconds, _ = median_time(lambda: [ws.source_path(r) for r in sample], repeat=1)
    rows.append(
        (
            f"old: Workspace.source_path per row, x{n / len(sample):.0f} from 5,000",
            seconds * n / len(sample),
        )
    )
    return rows


def _scale(name: str) -> float:
    """The old per-row reader is timed on 5,000 rows and extrapolated."""
    return float(name.rsplit(" x", 1)[1].split()[0]) if name.startswith("old:") else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of images")
    parser.add_argument(
        "--workspace", type=Path, help="time an existing labeled workspace instead (only read)"
    )
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="imgcluster-export-plan-"))
    try:
        rows = run(args.n, folder, args.workspace)
        if args.workspace is not None:
            args.n = Workspace(args.workspace).image_counts()["ok"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0][1]
    print(f"\n{args.n:,} labeled images; baseline = labels.current_labels ({base:.3f} s)\n")
    print("| operation | seconds | x baseline | CPU seconds |")
    print("|---|---:|---:|---:|")
    for i, (name, seconds) in enumerate(rows):
        print(f"| {name} | {seconds:.3f} | {seconds / base:.1f} | {CPU[i] * _scale(name):.3f} |")
    plan_seconds = max(s for name, s in rows if name.startswith("plan_"))
    target = TARGET_SECONDS if args.n <= 100_000 else TARGET_SECONDS_1M
    print(f"\nslowest plan {plan_seconds:.3f} s (target < {target:.0f} s)")
    return 0 if plan_seconds < target else 1


if __name__ == "__main__":
    sys.exit(main())
