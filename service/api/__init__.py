"""The HTTP API (contract §3): `create_app()` builds it from the MERGELINE_* settings."""

from service.api.app import create_app

__all__ = ["create_app"]
