"""What routes depend on: the per-app services (settings, job store, lineage store) and the caller's tenant."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.errors import Unauthorized
from core.jobs import AsyncJobReads, JobStore
from core.metrics import RedisMetrics, ServiceCollector
from core.names import is_tenant_name
from core.settings import Settings
from core.store import LineageStore


class TokenTable:
    """Bearer tokens to tenants. Every lookup compares the presented token with every known token through
    fixed-length digests, so neither the match position nor the token lengths show in the timing."""

    def __init__(self, tokens: dict[str, str]):
        for tenant in tokens.values():
            if not is_tenant_name(tenant):
                raise ValueError(f"MERGELINE_API_TOKENS: bad tenant name {tenant!r}")
        self._digests = [(hashlib.sha256(t.encode()).digest(), tenant) for t, tenant in tokens.items()]

    def tenant_for(self, token: str) -> str | None:
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    store: LineageStore
    tokens: TokenTable
    metrics: RedisMetrics
    collector: ServiceCollector
    reads: AsyncJobReads  # the per-request Redis work (rate count, status read) on the event loop
    broker_check: Callable[[], None] | None = None  # when the Celery broker is not the job store's Redis


# The dependencies are coroutines: FastAPI runs a plain function dependency in a worker thread, a hop per request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_jobs(services: Annotated[Services, Depends(get_services)]) -> JobStore:
    return services.jobs


async def get_reads(services: Annotated[Services, Depends(get_services)]) -> AsyncJobReads:
    return services.reads


async def get_store(services: Annotated[Services, Depends(get_services)]) -> LineageStore:
    return services.store


bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`; a token belongs to one tenant")


async def get_caller(services: Annotated[Services, Depends(get_services)],
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The caller's tenant from its bearer token, its request not yet counted: a route that takes `Caller`
    rather than `Tenant` counts the request itself (the status poll, in the same round trip as its read)."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`", param="Authorization")
    tenant = services.tokens.tenant_for(credentials.credentials)
    if tenant is None:
        raise Unauthorized("unknown bearer token", param="Authorization")
    return tenant


async def get_tenant(services: Annotated[Services, Depends(get_services)],
                     caller: Annotated[str, Depends(get_caller)]) -> str:
    """The caller's tenant, its request counted against the tenant's rate limit."""
    await services.reads.check_rate(caller)
    return caller


Caller = Annotated[str, Depends(get_caller)]
Tenant = Annotated[str, Depends(get_tenant)]
Jobs = Annotated[JobStore, Depends(get_jobs)]
Reads = Annotated[AsyncJobReads, Depends(get_reads)]
Store = Annotated[LineageStore, Depends(get_store)]
