"""``saffron build-rewards``: a token-level safety reward dataset for training an MRM (Saffron-1's Safety4M recipe).

For every (prompt, response) conversation of a corpus, the response is tokenised in the POLICY's tokenizer (the
MRM's), cut to its first ``max_tokens`` tokens, and every prefix ``s[:j]`` (j = 1..n) is scored by the safety
reward model: ``rewards[j-1] = R(prompt, s[:j])``, the reward after token ``j``. An MRM trained on these rows
learns ``M(s[:j-1])[s_j] ~ R(s[:j])``.

What R sees. A reward model here is a Llama-Guard-shaped guard (``guards/base.py``) reading
``HEAD(prompt) + response + TAIL``. We build those sequences as head ids + the response prefix's ids in the
reward model's tokenizer + tail ids, so all prefixes of one response share ``HEAD + s[:j]`` in the runner's
radix cache: a batch of prefixes costs each response token once plus one tail per prefix. When the reward model
shares the policy's tokenizer (the embedded stack: smol-guard on SmolLM2) the policy ids are used directly, i.e.
R scores exactly the tokens the policy produced (``decode`` -> ``encode`` is not always the identity); otherwise
the decoded prefix text is re-encoded in the reward model's tokenizer (a prefix that ends inside a multi-byte
character then decodes with a replacement character, as it would at search time).

Corpus sources (``corpus`` is a comma-separated list):

    pyrit-harmful[:train|all]      PyRIT's harmful prompt + harmful response pairs (default split: train)
    guard-labelled[:train|all]     human-labelled responses, safe and unsafe (default split: train)
    jsonl:PATH                     a user file with `prompt` and `response` fields
    hh-rlhf                        Anthropic HH-RLHF, first human turn + first assistant turn, chosen and
                                   rejected (online: needs `datasets` and the hub)
    policy:DATASET                 responses sampled from the policy itself on DATASET's prompts (any dataset
                                   spec, e.g. policy:pyrit-harmful:train, policy:advbench): one sample without
                                   prefill and one after a short prefill (the first ``prefill_tokens`` tokens
                                   of the reference response, or "Sure, here is" where there is none), so some
                                   samples are harmful. Deterministic in ``seed``; the stored response is the
                                   continuation only (the prefill is the attacker's: the MRM and the reward
                                   model never see it at search time either).

Only ``train`` prompts (``data.split_of``: near-duplicate clusters, see ``splits.py``) are admitted unless
``allow_eval=True``, which admits dev and test prompts and is meant only for building a benchmark set
(``bench/mrm.py``); the flag is recorded in the manifest and ``train_mrm`` refuses such a folder. Every row is
checked again just before it is written.

On disk (``out/``):

    manifest.json          format, config (refused if a re-run's config differs), counts, costs, runs
    shard-00000.parquet    columns: id, prompt, prompt_ids (list<int32>: the MRM head, bos + template(prompt)),
    shard-00001.parquet    response_ids (list<int32>), rewards (list<float32>, one per response token),
    ...                    source (provenance), complete (bool: the response ended within max_tokens)

Shards are written whole (temp file + rename) and never rewritten; a re-run skips rows whose id is already in a
shard, so a killed build resumes (rows annotated since the last shard are lost unless the run was interrupted
by an exception or Ctrl-C, in which case they are flushed first).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from saffron.data import TRAIN_SPLIT, Example, check_dataset_spec, load_dataset, split_of
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.guards.base import GuardPrompt, RewardModel
from saffron.model import Model, load_model
from saffron.mrm.model import DEFAULT_TEMPLATE, tokenizer_fingerprint
from saffron.runner import Runner
from saffron.store import atomic_write, atomic_write_json

FORMAT = "saffron-rewards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.parquet$")
DEFAULT_CORPUS = "pyrit-harmful:train,guard-labelled:train,policy:pyrit-harmful:train"
DEFAULT_REWARD = "smol-guard"
DEFAULT_MAX_TOKENS = 128
DEFAULT_SHARD_ROWS = 256
DEFAULT_CHUNK = 64  # prefixes per reward-model batch
CACHE_RESET_TOKENS = 16384  # reset the reward model's cache past this many stored tokens (bounds memory)
POLICY_MAX_NEW_TOKENS = 64
POLICY_PREFILL_TOKENS = 10
POLICY_TEMPERATURE = 0.8
POLICY_TOP_P = 0.95
FALLBACK_PREFILL = "Sure, here is"


@dataclass(frozen=True)
class RewardRow:
    """One annotated conversation: ``rewards[j]`` is R(prompt, response_ids[:j+1])."""

    id: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    rewards: list[float]
    source: str
    complete: bool = False


@dataclass
class _Pending:
    """A corpus row before annotation: a text response, or a policy sample still to draw."""

    id: str
    prompt: str
    source: str
    response: str | None = None  # text sources
    prefill_ids: tuple[int, ...] | None = None  # policy sources (() = no prefill)
    group: int = -1  # policy sources: the prompt's index; its variants are sampled together
    rank: int = 0  # position among its source's admitted rows (prompts)


@dataclass
class _Counts:
    eval_filtered: int = 0
    no_response: int = 0
    duplicates: int = 0
    empty: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


# --- reward identity ---------------------------------------------------------------------------------------------


def reward_identity(rm: RewardModel) -> dict[str, Any]:
    """What makes two reward models score alike: name, backbone, tokenizer, prompt and (for probes) weights."""
    ident: dict[str, Any] = {"name": rm.name, "class": type(rm).__name__}
    model = getattr(rm, "model", None)
    if isinstance(model, Model):
        ident["model"] = model.name
        ident["tokenizer_sha256"] = tokenizer_fingerprint(model.tokenizer)
    prompt = getattr(rm, "prompt", None)
    if isinstance(prompt, GuardPrompt):
        ident["prompt_sha256"] = _sha(json.dumps([prompt.bos, prompt.head, prompt.tail]))
    probe = getattr(rm, "probe", None)
    if isinstance(probe, torch.nn.Module):
        h = hashlib.sha256()
        for k, v in sorted(probe.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        spec = getattr(rm, "spec", None)
        h.update(repr(getattr(spec, "layers", None)).encode())
        ident["probe_sha256"] = h.hexdigest()
    for k in ("safe_id", "unsafe_id"):
        if hasattr(rm, k):
            ident[k] = int(getattr(rm, k))
    return ident


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- annotation --------------------------------------------------------------------------------------------------


class Annotator:
    """Scores every prefix of a response with a reward model, through its runner's prefix cache."""

    def __init__(self, rm: RewardModel, policy: Model, chunk: int = DEFAULT_CHUNK,
                 cache_reset_tokens: int = CACHE_RESET_TOKENS) -> None:
        if chunk < 1:
            raise SaffronError(f"chunk must be >= 1, got {chunk}")
        self.rm = rm
        self.policy = policy
        self.chunk = chunk
        self.cache_reset_tokens = cache_reset_tokens
        rm_model = getattr(rm, "model", None)
        prompt = getattr(rm, "prompt", None)
        self.rm_model: Model | None = rm_model if isinstance(rm_model, Model) else None
        self.guard_prompt: GuardPrompt | None = prompt if isinstance(prompt, GuardPrompt) else None
        self.same_tokenizer = (self.rm_model is not None
                               and tokenizer_fingerprint(self.rm_model.tokenizer)
                               == tokenizer_fingerprint(policy.tokenizer))
        self.tail: list[int] = []
        if self.rm_model is not None and self.guard_prompt is not None:
            self.tail = self.rm_model.encode(self.guard_prompt.tail)
        self.calls = 0  # reward-model readouts (batches)
        self.scored = 0  # prefixes scored

    def sequences(self, prompt: str, ids: Sequence[int]) -> list[list[int]]:
        """The reward model's input for every prefix ``ids[:j]``, j = 1..len(ids)."""
        ids = list(ids)
        return self.sequences_of(prompt, [ids[:j] for j in range(1, len(ids) + 1)])

    def sequences_of(self, prompt: str, responses: Sequence[Sequence[int]]) -> list[list[int]]:
        """The reward model's input for each response (policy token ids): all share the head's cached ids."""
        if self.rm_model is not None and self.guard_prompt is not None:
            gp, m = self.guard_prompt, self.rm_model
            head = m.encode(gp.bos + gp.head.replace("{prompt}", prompt))
            if self.same_tokenizer:
                mids = [list(r) for r in responses]
            else:
                mids = [m.encode(self.policy.decode(r)) for r in responses]
            return [head + mid + self.tail for mid in mids]
        # a reward model of unknown shape: its own guard_ids on the decoded response text
        return [self.rm.guard_ids(prompt, self.policy.decode(r)) for r in responses]

    def score(self, prompt: str, responses: Sequence[Sequence[int]]) -> list[float]:
        """R(prompt, response) for each response (policy token ids), ``chunk`` sequences per readout."""
        seqs = self.sequences_of(prompt, responses)
        out: list[float] = []
        for i in range(0, len(seqs), self.chunk):
            r = self.rm.readout(seqs[i: i + self.chunk])
            self.calls += 1
            out.extend(float(x) for x in r.detach().float().cpu().flatten())
        self.scored += len(seqs)
        return out

    def rewards(self, row_id: str, prompt: str, ids: Sequence[int]) -> list[float]:
        """R(prompt, ids[:j]) for j = 1..len(ids); a non-finite reward is an error naming the row."""
        ids = list(ids)
        out = self.score(prompt, [ids[:j] for j in range(1, len(ids) + 1)])
        if len(out) != len(ids):
            raise SaffronError(f"reward model {self.rm.name} returned {len(out)} rewards for {len(ids)} prefixes "
                               f"(row {row_id})")
        bad = [j for j, x in enumerate(out) if not math.isfinite(x)]
        if bad:
            raise SaffronError(f"reward model {self.rm.name} returned a non-finite reward ({out[bad[0]]}) for row "
                               f"{row_id}, prefix of {bad[0] + 1} tokens")
        runner = getattr(self.rm, "runner", None)
        if isinstance(runner, Runner) and runner.trie.stats.stored_tokens > self.cache_reset_tokens:
            runner.reset()
        return out


