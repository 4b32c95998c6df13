"""The entry points: the `mergeline` command, the ASGI app factory, the Celery worker's app, and the demo. The only
place that wires the core, the API, the Celery side and the engine together."""
