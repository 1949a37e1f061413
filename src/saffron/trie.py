"""The prefix tree behind the runner's KV cache: which token prefixes are cached, and where.

Every cached token owns one slot of the runner's KV pool (its keys and values for every layer). A prefix is
stored once however many sequences share it: nodes are radix edges (runs of tokens without branching), split
when a new sequence diverges inside a run. This module is pure bookkeeping with no tensors, so it can be tested
by itself (a "simulated mode", as in SGLang's radix cache): the runner asks it which tokens of a batch are new,
which slots they go to and which slots each one may attend to.

Memory control: at most ``capacity`` slots are live. When a batch needs more, least-recently-used leaves that
are not pinned (by the caller, or by being on a path of the batch being served) are evicted first. A kept prefix
(``keep``) is never evicted and survives ``clear``: it is a fixed prefix every later sequence starts with.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial

from saffron.errors import BudgetError, SaffronError


@dataclass(eq=False)
class Node:
    """A radix edge: ``tokens[i]`` is cached in pool slot ``slots[i]``; ``depth`` counts tokens from the root
    through the end of this node."""

    tokens: list[int]
    slots: list[int]
    parent: Node | None
    depth: int
    children: dict[int, Node] = field(default_factory=dict)
    last_used: int = 0
    pins: int = 0
    kept: bool = False  # on a kept prefix's path: survives ``clear`` and is never evicted

    @property
    def start(self) -> int:
        return self.depth - len(self.tokens)


# Steps of a plan's undo journal (``RadixTrie.plan``).
def _attach(parent: Node, child: Node) -> None:
    parent.children[child.tokens[0]] = child


def _detach(parent: Node, child: Node) -> None:
    del parent.children[child.tokens[0]]


def _set_last_used(node: Node, clock: int) -> None:
    node.last_used = clock


@dataclass
class TrieStats:
    hit_tokens: int = 0  # tokens of requested sequences served from the cache
    miss_tokens: int = 0  # tokens that had to be computed (each unique new token counts once)
    recomputed_tokens: int = 0  # fully cached sequences whose last token was run again for its output
    evicted_tokens: int = 0
    stored_tokens: int = 0  # live slots now
    peak_stored_tokens: int = 0


@dataclass
class Chain:
    """A run of new tokens of one sequence: rows ``row0 .. row0+len(new)-1`` of the batch's queries.
    Every row attends to ``base`` (cached ancestors) and to the new slots up to and including its own."""

    row0: int
    base: list[int]
    new: list[int]
    tokens: list[int]

    @property
    def position0(self) -> int:
        return len(self.base)


@dataclass
class Plan:
    """What one batch needs computed: chains of query tokens (each after its ancestors), and for every
    sequence of the batch the query row whose output answers it."""

    chains: list[Chain] = field(default_factory=list)
    n_queries: int = 0
    out_rows: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)  # per sequence: cached tokens it did not pay for
    row_of_slot: dict[int, int] = field(default_factory=dict)

    def add_chain(self, base: list[int], new: list[int], tokens: list[int]) -> None:
        self.chains.append(Chain(self.n_queries, base, new, tokens))
        for j, s in enumerate(new):
            self.row_of_slot[s] = self.n_queries + j
        self.n_queries += len(new)

    @property
    def query_slots(self) -> list[int]:
        return [s for c in self.chains for s in c.new]


class SlotAllocator:
    """Hands out pool slots, lowest free first, so the live slots stay packed at the bottom of the pool.

    Between ``begin`` and ``commit`` it journals what it hands out and takes back, so ``rollback`` can restore
    the free set and the high-water mark without copying the free list up front (it can be as long as the pool,
    and almost every batch commits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[int] = []
        self.high_water = 0  # slots [0, high_water) have been handed out at some time
        self._journal: tuple[int, list[int], list[int]] | None = None  # (high water, taken, given) since begin

    @property
    def available(self) -> int:
        return len(self._free) + self.capacity - self.high_water

    def take(self, n: int) -> list[int]:
        out = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        fresh = n - len(out)
        out.extend(range(self.high_water, self.high_water + fresh))
        self.high_water += fresh
        if self._journal is not None:
            self._journal[1].extend(out)
        return out

    def give(self, slots: Sequence[int]) -> None:
        for s in slots:
            heapq.heappush(self._free, s)
        if self._journal is not None:
            self._journal[2].extend(slots)

    def begin(self) -> None:
        self._journal = (self.high_water, [], [])

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo every take and give since ``begin``. A slot given back (evicted) was live before, whether or not
        it was taken again since; a slot taken was free before if it lay below the old high-water mark, and
        never handed out otherwise."""
        assert self._journal is not None
        high_water, taken, given = self._journal
        self._journal = None
        was_live = set(given)
        free = [s for s in self._free if s not in was_live]
        free.extend(s for s in taken if s < high_water and s not in was_live)
        heapq.heapify(free)
        self._free, self.high_water = free, high_water


class RadixTrie:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise SaffronError("KV cache capacity must be at least one token")
        self.alloc = SlotAllocator(capacity)
        self.root = Node(tokens=[], slots=[], parent=None, depth=0)
        self.stats = TrieStats()
        self._clock = 0
        self._in_use: set[int] = set()  # ids of nodes on the paths of the batch being planned
        # While a batch is planned: how to undo each change to the tree, in the order made (None otherwise).
        self._undo: list[Callable[[], None]] | None = None

    # -- lookup -----------------------------------------------------------------------------------------------

    def _walk(self, seq: Sequence[int]) -> tuple[Node, int, list[int]]:
        """Follow ``seq`` down the tree: the deepest node reached, how many of its tokens matched, and the slots
        of the matched prefix."""
        node, i = self.root, 0
        slots: list[int] = []
        while i < len(seq):
            child = node.children.get(seq[i])
            if child is None:
                return node, len(node.tokens), slots
            k = 0
            while k < len(child.tokens) and i + k < len(seq) and child.tokens[k] == seq[i + k]:
                k += 1
            slots.extend(child.slots[:k])
            i += k
            node = child
            if k < len(child.tokens):
                return node, k, slots
        return node, len(node.tokens), slots

    def cached_length(self, seq: Sequence[int]) -> int:
        """How many leading tokens of ``seq`` are cached (no side effects)."""
        return len(self._walk(seq)[2])

    def _split(self, node: Node, k: int) -> Node:
        """Cut ``node``'s edge after ``k`` tokens; return the upper part (which keeps the parent link)."""
        assert node.parent is not None and 0 < k < len(node.tokens)
        upper = Node(tokens=node.tokens[:k], slots=node.slots[:k], parent=node.parent, depth=node.start + k,
                     last_used=node.last_used, pins=node.pins, kept=node.kept)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.slots, node.parent = node.tokens[k:], node.slots[k:], upper
        upper.children[node.tokens[0]] = node
        if self._undo is not None:
            self._undo.append(partial(self._unsplit, upper, node))
        return upper

    @staticmethod
    def _unsplit(upper: Node, node: Node) -> None:
        """Undo ``_split``: ``node`` takes back ``upper``'s tokens and place. Rolled back in reverse order, so
        whatever was hung under ``upper`` after the split is gone again and ``node`` is its only child."""
        assert upper.parent is not None and list(upper.children.values()) == [node]
        node.tokens, node.slots, node.parent = upper.tokens + node.tokens, upper.slots + node.slots, upper.parent
        upper.parent.children[node.tokens[0]] = node

    def _path(self, node: Node) -> list[Node]:
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out

    # -- pinning and eviction ---------------------------------------------------------------------------------

    def pin(self, seq: Sequence[int], delta: int = 1) -> None:
        """Protect (``delta=1``) or release (``delta=-1``) the cached nodes on ``seq``'s path from eviction."""
        node, k, _ = self._walk(seq)
        if node.parent is not None and 0 < k < len(node.tokens):
            node = self._split(node, k)
        for n in self._path(node):
            n.pins = max(0, n.pins + delta)

    def keep(self, seq: Sequence[int]) -> int:
        """Mark the cached prefix of ``seq`` permanent (never evicted, kept by ``clear``); return its length.
        The caller computes ``seq`` first: only what is cached can be kept."""
        node, k, slots = self._walk(seq)
        if node.parent is not None and 0 < k < len(node.tokens):
            node = self._split(node, k)
        for n in self._path(node):
            n.kept = True
        return len(slots)

    @property
    def kept_tokens(self) -> int:
        out, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            kept = [c for c in n.children.values() if c.kept]
            out += sum(len(c.tokens) for c in kept)
            stack.extend(kept)
        return out

    def _can_evict(self, n: Node) -> bool:
        return n is not self.root and not n.children and n.pins == 0 and not n.kept and id(n) not in self._in_use

    def _evictable(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if self._can_evict(n):
                out.append(n)
        return out

    def _evict(self, need: int) -> None:
        """Free slots until ``need`` are available, least-recently-used unpinned leaves first.

        One heap over the evictable leaves per call (a parent joins it when its last child goes), so freeing
        many slots costs O(leaves log leaves), not a tree walk per victim. Ties (leaves of one batch at one depth)
        go to the lowest first slot, which is unique among live nodes: ordering by ``id`` made the victim, hence
        later hits, FLOPs and the pool's high-water mark, depend on memory addresses."""
        if self.alloc.available >= need:
            return
        heap = [(n.last_used, n.depth, n.slots[0], n) for n in self._evictable()]
        heapq.heapify(heap)
        while self.alloc.available < need:
            if not heap:
                raise BudgetError(
                    f"KV cache budget of {self.alloc.capacity} tokens cannot hold this batch: it needs {need} more "
                    f"slots and everything cached is in use; raise the runner's cache budget")
            victim = heapq.heappop(heap)[3]
            parent = victim.parent
            assert parent is not None
            del parent.children[victim.tokens[0]]
            if self._undo is not None:
                self._undo.append(partial(_attach, parent, victim))
            self.alloc.give(victim.slots)
            self.stats.evicted_tokens += len(victim.slots)
            self.stats.stored_tokens -= len(victim.slots)
            if self._can_evict(parent):
                heapq.heappush(heap, (parent.last_used, parent.depth, parent.slots[0], parent))

    def clear(self) -> None:
        """Forget every cached prefix but the kept ones (between prompts, so memory stays bounded by one prompt's
        search). Kept nodes keep their slots; every other slot is free again, lowest first."""
        kept: list[int] = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            n.children = {t: c for t, c in n.children.items() if c.kept}
            n.pins = 0
            kept.extend(n.slots)
            stack.extend(n.children.values())
        self.alloc = SlotAllocator(self.alloc.capacity)
        if kept:
            self.alloc.high_water = max(kept) + 1
            self.alloc.give(sorted(set(range(self.alloc.high_water)) - set(kept)))
        self.stats.stored_tokens = len(kept)

    # -- planning a batch -------------------------------------------------------------------------------------

    def plan(self, seqs: Sequence[Sequence[int]]) -> Plan:
        """Insert every sequence, allocating slots for the tokens not cached yet, and say what to compute.

        Side effects: new nodes and slots (the caller must fill those slots' keys/values before anything reads
        them), node splits, LRU clock updates, possibly evictions of older unpinned leaves.

        Transactional: if the batch is refused (the budget cannot hold it, an empty sequence) the trie is left
        exactly as before the call. Whether the budget suffices is only known while planning (each sequence's
        evictions change what the next one finds cached), so every change is journaled and undone on failure
        rather than checked up front; otherwise the sequences planned before the failure would keep slots whose
        keys/values no forward ever wrote, and a later call would read them as cached.
        """
        clock, stats = self._clock, replace(self.stats)
        self._undo = []
        self.alloc.begin()
        self._clock += 1
        plan = Plan()
        try:
            for seq in seqs:
                if not seq:
                    raise SaffronError("empty token sequence")
                self._plan_one(list(seq), plan)
        except BaseException:
            for undo in reversed(self._undo):
                undo()
            self.alloc.rollback()
            self._clock = clock
            for f in fields(TrieStats):  # in place: the runner's stats hold this very object
                setattr(self.stats, f.name, getattr(stats, f.name))
            raise
        finally:
            self._undo = None
            self.alloc.commit()  # a no-op after rollback
            self._in_use.clear()
        self.stats.peak_stored_tokens = max(self.stats.peak_stored_tokens, self.stats.stored_tokens)
        return plan

    def _plan_one(self, seq: list[int], plan: Plan) -> None:
        node, k, slots = self._walk(seq)
        if node.parent is not None and 0 < k < len(node.tokens):
            node = self._split(node, k)
        hit = len(slots)
        undo = self._undo
        for n in self._path(node):  # keep this path alive while the rest of the batch is planned
            self._in_use.add(id(n))
            if undo is not None and n.last_used != self._clock:
                undo.append(partial(_set_last_used, n, n.last_used))
            n.last_used = self._clock
        new = seq[hit:]
        if new:
            self._evict(len(new))
            fresh = self.alloc.take(len(new))
            leaf = Node(tokens=new, slots=fresh, parent=node, depth=node.depth + len(new), last_used=self._clock)
            node.children[new[0]] = leaf
            if undo is not None:
                undo.append(partial(_detach, node, leaf))
            self._in_use.add(id(leaf))
            self.stats.stored_tokens += len(new)
            self.stats.miss_tokens += len(new)
            plan.add_chain(slots, fresh, new)
            slots = slots + fresh
        elif slots[-1] not in plan.row_of_slot:
            # Fully cached: keys/values exist but the last token's output was not kept, so run it again (its
            # slot is rewritten with identical values). Counted as computed: it was.
            plan.add_chain(slots[:-1], slots[-1:], seq[-1:])
            self.stats.recomputed_tokens += 1
        self.stats.hit_tokens += hit - (0 if new else 1)
        plan.out_rows.append(plan.row_of_slot[slots[-1]])
        plan.reused.append(hit - (0 if new else 1))
