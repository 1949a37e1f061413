"""Typed errors: each kind has its own exit code and HTTP status, and the CLI and the server go by the type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from saffron.cli import main
from saffron.errors import (
    ERROR_TYPES,
    BudgetError,
    BusyError,
    ContextLengthError,
    IncompatibleError,
    InputError,
    NotFoundError,
    SaffronError,
    UnavailableError,
)

# type: (exit code, HTTP status, OpenAI-style error code)
TABLE: dict[type[SaffronError], tuple[int, int, str | None]] = {
    SaffronError: (2, 400, None),
    InputError: (2, 400, None),
    ContextLengthError: (2, 400, "context_length_exceeded"),
    NotFoundError: (3, 404, "not_found"),
    IncompatibleError: (4, 422, "incompatible"),
    UnavailableError: (5, 503, "unavailable"),
    BusyError: (6, 503, "server_busy"),
    BudgetError: (7, 400, "kv_budget_exceeded"),
}


def test_the_table_covers_every_error_type() -> None:
    assert set(TABLE) == set(ERROR_TYPES)
    assert all(issubclass(t, SaffronError) for t in ERROR_TYPES)  # ``except SaffronError`` catches them all


@pytest.mark.parametrize("kind", list(TABLE))
def test_each_type_carries_its_codes(kind: type[SaffronError]) -> None:
    assert (kind.exit_code, kind.http_status, kind.api_code) == TABLE[kind]


@pytest.mark.parametrize("kind", list(TABLE))
def test_the_cli_exits_with_the_types_code_on_one_line(kind: type[SaffronError], monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise kind("the problem, in words")

    monkeypatch.setattr("saffron.cli.app", fail)
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == TABLE[kind][0]
    assert capsys.readouterr().err == "error: the problem, in words\n"


def test_raise_sites_the_cli_and_server_classify(tmp_path: Path) -> None:
    from saffron.data import load_dataset
    from saffron.model import load_model

    with pytest.raises(NotFoundError):
        load_model(str(tmp_path / "missing-folder"))
    with pytest.raises(NotFoundError):
        load_dataset(f"jsonl:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(InputError):
        load_dataset(f"jsonl:{bad}")


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", "/nonexistent/never-written"])
    assert e.value.code == UnavailableError.exit_code
    assert capsys.readouterr().err == ("error: saffron compare (its ASR-vs-TFLOP plot) needs matplotlib, which is "
                                       "not installed: pip install 'saffron[plot]'\n")


def test_serve_without_its_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "saffron.serve" or m.startswith("saffron.serve.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "1"])
    assert e.value.code == UnavailableError.exit_code
    assert capsys.readouterr().err == ("error: saffron serve needs fastapi, which is not installed: "
                                       "pip install 'saffron[serve]'\n")
