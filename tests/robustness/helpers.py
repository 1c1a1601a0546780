"""Helpers shared by the robustness tests: run the CLI with file permissions enforced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import CLOTHING, PROJECT

__all__ = ["CLOTHING", "PROJECT", "can_enforce_permissions", "imgcluster", "unprivileged"]

#: Capabilities that let root read any file; dropped so permission cases behave as for users.
_CAPS = "-dac_override,-dac_read_search"


def can_enforce_permissions() -> bool:
    """Whether file permissions can be made to apply to our subprocesses."""
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def unprivileged(command: list[str]) -> list[str]:
    """``command`` with root's permission override dropped (unchanged for normal users)."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", f"--inh-caps={_CAPS}", f"--bounding-set={_CAPS}", *command]
    return command


def imgcluster(*args: str, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
    """Run the real ``imgcluster`` CLI (this interpreter, this checkout) in a subprocess."""
    command = unprivileged([sys.executable, "-m", "imgcluster.cli", *args])
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **{"cwd": PROJECT, **kwargs},
    )
