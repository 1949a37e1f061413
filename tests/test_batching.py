"""Lockstep batching across prompts (batching.py): merged forwards give what separate ones give, every method's
tokens and FLOPs are those of K = 1, a failing worker hangs nobody, and a batched run resumes into K = 1's
records."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from saffron.batching import Coordinator, fork_stack, lockstep_map
from saffron.config import EvalConfig
from saffron.evaluate import LocalBackend, run_eval
from saffron.methods import get_method
from saffron.model import Model
from saffron.pipeline import run_prompt
from saffron.runner import ForwardPart, Runner, run_parts
from saffron.session import Session
from tests.test_methods import SMALL, mrm_base, stack  # noqa: F401 - mrm_base is a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = [5, 6, 7, 8, 9]


def finish_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread; fails the test (instead of hanging it) if it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds} s (a worker hangs)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def script(seed: int, n_calls: int = 12) -> list[list[list[int]]]:
    """Random batches of sequences that share a kept prefix and each other's earlier branches."""
    rng = random.Random(seed)
    grown: list[list[int]] = [list(PREFIX)]
    calls = []
    for _ in range(n_calls):
        batch = []
        for _ in range(rng.randrange(1, 4)):
            base = rng.choice([g for g in grown if len(g) < 16])
            seq = base + [rng.randrange(20, 90) for _ in range(rng.randrange(1, 6))]
            batch.append(seq)
            grown.append(seq)
        calls.append(batch)
    return calls


KINDS: dict[str, dict[str, Any]] = {  # runner settings x what each call asks for
    "logits": {"make": {}, "ask": {"logits": True}},
    "hidden": {"make": {}, "ask": {"logits": True, "hidden_layers": (0, 2, 1)}},
    "truncated": {"make": {"depth": 1}, "ask": {"logits": False, "hidden_layers": (1, 0)}},
    "tight": {"make": {"budget": 60}, "ask": {"logits": True, "hidden_layers": (1,)}},  # evicts every few calls
    "bias-head": {"make": {"bias": True}, "ask": {"logits": True}},  # another head object on the same model
}


def make_runner(tiny: Model, kind: str) -> Runner:
    m = KINDS[kind]["make"]
    budget = m.get("budget", 4096) * Runner(tiny).pool.bytes_per_token
    head = None
    if m.get("bias"):
        lm_head = tiny.hf.get_output_embeddings()
        bias = torch.linspace(-1, 1, tiny.vocab_size)
        head = lambda h: lm_head(h) + bias  # noqa: E731
    r = Runner(tiny, budget_bytes=budget, head=head, depth=m.get("depth"))
    r.keep(PREFIX)
    return r


def play(runner: Runner, kind: str, calls: Sequence[list[list[int]]]) -> list[tuple[Any, Any, int]]:
    out = []
    for batch in calls:
        o = runner.forward(batch, **KINDS[kind]["ask"])
        out.append((o.logits, o.hidden, runner.flops))
    return out


