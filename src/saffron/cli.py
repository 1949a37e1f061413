"""The ``saffron`` command line. Each verb is a thin shell over the library; see ``saffron --help``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from saffron.cli_options import (
    AS_JSON,
    BACKEND,
    DATASET,
    DEV_JUDGES,
    DEV_PROMPTS,
    DEVICE,
    DTYPE,
    JUDGE,
    LIMIT,
    MAX_NEW,
    MAX_NEW_TOKENS,
    MRM,
    OPTS,
    POLICY,
    PREFILL,
    PREFILL_TOKENS,
    PRESET,
    PROMPT_BATCH,
    QUALITY,
    RAY_ADDRESS,
    RAY_GPUS,
    RAY_WORKERS,
    REWARD,
    RUNNER,
    SEED,
    TEMP,
    TFLOP_LIM,
    TOP_P,
    TUNED,
)
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.extras import require

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Inference-time safety for language models (Saffron-1).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each prints the figures an issue asks for.")
app.add_typer(bench_app, name="bench")
mrm_app = typer.Typer(no_args_is_help=True, help="Multifurcation reward models.")
app.add_typer(mrm_app, name="mrm")

def _place(device: str, dtype: str, runner: str) -> Any:
    """Check --device/--dtype/--runner and make them the process's placement (device.py), before any model loads:
    a device this machine lacks or a dtype it cannot compute in is one line, and nothing is written."""
    from saffron.device import Placement, resolve_device, resolve_dtype, set_default

    p = Placement(device=device, dtype=dtype, runner=runner).check()
    resolve_dtype(dtype, resolve_device(device))
    set_default(p)
    return p


def _quiet_hf() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    # transformers leaves these two unannotated
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="The user prompt."),
    prefill: str | None = typer.Option(None, "--prefill", help="Text the assistant turn starts with."),
    method: str = typer.Option("none", "--method", help="Decoding method (defence)."),
    policy: str = POLICY,
    judge: str = JUDGE,
    reward: str | None = REWARD,
    mrm: str | None = MRM,
    max_new_tokens: int = MAX_NEW,
    temperature: float | None = TEMP,
    top_p: float | None = TOP_P,
    opt: list[str] = OPTS,
    seed: int = SEED,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON record instead of the text."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Answer one prompt (optionally attacked with a prefill) under a defence, and judge the answer."""
    from saffron.config import EvalConfig, resolve, validate
    from saffron.data import Example
    from saffron.evaluate import build_stack
    from saffron.judges import load_judge, parse_judges
    from saffron.pipeline import prompt_seed, run_prompt
    from saffron.session import make_session

    if not prompt.strip():
        raise SaffronError("the prompt is empty")
    judges = parse_judges(judge)
    place = _place(device, dtype, runner)
    cfg = resolve(EvalConfig(method=method, policy=policy, judges=judges, reward=reward, mrm=mrm, prefill=prefill,
                             seed=seed, method_options=_options(max_new_tokens, temperature, top_p, opt),
                             placement=place))
    m = validate(cfg, None)
    _quiet_hf()
    stack = build_stack(cfg)
    ex = Example(id="cli", prompt=prompt, prefill=prefill)
    session = make_session(stack.policy.model, ex, prefill_tokens=0, reserve=m.config.max_new_tokens)
    # the same pipeline as eval and serve: the same prompt, options and seed give the same answer
    run = run_prompt(m, stack, session, prompt_seed(seed, ex.id), judges={j: load_judge(j) for j in judges})
    primary = run.verdicts[judges[0]]
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, "prefill": prefill or "", "output": run.output,
                               "reward": primary["reward"], "unsafe": primary["unsafe"], "judges": run.verdicts,
                               "new_tokens": len(run.result.output_ids), "method": method,
                               "flops": run.result.flops}, ensure_ascii=False))
    else:
        typer.echo((prefill or "") + run.output)
        for j, v in run.verdicts.items():
            typer.echo(f"[judge {j}: reward {v['reward']:+.3f} -> {'UNSAFE' if v['unsafe'] else 'safe'}]", err=True)


