"""Shared pytest configuration.

The test helpers (``checks``, ``zoo``, ``fuzz_models``...) import as top-level
modules: ``pythonpath = ["tests"]`` in pyproject.toml puts this directory on the path.
"""
