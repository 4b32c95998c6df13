"""Every `MERGELINE_*` setting, read from the environment by one pydantic-settings class (contract §5)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.names import check_device


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGELINE_", extra="ignore")

    store: str = "file://./mergeline-data/store"
    broker_url: str | None = None
    api_tokens: str | None = None
    metrics_token: str | None = Field(default=None, description="bearer token for /metrics; unset: /metrics is off")
    allowed_roots: str | None = Field(default=None, description="comma-separated file:// roots; default: cwd")
    allow_http: bool = False
    allow_private_http: bool = Field(default=False, description="let http(s) URIs reach private addresses")
    allow_hf: bool = Field(default=False, description="allow hf://org/name[@revision] inputs (Hugging Face Hub)")
    hf_orgs: str = Field(default="", description="comma-separated Hub organisations hf:// may read, or * for any")
    device: str = "auto"
    cache_dir: str = "./mergeline-data/cache"
    max_download_bytes: int = 64 * 2**30
    claim_ttl_s: float = 900.0
    malloc_mmap_threshold: int | None = Field(
        default=None, ge=4096, le=32 * 2**20,
        description="data-driven jobs: allocations of at least this many bytes get their own memory mapping, "
                    "returned to the kernel when freed (glibc): a lower peak memory for slower iterations "
                    "(docs/benchmarks.md, OTMF memory); unset: glibc's default")

    # --- the service (API, job records, workers) ---
    redis_url: str | None = Field(default=None, description="job records; default: the broker when it is redis://")
    key_prefix: str = Field(default="mergeline", pattern=r"^[A-Za-z0-9:._-]{1,64}$")
    queue: str = Field(default="mergeline", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Celery queue name")
    data_dir: str = "./mergeline-data"
    max_body_bytes: int = Field(default=1 * 2**20, ge=1024)
    job_ttl_s: int = Field(default=30 * 86400, ge=60, description="how long a finished job's record is kept")
    lease_ttl_s: float = Field(default=30.0, gt=0.5, description="a lineage lock lapses this long after its worker")
    reconcile_interval_s: float = Field(default=10.0, gt=0.05)
    max_attempts: int = Field(default=3, ge=1, description="deliveries of one job before it fails with worker_lost")
    visibility_timeout_s: int = Field(default=6 * 3600, ge=1, description="Redis broker: unacked message redelivery")
    worker_concurrency: int = Field(default=1, ge=1)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_s: float = Field(default=2.0, gt=0, description="first retry delay; doubles per attempt")
    webhook_allow_private: bool = Field(default=False, description="let webhooks reach private/loopback addresses")
    retention_days: float = Field(default=7.0, ge=0, description="a deleted lineage's files are purged this much later")
    rate_limit: int = Field(default=600, ge=0, description="API requests per tenant per minute (0: no limit)")
    max_active_jobs: int = Field(default=100, ge=0, description="queued or running jobs per tenant (0: no cap)")
    lineage_op_timeout_s: float = Field(default=600.0, gt=0, description="how long a lineage operation may wait "
                                        "behind the lineage's jobs before the API gives up on it")
    log_level: str = "INFO"

    _device = field_validator("device")(classmethod(lambda cls, v: check_device(v)))

    def tenants_by_token(self) -> dict[str, str]:
        """`MERGELINE_API_TOKENS` (`token=tenant,...`) as a mapping; malformed pairs are configuration errors."""
        out: dict[str, str] = {}
        for pair in (self.api_tokens or "").split(","):
            pair = pair.strip()
            if not pair:
                continue
            token, sep, tenant = pair.partition("=")
            if not sep or not token.strip() or not tenant.strip():
                raise ValueError("MERGELINE_API_TOKENS must be comma-separated token=tenant pairs")
            out[token.strip()] = tenant.strip()
        return out

    def job_redis_url(self) -> str | None:
        """Where job records live: MERGELINE_REDIS_URL, else the broker when it is Redis."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return None

    def hf_org_allowed(self, org: str) -> bool:
        """`org` is on MERGELINE_HF_ORGS (organisation names compare case-insensitively, as on the Hub)."""
        listed = {item.strip().lower() for item in self.hf_orgs.split(",") if item.strip()}
        return "*" in listed or org.lower() in listed

    def allowed_root_paths(self) -> list[Path]:
        """The roots `file://` URIs may read from, resolved (symlinks followed) once here."""
        if not self.allowed_roots:
            return [Path.cwd().resolve()]
        roots = []
        for item in self.allowed_roots.split(","):
            item = item.strip()
            if item:
                roots.append(Path(item.removeprefix("file://")).expanduser().resolve())
        return roots


@lru_cache
def get_settings() -> Settings:
    return Settings()
