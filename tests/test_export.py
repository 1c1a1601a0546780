"""Export: labeled folder trees that trainers load unchanged, safely named, atomic, zipped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import unicodedata
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from imgcluster.errors import ExportError
from imgcluster.export import (
    EXPORT_MARKER,
    LABELS_NAME,
    LEFT_OUT_NAME,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    ExportItem,
    assign_folders,
    export_items,
    parse_split,
    read_left_out,
    read_manifest,
    safe_file_name,
    safe_folder_name,
    split_items,
    zip_export,
)

HOSTILE = [
    "../../etc",
    "a/b",
    "a\\b",
    "CON",
    "con.txt",
    "Lpt9",
    "   ",
    "..",
    ".",
    ".hidden",
    "trailing. . ",
    "x" * 300,
    "é" * 200,
    "👕 T-shirts 👨‍👩‍👧",
    "连衣裙",
    "Shirt",
    "shirt",
    "tab\there\nnewline",
    'what?<>:"|*',
    "manifest.csv",
    "",
]
WINDOWS_FORBIDDEN = set('/\\<>:"|?*')
RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{n}" for d in ("com", "lpt") for n in range(1, 10)}


# -- fixtures ---------------------------------------------------------------------------------


def _write_image(path: Path, colour: tuple[int, int, int], fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path, format=fmt)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _item(root: Path, relpath: str, label: str, **kw) -> ExportItem:
    path = root / relpath
    return ExportItem(source=path, relpath=relpath, label=label, sha256=_sha(path), **kw)


def _snapshot(paths: list[Path]) -> dict[str, tuple[str, int, int]]:
    """Content hash, mtime and mode of every source: what "never modified" means."""
    return {str(p): (_sha(p), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths}


def _tree(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


@pytest.fixture
def collection(tmp_path: Path) -> tuple[Path, list[ExportItem]]:
    """Three labels, nested source folders, a same-name clash and an exact duplicate."""
    root = tmp_path / "photos"
    items = []
    n = 0
    for label, count, fmt in (("shirt", 5, "PNG"), ("dress", 4, "JPEG"), ("shoe", 3, "PNG")):
        for i in range(count):
            n += 1
            ext = "png" if fmt == "PNG" else "jpg"
            rel = f"{label}_dir/{i:02d}.{ext}"
            _write_image(root / rel, (n * 20 % 256, n * 7 % 256, 255 - n * 11), fmt)
            items.append(_item(root, rel, label, cluster=n % 3, confirmed=i % 2 == 0))
    # Same file name as shirt_dir/00.png, in another folder, same label.
    _write_image(root / "other/00.png", (1, 2, 3))
    items.append(_item(root, "other/00.png", "shirt"))
    # Exact duplicate of shirt_dir/01.png.
    (root / "dup").mkdir()
    (root / "dup/copy.png").write_bytes((root / "shirt_dir/01.png").read_bytes())
    items.append(_item(root, "dup/copy.png", "shirt"))
    return root, items


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", HOSTILE)
def test_safe_folder_name_is_portable(label: str) -> None:
    name = safe_folder_name(label)
    assert name and name not in (".", "..")
    assert not WINDOWS_FORBIDDEN & set(name)
    assert not any(unicodedata.category(ch) == "Cc" for ch in name)
    assert name == name.strip(" .")  # no leading dot (hidden), no trailing dot/space (Windows)
    assert name.split(".")[0].casefold() not in RESERVED
    assert len(name.encode("utf-8")) <= 120
    assert name == unicodedata.normalize("NFC", name)


def test_safe_folder_name_keeps_unicode_and_cuts_on_characters() -> None:
    assert safe_folder_name("连衣裙") == "连衣裙"
    assert safe_folder_name("Café crème") == "Café crème"
    assert safe_folder_name("👕 T-shirts") == "👕 T-shirts"
    assert safe_folder_name("Cafe\u0301") == "Café"  # NFD input, NFC folder
    long_name = safe_folder_name("裙" * 100)  # 3 bytes each
    assert long_name == "裙" * 40
    assert safe_folder_name("   ") != safe_folder_name("..")  # fallbacks differ per name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IMG_0001.JPG", "IMG_0001.JPG"),
        ("连衣裙 1.jpg", "连衣裙 1.jpg"),
        ('a:b?"c".png', "a_b__c_.png"),
        ("con.jpg", "_con.jpg"),
        (".hidden.png", "hidden.png"),
        (".png", "fallback.png"),
        ("x" * 300 + ".jpeg", "x" * 145 + ".jpeg"),
    ],
)
def test_safe_file_name(name: str, expected: str) -> None:
    assert safe_file_name(name, fallback="fallback") == expected


def test_assign_folders_gives_distinct_folders_case_insensitively() -> None:
    folders = assign_folders([*HOSTILE, "a_b", "Shirt (2)"], reserved=(MANIFEST_NAME,))
    keys = [f.casefold() for f in folders.values()]
    assert len(set(keys)) == len(HOSTILE) + 2
    assert MANIFEST_NAME not in keys
    # Names that are already safe keep their exact spelling, whatever sorts first.
    for exact in ("a_b", "Shirt", "连衣裙", "Shirt (2)", "👕 T-shirts 👨‍👩‍👧"):
        assert folders[exact] == exact
    assert folders["shirt"] == "shirt (3)"
    assert folders["a/b"] != "a_b"
    # Same labels, same folders (repeatable exports).
    assert assign_folders(reversed([*HOSTILE, "a_b", "Shirt (2)"]), reserved=(MANIFEST_NAME,)) == (
        folders
    )


def test_hostile_labels_stay_inside_out(tmp_path: Path) -> None:
    root = tmp_path / "src"
    items = []
    for i, label in enumerate(HOSTILE):
        rel = f"d{i}/img.png"
        _write_image(root / rel, (i * 10, 0, 0))
        items.append(_item(root, rel, label))
    out = tmp_path / "export"
    result = export_items(items, out)

    out_real = out.resolve()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out_real) for p in out.rglob("*"))
    class_dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(class_dirs) == len(HOSTILE)  # every label its own folder, none merged
    assert len({p.name.casefold() for p in class_dirs}) == len(HOSTILE)
    assert all(len(list(d.iterdir())) == 1 for d in class_dirs)
    assert len(files) == len(HOSTILE) + 4  # plus manifest.csv, labels.json, left_out.csv, marker
    assert not (tmp_path / "etc").exists() and not (tmp_path / "a").exists()

    document = json.loads((out / LABELS_NAME).read_text(encoding="utf-8"))
    recorded = {entry["name"]: entry["folder"] for entry in document["labels"]}
    assert recorded == result.folders
    assert set(recorded) == set(HOSTILE)
    for row in read_manifest(out):
        assert row["path"].split("/")[0] == result.folders[row["label"]]


# -- layout, manifest, collisions -------------------------------------------------------------


def test_export_layout_manifest_and_collisions(tmp_path: Path, collection) -> None:
    root, items = collection
    # Case-only clash inside one label.
    _write_image(root / "upper/IMG.PNG", (9, 9, 9))
    _write_image(root / "lower/img.png", (8, 8, 8))
    items += [_item(root, "upper/IMG.PNG", "shoe"), _item(root, "lower/img.png", "shoe")]
    out = tmp_path / "out"
    result = export_items(items, out, metadata={"backbone": "lite0", "k": 3, "run_id": 7})

    assert result.n_files == len(items)
    assert result.counts == {"dress": {"all": 4}, "shirt": {"all": 7}, "shoe": {"all": 5}}
    assert sorted(p.name for p in out.iterdir()) == [
        EXPORT_MARKER,
        "dress",
        LABELS_NAME,
        LEFT_OUT_NAME,
        MANIFEST_NAME,
        "shirt",
        "shoe",
    ]
    rows = read_manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert len(rows) == len(items) == len({r["path"].casefold() for r in rows})
    by_source = {r["source"]: r for r in rows}
    for item in items:
        row = by_source[item.relpath]
        exported = out / row["path"]
        assert exported.read_bytes() == item.source.read_bytes()  # nothing overwritten
        assert row["label"] == item.label and row["sha256"] == item.sha256
        assert row["confirmed"] == str(int(item.confirmed))
        assert row["cluster"] == ("" if item.cluster is None else str(item.cluster))
        assert row["split"] == ""
    # Unique names are kept; clashing ones get a suffix.
    assert by_source["shirt_dir/02.png"]["path"] == "shirt/02.png"
    clash = {by_source["shirt_dir/00.png"]["path"], by_source["other/00.png"]["path"]}
    assert len(clash) == 2 and all(p.startswith("shirt/00_") for p in clash)
    assert by_source["dup/copy.png"]["path"] == "shirt/copy.png"
    case = {by_source["upper/IMG.PNG"]["path"], by_source["lower/img.png"]["path"]}
    assert len({p.casefold() for p in case}) == 2

    document = json.loads((out / LABELS_NAME).read_text(encoding="utf-8"))
    assert document["backbone"] == "lite0" and document["k"] == 3 and document["run_id"] == 7
    assert document["class_names"] == ["dress", "shirt", "shoe"]
    assert document["options"]["mode"] == "copy"
    assert {e["name"]: e["count"] for e in document["labels"]} == {
        "dress": 4,
        "shirt": 7,
        "shoe": 5,
    }


def test_same_items_give_the_same_export(tmp_path: Path, collection) -> None:
    _, items = collection
    export_items(items, tmp_path / "a", split="0.7,0.15,0.15", random_state=3)
    export_items(list(reversed(items)), tmp_path / "b", split="0.7,0.15,0.15", random_state=3)
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")


# -- split ------------------------------------------------------------------------------------


def _split_items(tmp_path: Path) -> list[ExportItem]:
    """Labels of 50, 20, 7 and 1 images; some content appears 2-3 times, once across labels."""
    root = tmp_path / "split_src"
    items = []
    n = 0
    for label, count in (("big", 50), ("mid", 20), ("small", 7), ("one", 1)):
        for i in range(count):
            n += 1
            rel = f"{label}/{i}.png"
            _write_image(root / rel, (n % 256, n // 256, 7))
            items.append(_item(root, rel, label))
    for src, copies, label in (
        ("big/0.png", 2, "big"),
        ("mid/3.png", 1, "mid"),
        ("big/5.png", 1, "mid"),
    ):
        for c in range(copies):
            rel = f"dups/{label}_{Path(src).stem}_{c}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes((root / src).read_bytes())
            items.append(_item(root, rel, label))
    return items


def test_split_is_stratified_and_keeps_duplicates_together(tmp_path: Path) -> None:
    items = _split_items(tmp_path)
    splits = split_items(items, (0.8, 0.2), random_state=1)

    per_label = defaultdict(Counter)
    for item, split in zip(items, splits, strict=True):
        per_label[item.label][split] += 1
    assert per_label["big"]["val"] == pytest.approx(0.2 * 52, abs=1.5)  # 50 + 2 copies
    assert per_label["mid"]["val"] == pytest.approx(0.2 * 22, abs=1.5)
    assert per_label["small"]["val"] in (1, 2)
    assert per_label["one"] == Counter(train=1)  # a lone image is trained on

    by_hash = defaultdict(set)
    for item, split in zip(items, splits, strict=True):
        by_hash[item.sha256].add(split)
    assert all(len(s) == 1 for s in by_hash.values())  # duplicates never straddle splits
    assert max(Counter(i.sha256 for i in items).values()) == 3

    assert split_items(items, (0.8, 0.2), random_state=1) == splits  # seeded
    # A label's split does not depend on the other labels.
    alone = [i for i in items if i.label == "small"]
    assert split_items(alone, (0.8, 0.2), random_state=1) == [
        s for i, s in zip(items, splits, strict=True) if i.label == "small"
    ]
    assert split_items(items, (0.8, 0.2), random_state=2) != splits

    three = split_items(items, (0.7, 0.15, 0.15), random_state=0)
    big = Counter(s for i, s in zip(items, three, strict=True) if i.label == "big")
    assert big["train"] == pytest.approx(0.7 * 52, abs=2)
    assert big["val"] == pytest.approx(0.15 * 52, abs=2)
    assert big["test"] == pytest.approx(0.15 * 52, abs=2)


def test_split_export_layout(tmp_path: Path) -> None:
    items = _split_items(tmp_path)
    out = tmp_path / "out"
    result = export_items(items, out, split="0.8,0.2", random_state=0)
    assert sorted(p.name for p in out.iterdir()) == [
        EXPORT_MARKER,
        LABELS_NAME,
        LEFT_OUT_NAME,
        MANIFEST_NAME,
        "train",
        "val",
    ]
    # Every class folder exists in both splits (empty if need be) so class indices agree.
    assert sorted(p.name for p in (out / "train").iterdir()) == ["big", "mid", "one", "small"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["big", "mid", "one", "small"]
    assert not any((out / "val" / "one").iterdir())
    for label, per_split in result.counts.items():
        for split, count in per_split.items():
            assert len(list((out / split / label).iterdir())) == count
    rows = read_manifest(out)
    assert all(r["path"].startswith(f"{r['split']}/{r['label']}/") for r in rows)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.8,0.2", (0.8, 0.2)),
        ("0.7,0.15,0.15", (0.7, 0.15, 0.15)),
        ("0.9", (0.9, 0.1)),
        (None, None),
    ],
)
def test_parse_split(text, expected) -> None:
    assert parse_split(text) == pytest.approx(expected) if expected else parse_split(text) is None


@pytest.mark.parametrize(
    "text", ["0.8,0.3", "1", "a,b", "0.5,0.5,0,0", "-0.2,1.2", "0.25,0.25,0.25,0.25"]
)
def test_parse_split_rejects(text: str) -> None:
    with pytest.raises(ExportError, match="split="):
        parse_split(text)


# -- atomic, overwrite, interruption ----------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_target_is_refused_unless_overwrite(tmp_path: Path, collection) -> None:
    _, items = collection
    out = tmp_path / "out"
    export_items(items[:3], out)
    before = _tree(out)
    with pytest.raises(ExportError, match="already exists"):
        export_items(items, out)
    assert _tree(out) == before

    result = export_items(items, out, overwrite=True)
    assert result.n_files == len(items)
    assert len(read_manifest(out)) == len(items)
    assert _leftovers(tmp_path) == []  # old export and temp folder are gone

    # An empty folder (e.g. made by a file dialog) is fine without overwrite.
    (tmp_path / "empty").mkdir()
    export_items(items[:2], tmp_path / "empty")
    assert len(read_manifest(tmp_path / "empty")) == 2


def test_overwrite_refuses_folders_that_are_not_exports(tmp_path: Path, collection) -> None:
    root, items = collection
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ExportError, match="not an imgcluster export"):
        export_items(items, precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "years of work"

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_items(items, tmp_path / "afile", overwrite=True)

    # Exporting into the image collection would put copies where the sources are.
    with pytest.raises(ExportError, match="contains the source image"):
        export_items(items, root.parent, overwrite=True)
    assert _leftovers(tmp_path) == []


def test_interrupted_export_leaves_previous_intact(tmp_path: Path, collection) -> None:
    _, items = collection
    out = tmp_path / "out"
    export_items(items[:4], out)
    before = _tree(out)

    def fail_midway(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt  # the user pressing Ctrl-C halfway

    with pytest.raises(KeyboardInterrupt):
        export_items(items, out, overwrite=True, split="0.8,0.2", progress=fail_midway)
    assert _tree(out) == before
    assert _leftovers(tmp_path) == []

    # A source that is no longer a file (a folder where a file was) is that file's problem:
    # it is left out with the reason, the rest is exported.
    broken = ExportItem(tmp_path / "photos", "photos", "shirt", "0" * 64)
    result = export_items([*items, broken], out, overwrite=True)
    assert result.n_files == len(items)
    assert result.left_out == {"not a regular file (a folder)": 1}
    assert read_left_out(out) == [
        {"source": "photos", "label": "shirt", "reason": "not a regular file (a folder)"}
    ]
    assert _leftovers(tmp_path) == []


def test_killed_export_leaves_previous_intact(tmp_path: Path, collection) -> None:
    """A process killed outright (no cleanup code runs) still never damages the old export."""
    _, items = collection
    out = tmp_path / "out"
    export_items(items[:4], out)
    before = _tree(out)
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps([[str(i.source), i.relpath, i.label, i.sha256] for i in items]))
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from imgcluster.export import ExportItem, export_items
        items = [ExportItem(Path(s), r, lab, h) for s, r, lab, h in
                 json.loads(Path({str(spec)!r}).read_text())]
        def kill(done, total):
            if done == total // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        export_items(items, {str(out)!r}, overwrite=True, progress=kill)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert _tree(out) == before
    leftovers = _leftovers(tmp_path)
    assert any(name.startswith(".out.export-") for name in leftovers)
    assert all(name.startswith(".out.export") for name in leftovers)
    # The next export removes the half-built folder and succeeds.
    export_items(items, out, overwrite=True)
    assert len(read_manifest(out)) == len(items)
    assert _leftovers(tmp_path) == []


def test_crash_between_the_renames_is_undone(tmp_path: Path, collection) -> None:
    """Killed after the old export was renamed aside but before the new one took its name:
    the next export puts the old one back (and refuses to replace it without overwrite)."""
    _, items = collection
    out = tmp_path / "out"
    export_items(items[:4], out)
    before = _tree(out)
    # The state such a crash leaves: an unlocked lock file, a build folder, the old export aside.
    (tmp_path / ".out.export-x1y2.lock").touch()
    (tmp_path / ".out.export-x1y2").mkdir()
    out.rename(tmp_path / ".out.export-x1y2.old")
    with pytest.raises(ExportError, match="already exists"):
        export_items(items, out)
    assert _tree(out) == before
    assert _leftovers(tmp_path) == []


def test_concurrent_export_in_progress_is_left_alone(tmp_path: Path, collection) -> None:
    fcntl = pytest.importorskip("fcntl")
    _, items = collection
    lock_path = tmp_path / ".out.export-busy.lock"
    (tmp_path / ".out.export-busy").mkdir()
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is building this one
        export_items(items, tmp_path / "out")
    assert (tmp_path / ".out.export-busy").is_dir() and lock_path.exists()


# -- modes, sources, zip ----------------------------------------------------------------------


def test_modes_and_sources_never_modified(tmp_path: Path, collection) -> None:
    _, items = collection
    sources = [i.source for i in items]
    before = _snapshot(sources)

    copy = export_items(items, tmp_path / "copy")
    hard = export_items(items, tmp_path / "hard", mode="hardlink")
    soft = export_items(items, tmp_path / "soft", mode="symlink")
    zip_export(tmp_path / "soft")
    assert copy.warnings == hard.warnings == soft.warnings == []

    for name, mode in (("copy", "copy"), ("hard", "hardlink"), ("soft", "symlink")):
        rows = {r["source"]: r for r in read_manifest(tmp_path / name)}
        for item in items:
            dst = tmp_path / name / rows[item.relpath]["path"]
            assert dst.read_bytes() == item.source.read_bytes()
            if mode == "copy":
                assert not dst.is_symlink()
                assert dst.stat().st_ino != item.source.stat().st_ino
                assert dst.stat().st_mtime_ns == item.source.stat().st_mtime_ns  # copy2-like
            elif mode == "hardlink":
                assert dst.stat().st_ino == item.source.stat().st_ino
            else:
                assert dst.is_symlink() and os.path.isabs(os.readlink(dst))
                assert dst.resolve() == item.source.resolve()
    # Replacing an export made of links must not touch what the links point at.
    export_items(items[:2], tmp_path / "hard", overwrite=True)
    export_items(items[:2], tmp_path / "soft", overwrite=True)
    assert _snapshot(sources) == before


def test_hardlink_across_filesystems_falls_back_to_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    src = shm / f"imgcluster-export-test-{os.getpid()}"
    try:
        _write_image(src / "a.png", (5, 5, 5))
        result = export_items([_item(src, "a.png", "x")], tmp_path / "out", mode="hardlink")
        assert result.warnings and "copied instead of hard-linked" in result.warnings[0]
        assert (tmp_path / "out/x/a.png").read_bytes() == (src / "a.png").read_bytes()
    finally:
        (src / "a.png").unlink(missing_ok=True)
        src.rmdir()


def test_changed_source_is_refused_and_reported(tmp_path: Path, collection) -> None:
    root, items = collection
    _write_image(root / "shirt_dir/03.png", (0, 0, 0))  # edited after labeling
    result = export_items(items, tmp_path / "out")
    assert result.n_files == len(items) - 1
    assert result.left_out == {"changed since ingest": 1}
    assert any("changed since ingest" in w and "shirt_dir/03.png" in w for w in result.warnings)
    assert "shirt_dir/03.png" not in {r["source"] for r in read_manifest(tmp_path / "out")}
    assert read_left_out(tmp_path / "out") == [
        {"source": "shirt_dir/03.png", "label": "shirt", "reason": "changed since ingest"}
    ]


def test_zip_holds_the_export(tmp_path: Path) -> None:
    items = _split_items(tmp_path)
    out = tmp_path / "out"
    export_items(items, out, split="0.8,0.2")
    path = zip_export(out)
    assert path == tmp_path / "out.zip"
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        infos = {i.filename: i for i in zf.infolist()}
        files = {n: zf.read(n) for n in infos if not n.endswith("/")}
    assert files == {f"out/{k}": v for k, v in _tree(out).items()}
    assert "out/val/one/" in infos  # empty class folder survives the round trip
    assert infos["out/manifest.csv"].compress_type == zipfile.ZIP_DEFLATED
    pngs = [i for n, i in infos.items() if n.endswith(".png")]
    assert pngs and all(i.compress_type == zipfile.ZIP_STORED for i in pngs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.zip")] == []
    with pytest.raises(ExportError, match="inside"):
        zip_export(out, out / "self.zip")


# -- trainers read it -------------------------------------------------------------------------


@pytest.mark.slow  # TensorFlow import
def test_keras_image_dataset_from_directory_round_trip(tmp_path: Path, collection) -> None:
    keras = pytest.importorskip("keras")
    _, items = collection
    expected = Counter(i.label for i in items)

    out = tmp_path / "flat"
    export_items(items, out)
    ds = keras.utils.image_dataset_from_directory(
        out, image_size=(8, 8), batch_size=None, shuffle=False, verbose=False
    )
    assert ds.class_names == sorted(expected)
    got = Counter(ds.class_names[int(label)] for _, label in ds)
    assert got == expected

    split_out = tmp_path / "split"
    result = export_items(items, split_out, split="0.6,0.4", random_state=0)
    for split in ("train", "val"):
        ds = keras.utils.image_dataset_from_directory(
            split_out / split, image_size=(8, 8), batch_size=None, shuffle=False, verbose=False
        )
        assert ds.class_names == sorted(expected)  # same class indices in every split
        got = Counter(ds.class_names[int(label)] for _, label in ds)
        assert got == {lab: c[split] for lab, c in result.counts.items() if c[split]}


# -- a real workspace -------------------------------------------------------------------------

CLASS_NAMES = {"shirts": "T恤 / shirts", "shoes": "CON", "bags": "Bags"}


@pytest.fixture
def labeled_ws(tmp_path: Path):
    """A workspace labeled through the real labels API, clustered on injected vectors."""
    return build_labeled_workspace(tmp_path)


def build_labeled_workspace(tmp_path: Path):
    """``(workspace, photos root)``: 3 classes x 6 photos plus a same-name photo per class in
    ``misc/`` and an exact copy, ingested, clustered on injected vectors (k=3), labels renamed
    by their majority class (`CLASS_NAMES`), one image excluded and one unsure, "CON"
    confirmed. Built through the library only."""
    import numpy as np

    from imgcluster import labels
    from imgcluster.clustering import cluster
    from imgcluster.features import save_vectors
    from imgcluster.images import ingest
    from imgcluster.workspace import Workspace

    root = tmp_path / "photos"
    colours = {"shirts": (200, 30, 30), "shoes": (30, 200, 30), "bags": (30, 30, 200)}
    for c, (cls, colour) in enumerate(colours.items()):
        for i in range(6):
            fmt = "JPEG" if i % 2 else "PNG"
            ext = "jpg" if fmt == "JPEG" else "png"
            shade = tuple(min(255, v + 4 * i) for v in colour)
            _write_image(root / cls / f"img{i}.{ext}", shade, fmt)
        _write_image(root / "misc" / cls / "img0.png", (c, c, c))  # same name, other folder
    (root / "shirts/copy.png").write_bytes((root / "shirts/img0.png").read_bytes())
    ws = Workspace(tmp_path / "ws", create=True)
    ingest(ws, root, workers=1)

    truth = {img.sha256: img.relpath.split("/")[-2] for img in ws.images()}
    centres = {name: np.eye(8, dtype=np.float32)[i] for i, name in enumerate(colours)}
    rng = np.random.default_rng(0)
    shas = sorted(truth)
    vectors = np.stack([centres[truth[s]] + 0.01 * rng.standard_normal(8) for s in shas])
    save_vectors(ws, "synthetic", shas, vectors)
    run = cluster(ws, "synthetic", 3, random_state=0)
    labels.start_session(ws, run.id)

    by_label = defaultdict(Counter)
    for row in labels.current_labels(ws):
        by_label[row.label][row.relpath.split("/")[-2]] += 1
    for old, votes in by_label.items():
        labels.rename(ws, old, CLASS_NAMES[votes.most_common(1)[0][0]])
    labels.set_state(ws, ["bags/img1.jpg"], "excluded")
    labels.set_state(ws, ["bags/img2.png"], "unsure")
    labels.confirm(ws, CLASS_NAMES["shoes"])
    return ws, root


def test_export_workspace_uses_current_labels(tmp_path: Path, labeled_ws) -> None:
    from imgcluster import labels
    from imgcluster.export import export_workspace

    ws, root = labeled_ws
    sources = sorted(p for p in root.rglob("*") if p.is_file())
    before = _snapshot(sources)
    rows = {r.relpath: r for r in labels.current_labels(ws)}

    out = tmp_path / "dataset"
    result = export_workspace(ws, out)
    manifest = {r["source"]: r for r in read_manifest(out)}
    assert set(manifest) == {p for p, r in rows.items() if r.state == "normal"}
    assert result.left_out == {"excluded": 1, "unsure": 1}
    for relpath, row in manifest.items():
        assert row["label"] == rows[relpath].label
        assert row["cluster"] == str(rows[relpath].cluster)
        assert row["confirmed"] == str(int(rows[relpath].confirmed))
        assert (out / row["path"]).read_bytes() == (root / relpath).read_bytes()
    assert {row["path"].split("/")[0] for row in manifest.values()} == {
        "T恤 _ shirts",
        "_CON",
        "Bags",
    }
    document = json.loads((out / LABELS_NAME).read_text(encoding="utf-8"))
    session = labels.active_session(ws)
    assert document["backbone"] == "synthetic" and document["k"] == 3
    assert document["run_id"] == session.run_id
    assert document["workspace"] == str(ws.path)
    assert document["options"]["include_unsure"] is False
    assert document["left_out"] == {"excluded": 1, "unsure": 1}

    with_unsure = export_workspace(ws, tmp_path / "b", include_unsure=True)
    assert with_unsure.n_files == result.n_files + 1
    confirmed = export_workspace(ws, tmp_path / "c", confirmed_only=True)
    assert set(confirmed.counts) == {"CON"}
    assert confirmed.left_out["unconfirmed"] == len(rows) - 2 - confirmed.n_files

    with pytest.raises(ExportError, match="inside the image collection"):
        export_workspace(ws, root / "export")
    assert _snapshot(sources) == before


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"include_unsure": True},
        {"confirmed_only": True},
        {"split": "0.5,0.5", "random_state": 1},
        {"split": "0.7,0.15,0.15", "include_unsure": True},
    ],
)
def test_dry_run_plan_is_what_the_export_writes(tmp_path: Path, labeled_ws, options) -> None:
    from imgcluster import labels
    from imgcluster.export import export_workspace, plan_workspace_export
    from imgcluster.images import ingest

    ws, root = labeled_ws
    # An image ingested after labeling started is left out as "unlabeled".
    _write_image(root / "late.png", (1, 2, 3))
    ingest(ws, root, workers=1)
    plan = plan_workspace_export(ws, **options)
    assert not (tmp_path / "out").exists()
    result = export_workspace(ws, tmp_path / "out", **options)
    assert plan.counts == result.counts
    assert plan.folders == result.folders
    assert plan.left_out == result.left_out and plan.left_out["unlabeled"] == 1
    assert plan.splits == result.splits
    assert plan.n_files == result.n_files == len(read_manifest(tmp_path / "out"))
    written = Counter((r["label"], r["split"] or "all") for r in read_manifest(tmp_path / "out"))
    assert written == Counter(
        {(label, split): n for label, per in plan.counts.items() for split, n in per.items() if n}
    )
    assert plan.n_labeled == len(labels.current_labels(ws))
    assert sum(plan.left_out.values()) + plan.n_files == ws.image_counts()["ok"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"include_unsure": True},
        {"confirmed_only": True},
        {"confirmed_only": True, "include_unsure": True},
    ],
)
def test_the_counts_preview_equals_the_per_row_one(tmp_path: Path, labeled_ws, options) -> None:
    """The preview is built from counts (one GROUP BY; with a split, plus each image's
    hash), the export's items from a row per image: on the same labels both must say the
    same, and the export write it, with excluded, unsure, confirmed, missing and unlabeled
    images present."""
    from imgcluster import labels
    from imgcluster.export import export_workspace, plan_workspace_export
    from imgcluster.export.workspace_export import _select_rows
    from imgcluster.images import ingest

    ws, root = labeled_ws
    labels.confirm_images(ws, ["bags/img3.jpg", "bags/img2.png"])  # one unsure, confirmed
    (root / "bags" / "img4.png").unlink()  # a labeled image whose file is gone
    (root / "shoes" / "img5.jpg").unlink()  # ... and a confirmed one
    _write_image(root / "late.png", (1, 2, 3))  # unlabeled
    ingest(ws, root, workers=1)
    rows = labels.current_labels(ws, include_missing=True)
    assert {r.status for r in rows} == {"ok", "missing"}
    assert {r.state for r in rows} == {"normal", "excluded", "unsure"}

    counted = plan_workspace_export(ws, **options)
    flags = (bool(options.get("confirmed_only")), bool(options.get("include_unsure")))
    per_row = _select_rows(rows, flags)  # what the export's items are selected by
    assert counted.counts == {label: {"all": n} for label, n in sorted(per_row.kept.items())}
    assert counted.left_out == {**per_row.left_out, "unlabeled": 1}
    assert counted.left_out_files == per_row.missing
    assert (counted.confirmed, counted.sizes) == (per_row.confirmed, per_row.sizes)
    split = plan_workspace_export(ws, split="0.5,0.5", **options)
    assert counted.counts == {
        label: {"all": sum(per.values())} for label, per in split.counts.items()
    }
    for name in ("folders", "left_out", "left_out_files", "confirmed", "sizes", "n_labeled"):
        assert getattr(counted, name) == getattr(split, name), name
    assert counted.n_files == split.n_files == len(counted.items) == len(per_row.rows)
    assert counted.left_out["missing"] == 2 - bool(options.get("confirmed_only"))
    assert counted.n_labeled == len(rows)
    assert [i.relpath for i in counted.items] == [r.relpath for r in per_row.rows]
    assert all(i.cluster is not None for i in counted.items)  # the rows read their clusters

    result = export_workspace(ws, tmp_path / "out", **options)
    assert (result.counts, result.left_out) == (counted.counts, counted.left_out)
    assert [f.relpath for f in result.left_out_files] == [f.relpath for f in counted.left_out_files]
    written = Counter(r["label"] for r in read_manifest(tmp_path / "out"))
    assert written == Counter({label: per["all"] for label, per in counted.counts.items()})


def test_unsafe_paths_are_the_same_in_sql_and_python() -> None:
    """The counts preview finds unsafe paths in SQL, the per-row one in Python."""
    import sqlite3

    from imgcluster.export.workspace_export import _unsafe
    from imgcluster.labels.queries import UNSAFE_RELPATH_SQL

    paths = [
        "a/b.jpg",
        "/abs.jpg",
        "a\0b.jpg",
        "../x.jpg",
        "a/../x",
        "a/..",
        "..",
        "a..b/c",
        "x/..y/z",
        "x/y../z",
        "%/_.jpg",
        "./a.jpg",
    ]
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE paths (relpath TEXT)")
    conn.executemany("INSERT INTO paths VALUES (?)", [(p,) for p in paths])
    found = dict(conn.execute(f"SELECT relpath, {UNSAFE_RELPATH_SQL} FROM paths AS i"))
    assert {p: bool(v) for p, v in found.items()} == {p: _unsafe(p) for p in paths}
    assert sum(found.values()) == 6


def test_cli_export(tmp_path: Path, labeled_ws) -> None:
    from click.testing import CliRunner

    from imgcluster.cli import cli

    ws, _ = labeled_ws
    out = tmp_path / "cli_out"
    args = ["export", "--workspace", str(ws.path), str(out)]
    result = CliRunner().invoke(cli, [*args, "--split", "0.5,0.5", "--random-state", "1", "--zip"])
    assert result.exit_code == 0, result.output
    assert "T恤 / shirts" in result.output and "T恤 _ shirts" in result.output
    assert str(out) in result.output and "left out" in result.output
    assert (out / "train").is_dir() and (out / "val").is_dir()
    assert (tmp_path / "cli_out.zip").is_file()
    rows = read_manifest(out)
    assert {r["split"] for r in rows} == {"train", "val"}

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite", "--mode", "symlink"]).exit_code == 0
    assert all((out / r["path"]).is_symlink() for r in read_manifest(out))

    bad = CliRunner().invoke(cli, [*args, "--overwrite", "--split", "0.9,0.3"])
    assert bad.exit_code == 2 and "split=" in bad.output


def test_an_export_moved_into_the_collection_is_never_ingested(tmp_path: Path, labeled_ws) -> None:
    """The export marks its folder (`EXPORT_MARKER`), so ingest never takes its copies for
    new photos (issue 14 §5), even after someone moves the export into the collection."""
    from imgcluster.export import export_workspace
    from imgcluster.images import ingest

    ws, root = labeled_ws
    out = tmp_path / "dataset"
    export_workspace(ws, out)
    assert (out / EXPORT_MARKER).is_file()
    before = ws.image_counts()
    out.rename(root / "dataset")
    report = ingest(ws, root, workers=1)
    assert report.new == 0 and ws.image_counts() == before


def test_export_warnings_say_what_to_look_at_first(tmp_path: Path, labeled_ws) -> None:
    """Issue 12: before writing, the export says which labels still have their automatic
    name, which have fewer than 5 images, which nobody reviewed, and what is left out."""
    from imgcluster import labels
    from imgcluster.export import MIN_IMAGES_PER_LABEL, export_warnings, plan_workspace_export

    ws, root = labeled_ws
    kinds = {w.kind: w for w in export_warnings(plan_workspace_export(ws))}
    # Renamed labels, CON confirmed, one image excluded and one unsure (the fixture).
    assert "default_name" not in kinds
    assert set(kinds["unreviewed"].labels) == {"T恤 / shirts", "Bags"}
    assert "1 excluded" in kinds["left_out"].message and "1 unsure" in kinds["left_out"].message
    assert "small_label" not in kinds and "missing" not in kinds

    # Bags down to 3 exported images, one of its files gone, and a fresh automatic name.
    labels.set_state(ws, ["bags/img3.jpg"], "excluded")
    (root / "bags" / "img4.png").unlink()
    from imgcluster.images import ingest

    ingest(ws, root, workers=1)
    labels.rename(ws, "T恤 / shirts", "cluster_07")
    plan = plan_workspace_export(ws)
    kinds = {w.kind: w for w in export_warnings(plan, labels.progress(ws))}
    assert kinds["default_name"].labels == ("cluster_07",)
    small = {label for label, per in plan.counts.items() if sum(per.values()) < 5}
    assert small == {"Bags"} and MIN_IMAGES_PER_LABEL == 5
    assert kinds["small_label"].labels == ("Bags",)
    assert kinds["missing"].labels == ("Bags",) and "bags/img4.png" in kinds["missing"].message
    # With the labels' own progress, Bags counts as reviewed (images excluded / unsure by
    # hand are decisions); cluster_07 was renamed, not reviewed.
    assert "cluster_07" in kinds["unreviewed"].labels and "Bags" not in kinds["unreviewed"].labels
    assert plan.n_left_out == sum(plan.left_out.values()) and plan.left_out["missing"] == 1


def _golden_items() -> list[ExportItem]:
    """60 images in 3 labels; 13 contents appear twice, some of them in two labels."""
    items = []
    for i in range(60):
        label = ("shoes", "hats", "bags")[i % 3] if i % 7 else "hats"
        items.append(ExportItem(f"/src/{i}.jpg", f"{i}.jpg", label, f"{(i * 37) % 47:02x}"))
    return items


@pytest.mark.parametrize(
    ("proportions", "random_state", "expected"),
    [
        (
            (0.8, 0.2),
            0,
            "trtrtrtrtrtrtrtrtrvavatrtrtrtrtrtrtrtrtrtrtrtrtrvatrvatrtrvatrvavatrtrtrtrtrva"
            "trtrtrtrtrvavatrtrtrtrtrtrtrtrtrtrvavatrtr",
        ),
        (
            (0.7, 0.15, 0.15),
            3,
            "tetrvatetrtrtrtrtrtevavatrtrtrtetrtrtrtrtrtrtrtrtrtrtrtrvatrtrtrtrvatrtetrtrtr"
            "trtetrtrtrtrvavatetrvatetrtrtrtrtrtevavatr",
        ),
    ],
)
def test_split_is_the_same_as_before_vectorising(proportions, random_state, expected) -> None:
    from imgcluster.export.plan import SPLIT_NAMES, split_counts

    # Golden splits made by the per-item Python loop `split_items` was before it was vectorised
    # (issue 15: 1M items): the same items and random_state must keep every image's split.
    items = _golden_items()
    splits = split_items(items, proportions, random_state=random_state)
    assert "".join(s[:2] for s in splits) == expected
    assert split_items([], proportions) == []
    # The preview's counts (no split name per image) are those of the per-image split.
    counted = split_counts(
        [i.label for i in items], [i.sha256 for i in items], proportions, random_state=random_state
    )
    per_image = Counter(zip([i.label for i in items], splits, strict=True))
    assert counted == {
        label: {s: per_image[(label, s)] for s in SPLIT_NAMES[len(proportions)]}
        for label in sorted({i.label for i in items})
    }
