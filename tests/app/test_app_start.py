"""AppTest: the workspace picker and the Images page, on real folders (no CNN needed)."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from imgcluster.workspace import Workspace
from tests.app.conftest import APP, PROJECT

TIMEOUT = 120


def _app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_first_run_offers_the_sample_in_one_click(app_env: Path):
    at = _ok(_app().run())
    assert at.title[0].value == "imgcluster"
    _ok(at.button(key="start_sample").click().run())
    ws = Workspace(app_env / "sample")
    assert ws.image_counts()["ok"] == 120
    assert at.session_state["ws_path"] == str(ws.path)
    assert at.query_params["ws"] == "sample"
    assert "120 images" in at.success[0].value
    # A reload (fresh session, same URL) reopens the same workspace.
    again = _app()
    again.query_params["ws"] = "sample"
    _ok(again.run())
    assert again.session_state["ws_path"] == str(ws.path)
    _ok(again.switch_page("pages/images.py").run())
    assert [m.value for m in again.metric][:2] == ["120", "0"]
    assert len(again.image) == 48  # the first page of thumbnails
    assert again.query_params["ws"] == "sample"  # kept across page switches


def test_url_pointing_outside_is_refused(app_env: Path, tmp_path: Path):
    elsewhere = Workspace(tmp_path.parent / f"{tmp_path.name}-elsewhere", create=True)
    at = _app()
    at.query_params["ws"] = str(elsewhere.path)
    _ok(at.run())
    assert "ws_path" not in at.session_state
    assert "outside the folders" in at.sidebar.warning[0].value
    shutil.rmtree(elsewhere.path)


def test_server_folder_picker_creates_a_workspace_and_refuses_escapes(app_env: Path, tmp_path):
    at = _ok(_app().run())
    at.text_input(key="start_folder").input("../../../../etc")
    _ok(at.button(key="start_folder_create").click().run())
    assert "outside the folders" in at.error[0].value
    assert not (app_env / "etc").exists()

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), color).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    at.text_input(key="start_folder").input("photos")  # relative to the first allowed root
    at.text_input(key="start_folder_name").input("mine")
    _ok(at.button(key="start_folder_create").click().run())
    ws = Workspace(app_env / "mine")
    assert ws.collection_root == photos
    assert ws.image_counts()["ok"] == 3
    _ok(at.switch_page("pages/images.py").run())
    table = at.dataframe[0].value
    assert list(table["file"]) == ["broken.jpg"]
    assert "corrupt image" in table["reason"][0] or "not an image" in table["reason"][0]
    # New files in the folder are picked up by a rescan; nothing else is read again.
    Image.new("RGB", (40, 30), (9, 99, 199)).save(photos / "p9.png")
    _ok(at.button(key="images_rescan").click().run())
    assert ws.image_counts()["ok"] == 4
    assert "1 new, 0 changed, 4 unchanged" in at.success[0].value


def test_upload_zip_creates_a_workspace_with_only_safe_images(app_env: Path):
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(png, format="PNG")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("shoes/a.png", png.getvalue())
        zf.writestr("../escape.png", png.getvalue())
        zf.writestr("readme.txt", "hi")
    at = _ok(_app().run())
    at.file_uploader(key="start_upload_files").upload(
        "batch.zip", buf.getvalue(), "application/zip"
    )
    at.text_input(key="start_upload_name").input("uploaded")
    _ok(at.button(key="start_upload_create").click().run())
    ws = Workspace(app_env / "uploaded")
    assert [r.relpath for r in ws.images()] == ["batch/shoes/a.png"]
    assert ws.collection_root == ws.path / "uploads"
    assert not (app_env / "escape.png").exists() and not (ws.path / "escape.png").exists()
    refused = at.dataframe[0].value
    assert set(refused["file"]) == {"../escape.png", "readme.txt"}
    # More images can be added to an upload workspace from the Images page.
    _ok(at.switch_page("pages/images.py").run())
    more = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(more, format="PNG")
    at.file_uploader(key="images_upload_files").upload("red.png", more.getvalue(), "image/png")
    _ok(at.button(key="images_upload_add").click().run())
    assert [r.relpath for r in ws.images()] == ["batch/shoes/a.png", "red.png"]


def test_pages_explain_when_no_workspace_is_open(app_env: Path):
    at = _ok(_app().run())
    for page in ("images", "features", "clusters", "label", "export"):
        _ok(at.switch_page(f"pages/{page}.py").run())
        assert "No workspace is open" in at.info[0].value


@pytest.mark.parametrize("name", ["<script>alert(1)</script>.png"])
def test_file_names_are_never_markup(app_env: Path, tmp_path: Path, name: str):
    photos = tmp_path / "odd"
    photos.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(photos / name.replace("/", "_"), format="PNG")
    at = _ok(_app().run())
    at.text_input(key="start_folder").input("odd")
    _ok(at.button(key="start_folder_create").click().run())
    _ok(at.switch_page("pages/images.py").run())
    assert not at.get("html")
    captions = [img.proto.imgs[0].caption for img in at.image]
    assert captions and all("<script>" not in c for c in captions)


def test_sample_data_is_where_the_app_expects_it():
    assert (PROJECT / "sample_data" / "images").is_dir()
