"""The control server: REST endpoints, a WebSocket of events, and the dashboard, over one :class:`Trainer`.

Security model (as Jupyter's): a random token is generated at start and printed
with the dashboard URL; every HTTP endpoint (the OpenAPI spec included) and the
WebSocket require it, as ``Authorization: Bearer TOKEN``, an ``X-Token`` header,
a ``?token=`` query parameter (the printed link carries it) or the session
cookie that the dashboard's first load sets (``HttpOnly``, ``SameSite=Strict``),
after which the page drops the token from its URL, so it stays out of the
browser's history. The ``Host`` header must name the served address and an
``Origin`` header, when a browser sends one, must be that address too (no DNS
rebinding, no cross-site WebSocket). The server binds 127.0.0.1 by default;
request bodies are capped (:data:`MAX_BODY_BYTES`) and validated against the
command schemas, so a malformed or hostile request is answered with a 4xx and a
message, and never reaches the training loop. Every body is strict JSON (a
non-finite number is ``null``, :mod:`.wire`), whatever state the run is in, and
nothing that waits on the trainer runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import socket
import threading
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .commands import Command, CommandError
from .trainer import Trainer
from .wire import dumps

MAX_BODY_BYTES = 1 << 20
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_name(port: int) -> str:
    """The session cookie of the server on ``port`` (cookies ignore ports, so two servers need two names)."""
    return f"metagrad_token_{int(port)}"


def served_hosts(host: str, port: int) -> frozenset:
    """The ``Host`` header values that name this server: its bind address and, on loopback, ``localhost``."""
    names = {host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return frozenset(f"{name}:{int(port)}" for name in names)


class _Guard:
    """ASGI middleware: the token on every request and WebSocket, Host and Origin checks, and a body-size cap.

    ``allowed_hosts``: the ``Host`` values accepted (``None``: any, e.g. a server bound to 0.0.0.0);
    ``port``: the served port (names the session cookie)."""

    def __init__(self, app, token: str, max_body: int, allowed_hosts=None, port: int = 0):
        self.app, self.token, self.max_body = app, token, max_body
        self.allowed_hosts, self.cookie = allowed_hosts, cookie_name(port)

    @staticmethod
    def _headers(scope) -> dict:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

    def _supplied_token(self, scope, headers) -> str | None:
        supplied = headers.get("x-token")
        auth = headers.get("authorization", "")
        if supplied is None and auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        if supplied is None:
            from http.cookies import CookieError, SimpleCookie

            try:
                jar = SimpleCookie(headers.get("cookie", ""))
            except CookieError:
                jar = {}
            if self.cookie in jar:
                supplied = jar[self.cookie].value
        if supplied is None:
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            supplied = (query.get("token") or [None])[0]
        return supplied

    def _foreign(self, headers) -> str | None:
        """Why the request does not come from a page of this server (``None`` when it does)."""
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return (f"Host {host!r} is not this server's address: use http://{sorted(self.allowed_hosts)[0]} "
                    "(requests naming another host are refused, against DNS rebinding).")
        origin = headers.get("origin")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return f"Origin {origin!r} is not this server's: only its own dashboard may call it from a browser."
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = self._headers(scope)
        foreign = self._foreign(headers)
        if foreign is not None:
            if scope["type"] == "websocket":
                await receive()  # the connect message
                await send({"type": "websocket.close", "code": 4403, "reason": "foreign origin"})
                return
            return await _reply(send, 403, {"detail": foreign})
        supplied = self._supplied_token(scope, headers)
        if supplied is None or not hmac.compare_digest(supplied.encode(), self.token.encode()):
            if scope["type"] == "websocket":
                await receive()  # the connect message
                await send({"type": "websocket.close", "code": 4401, "reason": "token required"})
                return
            return await _reply(send, 401, {"detail": "a valid token is required: pass it as 'Authorization: Bearer "
                                                      "TOKEN', an 'X-Token' header or '?token=TOKEN' (it was printed "
                                                      "with the dashboard URL when the server started)."})
        if scope["type"] == "http":
            length = headers.get("content-length")
            try:
                too_big = length is not None and int(length) > self.max_body
            except ValueError:
                return await _reply(send, 400, {"detail": "malformed Content-Length header."})
            if too_big:
                return await _reply(send, 413, {"detail": f"request body over {self.max_body} bytes: send fewer "
                                                          "examples per append_data request."})
            received = 0
            max_body = self.max_body

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > max_body:
                        raise _BodyTooLarge()
                return message

            try:
                return await self.app(scope, limited_receive, send)
            except _BodyTooLarge:
                return await _reply(send, 413, {"detail": f"request body over {self.max_body} bytes."})
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


async def _reply(send, status: int, payload: dict):
    body = dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class StrictJSONResponse(JSONResponse):
    """A JSON response whose non-finite numbers are ``null`` (:func:`.wire.dumps`), never a 500."""

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


class Accepted(BaseModel):
    id: str
    command: str
    status: str
    args: dict[str, Any]


def create_app(trainer: Trainer, token: str, *, max_body: int = MAX_BODY_BYTES, allowed_hosts=None, port: int = 0):
    """The FastAPI app serving ``trainer``, wrapped in the guard (token, Host and Origin, body size).

    ``allowed_hosts``: the ``Host`` header values of this server (:func:`served_hosts`; ``None``: any);
    ``port``: the port it is served on (names the dashboard's session cookie)."""
    app = FastAPI(title="metagrad interactive training", version="0.1.0", default_response_class=StrictJSONResponse,
                  description="Steer a metagrad training run: commands, metrics, checkpoints and branches.")

    @app.get("/api/run", summary="Run status: step, branch, status, hyperparameters, last evaluation")
    def run_info():
        return trainer.info()

    @app.get("/api/optimizer", summary="The optimizer's injected hyperparameters (settable by set_hyperparams)")
    def optimizer_info():
        return trainer.optimizer_info()

    @app.get("/api/model", summary="Top-level layers, their parameter shapes and whether they are frozen")
    def model_info():
        return trainer.model_info()

    @app.get("/api/dataset", summary="Dataset, data sources and mixture weights")
    def dataset_info():
        return trainer.dataset_info()

    @app.get("/api/checkpoints", summary="Saved checkpoints")
    def checkpoints():
        return trainer.checkpoint_list()

    @app.get("/api/branches", summary="The tree of branches (a checkpoint load forks one)")
    def branches():
        return trainer.branch_list()

    @app.get("/api/log", summary="The intervention log: command, arguments, step, branch")
    def log(limit: int = Query(1000, ge=1, le=100000)):
        return trainer.log.interventions()[-limit:]

    @app.get("/api/metrics", summary="Per-step training metrics and evaluations")
    def metrics(since_step: int = Query(-1, ge=-1, le=2**31 - 1), limit: int = Query(5000, ge=1, le=100000)):
        rows = [m for m in list(trainer.metrics) if m["step"] > since_step][-limit:]
        return {"metrics": rows, "evals": list(trainer.evals)[-limit:]}

    @app.get("/api/events", summary="Events after sequence number `since` (the WebSocket streams the same)")
    def events(since: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=10000)):
        return trainer.events_since(since, limit)

    @app.get("/api/commands", summary="Status records of recent commands")
    def commands(limit: int = Query(100, ge=1, le=2000)):
        return list(trainer.commands.values())[-limit:]

    @app.get("/api/commands/{command_id}", summary="Status of one command")
    def command(command_id: str):
        rec = trainer.command_record(command_id)
        if rec is None:
            raise HTTPException(404, f"no command {command_id!r}.")
        return rec

    @app.post("/api/commands", status_code=202, response_model=Accepted,
              summary="Queue a command; it takes effect at the next step",
              responses={422: {"description": "invalid command, with what to change"}})
    def post_command(cmd: Command):
        try:
            rec = trainer.submit(cmd.model_dump())
        except CommandError as err:
            raise HTTPException(422, str(err)) from None
        return rec

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, since: int | None = None):
        # every call into the trainer runs in a worker thread: the event loop never waits on the trainer's lock
        async def send(message: dict):
            await websocket.send_text(dumps(message))

        await websocket.accept()
        await send({"type": "hello", "run": await run_in_threadpool(trainer.info), "event_seq": trainer.event_seq})
        # ?since=N replays the buffered events after N (0: all of them); without it, events from now on
        cursor = trainer.event_seq if since is None else max(0, min(int(since), trainer.event_seq))

        async def sender():
            nonlocal cursor
            while True:
                events = await run_in_threadpool(trainer.events_since, cursor, 500)
                if events:
                    cursor = events[-1]["seq"]
                    await send({"type": "events", "events": events})
                else:
                    await asyncio.sleep(0.05)

        async def receiver():
            while True:
                text = await websocket.receive_text()
                if len(text) > max_body:
                    await send({"type": "error", "detail": f"message over {max_body} bytes."})
                    continue
                try:
                    message = json.loads(text)
                except json.JSONDecodeError as err:
                    await send({"type": "error", "detail": f"not JSON: {err}"})
                    continue
                if not isinstance(message, dict) or message.get("type") != "command":
                    await send({"type": "error", "detail": "send {\"type\": \"command\", \"command\": {...}} with a "
                                                           "command body."})
                    continue
                ref = message.get("ref") if isinstance(message.get("ref"), (int, str)) else None
                try:
                    rec = await run_in_threadpool(trainer.submit, message.get("command"))
                except CommandError as err:
                    await send({"type": "rejected", "detail": str(err), "ref": ref})
                    continue
                await send({"type": "accepted", "record": rec, "ref": ref})

        tasks = [asyncio.ensure_future(sender()), asyncio.ensure_future(receiver())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                try:
                    await task
                except (asyncio.CancelledError, WebSocketDisconnect, Exception):
                    pass

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard():
        # it reached this handler, so the token was right: the page and its calls carry it in a session cookie
        # from now on, and the page drops it from its URL (so it stays out of the browser's history)
        with open(os.path.join(STATIC_DIR, "index.html")) as f:
            page = HTMLResponse(f.read())
        page.set_cookie(cookie_name(port), token, httponly=True, samesite="strict", path="/")
        page.headers["Cache-Control"] = "no-store"
        page.headers["Referrer-Policy"] = "no-referrer"
        return page

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in ("app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"):
            raise HTTPException(404, "no such file.")
        return FileResponse(os.path.join(STATIC_DIR, name))

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "token": {"type": "apiKey", "in": "query", "name": "token"}}
            schema["security"] = [{"bearer": []}, {"token": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        message = "invalid request: " + "; ".join(parts[:8])
        if request.url.path == "/api/commands":
            message += (". A command is a JSON object with a 'command' field, one of: set_hyperparams, pause, "
                        "resume, stop, evaluate, save_checkpoint, load_checkpoint, reset_layer, freeze_layer, "
                        "append_data, set_mixture, suggest_lr (see /openapi.json).")
        return StrictJSONResponse(status_code=422, content={"detail": message, "errors": [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in err.errors()[:50]]})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a bare 500 page; the run is untouched
        return StrictJSONResponse(status_code=500, content={"detail": f"internal error: {type(err).__name__}"})

    return _Guard(app, token, max_body, allowed_hosts, port)


class ControlServer:
    """uvicorn serving :func:`create_app` in a background thread, on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, trainer: Trainer, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        import uvicorn

        self.trainer = trainer
        self.token = token or new_token()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        any_host = host in ("0.0.0.0", "")  # reachable under names this process cannot know: Origin still checked
        self.app = create_app(trainer, self.token, port=self.port,
                              allowed_hosts=None if any_host else served_hosts(self.host, self.port))
        config = uvicorn.Config(self.app, log_level="warning", ws="websockets-sansio", lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"{self.base_url}/?token={self.token}"

    def start(self) -> "ControlServer":
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="metagrad-control-server")
        self._thread.start()
        import time

        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.025)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
