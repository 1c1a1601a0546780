"""Ingest and extraction on a Ray cluster (the optional ``imgcluster[ray]`` extra).

The per-image work (validate, hash and thumbnail at ingest; decode and run the network at
extraction) is what grows with a catalogue, so that is what goes to the cluster; everything
else stays with the workspace on the app's machine. The driver (the process that runs
``imgcluster ingest/extract --engine ray``) lists the work into a Parquet manifest, Ray Data
runs it in a pool of actors, and the results stream back block by block; the driver commits
each block into the workspace through the same library functions the local path uses
(`imgcluster.images.commit_examined`, `imgcluster.features.save_vectors`), so the workspace
cannot tell which engine filled it.

Nothing here imports Ray until a function is called: ``import imgcluster`` and the local
engine never load it.

Workers read the photos by path: every node must see the collection folder at the same path
(a shared or replicated filesystem), and have imgcluster installed. The workspace itself is
only ever touched by the driver.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgcluster.errors import ImgclusterError

if TYPE_CHECKING:
    from imgcluster.distributed.ray_engine import JobStats
    from imgcluster.features import ExtractReport, Weights
    from imgcluster.images import IngestReport, Progress
    from imgcluster.workspace import Workspace

#: Engines the CLI accepts.
ENGINES: tuple[str, ...] = ("local", "ray")

__all__ = ["ENGINES", "RayUnavailable", "ray_extract", "ray_ingest"]


class RayUnavailable(ImgclusterError):
    """Ray is not installed, or the cluster at the given address cannot be reached."""


def ray_ingest(
    workspace: Workspace,
    root: str | os.PathLike[str],
    *,
    address: str | None = None,
    progress: Progress | None = None,
    batch_size: int = 64,
    max_actors: int | None = None,
) -> IngestReport:
    """`imgcluster.images.ingest` with the per-file work on a Ray cluster.

    Parameters
    ----------
    workspace : Workspace
    root : path
        The image collection; every Ray node must see it at this path.
    address : str, optional
        A Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); default: the one in
        ``RAY_ADDRESS`` or else a Ray instance started on this machine for the job.
    progress : callable(done, total), optional
        Called after each committed block, with counts of files.
    batch_size : int, default=64
        Files per block: per actor call, and per committed transaction. A killed job loses at
        most the blocks in flight.
    max_actors : int, optional
        Largest actor pool; default: one actor per CPU of the cluster.

    Returns
    -------
    IngestReport
        As `imgcluster.images.ingest` would return.

    Raises
    ------
    RayUnavailable
        Ray is missing or the cluster cannot be reached.
    """
    from imgcluster.distributed import ray_engine

    return ray_engine.ingest(
        workspace,
        root,
        address=address,
        progress=progress,
        batch_size=batch_size,
        max_actors=max_actors,
    )


def ray_extract(
    workspace: Workspace,
    backbone: str | None = None,
    *,
    address: str | None = None,
    batch_size: int = 32,
    weights: Weights = "default",
    runtime: str = "auto",
    nearest_resize: bool = False,
    flip: bool = False,
    progress: Progress | None = None,
    max_actors: int | None = None,
    cpus_per_actor: int = 1,
    stats: JobStats | None = None,
) -> ExtractReport:
    """`imgcluster.features.extract` with decoding and the network on a Ray cluster.

    Each actor loads the (converted) network once and then runs block after block through
    `imgcluster.features.embed_contents`, the local path's per-batch step, so the vectors are
    the local ones.

    Parameters
    ----------
    workspace : Workspace
    backbone : str, default=imgcluster.backbones.DEFAULT_BACKBONE
        A backbone or a fusion (``"a+b"``: each member's vectors stored under its name).
    address : str, optional
        As for `ray_ingest`.
    batch_size : int, default=32
        Images per block: per actor call and per stored shard.
    weights, runtime, nearest_resize, flip
        As for `imgcluster.features.FeatureExtractor`.
    progress : callable(done, total), optional
        Called after each committed block, with counts of distinct contents.
    max_actors : int, optional
        Largest actor pool; default: the cluster's CPUs / ``cpus_per_actor``.
    cpus_per_actor : int, default=1
        CPUs each actor reserves; it runs that many interpreters.
    stats : ray_engine.JobStats, optional
        Filled in with where the time went (bench/ray_extract.py).

    Returns
    -------
    ExtractReport
        As `imgcluster.features.extract` would return.

    Raises
    ------
    RayUnavailable
        Ray is missing or the cluster cannot be reached.
    FeaturesMismatch
        The workspace (or a worker) has this backbone with other weights or resizing.
    """
    from imgcluster.backbones import DEFAULT_BACKBONE
    from imgcluster.distributed import ray_engine

    return ray_engine.extract(
        workspace,
        backbone or DEFAULT_BACKBONE,
        address=address,
        batch_size=batch_size,
        weights=weights,
        runtime=runtime,
        nearest_resize=nearest_resize,
        flip=flip,
        progress=progress,
        max_actors=max_actors,
        cpus_per_actor=cpus_per_actor,
        stats=stats,
    )
