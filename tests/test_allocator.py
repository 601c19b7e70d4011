"""glibc's mmap threshold is fixed in mvar-engine processes and benchmark workers (apps/allocator.py),
unless the user set one."""

from __future__ import annotations

import sys

import pytest

from mvar_engine.apps import allocator
from mvar_engine.apps.bench.report import worker_env


def test_workers_get_the_threshold(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert worker_env()[allocator.ENV] == str(allocator.MMAP_THRESHOLD_BYTES)


def test_a_threshold_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "4096")
    assert worker_env()[allocator.ENV] == "4096"
    assert allocator.fix_mmap_threshold() is False  # and this process leaves it alone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mallopt_is_called_on_linux(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.fix_mmap_threshold() is True
