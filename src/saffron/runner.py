"""The one place where models run: every policy, reward-model, MRM and judge call goes through a ``Runner``.

Callers hand the runner whole token sequences (ragged, sharing prefixes in any pattern); it returns each
sequence's next-token logits (or hidden states) and keeps every computed key/value in a pool of slots indexed
by a radix tree (``trie.py``). A later call pays only for tokens no earlier call computed: all the batch's new
tokens run in ONE forward pass, each attending to its own path through an additive tree mask over the pool
(DeFT / SpecInfer style), so a prefix shared by many sequences is computed once and stored once.

Every forward adds its analytic FLOPs (``flops.py``) to the runner's count: what was actually computed, cache
hits free, the attention rectangle as the kernel runs it. A prefix every later call starts with (a guard's fixed
instructions) can be computed once and kept across ``reset`` (``keep``); its FLOPs go to ``stats.setup_flops``,
so ``flops`` counts only what each prompt itself needs, as with a serving system's prefix cache.

Cached: Llama-family decoders (Llama 2/3, SmolLM2, Llama Guard 3, Mistral, Qwen2). Any other Hugging Face causal
LM runs uncached, by full recompute through transformers' own forward, when the placement allows it (``--runner
auto``, the default, with one note on stderr; ``--runner cached`` refuses it with its name; ``--runner
uncached`` recomputes every model in full, supported or not). See ``device.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from saffron import device as placement
from saffron.errors import BudgetError, IncompatibleError, SaffronError
from saffron.flops import ArchSpec, forward_flops, straight_flops
from saffron.model import Model
from saffron.trie import Node, Plan, RadixTrie, TrieStats

SUPPORTED = ("llama", "mistral", "qwen2")
DEFAULT_BUDGET_BYTES = 4 << 30
GATHER_BELOW = 0.5  # gather the batch's key slots when they are under this share of the live pool range


def check_architecture(spec: str) -> None:
    """Under ``--runner cached``, refuse a model folder or hub id whose architecture has no tree runner, from its
    config alone (before any weights load or any file is written). Other placements accept every causal LM."""
    from saffron.embedded import EMBEDDED_POLICY

    if placement.current().runner != "cached" or spec == EMBEDDED_POLICY:  # the embedded policy is a Llama
        return
    from pathlib import Path

    try:
        from transformers import AutoConfig

        folder = Path(spec).expanduser()
        mtype = AutoConfig.from_pretrained(str(folder) if folder.is_dir() else spec).model_type
    except (OSError, ValueError):  # the embedded name, or not loadable: the loader reports what is wrong
        return
    if mtype not in SUPPORTED:
        raise IncompatibleError(f"the runner's KV cache does not support architecture '{mtype}' (supported: "
                           f"{', '.join(SUPPORTED)}); pass --runner auto or uncached to run it by full recompute "
                           "(slower)")


@dataclass
class RunnerOutput:
    logits: torch.Tensor | None  # [B, V] next-token output at each sequence's last position
    hidden: torch.Tensor | None  # [B, L, d] hidden states at the last position for the requested layers


@dataclass
class RunnerStats:
    calls: int = 0
    forwards: int = 0
    gathered_forwards: int = 0  # forwards whose keys were gathered from a sparse part of the pool
    computed_tokens: int = 0  # query tokens run through the model
    reused_tokens: int = 0  # tokens served from the cache
    flops: int = 0  # every forward's FLOPs except those spent computing a kept prefix
    setup_flops: int = 0  # FLOPs spent computing kept prefixes (``Runner.keep``), paid once per runner
    setup_tokens: int = 0  # tokens of kept prefixes computed (also in ``computed_tokens``)
    forward_seconds: float = 0.0  # model compute: embedding, blocks, KV writes, head
    total_seconds: float = 0.0  # whole ``forward`` calls, bookkeeping included
    trie: TrieStats = field(default_factory=TrieStats)


@dataclass(eq=False)
class ForwardPart:
    """One runner's share of a forward: made by the runner from its plan (``Runner._prepare``: its query tokens,
    their positions, the pool slots their keys/values go to, the keys they attend to, ``cols`` or the live range
    ``[0, hi)``, under ``mask``), filled by ``run_parts`` (the outputs at ``out_rows``), alone or merged with
    other runners' parts on the same model (``batching.py``)."""

    runner: Runner
    tokens: torch.Tensor  # [n] query tokens, chain after chain
    positions: torch.Tensor  # [n]
    slots: torch.Tensor  # [n] pool slots the queries' keys/values are written to
    mask: torch.Tensor  # [1, 1, n, n_keys] additive
    cols: torch.Tensor | None  # gathered key slots, or None: keys are the pool's slots [0, hi)
    hi: int
    out_rows: torch.Tensor  # [B] the query row answering each sequence
    want_logits: bool
    layers: tuple[int, ...]
    logits: torch.Tensor | None = None  # [B, V], filled by run_parts when ``want_logits``
    hidden: torch.Tensor | None = None  # [B, len(layers), d], filled by run_parts when ``layers``
    seconds: float = 0.0  # this part's share (by query tokens) of the model time of the forward it ran in

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_keys(self) -> int:
        """Keys each query was scored against (the attention rectangle's width)."""
        return self.hi if self.cols is None else int(self.cols.shape[0])

    @property
    def flops(self) -> int:
        """This part's analytic FLOPs (``flops.forward_flops``), what its runner adds to its count."""
        return forward_flops(self.runner.arch, self.n, self.n * self.n_keys,
                             int(self.out_rows.shape[0]) if self.want_logits else 0)


