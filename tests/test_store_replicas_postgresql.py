"""
The replicas' store tests (tests/test_store_replicas.py) once more on
PostgreSQL, each test on a fresh database of a throwaway cluster
(L{tests.pg_support}), the replicas' connections separate as on separate
hosts.
"""

from __future__ import annotations

from tests import test_store_replicas
from tests.test_store_postgresql import _OnPostgreSQL

# The original class first: its setUp calls super().setUp(), which reaches
# _OnPostgreSQL's (as in tests/test_store_postgresql.py).


class HeartbeatTests(test_store_replicas.HeartbeatTests, _OnPostgreSQL):
    pass


class SessionTests(test_store_replicas.SessionTests, _OnPostgreSQL):
    pass


class RestoreTests(test_store_replicas.RestoreTests, _OnPostgreSQL):
    pass


class ForwardStateTests(test_store_replicas.ForwardStateTests, _OnPostgreSQL):
    pass
