"""The `imgcluster` command: the library's steps, headless, for big batches and scripts.

Exit codes: 0 success, 1 failure (an `ImgclusterError`, printed as one line), 2 bad arguments
(click's usage errors). User errors never print a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from imgcluster.errors import ImgclusterError
from imgcluster.workspace import Workspace

workspace_option = click.option(
    "--workspace",
    "-w",
    "workspace_path",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Workspace folder (one labeling project).",
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
@click.argument(
    "image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@workspace_option
def ingest(image_dir: Path, workspace_path: Path) -> None:
    """Scan IMAGE_DIR, validate every image, make thumbnails; re-runs add only new files."""
    from imgcluster.images import ingest as ingest_images

    ws = Workspace(workspace_path, create=True)
    with progress_bar("ingest") as bar:
        report = ingest_images(ws, image_dir, progress=bar)
    click.echo(f"found      {report.found}")
    click.echo(f"ok         {report.ok}")
    click.echo(f"new        {report.new}   changed {report.changed}   unchanged {report.unchanged}")
    click.echo(f"duplicates {report.duplicates}")
    click.echo(f"missing    {report.missing}")
    click.echo(f"skipped    {report.n_skipped}")
    for reason, count in sorted(report.skipped.items()):
        click.echo(f"  {count:6d}  {reason}")
    if report.ok == 0:
        raise click.ClickException(f"no usable image found in {image_dir}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="imgcluster")


if __name__ == "__main__":
    main()
