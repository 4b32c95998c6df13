"""The Celery side: runs one job by id under the lineage lease and records its outcome. Imports only the core;
the entry points hand it the engine."""
