"""Shared fixtures: real photographs (scikit-image's); the compiled extract library in one cache
folder per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

# No test may reach the network for weights: a test that asks for pretrained weights by mistake
# (a run without --no-score names ViT-B-32 / openai) fails at once on the missing cache instead of
# trying the Hugging Face Hub (it did, for 4 minutes, in a helper's draft test on 2026-11-28).
# Set before anything imports huggingface_hub, which reads it once; child processes inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {n: getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")}


@pytest.fixture
def native_library(tmp_path_factory, monkeypatch):
    """fastlaion/extract_native's library, built (or found) in one cache folder for this session
    and forgotten after the test; FASTLAION_NATIVE is unset."""
    from fastlaion import extract_native

    monkeypatch.setenv("FASTLAION_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "native-cache"))
    monkeypatch.delenv("FASTLAION_NATIVE", raising=False)
    extract_native._reset()
    yield extract_native
    extract_native._reset()


@pytest.fixture(autouse=True)
def fresh_cli_consoles(monkeypatch):
    """fastlaion.cli's rich consoles, made anew in each test: a console takes its width from
    COLUMNS when it is made, so one made by an earlier test of the same process (xdist runs many
    in one) would wrap this test's lines at that test's width."""
    import sys

    cli = sys.modules.get("fastlaion.cli")
    if cli is not None:
        for lazy in (cli.console, cli.out_console):
            monkeypatch.setattr(lazy, "_console", None)
    yield


# `make test` runs the suite in two processes that take whole files (-n 2 --dist loadfile), one
# file at a time as each runs out. xdist hands them out most tests first, which left
# test_gpu_check.py (6 tests, 1.5 min alone) among the last five: the other process sat idle while
# it ran. The files that take longest go first instead (longest first, from a `--durations=0`
# run), then the rest in collection order, so that the last handed out are short. test_download.py
# (the most tests, so xdist's first) stays first, in a process of its own from its start: it makes
# ResourceWarning an error, and a file an earlier module's test left unclosed, collected by the
# garbage collector during one of its tests, failed that test once when it ran later.
# (Test order within a file is kept; so is the files' order but for these.)
HANDED_OUT_FIRST = ("test_download.py", "test_gpu_check.py", "test_ray.py", "test_extract.py", "test_cli.py",
                    "test_workers.py", "test_score.py", "test_gpu_decode.py", "test_faults.py", "test_index.py",
                    "test_extract_native.py", "test_ops.py", "test_reader.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's: off, so that the order below holds
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HANDED_OUT_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected
