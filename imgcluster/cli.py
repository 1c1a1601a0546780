"""The `imgcluster` command: the library's steps, headless, for big batches and scripts.

Exit codes: 0 success, 1 failure (an `ImgclusterError`, printed as one line), 2 bad arguments
(click's usage errors). User errors never print a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from imgcluster import settings
from imgcluster.backbones import DEFAULT_BACKBONE
from imgcluster.clustering import ALGORITHMS, K_MAX, K_MIN, PREPROCESSING
from imgcluster.errors import ImgclusterError
from imgcluster.export import FORMAT_CHOICES, MODES
from imgcluster.features import RUNTIMES
from imgcluster.images import IngestReport
from imgcluster.labels import ORDERS
from imgcluster.workspace import Workspace

workspace_option = click.option(
    "--workspace",
    "-w",
    "workspace_path",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Workspace folder (one labeling project).",
)
#: Where the per-image work runs (`ingest`, `extract`).
engine_option = click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: run the per-image work on a Ray cluster (needs imgcluster[ray]).",
)
address_option = click.option(
    "--address", default=None, help="Ray cluster address (--engine ray; default: local)."
)


class _Group(click.Group):
    """Turns library errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ImgclusterError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # A database damaged after it opened (bit flips in a page read later).
            where = _workspace_arg(ctx) or "the workspace"
            raise click.ClickException(
                f"workspace database in {where} is damaged ({type(exc).__name__}: "
                f"{str(exc)[:120]}); run `imgcluster check --workspace {where}`"
            ) from None
        except OSError as exc:
            raise click.ClickException(_os_message(exc)) from None


def _workspace_arg(ctx: click.Context) -> str | None:
    """The ``--workspace`` value on the command line being run, if any."""
    args = [*getattr(ctx, "_protected_args", []), *ctx.args]
    for i, arg in enumerate(args):
        if arg in ("--workspace", "-w") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--workspace="):
            return arg.split("=", 1)[1]
    return None


def _os_message(exc: OSError) -> str:
    """One line for an operating-system error nobody turned into a library error."""
    what = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = {
        errno.ENOSPC: "free some disk space and run the command again",
        errno.EDQUOT: "free some disk space and run the command again",
        errno.EROFS: "the folder is read-only: choose a writable one",
        errno.EACCES: "check the permissions",
        errno.ENOENT: "check the path",
    }.get(exc.errno or 0, "check the path and try again")
    return f"{what.lower()}{where}; {hint}"


@click.group(cls=_Group)
@click.version_option(package_name="imgcluster")
def cli() -> None:
    """Cluster product photos by CNN features and turn the clusters into a labeled dataset."""


@contextlib.contextmanager
def progress_bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A `(done, total)` callback drawing a tqdm bar on stderr (hidden when not a terminal)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="img", disable=None, file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def open_workspace(path: Path) -> Workspace:
    return Workspace(path)


@cli.command()
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@workspace_option
@engine_option
@address_option
def ingest(image_dir: Path, workspace_path: Path, engine: str, address: str | None) -> None:
    """Scan IMAGE_DIR, validate every image, make thumbnails; re-runs add only new files."""
    from imgcluster.images import ingest as ingest_images

    ws = Workspace(workspace_path, create=True)
    with progress_bar("ingest") as bar:
        if engine == "ray":
            from imgcluster.distributed import ray_ingest

            report = ray_ingest(ws, image_dir, address=address, progress=bar)
        else:
            report = ingest_images(ws, image_dir, progress=bar)
    _print_ingest(report)
    if report.ok == 0:
        raise click.ClickException(f"no usable image found in {image_dir}")


def _print_ingest(report: IngestReport) -> None:
    click.echo(f"found      {report.found}")
    click.echo(f"ok         {report.ok}")
    click.echo(f"new        {report.new}   changed {report.changed}   unchanged {report.unchanged}")
    click.echo(f"duplicates {report.duplicates}")
    notes = []
    if report.missing:
        notes.append("gone from the folder; their labels are kept until they come back")
    if report.returned:
        notes.append(f"came back: {report.returned}, with their labels")
    click.echo(f"missing    {report.missing}" + (f"   ({'; '.join(notes)})" if notes else ""))
    click.echo(f"skipped    {report.n_skipped}")
    for reason, count in sorted(report.skipped.items()):
        click.echo(f"  {count:6d}  {reason}")
    if report.n_ignored:
        click.echo(f"not considered {report.n_ignored}")
        for reason, count in sorted(report.ignored.items()):
            click.echo(f"  {count:6d}  {reason}")
    for folder, why in report.skipped_folders:
        click.echo(f"skipped folder {folder}: {why}")
    if report.cleaned:
        click.echo(f"cleaned    {report.cleaned} temporary files left by an interrupted ingest")


def _split_option(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    from imgcluster.errors import ExportError
    from imgcluster.export import parse_split

    try:
        return parse_split(value)
    except ExportError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(name="export")
@click.argument("out", type=click.Path(path_type=Path))
@workspace_option
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="copy",
    show_default=True,
    help="copy: verified 0644 files (default). hardlink / symlink: no extra space, but they "
    "expose the source as it is (its content and mode bits, even if it changes later); "
    "symlinks hold absolute paths.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(FORMAT_CHOICES),
    default="auto",
    show_default=True,
    help="auto: JPEG/PNG/GIF/BMP as they are, every other format re-encoded as PNG "
    "(lossless), each named by its content; png/jpeg: every file in that format; "
    "keep: files as they are (keras skips .webp, .tif...).",
)
@click.option(
    "--split",
    callback=_split_option,
    help="Stratified train,val[,test] proportions, e.g. 0.8,0.2 -> OUT/train, OUT/val.",
)
@click.option(
    "--random-state",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the split.",
)
@click.option("--confirmed-only", is_flag=True, help="Only images whose label was confirmed.")
@click.option(
    "--include-unsure/--exclude-unsure",
    default=False,
    show_default=True,
    help="Whether images marked unsure are exported with their label.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT once the new export is complete.")
