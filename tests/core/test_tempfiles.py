"""Leftovers of writers that died are recognised at once; a live writer's work is never touched."""

from __future__ import annotations

import signal
import subprocess
import sys

from recsvc.core import tempfiles

HOLDER = """
import sys, time
from recsvc.core import tempfiles
tempfiles.hold(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _held_by_child(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_writers_folder_and_file_are_swept_a_live_ones_are_not(tmp_path):
    dead_dir, dead_file, live_file = (
        tmp_path / ".tmp-v1-1",
        tmp_path / ".out.1.part",
        tmp_path / ".out.2.part",
    )
    dead_dir.mkdir()
    (dead_dir / "item_factors.npy").write_bytes(b"x")
    dead_file.write_bytes(b"rows")
    live_file.write_bytes(b"rows")
    killed = [_held_by_child(dead_dir), _held_by_child(dead_file)]
    live = _held_by_child(live_file)
    try:
        for proc in killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert not tempfiles.abandoned(live_file)
        removed = tempfiles.sweep([dead_dir, dead_file, live_file])
        assert sorted(removed) == sorted([dead_dir, dead_file])
        assert not dead_dir.exists() and not dead_file.exists() and live_file.exists()
    finally:
        live.kill()
        live.wait(10)
    assert tempfiles.sweep([live_file]) == [live_file]  # its writer is gone now


def test_a_path_held_in_this_process_is_not_swept_until_released(tmp_path):
    path = tmp_path / ".x.part"
    path.write_bytes(b"")
    fd = tempfiles.hold(path)
    assert tempfiles.sweep([path]) == [] and path.exists()
    tempfiles.release(fd)
    assert tempfiles.sweep([path]) == [path]
