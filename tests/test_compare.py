"""``saffron compare`` on the tiny model: matched compute, one folder per point, table, JSON and plot."""

import json
from pathlib import Path

import pytest

from saffron.cli import main
from saffron.compare import CompareConfig, budget_knob, degenerate_share, run_compare, scaleff
from saffron.errors import SaffronError
from saffron.evaluate import EvalConfig


def _dataset(tmp_path: Path, n: int = 3) -> str:
    p = tmp_path / "ds.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, {i} is"}) + "\n"
                         for i in range(n)))
    return f"jsonl:{p}"


def _base(tmp_path: Path, tiny_dir: Path) -> EvalConfig:
    return EvalConfig(dataset=_dataset(tmp_path), policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",),
                      reward=f"llama-guard-3:{tiny_dir}", prefill_tokens=2, method_options={"max_new_tokens": 3})


def test_every_search_method_names_its_budget_knob() -> None:
    assert {m: budget_knob(m) for m in ("none", "best-of-n", "rejection", "rebase", "deal-mcts", "saffron")} == {
        "none": None, "best-of-n": "n", "rejection": "n", "rebase": "width", "deal-mcts": "simulations",
        "saffron": "width"}


def test_compare_matches_compute_to_best_of_n(tmp_path: Path, tiny_dir: Path) -> None:
    cc = CompareConfig(methods=("none", "best-of-n", "rebase"), budgets=(1, 2), base=_base(tmp_path, tiny_dir),
                       method_options={"rebase": {"children": 2}}, limit=2)
    out = tmp_path / "cmp"
    res = run_compare(cc, out, progress=False)
    # the target is Best-of-N's compute at N=32, evaluated although it is not in the sweep
    bon32 = json.loads((out / "points" / "best-of-n-n32" / "metrics.json").read_text())
    assert res["target_tflops"] == pytest.approx(bon32["tflops_per_prompt"])
    assert res["methods"]["best-of-n"]["budget"] == 32
    reb = res["methods"]["rebase"]
    assert reb["knob"] == "width" and reb["budget"] > 2  # the sweep's points were too cheap: it searched upwards
    assert res["methods"]["none"]["budget"] is None and res["methods"]["none"]["n"] == 2
    # the guards' instructions are reported once per point, beside (not inside) the per-prompt figure
    assert set(res["methods"]["none"]["setup_tflops"]) == {"judge"}
    assert set(res["methods"]["best-of-n"]["setup_tflops"]) == {"judge", "reward"}
    assert json.loads((out / "metrics.json").read_text())["rebase"]["setup_tflops"]["reward"] > 0
    for m in ("none", "best-of-n", "rebase"):
        assert set(res["curves"][m][0]) and all(len(p) == 3 for p in res["curves"][m])
    assert [p[0] for p in res["curves"]["best-of-n"]] == [1, 2, 32]
    md = (out / "comparison.md").read_text()
    assert all(f"| {m} |" in md for m in cc.methods)
    assert (out / "asr_vs_tflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a re-run resumes every point: same figures, nothing recomputed
    before = {p: p.stat().st_mtime_ns for p in out.glob("points/*/records.jsonl")}
    again = run_compare(cc, out, progress=False)
    assert again["methods"] == res["methods"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/records.jsonl")} == before


def test_compare_cli_json(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --no-sweep: each method's own budgets are only first guesses for the matching search
    main(["compare", "--methods", "none,best-of-n", "--no-sweep", "--method-budgets", "best-of-n=2",
          "--target-tflops", "1e-9",
          "--dataset", _dataset(tmp_path), "--policy", str(tiny_dir), "--judge", f"llama-guard-3:{tiny_dir}",
          "--reward", f"llama-guard-3:{tiny_dir}", "--prefill-tokens", "2", "--max-new-tokens", "2", "--limit", "1",
          "--out", str(tmp_path / "c"), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert set(got["methods"]) == {"none", "best-of-n"}
    for d in got["methods"].values():
        assert {"asr", "tflops_per_prompt", "scaleff", "n"} <= set(d) and d["n"] == 1
    assert got["methods"]["best-of-n"]["budget"] == 1  # halved from 2 towards the (tiny) target
    assert sorted(p.name for p in (tmp_path / "c" / "points").iterdir()) == ["best-of-n-n1", "best-of-n-n2", "none"]


@pytest.mark.parametrize(("argv", "msg"), [
    (["--budgets", "0,2"], "budgets must be positive"),
    (["--budgets", "a"], "--budgets must be comma-separated integers"),
    (["--methods", "none,magic"], "unknown method 'magic'"),
    (["--opt", "saffron:width=2", "--methods", "none"], "not in --methods"),
    (["--opt", "best-of-n:top_p=2"], "top_p must be in (0, 1]"),
    (["--target-tflops", "-1"], "--target-tflops must be positive"),
    (["--method-budgets", "rebase=2", "--methods", "none"], "which is not in --methods"),
    (["--method-budgets", "rebase"], "--method-budgets expects METHOD=B1,B2"),
])
def test_bad_compare_options_fail_before_loading_models(argv: list[str], msg: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(tmp_path / "c"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_scaleff_and_degenerate_share() -> None:
    assert scaleff(10.0, 1.0, 0.5) == pytest.approx(2 * 2.302585, rel=1e-5)
    assert scaleff(10.0, 1.0, 0.0) is None
    recs = [{"output_ids": []}, {"output_ids": [1, 2, 3, 4] * 3}, {"output_ids": list(range(12))}]
    assert degenerate_share(recs) == pytest.approx(2 / 3)
    with pytest.raises(SaffronError, match="no methods"):
        run_compare(CompareConfig(methods=()), Path("unused"))