class ForwardSink(Protocol):
    """Where a batched runner sends its parts (``batching.Coordinator``): ``submit`` returns once ``part`` is
    filled, or raises what its forward raised."""

    def submit(self, part: ForwardPart) -> None: ...

    def admit(self) -> None:
        """Called before each forward a runner computes itself (the uncached path, which cannot be merged):
        raise to stop the search there, as ``submit`` may (a cancelled request in ``saffron serve``)."""
        ...


class KVPool:
    """Keys and values of every cached token: per layer ``[n_kv_heads, capacity, head_dim]``, grown on demand
    up to ``capacity`` slots. Slot ``s`` holds one token's keys/values for every layer."""

    def __init__(self, arch: ArchSpec, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.arch, self.capacity, self.dtype, self.device = arch, capacity, dtype, device
        self.size = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.arch.n_layers * self.arch.n_kv_heads * self.arch.head_dim * itemsize

    def ensure(self, n: int) -> None:
        if n <= self.size:
            return
        new = min(self.capacity, max(n, 2 * self.size, 256))
        shape = (self.arch.n_kv_heads, new, self.arch.head_dim)
        grown_k, grown_v = [], []
        for i in range(self.arch.n_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.size:
                k[:, : self.size] = self.k[i]
                v[:, : self.size] = self.v[i]
            grown_k.append(k)
            grown_v.append(v)
        self.k, self.v, self.size = grown_k, grown_v, new


class Runner:
    def __init__(self, model: Model, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 head: Callable[[torch.Tensor], torch.Tensor] | None = None, allow_uncached: bool | None = None,
                 cache: bool = True, depth: int | None = None) -> None:
        """``head`` maps final hidden states to outputs (default: the model's LM head; an MRM adds its bias).

        ``budget_bytes`` caps the KV pool; least-recently-used unpinned branches are evicted past it.
        ``cache=False`` recomputes every sequence in full (the baseline the cache is measured against), as does
        ``--runner uncached``. ``allow_uncached`` (default: what the placement's ``--runner`` says) lets an
        architecture without a tree runner run by full recompute instead of being refused.
        ``depth`` runs only the first ``depth`` blocks: a probe on middle layers never pays for (or stores keys
        of) the blocks above them; such a runner returns hidden states only."""
        self.model = model
        self.hf = model.hf
        full = ArchSpec.from_config(model.hf.config)
        self.depth = full.n_layers if depth is None else depth
        if not 1 <= self.depth <= full.n_layers:
            raise SaffronError(f"depth {depth} out of range 1..{full.n_layers}")
        self.arch = replace(full, n_layers=self.depth)
        self.full_arch = full
        self.truncated = self.depth < full.n_layers
        self.own_head = head is None  # the model's own LM head: its full forward gives the logits (uncached path)
        self.head = head or model.hf.get_output_embeddings()
        mtype = getattr(model.hf.config, "model_type", "?")
        supported = mtype in SUPPORTED and hasattr(model.hf, "model") and hasattr(model.hf.model, "layers")
        self.cached = supported and cache and not placement.runner_forced_uncached()
        if not supported:
            allowed = placement.runner_allows_uncached(mtype, SUPPORTED) if allow_uncached is None else allow_uncached
            if not allowed:
                raise IncompatibleError(f"the runner's KV cache does not support architecture '{mtype}' (supported: "
                                   f"{', '.join(SUPPORTED)}); pass --runner auto or uncached to run it by full "
                                   "recompute (slower)")
        dtype = next(model.hf.parameters()).dtype
        self.pool = KVPool(self.arch, 1, dtype, model.device)
        capacity = budget_bytes // self.pool.bytes_per_token
        if capacity < 1:
            raise SaffronError(f"cache budget of {budget_bytes} bytes is smaller than one token's keys/values "
                               f"({self.pool.bytes_per_token} bytes)")
        self.pool.capacity = capacity
        self.trie = RadixTrie(capacity)
        self.stats = RunnerStats(trie=self.trie.stats)
        # batched mode (batching.py): forwards go to this sink, which may merge them with other runners'
        self.batcher: ForwardSink | None = None

    # -- public ---------------------------------------------------------------------------------------------

    @property
    def flops(self) -> int:
        """FLOPs of every forward so far, kept prefixes excepted (they are ``stats.setup_flops``)."""
        return self.stats.flops

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys/values held for live cached tokens."""
        return self.trie.stats.stored_tokens * self.pool.bytes_per_token

    def reset(self) -> None:
        """Drop every cached prefix but the kept ones (between prompts, so memory stays bounded by one prompt's
        search); releases every pin."""
        self.trie.clear()

    def keep(self, seq: Sequence[int]) -> int:
        """Cache ``seq`` for good: a fixed prefix that later sequences start with, such as a guard's instructions.

        Side effects: computes the tokens of ``seq`` not cached yet (one forward, no outputs) and adds its FLOPs
        to ``stats.setup_flops``, not to ``flops``, so no prompt is charged for it; marks the prefix permanent:
        ``reset`` keeps it and its pool slots, eviction never removes it, and it counts against the cache
        budget from now on. Keeping a prefix that is already kept does nothing. Returns the number of tokens
        kept. A runner without a cache (``cache=False``, an unsupported architecture) keeps nothing: it
        recomputes every sequence in full, prefix included, and charges it to ``flops`` as before."""
        rows = list(seq)
        if not rows or not self.cached:
            return 0
        if self.trie.cached_length(rows) < len(rows):
            before = self.stats.flops, self.stats.computed_tokens
            self.forward([rows], logits=False)
            self.stats.setup_flops += self.stats.flops - before[0]
            self.stats.setup_tokens += self.stats.computed_tokens - before[1]
            self.stats.flops = before[0]
        return self.trie.keep(rows)

    def fork(self, batcher: ForwardSink | None = None) -> Runner:
        """A runner on the same weights, head, depth and budget, with a cache of its own that starts as this
        one's after ``reset``: its kept prefixes (nodes, slots and keys/values copied bit for bit) and nothing
        else, so a prompt run on the fork computes, costs and returns exactly what it would here. Its stats
        start at zero but for ``setup_flops``/``setup_tokens`` (what its kept prefixes cost). ``batcher``: send
        its forwards there (batching.py) instead of running them directly."""
        twin = copy.copy(self)
        twin.trie = _kept_copy(self.trie)
        twin.pool = KVPool(self.arch, self.pool.capacity, self.pool.dtype, self.pool.device)
        hw = twin.trie.alloc.high_water
        if hw:
            twin.pool.ensure(hw)
            for dst, src in zip(twin.pool.k + twin.pool.v, self.pool.k + self.pool.v, strict=True):
                dst[:, :hw] = src[:, :hw]
        twin.stats = RunnerStats(setup_flops=self.stats.setup_flops, setup_tokens=self.stats.setup_tokens,
                                 trie=twin.trie.stats)
        twin.batcher = batcher
        return twin

    def pin(self, seq: Sequence[int]) -> None:
        """Keep ``seq``'s cached prefix from eviction until ``unpin``."""
        self.trie.pin(list(seq), +1)

    def unpin(self, seq: Sequence[int]) -> None:
        self.trie.pin(list(seq), -1)

    def forward(self, seqs: Sequence[Sequence[int]], *, logits: bool = True,
                hidden_layers: Sequence[int] = ()) -> RunnerOutput:
        """Next-token outputs and/or last-position hidden states for each sequence.

        ``hidden_layers`` index the model's hidden-state tuple as transformers does (0 = embeddings, i = output
        of block i, the last entry after the final norm). Side effects: computes and caches the keys/values of
        every token not cached yet, may evict old branches, and adds to ``stats`` and ``flops``.
        """
        t0 = time.perf_counter()
        if not seqs:
            return RunnerOutput(None, None)
        rows = [list(s) for s in seqs]
        for s in rows:
            self.model.check_ids(s)
        layers = tuple(hidden_layers)
        bad = [i for i in layers if not 0 <= i <= self.arch.n_layers]
        if bad:
            raise SaffronError(f"hidden layer {bad[0]} out of range 0..{self.arch.n_layers}")
        if self.truncated and logits:
            raise SaffronError(f"this runner stops after block {self.depth}: it returns hidden states, not logits")
        out = self._cached_forward(rows, logits, layers) if self.cached else self._uncached(rows, logits, layers)
        self.stats.calls += 1
        self.stats.total_seconds += time.perf_counter() - t0
        return out

    # -- cached path ----------------------------------------------------------------------------------------

    def _cached_forward(self, seqs: list[list[int]], want_logits: bool, layers: tuple[int, ...]) -> RunnerOutput:
        for s in seqs:
            if len(s) > self.trie.alloc.capacity:
                raise BudgetError(f"a sequence of {len(s)} tokens needs {len(s) * self.pool.bytes_per_token} "
                                   f"bytes of keys/values, more than the cache budget of "
                                   f"{self.trie.alloc.capacity * self.pool.bytes_per_token} bytes")
        plan = self.trie.plan(seqs)
        self.stats.reused_tokens += sum(plan.reused)
        part = self._prepare(plan, want_logits, layers)
        if self.batcher is not None:
            self.batcher.submit(part)  # blocks until a (possibly merged) forward has filled ``part``
        else:
            run_parts([part])
        self.stats.forward_seconds += part.seconds
        self.stats.forwards += 1
        self.stats.computed_tokens += plan.n_queries
        self.stats.flops += part.flops
        return RunnerOutput(part.logits, part.hidden)

    def _key_columns(self, plan: Plan) -> torch.Tensor | None:
        """The pool slots this batch attends to, or None to attend over the whole live range ``[0, hi)``.

        When the batch's paths cover most of the pool (a search over one tree), the pool itself is the key
        tensor: no copy. When they cover little of it (many short-lived branches cached beside them, as when
        scoring every prefix of a response), gathering just those slots keeps the attention rectangle small."""
        hi = self.trie.alloc.high_water
        used: set[int] = set()
        for c in plan.chains:
            used.update(c.base)
            used.update(c.new)
        if len(used) > GATHER_BELOW * hi:
            return None
        self.stats.gathered_forwards += 1
        return torch.tensor(sorted(used), device=self.model.device)

    def _mask(self, plan: Plan, hi: int, cols: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive float mask [1, 1, queries, keys]: 0 where a query may attend to a key, dtype-min elsewhere
        (a boolean mask is silently wrong on some attention paths; an additive one means the same on all).
        Keys are pool slots ``[0, hi)``, or the gathered ``cols``."""
        dev = self.model.device
        neg = torch.finfo(dtype).min
        n_keys = hi if cols is None else len(cols)
        col_of = None
        if cols is not None:
            col_of = torch.full((hi,), -1, dtype=torch.long, device=dev)
            col_of[cols] = torch.arange(len(cols), device=dev)
        m = torch.full((plan.n_queries, n_keys), neg, dtype=dtype, device=dev)
        for c in plan.chains:
            n = len(c.new)
            rows = slice(c.row0, c.row0 + n)
            base = torch.tensor(c.base, dtype=torch.long, device=dev)
            new = torch.tensor(c.new, dtype=torch.long, device=dev)
            if col_of is not None:
                base, new = col_of[base], col_of[new]
            if c.base:
                m[rows, base] = 0
            m[rows, new] = torch.full((n, n), neg, dtype=dtype, device=dev).triu(1)
        return m[None, None]

    def _prepare(self, plan: Plan, want_logits: bool, layers: tuple[int, ...]) -> ForwardPart:
        """This runner's share of a forward over ``plan``: index tensors, key columns and mask (the runner's own
        overhead, outside model time). Grows the pool to the plan's high-water mark."""
        dev = self.model.device
        hi = self.trie.alloc.high_water
        self.pool.ensure(hi)
        cols = self._key_columns(plan)
        return ForwardPart(
            runner=self,
            tokens=torch.tensor([t for c in plan.chains for t in c.tokens], device=dev),
            positions=torch.tensor([c.position0 + j for c in plan.chains for j in range(len(c.new))], device=dev),
            slots=torch.tensor(plan.query_slots, device=dev),
            mask=self._mask(plan, hi, cols, self.pool.dtype),
            cols=cols, hi=hi, out_rows=torch.tensor(plan.out_rows, device=dev), want_logits=want_logits,
            layers=layers)

    # -- uncached fallback ----------------------------------------------------------------------------------

    def _uncached(self, seqs: list[list[int]], want_logits: bool, layers: tuple[int, ...]) -> RunnerOutput:
        """Full recompute; sequences of equal length run as one batch (no padding, so results are exact). The
        outputs are stacked outside inference mode: callers (a search banning tokens) update them in place."""
        outs_l: list[torch.Tensor | None] = [None] * len(seqs)
        outs_h: list[torch.Tensor | None] = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        for n, idx in by_len.items():
            if self.batcher is not None:
                self.batcher.admit()  # not merged with other searches, but a cancelled one still stops here
            t0 = time.perf_counter()
            ids = torch.tensor([seqs[i] for i in idx], device=self.model.device)
            with torch.inference_mode():
                if self.own_head and want_logits:
                    # the model's whole forward, last position only: any family's extras after the final norm
                    # (Gemma 2's logit soft-capping, ...) are applied as the model itself applies them
                    out = self.hf(input_ids=ids, output_hidden_states=bool(layers), logits_to_keep=1, use_cache=False)
                    last = out.logits[:, -1]
                else:
                    out = self.hf.base_model(input_ids=ids, output_hidden_states=bool(layers), use_cache=False)
                    last = self.head(out.last_hidden_state[:, -1]) if want_logits else None
            self.stats.forward_seconds += time.perf_counter() - t0
            self.stats.forwards += 1
            for row, i in enumerate(idx):
                if last is not None:
                    outs_l[i] = last[row].float()
                if layers:
                    outs_h[i] = torch.stack([out.hidden_states[j][row, -1] for j in layers]).float()
            self.stats.computed_tokens += n * len(idx)
            # transformers runs every block whatever ``depth`` says
            self.stats.flops += len(idx) * straight_flops(self.full_arch, n, 0, 1 if want_logits else 0)
        lg = torch.stack([x for x in outs_l if x is not None]) if want_logits else None
        hd = torch.stack([x for x in outs_h if x is not None]) if layers else None
        return RunnerOutput(lg, hd)


def _kept_copy(trie: RadixTrie) -> RadixTrie:
    """A new trie holding ``trie``'s kept nodes alone (same tokens, slots, LRU clock), as ``clear`` leaves it.
    Copied level by level: ``copy.deepcopy`` recurses once per node and a deep tree exceeds Python's limit."""
    out = RadixTrie(trie.alloc.capacity)
    out._clock = trie._clock
    todo = [(trie.root, out.root)]
    while todo:
        src, dst = todo.pop()
        for tok, c in src.children.items():
            if c.kept:
                twin = Node(tokens=list(c.tokens), slots=list(c.slots), parent=dst, depth=c.depth,
                            last_used=c.last_used, kept=True)
                dst.children[tok] = twin
                todo.append((c, twin))
    out.clear()  # the allocator and stored-token count from the kept slots, exactly as ``clear`` sets them
    return out


def run_parts(parts: Sequence[ForwardPart]) -> None:
    """Run every part's query tokens in ONE forward of their (shared) model and fill each part's outputs.

    The linear work (embedding, q/k/v/o projections, MLP, final norm, vocabulary head) runs once over all
    parts' tokens concatenated; attention runs per part, against its own runner's pool under its own mask, and
    each part writes its keys/values into its own pool. A part of a truncated runner (``depth``) leaves the
    forward after its last block. With one part this is the runner's plain forward.

    The outputs are made outside inference mode (from the blocks' inference tensors): callers (a search banning
    tokens) update logits in place."""
    model = parts[0].runner.model
    if any(p.runner.model is not model for p in parts):
        raise ValueError("run_parts merges parts of one model only")
    # deepest first (stable): a truncated runner's rows sit at the tail, so dropping them narrows a view
    order = sorted(parts, key=lambda p: -p.runner.depth)
    starts = [0]
    for p in order:
        starts.append(starts[-1] + p.n)
    t0 = time.perf_counter()
    top, captured = _blocks(order, starts)
    # inference mode is per thread, and a merged forward runs on whichever worker blocked last (batching.py),
    # perhaps inside an MRM's inference_mode: the outputs must be normal tensors for every part's caller
    with torch.inference_mode(False):
        _fill_outputs(order, top, captured)
    dt = time.perf_counter() - t0
    for p in order:
        p.seconds = dt * p.n / starts[-1]


@torch.inference_mode()
def _blocks(order: Sequence[ForwardPart], starts: Sequence[int]
            ) -> tuple[list[torch.Tensor | None], list[dict[int, torch.Tensor]]]:
    """``run_parts``' layer loop over the parts (deepest first, rows ``starts[i]:starts[i + 1]``): each part's
    top states [n, d] (None for none) and its captured out-row states per requested layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = order[0].runner.model
    dec = model.hf.model
    a = order[0].runner.arch
    x = dec.embed_tokens(_cat([p.tokens for p in order])[None])
    cos, sin = dec.rotary_emb(x, _cat([p.positions for p in order])[None])
    captured: list[dict[int, torch.Tensor]] = [{} for _ in order]
    top: list[torch.Tensor | None] = [None] * len(order)
    _capture(order, starts, 0, x[0], captured, final=False)
    live, n = len(order), starts[-1]
    gqa = a.n_heads != a.n_kv_heads
    for li, layer in enumerate(dec.layers[: a.n_layers]):
        attn = layer.self_attn
        hs = layer.input_layernorm(x)
        q = attn.q_proj(hs).view(1, n, a.n_heads, a.head_dim).transpose(1, 2)
        k = attn.k_proj(hs).view(1, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = attn.v_proj(hs).view(1, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = _attend(order[:live], starts, li, q, k, v, attn.scaling, gqa)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, a.n_heads * a.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        _capture(order[:live], starts, li + 1, x[0], captured, final=False)
        was = live
        while live and order[live - 1].runner.truncated and order[live - 1].runner.depth == li + 1:
            live -= 1  # a truncated stack's top is a raw block output
            top[live] = x[0, starts[live]:starts[live + 1]]
        if live < was and live:
            n = starts[live]
            x, cos, sin = x[:, :n], cos[:, :n], sin[:, :n]
    if live:
        h = dec.norm(x)[0]
        top[:live] = [h[starts[i]:starts[i + 1]] if live > 1 else h for i in range(live)]
        _capture(order[:live], starts, a.n_layers, h, captured, final=True)
    return top, captured


def _capture(parts: Sequence[ForwardPart], starts: Sequence[int], layer: int, x: torch.Tensor,
             captured: Sequence[dict[int, torch.Tensor]], final: bool) -> None:
    """Keep each part's out-row states of hidden layer ``layer`` (0: the embeddings) from ``x`` [queries, d]: a
    raw block output below a full runner's top (and at a truncated runner's), the final-norm output at a full
    runner's top (``final``)."""
    for i, p in enumerate(parts):
        normed = layer == p.runner.arch.n_layers and not p.runner.truncated
        if layer in p.layers and normed == final:
            captured[i][layer] = x[starts[i]:starts[i + 1]][p.out_rows]


def _attend(parts: Sequence[ForwardPart], starts: Sequence[int], li: int, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """Layer ``li``'s attention for each part against its own pool (its keys/values written there first); the
    parts' outputs concatenated along the query axis, ``[1, heads, queries, head_dim]``."""
    outs = []
    for i, p in enumerate(parts):
        rows = slice(starts[i], starts[i + 1])
        qp, kp, vp = (q, k, v) if len(parts) == 1 else (q[:, :, rows], k[:, :, rows], v[:, :, rows])
        pk, pv = p.runner.pool.k[li], p.runner.pool.v[li]
        pk[:, p.slots] = kp[0]
        pv[:, p.slots] = vp[0]
        if p.cols is None:
            keys, values = pk[None, :, : p.hi], pv[None, :, : p.hi]
        else:
            keys, values = pk[None][:, :, p.cols], pv[None][:, :, p.cols]
        outs.append(F.scaled_dot_product_attention(qp, keys, values, attn_mask=p.mask, scale=scale, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _fill_outputs(order: Sequence[ForwardPart], top: Sequence[torch.Tensor | None],
                  captured: Sequence[dict[int, torch.Tensor]]) -> None:
    """Each part's hidden states (``[B, L, d]``) and logits; parts sharing a head object project their rows in
    one call."""
    heads: dict[int, list[int]] = {}
    for i, p in enumerate(order):
        if p.layers:
            p.hidden = torch.stack([captured[i][j] for j in p.layers], dim=1).float()
        if p.want_logits:
            heads.setdefault(id(p.runner.head), []).append(i)
    for group in heads.values():
        rows_h = []
        for i in group:
            t = top[i]
            assert t is not None  # a part that wants logits is of a full-depth runner
            rows_h.append(t[order[i].out_rows])
        lg = order[group[0]].runner.head(_cat(rows_h)).float()
        for i, chunk in zip(group, lg.split([len(r) for r in rows_h]), strict=True):
            order[i].logits = chunk


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs)
