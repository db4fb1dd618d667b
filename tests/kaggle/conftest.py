"""The Kaggle kit tests' fixtures, from tests/support/kaggle_fixtures.py (shared with
tests/data/test_fetch.py): an isolated home, fake credentials, the fake server and a client."""
from support.kaggle_fixtures import client, fake_kaggle, isolated_env, wheelhouse  # noqa: F401