@click.option("--zip", "make_zip", is_flag=True, help="Also write OUT.zip beside OUT.")
def export(
    out: Path,
    workspace_path: Path,
    mode: str,
    image_format: str,
    split: tuple[float, ...] | None,
    random_state: int,
    confirmed_only: bool,
    include_unsure: bool,
    overwrite: bool,
    make_zip: bool,
) -> None:
    """Write the labeled images to OUT/<label>/ (with manifest.csv, left_out.csv, labels.json).

    Every file is checked against the content that was ingested; a changed or missing file
    is left out and listed in left_out.csv.
    """
    from imgcluster.export import export_workspace, zip_export

    ws = open_workspace(workspace_path)
    with progress_bar("export") as bar:
        result = export_workspace(
            ws,
            out,
            mode=mode,
            split=split,
            random_state=random_state,
            confirmed_only=confirmed_only,
            include_unsure=include_unsure,
            overwrite=overwrite,
            progress=bar,
            format=image_format,
        )
    columns = result.splits or ("all",)
    click.echo(f"{'label':30s} {'folder':30s} " + " ".join(f"{c:>6s}" for c in columns))
    for label, per_split in result.counts.items():
        counts = " ".join(f"{per_split[c]:6d}" for c in columns)
        click.echo(f"{label:30s} {result.folders[label]:30s} {counts}")
    click.echo(f"{result.n_files} images exported ({result.mode}) to {result.out}")
    for reason, count in sorted(result.left_out.items()):
        click.echo(f"left out   {count:6d}  {reason}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if make_zip:
        click.echo(f"zip        {zip_export(result.out)}")


@cli.command()
@workspace_option
@click.option(
    "--backbone",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="CNN backbone (efficientnet-lite0/1/2, vgg16, resnet50, efficientnetb0, ...), or a "
    "fusion of several joined by + (efficientnet-lite0+efficientnet-lite2: best quality).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Images per stored batch; an interrupted run loses at most one.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Local weights file instead of the backbone's pretrained ImageNet weights.",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    help="tflite: converted once and cached, fastest on CPU; keras: fallback.",
)
@click.option(
    "--nearest-resize",
    is_flag=True,
    help="Resize with NEAREST like the original VGG16 recipe (only to reproduce it).",
)
@click.option(
    "--flip",
    is_flag=True,
    help="Test-time flip: average each vector with its mirror image's (twice the time).",
)
@engine_option
@address_option
def extract(
    workspace_path: Path,
    backbone: str,
    batch_size: int,
    weights: Path | None,
    runtime: str,
    nearest_resize: bool,
    flip: bool,
    engine: str,
    address: str | None,
) -> None:
    """Compute CNN feature vectors of the ingested images; re-runs compute only what is new."""
    from imgcluster.features import extract as extract_features

    ws = open_workspace(workspace_path)
    if engine == "ray":
        import functools

        from imgcluster.distributed import ray_extract

        extract_features = functools.partial(ray_extract, address=address)
    with progress_bar(f"extract {backbone}") as bar:
        report = extract_features(
            ws,
            backbone,
            batch_size=batch_size,
            weights=weights or "default",
            progress=bar,
            runtime=runtime,
            nearest_resize=nearest_resize,
            **({"flip": True} if flip else {}),
        )
    for shard, problem in getattr(report, "repaired", []):
        click.echo(f"recomputed the vectors of damaged shard {shard}: {problem}", err=True)
    click.echo(f"images     {report.total}")
    click.echo(f"extracted  {report.extracted}   shared by duplicates {report.shared}")
    click.echo(f"reused     {report.reused}")
    click.echo(f"failed     {len(report.failed)}")
    for reason, count in sorted(report.failure_counts().items()):
        click.echo(f"  {count:6d}  {reason}")
    for relpath, reason in report.failed[:20]:
        click.echo(f"  {relpath}: {reason}", err=True)
    if len(report.failed) > 20:
        click.echo(f"  ... and {len(report.failed) - 20} more", err=True)
    if report.extracted:
        click.echo(
            f"speed      {report.images_per_second:.1f} images/s ({report.runtime}; "
            f"model ready in {report.load_seconds:.1f} s)"
        )


@cli.command(name="cluster")
@workspace_option
@click.option(
    "--k", "k", type=click.IntRange(K_MIN, K_MAX), required=True, help="Number of clusters."
)
@click.option(
    "--backbone",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="Backbone whose extracted features are clustered.",
)
@click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default="auto",
    show_default=True,
    help="auto: exact KMeans up to 20,000 images, MiniBatchKMeans above.",
)
@click.option(
    "--random-state", type=int, default=0, show_default=True, help="Random state of k-means."
)
@click.option(
    "--preprocess",
    type=click.Choice(PREPROCESSING),
    default=None,
    help="Space to cluster in (default: the refined umap space, computed once per feature "
    "set with a progress bar; pca needs no wait).",
)
def cluster_command(
    workspace_path: Path,
    k: int,
    backbone: str,
    algorithm: str,
    random_state: int,
    preprocess: str | None,
) -> None:
    """Cluster the images by their features into K groups and print the cluster sizes.

    The run is stored in the workspace; the same request again returns it without recomputing.
    """
    from imgcluster.clustering import REFINED_PREPROCESS, cluster
    from imgcluster.spaces import REFINED, compute_space

    ws = open_workspace(workspace_path)
    if preprocess is None:  # the best space: the refined one, made once per feature set
        with progress_bar("refined space (once per feature set)") as bar:
            compute_space(ws, backbone, REFINED, progress=bar)
        preprocess = REFINED_PREPROCESS
    with progress_bar("cluster") as bar:
        run = cluster(
            ws,
            backbone,
            k,
            algorithm=algorithm,
            random_state=random_state,
            preprocess=preprocess,
            progress=bar,
        )
    misfits = run.misfits
    click.echo(
        f"run {run.id}: {len(run)} images, k={run.k}, {run.algorithm}, {run.preprocess}, "
        f"random_state {run.random_state}, {run.seconds:.2f} s, "
        f"mean silhouette {run.mean_silhouette:.3f}"
    )
    click.echo("cluster  images  misfits")
    for c, size in enumerate(run.sizes):
        click.echo(f"{c:7d}  {size:6d}  {int(misfits[run.labels == c].sum()):7d}")


