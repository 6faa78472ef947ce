"""The one atomic write: whole files or none."""

import stat

import pytest

from outlier_jebm.fileio import atomic_path, write_text_atomic


def test_the_target_appears_only_whole_and_an_error_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_text_atomic(target, "first")  # the folder is created
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the seco")
            assert target.read_text() == "first"  # not replaced while being written
            raise RuntimeError("stopped mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temporary file left behind


def test_a_mode_is_applied_to_the_finished_file(tmp_path):
    with atomic_path(tmp_path / "lib.so", mode=0o755) as tmp:
        tmp.write_bytes(b"\x7fELF")
    assert stat.S_IMODE((tmp_path / "lib.so").stat().st_mode) == 0o755
