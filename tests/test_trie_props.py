"""Property test of the radix trie in simulated mode (as SGLang tests its radix cache): random plan / pin / unpin /
keep / clear sequences on small capacities, with the invariants checked after every step.

A simulated KV pool stands in for the runner's: after each successful plan the "caller" writes into every new
slot the whole prefix that slot's token ends (a key/value depends on every token before it, not just its own).
Any slot the trie serves whose entry was never written, or was written for another prefix, is a stale key.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from saffron.errors import SaffronError
from saffron.trie import Node, Plan, RadixTrie

# A tiny alphabet so sequences share prefixes, diverge inside edges (splits) and repeat (full hits).
seq_st = st.lists(st.integers(0, 3), min_size=1, max_size=7)
batch_st = st.lists(seq_st, min_size=1, max_size=4)


def snapshot(t: RadixTrie) -> tuple[Any, ...]:
    """Everything observable about the trie's state, as plain values: equal snapshots, equal futures."""

    def node(n: Node) -> tuple[Any, ...]:
        kids = tuple((tok, node(c)) for tok, c in sorted(n.children.items()))
        return (tuple(n.tokens), tuple(n.slots), n.depth, n.last_used, n.pins, n.kept, kids)

    return (node(t.root), sorted(t.alloc._free), t.alloc.high_water, t._clock, asdict(t.stats), t.kept_tokens)


def nodes(t: RadixTrie) -> list[Node]:
    out, stack = [], list(t.root.children.values())
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out


def prefix_of(n: Node) -> tuple[int, ...]:
    toks: list[int] = []
    while n.parent is not None:
        toks[:0] = n.tokens
        n = n.parent
    return tuple(toks)


class TrieMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trie = RadixTrie(1)
        self.kv: dict[int, tuple[int, ...]] = {}  # simulated pool: slot -> the prefix its keys/values encode
        self.kept: dict[tuple[int, ...], int] = {}  # kept sequence -> the cached length keep() returned
        self.pinned: list[list[int]] = []

    @initialize(capacity=st.integers(1, 20))
    def make(self, capacity: int) -> None:
        self.trie = RadixTrie(capacity)

    def _fill(self, plan: Plan) -> None:
        """What the runner's forward does: write each new slot's keys/values, in chain order."""
        for c in plan.chains:
            prefix = self.kv[c.base[-1]] if c.base else ()
            for tok, slot in zip(c.tokens, c.new, strict=True):
                prefix = (*prefix, tok)
                self.kv[slot] = prefix

    @rule(batch=batch_st)
    def plan(self, batch: list[list[int]]) -> None:
        before = snapshot(self.trie)
        evicted = self.trie.stats.evicted_tokens
        try:
            plan = self.trie.plan(batch)
        except SaffronError:
            # A refused batch must leave nothing behind: no new leaves, splits, evictions or clock ticks.
            assert snapshot(self.trie) == before
            event(f"plan refused ({'one sequence' if len(batch) == 1 else 'a batch'})")
            return
        event("plan evicted" if self.trie.stats.evicted_tokens > evicted else "plan fit")
        self._fill(plan)
        assert len(plan.out_rows) == len(plan.reused) == len(batch)
        assert plan.n_queries == sum(len(c.new) for c in plan.chains)
        for seq, row, reused in zip(batch, plan.out_rows, plan.reused, strict=True):
            chain = next(c for c in plan.chains if c.row0 <= row < c.row0 + len(c.new))
            path = chain.base + chain.new[: row - chain.row0 + 1]
            # The row answering this sequence attends to exactly its own tokens' keys, in order.
            assert [self.kv[s] for s in path] == [tuple(seq[: i + 1]) for i in range(len(seq))]
            assert chain.position0 + (row - chain.row0) == len(seq) - 1
            assert 0 <= reused < len(seq)
            # No sequence of the batch was evicted to make room for a later one (``_in_use``).
            assert self.trie.cached_length(seq) == len(seq)

    @rule(batch=batch_st, at=st.integers(0, 4))
    def plan_with_an_empty_sequence(self, batch: list[list[int]], at: int) -> None:
        """Refused for a reason other than the budget (unless the budget fails first), after planning the
        sequences before it."""
        before = snapshot(self.trie)
        batch.insert(at % (len(batch) + 1), [])
        try:
            self.trie.plan(batch)
        except SaffronError:
            pass
        else:
            raise AssertionError("an empty sequence was planned")
        assert snapshot(self.trie) == before

    @rule(seq=seq_st)
    def keep(self, seq: list[int]) -> None:
        want = self.trie.cached_length(seq)
        assert self.trie.keep(seq) == want
        if want:
            self.kept[tuple(seq)] = max(want, self.kept.get(tuple(seq), 0))

    @rule(seq=seq_st)
    def pin(self, seq: list[int]) -> None:
        self.trie.pin(seq, +1)
        self.pinned.append(seq)

    @rule(i=st.integers(0, 100), seq=seq_st)
    def unpin(self, i: int, seq: list[int]) -> None:
        # an earlier pin if any (no precondition: filtering rules costs Hypothesis retries), else a no-op unpin
        self.trie.pin(self.pinned.pop(i % len(self.pinned)) if self.pinned else seq, -1)

    @rule()
    def clear(self) -> None:
        self.trie.clear()
        self.pinned.clear()

    @invariant()
    def slots_are_unique_in_range_and_accounted_for(self) -> None:
        t = self.trie
        live = [s for n in nodes(t) for s in n.slots]
        assert len(live) == len(set(live)) == t.stats.stored_tokens
        assert all(0 <= s < t.alloc.high_water <= t.alloc.capacity for s in live)
        free = sorted(t.alloc._free)
        assert len(free) == len(set(free)) and not set(free) & set(live)
        assert sorted(live + free) == list(range(t.alloc.high_water))  # every handed-out slot is live xor free
        assert t.stats.peak_stored_tokens <= t.alloc.capacity

    @invariant()
    def tree_is_well_formed(self) -> None:
        for n in nodes(self.trie):
            assert n.tokens and len(n.tokens) == len(n.slots)
            assert n.parent is not None and n.parent.children[n.tokens[0]] is n
            assert n.depth == n.parent.depth + len(n.tokens)
            assert not n.kept or n.parent is self.trie.root or n.parent.kept  # kept paths are closed upwards

    @invariant()
    def every_cached_slot_holds_its_prefix(self) -> None:
        for n in nodes(self.trie):
            full = prefix_of(n)
            for j, s in enumerate(n.slots):
                assert self.kv.get(s) == full[: n.start + j + 1], f"slot {s} is stale"

    @invariant()
    def kept_prefixes_survive(self) -> None:
        for seq, n in self.kept.items():
            assert self.trie.cached_length(seq) >= n


TrieMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trie_transactions = TrieMachine.TestCase
