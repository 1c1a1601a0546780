"""Everything after extraction at 1M images on one machine (issue 15 §3 and the library half of §4).

Opens a synthetic workspace (image rows + L2-normalised 1280-d vectors in Gaussian blobs, in
shards of 10,000, as ``bench/scale.py`` builds them: ``--workspace DIR`` is copied first, or
``--build N`` builds one), then, in this one process, the library calls the app makes:

* ``cluster k=K`` (first: load, PCA space fitted on a sample and applied to all, fit, store),
  and k changes (the slider: the space is memoised);
* the 2-D map (`get_projection`: the PCA map at once), `density_image` of it, `point_sample`
  for hover and `select_box` over a box holding ~10% of the points (every image inside);
* ``start labeling`` (H1's area, timed for the export's sake) and the Export page's preview
  (`plan_workspace_export` + `export_warnings`);
* with ``--umap``: the refined clustering space and the 2-D UMAP map as the background worker
  makes them (fitted on a sample, the rest placed), and a k change in the refined space.

Peak RSS is ``ru_maxrss`` of this process (target < 8 GB); the load average is printed at the
start and the end, since the 2 cores are shared.

Usage::

    python bench/million.py --workspace /tmp/ws1m [--k 20] [--k2 25] [--umap]
    python bench/million.py --build 200000 [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgcluster.workspace import Workspace

BACKBONE = "synthetic"
RSS_LIMIT_GB = 8.0
TARGETS = {"k change": 10.0, "export preview": 5.0}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        cpu0, start = time.process_time(), time.perf_counter()
        value = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
        self.rows.append((name, seconds, cpu, peak_rss_gb()))
        print(f"  {name:48s} {seconds:8.3f} s  cpu {cpu:7.2f}  rss {peak_rss_gb():.2f}", flush=True)
        return value

    def print(self, n: int) -> None:
        print(f"\n{n:,} images\n")
        print("| operation | wall (s) | CPU (s) | peak RSS so far (GB) |")
        print("|---|---:|---:|---:|")
        for name, seconds, cpu, rss in self.rows:
            print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {rss:.2f} |")
        print(f"\npeak RSS {peak_rss_gb():.2f} GB (limit {RSS_LIMIT_GB:.0f} GB)")


def open_workspace(args: argparse.Namespace, folder: Path) -> Workspace:
    if args.workspace is not None:
        target = folder / "ws"
        shutil.copytree(args.workspace, target)
        return Workspace(target)
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import build_workspace

    return build_workspace(folder, args.build)


def run(ws: Workspace, args: argparse.Namespace, table: Table) -> int:
    from imgcluster import labels
    from imgcluster.clustering import cluster
    from imgcluster.export import export_warnings, plan_workspace_export
    from imgcluster.projection import density_image, get_projection, point_sample, select_box

    first = table.time(
        f"cluster k={args.k} (first: PCA space + fit + store)",
        lambda: cluster(ws, BACKBONE, args.k),
    )
    n = len(first.image_ids)
    for k in (args.k2, args.k2 + 5):
        table.time(f"k change: cluster k={k}", lambda k=k: cluster(ws, BACKBONE, k))
    table.time(f"stored run again: cluster k={args.k}", lambda: cluster(ws, BACKBONE, args.k))
    proj = table.time(
        "2-D map: get_projection (PCA map, first)", lambda: get_projection(ws, BACKBONE)
    )
    table.time("2-D map: get_projection (stored)", lambda: get_projection(ws, BACKBONE))
    table.time("density_image 512x512", lambda: density_image(proj.coords))
    table.time("point_sample 1,500", lambda: point_sample(len(proj.coords), 1_500))
    x0, x1 = np.quantile(proj.coords[:, 0], [0.3, 0.6]).tolist()
    y0, y1 = np.quantile(proj.coords[:, 1], [0.3, 0.6]).tolist()
    inside = table.time(
        "select_box (every image inside)", lambda: select_box(proj, (x0, x1), (y0, y1))
    )
    print(f"    box holds {len(inside):,} images")
    table.time(
        "start labeling (H1's area)", lambda: labels.start_session(ws, first.id, actor="bench")
    )

    def preview() -> None:
        plan = plan_workspace_export(ws)
        export_warnings(plan, labels.progress(ws))

    table.time("export preview (plan + warnings)", preview)
    table.time("export preview again", preview)
    table.time("export preview, split 0.8/0.2", lambda: plan_workspace_export(ws, split="0.8,0.2"))
    if args.umap:
        from imgcluster import spaces

        table.time(
            "refined space (10-d UMAP, worker's job)",
            lambda: spaces.compute_space(ws, BACKBONE, spaces.REFINED),
        )
        table.time(
            "2-D UMAP map (worker's job)",
            lambda: spaces.compute_space(ws, BACKBONE, spaces.MAP_UMAP),
        )
        table.time(
            f"refined: cluster k={args.k}", lambda: cluster(ws, BACKBONE, args.k, preprocess="umap")
        )
        table.time(
            f"refined: k change k={args.k2}",
            lambda: cluster(ws, BACKBONE, args.k2, preprocess="umap"),
        )
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workspace", type=Path, help="a synthetic workspace to copy and open")
    source.add_argument("--build", type=int, help="build a synthetic workspace of N images")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--k2", type=int, default=25)
    parser.add_argument("--umap", action="store_true", help="also the refined space and UMAP map")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="imgcluster-million-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {load()}", flush=True
    )
    table = Table()
    try:
        ws = table.time("setup: open the workspace", lambda: open_workspace(args, folder))
        n = run(ws, args, table)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    table.print(n)
    print(f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average {load()}")
    return 1 if peak_rss_gb() >= RSS_LIMIT_GB else 0


if __name__ == "__main__":
    sys.exit(main())