@cli.command(name="suggest-k")
@workspace_option
@click.option(
    "--backbone",
    default=DEFAULT_BACKBONE,
    show_default=True,
    help="Backbone whose extracted features are used.",
)
@click.option("--min", "k_min", type=click.IntRange(K_MIN, K_MAX), default=K_MIN, show_default=True)
@click.option("--max", "k_max", type=click.IntRange(K_MIN, K_MAX), default=40, show_default=True)
@click.option(
    "--random-state", type=int, default=0, show_default=True, help="Random state of k-means."
)
def suggest_k_command(
    workspace_path: Path, backbone: str, k_min: int, k_max: int, random_state: int
) -> None:
    """Print silhouette and inertia for each k from MIN to MAX, and the best k.

    Higher silhouette = better separated clusters. The choice of k stays yours: pick one of
    the best few, or more clusters than classes and merge them while labeling.
    """
    from imgcluster.clustering import suggest_k

    if k_max < k_min:
        raise click.BadParameter(f"--max {k_max} is below --min {k_min}", param_hint="--max")
    with progress_bar("suggest-k") as bar:
        result = suggest_k(
            open_workspace(workspace_path),
            k_min,
            k_max,
            backbone=backbone,
            random_state=random_state,
            progress=bar,
        )
    click.echo("    k  silhouette  inertia  stability")
    rows = zip(result.ks, result.silhouette, result.inertia, result.stability, strict=True)
    for k, sil, inertia, stable in rows:
        mark = "  *" if result.best and k == result.best[0] else ""
        click.echo(f"{k:5d}  {sil:10.3f}  {inertia:7.4f}  {stable:9.2f}{mark}")
    click.echo(f"best k: {result.best[0]}   (next: {', '.join(map(str, result.best[1:]))})")
    click.echo(result.advice)


# -- labels -----------------------------------------------------------------------------------


def _default_actor() -> str:
    return settings.default_actor("cli")


actor_option = click.option(
    "--actor",
    default=_default_actor,
    show_default="$USER",
    help="Who is doing this (recorded in the audit log; undo/redo act on this actor's steps).",
)


def _applied(result: object) -> None:
    click.echo(getattr(result, "summary", result))


def _label_ref(text: str) -> int | str:
    """``#ID`` is a label id; anything else a name (the library refuses names like ``#5``,
    so the syntax never captures a label's name)."""
    from imgcluster.labels import looks_like_id

    return int(text.strip()[1:]) if looks_like_id(text) else text


@cli.group(name="labels")
def labels_group() -> None:
    """Turn clusters into labels: rename, merge, split, move, exclude, confirm, undo, history.

    Labels are referred to by name (case-insensitive) or as #ID; PATHs are relative to the
    image collection root. Every change is one transaction, audited and undoable; `start`
    begins labeling from the newest clustering run.
    """