@app.command("eval")
def eval_cmd(
    method: str = typer.Option("none", "--method", help="Decoding method (defence): none, best-of-n, rejection, "
                               "rebase, deal-mcts, saffron."),
    dataset: str = typer.Option(DATASET, "--dataset", help="Dataset spec, e.g. pyrit-harmful, advbench, "
                                "jsonl:PATH."),
    limit: int | None = LIMIT,
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder for records.jsonl and metrics.json."),
    policy: str = POLICY,
    judge: str = JUDGE,
    reward: str | None = REWARD,
    mrm: str | None = MRM,
    prefill: str | None = PREFILL,
    prefill_tokens: int = PREFILL_TOKENS,
    max_new_tokens: int = MAX_NEW,
    temperature: float | None = TEMP,
    top_p: float | None = TOP_P,
    opt: list[str] = OPTS,
    seed: int = SEED,
    quality: bool = QUALITY,
    preset: str | None = PRESET,
    tuned: Path | None = TUNED,
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
    backend: str = BACKEND,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int | None = RAY_WORKERS,
    ray_gpus_per_worker: float | None = RAY_GPUS,
    prompt_batch: int = PROMPT_BATCH,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Run the prefilling attack on a dataset under a defence; write records and metrics (resumable)."""
    from saffron.backends import make_backend
    from saffron.config import EvalConfig, resolve, validate
    from saffron.evaluate import format_table, run_eval, search_reward_warning, search_rewards
    from saffron.judges import parse_judges

    options = _options(max_new_tokens, temperature, top_p, opt)
    tuning = None
    if tuned is not None:
        from saffron.presets import eval_flag
        from saffron.tune import apply_tuning

        per, tuning, _ = apply_tuning(tuned, (method,), {method: options}, dataset, limit, preset,
                                      lambda m, k, v: eval_flag(k, v))
        if method not in tuning["chosen"]:
            raise SaffronError(f"--tuned {tuned} holds no choice for method '{method}'")
        options = per[method]
    cfg = EvalConfig(method=method, dataset=dataset, policy=policy, judges=parse_judges(judge), reward=reward,
                     mrm=mrm, prefill=prefill, prefill_tokens=prefill_tokens, seed=seed, quality=quality, preset=preset,
                     method_options=options, tuning=tuning, placement=_place(device, dtype, runner))
    cfg = resolve(cfg)
    validate(cfg, limit)  # with --tuned, also refuses a choice made for another policy, model or length
    _quiet_hf()
    with make_backend(backend, ray_address, ray_workers, ray_gpus_per_worker, prompt_batch) as be:
        # after every option is checked: a run refused for bad input prints its error alone
        warning = search_reward_warning(cfg.judges, search_rewards(cfg))
        if warning:
            typer.echo(warning, err=True)
        metrics = run_eval(cfg, out, limit, backend=be)
    typer.echo(json.dumps(metrics, indent=2) if as_json else format_table([metrics]))
    if not as_json:
        typer.echo(f"records: {out / 'records.jsonl'}  metrics: {out / 'metrics.json'}", err=True)


def _options(max_new_tokens: int, temperature: float | None, top_p: float | None, opts: list[str]) -> dict[str, Any]:
    from saffron.config import parse_options

    out: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        out["temperature"] = temperature
    if top_p is not None:
        out["top_p"] = top_p
    return {**out, **parse_options(opts)}


@app.command("compare")
def compare_cmd(
    methods: str = typer.Option(",".join(("none", "best-of-n", "rebase", "deal-mcts", "saffron")), "--methods",
                                help="Comma-separated methods; NAME@LABEL is a variant of NAME, a row of its own "
                                "with its own -o NAME@LABEL:KEY=VALUE options (those of NAME do not apply to it), "
                                "folders and --method-budgets (e.g. saffron,saffron@paper)."),
    budgets: str = typer.Option("1,2,4,8,16,32", "--budgets", help="Budget sweep (each method's knob: samples, "
                                "width, simulations)."),
    method_budgets: list[str] = typer.Option([], "--method-budgets", help="METHOD=B1,B2,... instead of --budgets "
                                             "for one method, repeatable (e.g. --method-budgets saffron=2,4)."),
    dataset: str = typer.Option(DATASET, "--dataset", help="Dataset spec."),
    limit: int | None = LIMIT,
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for points, comparison.json, table, PNG."),
    target_tflops: float | None = typer.Option(None, "--target-tflops", help="Matched compute per prompt "
                                               "(default: Best-of-N's at N=32)."),
    tflop_lim: float = typer.Option(TFLOP_LIM, "--tflop-lim", help="ScalEff's TFLOP_lim in TFLOP per prompt, fixed "
                                    "before the run (default 2.0, about 3x Best-of-N-32 on the embedded stack); it "
                                    "must lie above the evaluated points."),
    seeds: str | None = typer.Option(None, "--seeds", help="Seeds for the sampling methods (best-of-n, rejection, "
                                     "rebase, deal-mcts), e.g. 0,1,2: each matched point once per seed, ASR as mean "
                                     "and sd; intervals and tests use the first. Default: --seed alone."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Evaluate every budget (the curve) or only "
                               "what matching the target needs."),
    benign: str | None = typer.Option(None, "--benign", help="Benign set, e.g. benign:test: every method at its "
                                      "matched point answers it without prefill; reports over-refusal (default: "
                                      "off)."),
    benign_limit: int | None = typer.Option(None, "--benign-limit", help="First N benign prompts (default: "
                                            "--limit)."),
    policy: str = POLICY,
    judge: str = JUDGE,
    reward: str | None = REWARD,
    mrm: str | None = MRM,
    prefill: str | None = PREFILL,
    prefill_tokens: int = PREFILL_TOKENS,
    max_new_tokens: int = MAX_NEW,
    opt: list[str] = typer.Option([], "--opt", "-o",
                                  help="METHOD:KEY=VALUE, repeatable (e.g. -o saffron:final=first); METHOD may be "
                                  "a variant (saffron@paper); KEY reward or mrm replaces --reward/--mrm for that "
                                  "row (e.g. -o best-of-n@prm:reward=head-prm)."),
    seed: int = SEED,
    quality: bool = QUALITY,
    preset: str | None = PRESET,
    tuned: Path | None = TUNED,
    as_json: bool = typer.Option(False, "--json",
                                 help="Print {methods: {name: {asr, judges: {judge: {asr, ci95}}, asr_any, kappa, "
                                 "p_vs_best_of_n, seeds, tflops_per_prompt, scaleff, n, ...}}}."),
    backend: str = BACKEND,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int | None = RAY_WORKERS,
    ray_gpus_per_worker: float | None = RAY_GPUS,
    prompt_batch: int = PROMPT_BATCH,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Several defences on the same prompts at matched compute: table, comparison.json, asr_vs_tflop.png."""
    from saffron.backends import make_backend
    from saffron.compare import CompareConfig, compare_warning, format_comparison, run_compare, validate_compare
    from saffron.config import EvalConfig
    from saffron.judges import parse_judges

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    per_method = _method_options(opt, names, "compare")
    tuning = None
    if tuned is not None:
        from saffron.tune import apply_tuning

        per_method, tuning, untuned = apply_tuning(tuned, names, per_method, dataset, limit, preset)
        if untuned:
            typer.echo(f"warning: --tuned {tuned} holds no choice for {', '.join(untuned)}: run with defaults",
                       err=True)
    budget_list = _int_list("--budgets", budgets)
    per_budgets: dict[str, tuple[int, ...]] = {}
    for mb in method_budgets:
        m, sep, bs = mb.partition("=")
        if not sep:
            raise SaffronError(f"--method-budgets expects METHOD=B1,B2,..., got '{mb}'")
        per_budgets[m.strip()] = _int_list("--method-budgets", bs)
    seed_list = None if seeds is None else _int_list("--seeds", seeds)
    base = EvalConfig(dataset=dataset, policy=policy, judges=parse_judges(judge), reward=reward, mrm=mrm,
                      prefill=prefill, prefill_tokens=prefill_tokens, seed=seed, quality=quality, preset=preset,
                      method_options={"max_new_tokens": max_new_tokens}, tuning=tuning,
                      placement=_place(device, dtype, runner))
    cc = CompareConfig(methods=names, budgets=budget_list, method_budgets=per_budgets, base=base,
                       method_options=per_method, target_tflops=target_tflops, limit=limit, seeds=seed_list,
                       tflop_lim=tflop_lim, benign=benign, benign_limit=benign_limit)
    validate_compare(cc)
    _quiet_hf()
    with make_backend(backend, ray_address, ray_workers, ray_gpus_per_worker, prompt_batch) as be:
        warning = compare_warning(cc)  # after every option is checked, as in eval
        if warning:
            typer.echo(warning, err=True)
        res = run_compare(cc, out, sweep=sweep, backend=be)
    if as_json:
        slim = {m: {k: d[k] for k in ("asr", "asr_ci95", "judges", "asr_any", "asr_any_ci95", "kappa", "quality",
                                       "p_vs_best_of_n", "seeds", "tflops_per_prompt", "scaleff", "n", "budget",
                                       "mean_reward", "mean_new_tokens", "degenerate_share",
                                       "judge_is_search_reward", "benign", "sim_to_none", "same_as_none")}
                for m, d in res["methods"].items()}
        typer.echo(json.dumps({"target_tflops": res["target_tflops"], "tflop_lim": res["tflop_lim"],
                               "reference": res["reference"], "benign": res["benign"], "distance": res["distance"],
                               "methods": slim}, indent=2))
    else:
        typer.echo(format_comparison(res))
        typer.echo(f"plot: {out / 'asr_vs_tflop.png'}  table: {out / 'comparison.md'}", err=True)


def _method_options(opt: list[str], names: tuple[str, ...], verb: str) -> dict[str, dict[str, Any]]:
    """``-o METHOD:KEY=VALUE`` of compare and tune, by method; a method not in ``names`` is refused."""
    from saffron.config import parse_options

    per_method: dict[str, dict[str, Any]] = {}
    for o in opt:
        m, sep, kv = o.partition(":")
        if not sep:
            raise SaffronError(f"--opt for {verb} expects METHOD:KEY=VALUE, got '{o}'")
        per_method.setdefault(m.strip(), {}).update(parse_options([kv]))
    stray = sorted(set(per_method) - set(names))
    if stray:
        raise SaffronError(f"--opt names method '{stray[0]}', which is not in --methods")
    return per_method


@app.command("tune")
def tune_cmd(
    methods: str = typer.Option("best-of-n,rebase,deal-mcts,saffron", "--methods", help="Comma-separated methods "
                                "to tune (each has a grid in saffron.methods.grids; none is never tuned)."),
    dataset: str = DEV_PROMPTS,
    limit: int | None = LIMIT,
    out: Path = typer.Option(Path("runs/tune"), "--out", help="Folder for grid-i comparisons, tuning.json, "
                             "tuning.md (resumable)."),
    judge: str = typer.Option(DEV_JUDGES, "--judge", help="Judges, comma-separated; "
                              "the objective averages those that are no search-time reward of the method."),
    method_budgets: list[str] = typer.Option([], "--method-budgets", help="METHOD=B: the first budget its "
                                             "matching tries (default best-of-n=32 rebase=3 deal-mcts=5 "
                                             "saffron=44), repeatable."),
    target_tflops: float | None = typer.Option(None, "--target-tflops", help="Matched compute per prompt "
                                               "(default: Best-of-N's at N=32 under its first configuration)."),
    tflop_lim: float = typer.Option(TFLOP_LIM, "--tflop-lim", help="ScalEff's TFLOP_lim in each grid's comparison "
                                    "table (not used by the choice)."),
    policy: str = POLICY,
    reward: str | None = REWARD,
    mrm: str | None = MRM,
    prefill: str | None = PREFILL,
    prefill_tokens: int = PREFILL_TOKENS,
    max_new_tokens: int = MAX_NEW,
    opt: list[str] = typer.Option([], "--opt", "-o", help="METHOD:KEY=VALUE for every configuration of METHOD, "
                                  "repeatable; an option its grid varies is refused."),
    seed: int = SEED,
    as_json: bool = typer.Option(False, "--json", help="Print tuning.json."),
    backend: str = BACKEND,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int | None = RAY_WORKERS,
    ray_gpus_per_worker: float | None = RAY_GPUS,
    prompt_batch: int = PROMPT_BATCH,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Choose every method's configuration on dev: its tuning grid at matched compute, lowest mean ASR under the
    independent judges + junk rate. Apply with compare/eval --tuned OUT/tuning.json."""
    from saffron.backends import make_backend
    from saffron.config import EvalConfig
    from saffron.judges import parse_judges
    from saffron.tune import TuneConfig, format_tuning, run_tune, validate_tune

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    budgets: dict[str, int] = {}
    for mb in method_budgets:
        m, sep, b = mb.partition("=")
        bs = _int_list("--method-budgets", b) if sep else ()
        if len(bs) != 1:
            raise SaffronError(f"--method-budgets for tune expects METHOD=B (one budget), got '{mb}'")
        budgets[m.strip()] = bs[0]
    base = EvalConfig(dataset=dataset, policy=policy, judges=parse_judges(judge), reward=reward, mrm=mrm,
                      prefill=prefill, prefill_tokens=prefill_tokens, seed=seed, quality=True,
                      method_options={"max_new_tokens": max_new_tokens}, placement=_place(device, dtype, runner))
    tc = TuneConfig(methods=names, base=base, method_budgets=budgets,
                    method_options=_method_options(opt, names, "tune"), target_tflops=target_tflops, limit=limit,
                    tflop_lim=tflop_lim)
    validate_tune(tc)
    _quiet_hf()
    with make_backend(backend, ray_address, ray_workers, ray_gpus_per_worker, prompt_batch) as be:
        res = run_tune(tc, out, backend=be)
    typer.echo(json.dumps(res, indent=2) if as_json else format_tuning(res))
    if not as_json:
        typer.echo(f"tuning: {out / 'tuning.json'}  table: {out / 'tuning.md'}  apply: --tuned {out / 'tuning.json'}",
                   err=True)


@app.command("ablate")
def ablate_cmd(
    dataset: str = DEV_PROMPTS,
    limit: int | None = typer.Option(None, "--limit", help="First N prompts."),
    out: Path = typer.Option(Path("runs/ablate"), "--out", help="Folder for the comparison's points, ablation.json, "
                             "ablation.md (resumable)."),
    judge: str = typer.Option(DEV_JUDGES, "--judge", help="Judges, comma-separated; "
                              "every row is reported under each."),
    rows: str | None = typer.Option(None, "--rows", help="Rows to run, comma-separated keys of "
                                    "saffron.methods.ablation (default: all; saffron@paper is always needed)."),
    method_budgets: list[str] = typer.Option([], "--method-budgets", help="ROW=B: the first budget a row's matching "
                                             "tries (default: its method's, as in tune), repeatable."),
    target_tflops: float | None = typer.Option(None, "--target-tflops", help="Matched compute per prompt "
                                               "(default: Best-of-N's at N=32 with the guard)."),
    tflop_lim: float = typer.Option(TFLOP_LIM, "--tflop-lim", help="ScalEff's TFLOP_lim in the comparison table."),
    policy: str = POLICY,
    reward: str | None = typer.Option(None, "--reward", help="The guard: reward model of the rows that use one "
                                      "(default smol-guard)."),
    lora_mrm: str = typer.Option("smol-mrm", "--lora-mrm", help="The paper's LoRA MRM (EOS masked), row "
                                 "saffron@paper."),
    head_mrm: str = typer.Option("smol-mrm-head", "--head-mrm", help="The head MRM of the other Saffron rows."),
    prm: str = typer.Option("head-prm", "--prm", help="The cheap reward model of the baselines' @head-prm rows."),
    prefill: str | None = PREFILL,
    prefill_tokens: int = PREFILL_TOKENS,
    max_new_tokens: int = MAX_NEW,
    seed: int = SEED,
    as_json: bool = typer.Option(False, "--json", help="Print ablation.json."),
    backend: str = BACKEND,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int | None = RAY_WORKERS,
    ray_gpus_per_worker: float | None = RAY_GPUS,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
    prompt_batch: int = PROMPT_BATCH,
) -> None:
    """Issue 13's ablation table on dev: the paper's Saffron, one change at a time up to the default, and the
    baselines with the guard vs the head PRM, all at matched compute; ablation.md/ablation.json."""
    from saffron.ablate import AblateConfig, format_ablation, run_ablate, validate_ablate
    from saffron.backends import make_backend
    from saffron.config import EvalConfig
    from saffron.judges import parse_judges

    budgets: dict[str, int] = {}
    for mb in method_budgets:
        k, sep, b = mb.partition("=")
        bs = _int_list("--method-budgets", b) if sep else ()
        if len(bs) != 1:
            raise SaffronError(f"--method-budgets for ablate expects ROW=B (one budget), got '{mb}'")
        budgets[k.strip()] = bs[0]
    base = EvalConfig(dataset=dataset, policy=policy, judges=parse_judges(judge), reward=reward, prefill=prefill,
                      prefill_tokens=prefill_tokens, seed=seed, quality=True,
                      method_options={"max_new_tokens": max_new_tokens}, placement=_place(device, dtype, runner))
    ac = AblateConfig(base=base, rows=None if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip()),
                      lora_mrm=lora_mrm, head_mrm=head_mrm, prm=prm, method_budgets=budgets,
                      target_tflops=target_tflops, limit=limit, tflop_lim=tflop_lim)
    validate_ablate(ac)
    _quiet_hf()
    with make_backend(backend, ray_address, ray_workers, ray_gpus_per_worker, prompt_batch) as be:
        res = run_ablate(ac, out, backend=be)
    typer.echo(json.dumps(res, indent=2) if as_json else format_ablation(res))
    if not as_json:
        typer.echo(f"ablation: {out / 'ablation.json'}  table: {out / 'ablation.md'}", err=True)


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise SaffronError(f"{flag} must be comma-separated integers, got '{text}'") from None


@app.command("train-guard")
def train_guard_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the weights and their JSON spec to."),
    seed: int = SEED,
    save_features: Path | None = typer.Option(None, "--save-features", help="Also write the training views' "
                                              "features to this .npz (to refit augmentation choices; probe)."),
    kind: str = typer.Option("probe", "--kind", help="probe: smol-guard's probe (guard half of the labels); "
                             "minilm: the independent minilm-judge (MiniLM encoder, judge half)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Train smol-guard's probe (with the robustness augmentations) or, --kind minilm, the independent judge, on
    the train split's labelled rows."""
    _place(device, dtype, runner)
    _quiet_hf()
    if kind == "minilm":
        if save_features is not None:
            raise SaffronError("--save-features applies to --kind probe only")
        from saffron.minilm_judge import train_minilm_judge

        typer.echo(json.dumps(train_minilm_judge(out, seed=seed).train, indent=2))
        return
    if kind != "probe":
        raise SaffronError(f"--kind must be probe or minilm, got {kind!r}")
    from saffron.guards.train import train_guard

    spec = train_guard(out, seed=seed, save_features=save_features)
    typer.echo(json.dumps(spec.train, indent=2))


@app.command("train-junk")
def train_junk_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write junk.safetensors and junk.json to."),
    seed: int = SEED,
) -> None:
    """Train the junk detector of the quality columns on constructed junk vs the train split's responses."""
    from saffron.quality import train_junk_detector

    _quiet_hf()
    typer.echo(json.dumps(train_junk_detector(out, seed=seed)["train"], indent=2))


@bench_app.command("guard")
def bench_guard_cmd(
    guard: Path | None = typer.Option(None, "--guard", help="Probe folder (default: the shipped one)."),
    judges: str | None = typer.Option(None, "--judges", help="Comma-separated guards/judges for the robustness "
                                      "suite (default: the guard under test), e.g. smol-guard,refusal-rules."),
    seed: int = typer.Option(0, "--seed", help="Seed of the robustness suite's row sample and rewrites."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """ROC-AUC of smol-guard on test labelled responses (full and 16-token prefixes) vs TF-IDF, and the rate each
    judge calls unsafe per robustness perturbation (refusal prefix, disclaimer, story, list, off-topic, junk)."""
    from saffron.bench.guard import bench_guard
    from saffron.judges import parse_judges

    specs = parse_judges(judges) if judges is not None else None  # checked before any model loads
    _place(device, dtype, runner)
    _quiet_hf()
    _emit(bench_guard(guard, judges=specs, seed=seed), as_json)


@bench_app.command("quality")
def bench_quality_cmd(
    judge: Path | None = typer.Option(None, "--judge", help="minilm-judge folder (default: the shipped one)."),
    junk: Path | None = typer.Option(None, "--junk", help="Junk detector folder (default: the shipped one)."),
    as_json: bool = AS_JSON,
) -> None:
    """Test-split figures of the independent judges and the junk detector (AUC per junk kind, false positives)."""
    from saffron.bench.quality import bench_quality

    _quiet_hf()
    _emit(bench_quality(judge, junk), as_json)


def _emit(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            typer.echo(f"{k:>24}: {v}")


@bench_app.command("cache")
def bench_cache_cmd(
    prompt_tokens: int = typer.Option(200, "--prompt-tokens", min=8, help="Prompt length in tokens."),
    width: int = typer.Option(16, "--width", min=1, help="Search width (sequences kept per step)."),
    steps: int = typer.Option(32, "--steps", min=1, help="New tokens per sequence."),
    nocache: bool = typer.Option(True, "--nocache/--no-nocache", help="Also time full recompute (slow)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Time the cached replays this many times, keep best."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Radix-tree KV cache vs no cache vs per-beam cache copies on a Saffron-shaped search trace."""
    from saffron.bench.cache import bench_cache

    _place(device, dtype, runner)
    _quiet_hf()
    _emit(bench_cache(prompt_tokens, width, steps, nocache=nocache, repeats=repeats), as_json)


@bench_app.command("throughput")
def bench_throughput_cmd(
    methods: str = typer.Option("none,best-of-n,saffron", "--methods", help="Methods to time (comma-separated)."),
    k: str = typer.Option("1,4,16", "--k", help="Prompt batches K to time (comma-separated; 1 = one at a time)."),
    limit: int = typer.Option(16, "--limit", help="Prompts (the first of the dataset), the same at every K."),
    widths: str = typer.Option("44,4", "--widths", help="Saffron widths (its matched width, and a small one)."),
    n: int = typer.Option(32, "--n", help="Best-of-N samples."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Override every method's default."),
    dataset: str = typer.Option(DATASET, "--dataset", help="Dataset spec the prompts come from."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Prompts/s and model GFLOP/s (and their share of the measured matmul peak) at each --prompt-batch K."""
    from saffron.bench.throughput import bench_throughput, format_throughput

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    ks, ws = _int_list("--k", k), _int_list("--widths", widths)
    _place(device, dtype, runner)
    _quiet_hf()
    res = bench_throughput(names, ks, limit, ws, n, max_new_tokens, dataset)
    typer.echo(json.dumps(res, indent=2) if as_json else format_throughput(res))


@bench_app.command("flops")
def bench_flops_cmd(as_json: bool = AS_JSON, device: str = DEVICE,
                    dtype: str = DTYPE, runner: str = RUNNER) -> None:
    """Analytic FLOPs vs torch's FlopCounterMode on the same runner calls."""
    from saffron.bench.flops import bench_flops

    _place(device, dtype, runner)
    _quiet_hf()
    _emit(bench_flops(), as_json)


@bench_app.command("ray")
def bench_ray_cmd(
    workers: int = typer.Option(2, "--workers", min=1, help="Ray actors."),
    prompts: int = typer.Option(6, "--prompts", min=1, help="Held-out prompts."),
    n: int = typer.Option(4, "--n", min=1, help="Best-of-N samples per prompt."),
    max_new_tokens: int = MAX_NEW,
    local_threads: int | None = typer.Option(None, "--local-threads", min=1, help="Torch threads for the local "
                                             "run (default: one per core)."),
    as_json: bool = AS_JSON,
) -> None:
    """The same eval on the local backend and on a local Ray instance: byte-identical files, Ray's overhead."""
    from saffron.bench.ray import bench_ray
    from saffron.distributed import import_ray

    import_ray()
    _quiet_hf()
    _emit(bench_ray(workers=workers, prompts=prompts, n=n, max_new_tokens=max_new_tokens,
                    local_threads=local_threads), as_json)


@app.command("build-rewards")
def build_rewards_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the Parquet shards and manifest.json (resumable)."),
    corpus: str = typer.Option("pyrit-harmful:train,guard-labelled:train,policy:pyrit-harmful:train", "--corpus",
                               help="Comma-separated sources: DATASET[:split], jsonl:PATH, policy:DATASET, hh-rlhf."),
    reward: str = typer.Option("smol-guard", "--reward", help="Reward model that scores every response prefix."),
    policy: str = POLICY,
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Response tokens annotated per row."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N rows per source."),
    allow_eval: bool = typer.Option(False, "--allow-eval", help="Admit dev and test prompts (benchmark sets "
                                    "only; train-mrm refuses such a folder)."),
    allow_heldout: bool = typer.Option(False, "--allow-heldout", hidden=True),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Token-level safety rewards: the reward model's score of every response prefix (Safety4M recipe)."""
    require("pyarrow", "train", "saffron build-rewards")
    from saffron.mrm.data.build import build_rewards

    if allow_heldout:
        raise SaffronError("--allow-heldout is now --allow-eval: there is no 'heldout' split any more, the "
                           "evaluation splits are dev and test")
    _place(device, dtype, runner)
    _quiet_hf()
    m = build_rewards(out, corpus=corpus, reward=reward, policy=policy, max_tokens=max_tokens, limit=limit,
                      allow_eval=allow_eval, seed=seed)
    typer.echo(json.dumps({k: m[k] for k in ("rows", "tokens", "tokens_per_second") if k in m}, indent=2))


@app.command("train-mrm")
def train_mrm_cmd(
    data: Path = typer.Option(..., "--data", help="Reward folder written by build-rewards."),
    out: Path = typer.Option(..., "--out", help="MRM folder (weights, unseen_mask, saffron.json)."),
    kind: str = typer.Option("lora", "--kind", help="lora: the paper's MRM, a LoRA-adapted copy of the backbone; "
                             "head: a small network on the policy's own hidden states (the policy is the "
                             "backbone; a search pays only the head); prm: the same head as a value model, the "
                             "reward of the prefix itself, for the baselines (--reward head-prm:OUT)."),
    eos: str | None = typer.Option(None, "--eos", help="mask: EOS is never supervised and stays in the unseen "
                                   "mask (-1024 at inference, as the paper does; default for --kind lora, the "
                                   "paper's form); supervise: complete rows teach EOS the final reward, so a "
                                   "search can rank finished answers (default for --kind head)."),
    base_model: str = typer.Option(EMBEDDED_POLICY, "--base-model", help="Backbone (shares the policy's "
                                   "tokenizer); for --kind head and prm, the policy itself."),
    r: int | None = typer.Option(None, "--lora-r", min=1, help="LoRA rank (lora; default 4)."),
    alpha: int | None = typer.Option(None, "--lora-alpha", min=1, help="LoRA alpha (lora; default 4)."),
    layers: str | None = typer.Option(None, "--layers", help="Policy hidden states the head reads, comma-separated "
                                      "(head, prm; 0 = embeddings, N = final; default 10,14,18,22,26,30)."),
    width: int | None = typer.Option(None, "--width", min=1, help="Hidden units of the head (head, prm; default "
                                     "256)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", min=0.0, help="AdamW weight decay (head, prm; "
                                              "default 0.1)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4 lora, 1e-3 head)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Sequences per step (lora, default "
                                          "4) or supervised tokens per step (head, prm: default 256)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Passes over the data (default 1 lora, "
                                      "20 head, prm)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after N steps (resume later; "
                                         "lora)."),
    bias_init: str | None = typer.Option(None, "--bias-init", help="LM-head bias at step 0: mean (one offset "
                                         "fitted under the frozen backbone; default) or zero (the paper's) (lora)."),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Train an MRM with partial supervision; saves the conservative-exploration mask with it. Resumable (lora)."""
    require("pyarrow", "train", "saffron train-mrm")  # the reward folder is Parquet
    command = " ".join(["saffron", *sys.argv[1:]])
    if kind not in ("lora", "head", "prm"):
        raise SaffronError(f"--kind must be lora, head or prm, got {kind!r}")
    if eos not in (None, "mask", "supervise"):
        raise SaffronError(f"--eos must be mask or supervise, got {eos!r}")
    # an option the chosen kind has no use for is refused, not silently dropped
    other: dict[str, Any] = (
        {"--lora-r": r, "--lora-alpha": alpha, "--max-steps": max_steps, "--bias-init": bias_init}
        if kind in ("head", "prm") else {"--layers": layers, "--width": width, "--weight-decay": weight_decay})
    if kind == "prm":
        other["--eos"] = eos  # a value head scores prefixes, it predicts no next token
    stray = [flag for flag, v in other.items() if v is not None]
    if stray:
        raise SaffronError(f"{stray[0]} does not apply to --kind {kind}")
    supervise_eos = (eos or ("supervise" if kind == "head" else "mask")) == "supervise"
    _place(device, dtype, runner)
    _quiet_hf()
    if kind == "head":
        from saffron.mrm.head import DEFAULT_LAYERS, DEFAULT_WIDTH
        from saffron.mrm.train.head import train_head_mrm

        layer_ids = _int_list("--layers", layers) if layers else DEFAULT_LAYERS
        man = train_head_mrm(data, out, base_model=base_model, layers=layer_ids, width=width or DEFAULT_WIDTH,
                             lr=lr if lr is not None else 1e-3,
                             weight_decay=weight_decay if weight_decay is not None else 0.1,
                             batch_size=batch_size or 256, epochs=epochs or 20, seed=seed, eos=supervise_eos,
                             command=command)
    elif kind == "prm":
        from saffron.mrm.head import DEFAULT_LAYERS, DEFAULT_WIDTH
        from saffron.mrm.train.head import train_head_prm

        layer_ids = _int_list("--layers", layers) if layers else DEFAULT_LAYERS
        man = train_head_prm(data, out, base_model=base_model, layers=layer_ids, width=width or DEFAULT_WIDTH,
                             lr=lr if lr is not None else 1e-3,
                             weight_decay=weight_decay if weight_decay is not None else 0.1,
                             batch_size=batch_size or 256, epochs=epochs or 20, seed=seed, command=command)
    else:
        from saffron.mrm.train.lora import train_mrm

        man = train_mrm(data, out, base_model=base_model, r=r or 4, alpha=alpha or 4,
                        lr=lr if lr is not None else 1e-4, batch_size=batch_size or 4, epochs=epochs or 1,
                        max_steps=max_steps, seed=seed, bias_init=bias_init or "mean", eos=supervise_eos,
                        command=command)
    typer.echo(json.dumps(man.train or {}, indent=2))


@bench_app.command("mrm")
def bench_mrm_cmd(
    mrm: str = typer.Option("smol-mrm-head", "--mrm", help="MRM folder, smol-mrm-head or smol-mrm (embedded)."),
    data: Path = typer.Option(Path("runs/rewards-dev"), "--data", help="Held-out reward folder (built on "
                              "first use from the dev-split pairs)."),
    rows: int = typer.Option(24, "--rows", min=1, help="Held-out rows per source when building the folder."),
    nodes: int = typer.Option(32, "--nodes", min=0, help="Held-out search nodes whose children are ranked "
                              "(sibling ranking; 0 = skip it)."),
    per_prompt: int = typer.Option(4, "--nodes-per-prompt", min=1, help="Nodes per held-out response (prefixes "
                                   "spread over its first 48 tokens)."),
    max_children: int = typer.Option(32, "--max-children", min=2, help="Children ranked per node: the policy's "
                                     "top-p 0.8 nucleus, most probable first, capped here."),
    reward: str | None = typer.Option(None, "--reward", help="Reward model that scores every child (default: the "
                                      "held-out folder's)."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """MRM predictions vs the reward model's actual scores on held-out prefixes, and how it ranks a search node's
    children (overlap@N, within-node Spearman) beside the policy's own ranking."""
    require("pyarrow", "train", "saffron bench mrm")
    from saffron.bench.mrm import bench_mrm, build_heldout_rewards
    from saffron.mrm import load_mrm_spec

    _place(device, dtype, runner)
    _quiet_hf()
    if reward is not None:
        from saffron.guards.registry import check_guard_spec

        check_guard_spec(reward)  # before any model loads
    model = load_mrm_spec(mrm)
    if not (data / "manifest.json").is_file() or not any(data.glob("shard-*.parquet")):
        build_heldout_rewards(data, limit=rows)
    _emit(bench_mrm(model, data, siblings=nodes, sibling_per_prompt=per_prompt, max_children=max_children,
                    reward=reward), as_json)


@bench_app.command("splits")
def bench_splits_cmd(
    as_json: bool = AS_JSON,
) -> None:
    """Audit the train/dev/test splits: rows and clusters per split, cross-split near-duplicates (must be 0)."""
    from saffron.bench.splits import bench_splits

    _emit(bench_splits(), as_json)


@bench_app.command("annotate")
def bench_annotate_cmd(
    rows: int = typer.Option(4, "--rows", min=1, help="Rows to annotate."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Reward annotation throughput with and without the runner's prefix cache."""
    from saffron.bench.annotate import annotation_throughput

    _place(device, dtype, runner)
    _quiet_hf()
    _emit(annotation_throughput(rows=rows), as_json)


@app.command("serve")
def serve_cmd(
    method: str = typer.Option("saffron", "--method", help="Defence answering requests that name none."),
    policy: str = POLICY,
    reward: str | None = REWARD,
    mrm: str | None = MRM,
    judge: str | None = typer.Option(None, "--judge", help="Judges that score every answer (off by default), "
                                     "comma-separated: guards, minilm-judge or refusal-rules; the first is primary "
                                     "(the response's reward), every verdict is under saffron.judges."),
    max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, "--max-new-tokens", min=1,
                                       help="Length when a request sets none."),
    opt: list[str] = OPTS,
    seed: int = typer.Option(0, "--seed", help="Seed when a request sets none."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    max_tokens_limit: int = typer.Option(256, "--max-tokens-limit", min=1, help="Most max_tokens a request may ask."),
    max_width: int = typer.Option(64, "--max-width", min=1, help="Most search budget a request may ask (the "
                                  "method's width, n or simulations)."),
    max_batch: int = typer.Option(8, "--max-batch", "--max-concurrent", min=1, help="Searches run at once, their "
                                  "forwards merged (continuous batching; 1: one at a time)."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests waiting beyond those (more: 503)."),
    request_timeout: float | None = typer.Option(None, "--request-timeout", help="Seconds a request may "
                                                 "take, queueing included (more: 504, its search stopped)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's)."),
    preset: str | None = PRESET,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """OpenAI-compatible chat completions (POST /v1/chat/completions), each answer chosen by the defence."""
    from saffron.config import parse_options
    from saffron.judges import parse_judges
    from saffron.serve import ServeConfig, ServeSettings, serve

    options = parse_options(opt)
    if preset is not None:
        options, mrm = _serve_preset(preset, method, options, mrm, max_new_tokens)
    settings = ServeSettings(method=method, method_options=options, default_max_tokens=max_new_tokens,
                             max_tokens_limit=max_tokens_limit, max_width=max_width, max_batch=max_batch,
                             max_queue=max_queue, seed=seed, request_timeout=request_timeout)
    judges = parse_judges(judge) if judge is not None else ()
    cfg = ServeConfig(settings=settings, policy=policy, reward=reward, mrm=mrm, judges=judges, host=host, port=port,
                      threads=threads)
    _place(device, dtype, runner)  # the server's models, loaded now and lazily later, all land there
    _quiet_hf()
    serve(cfg)


def _serve_preset(name: str, method: str, options: dict[str, Any], mrm: str | None, max_new_tokens: int
                  ) -> tuple[dict[str, Any], str | None]:
    """The server's options and MRM under a preset. Its length is the server's default (``--max-new-tokens``);
    its ``min_new_tokens`` is the shared default, which the server cuts to a shorter length a request asks for."""
    from saffron.methods import get_method, option_names
    from saffron.methods.options import DEFAULT_MIN_NEW_TOKENS
    from saffron.presets import eval_flag, get_preset, preset_mrm, preset_options

    p = get_preset(name)
    length = p.every_method.get("max_new_tokens")
    if length is not None and max_new_tokens != length:
        raise SaffronError(f"--preset {name} sets max_new_tokens={length}; --max-new-tokens {max_new_tokens} "
                           "contradicts it")
    if p.every_method.get("min_new_tokens", DEFAULT_MIN_NEW_TOKENS) != DEFAULT_MIN_NEW_TOKENS:
        raise SaffronError(f"--preset {name} fixes a min_new_tokens the server cannot honour per request")
    names = [k for k in option_names(method) if k not in ("max_new_tokens", "min_new_tokens")]
    opts = preset_options(p, method, names, options, eval_flag)
    uses_mrm = "mrm" in get_method(method).models_for(opts)
    return opts, preset_mrm(p, mrm) if uses_mrm else mrm


@bench_app.command("serve")
def bench_serve_cmd(
    requests: int = typer.Option(32, "--requests", min=1, help="Requests sent to each server (half harmful under "
                                 "the prefilling attack, half benign)."),
    clients: int = typer.Option(16, "--clients", min=1, help="Concurrent clients."),
    method: str = typer.Option("saffron", "--method", help="Defence answering every request."),
    width: int = typer.Option(2, "--width", min=1, help="Saffron width (other methods: their defaults)."),
    max_tokens: int = typer.Option(8, "--max-tokens", min=1, help="max_tokens of every request."),
    max_batch: int = typer.Option(8, "--max-batch", min=2, help="The batched server's searches at once (compared "
                                  "with one at a time)."),
    threads: int | None = typer.Option(1, "--threads", min=1, help="Torch CPU threads (one is fastest for the "
                                       "135M model on a busy 2-core machine)."),
    as_json: bool = AS_JSON,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Requests/s and p50/p95 latency of the server one search at a time and batched (--max-batch), same run."""
    from saffron.bench.serve import bench_serve

    _place(device, dtype, runner)
    _quiet_hf()
    _emit(bench_serve(requests=requests, clients=clients, method=method, width=width, max_tokens=max_tokens,
                      max_batch=max_batch, threads=threads), as_json)


@mrm_app.command("inspect")
def mrm_inspect_cmd(
    path: str = typer.Argument(..., help="An MRM or head PRM folder, or an embedded one by name: smol-mrm-head, "
                               "smol-mrm, head-prm (also head-prm:PATH, as --reward takes it)."),
    as_json: bool = AS_JSON,
) -> None:
    """What an MRM folder holds: kind, base model, shapes, vocabulary, masked tokens. Reads files only."""
    from saffron.mrm import EMBEDDED, check_mrm_spec
    from saffron.mrm.registry import inspect_mrm

    name, _, arg = path.partition(":")
    if name == "head-prm":  # the reward-model spec, as --reward takes it: the embedded head PRM or head-prm:PATH
        from saffron.guards.registry import check_guard_spec
        from saffron.mrm.prm import ASSET

        check_guard_spec(path)
        folder = Path(arg) if arg else ASSET
    else:
        check_mrm_spec(path)
        folder = EMBEDDED[path][0] if path in EMBEDDED else Path(path)
    _emit(inspect_mrm(folder), as_json)


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    sys.exit(code)


INTERRUPTED = "interrupted; finished records are kept, re-run the same command to resume"


def main(argv: list[str] | None = None) -> Any:
    import click

    try:
        rc = app(args=argv, standalone_mode=False)
        # typer >= 0.29 turns Ctrl-C into Exit(130), which click (standalone_mode=False) returns as a value
        if isinstance(rc, int) and not isinstance(rc, bool) and rc:
            if rc == 130:
                _fail(INTERRUPTED, 130)
            sys.exit(rc)
        return rc
    except SaffronError as e:
        _fail(str(e), e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        _fail("interrupted", 130)
    # typer >= 0.29 raises its own copy of click's exceptions (typer.TyperException), not click's
    except (click.ClickException, typer.TyperException) as e:
        show = getattr(e, "show", None)
        if show is None:
            _fail(str(e), 2)
        else:
            show()
        sys.exit(int(getattr(e, "exit_code", 2)))
    except KeyboardInterrupt:
        _fail(INTERRUPTED, 130)
    return None


if __name__ == "__main__":
    main()
