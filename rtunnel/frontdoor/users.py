"""
The front door's users (C{--proxy-users FILE}): who may use the SOCKS5 and
HTTP CONNECT front door when it listens beyond loopback.

The file holds one C{USER:HASH} per line; blank lines and lines starting
with C{#} are ignored::

    # rtunnel proxy users
    federation:$scrypt$ln=14,r=8,p=1$Gd2J...$5nS0...

A hash is scrypt (C{hashlib.scrypt}) in the PHC string format: its cost
parameters (C{ln}: log2 of N, C{r}, C{p}), a salt of its own and the derived
key, both base64 without padding. Secrets are never stored: whoever reads
the file must still guess each password, at scrypt's cost per guess. The
file must be readable by its owner only (like the keys of the state
directories) and owned by this user or root; anything else is refused,
with the C{chmod} that fixes it.

Cost. The default (N = 2**14, r = 8, p = 1: 16 MiB, about 40 ms on one core
of the development machine) is a front door's compromise: far costlier to
guess than a fast hash, cheap enough to check on a connection. Checking is
CPU work: the Twisted adapter (L{rtunnel.frontdoor.protocol}) runs
L{UserStore.verify} in a thread pool (C{deferToThreadPool}), so the reactor
never stalls, and it bounds how many checks may wait at once. A client that
connects again and again with the same good password pays scrypt once per
L{UserStore.remember} period: the last good password of each user is kept
in memory as an HMAC under a key made at start (never the password, never
on disk), and L{UserStore.check_cached} compares against it on the reactor.
Failures are never cached. An unknown user costs the same scrypt as a known
one (checked against a hash that matches nothing), so timing does not tell
which users exist; keys are compared with C{hmac.compare_digest}.

Pure Python (no Twisted).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Mapping

from attrs import field, frozen

from ..logsafe import printable

__all__ = [
    "DEFAULT_LN",
    "DEFAULT_P",
    "DEFAULT_R",
    "ScryptHash",
    "UserStore",
    "UsersFileError",
    "hash_password",
    "make_line",
    "unauthenticated_exposure",
    "validate_user",
]

DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: Bounds on what a hash in the file may ask for: at most 64 MiB of memory
#: and 4 times the default's work, so that a mistyped parameter cannot make
#: every check take seconds or exhaust memory.
MAX_MEMORY = 64 * 1024 * 1024
MAX_WORK = 4 * (2**DEFAULT_LN) * DEFAULT_R * DEFAULT_P
MAX_FILE_SIZE = 1024 * 1024
#: How long a verified password is remembered (seconds).
REMEMBER_FOR = 300.0

_PARAMS = re.compile(r"ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})")
_B64 = re.compile(r"[A-Za-z0-9+/]+")
#: A user name: printable, no space, no ':' (RFC 7617 forbids it in a
#: Basic user-id) and, in UTF-8, at most the 255 bytes RFC 1929 can carry.
_USER_BAD = re.compile(r"[\s:]")


class UsersFileError(ValueError):
    """The users file cannot be used; C{str()} names the file (and line) and says why."""


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise ValueError("not base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@frozen
class ScryptHash:
    """One user's hash: scrypt parameters, salt and derived key."""

    ln: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        """
        Read C{$scrypt$ln=L,r=R,p=P$SALT$KEY}.

        @raise ValueError: saying what is wrong (never quoting the key).
        """
        parts = text.split("$")
        if len(parts) != 5 or parts[0] != "" or parts[1] != "scrypt":
            raise ValueError("not an rtunnel password hash ($scrypt$ln=L,r=R,p=P$SALT$KEY)")
        params = _PARAMS.fullmatch(parts[2])
        if params is None:
            raise ValueError(f"scrypt parameters {parts[2]!r} (expected ln=L,r=R,p=P)")
        ln, r, p = (int(g) for g in params.groups())
        _check_cost(ln, r, p)
        try:
            salt = _b64decode(parts[3])
            key = _b64decode(parts[4])
        except (ValueError, binascii.Error):
            raise ValueError("salt or key is not base64") from None
        if not 8 <= len(salt) <= 64 or not 16 <= len(key) <= 64:
            raise ValueError(f"a salt of {len(salt)} bytes or a key of {len(key)} bytes (8-64 and 16-64 expected)")
        return cls(ln, r, p, salt, key)

    def derive(self, password: bytes) -> bytes:
        """The key scrypt derives from C{password} with these parameters."""
        return hashlib.scrypt(
            password, salt=self.salt, n=2**self.ln, r=self.r, p=self.p, dklen=len(self.key), maxmem=2 * MAX_MEMORY
        )

    def matches(self, password: bytes) -> bool:
        """Whether C{password} is the one hashed (constant-time comparison)."""
        return hmac.compare_digest(self.derive(password), self.key)

    def __str__(self) -> str:
        return f"$scrypt$ln={self.ln},r={self.r},p={self.p}${_b64encode(self.salt)}${_b64encode(self.key)}"