# --- corpus ------------------------------------------------------------------------------------------------------


def admit_prompt(prompt: str, allow_eval: bool) -> bool:
    """The split filter: a dev or test prompt is admitted only when building a benchmark set."""
    return allow_eval or split_of(prompt) == TRAIN_SPLIT


def split_corpus(corpus: str) -> list[str]:
    parts = [p.strip() for p in corpus.split(",")]
    if not corpus.strip() or any(not p for p in parts):
        raise SaffronError(f"corpus '{corpus}' has an empty source; give comma-separated sources, e.g. "
                           f"{DEFAULT_CORPUS}")
    return parts


def _dataset_spec(spec: str, allow_eval: bool) -> str:
    """Validate a dataset spec and make the split explicit: training corpora default to the train split."""
    check_dataset_spec(spec)
    if spec.startswith("jsonl:"):
        return spec
    name, _, split = spec.partition(":")
    if split in ("dev", "test") and not allow_eval:
        raise SaffronError(f"'{spec}' is an evaluation split; a training corpus never reads it (use "
                           f"{name}:train)")
    if not split:
        return f"{name}:{TRAIN_SPLIT}"
    return spec


def check_corpus(corpus: str, allow_eval: bool = False) -> list[str]:
    """Validate a corpus spec without loading anything; return its normalised sources."""
    out = []
    for part in split_corpus(corpus):
        if part == "hh-rlhf":
            out.append(part)
        elif part.startswith("policy:"):
            out.append("policy:" + _dataset_spec(part[len("policy:"):], allow_eval))
        else:
            try:
                out.append(_dataset_spec(part, allow_eval))
            except SaffronError as e:
                raise SaffronError(f"{e} (corpus sources: pyrit-harmful[:split], guard-labelled[:split], "
                                   f"jsonl:PATH, hh-rlhf, policy:DATASET)") from None
    return out


