"""Hostile users: names that try to be HTML or Markdown, paths that try to leave their root,
weights files that try to run code, the app's network exposure, and sources swapped after
ingest to make the export write something else (a setuid executable, text, a FIFO, a link out,
any changed byte): the export writes only verified content, as 0644 files.

The app pages are run with Streamlit's AppTest on a workspace whose file names and label names
are hostile; every element that Streamlit renders as Markdown (text, captions, alerts, widget
labels and help) must show them escaped, never verbatim.
"""

from __future__ import annotations

import os
import pickle
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from imgcluster.errors import InvalidPath
from imgcluster.images import ingest
from imgcluster.workspace import Workspace
from tests.robustness.corpus import BLUE, GREEN, RED, encode, solid
from tests.robustness.helpers import PROJECT

#: Names that would do something if they were rendered as HTML or Markdown.
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[click me](javascript:alert(1))",
    "![pixel](http://evil.example/p.png)",
    ":red[**loud**]",
    "<b>bold</b>",
]
#: The same as file names ("/" cannot be part of one).
HOSTILE_FILES = [name.replace("/", "_") for name in HOSTILE]
#: Markdown-rendering element types of Streamlit's AppTest and the attributes holding text.
MARKDOWN_ELEMENTS = (
    "markdown",
    "caption",
    "title",
    "header",
    "subheader",
    "success",
    "info",
    "warning",
    "error",
    "toast",
)
WIDGETS = (
    "button",
    "checkbox",
    "toggle",
    "selectbox",
    "multiselect",
    "radio",
    "text_input",
    "number_input",
    "expander",
    "tabs",
    "metric",
    "image",
)
#: An HTML tag or a Markdown link that Markdown would act on (not backslash-escaped).
LIVE_MARKUP = re.compile(r"(?<!\\)<[A-Za-z/!]|(?<!\\)\]\(")


def _hostile_workspace(tmp_path: Path) -> Workspace:
    """Images named like HTML/Markdown, clustered, labeling started, labels renamed likewise."""
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.labels import list_labels, rename, start_session

    root = tmp_path / "photos"
    root.mkdir()
    colors = [RED, GREEN, BLUE]
    for i, name in enumerate(HOSTILE_FILES):
        for j in range(4):
            color = tuple(min(255, c + 10 * j) for c in colors[i % 3])
            (root / f"{name} {j}.png").write_bytes(encode(solid(color, (16 + i, 16)), "PNG"))
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    images = ws.images()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(HOSTILE), 1280))
    vectors = [
        centres[HOSTILE_FILES.index(r.relpath.rsplit(" ", 1)[0])] + 0.1 * rng.normal(size=1280)
        for r in images
    ]
    save_vectors(ws, "efficientnet-lite0", [r.sha256 for r in images], np.stack(vectors))
    start_session(ws, cluster(ws, "efficientnet-lite0", len(HOSTILE)).id)
    for summary, name in zip(list_labels(ws), HOSTILE, strict=True):
        rename(ws, summary.id, name)
    return ws


def _texts(at, kind: str) -> list[str]:
    """The Markdown source of every element of ``kind`` (value, label, help)."""
    found = []
    for element in at.get(kind):
        for attr in ("value", "label", "help", "body", "captions"):
            text = getattr(element, attr, None)
            if isinstance(text, str):
                found.append(text)
            elif attr == "captions" and text:
                found.extend(str(caption) for caption in text)
    return found


@pytest.fixture(scope="module")
def hostile_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return _hostile_workspace(tmp_path_factory.mktemp("hostile-names"))


