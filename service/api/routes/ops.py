"""Operations: liveness, readiness (job store, broker and lineage store reachable), Prometheus metrics, and `/`,
which sends a browser to the interactive docs."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from core.errors import BrokerUnavailable, MergelineError, Unauthorized
from core.metrics import render
from service.api.deps import Services, bearer, get_services
from service.api.models import ERROR_RESPONSES, Health

router = APIRouter(tags=["operations"])


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """A browser at the bare URL gets the dashboard, which links to the API docs."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/healthz", response_model=Health)
def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: ERROR_RESPONSES[503]})
def readyz(services: Annotated[Services, Depends(get_services)]) -> Any:
    checks: dict[str, str] = {}
    failure: MergelineError | None = None
    probes = [("broker", services.jobs.ping), ("store", services.store.ping)]
    if services.broker_check is not None:
        probes.insert(1, ("celery_broker", services.broker_check))
    for name, probe in probes:
        try:
            probe()
            checks[name] = "ok"
        except MergelineError as exc:
            checks[name] = exc.message
            failure = failure or exc
        except Exception as exc:  # a probe must report, not crash the probe endpoint
            checks[name] = f"{type(exc).__name__}: {exc}"
            failure = failure or BrokerUnavailable(checks[name])
    if failure is not None:
        message = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
        body = {"error": {"type": failure.type, "message": message, "param": None}}
        return JSONResponse(body, status_code=503)
    return {"status": "ready", "checks": checks}


@router.get("/metrics", response_class=Response,
            responses={401: ERROR_RESPONSES[401], 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics(services: Annotated[Services, Depends(get_services)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Response:
    """Service-wide figures (every tenant's jobs): only for the operator's MERGELINE_METRICS_TOKEN."""
    expected = services.settings.metrics_token
    presented = credentials.credentials if credentials else ""
    if not expected or not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(),
                                               hashlib.sha256(expected.encode()).digest()):
        raise Unauthorized("/metrics needs `Authorization: Bearer <MERGELINE_METRICS_TOKEN>`"
                           + ("" if expected else " (none is set, so /metrics is off)"), param="Authorization")
    body = await run_in_threadpool(render, services.collector)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
