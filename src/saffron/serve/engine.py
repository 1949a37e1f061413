"""The serving engine: models loaded once, workers that each own a set of runners, a bounded queue.

A request becomes a ``Plan`` on the event loop (validation and tokenisation, cheap; every user error is an
``ApiError`` before anything is queued), then a search on one of ``max_batch`` worker threads. The runners
(KV caches, FLOP counters) are not thread-safe, so each worker has its own: every model (the policy's runner, the
search-time reward model, the MRM, the judges) is built once, and each worker gets forks of it
(``batching.fork_holder``, ``Runner.fork``), as the harness's ``--prompt-batch`` workers do: the same weights and
kept prefixes (a guard's fixed instructions, computed once and copied into each fork's pool), a cache and FLOP
count of its own. A worker resets its runners before every request, as ``run_eval`` does between prompts, so an
answer depends on the request alone, never on what ran before.

Continuous batching (``max_batch`` > 1): the searches running at a moment are workers of one
``batching.Coordinator``. A search joins when it starts and leaves when it ends (finished, failed or cancelled),
and while joined its runners' forwards (policy, reward model, MRM) are merged with the other searches': one
forward per model per round, each search's cache and tokens its own (``batching.py``). So the same request gives
the same tokens alone or beside others. The judge runs on the worker's own runner, unmerged.

Cancellation: a request whose client disconnects or that runs past ``request_timeout`` is given up. Still
queued, it never starts; searching, it stops at its next forward (``Cancelled``; an uncached runner's forwards,
never merged, ask ``Sink.admit`` first) and leaves the coordinator, so the others go on, and its worker returns
to the pool as after any failed search.

The models a method needs besides the policy are loaded the first time a method needs them and kept: the
server's own method is made ready at start; another method asked for through the ``saffron`` extension loads
its reward model or MRM on first use.

A search and its judging are ``pipeline.run_prompt``, as in ``saffron eval`` and ``saffron generate``: the same
conversation, options and seed give the same answer from all three. Method options, their names and defaults come
from each method's options dataclass (``methods/options.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from saffron.batching import Coordinator, fork_holder
from saffron.errors import BusyError, InputError, SaffronError
from saffron.guards.base import RewardModel
from saffron.guards.registry import check_guard_spec, load_guard
from saffron.judges import Judge, check_judge_spec, load_judge
from saffron.methods import Method, Stack, get_method, make_method, option_default, option_names
from saffron.model import Model, load_model
from saffron.mrm import Mrm, check_mrm_spec
from saffron.pipeline import DEFAULT_MRM, DEFAULT_REWARD, load_mrm_for, prompt_seed, run_prompt
from saffron.runner import ForwardPart, ForwardSink, Runner, run_parts
from saffron.serve.schemas import ApiError, ChatCompletionRequest
from saffron.session import Session

# ``saffron generate`` seeds its one prompt with prompt_seed(seed, "cli"); so does the server, so the same
# conversation and seed give the same answer from both.
SEED_KEY = "cli"
RESERVED = ("method", "judge")  # keys of the ``saffron`` extension that are not method options
POLL_S = 0.25  # how often a waiting request checks whether its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """What the server answers with when a request does not say, and the limits no request may pass. Checked
    once, when made: settings no request could be served with are refused there (one line naming the flag)."""

    method: str = "saffron"
    method_options: dict[str, Any] = field(default_factory=dict)  # the -o options of ``method`` (not its length)
    default_max_tokens: int = 32
    max_tokens_limit: int = 256
    max_width: int = 64
    max_batch: int = 8  # searches at once, their forwards merged (1: one at a time, unmerged)
    max_queue: int = 64
    seed: int = 0
    request_timeout: float | None = None  # seconds from arrival, queueing included; None: no limit
    # the server's own method, configured by the fields above (made by the check)
    configured: Method[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_width", "max_batch"):
            if getattr(self, name) < 1:
                raise SaffronError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise SaffronError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_queue < 0:
            raise SaffronError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SaffronError(f"--max-new-tokens {self.default_max_tokens} exceeds --max-tokens-limit "
                               f"{self.max_tokens_limit}")
        if "max_new_tokens" in self.method_options:
            raise SaffronError("set the default length with --max-new-tokens, not -o max_new_tokens")
        opts = method_options(self.method, self.method_options, self.default_max_tokens)
        check_budget(self.method, opts, self.max_width, "--max-width", "-o ")
        object.__setattr__(self, "configured", make_method(self.method, opts))  # frozen: set once, here


def method_options(method: str, given: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """``given`` plus the length. A default ``min_new_tokens`` is cut to the length asked for by the options
    dataclass itself; an explicit one is kept, and refused if it exceeds the length."""
    return {**given, "max_new_tokens": max_tokens}


def check_budget(method: str, opts: dict[str, Any], limit: int, flag: str, prefix: str) -> None:
    """The method's budget option (width, n, simulations: what buys more search) may not exceed ``limit``."""
    budget = get_method(method).budget
    if budget is None:
        return
    value = opts.get(budget, option_default(method, budget))
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise InputError(f"{prefix}{budget}={value} for method '{method}' exceeds this server's {flag} of {limit}",
                         option=budget)


