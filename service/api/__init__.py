"""The HTTP API (contract §3), torch-free: `create_app(services)`; the entry point builds the services."""

from service.api.app import create_app

__all__ = ["create_app"]
