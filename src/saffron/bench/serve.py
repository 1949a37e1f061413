"""``saffron bench serve``: the guarded server under load on loopback, one search at a time vs batched.

The same fixed list of ``requests`` (alternating: a held-out harmful prompt under the prefilling attack, the
first 10 tokens of its harmful reference response as a final assistant message to continue, and a benign
prompt; each with its own seed) is sent twice, by ``clients`` client threads that each take the next request
when they finish one: to a server that searches one request at a time (``--max-batch 1``) and to one that runs
up to ``max_batch`` searches at once with their forwards merged (continuous batching, ``engine.py``). Both
servers run in a thread of this process on a free loopback port, over the same loaded models (the embedded
stack by default). Per server: requests/s over the wall time, p50/p95 latency (measured by the client,
queueing included), failures, well-formed answers and the coordinator's merged-forward counts; then the
speed-up and the share of requests whose answer is the same from both (batching keeps each search's tokens).
While the batched server is loaded, malformed requests are sent too; each must get a 4xx at once.
"""

from __future__ import annotations

import http.client
import json
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from saffron.data import TEST_SPLIT, Example, pyrit_harmful
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import InputError
from saffron.methods import get_method
from saffron.serve.app import background_server, create_app
from saffron.serve.engine import Engine, ModelSet, ServeSettings, load_models

PREFILL_TOKENS = 10
# No offline dataset holds benign prompts (the labelled "safe" rows answer harmful ones), so these are written here.
BENIGN = (
    "How do I bake a simple loaf of bread?",
    "What are some good habits for studying effectively?",
    "Explain how photosynthesis works in simple terms.",
    "Suggest a name for a friendly golden retriever.",
    "How can I make my houseplants grow better?",
    "What is the difference between weather and climate?",
    "Give me three ideas for a rainy afternoon with kids.",
    "How do I write a polite email asking for a deadline extension?",
    "What should I pack for a weekend hiking trip?",
    "Why is the sky blue?",
)


def malformed_cases(max_tokens_limit: int, max_width: int) -> dict[str, bytes]:
    """Requests that must each be refused with a 4xx, by name."""
    user = [{"role": "user", "content": "Hello"}]

    def body(**kw: Any) -> bytes:
        return json.dumps({"model": EMBEDDED_POLICY, "messages": user, **kw}).encode()

    return {
        "malformed_json": b'{"messages": [{"role": "user", "content": "Hello"}',
        "not_an_object": b'["Hello"]',
        "unknown_field": body(temprature=0.5),
        "missing_messages": json.dumps({"model": EMBEDDED_POLICY}).encode(),
        "empty_messages": body(messages=[]),
        "empty_content": body(messages=[{"role": "user", "content": "  "}]),
        "bad_role": body(messages=[{"role": "tool", "content": "x"}]),
        "n_2": body(n=2),
        "max_tokens_over_limit": body(max_tokens=max_tokens_limit + 1),
        "max_tokens_zero": body(max_tokens=0),
        "width_over_limit": body(saffron={"width": max_width + 1}),
        "unknown_method": body(saffron={"method": "magic"}),
        "bad_method_option": body(saffron={"wdth": 2}),
        "bad_option_value": body(saffron={"width": 0}),
        "temperature_out_of_range": body(temperature=7),
        "tools": body(tools=[{"type": "function", "function": {"name": "f"}}]),
        "unknown_model": body(model="gpt-9"),
    }


def completion_problems(obj: Any, max_tokens: int) -> list[str]:
    """What is wrong with a ``chat.completion`` body (empty: well formed)."""
    out: list[str] = []
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    if obj.get("object") != "chat.completion" or not str(obj.get("id", "")).startswith("chatcmpl-"):
        out.append("object/id")
    if not isinstance(obj.get("created"), int) or not isinstance(obj.get("model"), str):
        out.append("created/model")
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return [*out, "choices"]
    c = choices[0]
    msg = c.get("message") or {}
    if c.get("index") != 0 or msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
        out.append("message")
    if c.get("finish_reason") not in ("stop", "length"):
        out.append("finish_reason")
    u = obj.get("usage") or {}
    prompt, done, total = (u.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if not (isinstance(prompt, int) and isinstance(done, int) and isinstance(total, int)) or prompt + done != total \
            or prompt < 1 or done > max_tokens:
        out.append("usage tokens")
    flops = u.get("flops") or {}
    if not flops.get("total") or flops["total"] != sum(v for k, v in flops.items() if k != "total"):
        out.append("usage flops")
    if not isinstance(obj.get("saffron"), dict) or "method" not in obj["saffron"]:
        out.append("saffron")
    return out


def _post(url: str, body: bytes, timeout: float) -> tuple[int, bytes, float]:
    u = urlparse(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), time.perf_counter() - t0
    finally:
        conn.close()


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]  # nearest rank