def _hh_turns(text: str) -> tuple[str, str] | None:
    """First human turn and first assistant turn of an HH-RLHF conversation."""
    m = re.match(r"\s*Human:\s*(.*?)\n\nAssistant:\s*(.*?)(?:\n\nHuman:|\Z)", text, flags=re.S)
    if not m or not m.group(1).strip() or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).strip()


def hh_rlhf() -> list[Example]:
    """Anthropic HH-RLHF (train): the first exchange of every conversation, chosen and rejected responses."""
    try:
        import datasets
    except ImportError:
        raise SaffronError("corpus 'hh-rlhf' needs the `datasets` package (pip install 'saffron[online]') and the "
                           "Hugging Face hub; offline, use pyrit-harmful:train, guard-labelled:train, "
                           "policy:DATASET or jsonl:PATH") from None
    try:
        ds = datasets.load_dataset("Anthropic/hh-rlhf", split="train")
    except Exception as e:  # datasets raises many types when offline
        raise SaffronError(f"corpus 'hh-rlhf' needs the Hugging Face hub, which is unreachable here "
                           f"({type(e).__name__}); offline, use pyrit-harmful:train, guard-labelled:train, "
                           f"policy:DATASET or jsonl:PATH") from None
    rows = []
    for i, r in enumerate(ds):
        for kind in ("chosen", "rejected"):
            turns = _hh_turns(str(r[kind]))
            if turns is not None:
                rows.append(Example(id=f"{i}/{kind}", prompt=turns[0], response=turns[1],
                                    meta={"source": "hh-rlhf"}))
    return rows


