"""Shared fixtures: tiny models built in code, offline."""

import os
import tempfile
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The model-hash cache (Settings.hash_cache) of this test run only, not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="studio-test-cache-")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_sd15, save_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory) -> Path:
    return save_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return save_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def studio(sd15_folder, tmp_path_factory):
    """One Studio for the session (models stay cached), defaulting to the tiny SD1.5 model."""
    from studio import Settings, Studio

    return Studio(Settings(model=str(sd15_folder), outputs_dir=tmp_path_factory.mktemp("outputs")))


# Hypothesis: "ci" is deterministic and quick; HYPOTHESIS_PROFILE=long fuzzes for longer.
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
hypothesis_settings.register_profile("long", max_examples=5000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
