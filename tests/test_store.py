from pathlib import Path

import pytest

from saffron.errors import SaffronError
from saffron.store import RecordStore, atomic_write_json, read_jsonl


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    s = RecordStore(p)
    s.append({"id": "a", "x": 1})
    s.append({"id": "b", "x": 2})
    with p.open("a") as f:
        f.write('{"id": "c", "x"')  # a run killed mid-write
    s2 = RecordStore(p)
    assert set(s2.records) == {"a", "b"}
    s2.append({"id": "c", "x": 3})
    assert [o["id"] for _, o in read_jsonl(p)] == ["a", "b", "c"]


def test_malformed_line_names_its_number(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1}\n\nnot json\n')
    with pytest.raises(SaffronError, match=r"bad.jsonl:3: malformed JSON"):
        list(read_jsonl(p))


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    atomic_write_json(tmp_path / "m.json", {"a": 2})
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]
    assert '"a": 2' in (tmp_path / "m.json").read_text()
