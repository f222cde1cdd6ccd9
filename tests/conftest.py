import pytest

from support import FIXTURES, register_pack

register_pack()


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set FMBOOST_SHARED)")
    return FIXTURES
