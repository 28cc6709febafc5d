"""Shared fixtures. The real CTs live in ../shared/data/real beside the checkout (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("DRCT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Path of the 9 real head CTs; skips the test with a reason where they are absent."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real CT data not found at {REAL_DATA} (set DRCT_REAL_DATA to its folder)")
    return REAL_DATA