def _check_cost(ln: int, r: int, p: int) -> None:
    if not (1 <= ln <= 20 and r >= 1 and p >= 1):
        raise ValueError(f"scrypt parameters ln={ln}, r={r}, p={p} out of range")
    if 128 * r * 2**ln > MAX_MEMORY:
        raise ValueError(f"scrypt parameters ln={ln}, r={r} need more than {MAX_MEMORY // 2**20} MiB")
    if 2**ln * r * p > MAX_WORK:
        raise ValueError(f"scrypt parameters ln={ln}, r={r}, p={p} cost more than 4 times the default")


def validate_user(name: str) -> str:
    """
    Check a user name and return it: 1 to 255 UTF-8 bytes (RFC 1929's
    limit), printable, without spaces or C{:}, not starting with C{#}.

    @raise ValueError: saying which rule is broken.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("user name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError("user name is longer than 255 bytes (RFC 1929)")
    bad = _USER_BAD.search(name)
    if bad is not None or not name.isprintable():
        char = bad.group() if bad is not None else next(c for c in name if not c.isprintable())
        raise ValueError(f"user name '{printable(name)}' holds '{printable(char)}' (no spaces, ':' or controls)")
    if name.startswith("#"):
        raise ValueError(f"user name '{printable(name)}' starts with '#' (a comment in the users file)")
    return name


def hash_password(
    password: bytes | str,
    *,
    ln: int = DEFAULT_LN,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: bytes | None = None,
) -> ScryptHash:
    """Hash C{password} (UTF-8 if text) with a new random salt."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    if not secret:
        raise ValueError("password is empty")
    if len(secret) > 255:
        raise ValueError("password is longer than 255 bytes (RFC 1929 cannot carry it)")
    _check_cost(ln, r, p)  # the same bounds as a file
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    key = hashlib.scrypt(secret, salt=salt, n=2**ln, r=r, p=p, dklen=KEY_BYTES, maxmem=2 * MAX_MEMORY)
    return ScryptHash(ln, r, p, salt, key)


def make_line(user: str, password: bytes | str, *, ln: int = DEFAULT_LN) -> str:
    """A line of the users file for C{user} (for C{rtunnel proxy-users add}), without its newline."""
    return f"{validate_user(user)}:{hash_password(password, ln=ln)}"


