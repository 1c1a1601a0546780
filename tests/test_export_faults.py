"""Export under storage faults and concurrency (issue 14 §4, §7, §8).

* Two exports to the same new OUT at once, without ``--overwrite``: exactly one succeeds and
  the other is refused (5 runs of two real processes started on a barrier).
* A read-only parent, ``/proc/self/x``, a full disk (a 1 MiB tmpfs when this user may mount
  one, and a 1 MiB ``RLIMIT_FSIZE`` everywhere): one line, exit 1, nothing half written left.
* A labeled image whose file is gone is reported as missing, with its label.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.errors import ExportError, ImgclusterError
from imgcluster.export import (
    ExportItem,
    export_items,
    plan_workspace_export,
    read_left_out,
    read_manifest,
    zip_export,
)
from tests.conftest import PROJECT
from tests.test_export import build_labeled_workspace


def _noise_items(root: Path, n: int, side: int = 160, label: str = "noise") -> list[ExportItem]:
    """``n`` incompressible PNGs (about ``3 * side**2`` bytes each)."""
    rng = np.random.default_rng(n)
    items = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"n{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        items.append(ExportItem(path, path.name, f"{label}{i % 3}", sha, format="PNG"))
    return items


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT,
        check=False,
        **kwargs,
    )


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- two exports at once ----------------------------------------------------------------------

_RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from imgcluster.errors import ImgclusterError
    from imgcluster.export import ExportItem, export_items
    spec, out, barrier, label = sys.argv[1:]
    rows = json.loads(Path(spec).read_text())
    items = [ExportItem(Path(s), r, label + l, h) for s, r, l, h in rows]
    while not Path(barrier).exists():
        time.sleep(0.001)
    try:
        export_items(items, out)
    except ImgclusterError as exc:
        print(f"refused: {exc}")
        sys.exit(1)
    print("ok")
    """
)


@pytest.mark.slow  # 10 processes
def test_two_exports_to_the_same_new_folder_one_is_refused(tmp_path: Path) -> None:
    import json

    items = _noise_items(tmp_path / "src", 60, side=64)
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps([[str(i.source), i.relpath, i.label, i.sha256] for i in items]))
    for run in range(5):
        out, barrier = tmp_path / f"out{run}", tmp_path / f"go{run}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(spec), str(out), str(barrier), who],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=PROJECT,
            )
            for who in ("first-", "second-")
        ]
        barrier.touch()
        results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 1], results
        refusal = next(o for c, o, _ in results if c == 1)
        assert "another export" in refusal or "already exists" in refusal, refusal
        winner = next(i for i, (c, _, _) in enumerate(results) if c == 0)
        prefix = ("first-", "second-")[winner]
        rows = read_manifest(out)  # the winner's export, whole: never a mix, never replaced
        assert len(rows) == len(items) and all(r["label"].startswith(prefix) for r in rows)
        assert _leftovers(tmp_path) == [], run


# -- read-only, /proc, full disk --------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=1m", *options]), "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into: a read-only mount for root, mode 0555 otherwise."""
    if os.geteuid() == 0:
        with _tmpfs(tmp_path / "ro", "ro") as folder:
            yield folder
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@pytest.mark.slow  # a CLI subprocess
def test_export_to_a_read_only_parent_is_one_line(tmp_path: Path) -> None:
    ws, _root = build_labeled_workspace(tmp_path)
    with _read_only_folder(tmp_path) as ro:
        with pytest.raises(ExportError, match=r"cannot write the export in .*; choose"):
            from imgcluster.export import export_workspace

            export_workspace(ws, ro / "dataset")
        line = _one_line(_cli("export", "--workspace", str(ws.path), str(ro / "dataset")))
        assert (str(ro) in line and "read-only" in line.lower()) or "permission" in line.lower()
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("target", ["/proc/self/x", "/proc/self/x/y"])
def test_export_into_proc_is_one_line(tmp_path: Path, target: str) -> None:
    ws, _root = build_labeled_workspace(tmp_path)
    line = _one_line(_cli("export", "--workspace", str(ws.path), target))
    assert "/proc/" in line and "cannot" in line


def test_zip_and_export_onto_a_full_disk_leave_nothing(tmp_path: Path) -> None:
    items = _noise_items(tmp_path / "src", 20)  # ~1.5 MB of PNGs: more than the disk holds
    out = tmp_path / "out"
    export_items(items, out)
    with _tmpfs(tmp_path / "tiny") as tiny:
        with pytest.raises(ExportError, match=r"cannot write the zip in .*no space left"):
            zip_export(out, tiny / "out.zip")
        assert list(tiny.iterdir()) == []
        with pytest.raises(ExportError, match="no space left on device; free some space"):
            export_items(items, tiny / "dataset")
        assert list(tiny.iterdir()) == []
        assert _leftovers(tmp_path) == []