@pytest.mark.parametrize(
    "page", ["pages/images.py", "pages/clusters.py", "pages/label.py", "pages/export.py"]
)
def test_names_are_never_rendered_as_html_or_markdown(
    hostile_ws: Workspace, page: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    if not (PROJECT / page).exists():
        pytest.skip(f"{page} is not in the app")
    monkeypatch.setenv("IMGCLUSTER_WORKSPACES", str(hostile_ws.path.parent))
    monkeypatch.setenv("IMGCLUSTER_ALLOWED_ROOTS", str(hostile_ws.path.parent))
    at = AppTest.from_file(str(PROJECT / "app.py"), default_timeout=120)
    at.session_state["ws_path"] = str(hostile_ws.path)
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    rendered = [text for kind in MARKDOWN_ELEMENTS + WIDGETS for text in _texts(at, kind)]
    assert rendered, "the page rendered no text at all"
    verbatim = {name: [t for t in rendered if name in t] for name in HOSTILE + HOSTILE_FILES}
    assert {name: texts for name, texts in verbatim.items() if texts} == {}
    assert [text for text in rendered if LIVE_MARKUP.search(text)] == []
    unsafe = [e.value for e in at.get("markdown") if getattr(e.proto, "allow_html", False)]
    assert not [t for t in unsafe if any(name in t for name in HOSTILE)]


# -- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath",
    ["../secret.png", "/etc/passwd", "a/../../secret.png", "link_out/secret.png", "loop.png"],
)
def test_source_path_never_leaves_the_collection(tmp_path: Path, relpath: str) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(encode(solid(RED), "PNG"))
    (root / "ok.png").write_bytes(encode(solid(RED), "PNG"))
    (root / "link_out").symlink_to(tmp_path, target_is_directory=True)
    (root / "loop.png").symlink_to("loop.png")
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root)
    with pytest.raises(InvalidPath):
        ws.source_path(relpath)
    assert ws.source_path("ok.png") == root / "ok.png"


def test_folder_picker_refuses_a_sibling_that_shares_the_root_prefix(tmp_path: Path) -> None:
    common = pytest.importorskip("imgcluster_app.common")
    root = tmp_path / "photos"
    sibling = tmp_path / "photos-private"
    (root / "inside").mkdir(parents=True)
    sibling.mkdir()
    assert common.resolve_under("inside", [root]) == root / "inside"
    for text in (
        str(sibling),
        "../photos-private",
        f"{root}/../photos-private",
        "~",
        "inside/../../photos-private",
    ):
        with pytest.raises(InvalidPath):
            common.resolve_under(text, [root])


# -- weights files ----------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a hostile .pth holds
        return (os.system, (f"touch {self.marker}",))


def test_weights_file_cannot_run_code(tmp_path: Path) -> None:
    from imgcluster.backbones import InvalidWeights
    from imgcluster.backbones.torch_legacy import load_state_dict

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(InvalidWeights, match="not allowed"):
        load_state_dict(path)
    assert not marker.exists()


# -- network exposure -------------------------------------------------------------------------


def test_app_binds_to_loopback_with_xsrf_protection() -> None:
    config = tomllib.loads((PROJECT / ".streamlit" / "config.toml").read_text())
    server = config.get("server", {})
    assert server.get("address") in ("127.0.0.1", "localhost", "::1")
    assert server.get("enableXsrfProtection", True) is True
    assert server.get("enableCORS", True) is True


# -- export writes only what it verified (issue 14 §1) ----------------------------------------


def _labeled_export_workspace(tmp_path: Path) -> tuple[Workspace, Path]:
    from tests.test_export import build_labeled_workspace

    return build_labeled_workspace(tmp_path)


def _modes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.lstat().st_mode for p in out.rglob("*") if not p.is_dir()}


