"""A real small filesystem for disk-full tests: a size-limited tmpfs (needs root).

`small_disk` mounts it and unmounts it at the end; `SmallDisk.fill` takes every free byte
(ENOSPC is then what SQLite gets, as on a full SD card), `SmallDisk.free_up` gives it back.
Without root, or where mounting is not allowed (an unprivileged container), the test is
skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class SmallDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self) -> int:
        """Take every free byte; return how many were taken."""
        taken = 0
        chunk = b"\0" * 4096
        with self._filler.open("ab", buffering=0) as filler:
            while True:
                try:
                    taken += filler.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return taken

    def free_up(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[SmallDisk]:
    """A tmpfs of `size` (`2m`) mounted at `where` (created) for the block."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root (the suite runs as root in CI)")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(where)
    finally:
        # Lazy: a daemon that a failed test left running must not keep it mounted.
        subprocess.run(["umount", "-l", str(where)], check=False)