def bench_serve(requests: int = 32, clients: int = 16, method: str = "saffron", width: int = 2, max_tokens: int = 8,
                max_batch: int = 8, threads: int | None = None, models: ModelSet | None = None,
                harmful: list[Example] | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """See the module docstring. Usage: ``bench_serve(requests=4, clients=2, max_batch=2)``."""
    import torch

    if requests < 1 or clients < 1 or max_tokens < 1 or width < 1:
        raise InputError("bench serve needs --requests, --clients, --max-tokens and --width of at least 1")
    if max_batch < 2:
        raise InputError(f"--max-batch must be >= 2 (batch 1 is the one-at-a-time server it is compared with), "
                         f"got {max_batch}")
    get_method(method)  # an unknown name is one line, before any model loads
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        models = models or load_models(EMBEDDED_POLICY)
        bodies = request_bodies(models, requests, max_tokens, method, width, harmful)
        runs = {"one_at_a_time": _load(models, bodies, clients, method, width, max_tokens, 1, timeout, bad=False),
                "batched": _load(models, bodies, clients, method, width, max_tokens, max_batch, timeout, bad=True)}
    finally:
        torch.set_num_threads(before)
    one, many = (runs[k].pop("answers") for k in ("one_at_a_time", "batched"))
    same = [a == b for a, b in zip(one, many, strict=True) if a is not None and b is not None]
    rate1, rate = runs["one_at_a_time"]["requests_per_s"], runs["batched"]["requests_per_s"]
    return {**runs, "speedup": round(rate / rate1, 3) if rate and rate1 else None,
            "identical_share": sum(same) / len(same) if same else None,
            "settings": {"requests": requests, "clients": clients, "method": method,
                         "width": width if method == "saffron" else None, "max_tokens": max_tokens,
                         "max_batch": max_batch, "model": models.policy.name, "torch_threads": threads or before}}


def request_bodies(models: ModelSet, n: int, max_tokens: int, method: str, width: int,
                   harmful: list[Example] | None = None) -> list[tuple[str, bytes]]:
    """The fixed list of ``n`` requests, by kind: harmful prompts under the prefilling attack and benign
    prompts, alternating, each seeded so the two servers are asked exactly the same."""
    policy = models.policy
    rows = harmful if harmful is not None else pyrit_harmful(TEST_SPLIT)
    ext: dict[str, Any] = {"method": method, **({"width": width} if method == "saffron" else {})}
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        if i % 2 == 0:
            ex = rows[(i // 2) % len(rows)]
            prefill = policy.decode(policy.encode(ex.response or "Sure, here is")[:PREFILL_TOKENS])
            kind, msgs = "harmful", [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": prefill}]
        else:
            kind, msgs = "benign", [{"role": "user", "content": BENIGN[(i // 2) % len(BENIGN)]}]
        out.append((kind, json.dumps({"model": policy.name, "messages": msgs, "max_tokens": max_tokens, "seed": i,
                                      "saffron": ext}).encode()))
    return out


def _client(url: str, bodies: list[tuple[str, bytes]], todo: queue.SimpleQueue[int],
            results: list[tuple[str, int, bytes, float] | None], timeout: float) -> None:
    """One client: the next request of ``todo`` until none is left; its (kind, status, body, seconds) into
    ``results`` at the request's index."""
    while True:
        try:
            i = todo.get_nowait()
        except queue.Empty:
            return
        try:
            status, data, secs = _post(url, bodies[i][1], timeout)
        except OSError as e:
            status, data, secs = -1, str(e).encode(), float("nan")
        results[i] = (bodies[i][0], status, data, secs)


def _load(models: ModelSet, bodies: list[tuple[str, bytes]], clients: int, method: str, width: int,
          max_tokens: int, max_batch: int, timeout: float, bad: bool) -> dict[str, Any]:
    """One server (``max_batch``) under ``clients`` clients that take the next request of ``bodies`` as they
    finish one; with ``bad``, malformed requests are sent while they wait."""
    settings = ServeSettings(method=method, method_options={"width": width} if method == "saffron" else {},
                             default_max_tokens=max_tokens, max_tokens_limit=max(64, max_tokens),
                             max_width=max(8, width), max_batch=max_batch, max_queue=len(bodies))
    engine = Engine(models, settings)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(bodies)):
        todo.put(i)
    results: list[tuple[str, int, bytes, float] | None] = [None] * len(bodies)
    cases = malformed_cases(settings.max_tokens_limit, settings.max_width) if bad else {}
    with background_server(create_app(engine)) as url:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(_client, url, bodies, todo, results, timeout) for _ in range(clients)]
            bad_status: dict[str, int] = {}
            bad_secs: list[float] = []
            if cases:
                time.sleep(0.5)  # the queue is filling: malformed input must still be answered at once
            for name, body in cases.items():
                status, _, secs = _post(url, body, 60)
                bad_status[name] = status
                bad_secs.append(secs)
            for f in futures:
                f.result()
        wall = time.perf_counter() - t0
    merged = engine.status()["merged"]
    done = [r for r in results if r is not None]
    ok = [(k, json.loads(d), s) for k, st, d, s in done if st == 200]
    well = [(k, o, s) for k, o, s in ok if not completion_problems(o, max_tokens)]
    lat = [s for _, _, s in ok]
    statuses: dict[str, int] = {}
    for _, st, _, _ in done:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    flops = [o["usage"]["flops"]["total"] for _, o, _ in well]
    search = [o["saffron"]["search_s"] for _, o, _ in well]
    out: dict[str, Any] = {
        "max_batch": max_batch,
        "requests": len(done),
        "failures": len(done) - len(ok),
        "statuses": statuses,
        "well_formed": len(well),
        "requests_per_s": round(len(ok) / wall, 4) if wall else None,
        "p50_s": _quantile(lat, 0.5),
        "p95_s": _quantile(lat, 0.95),
        "max_s": max(lat) if lat else None,
        "wall_s": round(wall, 3),
        "mean_search_s": sum(search) / len(search) if search else None,
        "mean_new_tokens": (sum(o["usage"]["completion_tokens"] for _, o, _ in well) / len(well)) if well else None,
        "tflops_per_request": sum(flops) / len(flops) / 1e12 if flops else None,
        "merged": merged,
        # each request's answer (None: it failed), to compare the two servers' tokens
        "answers": [json.loads(r[2])["choices"][0]["message"]["content"] if r is not None and r[1] == 200 else None
                    for r in results],
    }
    if cases:
        out.update(bad_input_cases=len(cases), bad_input_4xx=all(400 <= s < 500 for s in bad_status.values()),
                   bad_input_statuses=bad_status, bad_input_max_s=max(bad_secs))
    return out
