"""Shared test set-up."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def restore_root_logging():
    """The benchmark scripts configure the root logger (as a script should); put it back after each test so
    that later tests see the library's default logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
