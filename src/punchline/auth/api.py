"""The login server's HTTPS + JSON API: a thin aiohttp adapter over `AuthService`.

Every error leaves as JSON `{"error": code, "message": text}` with a 4xx status, including
malformed JSON (400), unknown paths (404), wrong methods (405) and oversized bodies (413,
refused by aiohttp before the body is read). A 500 means a bug in punchline, and is logged.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from punchline.auth.service import AuthService
from punchline.wire.auth_api import SIGNATURE_HEADER, Refusal, decode_object_untrusted

log = structlog.get_logger(component="auth.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, retry_after: float = 0.0) -> web.Response:
    headers = {"Retry-After": str(int(retry_after) + 1)} if retry_after > 0 else None
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refusal as exc:
        return _error(exc.status, exc.code, exc.message, exc.retry_after)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _error(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("internal error", path=request.path)
        return _error(500, "internal_error", "internal error in the login server")


async def _body(request: web.Request) -> bytes:
    return await request.read()


def _source(request: web.Request) -> str:
    return request.remote or "unknown"


async def _in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call)


def build_app(service: AuthService) -> web.Application:
    app = web.Application(client_max_size=service.config.max_body_bytes, middlewares=[_errors])

    def json_route(
        method: Callable[[dict[str, Any], str, float], dict[str, Any]], status: int = 200
    ) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            request_json = decode_object_untrusted(await _body(request))
            call = functools.partial(method, request_json, _source(request), time.time())
            return web.json_response(await _in_thread(call), status=status)

        return handle

    def signed_route(method: Callable[[bytes, str | None, float], dict[str, Any]]) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            body = await _body(request)
            signature = request.headers.get(SIGNATURE_HEADER)
            call = functools.partial(method, body, signature, time.time())
            return web.json_response(await _in_thread(call))

        return handle

    async def healthz(_request: web.Request) -> web.Response:
        try:
            return web.json_response(await _in_thread(service.health))
        except Refusal as exc:
            return web.json_response({"status": "unavailable", "reason": exc.message}, status=503)

    async def ca(_request: web.Request) -> web.Response:
        return web.json_response(
            {"ca_certificate": service.ca.pem, "ca_fingerprint": service.ca.fingerprint}
        )

    async def bootstrap(_request: web.Request) -> web.Response:
        return web.json_response(
            await _in_thread(functools.partial(service.bootstrap, time.time()))
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/ca", ca)
    app.router.add_get("/v1/bootstrap", bootstrap)
    app.router.add_post("/v1/signup", json_route(service.signup, status=201))
    app.router.add_post("/v1/login", json_route(service.login))
    app.router.add_post("/v1/password", json_route(service.change_password))
    app.router.add_post("/v1/renew", signed_route(service.renew))
    app.router.add_post("/v1/turn", signed_route(service.turn_credentials))
    app.router.add_post("/v1/nodes/enroll", json_route(service.enroll_node))
    app.router.add_post("/v1/nodes/heartbeat", signed_route(service.heartbeat))
    return app
