"""Mergeline's compute side: the fusion engine (torch) and the Celery worker that runs it."""