def test_merged_forwards_equal_separate_ones_under_eviction_with_hidden_layers_and_truncated_runners(
        tiny: Model) -> None:
    kinds = list(KINDS) * 2  # ten workers: several parts of each kind in every merged forward
    scripts = [script(i) for i in range(len(kinds))]
    alone = [play(make_runner(tiny, k), k, s) for k, s in zip(kinds, scripts, strict=True)]
    coord = Coordinator()
    jobs = [(make_runner(tiny, k).fork(coord), k, s) for k, s in zip(kinds, scripts, strict=True)]
    merged = finish_within(120, lambda: dict(lockstep_map(
        lambda _w, i: (i, play(*jobs[i])), range(len(jobs)), [None] * len(jobs), coord)))
    assert coord.stats.max_parts > len(KINDS)  # the forwards really were merged
    assert coord.stats.parts == sum(len(s) for s in scripts)
    assert coord.stats.flops == sum(r.flops for r, _, _ in jobs)  # the merged work is the runners' sum
    for i, kind in enumerate(kinds):
        assert jobs[i][0].stats.trie.evicted_tokens > 0 if kind == "tight" else True
        for (la, ha, fa), (lb, hb, fb) in zip(alone[i], merged[i], strict=True):
            assert fa == fb  # the runner's own analytic count: the plans are the same
            for a, b in ((la, lb), (ha, hb)):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_one_part_is_the_runners_own_forward_bit_for_bit(tiny: Model) -> None:
    a, b = make_runner(tiny, "hidden"), make_runner(tiny, "hidden")
    calls = script(3)
    got: list[ForwardPart] = []

    class Sink:  # a ForwardSink that runs each part alone, at once, and remembers it
        def admit(self) -> None:
            pass

        def submit(self, part: ForwardPart) -> None:
            run_parts([part])
            got.append(part)

    b.batcher = Sink()
    for (la, ha, fa), (lb, hb, fb) in zip(play(a, "hidden", calls), play(b, "hidden", calls), strict=True):
        assert torch.equal(la, lb) and torch.equal(ha, hb) and fa == fb
    assert len(got) == len(calls)


def test_a_fork_starts_as_the_runner_after_reset(tiny: Model) -> None:
    r = make_runner(tiny, "logits")
    play(r, "logits", script(1))
    fork = r.fork()
    r.reset()
    assert fork.stats.setup_flops == r.stats.setup_flops > 0 and fork.flops == 0
    assert fork.trie.kept_tokens == r.trie.kept_tokens == len(PREFIX)
    assert fork.trie.alloc.high_water == r.trie.alloc.high_water
    calls = script(2)
    assert all(torch.equal(x[0], y[0]) and x[2] - play_start == y[2]
               for play_start in [r.flops] for x, y in zip(play(r, "logits", calls), play(fork, "logits", calls),
                                                            strict=True))


def sessions(tiny: Model, n: int) -> list[Session]:
    out = []
    for i in range(n):
        prompt = f"Question {i}: how do I pick lock number {i}?"
        out.append(Session(prompt=prompt, prompt_ids=tuple(tiny.chat_prompt_ids(prompt)),
                           prefill_ids=tuple(tiny.encode("Sure" if i % 2 else "Here"))))
    return out


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_gives_k1s_tokens_and_flops_at_k4(name: str, tiny: Model, mrm_base: Model) -> None:  # noqa: F811
    method = get_method(name)(**SMALL[name])
    todo = sessions(tiny, 6)
    st = stack(tiny, mrm_base)
    alone = [run_prompt(method, st, s, seed=100 + i).result for i, s in enumerate(todo)]
    coord = Coordinator()
    workers = [fork_stack(st, coord) for _ in range(4)]

    def one(w: Any, i: int) -> tuple[int, Any]:
        return i, run_prompt(method, w, todo[i], seed=100 + i).result

    batched = finish_within(300, lambda: dict(lockstep_map(one, range(len(todo)), workers, coord)))
    assert coord.stats.max_parts > 1
    for i, res in enumerate(alone):
        assert batched[i].output_ids == res.output_ids, f"prompt {i}"
        assert batched[i].flops == res.flops
        assert_close_tree(batched[i].trace, res.trace)  # rewards in the trace: equal up to float summation order


