"""The local multi-process runner behind the tests and `distgan bench`: results, errors, and no endless waits."""

import os

import pytest

from conftest import patience
from distgan.local_launch import run_local

pytestmark = pytest.mark.dist


def _env(rank, world):
    return rank, world, os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"]


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _die_on_rank_0(rank, world):
    if rank == 0:
        os._exit(3)  # no exception, no result: like a SIGKILL
    return rank


def test_each_rank_gets_torchrun_environment():
    assert run_local(2, _env) == [(0, 2, "0", "2", "2"), (1, 2, "1", "2", "2")]


def test_an_exception_names_the_rank_and_carries_the_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed") as e:
        run_local(2, _raise_on_rank_1, timeout=patience(60))
    assert "ValueError: boom on rank 1" in str(e.value)


def test_a_silent_death_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="rank 0 exited with code 3 without a result"):
        run_local(2, _die_on_rank_0, timeout=patience(60))
