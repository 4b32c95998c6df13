"""Mergeline's torch-free core: job spec and registries, errors, settings, ids, the lineage store and its object
access, URI fetching, job records, queueing, webhooks, metrics, progress and logs. It imports nothing above it."""

__version__ = "0.1.0"
