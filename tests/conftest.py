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


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile on the eager backend: Dynamo traces for real; inductor's C++ code generation
    (minutes on this CPU) is skipped."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