def _seed_for(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}\x1f{key}".encode()).hexdigest()[:15], 16)


def plan_corpus(corpus: str, policy: Model, allow_eval: bool = False,  # noqa: C901 -- split in mrm/'s reorganisation
                prefill_tokens: int = POLICY_PREFILL_TOKENS) -> tuple[list[_Pending], _Counts]:
    """Every admitted corpus row in a fixed order, with its stable id; nothing sampled or scored yet.

    Each row's ``rank`` is its position among its source's admitted rows (prompts, for policy sources), so a
    limit of N per source keeps the rows of rank < N."""
    counts = _Counts()
    pending: list[_Pending] = []
    seen_text: set[tuple[str, str]] = set()
    seen_policy: set[tuple[str, tuple[int, ...]]] = set()
    group = 0  # a prompt's policy variants step together: a sample never depends on what else is in the run
    for src in check_corpus(corpus, allow_eval):
        is_policy = src.startswith("policy:")
        spec = src[len("policy:"):] if is_policy else src
        examples = hh_rlhf() if spec == "hh-rlhf" else load_dataset(spec)
        taken = 0
        for ex in examples:
            if not admit_prompt(ex.prompt, allow_eval):
                counts.eval_filtered += 1
                continue
            if is_policy:
                pre = tuple(policy.encode(ex.response)[:prefill_tokens]) if ex.response \
                    else tuple(policy.encode(FALLBACK_PREFILL))
                variants: list[tuple[str, tuple[int, ...]]] = [("noprefill", ())]
                if prefill_tokens > 0:
                    variants.append((f"prefill{len(pre)}", pre))
                added = False
                for tag, pre_ids in variants:
                    key = (ex.prompt.strip(), pre_ids)
                    if key in seen_policy:
                        counts.duplicates += 1
                        continue
                    seen_policy.add(key)
                    pending.append(_Pending(id=f"{src}/{ex.id}/{tag}", prompt=ex.prompt, source=f"{src}+{tag}",
                                            prefill_ids=pre_ids, group=group, rank=taken))
                    added = True
                group += 1
                taken += int(added)
            else:
                if ex.response is None or not ex.response.strip():
                    counts.no_response += 1
                    continue
                tkey = (ex.prompt.strip(), ex.response.strip())
                if tkey in seen_text:
                    counts.duplicates += 1
                    continue
                seen_text.add(tkey)
                pending.append(_Pending(id=f"{src}/{ex.id}", prompt=ex.prompt, source=src, response=ex.response,
                                        rank=taken))
                taken += 1
        counts.by_source[src] = taken
    ids = [p.id for p in pending]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SaffronError(f"corpus '{corpus}' has two rows with id '{dup}'; ids must be unique within a source")
    if not pending:
        why = []
        if counts.eval_filtered:
            why.append(f"{counts.eval_filtered} dev/test prompts filtered out")
        if counts.no_response:
            why.append(f"{counts.no_response} rows without a response (sample them with policy:DATASET)")
        raise SaffronError(f"corpus '{corpus}' has no usable rows" + (f" ({'; '.join(why)})" if why else ""))
    return pending, counts


