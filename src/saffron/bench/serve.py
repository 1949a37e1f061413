"""``saffron bench serve``: the guarded server under load, on loopback.

The server (embedded stack, Saffron at a small width) runs in a thread of this process on a free loopback port;
``clients`` client threads each send two requests one after the other: a held-out harmful prompt under the
prefilling attack (the first 10 tokens of its harmful reference response as a final assistant message to
continue) and a benign prompt. While they wait, malformed requests are sent too; each must get a 4xx at once.
Latency is measured per request by the client, queueing included.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from saffron.data import TEST_SPLIT, Example, pyrit_harmful
from saffron.embedded import EMBEDDED_POLICY
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


def bench_serve(clients: int = 50, width: int = 2, max_tokens: int = 8, max_concurrent: int = 1,
                threads: int | None = None, models: ModelSet | None = None, harmful: list[Example] | None = None,
                timeout: float = 3600.0) -> dict[str, Any]:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(clients, width, max_tokens, max_concurrent, models, harmful, timeout)
    finally:
        torch.set_num_threads(before)


def _bench(clients: int, width: int, max_tokens: int, max_concurrent: int, models: ModelSet | None,
           harmful: list[Example] | None, timeout: float) -> dict[str, Any]:
    import torch

    settings = ServeSettings(method="saffron", method_options={"width": width}, default_max_tokens=max_tokens,
                             max_tokens_limit=max(64, max_tokens), max_width=max(8, width),
                             max_concurrent=max_concurrent, max_queue=clients)
    models = models or load_models(EMBEDDED_POLICY)
    engine = Engine(models, settings)
    policy = models.policy
    rows = harmful if harmful is not None else pyrit_harmful(TEST_SPLIT)
    requests: list[tuple[str, bytes]] = []
    for i in range(clients):
        ex = rows[i % len(rows)]
        prefill = policy.decode(policy.encode(ex.response or "Sure, here is")[:PREFILL_TOKENS])
        harm = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": prefill}]
        benign = [{"role": "user", "content": BENIGN[i % len(BENIGN)]}]
        requests += [("harmful", json.dumps({"model": engine.model_id, "messages": harm,
                                             "max_tokens": max_tokens}).encode()),
                     ("benign", json.dumps({"model": engine.model_id, "messages": benign,
                                            "max_tokens": max_tokens}).encode())]
    bad = malformed_cases(settings.max_tokens_limit, settings.max_width)

    with background_server(create_app(engine)) as url:
        def client(i: int) -> list[tuple[str, int, bytes, float]]:
            out = []
            for kind, body in requests[2 * i: 2 * i + 2]:
                try:
                    status, data, secs = _post(url, body, timeout)
                except OSError as e:
                    status, data, secs = -1, str(e).encode(), float("nan")
                out.append((kind, status, data, secs))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            time.sleep(0.5)  # the queue is filling: malformed input must still be answered at once
            bad_status: dict[str, int] = {}
            bad_secs: list[float] = []
            for name, body in bad.items():
                status, _, secs = _post(url, body, 60)
                bad_status[name] = status
                bad_secs.append(secs)
            results = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - t0

    ok = [(k, json.loads(d), s) for k, st, d, s in results if st == 200]
    well = [(k, o, s) for k, o, s in ok if not completion_problems(o, max_tokens)]
    lat = [s for _, _, s in ok]
    statuses: dict[str, int] = {}
    for _, st, _, _ in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    flops = [o["usage"]["flops"]["total"] for _, o, _ in well]
    search = [o["saffron"]["search_s"] for _, o, _ in well]
    return {
        "requests": len(results),
        "clients": clients,
        "failures": len(results) - len(ok),
        "statuses": statuses,
        "well_formed": len(well),
        "p50_s": _quantile(lat, 0.5),
        "p95_s": _quantile(lat, 0.95),
        "max_s": max(lat) if lat else None,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "mean_search_s": sum(search) / len(search) if search else None,
        "mean_new_tokens": (sum(o["usage"]["completion_tokens"] for _, o, _ in well) / len(well)) if well else None,
        "tflops_per_request": sum(flops) / len(flops) / 1e12 if flops else None,
        "bad_input_cases": len(bad),
        "bad_input_4xx": all(400 <= s < 500 for s in bad_status.values()),
        "bad_input_statuses": bad_status,
        "bad_input_max_s": max(bad_secs),
        "settings": {"method": "saffron", "width": width, "max_tokens": max_tokens,
                     "max_concurrent": max_concurrent, "max_queue": clients, "model": engine.model_id,
                     "torch_threads": torch.get_num_threads()},
    }
