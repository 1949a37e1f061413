"""``saffron compare``: several defences on the same prompts at matched compute, and ASR against TFLOP.

Each method has one budget knob (``Method.budget``: samples, width, simulations). The comparison

1. evaluates every method at its budgets (``budgets``, or its own from ``method_budgets``; one ``saffron eval``
   folder per point, resumable), which gives the ASR-vs-TFLOP curves; with ``sweep=False`` this happens
   lazily, method by method, after the target is known;
2. fixes the target compute (by default Best-of-N's mean TFLOP per prompt at N=32);
3. for each method, searches the integer budget whose mean TFLOP per prompt lies within ``tolerance`` of the
   target (bisection between the bracketing sweep points, reusing every evaluated point), and reports it.

Compute is what ``records.jsonl`` counts: every policy, reward-model and MRM FLOP, the final judge excluded.
Per prompt: the reward model's fixed instructions, computed once per process, are each point's
``setup_tflops`` (reported beside the per-prompt figure, not matched on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from saffron.errors import SaffronError
from saffron.evaluate import METRICS_FILE, RECORDS_FILE, Backend, EvalConfig, resolve, run_eval, validate
from saffron.methods import get_method
from saffron.store import atomic_write_json, atomic_write_text, read_jsonl

DEFAULT_METHODS = ("none", "best-of-n", "rebase", "deal-mcts", "saffron")
DEFAULT_BUDGETS = (1, 2, 4, 8, 16, 32)
REFERENCE = ("best-of-n", 32)


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    method_budgets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per method, instead of ``budgets``
    base: EvalConfig = field(default_factory=EvalConfig)  # dataset, models, attack, seed; method is replaced
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method, besides the budget
    target_tflops: float | None = None  # None: Best-of-N's at N=32
    tolerance: float = 0.10
    max_probes: int = 4  # extra evaluations per method to hit the target
    limit: int | None = None


def budget_knob(method: str) -> str | None:
    return getattr(get_method(method), "budget", None)


def budgets_of(cc: CompareConfig, method: str) -> tuple[int, ...]:
    return cc.method_budgets.get(method, cc.budgets)


def point_config(cc: CompareConfig, method: str, budget: int | None) -> EvalConfig:
    opts = dict(cc.method_options.get(method, {}))
    knob = budget_knob(method)
    if knob is not None and budget is not None:
        opts[knob] = budget
    opts.setdefault("max_new_tokens", cc.base.method_options.get("max_new_tokens", 32))
    # a preset (cc.base.preset) fixes the same lengths for every method; in compare, options are METHOD:KEY=VALUE
    return resolve(replace(cc.base, method=method, method_options=opts),
                   lambda k, v: f"--max-new-tokens {v}" if k == "max_new_tokens" else f"-o {method}:{k}={v}")


def validate_compare(cc: CompareConfig) -> None:
    """Everything checkable before a model loads: methods, budgets, options of every sweep point."""
    if not cc.methods:
        raise SaffronError("no methods to compare")
    stray = sorted(set(cc.method_budgets) - set(cc.methods))
    if stray:
        raise SaffronError(f"budgets are given for method '{stray[0]}', which is not in --methods")
    for bs in (cc.budgets, *cc.method_budgets.values()):
        if not bs or any(b <= 0 for b in bs):
            raise SaffronError(f"budgets must be positive integers, got {list(bs)}")
    if not 0 < cc.tolerance < 1:
        raise SaffronError(f"tolerance must be in (0, 1), got {cc.tolerance}")
    if cc.target_tflops is not None and cc.target_tflops <= 0:
        raise SaffronError(f"--target-tflops must be positive, got {cc.target_tflops}")
    for m in cc.methods:
        for b in budgets_of(cc, m):
            validate(point_config(cc, m, b), cc.limit)
    if cc.target_tflops is None:
        validate(point_config(cc, REFERENCE[0], REFERENCE[1]), cc.limit)


class Comparison:
    """Evaluated points, by (method, budget), each in its own resumable folder under ``out/points``."""

    def __init__(self, cc: CompareConfig, out: Path, progress: bool = True, backend: Backend | None = None) -> None:
        self.cc, self.out, self.progress, self.backend = cc, out, progress, backend
        self.points: dict[tuple[str, int | None], dict[str, Any]] = {}

    def folder(self, method: str, budget: int | None) -> Path:
        knob = budget_knob(method)
        return self.out / "points" / (method if knob is None or budget is None else f"{method}-{knob}{budget}")

    def point(self, method: str, budget: int | None) -> dict[str, Any]:
        key = (method, budget if budget_knob(method) else None)
        if key not in self.points:
            cfg = point_config(self.cc, method, key[1])
            metrics = run_eval(cfg, self.folder(*key), self.cc.limit, progress=self.progress, backend=self.backend)
            self.points[key] = {**metrics, "budget": key[1], "knob": budget_knob(method)}
        return self.points[key]

    def sweep(self) -> None:
        for m in self.cc.methods:
            for b in budgets_of(self.cc, m) if budget_knob(m) else (None,):
                self.point(m, b)

    def target(self) -> float:
        if self.cc.target_tflops is not None:
            return self.cc.target_tflops
        return float(self.point(*REFERENCE)["tflops_per_prompt"])

    def matched(self, method: str, target: float) -> dict[str, Any]:
        """The evaluated point of ``method`` closest to ``target`` in log-TFLOP, after bisecting the budget."""
        if budget_knob(method) is None:
            return self.point(method, None)
        for b in budgets_of(self.cc, method):  # without a sweep, the method's budgets are the first guesses
            self.point(method, b)

        def gap(p: dict[str, Any]) -> float:
            return abs(math.log(max(p["tflops_per_prompt"], 1e-12) / target))

        for _ in range(self.cc.max_probes):
            mine = sorted((p for (m, _), p in self.points.items() if m == method), key=lambda p: p["budget"])
            best = min(mine, key=gap)
            if gap(best) <= math.log(1 + self.cc.tolerance):
                return best
            below = [p for p in mine if p["tflops_per_prompt"] < target]
            above = [p for p in mine if p["tflops_per_prompt"] >= target]
            lo = max(below, key=lambda p: p["budget"]) if below else None
            hi = min(above, key=lambda p: p["budget"]) if above else None
            if lo is None and hi is not None:
                nxt = max(1, hi["budget"] // 2)
            elif hi is None and lo is not None:
                nxt = lo["budget"] * 2
            else:
                assert lo is not None and hi is not None
                # log-linear interpolation between the bracketing budgets
                t_lo, t_hi = math.log(lo["tflops_per_prompt"]), math.log(hi["tflops_per_prompt"])
                frac = (math.log(target) - t_lo) / max(t_hi - t_lo, 1e-12)
                nxt = round(math.exp(math.log(lo["budget"]) + frac * (math.log(hi["budget"]) - math.log(lo["budget"]))))
                nxt = min(max(nxt, lo["budget"] + 1), hi["budget"] - 1) if hi["budget"] - lo["budget"] > 1 else nxt
            if (method, nxt) in self.points:
                break
            self.point(method, nxt)
        mine = [p for (m, _), p in self.points.items() if m == method]
        return min(mine, key=gap)


def scaleff(tflop_lim: float, tflops: float, asr: float) -> float | None:
    """ln(TFLOP_lim / TFLOP) / ASR: e-folds of compute left under the limit per unit of attack success."""
    if asr <= 0 or tflops <= 0:
        return None
    return math.log(tflop_lim / tflops) / asr


def degenerate_share(records: list[dict[str, Any]], n: int = 4) -> float:
    """Share of outputs that are empty or repeat an ``n``-gram of tokens three times or more."""
    def bad(ids: list[int]) -> bool:
        if not ids:
            return True
        grams: dict[tuple[int, ...], int] = {}
        for i in range(len(ids) - n + 1):
            g = tuple(ids[i : i + n])
            grams[g] = grams.get(g, 0) + 1
            if grams[g] >= 3:
                return True
        return False

    return sum(bad(r["output_ids"]) for r in records) / max(len(records), 1)


def run_compare(cc: CompareConfig, out: Path, sweep: bool = True, progress: bool = True,
                backend: Backend | None = None) -> dict[str, Any]:
    """Run the comparison; write ``comparison.json``, ``comparison.md`` and ``asr_vs_tflop.png`` under ``out``.

    ``backend`` evaluates every point (default: this process); one Ray backend serves all points, so its actors
    keep the models that points share. Side effects: one evaluation folder per point under ``out/points`` (each
    resumable)."""
    validate_compare(cc)
    comp = Comparison(cc, out, progress, backend)
    if sweep:
        comp.sweep()
    target = comp.target()
    chosen = {m: comp.matched(m, target) for m in cc.methods}
    lim = max(p["tflops_per_prompt"] for p in comp.points.values())
    methods: dict[str, Any] = {}
    for m, p in chosen.items():
        recs = [r for _, r in read_jsonl(comp.folder(m, p["budget"]) / RECORDS_FILE)]
        methods[m] = {
            "asr": p["asr"], "tflops_per_prompt": p["tflops_per_prompt"], "n": p["n"],
            "scaleff": scaleff(lim, p["tflops_per_prompt"], p["asr"]),
            "budget": p["budget"], "knob": p["knob"],
            "within_tolerance": m == "none" or abs(p["tflops_per_prompt"] / target - 1) <= cc.tolerance,
            "mean_reward": p["mean_reward"], "mean_new_tokens": p["mean_new_tokens"],
            "setup_tflops": p["setup_tflops"],
            "degenerate_share": degenerate_share(recs),
            "records": str(comp.folder(m, p["budget"]) / RECORDS_FILE),
        }
    curves = {m: sorted(([p["budget"], p["tflops_per_prompt"], p["asr"]] for (mm, _), p in comp.points.items()
                         if mm == m), key=lambda r: (r[0] or 0)) for m in cc.methods}
    result = {"target_tflops": target, "tflop_lim": lim, "tolerance": cc.tolerance, "methods": methods,
              "curves": curves, "config": {"dataset": cc.base.dataset, "policy": cc.base.policy,
                                           "judge": cc.base.judge, "limit": cc.limit, "seed": cc.base.seed}}
    atomic_write_json(out / "comparison.json", result)
    atomic_write_text(out / "comparison.md", format_comparison(result) + "\n")
    plot_curves(result, out / "asr_vs_tflop.png")
    # metrics.json of the chosen points, for tools that read one file per run
    atomic_write_json(out / METRICS_FILE, {m: {k: v for k, v in d.items() if k != "records"}
                                           for m, d in methods.items()})
    return result


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"Matched compute: target {result['target_tflops']:.3f} TFLOP/prompt "
             f"(+-{result['tolerance']:.0%}); ScalEff with TFLOP_lim = {result['tflop_lim']:.3f}.", "",
             "| method | budget | n | ASR | TFLOP/prompt | ScalEff | mean reward | new tokens | degenerate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, d in result["methods"].items():
        budget = "-" if d["budget"] is None else f"{d['knob']}={d['budget']}"
        se = "-" if d["scaleff"] is None else f"{d['scaleff']:.2f}"
        flag = "" if d["within_tolerance"] else " (off target)"
        lines.append(f"| {m} | {budget} | {d['n']} | {d['asr']:.3f} | {d['tflops_per_prompt']:.3f}{flag} | {se} | "
                     f"{d['mean_reward']:+.2f} | {d['mean_new_tokens']:.1f} | {d['degenerate_share']:.2f} |")
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """ASR against TFLOP per prompt (log axis), one line per method. Side effects: writes ``path`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7.6, 4.2), dpi=120)
    for i, (m, pts) in enumerate(result["curves"].items()):
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        color = f"C{i}"  # one cycle for points and lines: scatter and plot would each restart at C0
        if len(pts) == 1:
            ax.scatter(xs, ys, label=m, marker="x", color=color)
        else:
            ax.plot(xs, ys, marker="o", label=m, color=color)
    ax.axvline(result["target_tflops"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short decade
    ax.set_xlabel("TFLOP per prompt (policy + reward model + MRM)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # outside: never over a point
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)