class UserStore:
    """
    The users of a front door, read from a users file (L{load}) or text
    (L{parse}).
    """

    def __init__(self, users: Mapping[str, ScryptHash], source: str = "<users>") -> None:
        self.users = dict(users)
        self.source = source
        common = collections.Counter((h.ln, h.r, h.p) for h in self.users.values()).most_common(1)
        ln, r, p = common[0][0] if common else (DEFAULT_LN, DEFAULT_R, DEFAULT_P)
        # An unknown user is checked against this, at the cost most users' hashes have.
        self._nobody = ScryptHash(ln, r, p, os.urandom(SALT_BYTES), os.urandom(KEY_BYTES))
        self._cache_key = os.urandom(32)
        self._remembered: dict[str, tuple[bytes, float]] = {}

    @classmethod
    def parse(cls, text: str, source: str = "<users>") -> UserStore:
        """
        Read the users file's format.

        @raise UsersFileError: naming C{source}, the line and the problem.
        """
        users: dict[str, ScryptHash] = {}
        first_line: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, hashed = line.partition(":")
            where = f"{source}, line {number}"
            if not colon:
                raise UsersFileError(f"{where}: expected USER:HASH")
            try:
                validate_user(user)
            except ValueError as e:
                raise UsersFileError(f"{where}: {e}") from None
            if user in users:
                raise UsersFileError(
                    f"{where}: user '{printable(user)}' again (first on line {first_line[user]}); one line per user"
                )
            try:
                users[user] = ScryptHash.parse(hashed)
            except ValueError as e:
                raise UsersFileError(f"{where}: user '{printable(user)}': {e}") from None
            first_line[user] = number
        return cls(users, source)

    @classmethod
    def load(cls, path: str) -> UserStore:
        """
        Read the users file at C{path}, refusing one that others may read
        or that someone else owns.

        @raise UsersFileError: naming the file and the problem.
        """
        try:
            # Non-blocking: a FIFO in its place must be refused, not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UsersFileError(f"cannot read users file {path}: {e.strerror}") from None
        try:
            # The mode of what was opened, not of what the path names a moment later.
            problem = _mode_problem(path, os.fstat(fd))
            if problem is not None:
                raise UsersFileError(problem)
            data = b""
            while len(data) <= MAX_FILE_SIZE:
                chunk = os.read(fd, MAX_FILE_SIZE + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise UsersFileError(f"cannot read users file {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_SIZE:
            raise UsersFileError(f"users file {path} is larger than {MAX_FILE_SIZE // 1024} KiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(f"users file {path} is not UTF-8 text") from None
        return cls.parse(text, path)

    def __contains__(self, user: object) -> bool:
        return user in self.users

    def __len__(self) -> int:
        return len(self.users)

    def verify(self, user: str, password: bytes) -> bool:
        """
        Whether C{password} is C{user}'s: scrypt work (tens of ms), run in a
        thread by the adapter. Touches no shared state, so any thread may
        call it. An unknown user takes as long as a known one.
        """
        hashed = self.users.get(user)
        if hashed is None:
            self._nobody.matches(password)
            return False
        return hashed.matches(password)

    def _mark(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._cache_key, user.encode("utf-8", "surrogatepass") + b"\0" + password, "sha256").digest()

    def check_cached(self, user: str, password: bytes, now: float) -> bool | None:
        """
        C{True} if C{password} is the one L{remember}ed for C{user} less
        than L{REMEMBER_FOR} seconds ago (and the user is still in the
        store); C{None} when only L{verify} can tell. Cheap: for the reactor.
        """
        entry = self._remembered.get(user)
        if entry is None or user not in self.users:
            return None
        mark, until = entry
        if now >= until:
            del self._remembered[user]
            return None
        return True if hmac.compare_digest(mark, self._mark(user, password)) else None

    def remember(self, user: str, password: bytes, now: float, period: float = REMEMBER_FOR) -> None:
        """Remember that L{verify} accepted C{password} for C{user} (call on one thread only)."""
        if user in self.users:
            self._remembered[user] = (self._mark(user, password), now + period)


def _mode_problem(path: str, info: os.stat_result) -> str | None:
    """
    Why a users file may not be used, as rtunnel's state directories are
    judged: owned by this user (or root), and here, since the hashes can be
    attacked offline by whoever reads them, readable by nobody else.
    """
    if not stat.S_ISREG(info.st_mode):
        return f"users file {path} is not a regular file"
    if info.st_uid not in (os.geteuid(), 0):
        return (
            f"users file {path} is owned by user id {info.st_uid}, not by this user ({os.geteuid()}) or root; "
            "refusing to use it (its owner could add users)"
        )
    mode = info.st_mode & 0o777
    if mode & 0o077:
        who = "other users" if mode & 0o007 else "its group"
        return (
            f"users file {path} is accessible to {who} (mode {mode:o}); refusing to use it "
            f"(whoever reads the hashes can guess passwords offline): chmod 600 {path}"
        )
    return None


def unauthenticated_exposure(interface: str, has_users: bool, option: str = "--socks") -> str | None:
    """
    Why a front door may not listen on C{interface} as configured, or
    C{None}: beyond loopback it needs users (C{--proxy-users}), because an
    open front door lets anyone who reaches it reach every site.

    @param interface: the address it binds (C{""}, C{0.0.0.0} and C{::}
        are every interface).
    """
    if has_users:
        return None
    host = interface.strip().strip("[]")
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host.lower().rstrip(".") == "localhost"
    if loopback:
        return None
    where = host or "every interface"
    return (
        f"{option} listens on {where}, beyond loopback, without --proxy-users: an open front door would let "
        "anyone who can reach it reach every site; give --proxy-users FILE, or bind it to 127.0.0.1"
    )