def _fsize_limited() -> None:
    """In the child: writes past 1 MiB fail with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow  # a CLI subprocess
def test_zip_past_the_file_size_limit_is_one_line(tmp_path: Path) -> None:
    ws, root = build_labeled_workspace(tmp_path)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 KB each as PNG
    for name in ("img0.png", "img2.png", "img4.png"):
        # Same labels, heavier pixels: re-ingest so the export verifies them as ingested.
        Image.fromarray(big[::-1] if name == "img2.png" else big).save(root / "shirts" / name)
    from imgcluster.images import ingest

    ingest(ws, root, workers=1)
    out = tmp_path / "dataset"
    args = ["export", "--workspace", str(ws.path), str(out), "--zip"]
    line = _one_line(_cli(*args, preexec_fn=_fsize_limited))
    assert "cannot write the zip" in line and str(tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dataset")) == []
    assert not (tmp_path / "dataset.zip").exists()


# -- missing files ----------------------------------------------------------------------------


def test_a_labeled_image_whose_file_is_gone_is_reported_with_its_label(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from imgcluster.cli import cli

    ws, root = build_labeled_workspace(tmp_path)
    (root / "shoes" / "img3.jpg").unlink()
    out = tmp_path / "dataset"
    result = CliRunner().invoke(cli, ["export", "--workspace", str(ws.path), str(out)])
    assert result.exit_code == 0, result.output
    assert "missing" in result.output and "shoes/img3.jpg (CON)" in result.output
    assert read_left_out(out) == [{"source": "shoes/img3.jpg", "label": "CON", "reason": "missing"}]
    assert "shoes/img3.jpg" not in {r["source"] for r in read_manifest(out)}


def test_a_labeled_image_missing_at_ingest_stays_in_the_plan_as_missing(tmp_path: Path) -> None:
    """Deleted and re-ingested (its row is now ``missing``): the plan and the export list it
    as missing with its label, instead of dropping it (``left_out {}``)."""
    from imgcluster.export import export_warnings, export_workspace
    from imgcluster.images import ingest

    ws, root = build_labeled_workspace(tmp_path)
    (root / "bags" / "img4.png").unlink()
    ingest(ws, root, workers=1)
    plan = plan_workspace_export(ws)
    assert plan.left_out.get("missing") == 1
    assert [(x.relpath, x.label) for x in plan.left_out_files] == [("bags/img4.png", "Bags")]
    assert "missing" in {w.kind for w in export_warnings(plan)}
    result = export_workspace(ws, tmp_path / "out")
    assert result.left_out["missing"] == 1
    assert read_left_out(tmp_path / "out") == [
        {"source": "bags/img4.png", "label": "Bags", "reason": "missing"}
    ]


def test_errors_are_imgcluster_errors() -> None:
    assert issubclass(ExportError, ImgclusterError)


@pytest.mark.parametrize("case", ["parent is a file", "name too long", "zip onto a device"])
def test_unusable_targets_are_one_line_errors(tmp_path: Path, case: str) -> None:
    items = _noise_items(tmp_path / "src", 3, side=8)
    (tmp_path / "afile").write_text("x")
    if case == "zip onto a device":
        export_items(items, tmp_path / "out")
        with pytest.raises(ExportError, match="not a regular file"):
            zip_export(tmp_path / "out", "/dev/null")
        assert Path("/dev/null").is_char_device()
        assert not list(Path("/dev").glob(".null.*"))
        return
    out = tmp_path / "afile" / "dataset" if case == "parent is a file" else tmp_path / ("x" * 300)
    with pytest.raises(ExportError) as info:
        export_items(items, out)
    assert "\n" not in str(info.value) and "cannot write the export" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_an_export_in_progress_blocks_a_second_export_and_a_zip_of_it(tmp_path: Path) -> None:
    """While one export of OUT runs (it holds OUT's lock), another export to OUT and a zip of
    OUT are refused at once with `Busy`, naming OUT; both work once it is done."""
    from imgcluster._process import acquire
    from imgcluster.errors import Busy
    from imgcluster.export.staging import lock_path

    items = _noise_items(tmp_path / "src", 3, side=8)
    out = tmp_path / "out"
    export_items(items, out)
    lock = acquire(lock_path(out), what="export (test)")
    try:
        with pytest.raises(Busy, match=r"another export to .*out is running"):
            export_items(items, out, overwrite=True)
        with pytest.raises(Busy, match=r"another export to .*out is running"):
            zip_export(out)
    finally:
        lock.release()
    assert len(read_manifest(out)) == 3
    assert zip_export(out).is_file()
    export_items(items, out, overwrite=True)
    assert _leftovers(tmp_path) == []
