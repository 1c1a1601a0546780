"""AppTest: every page on real data, with the real CNN, checked against the workspace.

One workspace from ``sample_data/`` is made through the app (one-click sample) and its features
computed through the Features page once per module (TensorFlow loads once); each test then
drives one page and checks what the workspace holds afterwards. A second, small workspace
from the real product photos of ``../shared/datasets/clothing`` goes through the whole flow.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from imgcluster import labels as lb
from imgcluster.features import feature_counts
from imgcluster.workspace import Workspace
from imgcluster_app.common import md_escape
from tests.app.conftest import APP
from tests.conftest import CLOTHING, PROJECT, read_truth

pytestmark = pytest.mark.slow

TIMEOUT = 240
BACKBONE = "efficientnet-lite0"


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def page(at: AppTest, name: str) -> AppTest:
    return ok(at.switch_page(f"pages/{name}.py").run())


def fresh(ws_name: str) -> AppTest:
    """A new browser tab opened on ``?ws=<name>`` (nothing carried over but the URL)."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["ws"] = ws_name
    return ok(at.run())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Workspaces home; the sample workspace made and extracted through the app."""
    base = tmp_path_factory.mktemp("apptest")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLUSTER_WORKSPACES", str(base / "workspaces"))
        mp.setenv("IMGCLUSTER_ALLOWED_ROOTS", f"{PROJECT / 'sample_data'}:{base}")
        # The UMAP worker is a separate process costing a minute of CPU; the browser test
        # covers it. Here the map stays the instant PCA one.
        mp.setenv("IMGCLUSTER_UMAP", "0")
        mp.chdir(base)
        at = ok(AppTest.from_file(str(APP), default_timeout=TIMEOUT).run())
        ok(at.button(key="start_sample").click().run())
        page(at, "features")
        ok(at.button(key="features_extract").click().run())
        yield base / "workspaces"


@pytest.fixture(scope="module")
def ws(home: Path) -> Workspace:
    return Workspace(home / "sample")


@pytest.fixture()
def labeled(ws: Workspace) -> Workspace:
    """The sample workspace with labels (made by the Clusters page test when the module runs
    in order; made here when a test runs alone)."""
    if lb.active_session(ws) is None:
        from imgcluster.clustering import cluster

        lb.start_session(ws, cluster(ws, BACKBONE, 6).id, actor="fixture")
    return ws


def test_features_are_computed_once_and_reused(home, ws):
    assert feature_counts(ws)[BACKBONE] == 120
    at = page(fresh("sample"), "features")
    assert any("All 120 images have" in s.value for s in at.success)
    assert not [b for b in at.button if b.key == "features_extract"]
    assert at.radio[0].value == BACKBONE


def test_clusters_page_clusters_and_follows_k(home, ws):
    at = page(fresh("sample"), "clusters")
    session = lb.active_session(ws)
    assert session is not None and len(lb.list_labels(ws)) == 8
    assert at.slider(key="view_k_slider").value == 8
    ok(at.number_input(key="view_k_input").set_value(6).run())
    assert at.slider(key="view_k_slider").value == 6  # slider follows the box
    assert len(lb.list_labels(ws)) == 6
    assert lb.active_session(ws).id != session.id
    # Nobody had edited the labels, so the step was silent; the sizes chart is there.
    assert not at.warning
    # The k-suggestion curve on demand.
    ok(at.button(key="clusters_suggest").click().run())
    assert any("Best by silhouette" in c.value for c in at.caption)


def test_map_selection_moves_to_a_new_label_and_asks_before_dropping_edits(home, ws):
    at = page(fresh("sample"), "clusters")
    first = sorted(lb.list_labels(ws), key=lambda s: s.name.lower())[0]  # the map's trace 0
    members = {i.image_id for i in lb.label_images(ws, first.id, limit=1000)}
    # What a box selection on the map sends back: trace and point numbers.
    at.session_state["view_scatter_0"] = {
        "selection": {
            "points": [{"curve_number": 0, "point_index": i} for i in range(3)],
            "point_indices": [0, 1, 2],
            "box": [],
            "lasso": [],
        }
    }
    ok(at.run())
    assert any("3 images selected" in m.value for m in at.markdown)
    at.text_input(key="clusters_move_new").input("from the map")
    ok(at.button(key="clusters_move_go").click().run())
    moved = next(s for s in lb.list_labels(ws) if s.name == "from the map")
    # A move is a decision about a label, not a review: the moved images stay unconfirmed.
    assert moved.count == 3 and moved.confirmed == 0 and moved.by_hand == 3
    assert {i.image_id for i in lb.label_images(ws, moved.id)} <= members
    # Now the labels carry an edit: moving k asks instead of replacing them.
    session = lb.active_session(ws)
    # (a k other than the number of labels there are: asking for those is no change)
    ok(at.slider(key="view_k_slider").set_value(len(lb.list_labels(ws)) + 2).run())
    assert at.warning and "edit" in at.warning[0].value
    assert lb.active_session(ws).id == session.id
    ok(at.button(key="clusters_keep").click().run())
    # "Keep my labels" sets k to the number of labels there are now.
    assert at.slider(key="view_k_slider").value == len(lb.list_labels(ws)) and not at.warning


FOCUS = "view_focus"  # the image the larger view shows (set by the grid's Enter / click)


def chooser(at: AppTest):
    """The Label page's label chooser (its key carries a counter: found by its label)."""
    return next(s for s in at.selectbox if s.label == "Label")


