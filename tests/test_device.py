"""--device / --dtype / --runner: parsing, refusals in one line, bf16 end to end, one device per search.

Every test runs on the CPU; those marked ``device`` also mean something on a GPU (scripts/device-check.sh runs
them there with SAFFRON_DEVICE set, so ``auto`` is the accelerator).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from saffron import device as placement
from saffron.cli import main
from saffron.config import EvalConfig
from saffron.device import Placement, placed, resolve_device, resolve_dtype
from saffron.errors import SaffronError
from saffron.evaluate import run_eval
from saffron.model import _load_memo, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _restore_placement() -> Iterator[None]:
    """The CLI sets the process's placement (as a real run does, once); later tests must not inherit it."""
    yield
    placement.set_default(Placement())


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _dataset(tmp_path: Path, n: int = 2) -> str:
    p = tmp_path / "ds.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, answer {i}."})
                         + "\n" for i in range(n)))
    return f"jsonl:{p}"


# -- parsing and refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "msg"), [
    (["--device", "gpu"], "--device must be auto|cpu|cuda|cuda:N|mps, got 'gpu'"),
    (["--device", "cuda:x"], "--device must be"),
    (["--dtype", "fp8"], "--dtype must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["--runner", "fast"], "--runner must be one of auto, cached, uncached, got 'fast'"),
])
@pytest.mark.parametrize("verb", [["eval"], ["generate", "--prompt", "hi"], ["compare"], ["bench", "cache"]])
def test_bad_placement_flags_are_one_line_and_write_nothing(verb: list[str], flags: list[str], msg: str,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "o")] if verb[0] in ("eval", "compare") else []
    err = _fail([*verb, *flags, *out], capsys)
    assert msg in err
    assert list(tmp_path.iterdir()) == []


