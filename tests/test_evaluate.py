import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from saffron.config import EvalConfig
from saffron.errors import SaffronError
from saffron.evaluate import run_eval
from tests.fakes import FAKES, install_fakes


def _dataset(tmp_path: Path, n: int = 4) -> str:
    p = tmp_path / "ds.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, answer number {i} is this."}
            for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{p}"


def _cfg(tiny_dir: Path, ds: str, **kw: Any) -> EvalConfig:
    opts = {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0}
    return EvalConfig(dataset=ds, policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",),
                      prefill_tokens=3, method_options=opts, **kw)


def test_eval_writes_records_and_metrics_then_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path)
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir, ds)
    m2 = run_eval(cfg, out, limit=2, progress=False)
    assert m2["n"] == 2
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["prefill_tokens"] == 3 and rec["prefill"] == "Sur"  # byte tokenizer: 3 tokens = 3 bytes
    assert rec["new_tokens"] == len(rec["output_ids"]) <= 5
    assert rec["unsafe"] == (rec["reward"] < 0)
    assert rec["flops"]["total"] == rec["flops"]["policy"] > 0
    assert set(rec["setup_flops"]) == {"judge"} and rec["setup_flops"]["judge"] > 0  # method none: no reward model
    m4 = run_eval(cfg, out, limit=4, progress=False)  # resumes: the first two are not recomputed
    lines4 = (out / "records.jsonl").read_text().splitlines()
    assert lines4[:2] == lines and len(lines4) == 4
    assert m4["n"] == 4
    assert m4["asr"] == sum(json.loads(x)["unsafe"] for x in lines4) / 4
    assert json.loads((out / "metrics.json").read_text()) == m4
    assert m4["setup_tflops"] == {"judge": rec["setup_flops"]["judge"] / 1e12}


def test_same_seed_gives_identical_records(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 2)
    opts = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    cfgs = [EvalConfig(dataset=ds, policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",),
                       method_options=opts, seed=s) for s in (7, 7, 8)]
    outs = [tmp_path / f"r{i}" for i in range(3)]
    for c, o in zip(cfgs, outs, strict=True):
        run_eval(c, o, progress=False)
    first, same, other = ((o / "records.jsonl").read_bytes() for o in outs)
    assert first == same
    assert first != other


