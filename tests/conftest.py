"""Shared test set-up."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_root_logging():
    """The benchmark scripts configure the root logger (as a script should); put it back after each test so
    that later tests see the library's default logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (two contend on a busy machine); restores the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
