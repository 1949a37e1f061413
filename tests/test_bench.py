"""Benchmarks' machinery on the tiny model: they must measure what they claim (figures come from the CLI)."""

from pathlib import Path

from saffron.bench.cache import bench_cache
from saffron.bench.flops import bench_flops


def test_analytic_flops_match_torch_flop_counter(tiny_dir: Path) -> None:
    res = bench_flops(str(tiny_dir))
    assert res["measured_flops"] > 0 and len(res["calls"]) == 5
    assert res["max_call_rel_err"] <= 0.02


def test_cache_bench_computes_each_unique_token_once(tiny_dir: Path) -> None:
    res = bench_cache(prompt_tokens=40, width=4, steps=5, model_spec=str(tiny_dir))
    assert res["prompt_tokens"] == 40
    assert res["computed_tokens"] == res["unique_tokens"] < res["nocache_computed_tokens"]
    assert res["kv_bytes"] == res["kv_bytes_unique"] < res["kv_bytes_copies_peak"]