def sample_policy(policy: Model, runner: Runner, jobs: Sequence[tuple[str, str, tuple[int, ...]]], seed: int,
                  max_new_tokens: int = POLICY_MAX_NEW_TOKENS, temperature: float = POLICY_TEMPERATURE,
                  top_p: float = POLICY_TOP_P) -> list[tuple[list[int], bool]]:
    """Sample continuations for ``jobs`` = (id, prompt, prefill ids), all stepped together through ``runner``.

    Returns (continuation ids without the prefill and without EOS, ended-with-EOS) per job. Each job draws from
    its own generator seeded by (seed, id)."""
    from saffron.methods.sampling import choose

    ctxs = []
    for _, prompt, pre in jobs:
        ids = policy.chat_prompt_ids(prompt) + list(pre)
        policy.check_ids(ids, reserve=max_new_tokens)
        ctxs.append(ids)
    gens = [torch.Generator().manual_seed(_seed_for(seed, jid)) for jid, _, _ in jobs]
    outs: list[list[int]] = [[] for _ in jobs]
    ended = [False] * len(jobs)
    active = list(range(len(jobs)))
    for _ in range(max_new_tokens):
        if not active:
            break
        logits = runner.forward([ctxs[i] + outs[i] for i in active]).logits
        assert logits is not None
        still = []
        for row, i in enumerate(active):
            tok = choose(logits[row], temperature, top_p, gens[i])
            if tok in policy.eos_ids:
                ended[i] = True
            else:
                outs[i].append(tok)
                still.append(i)
        active = still
    runner.reset()
    return list(zip(outs, ended, strict=True))


# --- storage -----------------------------------------------------------------------------------------------------


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())), ("rewards", pa.list_(pa.float32())), ("source", pa.string()),
        ("complete", pa.bool_()),
    ])


def shard_paths(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if SHARD_PATTERN.match(p.name))


def write_shard(data_dir: Path, index: int, rows: Sequence[RewardRow]) -> Path:
    """Write ``rows`` as ``shard-{index:05d}.parquet`` atomically (temp file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data_dir / f"shard-{index:05d}.parquet"
    if path.exists():
        raise SaffronError(f"{path} already exists; shards are never overwritten")
    table = pa.table({
        "id": [r.id for r in rows], "prompt": [r.prompt for r in rows],
        "prompt_ids": [list(r.prompt_ids) for r in rows], "response_ids": [list(r.response_ids) for r in rows],
        "rewards": [list(r.rewards) for r in rows], "source": [r.source for r in rows],
        "complete": [bool(r.complete) for r in rows],
    }, schema=_schema())
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    p = data_dir / MANIFEST_FILE
    if not p.is_file():
        raise SaffronError(f"{data_dir} is not a reward-data folder (no {MANIFEST_FILE}); build one with "
                           f"`saffron build-rewards --out {data_dir}`")
    try:
        m = json.loads(p.read_text())
    except ValueError:
        raise SaffronError(f"{p} is corrupted (not JSON)") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SaffronError(f"{p} is not a saffron reward-data manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise SaffronError(f"{data_dir} has reward-data format version {m.get('format_version')}; this saffron "
                           f"reads version {FORMAT_VERSION}; rebuild it")
    return m


def _iter_shard(path: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:
        raise SaffronError(f"reward shard {path} is unreadable ({type(e).__name__}); delete it and re-run "
                           f"build-rewards to rebuild its rows") from None
    yield from table.to_pylist()


def done_ids(data_dir: Path) -> set[str]:
    return {str(r["id"]) for p in shard_paths(data_dir) for r in _iter_shard(p, ["id"])}


def read_rewards(data_dir: str | Path, limit: int | None = None) -> tuple[dict[str, Any], list[RewardRow]]:
    """The manifest and every row of a reward-data folder, validated (lengths, finiteness, no duplicate ids).

    Usage: ``manifest, rows = read_rewards("data/rewards")``."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    rows: list[RewardRow] = []
    seen: set[str] = set()
    for path in shard_paths(data_dir):
        for r in _iter_shard(path):
            row = RewardRow(id=str(r["id"]), prompt=str(r["prompt"]), prompt_ids=list(r["prompt_ids"] or []),
                            response_ids=list(r["response_ids"] or []), rewards=list(r["rewards"] or []),
                            source=str(r["source"]), complete=bool(r.get("complete") or False))
            where = f"row {row.id} of {path.name}"
            if row.id in seen:
                raise SaffronError(f"{data_dir}: duplicate {where}")
            seen.add(row.id)
            if not row.prompt_ids or not row.response_ids:
                raise SaffronError(f"{data_dir}: {where} has no prompt or response tokens")
            if len(row.rewards) != len(row.response_ids):
                raise SaffronError(f"{data_dir}: {where} has {len(row.rewards)} rewards for "
                                   f"{len(row.response_ids)} response tokens")
            if any(x is None or not math.isfinite(x) for x in row.rewards):
                raise SaffronError(f"{data_dir}: {where} has a non-finite reward")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                return manifest, rows
    return manifest, rows


