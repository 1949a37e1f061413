"""Crash-safe file writes and the JSONL record store every run writes to.

A run can be killed at any moment; files are therefore either written whole (write to a temporary file, fsync,
rename) or appended one complete line at a time, and a torn last line is dropped when the file is reopened.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from saffron.errors import SaffronError


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Replace ``path`` with what ``write(tmp_path)`` produces, so that readers see the old or the new file,
    never a mix: ``write`` fills a temporary file beside ``path``, which is fsynced and renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; a malformed line is an error naming its number."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaffronError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SaffronError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


class RecordStore:
    """Append-only JSONL of finished items, keyed by ``key``; reopening resumes where a run stopped.

    Side effects: on open, a torn final line (a run killed mid-write) is truncated away.
    """

    def __init__(self, path: Path, key: str = "id") -> None:
        self.path = path
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._repair_tail()
            for _, rec in read_jsonl(path):
                self.records[str(rec[key])] = rec

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and fsync it, so a finished item is never lost."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[str(record[self.key])] = record