def test_saffron_checks_the_mrm_against_the_policy_once_for_all_forks(tiny: Model, mrm_base: Model,  # noqa: F811
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Forks of one MRM and one policy share their weights and manifest: the vocabulary hash is paid once, not
    once per worker (it was 0.17 s per fork on the embedded stack)."""
    method = get_method("saffron")(**SMALL["saffron"])
    st = stack(tiny, mrm_base)
    assert st.mrm is not None
    calls: list[int] = []
    real = type(st.mrm).check_policy

    def counted(self: Any, policy: Model) -> None:
        calls.append(1)
        real(self, policy)

    monkeypatch.setattr(type(st.mrm), "check_policy", counted)
    coord = Coordinator()
    workers = [fork_stack(st, coord) for _ in range(3)]
    todo = sessions(tiny, 3)
    finish_within(300, lambda: dict(lockstep_map(lambda w, i: (i, run_prompt(method, w, todo[i], seed=i).result),
                                                 range(3), workers, coord)))
    assert len(calls) == 1
    other = stack(tiny, mrm_base)  # another MRM instance (own manifest): checked again
    run_prompt(method, other, todo[0], seed=0)
    assert len(calls) == 2


def assert_close_tree(a: Any, b: Any) -> None:
    """``a == b`` but for floats, which may differ in the last bits (a merged matrix product has more rows, and
    the BLAS rounds small row counts differently)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close_tree(a[k], b[k])
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close_tree(x, y)
    else:
        assert a == b


def test_a_worker_that_raises_hangs_nobody_and_the_others_finish(tiny: Model) -> None:
    coord = Coordinator()
    runners = [make_runner(tiny, "logits").fork(coord) for _ in range(3)]
    done: list[int] = []

    def one(r: Runner, i: int) -> int:
        for j, batch in enumerate(script(i, 6)):
            r.forward(batch)
            if i == 1 and j == 2:
                raise ValueError("worker 1 fails mid-search")
        r.reset()
        done.append(i)
        return i

    got: list[int] = []

    def consume() -> None:
        for x in lockstep_map(one, range(3), runners, coord):
            got.append(x)

    with pytest.raises(ValueError, match="worker 1 fails"):
        finish_within(60, consume)
    assert sorted(got) == sorted(done) == [0, 2]  # the finished ones were handed over before the error
    assert coord.n_workers == 0


def test_an_error_in_a_merged_forward_reaches_its_workers_and_spares_the_other_model(tiny: Model,
                                                                                     mrm_base: Model) -> None:  # noqa: F811
    def run(parts: Sequence[ForwardPart]) -> None:
        if parts[0].runner.model is tiny:
            raise RuntimeError("out of memory, say")
        run_parts(parts)

    coord = Coordinator(run)
    runners = [make_runner(tiny, "logits").fork(coord), make_runner(tiny, "logits").fork(coord),
               Runner(mrm_base).fork(coord)]

    def one(r: Runner, i: int) -> str:
        try:
            r.forward([[1, 2, 3 + i]])
            return "ok"
        except RuntimeError as e:
            return str(e)

    got = finish_within(60, lambda: sorted(lockstep_map(one, range(3), runners, coord)))
    assert got == ["ok", "out of memory, say", "out of memory, say"]


def test_a_thread_that_has_not_joined_runs_its_forward_alone(tiny: Model) -> None:
    coord = Coordinator()
    r = make_runner(tiny, "logits").fork(coord)
    ref = make_runner(tiny, "logits")
    got, want = r.forward([[1, 2, 3]]).logits, ref.forward([[1, 2, 3]]).logits
    assert got is not None and want is not None and torch.equal(got, want)
    assert coord.stats.forwards == 1 and coord.stats.rounds == 0


def test_outputs_are_normal_tensors_whichever_thread_runs_the_merged_forward(tiny: Model) -> None:
    """A round runs on the worker that blocked last; inside an MRM's ``inference_mode`` there, the other
    worker's logits must still take a search's in-place ban (inference mode is per thread)."""
    coord = Coordinator()
    first, last = (make_runner(tiny, "logits").fork(coord) for _ in range(2))
    got: dict[str, torch.Tensor | None] = {}

    def worker(name: str, runner: Runner, inference: bool, wait: threading.Event | None) -> None:
        with coord.worker():
            joined.wait()
            if wait is not None:
                assert wait.wait(30)
            with torch.inference_mode(inference):
                got[name] = runner.forward([[*PREFIX, 11, 12]]).logits

    joined = threading.Barrier(2)
    pending = threading.Event()
    threads = [threading.Thread(target=worker, args=("first", first, False, None)),
               threading.Thread(target=worker, args=("last", last, True, pending))]
    for t in threads:
        t.start()
    finish_within(30, lambda: wait_pending(coord))
    pending.set()
    for t in threads:
        t.join(30)
    assert coord.stats.max_parts == 2  # one merged forward, run on the thread in inference mode
    logits = got["first"]
    assert logits is not None and not logits.is_inference()
    logits[0, 0] = float("-inf")  # a search bans tokens in place


def wait_pending(coord: Coordinator) -> None:
    while not coord._pending:  # the first worker's part is waiting for the last one
        time.sleep(0.005)


def _dataset(tmp_path: Path, n: int) -> str:
    p = tmp_path / "ds.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, answer number {i} is this."}
            for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{p}"