def test_every_verb_that_loads_a_model_takes_the_placement_flags() -> None:
    import typer.main

    from saffron.cli import app

    root = typer.main.get_command(app)
    verbs = [["generate"], ["eval"], ["compare"], ["tune"], ["serve"], ["build-rewards"], ["train-mrm"],
             ["train-guard"], ["bench", "cache"], ["bench", "mrm"], ["bench", "guard"], ["bench", "flops"],
             ["bench", "serve"], ["bench", "annotate"], ["bench", "throughput"]]
    for path in verbs:
        cmd: Any = root
        for name in path:
            cmd = cmd.commands[name]
        flags = {o for p in cmd.params for o in p.opts}
        assert {"--device", "--dtype", "--runner"} <= flags, path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_where_there_is_none_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(["eval", "--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert "device cuda: no CUDA device is available here" in err
    assert not (tmp_path / "o").exists()


def test_a_half_precision_the_device_cannot_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    err = _fail(["eval", "--device", "cpu", "--dtype", "fp16", "--out", str(tmp_path / "o")], capsys)
    assert "--dtype fp16 is refused on the CPU" in err  # whether or not this torch computes it (issue 15)
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(placement, "supports", lambda device, dtype: dtype != "bf16")  # a torch without bf16 on cpu
    err = _fail(["eval", "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path / "o")], capsys)
    assert "--dtype bf16 is not supported on cpu" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16  # the others still pass


def test_the_half_precision_probe_runs_a_decoder_step() -> None:
    assert placement.supports("cpu", "fp32")
    assert placement.supports("cpu", "bf16")  # every torch >= 2.4 runs bf16 on the CPU


def test_auto_keeps_the_old_defaults_and_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFFRON_DEVICE", raising=False)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == want
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None, "cpu") == torch.float32
    monkeypatch.setenv("SAFFRON_DEVICE", "cpu")
    assert resolve_device("auto") == "cpu" and resolve_device() == "cpu"
    monkeypatch.setenv("SAFFRON_DEVICE", "tpu")
    with pytest.raises(SaffronError, match="SAFFRON_DEVICE must be"):
        resolve_device("auto")
    assert resolve_device("cpu") == "cpu"  # an explicit device does not read the variable


def test_placed_applies_inside_the_block_only_and_a_default_leaves_the_process_default() -> None:
    before = placement.current()
    with placed(Placement(dtype="bf16")):
        assert resolve_dtype(None, "cpu") == torch.bfloat16
        with placed(Placement()):  # a library caller's default EvalConfig inside a CLI run
            assert placement.current().dtype == "bf16"
    assert placement.current() == before


# -- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.device
def test_weights_load_straight_to_the_device_in_the_dtype(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    seen: list[dict[str, Any]] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    # an earlier test may have loaded this model at the default placement already (on a GPU that is bf16, the
    # dtype asked for here), and load_model is memoised: start from an empty memo so this load is seen
    _load_memo.cache_clear()
    dev = resolve_device()
    m = load_model(str(tiny_dir), dtype="bf16")
    assert seen == [{"dtype": torch.bfloat16, "device_map": dev}]  # no load on the host, then a move
    assert next(m.hf.parameters()).dtype == torch.bfloat16 and m.device.type == torch.device(dev).type
    assert load_model(str(tiny_dir), dtype="bf16") is m  # memoised per (spec, device, dtype)
    assert load_model(str(tiny_dir), device="cpu", dtype="fp32") is not m
    with placed(Placement(dtype="bf16")):
        assert load_model(str(tiny_dir)) is m  # the placement is the default


def test_models_of_one_search_must_share_a_device() -> None:
    cpu, meta = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("meta"))
    placement.check_same_device({"policy": cpu, "reward": cpu, "mrm": None})
    with pytest.raises(SaffronError, match="must share a device, got policy on cpu, mrm on meta; load them with "
                                           "one --device"):
        placement.check_same_device({"policy": cpu, "mrm": meta})


def test_build_stack_refuses_a_reward_model_on_another_device(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import saffron.evaluate as ev

    elsewhere = SimpleNamespace(runner=SimpleNamespace(model=SimpleNamespace(device=torch.device("meta"))))
    monkeypatch.setattr("saffron.pipeline.load_guard", lambda spec: elsewhere)  # what pipeline.load_stack calls
    cfg = EvalConfig(method="best-of-n", policy=str(tiny_dir), reward="smol-guard")
    with pytest.raises(SaffronError, match="reward on meta"):
        ev.build_stack(cfg)


# -- config.json -----------------------------------------------------------------------------------------------

def test_config_json_is_unchanged_for_default_flags_and_records_an_explicit_dtype() -> None:
    base = EvalConfig()
    d = base.as_dict()
    assert "placement" not in d and "dtype" not in d and "device" not in d and "runner" not in d
    assert replace(base, placement=Placement(device="cpu", runner="uncached")).as_dict() == d  # where, not what
    assert replace(base, placement=Placement(dtype="bf16")).as_dict() == {**d, "dtype": "bf16"}


# -- bf16 end to end -------------------------------------------------------------------------------------------

def _head_mrm(path: Path, policy_dir: Path, layers: tuple[int, ...] = (1, 2)) -> Path:
    """A head MRM folder for the tiny policy, fingerprinted in fp32 as ``train-mrm --kind head`` does on a CPU."""
    from saffron.mrm.base import MrmManifest, policy_fingerprint, tokenizer_fingerprint
    from saffron.mrm.head import HeadNet, head_flops, save_head_mrm

    policy = load_model(str(policy_dir), device="cpu", dtype="fp32")
    d = policy.hf.config.hidden_size
    torch.manual_seed(0)
    net = HeadNet(len(layers) * d, 8, policy.hf.get_output_embeddings().weight.detach().float())
    torch.nn.init.normal_(net.token.weight)  # tokens scored differently, so the search's choices depend on it
    unseen = torch.zeros(policy.vocab_size, dtype=torch.bool)
    unseen[sorted(policy.eos_ids)] = True
    man = MrmManifest(base_model=str(policy_dir), tokenizer_sha256=tokenizer_fingerprint(policy.tokenizer),
                      kind="head", lora_r=0, lora_alpha=0, target_modules=[],
                      head={"layers": list(layers), "width": 8, "policy_fingerprint": policy_fingerprint(policy),
                            "flops_per_node": head_flops(len(layers) * d, 8, d, policy.vocab_size)})
    save_head_mrm(path, man, net, unseen)
    return path


@pytest.mark.device
def test_bf16_eval_of_saffron_with_the_head_mrm_runs_end_to_end(tmp_path: Path, tiny_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    mrm = _head_mrm(tmp_path / "mrm", tiny_dir)
    out = tmp_path / "run"
    main(["eval", "--method", "saffron", "--dataset", _dataset(tmp_path), "--policy", str(tiny_dir),
          "--judge", f"llama-guard-3:{tiny_dir}", "--reward", f"llama-guard-3:{tiny_dir}", "--mrm", str(mrm),
          "--max-new-tokens", "4", "-o", "width=2", "-o", "min_new_tokens=1", "--prefill-tokens", "2",
          "--dtype", "bf16", "--out", str(out), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(records) == 2
    assert all(r["new_tokens"] >= 1 and r["flops"]["mrm"] > 0 for r in records)  # the head MRM guided the search
    assert json.loads((out / "config.json").read_text())["dtype"] == "bf16"
    policy = load_model(str(tiny_dir), dtype="bf16")
    assert next(policy.hf.parameters()).dtype == torch.bfloat16


def test_a_bf16_folder_does_not_take_fp32_records(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = EvalConfig(dataset=_dataset(tmp_path, 1), policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",),
                     prefill_tokens=2, method_options={"max_new_tokens": 2}, placement=Placement(dtype="bf16"))
    run_eval(cfg, tmp_path / "o", progress=False)
    with pytest.raises(SaffronError, match="differs in: dtype"):
        run_eval(replace(cfg, placement=Placement()), tmp_path / "o", progress=False)


# -- hints -----------------------------------------------------------------------------------------------------

def test_every_command_a_message_suggests_names_flags_that_verb_has() -> None:
    """Error messages and docstrings suggest commands in backticks (`saffron train-mrm --base-model X`): each
    suggested flag must exist on that verb (a hint once named a --policy flag train-mrm never had)."""
    import re

    import typer.main

    import saffron
    from saffron.cli import app

    root: Any = typer.main.get_command(app)
    src = Path(saffron.__file__).parent
    hints = [m.group(1) for f in src.rglob("*.py") for m in re.finditer(r"`saffron ([a-z][^`]*)`", f.read_text())]
    assert len(hints) > 10
    checked = 0
    for hint in hints:
        parts = [p.strip().removeprefix("saffron ") for p in hint.split("&&")]
        verbs = parts[0].split()[0]  # `saffron compare|eval --tuned X`: each alternative verb
        parts += [v + parts[0][len(verbs):] for v in verbs.split("|")] if "|" in verbs else []
        for part in parts[1:] if "|" in verbs else parts:
            words = part.split()
            cmd = root
            while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
                cmd = cmd.commands[words.pop(0)]
            if hasattr(cmd, "commands") and (not words or words[0] == "..."):
                continue  # a group named as a whole (`saffron bench ...`)
            assert not hasattr(cmd, "commands"), f"`saffron {hint}` names no verb"
            known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for w in words:
                flag = w.split("=")[0]
                if flag.startswith("--"):
                    assert flag in known, f"`saffron {hint}`: {cmd.name} has no {flag}"
                    checked += 1
    assert checked > 10


def test_the_device_check_plans_every_step_and_prints_one_json_line() -> None:
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "device-check.sh"), "--dry-run"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out["steps"]) == ["tests", "compare", "cache", "parity", "throughput"]
    assert all(s == {"ok": None, "skipped": "dry run"} for s in out["steps"].values())
    assert "bench parity --device cuda" in proc.stderr and "--k 1,16" in proc.stderr
    bad = subprocess.run(["bash", str(root / "scripts" / "device-check.sh"), "--fast"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "device-check: unknown argument '--fast' (known: " \
                                                          "--dry-run, --help)"