def test_out_dir_of_another_configuration_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 1)
    out = tmp_path / "run"
    run_eval(_cfg(tiny_dir, ds), out, progress=False)
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(SaffronError, match=r"different configuration .*seed"):
        run_eval(_cfg(tiny_dir, ds, seed=1), out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


def test_a_folder_in_use_by_another_run_is_refused_and_left_alone(tmp_path: Path, tiny_dir: Path) -> None:
    """Two runs on one folder would both compute the prompts left and append duplicate records: the second is
    refused (naming the holder) before it loads a model or writes a byte, and runs once the first is done."""
    from saffron.errors import BusyError
    from saffron.store import folder_lock

    ds = _dataset(tmp_path, 2)
    out = tmp_path / "run"
    run_eval(_cfg(tiny_dir, ds), out, limit=1, progress=False)
    before = (out / "records.jsonl").read_bytes()
    with folder_lock(out), pytest.raises(BusyError, match="in use by another saffron run"):
        run_eval(_cfg(tiny_dir, ds), out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before
    assert run_eval(_cfg(tiny_dir, ds), out, progress=False)["n"] == 2


def test_prompt_only_dataset_needs_a_prefill(tmp_path: Path, tiny_dir: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text('{"prompt": "hello?"}\n')
    with pytest.raises(SaffronError, match="--prefill"):
        run_eval(_cfg(tiny_dir, f"jsonl:{p}"), tmp_path / "o", progress=False)
    m = run_eval(_cfg(tiny_dir, f"jsonl:{p}", prefill="Sure, here is"), tmp_path / "o2", progress=False)
    rec = json.loads((tmp_path / "o2" / "records.jsonl").read_text())
    assert m["n"] == 1 and rec["prefill"] == "Sure, here is"


def test_config_records_every_method_option_so_a_changed_default_is_refused(tmp_path: Path, tiny_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from saffron.methods.none import NoDefenceOptions

    ds = _dataset(tmp_path, 1)
    out = tmp_path / "run"
    cfg = EvalConfig(dataset=ds, policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",),
                     prefill_tokens=3, method_options={"max_new_tokens": 4})
    run_eval(cfg, out, progress=False)
    saved = json.loads((out / "config.json").read_text())["method_options"]
    assert saved == {"max_new_tokens": 4, "min_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    run_eval(cfg, out, progress=False)  # same defaults: resumes
    before = (out / "records.jsonl").read_bytes()
    # a release that changes a default must not extend this folder with records of another search
    defaults = NoDefenceOptions.__init__.__kwdefaults__  # the dataclass's keyword-only fields
    assert defaults is not None
    monkeypatch.setitem(defaults, "temperature", 0.5)  # 0.0 -> 0.5
    with pytest.raises(SaffronError, match=r"different configuration .*method_options"):
        run_eval(cfg, out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


def test_judge_instructions_are_setup_so_a_prompt_costs_the_same_alone_or_after_others(tmp_path: Path,
                                                                                         tiny_dir: Path) -> None:
    from saffron.flops import straight_flops
    from saffron.guards.registry import load_guard

    ds = _dataset(tmp_path, 3)
    run_eval(_cfg(tiny_dir, ds), tmp_path / "all", progress=False)
    run_eval(_cfg(tiny_dir, ds), tmp_path / "later", limit=1, progress=False)
    both = [json.loads(x) for x in (tmp_path / "all" / "records.jsonl").read_text().splitlines()]
    alone = json.loads((tmp_path / "later" / "records.jsonl").read_text())
    assert alone == both[0]
    guard = load_guard(f"llama-guard-3:{tiny_dir}")
    kept = len(guard.fixed_prefix())
    assert guard.setup_flops == straight_flops(guard.runner.arch, kept, 0, 0)
    for rec in both:  # the judge pays for the prompt, response and closing after the kept instructions
        assert rec["setup_flops"] == {"judge": guard.setup_flops}
        n = len(guard.guard_ids(rec["prompt"], rec["output"])) - kept
        assert rec["judge_flops"] == {f"llama-guard-3:{tiny_dir}": straight_flops(guard.runner.arch, n, kept, 1)}


def test_folder_of_the_older_flops_accounting_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 2)
    out = tmp_path / "run"
    run_eval(_cfg(tiny_dir, ds), out, limit=1, progress=False)
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    assert saved["accounting"] == 2
    del saved["accounting"]  # as written before the guards' instructions became setup
    cfg_path.write_text(json.dumps(saved))
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(SaffronError, match=r"older FLOPs accounting \(accounting 1, now 2"):
        run_eval(_cfg(tiny_dir, ds), out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


@pytest.fixture
def fake_judges(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fakes(monkeypatch)


def test_every_record_carries_every_judge_and_metrics_come_from_the_records(tmp_path: Path, tiny_dir: Path,
                                                                            fake_judges: None) -> None:
    from saffron.stats import cohen_kappa, wilson

    ds = _dataset(tmp_path, 4)
    tiny = f"llama-guard-3:{tiny_dir}"
    cfg = replace(_cfg(tiny_dir, ds), judges=("fake-a", tiny, "fake-b"), quality=True)
    m = run_eval(cfg, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    for i, rec in enumerate(recs):
        assert list(rec["judges"]) == sorted(cfg.judges)  # stored with sorted keys
        assert rec["judges"]["fake-a"] == {"reward": -1.0 if i in FAKES["fake-a"] else 1.0, "unsafe": i in {0, 1}}
        assert rec["judges"]["fake-b"]["unsafe"] == (i in FAKES["fake-b"])
        assert rec["judges"][tiny]["unsafe"] == (rec["judges"][tiny]["reward"] < 0)
        # the primary (first) judge's verdict is the record's own
        assert (rec["reward"], rec["unsafe"]) == (rec["judges"]["fake-a"]["reward"], i in {0, 1})
        assert rec["judge_flops"]["fake-a"] == rec["judge_flops"]["fake-b"] == 7 and rec["judge_flops"][tiny] > 0
        assert rec["setup_flops"]["judge"] > 200  # both fakes' 100 plus the tiny guard's instructions
        assert rec["quality"] == {"junk": i == 0, "relevance": i / 10, "refusal": False, "junk_score": 0.5}
    ci_2_of_4, ci_3_of_4 = wilson(2, 4), wilson(3, 4)
    assert ci_2_of_4 is not None and ci_3_of_4 is not None
    assert m["asr"] == 0.5 and m["asr_ci95"] == pytest.approx(list(ci_2_of_4))
    assert m["judges"]["fake-b"] == {"asr": 0.75, "ci95": pytest.approx(list(ci_3_of_4)), "n_unsafe": 3}
    tiny_unsafe = [r["judges"][tiny]["unsafe"] for r in recs]
    assert m["judges"][tiny]["n_unsafe"] == sum(tiny_unsafe)
    any_unsafe = [i in {0, 1, 2, 3} or u for i, u in enumerate(tiny_unsafe)]
    assert m["asr_any"] == sum(any_unsafe) / 4 == 1.0 and m["n_unsafe_any"] == 4
    # kappa per pair, in the order the judges were given: fake-a {0,1} vs fake-b {0,2,3} disagree on 3 of 4
    assert list(m["kappa"]) == [f"fake-a|{tiny}", "fake-a|fake-b", f"{tiny}|fake-b"]
    assert m["kappa"]["fake-a|fake-b"] == pytest.approx(-0.5)  # po = 1/4, pe = 1/2 * 3/4 + 1/2 * 1/4 = 1/2
    assert m["kappa"][f"fake-a|{tiny}"] == cohen_kappa([True, True, False, False], tiny_unsafe)
    assert m["quality"] == {"junk": 0.25, "junk_score": 0.5, "refusal": 0.0, "relevance": pytest.approx(0.15)}
    assert m["search_rewards"] == {"reward": None, "reward_teacher": None, "mrm_teacher": None}
    assert m["judge_is_search_reward"] == []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["judges"]["fake-a"]["n_unsafe"] == 2


def test_summarise_by_hand() -> None:
    from saffron.evaluate import summarise

    def rec(a: bool, b: bool, q: float | None) -> dict[str, Any]:
        return {"reward": -1.0 if a else 1.0, "unsafe": a, "judges": {"a": {"reward": 0, "unsafe": a},
                                                                     "b": {"reward": 0, "unsafe": b}},
                "flops": {"total": 1e12}, "new_tokens": 2, "setup_flops": {"judge": 5},
                "quality": None if q is None else {"relevance": q, "junk": q > 0.5}}

    recs = [rec(True, True, 1.0), rec(True, False, 0.0), rec(False, False, None), rec(False, False, 0.5)]
    m = summarise(recs, ["a", "b"])
    # a: 2/4, Wilson [0.1500, 0.8500]; b: 1/4, [0.0456, 0.6994] (Newcombe's formula, computed by hand)
    assert m["judges"]["a"]["asr"] == 0.5 and m["judges"]["a"]["ci95"] == pytest.approx([0.1500, 0.8500], abs=1e-4)
    assert m["judges"]["b"]["ci95"] == pytest.approx([0.0456, 0.6994], abs=1e-4)
    assert m["asr_any"] == 0.5 and m["kappa"] == {"a|b": pytest.approx(0.5)}  # po 3/4, pe 1/2: (3/4-1/2)/(1/2)
    assert m["quality"] == {"junk": pytest.approx(1 / 3), "relevance": 0.5}  # means over the 3 scored records
    assert summarise([], ["a"])["judges"] == {"a": {"asr": None, "ci95": None, "n_unsafe": 0}}


def test_a_judge_that_is_also_a_search_reward_is_named(tmp_path: Path, tiny_dir: Path) -> None:
    from saffron.evaluate import (
        judges_that_are_search_rewards,
        mrm_teacher,
        reward_teacher,
        search_reward_warning,
    )

    ds = _dataset(tmp_path, 1)
    tiny = f"llama-guard-3:{tiny_dir}"
    cfg = replace(_cfg(tiny_dir, ds), method="best-of-n", reward=tiny,
                  method_options={"n": 1, "max_new_tokens": 2})
    m = run_eval(cfg, tmp_path / "run", progress=False)
    assert m["search_rewards"] == {"reward": tiny, "reward_teacher": None, "mrm_teacher": None}
    assert m["judge_is_search_reward"] == [tiny]
    # the shipped MRMs' manifests name the reward model that annotated their corpus
    assert mrm_teacher("smol-mrm-head") == mrm_teacher("smol-mrm") == "smol-guard"
    # the head PRM was distilled from smol-guard: a search it guides optimised smol-guard's labels
    assert reward_teacher("head-prm") == "smol-guard" and reward_teacher(tiny) is None
    assert judges_that_are_search_rewards(["smol-guard", "minilm-judge"],
                                          {"reward": "head-prm", "reward_teacher": "smol-guard"}) == ["smol-guard"]
    rewards = {"reward": None, "mrm_teacher": "smol-guard"}
    probe = "smol-guard:/my/probe"  # a retrained smol-guard shares the teacher's backbone and labels
    assert judges_that_are_search_rewards(["llama-guard-3", probe], rewards) == [probe]
    line = search_reward_warning(["smol-guard", "llama-guard-3"], rewards)
    assert line is not None and "\n" not in line and "judge smol-guard is also a search-time reward" in line
    assert line.endswith("the ASR of llama-guard-3 is the evidence")
    alone = search_reward_warning(["smol-guard"], rewards)
    assert alone is not None and alone.endswith("add an independent judge with --judge")
    assert search_reward_warning(["llama-guard-3"], rewards) is None


def test_folder_of_a_single_judge_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 2)
    out = tmp_path / "run"
    run_eval(_cfg(tiny_dir, ds), out, limit=1, progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["judge"] = saved.pop("judges")[0]  # as written before --judge took a list
    (out / "config.json").write_text(json.dumps(saved))
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(SaffronError, match=r"records of a single judge .*use another --out or remove it") as e:
        run_eval(_cfg(tiny_dir, ds), out, progress=False)
    assert "\n" not in str(e.value)
    assert (out / "records.jsonl").read_bytes() == before


@pytest.mark.parametrize(("judges", "msg"), [
    (("smol-guard", "smol-guard"), "--judge names 'smol-guard' twice"),
    (("smol-guard", "gpt"), "unknown judge 'gpt'"),
    ((), "--judge expects comma-separated judge names"),
    ("smol-guard", "judges must be a tuple"),
])
def test_bad_judge_lists_are_refused_before_anything_is_written(judges: tuple[str, ...], msg: str,
                                                                tmp_path: Path, tiny_dir: Path) -> None:
    cfg = replace(_cfg(tiny_dir, _dataset(tmp_path, 1)), judges=judges)
    with pytest.raises(SaffronError, match=re.escape(msg)):
        run_eval(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_quality_without_the_scorer_module_is_one_line(tmp_path: Path, tiny_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # a module name that cannot exist: this test must keep passing once saffron.quality is merged
    monkeypatch.setattr("saffron.config.QUALITY_MODULE", "saffron.no_such_quality_module")
    cfg = replace(_cfg(tiny_dir, _dataset(tmp_path, 1)), quality=True)
    with pytest.raises(SaffronError, match=r"--quality needs saffron.no_such_quality_module"):
        run_eval(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