class ModelSet:
    """The models a server may use, each built once: the policy's weights up front, each other model (and the
    policy's runner) on its first ``fork`` for a role, then kept. No worker runs these instances: ``fork`` gives
    each worker its own fork of one (see the module docstring), so a guard's kept prefix is computed once per
    server, not once per worker. ``names`` say which models these are (reported to clients)."""

    def __init__(self, policy: Model, reward: Callable[[], RewardModel] | None = None,
                 mrm: Callable[[], Mrm] | None = None, judges: Mapping[str, Callable[[], Judge]] | None = None,
                 names: dict[str, str | None] | None = None) -> None:
        self.policy = policy
        self.judge_names = tuple(judges or ())  # the first is the primary judge
        panel = (lambda: JudgePanel({n: make() for n, make in (judges or {}).items()})) if judges else None
        self._make: dict[str, Callable[[], Any] | None] = {"policy": partial(Runner, policy), "reward": reward,
                                                             "mrm": mrm, "judge": panel}
        self._built: dict[str, Any] = {}  # role -> the one instance every worker's fork is made from
        self.names: dict[str, str | None] = {"policy": policy.name, "reward": None, "mrm": None,
                                             "judge": self.judge_names[0] if self.judge_names else None,
                                             **(names or {})}
        self._lock = threading.Lock()

    def has(self, role: str) -> bool:
        return self._make[role] is not None

    def built(self, role: str) -> Any:
        """The one instance of ``role`` ("policy": its runner), built on the first call."""
        fn = self._make[role]
        if fn is None:
            raise SaffronError(f"this server has no {role} model")
        with self._lock:  # the first call loads weights and keeps prefixes; two workers must not do it twice
            if role not in self._built:
                self._built[role] = fn()
            return self._built[role]

    def fork(self, role: str, sink: ForwardSink | None) -> Any:
        """A worker's own instance of ``role``: forked from ``built(role)``, its forwards sent to ``sink`` (the
        judges' run directly, unmerged, whatever ``sink`` is)."""
        made = self.built(role)
        if role == "policy":
            return made.fork(sink)
        if role == "judge":
            return made.fork()
        return fork_holder(made, sink)

    def setup_flops(self) -> dict[str, int]:
        """Per role built so far (the policy's runner keeps nothing): FLOPs spent on its kept fixed prefixes,
        once, when it was built; every fork holds a copy of them, paid for by no one."""
        with self._lock:
            return {role: int(getattr(m, "setup_flops", 0)) for role, m in self._built.items() if role != "policy"}


def load_models(policy: str, reward: str | None = None, mrm: str | None = None,
                judges: Sequence[str] = ()) -> ModelSet:
    """The models named by CLI specs (defaults as ``saffron eval``: smol-guard, smol-mrm-head; each judge is any
    of ``saffron.judges``: a guard, minilm-judge or refusal-rules; the first is primary). Reward and MRM are loaded
    when a method first needs them, once each; the workers run forks of them (``ModelSet.fork``)."""
    reward_spec, mrm_spec = reward or DEFAULT_REWARD, mrm or DEFAULT_MRM
    check_guard_spec(reward_spec)
    check_mrm_spec(mrm_spec)
    for spec in judges:
        check_judge_spec(spec)
    model = load_model(policy)

    def make_mrm() -> Mrm:
        return load_mrm_for(mrm_spec, model)

    return ModelSet(model, reward=lambda: load_guard(reward_spec), mrm=make_mrm,
                    judges={spec: partial(load_judge, spec) for spec in judges},
                    names={"reward": reward_spec, "mrm": mrm_spec})


