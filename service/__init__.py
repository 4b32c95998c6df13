"""Mergeline's torch-free side: the job spec, settings, errors, URI access, the lineage store, the API and CLI."""

__version__ = "0.1.0"