# --- the build ---------------------------------------------------------------------------------------------------


def _load_reward(reward: str | RewardModel) -> tuple[RewardModel, str]:
    if isinstance(reward, RewardModel):
        return reward, reward.name
    from saffron.guards.base import load_guard

    return load_guard(reward), reward


def _claim(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Create or re-open ``out``; refuse a folder built with a different config. Returns the manifest."""
    if (out / MANIFEST_FILE).exists():
        m = read_manifest(out)
        old = m.get("config", {})
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff[:4])
            raise SaffronError(f"{out} was built with a different configuration ({shown}); use a new --out folder "
                               f"or the original options")
        for stale in out.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)
        return m
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaffronError(f"{out} exists and is not a reward-data folder; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config, "runs": []}
    atomic_write_json(out / MANIFEST_FILE, m)
    return m


def build_rewards(out: str | Path, corpus: str = DEFAULT_CORPUS, reward: str | RewardModel = DEFAULT_REWARD,  # noqa: C901 -- split in mrm/'s reorganisation
                  policy: str = EMBEDDED_POLICY, max_tokens: int = DEFAULT_MAX_TOKENS, limit: int | None = None,
                  shard_rows: int = DEFAULT_SHARD_ROWS, chunk: int = DEFAULT_CHUNK, seed: int = 0,
                  allow_eval: bool = False, template: str = DEFAULT_TEMPLATE,
                  policy_max_new_tokens: int = POLICY_MAX_NEW_TOKENS, prefill_tokens: int = POLICY_PREFILL_TOKENS,
                  progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Annotate ``corpus`` prefix by prefix with the reward model ``reward`` into Parquet shards under ``out``.

    Usage: ``build_rewards("data/rewards", corpus="pyrit-harmful:train,policy:pyrit-harmful:train")``.
    ``reward`` is a guard spec (``load_guard``: smol-guard, llama-guard-3[:PATH], ...) or a RewardModel;
    ``policy`` names the model whose tokenizer the MRM will share; ``limit`` keeps at most that many rows per
    source (a re-run without it resumes and completes the folder). Returns the manifest.

    Side effects: creates ``out``, writes shards and ``manifest.json``; loads models; prints a progress bar.
    """
    t_start = time.time()
    out = Path(out)
    if max_tokens < 1:
        raise SaffronError(f"max_tokens must be >= 1, got {max_tokens}")
    if shard_rows < 1:
        raise SaffronError(f"shard_rows must be >= 1, got {shard_rows}")
    if limit is not None and limit < 1:
        raise SaffronError(f"limit must be >= 1, got {limit}")
    if prefill_tokens < 0 or policy_max_new_tokens < 1:
        raise SaffronError("prefill_tokens must be >= 0 and policy_max_new_tokens >= 1")
    sources = check_corpus(corpus, allow_eval)
    if out.exists() and (out / MANIFEST_FILE).exists():
        read_manifest(out)  # a damaged folder fails before any model loads
    pol = load_model(policy)
    rm, reward_spec = _load_reward(reward)
    has_policy_source = any(s.startswith("policy:") for s in sources)
    config: dict[str, Any] = {
        "corpus": ",".join(sources),
        "reward_model": reward_identity(rm),
        "policy": policy,
        "policy_tokenizer_sha256": tokenizer_fingerprint(pol.tokenizer),
        "max_tokens": max_tokens,
        "template": template,
        "allow_eval": allow_eval,
        "seed": seed,
    }
    if has_policy_source:
        config["policy_sampling"] = {"max_new_tokens": policy_max_new_tokens, "prefill_tokens": prefill_tokens,
                                     "temperature": POLICY_TEMPERATURE, "top_p": POLICY_TOP_P,
                                     "fallback_prefill": FALLBACK_PREFILL}
    manifest = _claim(out, config)
    pending, counts = plan_corpus(corpus, pol, allow_eval, prefill_tokens)
    done = done_ids(out)
    todo = [p for p in pending if p.id not in done and (limit is None or p.rank < limit)]
    ann = Annotator(rm, pol, chunk)
    bos = pol.tokenizer.bos_token or ""
    policy_runner = Runner(pol) if any(p.prefill_ids is not None for p in todo) else None
    groups: dict[int, list[_Pending]] = {}
    for p in pending:
        if p.prefill_ids is not None:
            groups.setdefault(p.group, []).append(p)
    sampled: dict[str, tuple[list[int], bool]] = {}

    buffer: list[RewardRow] = []
    next_index = max((int(m.group(1)) for p in shard_paths(out) if (m := SHARD_PATTERN.match(p.name))),
                     default=-1) + 1
    run: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": 0, "tokens": 0, "empty": 0,
                           "reward_flops": 0, "annotate_seconds": 0.0, "sample_seconds": 0.0, "seconds": 0.0,
                           "command": command or " ".join(sys.argv)}
    flops0 = rm.flops

    def flush() -> None:
        nonlocal next_index, buffer
        if buffer:
            write_shard(out, next_index, buffer)
            next_index += 1
            buffer = []

    bar = tqdm(todo, desc="build-rewards", unit="row", disable=not progress, dynamic_ncols=True)
    try:
        for p in bar:
            if p.prefill_ids is not None:
                if p.id not in sampled:
                    t0 = time.perf_counter()
                    assert policy_runner is not None
                    grp = groups[p.group]
                    res = sample_policy(pol, policy_runner, [(g.id, g.prompt, g.prefill_ids or ()) for g in grp],
                                        seed, policy_max_new_tokens)
                    sampled.update({g.id: r for g, r in zip(grp, res, strict=True)})
                    run["sample_seconds"] += time.perf_counter() - t0
                ids, ended = sampled.pop(p.id)
                complete = ended and len(ids) <= max_tokens
            else:
                assert p.response is not None
                ids = pol.encode(p.response)
                complete = len(ids) <= max_tokens
            ids = ids[:max_tokens]
            if not ids:
                run["empty"] += 1
                continue
            if not allow_eval and split_of(p.prompt) != TRAIN_SPLIT:  # the last line of defence
                raise SaffronError(f"{split_of(p.prompt)}-split prompt in corpus row {p.id}; refusing to write it")
            t0 = time.perf_counter()
            rewards = ann.rewards(p.id, p.prompt, ids)
            run["annotate_seconds"] += time.perf_counter() - t0
            buffer.append(RewardRow(id=p.id, prompt=p.prompt, prompt_ids=pol.encode(bos + template.format(
                prompt=p.prompt)), response_ids=list(ids), rewards=rewards, source=p.source, complete=complete))
            run["rows"] += 1
            run["tokens"] += len(ids)
            if len(buffer) >= shard_rows:
                flush()
            if progress:
                bar.set_postfix(tok_s=f"{run['tokens'] / max(run['annotate_seconds'], 1e-9):.0f}")
    finally:
        bar.close()
        flush()
        run["reward_flops"] = rm.flops - flops0
        run["seconds"] = round(time.time() - t_start, 3)
        run["annotate_seconds"] = round(run["annotate_seconds"], 3)
        run["sample_seconds"] = round(run["sample_seconds"], 3)
        run["tokens_per_second"] = round(run["tokens"] / run["annotate_seconds"], 2) if run["annotate_seconds"] \
            else None
        _write_summary(out, manifest, run, pending, counts, reward_spec, ann, pol, rm)
    final = read_manifest(out)
    if final["rows"] == 0:
        raise SaffronError(f"corpus '{corpus}' gave no usable rows: {final['skipped_empty']} responses tokenise "
                           f"to nothing")
    return final


