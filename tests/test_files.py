"""write_atomically: a reader sees the old file or the new one, and after a crash the new one is whole."""
import os

import pytest

from fineclip_ds import files


def test_the_new_text_reaches_the_disk_before_the_rename_replaces_the_old_file(tmp_path, monkeypatch):
    """Without the fsync a crash right after the rename could leave `latest` renamed but empty."""
    target = tmp_path / "latest"
    target.write_text("step_00000002")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    files.write_atomically(target, "step_00000004", writer=1)
    assert events == ["fsync", "replace"]
    assert target.read_text() == "step_00000004"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomically(target, "new")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["summary.json"]
