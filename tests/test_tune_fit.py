"""``--tuned`` holds only for what the choice was made with: policy, reward model, MRM, min/max new tokens."""

import json
from pathlib import Path
from typing import Any

import pytest

from saffron.cli import main
from saffron.config import EvalConfig, check_tuning_fit, resolve
from saffron.errors import IncompatibleError
from saffron.tune import apply_tuning
from tests.test_tune import _dataset, _fit, _tuning_file


def _line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    line = err[err.index("error: "):]
    assert line.count("\n") == 1  # one line, no traceback
    return line


def _eval(tmp_path: Path, tiny_dir: Path, path: Path, *more: str) -> list[str]:
    guard = f"llama-guard-3:{tiny_dir}"
    return ["eval", "--method", "best-of-n", "-o", "n=1", "--policy", str(tiny_dir), "--judge", guard,
            "--reward", guard, "--prefill-tokens", "2", "--max-new-tokens", "2", "--limit", "1",
            "--dataset", _dataset(tmp_path, "test"), "--tuned", str(path), "--out", str(tmp_path / "e"), *more]


@pytest.mark.parametrize(("over", "named"), [
    ({"reward": "head-prm"}, "reward head-prm (this run: llama-guard-3:"),
    ({"policy": "smollm2-135m-instruct"}, "policy smollm2-135m-instruct (this run: "),
    ({"min_new_tokens": 0}, "min_new_tokens 0 (this run: 2)"),
    ({"max_new_tokens": 32, "min_new_tokens": 16}, "min_new_tokens 16 (this run: 2), max_new_tokens 32 (this run: 2)"),
])
def test_eval_refuses_a_choice_made_for_other_models_or_lengths(over: dict[str, object], named: str, tmp_path: Path,
                                                                tiny_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _tuning_file(tmp_path, {"best-of-n": {"temperature": 1.0}}, fit=_fit(tiny_dir, **over))
    line = _line(capsys, _eval(tmp_path, tiny_dir, path), IncompatibleError.exit_code)
    assert line.startswith(f"error: --tuned {path} chose best-of-n's options with {named}"), line
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_compare_refuses_it_per_method_and_leaves_variants_untuned(tmp_path: Path, tiny_dir: Path) -> None:
    from saffron.compare import CompareConfig, point_config, validate_compare

    spec = _dataset(tmp_path, "test")
    path = _tuning_file(tmp_path, {"best-of-n": {"temperature": 1.0}}, fit=_fit(tiny_dir, max_new_tokens=3,
                                                                                  min_new_tokens=3))
    opts, record, _ = apply_tuning(path, ("best-of-n", "best-of-n@hot"), {"best-of-n@hot": {"temperature": 2.0}},
                                   spec, None)
    guard = f"llama-guard-3:{tiny_dir}"
    base = EvalConfig(dataset=spec, policy=str(tiny_dir), judges=(guard,), reward=guard,
                      method_options={"max_new_tokens": 3}, tuning=record)
    cc = CompareConfig(methods=("best-of-n", "best-of-n@hot"), budgets=(1,), base=base, method_options=opts,
                       target_tflops=1.0)
    validate_compare(cc)  # it fits
    assert point_config(cc, "best-of-n", 1).as_dict()["tuning"]["options"] == {"temperature": 1.0}
    hot = point_config(cc, "best-of-n@hot", 1)  # a variant is its own configuration: never tuned
    assert "tuning" not in hot.as_dict() and hot.method_options["temperature"] == 2.0
    # the same choice, with another reward for best-of-n alone: refused, naming the method's reward
    cc.method_options["best-of-n"]["reward"] = "head-prm"
    with pytest.raises(IncompatibleError, match="chose best-of-n's options with reward llama-guard-3"):
        validate_compare(cc)
    # ... while the variant may use any: it is not tuned
    del cc.method_options["best-of-n"]["reward"]
    cc.method_options["best-of-n@hot"]["reward"] = "head-prm"
    validate_compare(cc)


def test_a_file_written_before_the_fit_reads_it_from_its_points(tmp_path: Path, tiny_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    old = _tuning_file(tmp_path, {"best-of-n": {"temperature": 1.0}})
    line = _line(capsys, _eval(tmp_path, tiny_dir, old), 2)
    assert line.startswith(f"error: --tuned {old} does not record the policy, models and lengths best-of-n's choice "
                           "was made with"), line
    # the tune's folders are at hand (beside the file, as tune leaves them): the fit is their config.json's
    point = tmp_path / "grid-0" / "points" / "best-of-n-n32"
    point.mkdir(parents=True)
    t = json.loads(old.read_text())
    t["methods"]["best-of-n"]["configs"] = [{"records": f"elsewhere/tune/grid-0/points/{point.name}/records.jsonl"}]
    old.write_text(json.dumps(t))
    fit = _fit(tiny_dir)
    cfg: dict[str, Any] = {"policy": fit["policy"], "reward": fit["reward"], "mrm": None,
           "method_options": {"min_new_tokens": 16, "max_new_tokens": 2}}
    (point / "config.json").write_text(json.dumps(cfg))
    line = _line(capsys, _eval(tmp_path, tiny_dir, old), IncompatibleError.exit_code)
    assert "min_new_tokens 16 (this run: 2)" in line
    cfg["method_options"]["min_new_tokens"] = 2
    (point / "config.json").write_text(json.dumps(cfg))
    _, record, _ = apply_tuning(old, ("best-of-n",), {}, _dataset(tmp_path, "test"), None)
    assert record["fit"]["best-of-n"] == fit
    run = resolve(EvalConfig(method="best-of-n", policy=str(tiny_dir), reward=fit["reward"],
                             method_options={"max_new_tokens": 2, "temperature": 1.0}, tuning=record))
    check_tuning_fit(run)  # fits: nothing raised
    with pytest.raises(IncompatibleError, match=r"reward llama-guard-3:.* \(this run: smol-guard\)"):  # the default
        check_tuning_fit(resolve(EvalConfig(method="best-of-n", policy=str(tiny_dir), tuning=record,
                                            method_options={"max_new_tokens": 2, "temperature": 1.0})))
