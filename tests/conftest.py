import pytest

from support import FIXTURES, register_pack, require_shared

register_pack()


@pytest.fixture(scope="session")
def fixtures_dir():
    return require_shared(FIXTURES)
