import json
from pathlib import Path

import pytest

from saffron.errors import SaffronError
from saffron.evaluate import EvalConfig, run_eval


def _dataset(tmp_path: Path, n: int = 4) -> str:
    p = tmp_path / "ds.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, answer number {i} is this."}
            for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{p}"


def _cfg(tiny_dir: Path, ds: str, **kw) -> EvalConfig:  # type: ignore[no-untyped-def]
    opts = {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0}
    return EvalConfig(dataset=ds, policy=str(tiny_dir), judge=f"llama-guard-3:{tiny_dir}", prefill_tokens=3,
                      method_options=opts, **kw)


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
    cfgs = [EvalConfig(dataset=ds, policy=str(tiny_dir), judge=f"llama-guard-3:{tiny_dir}", method_options=opts,
                       seed=s) for s in (7, 7, 8)]
    outs = [tmp_path / f"r{i}" for i in range(3)]
    for c, o in zip(cfgs, outs, strict=True):
        run_eval(c, o, progress=False)
    a, b, c = ((o / "records.jsonl").read_bytes() for o in outs)
    assert a == b
    assert a != c


def test_out_dir_of_another_configuration_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 1)
    out = tmp_path / "run"
    run_eval(_cfg(tiny_dir, ds), out, progress=False)
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(SaffronError, match=r"different configuration .*seed"):
        run_eval(_cfg(tiny_dir, ds, seed=1), out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


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
    from saffron.methods.none import NoDefence

    ds = _dataset(tmp_path, 1)
    out = tmp_path / "run"
    cfg = EvalConfig(dataset=ds, policy=str(tiny_dir), judge=f"llama-guard-3:{tiny_dir}", prefill_tokens=3,
                     method_options={"max_new_tokens": 4})
    run_eval(cfg, out, progress=False)
    saved = json.loads((out / "config.json").read_text())["method_options"]
    assert saved == {"max_new_tokens": 4, "min_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    run_eval(cfg, out, progress=False)  # same defaults: resumes
    before = (out / "records.jsonl").read_bytes()
    # a release that changes a default must not extend this folder with records of another search
    monkeypatch.setattr(NoDefence.__init__, "__defaults__", (32, None, 0.5, 1.0))  # temperature 0.0 -> 0.5
    with pytest.raises(SaffronError, match=r"different configuration .*method_options"):
        run_eval(cfg, out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


def test_judge_instructions_are_setup_so_a_prompt_costs_the_same_alone_or_after_others(tmp_path: Path,
                                                                                         tiny_dir: Path) -> None:
    from saffron.flops import straight_flops
    from saffron.guards.base import load_guard

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
        assert rec["judge_flops"] == straight_flops(guard.runner.arch, n, kept, 1)


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