class JudgePanel:
    """A worker's judges, by spec in the server's order (the first is primary), reset and billed together."""

    def __init__(self, judges: dict[str, Judge]) -> None:
        self.judges = judges

    @property
    def setup_flops(self) -> int:
        return sum(j.setup_flops for j in self.judges.values())

    def reset(self) -> None:
        for j in self.judges.values():
            j.reset()

    def fork(self) -> JudgePanel:
        """A worker's panel: each judge with a runner forked (its kept prefix copied, its forwards run directly),
        any other shallow-copied (a FLOP count of its own; what it runs is shared, as before: the encoder is
        the process's one)."""
        return JudgePanel({name: fork_holder(j, None) if isinstance(getattr(j, "runner", None), Runner)
                           else copy.copy(j) for name, j in self.judges.items()})


class Cancelled(Exception):
    """A request given up while it searched (its client left, or it ran past ``request_timeout``)."""


class ClientGone(Exception):
    """The client of a waiting request disconnected: there is no one to answer."""


class Sink:
    """Where a worker's runners send their forwards (``Runner.batcher``): the coordinator, merged with the other
    searches' (``coord``), or straight to the model at batch 1, as an unbatched runner would. Either way a
    cancelled request's search stops at its next forward, before it submits: it holds no round up."""

    def __init__(self, coord: Coordinator | None) -> None:
        self.coord = coord
        self.cancel = threading.Event()  # the current request's; replaced by ``Engine.run`` per request

    def admit(self) -> None:
        """An uncached runner's forward (never merged): a cancelled request's search stops before it too."""
        if self.cancel.is_set():
            raise Cancelled("the request was given up")

    def submit(self, part: ForwardPart) -> None:
        self.admit()
        if self.coord is None:
            run_parts([part])
        else:
            self.coord.submit(part)


class Worker:
    """One search slot: a fork of the policy's runner and, once needed, forks of the reward model, MRM and judges
    (``ModelSet.fork``). The search's runners (policy, reward model, MRM) send their forwards to ``sink``; the
    judges' run directly."""

    def __init__(self, models: ModelSet, sink: Sink | None = None) -> None:
        self.models = models
        self.sink = sink or Sink(None)
        self.policy: Runner = models.fork("policy", self.sink)
        self.held: dict[str, Any] = {}

    def get(self, role: str) -> Any:
        if role not in self.held:
            self.held[role] = self.models.fork(role, self.sink)
        return self.held[role]

    def stack(self, uses: tuple[str, ...]) -> Stack:
        return Stack(policy=self.policy, reward=self.get("reward") if "reward" in uses else None,
                     mrm=self.get("mrm") if "mrm" in uses else None)

    def reset(self) -> None:
        """Free every held model's per-request cache, including those this request will not use (``run_prompt``
        resets the ones it uses)."""
        Stack(policy=self.policy, reward=self.held.get("reward"), mrm=self.held.get("mrm")).reset()
        if "judge" in self.held:
            self.held["judge"].reset()


@dataclass
class Plan:
    """A validated request, ready to search."""

    method: Method[Any]
    method_name: str
    options: dict[str, Any]
    session: Session
    seed: int
    max_tokens: int
    stop: list[str]
    judge: bool
    ignored: list[str]
    stream: bool = False
    include_usage: bool = False


@dataclass
class Outcome:
    text: str
    output_ids: tuple[int, ...]
    finish_reason: str
    flops: dict[str, int]  # per role, the judge's included when it ran; "total" is their sum
    method_flops: int
    reward: float | None  # the primary judge's (None: not judged, or not finite)
    verdicts: dict[str, dict[str, Any]]  # per judge spec, in the server's order: reward (None: not finite), unsafe
    trace: dict[str, Any]
    queue_s: float
    search_s: float


