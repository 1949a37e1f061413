"""Lockstep batching across prompts: K searches on K threads, one merged forward per model per step.

Each prompt keeps its own runners (``Runner.fork``: own radix trie, own KV pool, the same weights), so its cache,
its plans, its FLOP count and its tokens are what it would get alone. What is shared is the forward pass: a
runner in batched mode (``runner.batcher`` set) does not run its layer loop; it hands its prepared part
(``runner.ForwardPart``) to a ``Coordinator`` and blocks. When every live worker is blocked in a submission, the
coordinator fires a round: for each model with pending parts it runs ONE forward (``runner.run_parts``: the
linear layers over all parts' tokens at once, attention per part against its own pool) and wakes each worker
with its outputs. Workers blocked on different models (policy, reward model, MRM) are served in the same round,
so none waits on another; a worker doing other work (decoding, judging) only delays the round.

Per-prompt FLOPs stay each runner's own analytic count; ``Coordinator.stats`` counts the merged forwards (how
many, how many parts and tokens each served) for throughput reporting.

API (the harness uses it through ``lockstep_map``; the server through ``fork_holder``/``Runner.fork`` with a
cancellable sink that wraps one coordinator, its request threads joining as workers):

- ``coord = Coordinator()``; ``runner.fork(coord)`` (or ``fork_stack(stack, coord)``) makes batched runners;
- a worker thread enters ``with coord.worker():`` (``join``/``leave``) around the work whose forwards may merge.
  Workers join and leave at any time: a round waits for the workers joined at that moment, and a worker
  that leaves (finished or failed) no longer holds anyone up. One thread is one worker; it submits one part at
  a time (``Runner.forward`` blocks until its part is filled);
- a submission from a thread that has not joined runs at once, unmerged;
- an exception in a merged forward is raised in every worker whose part was in it; an exception in a
  worker's own code is that worker's alone (it leaves, the others go on).

Rounds run on the thread of the last worker to block, so no extra thread is needed. Results do not depend on
K or on timing beyond float summation order: a matrix product's rows can round differently with the number of
rows in the call (the BLAS picks other kernels for small row counts), which is the only difference from K = 1.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from saffron.runner import ForwardPart, run_parts

if TYPE_CHECKING:
    from saffron.methods.base import Stack
    from saffron.runner import ForwardSink, Runner

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")
H = TypeVar("H")


@dataclass
class BatchStats:
    """What the coordinator ran: ``rounds`` (times it fired), ``forwards`` (merged forwards: one per model per
    round, plus each unmerged submission), ``parts`` (runner forwards they served), ``tokens`` (query tokens
    run), ``flops`` (their analytic FLOPs: the sum of what the parts' runners count), ``seconds`` (wall time
    inside forwards) and ``max_parts`` (the most parts one forward merged)."""

    rounds: int = 0
    forwards: int = 0
    parts: int = 0
    tokens: int = 0
    flops: int = 0
    seconds: float = 0.0
    max_parts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "forwards": self.forwards, "parts": self.parts, "tokens": self.tokens,
                "flops": self.flops, "seconds": round(self.seconds, 3), "max_parts": self.max_parts,
                "parts_per_forward": round(self.parts / self.forwards, 3) if self.forwards else None,
                "tokens_per_forward": round(self.tokens / self.forwards, 3) if self.forwards else None}


@dataclass(eq=False)
class _Ticket:
    part: ForwardPart
    done: bool = False
    error: BaseException | None = None


class Coordinator:
    """Merges the forwards of the worker threads joined to it (see the module docstring)."""

    def __init__(self, run: Callable[[Sequence[ForwardPart]], None] = run_parts) -> None:
        self._run = run  # what one merged forward is (a test may wrap it)
        self._cv = threading.Condition(threading.Lock())
        self._workers: set[int] = set()  # thread idents joined
        self._pending: list[_Ticket] = []
        self._firing = False
        self.stats = BatchStats()
        self._stats_lock = threading.Lock()  # unmerged submissions update the stats outside the condition's lock

    # -- workers ----------------------------------------------------------------------------------------------

    def join(self) -> None:
        """Make the calling thread a worker: rounds wait for it to block in a submission (or to leave)."""
        with self._cv:
            ident = threading.get_ident()
            if ident in self._workers:
                raise RuntimeError("this thread has already joined the coordinator")
            self._workers.add(ident)

    def leave(self) -> None:
        """The calling thread stops being a worker; a round that waited for it alone may now fire."""
        with self._cv:
            self._workers.discard(threading.get_ident())
            self._cv.notify_all()

    @contextmanager
    def worker(self) -> Iterator[None]:
        """``join`` on entry, ``leave`` on exit, however the block ends."""
        self.join()
        try:
            yield
        finally:
            self.leave()

    @property
    def n_workers(self) -> int:
        with self._cv:
            return len(self._workers)

    # -- forwards ---------------------------------------------------------------------------------------------

    def admit(self) -> None:
        """An uncached forward runs alone in its own thread: nothing to coordinate."""

    def submit(self, part: ForwardPart) -> None:
        """Have ``part`` computed, merged with the other workers' pending parts on its model; return once it is
        filled, or raise what its forward raised. From a thread that has not joined, it runs at once alone."""
        with self._cv:
            joined = threading.get_ident() in self._workers
        if not joined:
            self._fire([_Ticket(part)], round_=False)
            return
        ticket = _Ticket(part)
        with self._cv:
            self._pending.append(ticket)
            while not ticket.done:
                batch = self._take_round()
                if batch is None:
                    self._cv.wait()
                    continue
                self._cv.release()  # other threads may join, leave or read stats while the round runs
                try:
                    self._fire(batch, round_=True)
                finally:
                    self._cv.acquire()
                    self._firing = False
                    self._cv.notify_all()
        if ticket.error is not None:
            raise ticket.error

    def _take_round(self) -> list[_Ticket] | None:
        """The pending tickets, if every joined worker is blocked in a submission and no round is running (the
        lock is held)."""
        if self._firing or not self._pending or len(self._pending) < len(self._workers):
            return None
        batch, self._pending, self._firing = self._pending, [], True
        return batch

    def _fire(self, batch: list[_Ticket], round_: bool) -> None:
        """One forward per model over ``batch``'s parts; every ticket ends done, with its error if its forward
        raised."""
        by_model: dict[int, list[_Ticket]] = {}
        for t in batch:
            by_model.setdefault(id(t.part.runner.model), []).append(t)
        for group in by_model.values():
            t0 = time.perf_counter()
            try:
                self._run([t.part for t in group])
            except BaseException as e:  # handed to every worker of this forward, raised there
                for t in group:
                    t.error = e
            finally:
                dt = time.perf_counter() - t0
                with self._stats_lock:
                    s = self.stats
                    s.forwards += 1
                    s.parts += len(group)
                    s.tokens += sum(t.part.n for t in group)
                    s.flops += sum(t.part.flops for t in group)
                    s.seconds += dt
                    s.max_parts = max(s.max_parts, len(group))
                for t in group:
                    t.done = True
        if round_:
            with self._stats_lock:
                self.stats.rounds += 1


# -- forking a prompt's models --------------------------------------------------------------------------------


def fork_holder(holder: H, batcher: ForwardSink | None) -> H:
    """A shallow copy of an object that runs through ``.runner`` (a guard, an MRM) with a fork of that runner:
    same weights, heads and kept prefixes (computed once, copied), its own cache and FLOP count, its forwards sent
    to ``batcher`` (a ``Coordinator`` or any ``ForwardSink``, e.g. the server's, which wraps one; None: run
    directly)."""
    twin = copy.copy(holder)
    runner: Runner = holder.runner  # type: ignore[attr-defined]
    twin.runner = runner.fork(batcher)  # type: ignore[attr-defined]
    return twin


def fork_stack(stack: Stack, batcher: Coordinator | None) -> Stack:
    """A stack for one more worker: every runner forked (``Runner.fork``), weights shared."""
    from saffron.methods.base import Stack

    return Stack(policy=stack.policy.fork(batcher),
                 reward=fork_holder(stack.reward, batcher) if stack.reward is not None else None,
                 mrm=fork_holder(stack.mrm, batcher) if stack.mrm is not None else None)


class SerialJudge:
    """One worker's handle on a judge shared by all workers: calls take turns under ``lock``, and each scoring
    starts from the judge's reset state (as run alone) and counts only its own FLOPs."""

    def __init__(self, judge: Any, lock: threading.Lock) -> None:
        self.judge, self.lock, self.name = judge, lock, judge.name
        self._flops = 0

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        with self.lock:
            self.judge.reset()  # here, not in ``reset``: another worker may have judged in between
            f0 = self.judge.flops
            out: list[float] = self.judge.score(prompt, responses)
            self._flops += self.judge.flops - f0
            return out

    @property
    def flops(self) -> int:
        return self._flops

    @property
    def setup_flops(self) -> int:
        return int(self.judge.setup_flops)

    def reset(self) -> None:
        return None


