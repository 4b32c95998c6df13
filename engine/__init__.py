"""The fusion engine: families (model kinds), methods (fusion rules), data, and `run_job`."""
