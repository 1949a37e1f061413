"""Continuous batching in the server: concurrent searches merge their forwards and keep their answers.

On the tiny random models: requests searched side by side (``--max-batch``) give the tokens and FLOPs each gets
alone, their forwards merged (the coordinator's counts show it); a request given up mid-search (its client gone,
or past ``--request-timeout``) stops, frees its slot and holds no one up; a failed search answers by its error's
type while the others finish.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="saffron serve's extra is not installed: pip install 'saffron[serve]'")

from saffron.cli import main
from saffron.errors import BudgetError
from saffron.methods import METHODS, MethodResult, Stack
from saffron.methods.base import RunContext
from saffron.methods.none import NoDefence
from saffron.methods.saffron import Saffron
from saffron.model import Model
from saffron.serve import Engine, background_server, create_app
from saffron.serve.engine import Plan
from saffron.serve.schemas import ApiError, ChatCompletionRequest
from saffron.session import Session
from tests.test_serve import URL, counts, engine, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["How do I pick a lock?", "Tell me a story about a dragon and a very small village.", "Hi",
           "Explain, step by step, how to bake bread at home without any special tools."]


class Together(Saffron):
    """Saffron, but each search waits until ``parties`` searches have started, so that all of them are
    joined to the coordinator before any submits: their forwards merge from the first one on."""

    name = "together"
    barrier = threading.Barrier(1)

    def search(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        type(self).barrier.wait(timeout=60)
        return super().search(session, stack, seed)


class Stall(NoDefence):
    """A search that runs policy forwards until it is stopped (at most ``limit_s`` seconds)."""

    name = "stall"
    started = threading.Event()
    limit_s = 60.0

    def search(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        type(self).started.set()
        deadline = time.monotonic() + self.limit_s
        while time.monotonic() < deadline:
            stack.policy.reset()  # recompute the prompt each time: every call is a real forward
            stack.policy.forward([list(session.prompt_ids)])
        return super().search(session, stack, seed)


class FailsAfterAForward(NoDefence):
    """A search that fails with ``error`` after one (merged) forward."""

    name = "fails"
    error: Exception = RuntimeError("unset")

    def run(self, ctx: RunContext) -> MethodResult:
        ctx.stack.policy.forward([list(ctx.session.prompt_ids)])
        raise type(self).error


@pytest.fixture
def methods(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for cls in (Together, Stall, FailsAfterAForward):
        monkeypatch.setitem(METHODS, cls.name, cls)
    Stall.started.clear()
    monkeypatch.setattr(Stall, "limit_s", 120.0)  # past wait_for's 30 s: only a cancellation ends it in time
    yield


def plan(eng: Engine, prompt: str, **ext: Any) -> Plan:
    return eng.prepare(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "seed": 3,
         "saffron": {"method": "together", "width": 3, **ext}}))


@pytest.mark.parametrize("batch", [2, 4])
def test_concurrent_searches_merge_forwards_and_give_the_tokens_each_gets_alone(
        tiny: Model, methods: None, batch: int) -> None:
    Together.barrier = threading.Barrier(1)
    alone = engine(tiny, max_batch=1)
    want = [alone.run(plan(alone, p)) for p in PROMPTS]
    assert alone.coord is None

    eng = engine(tiny, max_batch=batch)
    Together.barrier = threading.Barrier(batch)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: eng.run(plan(eng, p)), PROMPTS))
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.flops for o in got] == [o.flops for o in want]  # each search's own count, as alone
    assert {"policy", "mrm", "reward"} <= set(got[0].flops)
    merged = eng.status()["merged"]
    assert merged["max_parts"] >= batch and merged["parts"] > merged["forwards"]  # forwards were merged
    assert eng.coord is not None and eng.coord.n_workers == 0  # every search left


def test_the_same_request_gets_the_same_answer_from_a_batched_server(tiny: Model) -> None:
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 6, "seed": 1}
    answers = []
    for batch in (1, 3):
        eng = engine(tiny, max_batch=batch)
        with background_server(create_app(eng)) as url, ThreadPoolExecutor(3) as pool:
            rs = list(pool.map(lambda _: httpx.post(url + URL, json=body, timeout=60), range(3)))
        assert [r.status_code for r in rs] == [200] * 3
        answers += [r.json()["choices"][0]["message"]["content"] for r in rs]
    assert len(set(answers)) == 1


def test_a_client_that_disconnects_mid_search_frees_its_slot_and_the_others_finish(
        tiny: Model, methods: None) -> None:
    eng = engine(tiny, max_batch=3)
    with background_server(create_app(eng)) as url, ThreadPoolExecutor(3) as pool:
        def post(prompt: str, method: str, timeout: float) -> httpx.Response:
            return httpx.post(url + URL, json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                                               "saffron": {"method": method}}, timeout=timeout)

        stalled = pool.submit(post, PROMPTS[0], "stall", 10.0)  # this client gives up after 10 s
        assert Stall.started.wait(timeout=30)
        others = [pool.submit(post, p, "saffron", 60) for p in PROMPTS[1:3]]
        assert [f.result().status_code for f in others] == [200, 200]  # they finish beside the stalled search
        assert eng.status()["running"] == 1 and not stalled.done()
        with pytest.raises(httpx.ReadTimeout):
            stalled.result()
        # the server saw the client leave: the search stopped at its next forward and left the coordinator
        wait_for(lambda: eng.status()["running"] == 0)
        assert counts(eng) == {"running": 0, "queued": 0, "finished": 3, "cancelled": 1, "max_batch": 3,
                               "max_queue": 64}
        assert eng._idle.qsize() == 3 and eng.coord is not None and eng.coord.n_workers == 0
        assert post(PROMPTS[3], "saffron", 60).status_code == 200  # and the server goes on


def test_a_request_past_the_timeout_is_stopped_and_answered_504(tiny: Model, methods: None) -> None:
    eng = engine(tiny, max_batch=2, request_timeout=0.5)

    async def both() -> Any:
        stall = eng.prepare(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": PROMPTS[0]}], "saffron": {"method": "stall"}}))
        ok = eng.prepare(ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": PROMPTS[2]}], "saffron": {"method": "none"}}))
        return await asyncio.gather(eng.submit(stall), eng.submit(ok), return_exceptions=True)

    timed_out, fine = asyncio.run(both())
    assert isinstance(timed_out, ApiError) and timed_out.status == 504 and timed_out.code == "timeout"
    assert "--request-timeout of 0.5 s" in timed_out.message
    assert not isinstance(fine, BaseException) and fine.output_ids
    wait_for(lambda: eng.status()["running"] == 0)  # the stalled search stopped at its next forward
    assert counts(eng) == {"running": 0, "queued": 0, "finished": 2, "cancelled": 1, "max_batch": 2,
                           "max_queue": 64}
    assert eng._idle.qsize() == 2 and eng.coord is not None and eng.coord.n_workers == 0


@pytest.mark.parametrize(("error", "status", "code"), [
    (BudgetError("KV cache budget of 8 tokens cannot hold this batch"), 400, "kv_budget_exceeded"),
    (RuntimeError("a bug"), 500, "internal_error"),
])
def test_a_failed_search_beside_others_answers_by_its_type_and_the_others_finish(
        tiny: Model, methods: None, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int,
        code: str) -> None:
    monkeypatch.setattr(FailsAfterAForward, "error", error)
    eng = engine(tiny, max_batch=3)
    with background_server(create_app(eng)) as url, ThreadPoolExecutor(6) as pool:
        def post(prompt: str, method: str) -> httpx.Response:
            return httpx.post(url + URL, json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                                               "saffron": {"method": method}}, timeout=60)

        futures = [pool.submit(post, p, m) for p in PROMPTS[:3] for m in ("saffron", "fails")]
        rs = [f.result() for f in futures]
    assert [r.status_code for r in rs] == [200, status] * 3
    assert all(r.json()["error"]["code"] == code for r in rs[1::2])
    assert counts(eng) == {"running": 0, "queued": 0, "finished": 6, "cancelled": 0, "max_batch": 3,
                           "max_queue": 64}
    assert eng._idle.qsize() == 3 and eng.coord is not None and eng.coord.n_workers == 0


@pytest.mark.parametrize(("argv", "msg"), [
    (["serve", "--max-batch", "0"], "Invalid value for '--max-batch'"),
    (["serve", "--request-timeout", "0"], "--request-timeout must be > 0 seconds"),
    (["bench", "serve", "--max-batch", "1"], "Invalid value for '--max-batch'"),
    (["bench", "serve", "--method", "magic"], "unknown method 'magic'"),
])
def test_bad_batching_options_are_refused_before_any_model_loads(argv: list[str], msg: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
