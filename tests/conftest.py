"""Shared fixtures: real photographs (scikit-image's); the compiled extract library in one cache
folder per session."""

from __future__ import annotations

import numpy as np
import pytest


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
