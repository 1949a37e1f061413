import hashlib
import zipfile
from pathlib import Path

import pytest

from saffron import wheels
from saffron.errors import SaffronError


def _fake_wheel(dirpath: Path) -> tuple[Path, str]:
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake/data/keep.txt", "kept")
        zf.writestr("fake/code.py", "print('not extracted')")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_extracts_only_listed_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFFRON_HOME", str(tmp_path))
    _, sha = _fake_wheel(tmp_path / "wheels")
    w = wheels.PinnedWheel("fake", "1.0", "fake-1.0-py3-none-any.whl", sha, ("fake/data/",))
    out = wheels.ensure_extracted(w)
    assert (out / "fake/data/keep.txt").read_text() == "kept"
    assert not (out / "fake/code.py").exists()
    assert wheels.ensure_extracted(w) == out  # second call reuses the extraction


def test_hash_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFFRON_HOME", str(tmp_path))
    _fake_wheel(tmp_path / "wheels")
    w = wheels.PinnedWheel("fake", "1.0", "fake-1.0-py3-none-any.whl", "0" * 64, ("fake/data/",))
    with pytest.raises(SaffronError, match="hash mismatch"):
        wheels.ensure_extracted(w)
    assert not (tmp_path / "data" / "fake-1.0").exists()


def test_new_members_are_added_to_an_old_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFFRON_HOME", str(tmp_path))
    _, sha = _fake_wheel(tmp_path / "wheels")
    old = wheels.PinnedWheel("fake", "1.0", "fake-1.0-py3-none-any.whl", sha, ("fake/data/",))
    out = wheels.ensure_extracted(old)
    (out / ".complete").write_text(sha + "\n")  # the stamp an older saffron wrote
    new = wheels.PinnedWheel("fake", "1.0", "fake-1.0-py3-none-any.whl", sha, ("fake/data/", "fake/code.py"))
    assert wheels.ensure_extracted(new) == out
    assert (out / "fake/code.py").exists() and (out / "fake/data/keep.txt").read_text() == "kept"
    assert "fake/code.py" in (out / ".complete").read_text()
