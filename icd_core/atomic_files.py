"""Files written whole or not at all.

A study's report is read by the API while a worker writes it, and more than one process may write the
same file; the bytes therefore go to a temporary in the target's folder that is renamed over the target
(a rename within one filesystem is atomic), so a reader sees the old file or the complete new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # readable like a plain write would leave it (mkstemp creates 0600)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`Path.write_text`, but a concurrent reader never sees a half-written file."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