class SerialScorer:
    """One worker's handle on a shared quality scorer: ``assess`` calls take turns under ``lock``."""

    def __init__(self, scorer: Any, lock: threading.Lock) -> None:
        self.scorer, self.lock = scorer, lock

    def assess(self, prompt: str, output: str) -> dict[str, float | bool]:
        with self.lock:
            return dict(self.scorer.assess(prompt, output))


# -- running items on K workers in lockstep -----------------------------------------------------------------


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Feed(Generic[T]):
    """The items still to hand out, shared by the worker threads."""

    items: Iterator[T]
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False

    def next(self) -> tuple[bool, T | None]:
        with self.lock:
            if self.stopped:
                return False, None
            for item in self.items:
                return True, item
            return False, None

    def stop(self) -> None:
        with self.lock:
            self.stopped = True


def _work(fn: Callable[[W, T], R], w: W, feed: _Feed[T], out: queue.Queue[R | _Failure | None],
          coord: Coordinator, start: threading.Barrier) -> None:
    """One worker thread of ``lockstep_map``: items until the feed runs dry or stops, then ``None``."""
    try:
        with coord.worker():
            start.wait()  # every worker joined before any submits: the first forwards merge too
            while True:
                ok, item = feed.next()
                if not ok:
                    return
                out.put(fn(w, item))  # type: ignore[arg-type]
    except BaseException as e:  # re-raised by the consumer, after the other workers finish
        feed.stop()
        out.put(_Failure(e))
    finally:
        out.put(None)  # after leaving: this worker holds no round up any more


def lockstep_map(fn: Callable[[W, T], R], items: Iterable[T], workers: Sequence[W], coord: Coordinator
                 ) -> Iterator[R]:
    """``fn(worker, item)`` for every item, on one thread per worker joined to ``coord`` (each takes the next
    item when it finishes one); yields results as they complete, in any order.

    A failure stops handing out items; the items already running finish and are yielded, then the first error
    is raised. Closing the iterator early stops handing out items too (running ones finish in the background)."""
    if not workers:
        raise ValueError("lockstep_map needs at least one worker")
    feed: _Feed[T] = _Feed(iter(items))
    start = threading.Barrier(len(workers))
    out: queue.Queue[R | _Failure | None] = queue.Queue()
    threads = [threading.Thread(target=_work, args=(fn, w, feed, out, coord, start), daemon=True,
                                name=f"saffron-worker-{i}") for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    failure: _Failure | None = None
    running = len(threads)
    try:
        while running:
            got = out.get()
            if got is None:
                running -= 1
            elif isinstance(got, _Failure):
                failure = failure or got
            else:
                yield got
    finally:
        feed.stop()
    if failure is not None:
        raise failure.error
