"""The app's cached readers are keyed on what they depend on: the image table follows the images
(ingest), not the revision that every write (a label move, a rename) bumps, and never goes
stale."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from imgcluster_app import common


def _photos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (24, 16), (40 * i % 256, 90, 200)).save(folder / name)


def test_image_rows_follow_ingest_not_other_writes(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _photos(photos, ["a.png", "b.png", "c.png"])
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, photos)
    path = str(ws.path)
    rows = common.image_rows_by_id(*common.ws_key(ws))
    assert sorted(rel for rel, _sha in rows.values()) == ["a.png", "b.png", "c.png"]
    # Any other write (labels, runs, settings) bumps the revision: the rows are not read again.
    revision = ws.revision
    with ws.transaction():
        pass
    assert ws.revision != revision
    assert common.image_rows_by_id(path, ws.revision) is rows
    # A new photo ingested is in the rows at once (the images' fingerprint changed).
    _photos(photos, ["a.png", "b.png", "c.png", "d.png"])
    ingest(ws, photos)
    again = common.image_rows_by_id(path, ws.revision)
    assert sorted(rel for rel, _sha in again.values()) == ["a.png", "b.png", "c.png", "d.png"]
    assert [i for i, _rel, _sha in common.image_rows(path, ws.revision)] == sorted(again)
