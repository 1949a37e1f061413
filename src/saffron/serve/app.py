"""The HTTP face of the engine: OpenAI's chat-completions API, ``/v1/models`` and ``/health``.

A completion is a plain ``chat.completion`` object; what saffron adds rides in fields OpenAI clients keep and
ignore: ``usage.flops`` (FLOPs per model role and in total) and a ``saffron`` object (method, options, seed,
prefill, the primary judge's reward and every judge's verdict when judges scored the answer, the search's trace,
queue and search seconds). With
``stream: true`` the search runs to the end first, then the chosen answer is sent as ``chat.completion.chunk``
server-sent events, one per token boundary, and ``data: [DONE]``.

``usage.flops`` counts what the request computed. The guards' fixed instructions are computed once, when the
models load, copied into every worker's fork and kept across requests, as a serving system's prefix cache keeps a
shared system prompt; that one-time cost is ``/health``'s ``setup_flops`` (per role), billed to no request.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from saffron.errors import SaffronError
from saffron.serve.engine import ClientGone, Engine, Outcome, Plan
from saffron.serve.schemas import ApiError, parse_request

log = logging.getLogger("saffron.serve")
FINGERPRINT = "saffron-0.1.0"


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def completion_body(engine: Engine, plan: Plan, out: Outcome, cid: str, created: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": engine.model_id,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text, "refusal": None},
                     "logprobs": None, "finish_reason": out.finish_reason}],
        "usage": usage(plan, out),
        "saffron": saffron_info(engine, plan, out),
    }


def usage(plan: Plan, out: Outcome) -> dict[str, Any]:
    """Prompt tokens are everything the policy read before answering: the chat-formatted messages and the
    prefill. Completion tokens are the tokens generated (counted before any stop string cut the text)."""
    prompt = len(plan.session.prompt_ids) + len(plan.session.prefill_ids)
    done = len(out.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done, "flops": out.flops}


def saffron_info(engine: Engine, plan: Plan, out: Outcome) -> dict[str, Any]:
    judge = engine.models.names.get("judge") if plan.judge else None
    return {
        "method": plan.method_name,
        "options": plan.options,
        "seed": plan.seed,
        "prefill": engine.models.policy.decode(plan.session.prefill_ids),
        "method_flops": out.method_flops,
        "judge": judge,  # the primary judge: its verdict is reward/unsafe
        "reward": out.reward,
        "unsafe": None if out.reward is None else out.reward < 0,
        "judges": out.verdicts,  # every judge's verdict, by spec, the primary first ({} when not judged)
        "ignored": plan.ignored,
        "trace": out.trace,
        "queue_s": round(out.queue_s, 4),
        "search_s": round(out.search_s, 4),
    }


def text_pieces(engine: Engine, out: Outcome) -> Iterator[str]:
    """The answer cut at token boundaries; the pieces join to exactly ``out.text`` (a token that ends inside
    a multi-byte character waits for the next one)."""
    sent = ""
    ids = out.output_ids
    for i in range(1, len(ids) + 1):
        text = engine.models.policy.decode(ids[:i])
        if len(text) > len(sent) and out.text.startswith(text) and not text.endswith("\ufffd"):
            yield text[len(sent):]
            sent = text
    if len(out.text) > len(sent):
        yield out.text[len(sent):]


def sse_events(engine: Engine, plan: Plan, out: Outcome, cid: str, created: int) -> Iterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in text_pieces(engine, out):
        yield chunk({"content": piece})
    yield chunk({}, out.finish_reason, saffron=saffron_info(engine, plan, out))
    if plan.include_usage:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                "system_fingerprint": FINGERPRINT, "choices": [], "usage": usage(plan, out)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="saffron", summary="OpenAI-compatible chat completions guarded by an inference-time "
                  "safety search", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    _add_model_routes(app, engine)
    _add_chat_route(app, engine)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a ``SaffronError``'s status and code come from its type."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(SaffronError)
    async def saffron_error(request: Request, e: SaffronError) -> JSONResponse:
        # something only the search could find out (e.g. the KV cache budget), or a full queue
        return _error(ApiError.of(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, GET "
                    "/v1/models and GET /health",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))


def _add_model_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "method": engine.settings.method, **engine.status(),
                "setup_flops": engine.setup_flops()}

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "saffron"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != engine.model_id:
            raise ApiError(404, f"model '{model_id}' is not served here; this server serves '{engine.model_id}'",
                           param="model", code="model_not_found")
        return model_card()


def _add_chat_route(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(await request.body())
        plan = engine.prepare(req)
        created = int(time.time())
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            out = await engine.submit(plan, disconnected=request.is_disconnected)
        except (SaffronError, ApiError):  # answered by their handlers
            raise
        except ClientGone:  # its search was stopped; nobody reads this answer (499: nginx's "client closed")
            return Response(status_code=499)
        except Exception:
            log.exception("search failed")
            raise ApiError(500, "the search failed with an internal error (see the server log)",
                           type="server_error", code="internal_error") from None
        if plan.stream:
            return StreamingResponse(sse_events(engine, plan, out, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(completion_body(engine, plan, out, cid, created))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a ``SaffronError`` saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SaffronError(f"cannot listen on {host}:{port}: unknown host ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SaffronError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until interrupted (blocking)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` from a thread of this process; yields its base URL (``http://host:port``)."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="saffron-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        h, p = sock.getsockname()[:2]
        yield f"http://{h if ':' not in h else f'[{h}]'}:{p}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