def _write_summary(out: Path, manifest: dict[str, Any], run: dict[str, Any], pending: list[_Pending],
                   counts: _Counts, reward_spec: str, ann: Annotator, pol: Model, rm: RewardModel) -> None:
    rows = tokens = 0
    ids: set[str] = set()
    for p in shard_paths(out):
        for r in _iter_shard(p, ["id", "response_ids"]):
            rows += 1
            tokens += len(r["response_ids"] or [])
            ids.add(str(r["id"]))
    runs = [*manifest.get("runs", []), run]
    manifest.update({
        "reward_model": reward_spec,
        "policy": pol.name,
        "max_tokens": manifest["config"]["max_tokens"],
        "allow_eval": manifest["config"]["allow_eval"],
        "same_tokenizer": ann.same_tokenizer,
        "rows": rows,
        "tokens": tokens,
        "shards": [p.name for p in shard_paths(out)],
        "planned_rows": len(pending),
        "complete": all(p.id in ids for p in pending),
        "skipped_empty": run["empty"],
        "eval_filtered": counts.eval_filtered,
        "no_response": counts.no_response,
        "duplicates": counts.duplicates,
        "planned_by_source": counts.by_source,
        "reward_flops": sum(int(r.get("reward_flops", 0)) for r in runs),
        "seconds": round(sum(float(r.get("seconds", 0)) for r in runs), 3),
        "annotate_seconds": round(sum(float(r.get("annotate_seconds", 0)) for r in runs), 3),
        "runs": runs,
    })
    ann_s = manifest["annotate_seconds"]
    manifest["tokens_per_second"] = round(sum(int(r.get("tokens", 0)) for r in runs) / ann_s, 2) if ann_s else None
    atomic_write_json(out / MANIFEST_FILE, manifest)


