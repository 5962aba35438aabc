"""Saved pytest-benchmark runs (--benchmark-autosave / --benchmark-save) go to bench/results/ unless
--benchmark-storage names another place."""
import pathlib

import pytest

RESULTS = pathlib.Path(__file__).parent / "results"
PLUGIN_DEFAULT_STORAGE = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which opens the storage.
    if getattr(config.option, "benchmark_storage", None) == PLUGIN_DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{RESULTS}"
