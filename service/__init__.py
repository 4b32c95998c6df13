"""The HTTP API (FastAPI, torch-free) and its Python client. Imports only the core."""
