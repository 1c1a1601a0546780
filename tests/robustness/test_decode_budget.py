"""Memory and time budgets for decoding (issue 14 §3), under a real address-space cap.

The files that once cost gigabytes: a 343-byte 89000x1 PNG (extraction tried ~17.5 GB), an
8000x1 PNG, four 9400x9500 16-bit greyscale PNGs (2.5 GB each at ingest in float64 copies) and
a 20 GB sparse file named .jpg. Ingest and then extraction run as the real CLI under
``prlimit --as=3G``: both exit 0, every refused file has its reason, and the peak RSS stays
below `INGEST_RSS_MB` / `EXTRACT_RSS_MB`.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcluster.errors import ImageRejected
from imgcluster.images import MAX_ASPECT_RATIO, open_rgb
from imgcluster.workspace import Workspace
from tests.conftest import PROJECT, SAMPLE_DATA

AS_LIMIT = 3 << 30
#: Measured on the 2-core CI machine: ingest 475 MB (at most two big decodes at once), extract
#: 349 MB (TFLite). Before the fix one such PNG cost 2.5 GB at ingest (issue 14 §3).
INGEST_RSS_MB = 1000
EXTRACT_RSS_MB = 1500


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_extreme_aspect_ratio_is_refused_from_the_header() -> None:
    strip = _png(Image.new("L", (89_000, 1), 128))
    assert len(strip) < 1000
    with pytest.raises(ImageRejected, match="extreme aspect ratio: 89000x1"):
        open_rgb(strip)
    ok = _png(Image.new("RGB", (MAX_ASPECT_RATIO * 4, 4), (10, 20, 30)))
    assert open_rgb(ok).width == MAX_ASPECT_RATIO * 4


def test_sixteen_bit_draft_decode_is_scaled_and_small() -> None:
    ramp = np.linspace(0, 65535, 2000 * 1800).reshape(1800, 2000).astype(np.uint16)
    data = _png(Image.fromarray(ramp))
    full = open_rgb(data)
    small = open_rgb(data, draft_size=(256, 256))
    assert full.image.size == (2000, 1800)
    assert 256 <= min(small.image.size) < 512 and (small.width, small.height) == (2000, 1800)
    # Scaled, not clipped: the ramp spans black to white in both.
    for decoded in (full, small):
        low, high = decoded.image.convert("L").getextrema()
        assert low <= 2 and high >= 253


def _rss(stderr: str) -> int:
    match = re.search(r"maxrss_kb=(\d+)", stderr)
    assert match, stderr
    return int(match.group(1)) // 1024


def _capped(*args: str) -> subprocess.CompletedProcess:
    command = [
        "/usr/bin/time",
        "-f",
        "maxrss_kb=%M",
        "prlimit",
        f"--as={AS_LIMIT}",
        sys.executable,
        "-m",
        "imgcluster.cli",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=PROJECT, timeout=600
    )


@pytest.mark.slow  # ~30 s: four 89-megapixel decodes and a real extraction
@pytest.mark.skipif(
    not (shutil.which("prlimit") and Path("/usr/bin/time").exists()), reason="needs prlimit, time"
)
def test_ingest_and_extract_stay_within_3_gb(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for path in sorted((SAMPLE_DATA / "images").glob("*.jpg"))[:3]:
        shutil.copy(path, root / path.name)
    (root / "strip_89000x1.png").write_bytes(_png(Image.new("L", (89_000, 1), 200)))
    (root / "strip_8000x1.png").write_bytes(_png(Image.new("L", (8000, 1), 200)))
    big = (np.add.outer(np.arange(9500), np.arange(9400)) % 65536).astype(np.uint16)
    data = _png(Image.fromarray(big))
    del big
    for i in range(4):
        (root / f"grey16_{i}.png").write_bytes(data)
    with open(root / "sparse_20g.jpg", "wb") as fh:
        fh.truncate(20 << 30)
    ws_path = tmp_path / "ws"

    ingest = _capped("ingest", str(root), "--workspace", str(ws_path))
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    ingest_mb = _rss(ingest.stderr)
    ws = Workspace(ws_path)
    reasons = dict(ws.skipped())
    assert reasons["strip_89000x1.png"].startswith("extreme aspect ratio: 89000x1")
    assert reasons["strip_8000x1.png"].startswith("extreme aspect ratio: 8000x1")
    assert reasons["sparse_20g.jpg"].startswith("file too large")
    assert len(reasons) == 3
    assert ws.image_counts()["ok"] == 7  # 3 photos + 4 greys (three are duplicates)

    extract = _capped("extract", "--workspace", str(ws_path))
    assert extract.returncode == 0, extract.stderr[-2000:]
    assert "failed     0" in extract.stdout, extract.stdout
    extract_mb = _rss(extract.stderr)
    print(f"peak RSS: ingest {ingest_mb} MB, extract {extract_mb} MB")
    assert ingest_mb < INGEST_RSS_MB
    assert extract_mb < EXTRACT_RSS_MB