def test_export_refuses_a_source_replaced_by_a_setuid_executable(tmp_path: Path) -> None:
    """The escape: a labeled ".jpg" replaced by an executable (owner nobody, mode 4755) was
    copied by a root export with its setuid bit. Now it is refused as changed content, and
    every exported file is a 0644 regular file of the exporting user."""
    import stat

    from imgcluster.export import export_workspace, read_left_out, read_manifest

    ws, root = _labeled_export_workspace(tmp_path)
    victim = root / "shirts" / "img1.jpg"
    victim.unlink()
    victim.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 200)  # an "executable"
    os.chmod(victim, 0o4755)
    if os.geteuid() == 0:
        os.chown(victim, 65534, 65534)  # nobody
    # The other sources get odd modes too: the export never carries mode bits over.
    for other in (root / "shoes").iterdir():
        os.chmod(other, 0o6775)
    out = tmp_path / "dataset"
    result = export_workspace(ws, out)
    assert "shirts/img1.jpg" not in {r["source"] for r in read_manifest(out)}
    assert result.left_out["changed since ingest"] == 1
    assert {
        "source": "shirts/img1.jpg",
        "label": "T恤 / shirts",
        "reason": "changed since ingest",
    } in (read_left_out(out))
    modes = _modes(out)
    assert modes and all(stat.S_ISREG(m) and stat.S_IMODE(m) == 0o644 for m in modes.values())
    owners = {p.lstat().st_uid for p in out.rglob("*")}
    assert owners == {os.geteuid()}


def test_export_refuses_a_source_replaced_by_text(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imgcluster.cli import cli
    from imgcluster.export import read_left_out, read_manifest

    ws, root = _labeled_export_workspace(tmp_path)
    (root / "bags" / "img3.jpg").write_text("not an image at all\n")
    out = tmp_path / "dataset"
    result = CliRunner().invoke(cli, ["export", "--workspace", str(ws.path), str(out)])
    assert result.exit_code == 0, result.output
    assert "changed since ingest" in result.output
    rows = read_manifest(out)
    assert "bags/img3.jpg" not in {r["source"] for r in rows}
    assert [r["reason"] for r in read_left_out(out) if r["source"] == "bags/img3.jpg"] == [
        "changed since ingest"
    ]
    for row in rows:  # what is exported is exactly the ingested content
        import hashlib

        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink-out"])
def test_export_refuses_special_files_without_hanging(tmp_path: Path, kind: str) -> None:
    """A FIFO put where a labeled image was must not block the export (no writer ever comes);
    a folder or a symlink to a file outside the collection is refused as well."""
    from imgcluster.export import export_workspace, read_left_out

    ws, root = _labeled_export_workspace(tmp_path)
    victim = root / "shoes" / "img2.png"
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "folder":
        victim.mkdir()
    else:
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0")
        victim.symlink_to(secret)
    result = export_workspace(ws, tmp_path / "out")
    reasons = {r["source"]: r["reason"] for r in read_left_out(tmp_path / "out")}
    expected = {"fifo": "not a regular file (a FIFO)", "folder": "not a regular file (a folder)"}
    assert reasons["shoes/img2.png"] == expected.get(kind, "changed since ingest")
    assert sum(result.left_out.values()) >= 1


@pytest.mark.parametrize("change", ["one bit flipped", "truncated", "one byte appended", "swapped"])
def test_export_refuses_any_change_to_the_bytes(tmp_path: Path, change: str) -> None:
    """Content checks are by hash, so every change is caught, however small, in every mode."""
    import hashlib

    from imgcluster.export import ExportItem, export_items, read_left_out

    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i, color in enumerate((RED, GREEN, BLUE)):
        paths.append(src / f"{i}.png")
        paths[-1].write_bytes(encode(solid(color), "PNG"))
    items = [ExportItem(p, p.name, "x", hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    data = bytearray(paths[0].read_bytes())
    if change == "one bit flipped":
        data[len(data) // 2] ^= 1
    elif change == "truncated":
        del data[-1]
    elif change == "one byte appended":
        data.append(0)
    else:  # another valid image of the same size
        data = bytearray(paths[1].read_bytes())
    paths[0].write_bytes(bytes(data))
    for mode in ("copy", "hardlink", "symlink"):
        out = tmp_path / mode
        result = export_items(items, out, mode=mode)
        assert result.n_files == 2 and result.left_out == {"changed since ingest": 1}, mode
        assert [r["source"] for r in read_left_out(out)] == ["0.png"]
        assert not (out / "x" / "0.png").exists()
