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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from saffron import device as placement
from saffron.errors import BudgetError, IncompatibleError, SaffronError
from saffron.flops import ArchSpec, forward_flops, straight_flops
from saffron.model import Model
from saffron.trie import Plan, RadixTrie, TrieStats

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
        h, hidden, n_keys = self._tree_forward(plan, layers)
        rows = torch.tensor(plan.out_rows, device=h.device)
        t0 = time.perf_counter()
        lg = self.head(h[rows]).float() if want_logits else None
        self.stats.forward_seconds += time.perf_counter() - t0  # the vocabulary head is model compute too
        hd = hidden[:, rows].transpose(0, 1).float() if hidden is not None else None
        self.stats.computed_tokens += plan.n_queries
        self.stats.flops += forward_flops(self.arch, plan.n_queries, plan.n_queries * n_keys,
                                          len(seqs) if want_logits else 0)
        return RunnerOutput(lg, hd)

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

    @torch.inference_mode()
    def _tree_forward(self, plan: Plan, layers: tuple[int, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Run all query tokens of ``plan`` in one forward, writing their keys/values into their pool slots.
        Returns final-norm hidden states [queries, d], the requested layers' [L, queries, d] if any, and the
        number of keys each query was scored against."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        dev = self.model.device
        hi = self.trie.alloc.high_water
        self.pool.ensure(hi)
        dec = self.hf.model
        tokens = torch.tensor([t for c in plan.chains for t in c.tokens], device=dev)[None]
        positions = torch.tensor([c.position0 + j for c in plan.chains for j in range(len(c.new))], device=dev)[None]
        slots = torch.tensor(plan.query_slots, device=dev)
        cols = self._key_columns(plan)
        mask = self._mask(plan, hi, cols, self.pool.dtype)
        # Model time starts here: planning, the mask and index tensors above are the runner's own overhead.
        t0 = time.perf_counter()
        x = dec.embed_tokens(tokens)
        cos, sin = dec.rotary_emb(x, positions)
        captured = [x[0]] if 0 in layers else []
        n = x.shape[1]
        a = self.arch
        gqa = a.n_heads != a.n_kv_heads
        for li, layer in enumerate(dec.layers[: a.n_layers]):
            attn = layer.self_attn
            hs = layer.input_layernorm(x)
            q = attn.q_proj(hs).view(1, n, a.n_heads, a.head_dim).transpose(1, 2)
            k = attn.k_proj(hs).view(1, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
            v = attn.v_proj(hs).view(1, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            pk, pv = self.pool.k[li], self.pool.v[li]
            pk[:, slots] = k[0]
            pv[:, slots] = v[0]
            if cols is None:
                keys, values = pk[None, :, :hi], pv[None, :, :hi]
            else:
                keys, values = pk[None][:, :, cols], pv[None][:, :, cols]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, a.n_heads * a.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if li + 1 in layers and (li + 1 < a.n_layers or self.truncated):
                captured.append(x[0])
        h = x[0] if self.truncated else dec.norm(x)[0]  # a truncated stack's top is a raw block output
        if a.n_layers in layers and not self.truncated:
            captured.append(h)
        self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.forwards += 1
        hidden = None
        if layers:
            order = sorted(set(layers))
            by_layer = dict(zip(order, captured, strict=True))
            hidden = torch.stack([by_layer[i] for i in layers])
        return h, hidden, (hi if cols is None else len(cols))

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