def _verdict(reward: float) -> dict[str, Any]:
    """A judge's verdict as the response carries it: JSON has no infinities, so a non-finite reward is null, and
    so is its ``unsafe``."""
    finite = math.isfinite(reward)
    return {"reward": reward if finite else None, "unsafe": reward < 0 if finite else None}


def _finite(x: Any) -> Any:
    """``x`` with non-finite floats as None (JSON has no infinities)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class Engine:
    def __init__(self, models: ModelSet, settings: ServeSettings | None = None, model_id: str | None = None) -> None:
        self.models = models
        self.settings = settings or ServeSettings()
        self.model_id = model_id or models.policy.name
        self.created = int(time.time())
        n = self.settings.max_batch
        # batch 1 runs each search alone, as before continuous batching: no coordinator to wait on
        self.coord = Coordinator() if n > 1 else None
        self.workers = [Worker(models, Sink(self.coord)) for _ in range(n)]
        self._idle: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        for w in self.workers:
            # the server's own method: ready before it listens
            w.stack(get_method(self.settings.method).models_for(self.settings.method_options))
            if models.has("judge"):
                w.get("judge")
            self._idle.put(w)
        self._executor = concurrent.futures.ThreadPoolExecutor(n,
                                                               thread_name_prefix="saffron-search")
        self._methods: OrderedDict[str, Method[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.admitted = 0  # searching or queued
        self.running = 0
        self.finished = 0  # searches ended, the failed and cancelled included
        self.cancelled = 0  # requests given up (client gone, timeout) while queued or searching

    # -- on the event loop ------------------------------------------------------------------------------------

    def prepare(self, req: ChatCompletionRequest) -> Plan:
        """Check a parsed request against this server and tokenise it. Raises ``ApiError`` for anything wrong."""
        max_tokens = self._length(req)
        ext = dict(req.saffron or {})
        method_name = ext.pop("method", self.settings.method)
        if not isinstance(method_name, str):
            raise ApiError(400, f"saffron.method must be a string, got {json.dumps(method_name)}",
                           param="saffron.method")
        judge = ext.pop("judge", self.models.has("judge"))
        if not isinstance(judge, bool):
            raise ApiError(400, f"saffron.judge must be true or false, got {json.dumps(judge)}", param="saffron.judge")
        if judge and not self.models.has("judge"):
            raise ApiError(400, "saffron.judge: this server has no judge (start it with --judge smol-guard)",
                           param="saffron.judge")
        if "max_new_tokens" in ext:
            raise ApiError(400, "set the length with max_tokens (or max_completion_tokens), not "
                           "saffron.max_new_tokens", param="saffron.max_new_tokens")
        method, opts, ignored = self._configure(req, method_name, ext, max_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Plan(method=method, method_name=method_name, options=method.options() or opts,
                    session=self._session(req, max_tokens),
                    seed=req.seed if req.seed is not None else self.settings.seed, max_tokens=max_tokens,
                    stop=req.stop_list(), judge=judge, ignored=ignored, stream=bool(req.stream),
                    include_usage=include_usage)

    def _length(self, req: ChatCompletionRequest) -> int:
        """The request's model, n and stop checked; the length it asks for, within this server's limit."""
        s = self.settings
        if req.model is not None and req.model != self.model_id:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")
        if req.n is not None and req.n != 1:
            raise ApiError(400, f"n={req.n}: this server returns one choice per request (n must be 1)", param="n")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, f"max_tokens ({req.max_tokens}) and max_completion_tokens "
                           f"({req.max_completion_tokens}) disagree; send one", param="max_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if asked is not None and asked > s.max_tokens_limit:
            raise ApiError(400, f"{param}={asked} exceeds this server's limit of {s.max_tokens_limit} tokens "
                           "(--max-tokens-limit)", param=param)
        if len(req.stop_list()) > 4 or any(not x for x in req.stop_list()):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        return asked if asked is not None else s.default_max_tokens

    def _configure(self, req: ChatCompletionRequest, method_name: str, ext: dict[str, Any],
                   max_tokens: int) -> tuple[Method[Any], dict[str, Any], list[str]]:
        """The method the request asks for, with the server's options (its own method only), the request's
        sampling fields the method has, and the ``saffron`` extension's options; and the fields it ignored."""
        s = self.settings
        try:
            known = option_names(method_name)
        except SaffronError as e:
            raise ApiError.of(e, param="saffron.method", code="unknown_method") from None
        given = dict(s.method_options) if method_name == s.method else {}
        ignored = []
        for key in ("temperature", "top_p"):
            value = getattr(req, key)
            if value is None:
                continue
            if key in known:
                given[key] = value
            else:
                ignored.append(key)  # e.g. Saffron's search draws nothing at random: temperature means nothing
        given.update(ext)
        opts = method_options(method_name, given, max_tokens) if set(given) <= set(known) else {
            **given, "max_new_tokens": max_tokens}
        try:
            check_budget(method_name, opts, s.max_width, "--max-width", "saffron.")
            return self._method(method_name, opts), opts, ignored
        except SaffronError as e:
            msg = str(e) if str(e).startswith(("method '", "bad option", "saffron.")) else \
                f"method '{method_name}': {e}"
            # the param is a hint for the client (the field to fix), from the option the error names by type, not
            # from its text; the status comes from the error's type
            option = getattr(e, "option", None)
            param = (f"saffron.{option}" if option in ext else
                     option if option in ("temperature", "top_p") and option in given else "saffron")
            raise ApiError.of(e, param=param, code=e.api_code or "invalid_method_option", message=msg) from None

    def _session(self, req: ChatCompletionRequest, max_tokens: int) -> Session:
        """The conversation tokenised for the policy: a final assistant message is the prefill to continue, and
        the reward models judge the output as an answer to the last user message (prefill excluded, as in eval)."""
        msgs: list[dict[str, str]] = []
        for i, m in enumerate(req.messages):
            text = m.text()
            if not text.strip():
                raise ApiError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        if not msgs:
            raise ApiError(400, "messages is empty: send at least one user message", param="messages")
        prefill = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None  # continued, not answered
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages hold no user message (a final assistant message is a prefill to "
                           "continue, not a prompt)", param="messages")
        policy = self.models.policy
        try:
            prompt_ids = tuple(policy.chat_messages_ids(msgs))
            prefill_ids = tuple(policy.encode(prefill)) if prefill is not None else ()
            policy.check_ids(prompt_ids + prefill_ids, reserve=max_tokens)
        except SaffronError as e:  # ContextLengthError carries OpenAI's context_length_exceeded
            raise ApiError.of(e, param="messages") from None
        return Session(prompt=users[-1], prompt_ids=prompt_ids, prefill_ids=prefill_ids)

    def _method(self, name: str, opts: dict[str, Any]) -> Method[Any]:
        """A configured method, kept for reuse (a method may cache per-model checks across runs)."""
        key = json.dumps([name, opts], sort_keys=True, default=str)
        with self._lock:
            m = self._methods.get(key)
            if m is not None:
                self._methods.move_to_end(key)
                return m
        m = make_method(name, opts)
        with self._lock:
            self._methods[key] = m
            while len(self._methods) > 64:
                self._methods.popitem(last=False)
        return m

    async def submit(self, plan: Plan, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Outcome:
        """Queue ``plan`` for a worker and wait for its outcome; ``BusyError`` when the queue is full.

        The request is given up (never started, or stopped at its search's next forward) when ``disconnected()``
        says its client left (``ClientGone``), when it runs past ``request_timeout`` (``ApiError`` 504) or when
        this coroutine is cancelled."""
        with self._lock:
            if self.admitted >= self.settings.max_batch + self.settings.max_queue:
                running, queued = self.running, self.admitted - self.running
                raise BusyError(f"server busy: {running} request(s) searching and {queued} queued, the most this "
                                f"server holds (--max-batch {self.settings.max_batch}, --max-queue "
                                f"{self.settings.max_queue}); retry later")
            self.admitted += 1
        t0 = time.perf_counter()
        cancel = threading.Event()
        try:
            fut = self._executor.submit(self.run, plan, t0, cancel)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _: self._release())  # when the search ends, or the queued job is dropped
        waiter = asyncio.wrap_future(fut)
        timeout = self.settings.request_timeout
        deadline = None if timeout is None else time.perf_counter() + timeout
        try:
            while True:
                left = None if deadline is None else deadline - time.perf_counter()
                step = POLL_S if left is None else max(0.0, min(POLL_S, left))
                done, _ = await asyncio.wait({waiter}, timeout=step if disconnected or left is not None else None)
                if done:
                    return waiter.result()
                if deadline is not None and time.perf_counter() >= deadline:
                    raise ApiError(504, f"the request took longer than this server's --request-timeout of "
                                   f"{timeout:g} s", type="server_error", code="timeout")
                if disconnected is not None and await disconnected():
                    raise ClientGone("the client disconnected")
        except BaseException:
            if not waiter.done():
                with self._lock:
                    self.cancelled += 1
                cancel.set()  # a running search stops at its next forward and its worker returns to the pool
                waiter.cancel()  # a queued one never starts
            raise

    def _release(self) -> None:
        with self._lock:
            self.admitted -= 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self.running, "queued": self.admitted - self.running, "finished": self.finished,
                    "cancelled": self.cancelled,
                    "max_batch": self.settings.max_batch, "max_queue": self.settings.max_queue,
                    "merged": self.coord.stats.as_dict() if self.coord is not None else None}

    def setup_flops(self) -> dict[str, int]:
        """Per role the workers hold: FLOPs spent once, when its model was built, on its kept fixed prefixes (a
        guard's instructions, ``Runner.keep``); the workers' forks hold copies. Resets keep those prefixes, so
        no request pays for them and none is billed for them in ``usage.flops``."""
        held = {role for w in self.workers for role in list(w.held)}
        return {role: f for role, f in self.models.setup_flops().items() if role in held}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- on a worker thread -----------------------------------------------------------------------------------

    def run(self, plan: Plan, queued_at: float | None = None, cancel: threading.Event | None = None) -> Outcome:
        """Search ``plan`` on an idle worker (blocking). Also usable directly, without the queue. Setting
        ``cancel`` stops the search at its next forward (``Cancelled``)."""
        t0 = time.perf_counter()
        worker = self._idle.get()
        with self._lock:
            self.running += 1
        try:
            worker.reset()
            worker.sink.cancel = cancel if cancel is not None else threading.Event()
            if worker.sink.cancel.is_set():
                raise Cancelled("the request was given up before its search started")
            uses = type(plan.method).models_for(plan.method.options())
            # models load before the search joins the batch: a search waiting on a load would hold up every round
            stack = worker.stack(uses)
            judges = worker.get("judge").judges if plan.judge else {}
            started = time.perf_counter()
            with self._batched():
                run = run_prompt(plan.method, stack, plan.session, prompt_seed(plan.seed, SEED_KEY),
                                 judges=judges, stop=plan.stop)
            ids = tuple(run.result.output_ids)
            finish = "stop" if run.stopped or len(ids) < plan.max_tokens else "length"
            flops = {k: int(v) for k, v in run.result.flops.items()}
            method_flops = sum(flops.values())
            if plan.judge:
                flops["judge"] = sum(run.judge_flops.values())  # every judge's, under the one role
            flops["total"] = sum(flops.values())
            verdicts = {n: _verdict(float(v["reward"])) for n, v in run.verdicts.items()}
            primary = next(iter(verdicts.values()), None)
            return Outcome(text=run.output, output_ids=ids, finish_reason=finish, flops=flops,
                           method_flops=method_flops, reward=primary["reward"] if primary else None,
                           verdicts=verdicts, trace=_finite(run.result.trace),
                           queue_s=t0 - (queued_at if queued_at is not None else t0),
                           search_s=started - t0 + run.search_s)
        finally:
            with self._lock:
                self.running -= 1
                self.finished += 1
            self._idle.put(worker)

    @contextmanager
    def _batched(self) -> Iterator[None]:
        """This thread's search as a worker of the coordinator (joined while inside; left however it ends)."""
        if self.coord is None:
            yield
            return
        with self.coord.worker():
            yield
