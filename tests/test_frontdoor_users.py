"""
The front door's users file (rtunnel/frontdoor/users.py): scrypt hashes in
PHC form, the file format, its modes, the remembered passwords, and the
rule that a front door beyond loopback needs users.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from rtunnel.frontdoor.users import (
    DEFAULT_LN,
    REMEMBER_FOR,
    ScryptHash,
    UsersFileError,
    UserStore,
    hash_password,
    make_line,
    unauthenticated_exposure,
    validate_user,
)

#: Cheap hashes for tests (the format is the same; only the cost differs).
FAST = 4


def temp_dir(case: SynchronousTestCase) -> str:
    path = tempfile.mkdtemp(prefix="rtunnel-users-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def write(case: SynchronousTestCase, text: str, mode: int = 0o600) -> str:
    path = os.path.join(temp_dir(case), "proxy-users")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class HashTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A hash reads back from its text; it matches its password and no other."""
        hashed = hash_password("correct horse", ln=FAST)
        text = str(hashed)
        self.assertTrue(text.startswith(f"$scrypt$ln={FAST},r=8,p=1$"))
        self.assertEqual(ScryptHash.parse(text), hashed)
        self.assertTrue(hashed.matches(b"correct horse"))
        self.assertFalse(hashed.matches(b"correct horsE"))
        self.assertNotIn("correct", repr(hashed))

    def test_salt_per_hash(self) -> None:
        """Two hashes of one password differ (a salt each)."""
        self.assertNotEqual(hash_password("pw", ln=FAST), hash_password("pw", ln=FAST))

    def test_default_cost(self) -> None:
        """The default is scrypt N=2**14, r=8, p=1 with 16-byte salts and 32-byte keys."""
        hashed = hash_password("pw")
        self.assertEqual((hashed.ln, hashed.r, hashed.p, len(hashed.salt), len(hashed.key)), (DEFAULT_LN, 8, 1, 16, 32))
        self.assertEqual(DEFAULT_LN, 14)

    def test_known_vector(self) -> None:
        """The key is hashlib.scrypt's, so a hash can be checked with any scrypt implementation (RFC 7914 vector)."""
        hashed = hash_password("password", ln=10, r=8, p=16, salt=b"NaCl")
        expected = bytes.fromhex("fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162")
        self.assertEqual(hashed.key, expected)

    def test_bad_hashes(self) -> None:
        """Every malformed or too costly hash is refused with a reason that never quotes the key."""
        good = str(hash_password("pw", ln=FAST))
        salt, key = good.split("$")[3:5]
        cases = {
            "plain": "not an rtunnel password hash",
            f"$bcrypt$ln=4,r=8,p=1${salt}${key}": "not an rtunnel password hash",
            f"$scrypt$ln=4,r=8${salt}${key}": "expected ln=L,r=R,p=P",
            f"$scrypt$ln=0,r=8,p=1${salt}${key}": "out of range",
            f"$scrypt$ln=21,r=8,p=1${salt}${key}": "out of range",
            f"$scrypt$ln=20,r=8,p=1${salt}${key}": "more than 64 MiB",
            f"$scrypt$ln=14,r=8,p=5${salt}${key}": "4 times the default",
            f"$scrypt$ln=4,r=8,p=1$!!${key}": "not base64",
            f"$scrypt$ln=4,r=8,p=1${salt}$": "not base64",
            f"$scrypt$ln=4,r=8,p=1$AAAA${key}": "a salt of 3 bytes",
        }
        for text, words in cases.items():
            with self.assertRaises(ValueError) as raised:
                ScryptHash.parse(text)
            self.assertIn(words, str(raised.exception), text)
            self.assertNotIn(key, str(raised.exception))

    def test_bad_passwords(self) -> None:
        """Empty passwords and passwords SOCKS5 cannot carry (over 255 bytes) are refused."""
        for password, words in (("", "empty"), ("x" * 256, "255 bytes")):
            with self.assertRaises(ValueError) as raised:
                hash_password(password, ln=FAST)
            self.assertIn(words, str(raised.exception))


