"""``saffron serve``: an OpenAI-compatible chat-completions server whose every answer is chosen by a defence.

``schemas.py`` parses requests, ``engine.py`` loads the models and runs searches on worker threads behind a
bounded queue, ``app.py`` is the FastAPI application. ``serve`` wires them up for the CLI.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from saffron.extras import require

# Before anything below imports them: without the extra, one line naming it instead of a ModuleNotFoundError.
for _module in ("fastapi", "pydantic", "uvicorn"):
    require(_module, "serve", "saffron serve")

from saffron.embedded import EMBEDDED_POLICY  # noqa: E402
from saffron.serve.app import background_server, bind, create_app, run_server  # noqa: E402
from saffron.serve.engine import Engine, ModelSet, ServeSettings, load_models  # noqa: E402
from saffron.serve.schemas import ApiError  # noqa: E402


@dataclass(frozen=True)
class ServeConfig:
    settings: ServeSettings = field(default_factory=ServeSettings)
    policy: str = EMBEDDED_POLICY
    reward: str | None = None
    mrm: str | None = None
    judges: tuple[str, ...] = ()  # scoring every answer when a request asks; the first is primary
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None  # torch's CPU threads (None: torch's default)


def build_engine(cfg: ServeConfig) -> Engine:
    """Load the models (the policy and what the server's method uses); ``cfg.settings`` were checked when made."""
    return Engine(load_models(cfg.policy, cfg.reward, cfg.mrm, cfg.judges), cfg.settings)


def serve(cfg: ServeConfig, log_level: str = "info") -> None:
    """Everything a user can get wrong is refused before the models load: settings, model specs, the port."""
    from saffron.guards.registry import check_guard_spec
    from saffron.judges import check_judge_spec
    from saffron.mrm import check_mrm_spec

    if cfg.reward is not None:
        check_guard_spec(cfg.reward)
    for spec in cfg.judges:
        check_judge_spec(spec)  # any judge of saffron.judges: a guard, minilm-judge, refusal-rules
    if cfg.mrm is not None:
        check_mrm_spec(cfg.mrm)
    sock = bind(cfg.host, cfg.port)
    try:
        if cfg.threads is not None:
            import torch

            torch.set_num_threads(cfg.threads)
        engine = build_engine(cfg)
        app = create_app(engine)
        s = cfg.settings
        opts: dict[str, Any] = {k: v for k, v in s.configured.options().items() if k != "max_new_tokens"}
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"saffron: serving {engine.model_id} guarded by {s.method} {opts} at http://{host}:"
              f"{sock.getsockname()[1]}/v1 (max_tokens <= {s.max_tokens_limit}, {s.max_batch} search(es) at "
              f"a time, their forwards merged, {s.max_queue} queued)", file=sys.stderr, flush=True)
        run_server(app, sock, log_level=log_level)
    finally:
        sock.close()


__all__ = ["ApiError", "Engine", "ModelSet", "ServeConfig", "ServeSettings", "background_server", "build_engine",
           "create_app", "load_models", "serve"]