def focus_data(at: AppTest) -> dict:
    """The data the larger-view component was drawn with."""
    import json

    for element in at.get("bidi_component"):
        if element.proto.component_name == "imgcluster_focus_view":
            return json.loads(element.proto.json)
    raise AssertionError("no larger view on the page")


def open_focus(ws: Workspace, label_id: int) -> tuple[AppTest, int]:
    """The Label page with the larger view of the label's most typical image open (what a
    click in the grid does: the grid itself runs in the browser, see tests/browser)."""
    at = page(fresh("sample"), "label")
    ok(chooser(at).set_value(label_id).run())
    image = lb.label_images(ws, label_id, limit=1)[0].image_id
    at.session_state[FOCUS] = {"id": image, "index": 0}
    return ok(at.run()), image


def test_label_page_rename_move_undo_redo(home, labeled):
    ws = labeled
    at = page(fresh("sample"), "label")
    label = chooser(at).value  # the first label, as shown
    before = {s.id: s for s in lb.list_labels(ws)}
    at.text_input(key="label_rename_name").input("Sneakers 👟 <script>x</script>")
    ok(at.button(key="label_rename").click().run())
    assert before[label].name != "Sneakers 👟 <script>x</script>"
    assert {s.id: s.name for s in lb.list_labels(ws)}[label] == "Sneakers 👟 <script>x</script>"
    assert "\\<script\\>" in at.success[0].value  # shown as text, never as markup

    at, image = open_focus(ws, label)
    at.text_input(key="label_focus_move_new").input("odd ones")
    ok(at.button(key="label_focus_move_go").click().run())
    odd = next(s for s in lb.list_labels(ws) if s.name == "odd ones")
    assert [i.image_id for i in lb.label_images(ws, odd.id)] == [image]
    assert FOCUS not in at.session_state  # the larger view closed after the move

    ok(at.button(key="label_undo").click().run())
    assert "odd ones" not in {s.name for s in lb.list_labels(ws)}
    ok(at.button(key="label_redo").click().run())
    assert "odd ones" in {s.name for s in lb.list_labels(ws)}


def test_label_page_confirm_split_merge(home, labeled):
    ws = labeled
    at = page(fresh("sample"), "label")
    label = chooser(at).value
    ok(at.button(key="label_confirm").click().run())
    summary = next(s for s in lb.list_labels(ws) if s.id == label)
    assert summary.confirmed == summary.count - summary.excluded - summary.unsure

    n_before = len(lb.list_labels(ws))
    other = next(s for s in lb.list_labels(ws) if s.id != label and s.count > 4)
    ok(chooser(at).set_value(other.id).run())
    ok(at.button(key="label_split").click().run())
    assert len(lb.list_labels(ws)) == n_before + 1
    new = max(lb.list_labels(ws), key=lambda s: s.id)
    at.multiselect(key="label_merge_with").set_value([new.id])
    ok(at.button(key="label_merge").click().run())
    assert len(lb.list_labels(ws)) == n_before
    assert next(s for s in lb.list_labels(ws) if s.id == other.id).count == other.count


def test_larger_view_of_one_image_and_move_from_it(home, labeled):
    ws = labeled
    label = lb.list_labels(ws)[0].id
    at, image = open_focus(ws, label)
    data = focus_data(at)
    relpath = next(i.relpath for i in lb.label_images(ws, label, limit=1000) if i.image_id == image)
    assert data["relpath"] == relpath and data["src"].startswith("data:image/jpeg;base64,")
    assert data["has_next"] and not data["has_prev"]  # the first of its label
    target = next(s for s in lb.list_labels(ws) if s.id != label and s.count)
    # keyed by its options' texts too (common.choice_key): found by its label
    next(box for box in at.selectbox if box.label == "Move to label").set_value(target.name)
    ok(at.button(key="label_focus_move_go").click().run())
    assert image in {i.image_id for i in lb.label_images(ws, target.id, limit=1000)}


