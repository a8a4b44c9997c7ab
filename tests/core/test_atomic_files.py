"""Report files are replaced whole: a failed write keeps the previous file and leaves no temporary."""

from __future__ import annotations

from pathlib import Path

import pytest

from icd_core.atomic_files import replaced_atomically, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_text_atomic(target, "old\n")
    with pytest.raises(OSError), replaced_atomically(target) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) == oct(0o644)
