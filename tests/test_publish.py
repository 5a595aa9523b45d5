"""Atomic publication: the destination holds the old thing or the whole new one; a failed block leaves no trace."""

import hashlib
import stat

import pytest

from torchat import publish


def test_a_directory_replaces_the_old_one_only_when_its_block_succeeds(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publish.publish_dir(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "old.txt").read_text() == "old"
    with publish.publish_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in final.iterdir()] == ["new.txt"]
    assert stat.S_IMODE(final.stat().st_mode) == publish.DIR_MODE


def test_a_file_keeps_its_final_name_while_it_is_written(tmp_path):
    final = tmp_path / "sub" / "model.pt2"
    with pytest.raises(RuntimeError):
        with publish.publish_file(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert list((tmp_path / "sub").iterdir()) == []
    with publish.publish_file(final) as tmp:
        assert tmp.name == "model.pt2" and tmp.parent.parent == final.parent
        tmp.write_bytes(b"whole")
    publish.write_file(final, b"again")
    assert [p.name for p in final.parent.iterdir()] == ["model.pt2"] and final.read_bytes() == b"again"
    assert stat.S_IMODE(final.stat().st_mode) == publish.FILE_MODE
    assert publish.sha256_file(final) == hashlib.sha256(b"again").hexdigest()


def test_sweep_and_remove_leave_other_names_alone(tmp_path):
    for name in (".tmp-abc-1", ".tmp-abc-old-2", ".tmp-abd-1", "abc-kept"):
        (tmp_path / name).mkdir()
    publish.sweep(tmp_path, ".tmp-abc-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-abd-1", "abc-kept"]
    assert publish.remove_dir(tmp_path / "abc-kept") and not publish.remove_dir(tmp_path / "abc-kept")
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-abd-1"]


def test_the_lock_takes_a_file_or_a_directory_and_is_released(tmp_path):
    for path in (tmp_path / "x.lock", tmp_path):
        with publish.locked(path):
            pass
        with publish.locked(path):
            pass
    assert (tmp_path / "x.lock").is_file()