def test_larger_view_shows_nearest_neighbours(home, labeled):
    ws = labeled
    label = lb.list_labels(ws)[0].id
    at, image = open_focus(ws, label)
    expected = lb.nearest_neighbours(ws, image, limit=8)
    assert len(expected) == 8
    own = {r.image_id: r.label for r in lb.current_labels(ws)}[image]
    shown = focus_data(at)["neighbours"]
    assert [n["id"] for n in shown] == [n.image_id for n in expected]  # most similar first
    for item, n in zip(shown, expected, strict=True):
        assert item["label"] == n.label and abs(item["similarity"] - n.similarity) < 1e-6
        assert item["movable"] == (n.label != own)  # "Use this label" only for another label


def test_a_stale_view_changes_nothing(home, labeled):
    """Another annotator moves an image after this tab showed it: the tab's move is refused."""
    ws = labeled
    label = lb.list_labels(ws)[0].id
    at, image = open_focus(ws, label)
    lb.move(ws, [image], "someone else's", actor="colleague")
    at.text_input(key="label_focus_move_new").input("mine")
    at.button(key="label_focus_move_go").click().run()
    assert at.error and "changed" in at.error[0].value
    assert "mine" not in {s.name for s in lb.list_labels(ws)}


def test_label_page_opens_where_the_url_says_and_keeps_it_there(home, labeled):
    ws = labeled
    big = max(lb.list_labels(ws), key=lambda s: s.count)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params.update({"ws": "sample", "label": big.name, "order": "relpath"})
    ok(at.switch_page("pages/label.py").run())
    assert chooser(at).value == big.id
    assert at.query_params["label"] == big.name and at.query_params["order"] == "relpath"
    grid = next(e for e in at.get("bidi_component") if e.proto.component_name.endswith("grid"))
    import json

    shown = [item["relpath"] for item in json.loads(grid.proto.json)["items"]]
    assert shown == [i.relpath for i in lb.label_images(ws, big.id, limit=48, order="relpath")]


def component_data(at: AppTest, name: str) -> dict | None:
    import json

    for element in at.get("bidi_component"):
        if element.proto.component_name == name:
            return json.loads(element.proto.json)
    return None


def test_compare_with_another_label_from_the_url(home, labeled):
    """``?compare=<name>`` opens the comparison beside the label: the compared label's most
    typical photos; the chooser never offers the label shown; comparing a label with itself
    is dropped (and leaves the URL)."""
    ws = labeled
    shown, other = sorted(lb.list_labels(ws), key=lambda s: -s.count)[:2]
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params.update({"ws": "sample", "label": shown.name, "compare": other.name})
    ok(at.switch_page("pages/label.py").run())
    box = next(s for s in at.selectbox if s.label == "Compare with")
    assert box.value == other.id
    assert shown.name not in {o.split(" — ")[0] for o in box.options}
    data = component_data(at, "imgcluster_compare_column")
    assert data is not None and data["target"] == other.id
    expected = lb.label_images(ws, other.id, limit=24, order="typicality")
    assert [i["relpath"] for i in data["items"]] == [i.relpath for i in expected]
    assert at.query_params["compare"] == other.name

    ok(chooser(at).set_value(other.id).run())  # the compared label becomes the one shown
    box = next(s for s in at.selectbox if s.label == "Compare with")
    assert box.value is None
    assert other.name not in {o.split(" — ")[0] for o in box.options}
    assert component_data(at, "imgcluster_compare_column") is None
    assert "compare" not in at.query_params


def test_next_label_to_review_and_the_default_annotator_name(home, labeled):
    ws = labeled
    at = page(fresh("sample"), "label")
    ok(at.button(key="label_next").click().run())
    assert chooser(at).value == lb.next_label_to_review(ws).id
    # No name typed: this session's own name, said next to the box, recorded with each step.
    default = at.session_state["_session_actor"]
    assert default.startswith("annotator-")
    assert any(md_escape(default) in c.value for c in at.sidebar.caption)
    ok(at.button(key="label_confirm").click().run())
    assert lb.history(ws, limit=1)[0].actor == default
    other = page(fresh("sample"), "label")
    assert other.session_state["_session_actor"] != default  # another tab, another name