@labels_group.command(name="start")
@workspace_option
@click.option("--run", "run_id", type=int, help="Clustering run id (default: the newest).")
@click.option("--replace", is_flag=True, help="Start over although labeling is active.")
@actor_option
def labels_start(workspace_path: Path, run_id: int | None, replace: bool, actor: str) -> None:
    """Start labeling: every cluster of the run becomes a label cluster_NN."""
    from imgcluster.clustering import run_info
    from imgcluster.labels import active_session, list_labels, start_session

    ws = open_workspace(workspace_path)
    session = start_session(ws, run_id, actor=actor, replace=replace)
    labels = list_labels(ws)
    n = sum(label.count for label in labels)
    run = run_info(ws, active_session(ws).run_id)
    click.echo(
        f"labeling session {session} from clustering run {run.id} (k={run.k}, {run.backbone}, "
        f"{run.preprocess}): {len(labels)} labels, {n} images"
    )


@labels_group.command(name="list")
@workspace_option
def labels_list(workspace_path: Path) -> None:
    """Labels with their image counts."""
    from imgcluster.labels import list_labels

    rows = list_labels(open_workspace(workspace_path))
    click.echo(
        f"{'id':>5s}  {'label':30s} {'images':>6s} {'confirmed':>9s} {'excluded':>8s} "
        f"{'unsure':>6s} {'misfits':>7s}"
    )
    for r in rows:
        click.echo(
            f"{r.id:5d}  {r.name:30s} {r.count:6d} {r.confirmed:9d} {r.excluded:8d} "
            f"{r.unsure:6d} {r.misfits:7d}"
        )


@labels_group.command(name="show")
@click.argument("label")
@workspace_option
@click.option("--limit", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default="typicality",
    show_default=True,
)
@click.option("--misfits", is_flag=True, help="Only images that look misplaced.")
def labels_show(
    label: str, workspace_path: Path, limit: int, offset: int, order: str, misfits: bool
) -> None:
    """Images of LABEL, most typical first (or only the likely misplaced ones)."""
    from imgcluster.labels import label_images, misplaced

    ws = open_workspace(workspace_path)
    if misfits:
        rows = misplaced(ws, _label_ref(label), limit)
    else:
        rows = label_images(ws, _label_ref(label), offset=offset, limit=limit, order=order)
    for r in rows:
        flags = ("confirmed " if r.confirmed else "") + ("" if r.state == "normal" else r.state)
        hint = f" looks like {r.nearest_other!r}" if r.misfit and r.nearest_other else ""
        distance = "-" if r.distance is None else f"{r.distance:.3f}"
        click.echo(f"{r.relpath}\t{distance}\t{flags.strip()}{hint}")


@labels_group.command(name="rename")
@click.argument("old")
@click.argument("new")
@workspace_option
@actor_option
def labels_rename(old: str, new: str, workspace_path: Path, actor: str) -> None:
    """Rename label OLD to NEW (free text, unique case-insensitively)."""
    from imgcluster.labels import rename

    _applied(rename(open_workspace(workspace_path), _label_ref(old), new, actor=actor))


@labels_group.command(name="merge")
@click.argument("labels", nargs=-1, required=True)
@click.option("--into", help="Resulting label: an existing one, or a new name for the first.")
@workspace_option
@actor_option
def labels_merge(
    labels: tuple[str, ...], into: str | None, workspace_path: Path, actor: str
) -> None:
    """Merge LABELS into one (the first, or --into)."""
    from imgcluster.labels import merge

    refs = [_label_ref(text) for text in labels]
    target = None if into is None else _label_ref(into)
    _applied(merge(open_workspace(workspace_path), refs, into=target, actor=actor))


@labels_group.command(name="split")
@click.argument("label")
@click.option("--n", "n", type=click.IntRange(min=2), required=True, help="Number of parts.")
@click.option("--random-state", type=int, default=0, show_default=True)
@workspace_option
@actor_option
def labels_split(label: str, n: int, random_state: int, workspace_path: Path, actor: str) -> None:
    """Split LABEL into N by KMeans over its unconfirmed images."""
    from imgcluster.labels import split

    ws = open_workspace(workspace_path)
    _applied(split(ws, _label_ref(label), n, random_state=random_state, actor=actor))


