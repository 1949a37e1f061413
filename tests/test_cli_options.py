"""The options shared by several verbs (cli/options.py): defined once, with the library's defaults."""

import ast
import importlib
import inspect
import pkgutil
from dataclasses import fields

from saffron import cli, tune
from saffron.cli import options as cli_options
from saffron.compare import DEFAULT_TFLOP_LIM
from saffron.config import EvalConfig
from saffron.data import DEFAULT_DATASET
from saffron.methods.options import MethodOptions
from saffron.session import DEFAULT_PREFILL_TOKENS


def test_the_cli_shows_the_librarys_defaults() -> None:
    cfg = EvalConfig()
    assert cli_options.DATASET == DEFAULT_DATASET == cfg.dataset
    assert cli_options.POLICY.default == cfg.policy
    assert cli_options.JUDGE.default == ",".join(cfg.judges)
    assert cli_options.SEED.default == cfg.seed
    assert cli_options.PREFILL_TOKENS.default == cli_options.PREFILL_TOKENS_DEFAULT == DEFAULT_PREFILL_TOKENS
    assert cfg.prefill_tokens == DEFAULT_PREFILL_TOKENS
    (max_new,) = (f.default for f in fields(MethodOptions) if f.name == "max_new_tokens")
    assert cli_options.MAX_NEW.default == cli_options.MAX_NEW_TOKENS == max_new
    assert cli_options.DEV_PROMPTS.default == cli_options.DEV_DATASET == tune.DEFAULT_DATASET
    assert ",".join(tune.DEFAULT_JUDGES) == cli_options.DEV_JUDGES
    assert cli_options.TFLOP_LIM == DEFAULT_TFLOP_LIM


def _option_calls(source: str) -> list[str]:
    """Every ``typer.Option(...)`` written in ``source``, as normalised text."""
    return [ast.unparse(n) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and ast.unparse(n.func) == "typer.Option"]


def test_no_verb_repeats_an_option_another_verb_or_cli_options_defines() -> None:
    # a verb's own option is one whose flag, default or help differs; an identical one belongs in cli_options
    shared = set(_option_calls(inspect.getsource(cli_options)))
    modules = [importlib.import_module(f"saffron.cli.{m.name}") for m in pkgutil.iter_modules(cli.__path__)
               if m.name != "__main__"]  # importing __main__ would run the CLI
    verbs = [m for m in modules if m is not cli_options]
    assert {m.__name__.rsplit(".", 1)[1] for m in verbs} >= {"run", "sweep", "train", "serve", "bench", "mrm"}
    in_verbs = [c for m in [cli, *verbs] for c in _option_calls(inspect.getsource(m))]
    assert len(in_verbs) > 50  # every verb module's own options were read
    assert not shared & set(in_verbs)
    repeated = sorted({c for c in in_verbs if in_verbs.count(c) > 1})
    assert repeated == []
