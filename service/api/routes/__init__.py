"""The API's routers: jobs, lineages, operations."""