@labels_group.command(name="move")
@click.argument("paths", nargs=-1, required=True)
@click.option("--to", "to_label", required=True, help="Target label (created if new).")
@click.option("--no-create", is_flag=True, help="Refuse a target label that does not exist.")
@workspace_option
@actor_option
def labels_move(
    paths: tuple[str, ...], to_label: str, no_create: bool, workspace_path: Path, actor: str
) -> None:
    """Move images (PATHs relative to the collection root) to a label (marked "moved by hand",
    not confirmed: `confirm` confirms)."""
    from imgcluster.labels import move

    ws = open_workspace(workspace_path)
    _applied(move(ws, list(paths), _label_ref(to_label), create=not no_create, actor=actor))


def _state_command(name: str, state: str, doc: str) -> None:
    @labels_group.command(name=name, help=doc)
    @click.argument("paths", nargs=-1, required=True)
    @workspace_option
    @actor_option
    def command(paths: tuple[str, ...], workspace_path: Path, actor: str) -> None:
        from imgcluster.labels import set_state

        _applied(set_state(open_workspace(workspace_path), list(paths), state, actor=actor))


_state_command("exclude", "excluded", "Exclude images (PATHs) from export; they keep their label.")
_state_command("unsure", "unsure", "Mark images (PATHs) unsure, for review.")
_state_command("include", "normal", "Clear the excluded / unsure mark of images (PATHs).")


@labels_group.command(name="confirm")
@click.argument("label")
@workspace_option
@actor_option
def labels_confirm(label: str, workspace_path: Path, actor: str) -> None:
    """Confirm every (normal) image of LABEL."""
    from imgcluster.labels import confirm

    _applied(confirm(open_workspace(workspace_path), _label_ref(label), actor=actor))


@labels_group.command(name="delete")
@click.argument("label")
@workspace_option
@actor_option
def labels_delete(label: str, workspace_path: Path, actor: str) -> None:
    """Delete an empty LABEL."""
    from imgcluster.labels import delete_label

    _applied(delete_label(open_workspace(workspace_path), _label_ref(label), actor=actor))


def _workspace_step_command(name: str, operation: str, doc: str) -> None:
    """A `labels NAME` command that applies ``imgcluster.labels.<operation>(workspace, actor=)``.

    For the steps that take nothing but the workspace and the actor (one shape, one place).
    """

    @labels_group.command(name=name, help=doc)
    @workspace_option
    @actor_option
    def command(workspace_path: Path, actor: str) -> None:
        from imgcluster import labels

        _applied(getattr(labels, operation)(open_workspace(workspace_path), actor=actor))


_workspace_step_command("undo", "undo", "Undo the actor's newest step.")
_workspace_step_command("redo", "redo", "Redo the actor's most recently undone step.")
_workspace_step_command(
    "delete-empty",
    "delete_empty_labels",
    "Delete every label that holds no image (one undoable step).",
)


