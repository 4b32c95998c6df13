"""Every `MERGELINE_*` setting, read from the environment by one pydantic-settings class (contract §5)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGELINE_", extra="ignore")

    store: str = "file://./mergeline-data/store"
    broker_url: str | None = None
    api_tokens: str | None = None
    allowed_roots: str | None = Field(default=None, description="comma-separated file:// roots; default: cwd")
    allow_http: bool = False
    allow_private_http: bool = Field(default=False, description="let http(s) URIs reach private addresses")
    device: str = "auto"
    cache_dir: str = "./mergeline-data/cache"
    max_download_bytes: int = 64 * 2**30
    claim_ttl_s: float = 900.0

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

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
