"""Mergeline's benchmarks: continual-merging accuracy, peers, engine cost and service load (see docs/benchmarks.md)."""