def test_a_cluster_nn_label_offers_its_suggested_name_in_one_click(home, labeled):
    """The real CNN's ImageNet head names a cluster of real photos; one click accepts it."""
    ws = labeled
    at = page(fresh("sample"), "label")
    label = next(s for s in lb.list_labels(ws) if s.name.startswith("cluster_"))
    ok(chooser(at).set_value(label.id).run())
    button = at.button(key="label_accept_name")
    suggested = button.label.removeprefix("Name it ")
    assert suggested and not suggested.startswith("cluster_")
    ok(button.click().run())
    assert {s.id: s.name for s in lb.list_labels(ws)}[label.id] == suggested


def test_export_page_writes_folders_and_offers_the_zip(home, labeled):
    ws = labeled
    at = page(fresh("sample"), "export")
    preview = at.dataframe[0].value
    kept = preview[~preview["label"].str.startswith("(left out")]
    assert (
        kept["images"].sum() + preview[preview["label"] == "(left out: excluded)"]["images"].sum()
        == 120
    )
    at.radio(key="export_split").set_value("0.8,0.2")
    ok(at.run())
    split_preview = at.dataframe[0].value
    split_preview = split_preview[~split_preview["label"].str.startswith("(left out")]
    ok(at.button(key="export_go").click().run())
    out = ws.path / "exports" / "dataset"
    assert (out / "train").is_dir() and (out / "val").is_dir()
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    # The preview is the library's dry run: its per-split counts are what was written.
    for _, shown in split_preview.iterrows():
        for split in ("train", "val"):
            assert shown[split] == sum(
                1 for r in rows if r["label"] == shown["label"] and r["split"] == split
            )
    assert len(rows) == int(kept["images"].sum())
    by_label = {r["label"] for r in rows}
    assert set(kept["label"]) == by_label
    assert (ws.path / "exports" / "dataset.zip").is_file()
    assert at.download_button(key="export_download").proto.label.startswith("Download dataset.zip")
    assert at.code[0].value == str(out)
    # A second export under the same name is refused unless replacing is ticked.
    at.button(key="export_go").click().run()
    assert at.error and "exists" in at.error[0].value
    at.checkbox(key="export_overwrite").check()
    ok(at.button(key="export_go").click().run())


def test_reload_shows_the_same_labels(home, labeled):
    ws = labeled
    names = sorted(s.name for s in lb.list_labels(ws))
    at = page(fresh("sample"), "label")
    shown = sorted(o.split(" — ")[0] for o in chooser(at).options)
    assert shown == names


def test_clothing_photos_end_to_end(home, tmp_path_factory):
    if not (CLOTHING / "labels.csv").exists():
        pytest.skip(f"{CLOTHING} not present (it lives in ../shared beside the project)")
    base = home.parent
    photos = base / "clothing-part"
    rows = [{"path": p, "label": c} for p, c in read_truth(CLOTHING).items()]
    for cls in ("dress", "hat", "pants", "shoes"):
        for row in [r for r in rows if r["label"] == cls][:6]:
            dest = photos / row["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CLOTHING / row["path"], dest)
    at = ok(AppTest.from_file(str(APP), default_timeout=TIMEOUT).run())
    at.text_input(key="start_folder").input("clothing-part")
    at.text_input(key="start_folder_name").input("clothing")
    ok(at.button(key="start_folder_create").click().run())
    ws = Workspace(home / "clothing")
    assert ws.image_counts()["ok"] == 24
    page(at, "features")
    ok(at.button(key="features_extract").click().run())
    assert feature_counts(ws)[BACKBONE] == 24
    page(at, "clusters")
    ok(at.number_input(key="view_k_input").set_value(4).run())
    summaries = lb.list_labels(ws)
    assert len(summaries) == 4 and sum(s.count for s in summaries) == 24
    # Two more photos arrive: rescan, extract, and label them by their neighbours.
    for row in [r for r in rows if r["label"] == "shoes"][6:8]:
        shutil.copy(CLOTHING / row["path"], photos / row["path"])
    page(at, "images")
    ok(at.button(key="images_rescan").click().run())
    page(at, "features")
    ok(at.button(key="features_extract").click().run())
    page(at, "clusters")
    assert any("2 images were added" in i.value for i in at.info)
    ok(at.button(key="clusters_suggest_new").click().run())
    assert sum(s.count for s in lb.list_labels(ws)) == 26
    assert len(lb.list_labels(ws)) == 4  # k unchanged, nothing re-clustered
    page(at, "export")
    ok(at.button(key="export_go").click().run())
    folders = [p for p in (ws.path / "exports" / "dataset").iterdir() if p.is_dir()]
    assert len(folders) == 4
    assert sum(len(list(f.iterdir())) for f in folders) == 26
