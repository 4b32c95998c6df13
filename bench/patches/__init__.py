"""Engine patches for before/after experiments (BENCH_PATCH=bench.patches.NAME); never imported otherwise."""
