"""Shared fixtures: the tiny refusing model is trained once per test run, whatever the workers."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest

import abliterate.demo.toy as toy

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker: `-n 2` on 2 cores is already one process per core, and more threads
    # only oversubscribe the CPU (OpenMP workers spin while they wait).
    import torch

    torch.set_num_threads(1)


def _shared_toy(tmp_path_factory, name: str, **options) -> Path:
    """Train a toy once per test run; xdist workers share one copy through a lock in the run's temp root."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own subfolder of the run's
        root = root.parent
    key = hashlib.sha256(Path(toy.__file__).read_bytes()).hexdigest()[:12]
    folder = root / f"{name}-{key}"
    with open(root / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            tmp = root / f"{name}-{key}.partial"
            toy.train_toy_model(tmp, **options)
            tmp.rename(folder)
    return folder


@pytest.fixture(scope="session")
def refusing_model(tmp_path_factory) -> Path:
    """A folder holding the toy chat model that refuses harmful-looking requests (see abliterate.demo.toy).

    Trained with the toy's TRAIN_SEED: 4 of the seeds 0-9 give a toy whose extracted direction meets what the
    behaviour tests ask (benchmarks/toy_seeds.py prints it per seed; toy.py says what fails for the others).
    Training takes about 15 s.
    """
    return _shared_toy(tmp_path_factory, "refusing-model")


@pytest.fixture(scope="session")
def jailbreak_model(tmp_path_factory) -> Path:
    """The toy trained with its jailbreak behaviour: harmful requests in some wrapper classes are answered."""
    return _shared_toy(tmp_path_factory, "jailbreak-model", jailbreaks=True)