class UserNameTests(SynchronousTestCase):
    def test_user_names(self) -> None:
        """User names: 1-255 UTF-8 bytes, printable, no spaces or ':', not starting with '#'."""
        for good in ("federation", "zoë", "a.b-c_d@example", "x" * 255):
            self.assertEqual(validate_user(good), good)
        for bad, words in (
            ("", "empty"),
            ("a:b", "':'"),
            ("a b", "' '"),
            ("a\tb", "'\\t'"),
            ("a\x1bb", "'\\x1b'"),
            ("#admin", "starts with '#'"),
            ("é" * 128, "255 bytes"),
        ):
            with self.assertRaises(ValueError) as raised:
                validate_user(bad)
            self.assertIn(words, str(raised.exception), bad)

    def test_make_line(self) -> None:
        """make_line gives a line the file format reads back, verifying the password."""
        line = make_line("federation", "s3cret", ln=FAST)
        self.assertTrue(line.startswith("federation:$scrypt$"))
        self.assertNotIn("\n", line)
        store = UserStore.parse(line)
        self.assertTrue(store.verify("federation", b"s3cret"))
        with self.assertRaises(ValueError):
            make_line("bad:user", "pw", ln=FAST)


class FileFormatTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Comments, blank lines and surrounding spaces are ignored; each user verifies its own password."""
        text = "\n".join(
            [
                "# front door users",
                "",
                make_line("alice", "pw-a", ln=FAST),
                "   " + make_line("bob", "pw-b", ln=FAST) + "  ",
                "  # indented comment",
            ]
        )
        store = UserStore.parse(text)
        self.assertEqual(len(store), 2)
        self.assertIn("alice", store)
        self.assertTrue(store.verify("alice", b"pw-a"))
        self.assertTrue(store.verify("bob", b"pw-b"))
        self.assertFalse(store.verify("alice", b"pw-b"))
        self.assertFalse(store.verify("carol", b"pw-a"))

    def test_empty_file(self) -> None:
        """An empty store lets nobody in."""
        store = UserStore.parse("# nobody yet\n")
        self.assertEqual(len(store), 0)
        self.assertFalse(store.verify("alice", b"pw"))

    def test_errors_name_the_line(self) -> None:
        """Every bad line is refused naming the source, the line number and what is wrong."""
        line = make_line("alice", "pw", ln=FAST)
        cases = [
            ("alice", "line 1: expected USER:HASH"),
            (f"# c\n{line}\n{line}", "line 3: user 'alice' again (first on line 2)"),
            ("a b:" + line.split(":", 1)[1], "line 1: user name 'a b' holds ' '"),
            ("alice:$scrypt$nope", "line 1: user 'alice': not an rtunnel password hash"),
        ]
        for text, words in cases:
            with self.assertRaises(UsersFileError) as raised:
                UserStore.parse(text, "users.txt")
            self.assertIn(f"users.txt, {words}", str(raised.exception), text)


class FileTests(SynchronousTestCase):
    def test_load(self) -> None:
        """A file of mode 0600 owned by this user loads."""
        path = write(self, make_line("alice", "pw", ln=FAST) + "\n")
        store = UserStore.load(path)
        self.assertTrue(store.verify("alice", b"pw"))
        self.assertEqual(store.source, path)

    def test_readable_by_others_is_refused(self) -> None:
        """A file its group or others may read or write is refused, saying who and how to fix it."""
        for mode, who in ((0o640, "its group"), (0o604, "other users"), (0o620, "its group"), (0o606, "other users")):
            path = write(self, make_line("alice", "pw", ln=FAST), mode)
            with self.assertRaises(UsersFileError) as raised:
                UserStore.load(path)
            message = str(raised.exception)
            self.assertIn(f"users file {path} is accessible to {who} (mode {mode:o})", message)
            self.assertIn(f"chmod 600 {path}", message)
        UserStore.load(write(self, "", 0o400))  # read-only for its owner is fine

    def test_owned_by_someone_else_is_refused(self) -> None:
        """A file owned by another user (not root) is refused: its owner could add users."""
        if os.geteuid() != 0:
            raise SkipTest("needs root to give a file to another user")
        path = write(self, make_line("alice", "pw", ln=FAST))
        os.chown(path, 65534, 65534)
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(path)
        self.assertIn("is owned by user id 65534", str(raised.exception))

    def test_not_a_file(self) -> None:
        """A directory, a FIFO, a missing path, a huge file, a file not in UTF-8: refused with the path."""
        directory = temp_dir(self)
        os.chmod(directory, 0o700)
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(directory)
        self.assertIn("is not a regular file", str(raised.exception))
        fifo = os.path.join(directory, "fifo")
        os.mkfifo(fifo, 0o600)
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(fifo)  # refused at once, not waiting for a writer
        self.assertIn("is not a regular file", str(raised.exception))
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(os.path.join(directory, "missing"))
        self.assertIn("cannot read users file", str(raised.exception))
        huge = write(self, "#" * (1024 * 1024 + 1))
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(huge)
        self.assertIn("larger than 1024 KiB", str(raised.exception))
        latin = write(self, "")
        with open(latin, "wb") as f:
            f.write(b"# caf\xe9\n")
        with self.assertRaises(UsersFileError) as raised:
            UserStore.load(latin)
        self.assertIn("not UTF-8", str(raised.exception))

    def test_symlink_is_judged_by_its_target(self) -> None:
        """A symlink to a good file loads; the mode checked is the file's, not the link's."""
        target = write(self, make_line("alice", "pw", ln=FAST))
        link = os.path.join(temp_dir(self), "link")
        os.symlink(target, link)
        self.assertIn("alice", UserStore.load(link))
        os.chmod(target, 0o644)
        with self.assertRaises(UsersFileError):
            UserStore.load(link)


class RememberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = UserStore.parse(make_line("alice", "pw", ln=FAST))

    def test_remembered_password(self) -> None:
        """
        After remember(), the same password is accepted without scrypt until
        the period ends; another password, another user or no remembering:
        only verify() can tell (None).
        """
        store = self.store
        self.assertIsNone(store.check_cached("alice", b"pw", 0.0))
        store.remember("alice", b"pw", 100.0)
        self.assertIs(store.check_cached("alice", b"pw", 100.0), True)
        self.assertIs(store.check_cached("alice", b"pw", 100.0 + REMEMBER_FOR - 0.001), True)
        self.assertIsNone(store.check_cached("alice", b"other", 101.0))
        self.assertIsNone(store.check_cached("bob", b"pw", 101.0))
        self.assertIsNone(store.check_cached("alice", b"pw", 100.0 + REMEMBER_FOR))
        self.assertIsNone(store.check_cached("alice", b"pw", 101.0))  # forgotten once expired

    def test_only_known_users_are_remembered(self) -> None:
        """remember() ignores users not in the store."""
        self.store.remember("mallory", b"pw", 0.0)
        self.assertIsNone(self.store.check_cached("mallory", b"pw", 1.0))

    def test_nothing_secret_kept(self) -> None:
        """What is remembered is an HMAC under a key of this process, never the password."""
        self.store.remember("alice", b"pw", 0.0)
        remembered = list(self.store._remembered.values())
        self.assertEqual(len(remembered), 1)
        self.assertNotIn(b"pw", remembered[0][0])
        other = UserStore.parse(make_line("alice", "pw", ln=FAST))
        other.remember("alice", b"pw", 0.0)
        self.assertNotEqual(other._remembered["alice"][0], remembered[0][0])


class ExposureTests(SynchronousTestCase):
    def test_loopback_needs_no_users(self) -> None:
        """127.0.0.0/8, ::1 and localhost are loopback: no users needed."""
        for interface in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST."):
            self.assertIsNone(unauthenticated_exposure(interface, False), interface)

    def test_beyond_loopback_needs_users(self) -> None:
        """Any other interface, or all of them, needs users; with users, anything goes."""
        for interface in ("", "0.0.0.0", "::", "10.0.0.1", "fe80::1%eth0", "gateway.example"):
            problem = unauthenticated_exposure(interface, False, "--connect-proxy")
            assert problem is not None, interface
            self.assertIn("--connect-proxy listens on", problem)
            self.assertIn("without --proxy-users", problem)
            self.assertIn("anyone who can reach it reach every site", problem)
            self.assertIsNone(unauthenticated_exposure(interface, True))
        self.assertIn("every interface", unauthenticated_exposure("", False) or "")
