import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _svd_cache_in_tmp(tmp_path_factory):
    """Keep the tests' SVD cache out of the user's cache folder."""
    previous = os.environ.get("MEMCONTROL_CACHE_DIR")
    os.environ["MEMCONTROL_CACHE_DIR"] = str(tmp_path_factory.mktemp("memcontrol_cache"))
    yield
    if previous is None:
        os.environ.pop("MEMCONTROL_CACHE_DIR", None)
    else:
        os.environ["MEMCONTROL_CACHE_DIR"] = previous
