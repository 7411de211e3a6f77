"""
C{rtunnel proxy-users add}: a users file the front doors accept, the
password read from stdin (never argv), the file created mode 600.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest

from rtunnel.cli.admin import main
from rtunnel.frontdoor.users import UserStore


def _add(monkeypatch: pytest.MonkeyPatch, user: str, path: Path, password: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    status = main(["proxy-users", "add", user, "--file", str(path)], stdout=out)
    return status, out.getvalue(), err.getvalue()


def test_added_users_verify_and_the_file_is_private(tmp_path, monkeypatch):
    path = tmp_path / "proxy-users"
    assert _add(monkeypatch, "federation", path, "correct horse")[0] == 0
    assert _add(monkeypatch, "video", path, "battery staple")[0] == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = UserStore.load(str(path))
    assert users.verify("federation", b"correct horse")
    assert users.verify("video", b"battery staple")
    assert not users.verify("video", b"correct horse")


def test_a_user_already_there_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "proxy-users"
    _add(monkeypatch, "federation", path, "one")
    status, _, err = _add(monkeypatch, "federation", path, "two")
    assert status == 1
    assert "already in" in err
    assert UserStore.load(str(path)).verify("federation", b"one")


@pytest.mark.parametrize(("user", "password", "words"), [("fed eration", "x", "user"), ("federation", "", "empty")])
def test_bad_input_is_refused_and_nothing_written(tmp_path, monkeypatch, user, password, words):
    path = tmp_path / "proxy-users"
    status, _, err = _add(monkeypatch, user, path, password)
    assert status == 1
    assert words in err
    assert not path.exists()