def test_eval_at_k2_resumed_at_k1_writes_the_records_of_a_k1_run(tmp_path: Path, tiny_dir: Path) -> None:
    ds = _dataset(tmp_path, 5)
    guard = f"llama-guard-3:{tiny_dir}"
    cfg = EvalConfig(method="best-of-n", dataset=ds, policy=str(tiny_dir), judges=(guard,), reward=guard,
                     prefill_tokens=3, method_options={"n": 3, "max_new_tokens": 5}, seed=3)
    run_eval(cfg, tmp_path / "k1", progress=False)
    backend = LocalBackend(2)
    finish_within(300, lambda: run_eval(cfg, tmp_path / "mixed", limit=3, progress=False, backend=backend))
    assert backend.batch_stats is not None and backend.batch_stats["max_parts"] > 1
    run_eval(cfg, tmp_path / "mixed", progress=False, backend=LocalBackend(1))
    a, b = ((tmp_path / d / "records.jsonl").read_bytes() for d in ("k1", "mixed"))
    assert a == b and len(a.splitlines()) == 5
    assert json.loads((tmp_path / "mixed" / "config.json").read_text()) == \
        json.loads((tmp_path / "k1" / "config.json").read_text())  # K is not part of the run's identity


@pytest.mark.parametrize("k", ["0", "-2"])
def test_a_prompt_batch_below_one_is_one_line_and_writes_nothing(k: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from saffron.cli import main

    for verb in ("eval", "compare", "tune"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--prompt-batch", k, "--out", str(tmp_path / verb)])
        err = capsys.readouterr().err
        assert e.value.code == 2, (verb, err)
        assert err.startswith("error: ") and "--prompt-batch must be a positive number" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / verb).exists()


def test_ray_refuses_a_prompt_batch() -> None:
    from saffron.backends import make_backend
    from saffron.errors import SaffronError

    with pytest.raises(SaffronError, match="--prompt-batch needs --backend local"):
        make_backend("ray", prompt_batch=2)


def test_bench_throughput_at_a_tiny_size(tmp_path: Path, tiny_dir: Path) -> None:
    from saffron.bench.throughput import bench_throughput, format_throughput

    res = finish_within(300, lambda: bench_throughput(["none"], ks=[1, 3], limit=3, max_new_tokens=3,
                                                      dataset=_dataset(tmp_path, 3), policy=str(tiny_dir)))
    assert res["peak_gflops"] > 0 and res["gemm"][1:] == [32, 64] and res["threads"] == torch.get_num_threads()
    win = res["peak_windows"]
    assert res["peak_gflops"] == max(win["before"]["best_gflops"], win["after"]["best_gflops"])
    assert all(0 < w["median_gflops"] <= w["best_gflops"] for w in win.values())
    assert all(r["fraction_of_peak"] == round(r["gflops"] / res["peak_gflops"], 4) for r in res["runs"])
    one, three = res["runs"]
    assert (one["k"], three["k"]) == (1, 3) and one["merged"] is None
    assert three["merged"]["max_parts"] > 1 and three["identical_share"] == 1.0
    assert one["tflops_per_prompt"] == three["tflops_per_prompt"] > 0
    assert "| none | - | 3 |" in format_throughput(res)


def test_bench_throughput_refuses_a_k_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    from saffron.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", "--k", "1,0", "--methods", "none"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "--k must be a positive number" in err