@labels_group.command(name="history")
@workspace_option
@click.option("--limit", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--actor", default=None, help="Only this actor's steps.")
def labels_history(workspace_path: Path, limit: int, actor: str | None) -> None:
    """The audit log, newest first: who did what, when."""
    from imgcluster.labels import history

    for h in history(open_workspace(workspace_path), limit, actor=actor):
        status = f" [{h.status}]" if h.status and h.status != "done" else ""
        click.echo(f"{h.id:6d}  {h.at}  {h.actor:12s} {h.summary}{status}")


@labels_group.command(name="recluster")
@click.option(
    "--new",
    "n_new",
    type=click.IntRange(min=0),
    required=True,
    help="Number of new clusters for the unconfirmed images.",
)
@click.option("--random-state", type=int, default=0, show_default=True)
@click.option(
    "--preprocess",
    type=click.Choice(PREPROCESSING),
    default=None,
    help="Space to re-cluster in (e.g. umap, the refined one); default: the session's.",
)
@workspace_option
@actor_option
def labels_recluster(
    n_new: int, random_state: int, preprocess: str | None, workspace_path: Path, actor: str
) -> None:
    """Re-cluster unconfirmed images around the existing labels plus --new new ones."""
    from imgcluster.labels import recluster_unconfirmed

    ws = open_workspace(workspace_path)
    applied = recluster_unconfirmed(
        ws, n_new, random_state=random_state, actor=actor, preprocess=preprocess
    )
    _applied(applied)


@labels_group.command(name="suggest")
@click.option("--k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@workspace_option
@actor_option
def labels_suggest(k: int, workspace_path: Path, actor: str) -> None:
    """Label new images (features, no label) like their nearest confirmed neighbours."""
    from imgcluster.labels import suggest_for_new_images

    rows = suggest_for_new_images(open_workspace(workspace_path), k=k, actor=actor)
    for r in rows:
        click.echo(f"{r.relpath}\t{r.label}\t{r.confidence:.2f}")
    click.echo(f"{len(rows)} new images got a suggested label (unconfirmed)")


@labels_group.command(name="gather")
@click.argument("label")
@workspace_option
@click.option("--limit", type=click.IntRange(min=1), default=60, show_default=True)
@click.option(
    "--accept",
    "accept",
    type=click.IntRange(min=0),
    default=0,
    help="Move the N most likely strays into LABEL (one undoable step).",
)
@actor_option
def labels_gather(label: str, workspace_path: Path, limit: int, accept: int, actor: str) -> None:
    """Images in other labels that look like LABEL, most likely first (kNN vote)."""
    from imgcluster.labels import accept_gathered, gather

    ws = open_workspace(workspace_path)
    strays = gather(ws, _label_ref(label), limit=max(limit, accept))
    for s in strays[:limit]:
        click.echo(f"{s.relpath}\t{s.label}\t{s.score:.2f}")
    click.echo(f"{len(strays)} images in other labels look like {label!r}")
    if accept and strays:
        chosen = strays[:accept]
        shown = {s.image_id: s.label_id for s in chosen}
        _applied(accept_gathered(ws, _label_ref(label), list(shown), actor=actor, expected=shown))


# -- workspace care ---------------------------------------------------------------------------


@cli.command(name="check")
@click.option(
    "--workspace",
    "-w",
    "workspace_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Workspace folder to check (nothing is changed without --repair).",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what loses nothing: a lost schema version, deleted thumbnails.",
)
def check_command(workspace_path: Path, repair: bool) -> None:
    """Check a workspace's database and files and say what to do (exit 1 if not whole)."""
    from imgcluster.check import check

    report = check(workspace_path, repair=repair)
    for fact in report.facts:
        click.echo(f"ok         {fact}")
    for done in report.repaired:
        click.echo(f"repaired   {done}")
    for problem in report.problems:
        click.echo(f"problem    {problem}")
    if not report.ok:
        raise click.ClickException(f"{len(report.problems)} problem(s) in {report.path}")
    click.echo(f"{report.path}: the workspace is whole")


@cli.command(name="relocate")
@workspace_option
@click.argument("new_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def relocate_command(workspace_path: Path, new_root: Path) -> None:
    """Point the workspace at its image folder's new place, checked by content hashes."""
    from imgcluster.images import relocate

    ws = open_workspace(workspace_path)
    with progress_bar("relocate") as bar:
        report = relocate(ws, new_root, progress=bar)
    click.echo(f"verified   {report.verified} images by content under {report.new_root}")
    if report.missing:
        click.echo(
            f"missing    {len(report.missing)} (marked missing by the next ingest; labels kept)"
        )
    click.echo(f"collection {report.old_root} -> {report.new_root}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="imgcluster")


if __name__ == "__main__":
    main()