# --- throughput --------------------------------------------------------------------------------------------------


def annotation_throughput(reward: str | RewardModel = DEFAULT_REWARD, policy: str = EMBEDDED_POLICY,
                          corpus: str = "pyrit-harmful:train", rows: int = 4, max_tokens: int = DEFAULT_MAX_TOKENS,
                          chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
    """Annotation speed (response tokens scored per second) with the runner's prefix cache and without it
    (``Runner(cache=False)``: every prefix recomputed in full), on the first ``rows`` text rows of ``corpus``.

    Usage: ``annotation_throughput("smol-guard", rows=4)``. Both passes score the same prefixes; the largest
    difference between their rewards is reported (it should be float noise)."""
    pol = load_model(policy)
    rm, spec = _load_reward(reward)
    pending, _ = plan_corpus(corpus, pol)
    sample = [(p.id, p.prompt, pol.encode(p.response)[:max_tokens]) for p in pending
              if p.response is not None][:rows]
    sample = [s for s in sample if s[2]]
    if not sample:
        raise SaffronError(f"corpus '{corpus}' has no text rows to time (policy: sources are not timed)")
    original = rm.runner
    res: dict[str, Any] = {"reward_model": spec, "policy": policy, "rows": len(sample),
                           "tokens": sum(len(s[2]) for s in sample), "max_tokens": max_tokens, "chunk": chunk}
    rewards: dict[str, list[float]] = {}
    try:
        for name, make in (("cached", _fresh_runner(original, True)), ("uncached", _fresh_runner(original, False))):
            rm.runner = make()
            ann = Annotator(rm, pol, chunk, cache_reset_tokens=1 << 62)
            t0 = time.perf_counter()
            got = [x for rid, prompt, ids in sample for x in ann.rewards(rid, prompt, ids)]
            dt = time.perf_counter() - t0
            rewards[name] = got
            res[f"{name}_seconds"] = round(dt, 3)
            res[f"{name}_tokens_per_second"] = round(res["tokens"] / dt, 2)
            res[f"{name}_computed_tokens"] = rm.runner.stats.computed_tokens
            res[f"{name}_flops"] = rm.runner.flops
    finally:
        rm.runner = original
    res["speedup"] = round(res["cached_tokens_per_second"] / res["uncached_tokens_per_second"], 2)
    res["max_abs_diff"] = max(abs(a - b) for a, b in zip(rewards["cached"], rewards["uncached"], strict=True))
    return res


def _fresh_runner(template: Runner, cache: bool) -> Callable[[], Runner]:
    def make() -> Runner:
        return Runner(template.model, head=template.head, cache=cache,
                      depth=template.depth if template.truncated else None)

    return make
