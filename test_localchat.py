#!/usr/bin/env python3
"""Tests for localchat.py; run them with: python3 -m unittest -v

The TestCase classes follow the sections of localchat.py. Servers bind 127.0.0.1 on
port 0 and run on a thread; the command line is run in subprocesses. No test sleeps:
every wait is a read, a join or a queue get with a deadline, and every loop is
bounded in count and time. No traffic goes anywhere but the loopback interface.
"""

import ast
import io
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import tempfile

import localchat

# The programs under test keep history and settings in per-user folders: point
# them (and every subprocess) at throwaway folders, never at the real ones.
_SCRATCH = tempfile.TemporaryDirectory(prefix="localchat-test-")
os.environ["LOCALCHAT_DATA_DIR"] = os.path.join(_SCRATCH.name, "data")
os.environ["LOCALCHAT_CONFIG_DIR"] = os.path.join(_SCRATCH.name, "config")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "localchat.py")
LOOPBACK = "127.0.0.1"

READ_TIMEOUT_S = 5.0        # a frame that should come comes within this
THREAD_END_S = 3.0          # threads a test started must all end within this after it
PROCESS_TIMEOUT_S = 20.0    # any subprocess must end within this
SHUTDOWN_LIMIT_S = 2.0      # the issue: the server stops within 2 seconds
MAX_FRAMES = 20000          # no read loop looks at more frames than this
FLOOD_TEXT_CHARS = 30000    # one big message (under MAX_TEXT_BYTES) for the slow-reader tests
SMALL_RCVBUF = 4096         # a client that never reads asks for a tiny receive buffer


def frame_bytes(fields, ascii_only=True):
    """Return one frame as the wire carries it; ascii_only escapes all non-ASCII text."""
    return json.dumps(fields, ensure_ascii=ascii_only).encode("utf-8") + b"\n"


def is_message(frame):
    return frame["type"] == "message"


class RawClient:
    """A test's end of one TCP connection: send bytes or frames, read frames with deadlines."""

    def __init__(self, address, rcvbuf=None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(READ_TIMEOUT_S)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer = bytearray()
        self.at_eof = False
        self.welcome = None

    def send_raw(self, data):
        self.sock.settimeout(READ_TIMEOUT_S)
        self.sock.sendall(data)

    def send(self, fields, ascii_only=True):
        self.send_raw(frame_bytes(fields, ascii_only))

    def say(self, text, **extra):
        fields = {"type": "say", "text": text}
        fields.update(extra)
        self.send(fields)

    def hello(self, name):
        """Say hello as name; return the welcome (the test fails on anything else)."""
        self.send({"type": "hello", "name": name, "version": localchat.PROTOCOL_VERSION})
        frame = self.read_frame()
        if frame is None or frame["type"] != "welcome":
            raise AssertionError("hello as %r got %r instead of a welcome" % (name, frame))
        self.welcome = frame
        return frame

    def read_frame(self, timeout=READ_TIMEOUT_S):
        """Return the next frame, or None once the server has closed; fail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return json.loads(line.decode("utf-8"))
            if self.at_eof:
                if self.buffer:
                    raise AssertionError("the connection ended inside a line: %r" % bytes(self.buffer[:80]))
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no frame within %.1f s" % timeout)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError("no frame within %.1f s" % timeout) from None
            if not chunk:
                self.at_eof = True
            self.buffer += chunk

    def read_until(self, predicate, timeout=READ_TIMEOUT_S):
        """Read until a frame satisfies predicate; return (that frame, the frames before it)."""
        deadline = time.monotonic() + timeout
        skipped = []
        for _ in range(MAX_FRAMES):
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError("the connection closed; frames before: %r" % skipped[-5:])
            if predicate(frame):
                return frame, skipped
            skipped.append(frame)
        raise AssertionError("no matching frame among %d frames" % MAX_FRAMES)

    def drain_until_closed(self, timeout=READ_TIMEOUT_S, max_bytes=64 * 1024 * 1024):
        """Read and discard until the server closes (EOF or reset); fail after timeout."""
        deadline = time.monotonic() + timeout
        total = len(self.buffer)
        while total <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1024 * 1024)
            except socket.timeout:
                break
            except ConnectionResetError:
                return
            if not chunk:
                return
            total += len(chunk)
        raise AssertionError("the server did not close the connection within %.1f s" % timeout)

    def close(self):
        self.sock.close()


class QueueWriter:
    """A stdout for an in-process client: each write goes on a queue the test reads."""

    def __init__(self):
        self.writes = queue.Queue()

    def write(self, text):
        self.writes.put(text)

    def flush(self):
        pass

    def wait_for(self, fragment, timeout=READ_TIMEOUT_S):
        """Return the first write holding fragment; fail after timeout."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_FRAMES):
            try:
                text = self.writes.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("nothing holding %r written within %.1f s" % (fragment, timeout)) from None
            if fragment in text:
                return text
        raise AssertionError("too many writes")


class ServerFixture:
    """setUp/tearDown for tests that run a ChatServer on a thread.

    tearDown closes the test's clients, stops the server, joins its thread, fails on
    any internal error of the server and on any thread the test left running.
    """

    def setUp(self):
        self.threads_before = set(threading.enumerate())
        self.server = None
        self.server_thread = None
        self.address = None
        self.clients = []
        self.connections = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        for connection in self.connections:
            connection.close(say_bye=False)
        if self.server is not None:
            self.server.stop()
            self.server_thread.join(THREAD_END_S)
            self.assertFalse(self.server_thread.is_alive(), "serve_forever() did not return")
            self.assertEqual(self.server.internal_errors, 0, "the server had an internal error (see the log)")
        self.assert_no_thread_leaked()

    def assert_no_thread_leaked(self):
        deadline = time.monotonic() + THREAD_END_S
        leaked = []
        for thread in threading.enumerate():
            if thread in self.threads_before:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                leaked.append(thread.name)
        self.assertEqual(leaked, [], "threads left running")

    def start_server(self, **options):
        """Start a ChatServer on 127.0.0.1, a free port, and serve it on a thread."""
        self.server = localchat.ChatServer((LOOPBACK, 0), **options)
        self.server_thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-serve", daemon=True
        )
        self.server_thread.start()
        self.address = (LOOPBACK, self.server.port)
        return self.server

    def connect(self, rcvbuf=None):
        client = RawClient(self.address, rcvbuf)
        self.clients.append(client)
        return client

    def join(self, name, rcvbuf=None):
        client = self.connect(rcvbuf)
        client.hello(name)
        return client

    def connection(self, name):
        """Return a ChatConnection (not yet connected) whose events go to its .events queue."""
        events = queue.Queue()
        connection = localchat.ChatConnection(self.address[0], self.address[1], name, on_event=events.put)
        connection.events = events
        self.connections.append(connection)
        return connection

    def next_event(self, connection, timeout=READ_TIMEOUT_S):
        try:
            return connection.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no event within %.1f s" % timeout) from None

    def event_until(self, connection, predicate, timeout=READ_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        skipped = []
        for _ in range(MAX_FRAMES):
            event = self.next_event(connection, max(0.0, deadline - time.monotonic()))
            if predicate(event):
                return event, skipped
            skipped.append(event)
        raise AssertionError("no matching event among %d" % MAX_FRAMES)


# =============================================================================
# 3. Protocol
# =============================================================================


class ProtocolTests(unittest.TestCase):
    """Wire format, limits and the small pure helpers: in-process, no sockets."""

    def assertProtocolError(self, code, function, *args):
        with self.assertRaises(localchat.ProtocolError) as caught:
            function(*args)
        self.assertEqual(caught.exception.code, code)
        self.assertTrue(caught.exception.text)
        return caught.exception

    # -- encode_frame / parse_frame ----------------------------------------------

    def test_encoded_frame_is_one_compact_utf8_line(self):
        data = localchat.encode_frame({"type": "message", "text": "two\nlines 😀 é"})
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(data.count(b"\n"), 1)  # the newline inside the text is escaped
        self.assertIn("😀 é".encode("utf-8"), data)  # UTF-8 on the wire, not \\u escapes
        self.assertNotIn(b": ", data)
        self.assertNotIn(b", ", data)

    def test_encoded_frame_parses_back_to_the_same_fields(self):
        fields = {"type": "say", "text": "tab\there\nnext 𝄞", "ref": "c1", "n": 3}
        self.assertEqual(localchat.parse_frame(localchat.encode_frame(fields)[:-1]), fields)

    def test_parse_frame_refuses_invalid_utf8(self):
        self.assertProtocolError("bad_utf8", localchat.parse_frame, b'{"type":"say","text":"\xff"}')

    def test_parse_frame_refuses_invalid_json(self):
        self.assertProtocolError("bad_json", localchat.parse_frame, b'{"type": "say",')

    def test_parse_frame_refuses_deep_nesting_as_bad_json(self):
        self.assertProtocolError("bad_json", localchat.parse_frame, b"[" * 100000)

    def test_parse_frame_refuses_json_that_is_not_an_object(self):
        for line in (b'["say"]', b'"say"', b"17", b"null"):
            with self.subTest(line=line):
                self.assertProtocolError("not_object", localchat.parse_frame, line)

    def test_parse_frame_needs_a_string_type(self):
        for line in (b'{"text":"hi"}', b'{"type":7}', b'{"type":null}', b'{"type":["say"]}'):
            with self.subTest(line=line):
                self.assertProtocolError("bad_type", localchat.parse_frame, line)

    def test_frame_field_checks_presence_and_type(self):
        frame = {"type": "hello", "name": "alice", "version": 1, "flag": True}
        self.assertEqual(localchat.frame_field(frame, "name", str), "alice")
        self.assertEqual(localchat.frame_field(frame, "version", int), 1)
        self.assertIsNone(localchat.frame_field(frame, "ref", str, required=False))
        self.assertProtocolError("bad_field", localchat.frame_field, frame, "ref", str)
        self.assertProtocolError("bad_field", localchat.frame_field, frame, "name", int)
        # true is no version number, although bool is an int in Python
        self.assertProtocolError("bad_field", localchat.frame_field, frame, "flag", int)

    # -- split_host_port ---------------------------------------------------------

    def test_split_host_port_accepts_the_documented_forms(self):
        port = localchat.DEFAULT_PORT
        cases = {
            "192.168.1.7": ("192.168.1.7", port),
            "192.168.1.7:4000": ("192.168.1.7", 4000),
            "  host.lan:99 ": ("host.lan", 99),
            "[::1]:4000": ("::1", 4000),
            "[fe80::1]": ("fe80::1", port),
            "fe80::1": ("fe80::1", port),
            "h:65535": ("h", 65535),
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(localchat.split_host_port(text), expected)

    def test_split_host_port_uses_the_given_default_port(self):
        self.assertEqual(localchat.split_host_port("host", default_port=80), ("host", 80))

    def test_split_host_port_refuses_bad_addresses_with_a_sentence(self):
        for text in ("", ":4000", "host:", "host:port", "host:0", "host:65536", "host:-1", "[::1]:x"):
            with self.subTest(text=text):
                with self.assertRaises(localchat.UserError) as caught:
                    localchat.split_host_port(text)
                self.assertTrue(str(caught.exception).endswith("."))

    # -- clean_text ----------------------------------------------------------------

    def test_clean_text_keeps_unicode_tabs_and_newlines(self):
        text = "line one\n\tline two 😀 𝄞 naïve 中文 \u200d end"
        self.assertEqual(localchat.clean_text(text), text)

    def test_clean_text_makes_line_ends_newlines(self):
        self.assertEqual(localchat.clean_text("a\r\nb\rc\nd"), "a\nb\nc\nd")

    def test_clean_text_refuses_empty_and_blank_text(self):
        for text in ("", " ", "\n\t \r\n"):
            with self.subTest(text=text):
                self.assertProtocolError("empty_text", localchat.clean_text, text)

    def test_clean_text_limit_counts_utf8_bytes(self):
        limit = localchat.MAX_TEXT_BYTES
        self.assertEqual(len(localchat.clean_text("x" * limit)), limit)
        self.assertProtocolError("text_too_long", localchat.clean_text, "x" * (limit + 1))
        emoji = "😀" * (limit // 4)  # four bytes each: exactly the limit
        self.assertEqual(localchat.clean_text(emoji), emoji)
        self.assertProtocolError("text_too_long", localchat.clean_text, emoji + "x")

    def test_clean_text_refuses_control_characters(self):
        for char in ("\x00", "\x07", "\x1b", "\x7f", "\x85"):
            with self.subTest(char=repr(char)):
                self.assertProtocolError("bad_text", localchat.clean_text, "a%sb" % char)

    def test_clean_text_refuses_lone_surrogates(self):
        self.assertProtocolError("bad_text", localchat.clean_text, "a\ud800b")

    # -- names -----------------------------------------------------------------------

    def test_check_name_accepts_letters_digits_and_marks_of_any_script(self):
        for name in ("alice", "Bob_2", "a.b-c", "Zoë", "名前", "x", "n" * localchat.MAX_NAME_CHARS):
            with self.subTest(name=name):
                localchat.check_name(name)

    def test_check_name_refuses_bad_names(self):
        bad = ("", "n" * (localchat.MAX_NAME_CHARS + 1), "two words", "tab\there", "nul\x00",
               "new\nline", "a/b", "semi;colon", 'quo"te', "😀", "\u200bzero")
        for name in bad:
            with self.subTest(name=name):
                self.assertProtocolError("bad_name", localchat.check_name, name)

    def test_check_name_refuses_non_strings_as_bad_field(self):
        self.assertProtocolError("bad_field", localchat.check_name, 5)

    def test_name_key_folds_case_and_width(self):
        key = localchat.name_key("alice")
        for same in ("ALICE", "Alice", "ａｌｉｃｅ"):
            with self.subTest(name=same):
                self.assertEqual(localchat.name_key(same), key)
        self.assertEqual(localchat.name_key("Straße"), localchat.name_key("STRASSE"))
        self.assertNotEqual(localchat.name_key("alice"), localchat.name_key("alicia"))

    # -- printable -------------------------------------------------------------------

    def test_printable_escapes_control_characters(self):
        self.assertEqual(localchat.printable("a\nb\x1bc"), "a\\nb\\x1bc")

    def test_printable_marks_cut_text(self):
        # Regression: the "..." was compared against the cut text, so a long plain
        # text was cut without the mark and a short text with escapes got one.
        self.assertEqual(localchat.printable("a" * 100, limit=80), "a" * 80 + "...")
        self.assertEqual(localchat.printable("\x00" * 30, limit=80), "\\x00" * 30)

    # -- the protocol's documentation ------------------------------------------------

    def test_protocol_doc_lists_every_error_code_the_code_raises(self):
        with open(SCRIPT, encoding="utf-8") as source:
            tree = ast.parse(source.read())
        codes = set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "ProtocolError" and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                codes.add(node.args[0].value)
        self.assertGreater(len(codes), 15)
        documented = set(re.findall(r"[a-z0-9_]+", localchat.PROTOCOL_DOC.split("Error codes:", 1)[1]))
        self.assertEqual(sorted(codes - documented), [])

    def test_every_documented_client_frame_has_a_handler(self):
        client_part = localchat.PROTOCOL_DOC.split("Client to server:", 1)[1].split("Server to client:", 1)[0]
        kinds = set(re.findall(r'\{"type":"([a-z_]+)"', client_part))
        self.assertEqual(kinds, {"hello", "say", "users", "ping", "pong", "bye"})
        for kind in kinds:
            with self.subTest(kind=kind):
                self.assertTrue(callable(getattr(localchat.JsonLinesSession, "do_" + kind, None)))


# =============================================================================
# 4. Core
# =============================================================================


class FakeMember:
    """A hub member that keeps the fields of every event it is given."""

    name = None

    def __init__(self):
        self.events = []

    def deliver(self, event):
        self.events.append(event.fields)

    def kinds(self):
        return [event["type"] for event in self.events]

    def take(self):
        """Return the events so far and forget them."""
        events, self.events = self.events, []
        return events


class CoreTests(unittest.TestCase):
    """ChatHub with fake members: no sockets, no JSON."""

    def setUp(self):
        self.hub = localchat.ChatHub("test-hub")

    def member(self, name):
        member = FakeMember()
        self.hub.join(member, name)
        return member

    def test_join_welcomes_the_member_with_the_user_list(self):
        alice = self.member("alice")
        bob = self.member("Bob")
        welcome = bob.events[0]
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["name"], "Bob")
        self.assertEqual(welcome["users"], ["alice", "Bob"])  # sorted without regard to case
        self.assertEqual(welcome["server"], "test-hub")
        self.assertEqual(welcome["version"], localchat.PROTOCOL_VERSION)
        self.assertEqual(alice.kinds(), ["welcome", "joined"])
        self.assertEqual(alice.events[1]["name"], "Bob")
        self.assertEqual(bob.kinds(), ["welcome"])  # nobody hears of their own joining

    def test_welcome_comes_before_later_messages(self):
        alice = self.member("alice")
        bob = self.member("bob")
        self.hub.say(alice, "hi")
        self.assertEqual(bob.kinds(), ["welcome", "message"])

    def test_say_reaches_everybody_with_the_sender_included(self):
        alice, bob, carol = self.member("alice"), self.member("bob"), self.member("carol")
        for member in (alice, bob, carol):
            member.take()
        self.hub.say(bob, "hello all", ref="r1")
        for member in (alice, bob, carol):
            with self.subTest(member=member.name):
                (message,) = member.take()
                self.assertEqual(message["type"], "message")
                self.assertEqual(message["from"], "bob")
                self.assertEqual(message["text"], "hello all")
                self.assertEqual(message["ref"], "r1")
                self.assertIsInstance(message["ts"], float)

    def test_message_ids_increase(self):
        alice, bob = self.member("alice"), self.member("bob")
        for index in range(5):
            self.hub.say(alice if index % 2 else bob, "m%d" % index)
        ids = [event["id"] for event in alice.events if event["type"] == "message"]
        self.assertEqual(len(ids), 5)
        self.assertEqual(ids, sorted(set(ids)))

    def test_message_from_is_the_members_name(self):
        alice = self.member("alice")
        self.hub.say(alice, "hi")
        self.assertEqual(alice.events[-1]["from"], "alice")
        self.assertNotIn("ref", alice.events[-1])

    def test_refused_text_is_delivered_to_nobody_and_uses_no_id(self):
        alice, bob = self.member("alice"), self.member("bob")
        alice.take()
        bob.take()
        with self.assertRaises(localchat.ProtocolError) as caught:
            self.hub.say(alice, "   ")
        self.assertEqual(caught.exception.code, "empty_text")
        self.assertEqual((alice.events, bob.events), ([], []))
        self.hub.say(alice, "real")
        first_id = bob.events[0]["id"]
        self.hub.say(alice, "next")
        self.assertEqual(bob.events[1]["id"], first_id + 1)

    def test_users_lists_everybody_to_the_asker_only(self):
        alice, bob = self.member("alice"), self.member("bob")
        alice.take()
        bob.take()
        self.hub.users(bob)
        self.assertEqual(bob.events, [{"type": "users", "users": ["alice", "bob"]}])
        self.assertEqual(alice.events, [])

    def test_leave_tells_the_others_why(self):
        alice, bob = self.member("alice"), self.member("bob")
        alice.take()
        self.assertTrue(self.hub.leave(bob, "timeout"))
        (left,) = alice.take()
        self.assertEqual((left["type"], left["name"], left["reason"]), ("left", "bob", "timeout"))
        self.assertNotIn("left", bob.kinds())
        self.assertEqual(self.hub.count(), 1)

    def test_join_say_users_leave_arrive_in_order(self):
        alice = self.member("alice")
        bob = self.member("bob")
        self.hub.say(bob, "hi")
        self.hub.users(alice)
        self.hub.leave(bob, "quit")
        self.assertEqual(alice.kinds(), ["welcome", "joined", "message", "users", "left"])

    def test_leave_twice_or_without_joining_does_nothing(self):
        alice, bob = self.member("alice"), self.member("bob")
        self.assertTrue(self.hub.leave(bob, "quit"))
        alice.take()
        self.assertFalse(self.hub.leave(bob, "quit"))
        self.assertFalse(self.hub.leave(FakeMember(), "lost"))
        self.assertEqual(alice.events, [])

    def test_name_taken_without_regard_to_case_or_width(self):
        alice = self.member("alice")
        alice.take()
        for name in ("alice", "ALICE", "Alice", "ａｌｉｃｅ"):
            with self.subTest(name=name):
                newcomer = FakeMember()
                with self.assertRaises(localchat.ProtocolError) as caught:
                    self.hub.join(newcomer, name)
                self.assertEqual(caught.exception.code, "name_taken")
                self.assertTrue(caught.exception.fatal)
                self.assertIn(name, caught.exception.text)
                self.assertEqual(newcomer.events, [])
        self.assertEqual(alice.events, [])
        self.assertEqual(self.hub.count(), 1)

    def test_a_name_is_free_again_after_its_owner_left(self):
        alice = self.member("alice")
        self.hub.leave(alice, "quit")
        again = self.member("Alice")
        self.assertEqual(again.events[0]["users"], ["Alice"])

    def test_invalid_name_is_refused_and_nobody_hears_of_it(self):
        alice = self.member("alice")
        alice.take()
        with self.assertRaises(localchat.ProtocolError) as caught:
            self.hub.join(FakeMember(), "two words")
        self.assertEqual(caught.exception.code, "bad_name")
        self.assertEqual(alice.events, [])

    def test_member_that_left_cannot_speak(self):
        alice, bob = self.member("alice"), self.member("bob")
        self.hub.leave(bob, "quit")
        alice.take()
        self.hub.say(bob, "ghost")
        self.assertEqual(alice.events, [])

    def test_close_says_bye_and_refuses_newcomers(self):
        alice, bob = self.member("alice"), self.member("bob")
        alice.take()
        bob.take()
        self.hub.close()
        for member in (alice, bob):
            (bye,) = member.take()
            self.assertEqual((bye["type"], bye["reason"]), ("bye", "shutdown"))
        with self.assertRaises(localchat.ProtocolError) as caught:
            self.hub.join(FakeMember(), "carol")
        self.assertEqual(caught.exception.code, "shutting_down")
        self.hub.leave(bob, "lost")
        self.assertEqual(alice.events, [])  # no "left" noise while shutting down


# =============================================================================
# 6-7. Doors and server, over real sockets
# =============================================================================


class ServerTests(ServerFixture, unittest.TestCase):
    """A ChatServer on a thread and raw socket clients speaking JSON lines."""

    def pair(self, **options):
        """Start a server; return alice and bob, joined, with nothing left unread."""
        self.start_server(**options)
        alice = self.join("alice")
        bob = self.join("bob")
        joined = alice.read_frame()
        self.assertEqual((joined["type"], joined["name"]), ("joined", "bob"))
        return alice, bob

    def assert_error(self, client, code, fatal=False):
        frame = client.read_frame()
        self.assertIsNotNone(frame, "closed instead of an error %s" % code)
        self.assertEqual((frame["type"], frame.get("code")), ("error", code), frame)
        self.assertIsInstance(frame["text"], str)
        self.assertTrue(frame["text"].strip())
        self.assertEqual(frame.get("fatal", False), fatal, frame)
        return frame

    def assert_closed(self, client):
        self.assertIsNone(client.read_frame(), "the server did not close the connection")

    def assert_left(self, client, name, reason):
        frame = client.read_frame()
        self.assertEqual((frame["type"], frame.get("name"), frame.get("reason")), ("left", name, reason), frame)

    def assert_refused_and_not_relayed(self, data, code):
        """Alice sends data: only she gets error `code`, and both chats go on."""
        alice, bob = self.pair()
        alice.send_raw(data)
        self.assert_error(alice, code)
        alice.say("still here")
        for client in (alice, bob):
            frame = client.read_frame()  # the very next frame: nothing else came before it
            self.assertEqual((frame["type"], frame["from"], frame["text"]), ("message", "alice", "still here"))

    # -- joining -----------------------------------------------------------------------

    def test_hello_gets_welcome_with_users_and_others_see_joined(self):
        self.start_server()
        alice = self.connect()
        alice.send({"type": "hello", "name": "alice", "version": 1, "client": "an unknown field is ignored"})
        welcome = alice.read_frame()
        self.assertEqual((welcome["type"], welcome["name"], welcome["users"]), ("welcome", "alice", ["alice"]))
        self.assertEqual(welcome["version"], localchat.PROTOCOL_VERSION)
        self.assertEqual(welcome["max_text_bytes"], localchat.MAX_TEXT_BYTES)
        self.assertIsInstance(welcome["server"], str)
        bob = self.join("Bob")
        self.assertEqual(bob.welcome["users"], ["alice", "Bob"])
        joined = alice.read_frame()
        self.assertEqual((joined["type"], joined["name"]), ("joined", "Bob"))
        self.assertAlmostEqual(joined["ts"], time.time(), delta=60)

    def test_invalid_names_get_bad_name_and_close(self):
        self.start_server()
        watcher = self.join("watcher")
        for name in ("", "two words", "n" * 33, "tab\there", "😀", "semi;colon", "nul\x00"):
            with self.subTest(name=name):
                client = self.connect()
                client.send({"type": "hello", "name": name, "version": 1})
                self.assert_error(client, "bad_name", fatal=True)
                self.assert_closed(client)
        self.join("marker")
        joined = watcher.read_frame()  # the first thing the watcher hears of anybody
        self.assertEqual((joined["type"], joined["name"]), ("joined", "marker"))

    def test_hello_without_a_string_name_gets_bad_field_and_close(self):
        self.start_server()
        for fields in ({"type": "hello", "version": 1}, {"type": "hello", "name": 5, "version": 1}):
            with self.subTest(fields=fields):
                client = self.connect()
                client.send(fields)
                self.assert_error(client, "bad_field", fatal=True)
                self.assert_closed(client)

    def test_hello_with_a_bad_version_is_refused_and_closed(self):
        self.start_server()
        cases = ((0, "bad_version"), (-1, "bad_version"), ("1", "bad_field"), (True, "bad_field"), (None, "bad_field"))
        for version, code in cases:
            with self.subTest(version=version):
                client = self.connect()
                client.send({"type": "hello", "name": "alice", "version": version})
                self.assert_error(client, code, fatal=True)
                self.assert_closed(client)

    def test_taken_name_in_any_case_gets_name_taken_and_close(self):
        self.start_server()
        alice = self.join("alice")
        for name in ("alice", "ALICE", "Alice", "ａｌｉｃｅ"):
            with self.subTest(name=name):
                client = self.connect()
                client.send({"type": "hello", "name": name, "version": 1})
                error = self.assert_error(client, "name_taken", fatal=True)
                self.assertIn(name, error["text"])
                self.assert_closed(client)
        alice.send({"type": "users"})
        self.assertEqual(alice.read_frame(), {"type": "users", "users": ["alice"]})

    def test_second_hello_gets_already_joined(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "hello", "name": "carol", "version": 1}),
                                            "already_joined")

    def test_frames_before_hello_get_hello_first(self):
        self.start_server()
        watcher = self.join("watcher")
        client = self.connect()
        client.say("too early")
        self.assert_error(client, "hello_first")
        client.send({"type": "users"})
        self.assert_error(client, "hello_first")
        client.hello("late")
        joined = watcher.read_frame()  # the early message never reached the watcher
        self.assertEqual((joined["type"], joined["name"]), ("joined", "late"))

    def test_no_hello_in_time_gets_hello_timeout_and_close(self):
        self.start_server(hello_timeout=0.5)
        started = time.monotonic()
        client = self.connect()
        self.assert_error(client, "hello_timeout", fatal=True)
        self.assertGreaterEqual(time.monotonic() - started, 0.4)
        self.assert_closed(client)

    def test_silent_connections_do_not_block_others_from_joining(self):
        self.start_server(hello_timeout=5.0)
        for _ in range(3):
            self.connect()  # connected, never says a word
        client = self.connect()
        client.send({"type": "hello", "name": "alice", "version": 1})
        # Far less than hello_timeout: a blocked accept loop would answer after 5 s.
        welcome = client.read_frame(timeout=2.0)
        self.assertEqual(welcome["type"], "welcome")

    # -- messages ----------------------------------------------------------------------

    def test_message_reaches_everybody_including_the_sender(self):
        alice, bob = self.pair()
        alice.say("hello bob", ref="c1")
        for client in (alice, bob):
            frame = client.read_frame()
            self.assertEqual(frame["type"], "message")
            self.assertEqual((frame["from"], frame["text"], frame["ref"]), ("alice", "hello bob", "c1"))
            self.assertIsInstance(frame["id"], int)
            self.assertAlmostEqual(frame["ts"], time.time(), delta=60)

    def test_message_ids_increase_across_senders(self):
        alice, bob = self.pair()
        seen = {"alice": [], "bob": []}
        for index in range(6):  # one at a time: each is read by both before the next is said
            (alice if index % 2 else bob).say("m%d" % index)
            for name, client in (("alice", alice), ("bob", bob)):
                seen[name].append(client.read_frame())
        for frames in seen.values():
            self.assertEqual([frame["text"] for frame in frames], ["m%d" % index for index in range(6)])
            self.assertEqual([frame["from"] for frame in frames], ["bob", "alice"] * 3)
            ids = [frame["id"] for frame in frames]
            self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual([frame["id"] for frame in seen["alice"]], [frame["id"] for frame in seen["bob"]])

    def test_sender_cannot_set_from(self):
        alice, bob = self.pair()
        alice.say("it was me", **{"from": "mallory", "id": 999999})
        frame = bob.read_frame()
        self.assertEqual((frame["from"], frame["text"]), ("alice", "it was me"))
        self.assertNotEqual(frame["id"], 999999)

    def test_multiline_and_astral_text_pass_through_unchanged(self):
        alice, bob = self.pair()
        text = "Traceback:\n  File \"x.py\", line 1\n\tindented 😀 𝄞 naïve 中文 \u200d👩‍💻"
        alice.say(text)  # non-ASCII as \\u escapes, astral characters as surrogate pairs
        alice.send({"type": "say", "text": text}, ascii_only=False)  # the same as raw UTF-8
        for client in (alice, bob):
            for _ in range(2):
                self.assertEqual(client.read_frame()["text"], text)

    def test_carriage_returns_become_newlines(self):
        alice, bob = self.pair()
        alice.say("one\r\ntwo\rthree")
        self.assertEqual(bob.read_frame()["text"], "one\ntwo\nthree")

    def test_users_request_gets_the_list(self):
        alice, bob = self.pair()
        bob.send({"type": "users"})
        self.assertEqual(bob.read_frame(), {"type": "users", "users": ["alice", "bob"]})

    def test_ping_gets_pong_with_its_token(self):
        alice, _ = self.pair()
        alice.send({"type": "ping", "token": "t-17"})
        self.assertEqual(alice.read_frame(), {"type": "pong", "token": "t-17"})
        alice.send({"type": "ping"})
        self.assertEqual(alice.read_frame(), {"type": "pong"})
        alice.send({"type": "ping", "token": "x" * (localchat.MAX_REF_CHARS + 1)})
        self.assertEqual(alice.read_frame(), {"type": "pong"})  # an over-long token is not echoed

    def test_ping_before_hello_gets_pong(self):
        self.start_server()
        client = self.connect()
        client.send({"type": "ping", "token": 5})
        self.assertEqual(client.read_frame(), {"type": "pong", "token": 5})

    def test_ping_token_with_lone_surrogate_gets_pong_without_token(self):
        # Regression: echoing a token holding a lone surrogate raised UnicodeEncodeError
        # in encode_frame, an internal error that dropped the connection.
        alice, _ = self.pair()
        alice.send({"type": "ping", "token": "a\ud800"})
        self.assertEqual(alice.read_frame(), {"type": "pong"})

    # -- leaving -----------------------------------------------------------------------

    def test_bye_gets_bye_and_close_and_others_see_quit(self):
        alice, bob = self.pair()
        alice.send({"type": "bye"})
        bye = alice.read_frame()
        self.assertEqual((bye["type"], bye["reason"]), ("bye", "quit"))
        self.assert_closed(alice)
        self.assert_left(bob, "alice", "quit")

    def test_connection_closed_without_bye_is_lost(self):
        self.start_server()
        watcher = self.join("watcher")
        for name, reset in (("closer", False), ("resetter", True)):
            with self.subTest(name=name):
                client = self.join(name)
                self.assertEqual(watcher.read_frame()["name"], name)
                if reset:  # a zero linger time makes close() send a reset, as a crash would
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                client.close()
                self.assert_left(watcher, name, "lost")

    def test_client_that_never_answers_pings_is_dropped_as_timeout(self):
        self.start_server(idle_ping=0.3)
        watcher = self.connection("watcher")  # ChatConnection answers pings by itself
        watcher.connect()
        watcher.start()
        silent = self.join("silent")
        self.event_until(watcher, lambda event: event["type"] == "joined")
        started = time.monotonic()
        self.assertEqual(silent.read_frame(), {"type": "ping"})  # the server asks first
        self.assert_closed(silent)
        self.assertLess(time.monotonic() - started, 3.0)
        left, _ = self.event_until(watcher, lambda event: event["type"] == "left")
        self.assertEqual((left["name"], left["reason"]), ("silent", "timeout"))
        # The watcher answered the same pings and was kept.
        watcher.send({"type": "users"})
        users, _ = self.event_until(watcher, lambda event: event["type"] == "users")
        self.assertEqual(users["users"], ["watcher"])

    def test_client_that_answers_pings_is_kept(self):
        self.start_server(idle_ping=0.3)
        client = self.join("alice")
        for _ in range(3):  # three idle periods; two unanswered ones would drop it
            self.assertEqual(client.read_frame(), {"type": "ping"})
            client.send({"type": "pong"})
        client.send({"type": "users"})
        self.assertEqual(client.read_frame(), {"type": "users", "users": ["alice"]})

    # -- bad input ---------------------------------------------------------------------

    def test_invalid_utf8_gets_bad_utf8_and_reaches_nobody(self):
        self.assert_refused_and_not_relayed(b'{"type":"say","text":"\xff\xfe"}\n', "bad_utf8")

    def test_invalid_json_gets_bad_json_and_reaches_nobody(self):
        self.assert_refused_and_not_relayed(b'{"type":"say","text":\n', "bad_json")

    def test_json_that_is_not_an_object_gets_not_object(self):
        self.assert_refused_and_not_relayed(b'["say", "hi"]\n', "not_object")

    def test_frame_without_type_gets_bad_type(self):
        self.assert_refused_and_not_relayed(b'{"text":"hi"}\n', "bad_type")

    def test_frame_with_non_string_type_gets_bad_type(self):
        self.assert_refused_and_not_relayed(b'{"type":7,"text":"hi"}\n', "bad_type")

    def test_unknown_type_gets_unknown_type(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "dance", "text": "hi"}), "unknown_type")

    def test_say_without_text_gets_bad_field(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say"}), "bad_field")

    def test_say_with_non_string_text_gets_bad_field(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": ["hi"]}), "bad_field")

    def test_say_with_overlong_ref_gets_bad_field(self):
        ref = "r" * (localchat.MAX_REF_CHARS + 1)
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": "hi", "ref": ref}), "bad_field")

    def test_say_with_lone_surrogate_ref_gets_bad_field(self):
        # Regression: the ref is echoed in the message to everybody, and a lone
        # surrogate made encode_frame raise under the hub's lock: an internal error.
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": "hi", "ref": "\ud800"}),
                                            "bad_field")

    def test_empty_text_gets_empty_text(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": " \n\t "}), "empty_text")

    def test_overlong_text_gets_text_too_long(self):
        text = "é" * (localchat.MAX_TEXT_BYTES // 2 + 1)  # fewer characters than the limit, more bytes
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": text}, ascii_only=False),
                                            "text_too_long")

    def test_control_characters_get_bad_text(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": "ding\x07\x1b[2J"}), "bad_text")

    def test_lone_surrogate_text_gets_bad_text(self):
        self.assert_refused_and_not_relayed(frame_bytes({"type": "say", "text": "half \ud83d"}), "bad_text")

    def test_overlong_line_gets_line_too_long_and_disconnect(self):
        alice, bob = self.pair()
        filler = b"x" * localchat.MAX_LINE_BYTES
        alice.send_raw(b'{"type":"say","text":"' + filler + b'"}\n')
        self.assert_error(alice, "line_too_long", fatal=True)
        self.assert_closed(alice)
        self.assert_left(bob, "alice", "error")

    def test_endless_line_is_refused_before_its_newline(self):
        alice, _ = self.pair()
        alice.send_raw(b"x" * localchat.MAX_LINE_BYTES)  # no newline will ever come
        self.assert_error(alice, "line_too_long", fatal=True)
        self.assert_closed(alice)

    def test_line_of_exactly_the_limit_is_accepted(self):
        alice, _ = self.pair()
        head = b'{"type":"ping","token":"edge","pad":"'
        tail = b'"}\n'
        line = head + b"x" * (localchat.MAX_LINE_BYTES - len(head) - len(tail)) + tail
        self.assertEqual(len(line), localchat.MAX_LINE_BYTES)  # the newline included
        alice.send_raw(line)
        self.assertEqual(alice.read_frame(), {"type": "pong", "token": "edge"})

    def test_too_many_errors_get_too_many_errors_and_disconnect(self):
        alice, bob = self.pair()
        alice.send_raw(b"nonsense\n" * (localchat.ERROR_LIMIT + 1))
        for _ in range(localchat.ERROR_LIMIT):
            self.assert_error(alice, "bad_json")
        self.assert_error(alice, "too_many_errors", fatal=True)
        self.assert_closed(alice)
        self.assert_left(bob, "alice", "error")

    def test_empty_lines_and_crlf_are_accepted(self):
        alice, _ = self.pair()
        alice.send_raw(b"\n\r\n   \n" + b'{"type":"ping","token":"crlf"}\r\n')
        self.assertEqual(alice.read_frame(), {"type": "pong", "token": "crlf"})

    # -- load ------------------------------------------------------------------------

    def test_concurrent_senders_lose_nothing_and_keep_each_senders_order(self):
        self.start_server()
        senders, per_sender = 5, 200
        clients = [self.join("c%d" % index) for index in range(senders)]
        barrier = threading.Barrier(senders, timeout=READ_TIMEOUT_S)
        failures = []

        def send_all(index):
            try:
                barrier.wait()
                for number in range(per_sender):
                    clients[index].say("c%d-%d" % (index, number))
            except Exception as error:  # reported by the test below
                failures.append(repr(error))

        threads = [threading.Thread(target=send_all, args=(index,), name="test-sender-%d" % index)
                   for index in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(READ_TIMEOUT_S * 2)
            self.assertFalse(thread.is_alive())
        self.assertEqual(failures, [])
        total = senders * per_sender
        orders = []
        for client in clients:
            messages = []
            deadline = time.monotonic() + READ_TIMEOUT_S * 2
            while len(messages) < total:
                frame, _ = client.read_until(is_message, max(0.0, deadline - time.monotonic()))
                messages.append(frame)
            ids = [frame["id"] for frame in messages]
            self.assertEqual(ids, sorted(set(ids)))  # increasing, so no duplicates
            for index in range(senders):
                name = "c%d" % index
                texts = [frame["text"] for frame in messages if frame["from"] == name]
                self.assertEqual(texts, ["%s-%d" % (name, number) for number in range(per_sender)])
            orders.append(ids)
        for ids in orders[1:]:
            self.assertEqual(ids, orders[0])  # everybody sees one order

    def flood_until(self, sender, readers, stop, limit=400):
        """Send big messages one at a time, each read by sender and readers, until stop(frames).

        Return every frame each reader got, in order. Fails if stop() never holds.
        """
        got = {id(client): [] for client in [sender] + readers}
        for number in range(limit):
            sender.say("%05d:%s" % (number, "x" * FLOOD_TEXT_CHARS))
            for client in [sender] + readers:
                frame, skipped = client.read_until(is_message)
                got[id(client)].extend(skipped + [frame])
            if stop(got[id(readers[0])] if readers else got[id(sender)]):
                return [got[id(client)] for client in readers]
        raise AssertionError("still going after %d messages of %d characters" % (limit, FLOOD_TEXT_CHARS))

    def test_reader_that_never_reads_is_dropped_as_too_slow_while_others_get_everything(self):
        self.start_server(max_outbox_bytes=256 * 1024)
        self.join("slow", rcvbuf=SMALL_RCVBUF)  # says hello, then never reads again
        normal = self.join("normal")
        sender = self.join("sender")
        normal.read_until(lambda frame: frame["type"] == "joined")

        def dropped_and_three_more(frames):
            kinds = [(frame["type"], frame.get("reason")) for frame in frames]
            if ("left", "too_slow") not in kinds:
                return False
            return kinds[kinds.index(("left", "too_slow")):].count(("message", None)) >= 3

        (frames,) = self.flood_until(sender, [normal], dropped_and_three_more)
        left = [frame for frame in frames if frame["type"] == "left"]
        self.assertEqual([(frame["name"], frame["reason"]) for frame in left], [("slow", "too_slow")])
        messages = [frame for frame in frames if frame["type"] == "message"]
        self.assertEqual([int(frame["text"][:5]) for frame in messages], list(range(len(messages))))
        self.assertTrue(all(frame["from"] == "sender" for frame in messages))
        ids = [frame["id"] for frame in messages]
        self.assertEqual(ids, sorted(set(ids)))
        normal.send({"type": "users"})
        users, _ = normal.read_until(lambda frame: frame["type"] == "users")
        self.assertEqual(users["users"], ["normal", "sender"])

    # -- stopping --------------------------------------------------------------------

    def test_stop_says_bye_shutdown_and_closes_every_connection(self):
        alice, bob = self.pair()
        waiting = self.connect()  # connected, no hello yet
        waiting.send({"type": "ping"})
        self.assertEqual(waiting.read_frame(), {"type": "pong"})
        started = time.monotonic()
        self.server.stop()
        self.assertLess(time.monotonic() - started, SHUTDOWN_LIMIT_S)
        for client in (alice, bob):
            bye = client.read_frame()
            self.assertEqual((bye["type"], bye["reason"]), ("bye", "shutdown"))
            self.assertTrue(bye["text"])
            self.assert_closed(client)
        self.assert_closed(waiting)
        with self.assertRaises(ConnectionRefusedError):
            RawClient(self.address).close()

    def test_stop_returns_in_time_with_a_client_that_never_reads(self):
        self.start_server(max_outbox_bytes=64 * 1024 * 1024)  # big: stuck is never dropped
        stuck = self.join("stuck", rcvbuf=SMALL_RCVBUF)
        sender = self.join("sender")
        # More than any kernel buffers on the way (tcp_wmem tops out at 4 MiB on Linux),
        # so the server still owes the stuck client data when it stops.
        self.flood_until(sender, [], lambda frames: len(frames) * FLOOD_TEXT_CHARS > 6 * 1024 * 1024)
        started = time.monotonic()
        self.server.stop()
        self.assertLess(time.monotonic() - started, SHUTDOWN_LIMIT_S)
        bye, _ = sender.read_until(lambda frame: frame["type"] == "bye")
        self.assertEqual(bye["reason"], "shutdown")
        self.assert_closed(sender)
        stuck.drain_until_closed()

    def test_stop_right_after_a_frame_still_says_bye(self):
        # Regression: the writer closed a finished outbox as soon as its unsent bytes
        # were gone, dropping the frames pushed while it sent (here the bye, pushed
        # just after the welcome went out). Each round gives the race a new chance.
        for attempt in range(10):
            self.start_server()
            client = self.join("alice")
            self.server.stop()
            self.server_thread.join(THREAD_END_S)
            self.assertFalse(self.server_thread.is_alive())
            self.assertEqual(self.server.internal_errors, 0)
            with self.subTest(attempt=attempt):
                bye = client.read_frame()
                self.assertEqual(bye and (bye["type"], bye["reason"]), ("bye", "shutdown"))


# =============================================================================
# 8. Client connection
# =============================================================================


class ClientTests(ServerFixture, unittest.TestCase):
    """ChatConnection and the line client against a real server, and what a person types."""

    def test_connect_returns_the_welcome_and_events_arrive(self):
        self.start_server()
        connection = self.connection("alice")
        welcome = connection.connect()
        self.assertEqual((welcome["type"], welcome["name"], welcome["users"]), ("welcome", "alice", ["alice"]))
        self.assertEqual(connection.address, "%s:%d" % self.address)
        connection.start()
        connection.say("multi\nline 😀", ref="r1")
        message = self.next_event(connection)
        self.assertEqual((message["type"], message["from"], message["text"], message["ref"]),
                         ("message", "alice", "multi\nline 😀", "r1"))

    def test_close_says_bye_and_others_see_quit(self):
        self.start_server()
        watcher = self.join("watcher")
        connection = self.connection("alice")
        connection.connect()
        connection.start()
        self.assertEqual(watcher.read_frame()["type"], "joined")
        connection.close()
        left = watcher.read_frame()
        self.assertEqual((left["type"], left["name"], left["reason"]), ("left", "alice", "quit"))
        last, _ = self.event_until(connection, lambda event: event["type"] == "disconnected")
        self.assertTrue(last["expected"])

    def test_server_shutdown_reaches_the_client_as_bye_then_disconnected(self):
        self.start_server()
        connection = self.connection("alice")
        connection.connect()
        connection.start()
        self.server.stop()
        bye = self.next_event(connection)
        self.assertEqual((bye["type"], bye["reason"]), ("bye", "shutdown"))
        gone = self.next_event(connection)
        self.assertEqual(gone["type"], "disconnected")
        self.assertFalse(gone["expected"])
        self.assertEqual(gone["text"], bye["text"])

    def test_refused_connection_names_address_port_and_firewall(self):
        # A bound socket that does not listen refuses connections, and keeps the port ours.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
            closed_port.bind((LOOPBACK, 0))
            port = closed_port.getsockname()[1]
            connection = localchat.ChatConnection(LOOPBACK, port, "alice")
            with self.assertRaises(localchat.UserError) as caught:
                connection.connect()
        text = str(caught.exception)
        self.assertIn("%s:%d" % (LOOPBACK, port), text)
        self.assertIn("firewall", text)
        self.assertIn("port %d" % port, text)
        self.assertIn("server running", text)

    def test_unanswered_connection_times_out_with_a_sentence(self):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mute:
            mute.bind((LOOPBACK, 0))
            mute.listen(1)  # the kernel accepts; nobody ever answers
            port = mute.getsockname()[1]
            connection = localchat.ChatConnection(LOOPBACK, port, "alice")
            with self.assertRaises(localchat.UserError) as caught:
                connection.connect(timeout=0.3)
        text = str(caught.exception)
        self.assertIn("%s:%d" % (LOOPBACK, port), text)
        self.assertIn("firewall", text)

    def test_name_taken_gives_the_servers_sentence(self):
        self.start_server()
        self.join("alice")
        probe = self.connect()
        probe.send({"type": "hello", "name": "ALICE", "version": 1})
        expected = probe.read_frame()["text"]
        connection = self.connection("ALICE")
        with self.assertRaises(localchat.UserError) as caught:
            connection.connect()
        self.assertEqual(str(caught.exception), expected)
        self.assertIn("already taken", expected)

    def test_invalid_name_gives_the_servers_sentence(self):
        self.start_server()
        connection = self.connection("two words")
        with self.assertRaises(localchat.UserError) as caught:
            connection.connect()
        self.assertIn("letters, digits", str(caught.exception))

    def fake_server(self, reply):
        """Listen on a free port; on a thread, take one connection, read a line, send reply, close."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listener.settimeout(READ_TIMEOUT_S)

        def serve_once():
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            with peer:
                peer.settimeout(READ_TIMEOUT_S)
                received = b""
                while b"\n" not in received and len(received) < 65536:
                    chunk = peer.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                peer.sendall(reply)

        thread = threading.Thread(target=serve_once, name="test-fake-server")
        thread.start()
        self.addCleanup(listener.close)
        self.addCleanup(thread.join, THREAD_END_S)
        return listener.getsockname()[1]

    def test_server_that_does_not_speak_the_protocol_gives_a_sentence(self):
        port = self.fake_server(b"SSH-2.0-OpenSSH_9.6\r\n")
        connection = localchat.ChatConnection(LOOPBACK, port, "alice")
        with self.assertRaises(localchat.UserError) as caught:
            connection.connect()
        self.assertIn("does not speak the LocalChat protocol", str(caught.exception))

    def test_server_closing_without_welcome_gives_a_sentence(self):
        port = self.fake_server(b"")
        connection = localchat.ChatConnection(LOOPBACK, port, "alice")
        with self.assertRaises(localchat.UserError) as caught:
            connection.connect()
        self.assertIn("without welcoming", str(caught.exception))

    def test_send_after_close_raises_oserror(self):
        self.start_server()
        connection = self.connection("alice")
        connection.connect()
        connection.close()
        with self.assertRaises(OSError):
            connection.say("too late")

    # -- the line client, in-process -------------------------------------------------

    def test_terminal_client_sends_lines_runs_commands_and_exits_0(self):
        self.start_server()
        watcher = self.join("watcher")
        output = io.StringIO()
        client = localchat.TerminalClient(LOOPBACK, self.server.port, "term",
                                          stdin=io.StringIO("hello there\n//slash\n/users\n/nope\n"),
                                          stdout=output)
        self.assertEqual(client.run(), 0)
        lines = output.getvalue().splitlines()
        self.assertTrue(all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines), lines)
        text = output.getvalue()
        self.assertIn("<term> hello there", text)
        self.assertIn("<term> /slash", text)
        self.assertIn("2 here: term, watcher", text)
        self.assertIn("Unknown command /nope", text)
        frames = [watcher.read_frame() for _ in range(4)]
        self.assertEqual([frame["type"] for frame in frames], ["joined", "message", "message", "left"])
        self.assertEqual(frames[3]["reason"], "quit")

    def test_terminal_client_indents_the_lines_of_a_multiline_message(self):
        self.start_server()
        sender = self.join("sender")
        read_end, write_end = os.pipe()
        stdin = os.fdopen(read_end, encoding="utf-8")
        stdin_writer = os.fdopen(write_end, "w", encoding="utf-8")
        self.addCleanup(stdin.close)
        self.addCleanup(stdin_writer.close)
        output = QueueWriter()
        client = localchat.TerminalClient(LOOPBACK, self.server.port, "term", stdin=stdin, stdout=output)
        codes = []
        runner = threading.Thread(target=lambda: codes.append(client.run()), name="test-terminal")
        runner.start()
        self.assertEqual(sender.read_frame()["type"], "joined")
        sender.say("first\nsecond")
        printed = output.wait_for("<sender> first")
        stdin_writer.close()  # end of input: the client leaves
        runner.join(READ_TIMEOUT_S)
        self.assertFalse(runner.is_alive())
        self.assertEqual(codes, [0])
        self.assertRegex(printed, r"^\[\d\d:\d\d:\d\d\] <sender> first\n {11}second\n$")

    # -- what a person types ---------------------------------------------------------

    def test_parse_input_tells_text_from_commands(self):
        cases = {
            "hello": ("say", "hello"),
            "  indented": ("say", "  indented"),
            "//etc/hosts": ("say", "/etc/hosts"),
            "/users": ("users", None),
            "/USERS extra": ("users", None),
            "/quit": ("quit", None),
            "/help": ("help", None),
            "": (None, None),
            "   ": (None, None),
        }
        for line, expected in cases.items():
            with self.subTest(line=line):
                self.assertEqual(localchat.parse_input(line), expected)
        command, sentence = localchat.parse_input("/dance now")
        self.assertEqual(command, "unknown")
        self.assertIn("/dance", sentence)

    def test_notice_text_says_why_somebody_left(self):
        self.assertEqual(localchat.notice_text({"type": "joined", "name": "bob"}), "bob joined")
        self.assertEqual(localchat.notice_text({"type": "left", "name": "bob", "reason": "too_slow"}),
                         "bob could not keep up and was disconnected")
        self.assertEqual(localchat.notice_text({"type": "left", "name": "bob", "reason": "new"}),
                         "bob left (new)")
        self.assertEqual(localchat.notice_text({"type": "users", "users": ["a", "b"]}), "2 here: a, b")
        self.assertIsNone(localchat.notice_text({"type": "pong"}))


# =============================================================================
# 10-11. Terminal client and command line, in subprocesses
# =============================================================================


class PipeLines:
    """The lines a subprocess writes to one pipe, read by a thread that ends with the pipe."""

    def __init__(self, stream):
        self.lines = []
        self._queue = queue.Queue()
        self._stream = stream
        self._thread = threading.Thread(target=self._read_loop, name="test-pipe", daemon=True)
        self._thread.start()

    def _read_loop(self):
        """Runs on the pipe's thread."""
        for raw in iter(self._stream.readline, b""):
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self._queue.put(None)

    def wait_for(self, pattern, timeout=READ_TIMEOUT_S):
        """Return the match of the first new line matching pattern; fail on timeout or end."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_FRAMES):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no line matching %r within %.1f s; got %r" % (pattern, timeout, self.lines))
            if line is None:
                self._queue.put(None)
                raise AssertionError("output ended without a line matching %r; got %r" % (pattern, self.lines))
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError("too many lines")

    def rest(self, timeout=READ_TIMEOUT_S):
        """Return all further lines up to the end of the output (the process must end)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the output did not end within %.1f s" % timeout)
        rest = []
        while True:
            line = self._queue.get_nowait()
            if line is None:
                break
            rest.append(line)
        self.lines.extend(rest)
        return rest

    def join(self, timeout):
        self._thread.join(timeout)


class CliTests(unittest.TestCase):
    """python3 localchat.py ... as people and scripts run it."""

    def setUp(self):
        self.processes = []
        self.pipes = []
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(PROCESS_TIMEOUT_S)
        for pipe in self.pipes:
            pipe.join(THREAD_END_S)
        for process in self.processes:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    def command(self, *args):
        return [sys.executable, SCRIPT] + list(args)

    def popen(self, *args, stdin=subprocess.DEVNULL):
        process = subprocess.Popen(self.command(*args), stdin=stdin, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=HERE)
        self.processes.append(process)
        stdout, stderr = PipeLines(process.stdout), PipeLines(process.stderr)
        self.pipes.extend([stdout, stderr])
        return process, stdout, stderr

    def run_cli(self, *args, input_text=""):
        return subprocess.run(self.command(*args), input=input_text.encode("utf-8"), capture_output=True,
                              timeout=PROCESS_TIMEOUT_S, cwd=HERE)

    def start_server(self, *extra):
        """Run a server on a free loopback port; return (process, port, stderr lines)."""
        process, stdout, stderr = self.popen("server", "--host", LOOPBACK, "--port", "0", *extra)
        match = stdout.wait_for(r"listening on ([0-9.]+):(\d+)$", PROCESS_TIMEOUT_S)
        self.assertEqual(match.group(1), LOOPBACK)
        return process, int(match.group(2)), stderr

    def join(self, port, name):
        client = RawClient((LOOPBACK, port))
        self.clients.append(client)
        client.hello(name)
        return client

    def assert_one_line_error(self, result, code, *fragments):
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, code, stderr)
        self.assertNotIn("Traceback", stderr)
        lines = stderr.strip().splitlines()
        self.assertTrue(lines, "nothing on stderr")
        for fragment in fragments:
            self.assertIn(fragment, lines[-1])
        return lines

    # -- the line client -------------------------------------------------------------

    def test_piped_cli_client_exits_0_once_its_message_is_confirmed(self):
        _, port, _ = self.start_server()
        watcher = self.join(port, "watcher")
        result = self.run_cli("ci", "--cli", "--server", "%s:%d" % (LOOPBACK, port), input_text="build finished\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode("utf-8"), r"(?m)^\[\d\d:\d\d:\d\d\] <ci> build finished$")
        frames = [watcher.read_frame() for _ in range(3)]
        self.assertEqual([(frame["type"], frame.get("name") or frame.get("from")) for frame in frames],
                         [("joined", "ci"), ("message", "ci"), ("left", "ci")])
        self.assertEqual(frames[1]["text"], "build finished")
        self.assertEqual(frames[2]["reason"], "quit")

    def test_two_cli_clients_chat_end_to_end(self):
        _, port, _ = self.start_server()
        server_option = "%s:%d" % (LOOPBACK, port)
        listener, out, _ = self.popen("listener", "--cli", "--server", server_option, stdin=subprocess.PIPE)
        out.wait_for(r"\* Connected to %s\. Welcome, listener!" % re.escape(server_option))
        result = self.run_cli("ci", "--cli", "--server", server_option, input_text="line one\nline two\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        out.wait_for(r"\* ci joined$")
        out.wait_for(r"<ci> line one$")
        out.wait_for(r"<ci> line two$")
        out.wait_for(r"\* ci left$")
        listener.stdin.close()  # end of input: the listener leaves
        self.assertEqual(listener.wait(PROCESS_TIMEOUT_S), 0)

    def test_cli_users_command_prints_who_is_here(self):
        _, port, _ = self.start_server()
        self.join(port, "watcher")
        result = self.run_cli("ci", "--cli", "--server", "%s:%d" % (LOOPBACK, port), input_text="/users\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("* 2 here: ci, watcher", result.stdout.decode("utf-8"))

    def test_cli_client_to_a_closed_port_gives_one_sentence_and_exit_1(self):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
            closed_port.bind((LOOPBACK, 0))
            port = closed_port.getsockname()[1]
            result = self.run_cli("ci", "--cli", "--server", "%s:%d" % (LOOPBACK, port))
        lines = self.assert_one_line_error(result, 1, "localchat: error:", "%s:%d" % (LOOPBACK, port), "firewall")
        self.assertEqual(len(lines), 1)

    def test_cli_client_with_a_taken_name_gives_the_servers_sentence(self):
        _, port, _ = self.start_server()
        self.join(port, "ci")
        result = self.run_cli("CI", "--cli", "--server", "%s:%d" % (LOOPBACK, port), input_text="hi\n")
        lines = self.assert_one_line_error(result, 1, "localchat: error:", "already taken")
        self.assertEqual(len(lines), 1)

    # -- the server ------------------------------------------------------------------

    @unittest.skipUnless(hasattr(signal, "SIGTERM") and os.name == "posix", "needs POSIX signals")
    def test_sigterm_says_bye_to_clients_and_exits_0_within_2_seconds(self):
        process, port, stderr = self.start_server()
        client = self.join(port, "watcher")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(PROCESS_TIMEOUT_S)
        self.assertLess(time.monotonic() - started, SHUTDOWN_LIMIT_S)
        self.assertEqual(code, 0)
        bye = client.read_frame()
        self.assertEqual((bye["type"], bye["reason"]), ("bye", "shutdown"))
        self.assertIsNone(client.read_frame())
        log = stderr.rest()
        stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
        self.assertTrue(any(re.match(stamp + r"server started", line) for line in log), log)
        self.assertTrue(any(re.match(stamp + r"watcher joined from 127\.0\.0\.1:\d+$", line) for line in log), log)
        self.assertTrue(any(re.match(stamp + r"server stopped", line) for line in log), log)

    @unittest.skipUnless(hasattr(signal, "SIGTERM") and os.name == "posix", "needs POSIX signals")
    def test_sigterm_as_soon_as_the_address_is_printed_exits_0(self):
        # Regression: the SIGTERM handler was set only after the address was printed,
        # so a supervisor signalling as soon as it read the address killed the server.
        process, stdout, _ = self.popen("server", "--host", LOOPBACK, "--port", "0")
        stdout.wait_for(r"listening on ", PROCESS_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(PROCESS_TIMEOUT_S), 0)

    @unittest.skipUnless(hasattr(signal, "SIGTERM") and os.name == "posix", "needs POSIX signals")
    def test_quiet_server_logs_nothing_for_joins(self):
        process, port, stderr = self.start_server("--quiet")
        self.join(port, "watcher")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(PROCESS_TIMEOUT_S), 0)
        self.assertEqual(stderr.rest(), [])

    def test_server_prints_the_join_command(self):
        process, stdout, _ = self.popen("server", "--host", LOOPBACK, "--port", "0")
        port = stdout.wait_for(r"listening on [0-9.]+:(\d+)$", PROCESS_TIMEOUT_S).group(1)
        stdout.wait_for(r"python3 localchat\.py YOUR-NAME --server 127\.0\.0\.1:%s$" % port)

    def test_port_in_use_gives_one_sentence_and_exit_1(self):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind((LOOPBACK, 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            result = self.run_cli("server", "--host", LOOPBACK, "--port", str(port))
        lines = self.assert_one_line_error(result, 1, "localchat: error:", "port %d" % port, "already in use")
        self.assertEqual(len(lines), 1)

    # -- arguments -------------------------------------------------------------------

    def test_bad_arguments_give_a_one_line_error_and_exit_2(self):
        cases = (
            [],
            ["server", "--cli"],
            ["server", "--server", "h"],
            ["server", "--port", "70000"],
            ["server", "--port", "x"],
            ["alice", "--port", "4000"],
            ["alice", "--host", "0.0.0.0"],
            ["two words", "--cli"],
            ["alice", "--cli", "--server", "host:notaport"],
            ["alice", "--no-such-option"],
        )
        for args in cases:
            with self.subTest(args=args):
                result = self.run_cli(*args)
                lines = self.assert_one_line_error(result, 2, "localchat.py: error:")
                self.assertEqual(result.stdout, b"")
                self.assertTrue(lines[0].startswith("usage:"), lines)

    def test_help_explains_server_window_and_cli(self):
        result = self.run_cli("--help")
        self.assertEqual(result.returncode, 0)
        text = result.stdout.decode("utf-8")
        for word in ("server", "--cli", "--server", "--host", "--port", "--quiet", "--version", "NAME"):
            with self.subTest(word=word):
                self.assertIn(word, text)

    def test_version_prints_the_version(self):
        result = self.run_cli("--version")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout.decode("utf-8").strip(), "LocalChat %s" % localchat.__version__)


# =============================================================================
# The file's shape
# =============================================================================

# Used where sys.stdlib_module_names (Python 3.10+) is missing: the standard
# library modules this project could plausibly import.
STDLIB_FALLBACK = frozenset("""
    __future__ abc argparse array ast asyncio base64 binascii bisect builtins calendar codecs collections
    colorsys contextlib copy csv ctypes dataclasses datetime decimal difflib email enum errno faulthandler
    fcntl fnmatch fractions functools gc getopt getpass gettext glob gzip hashlib heapq hmac html http
    importlib inspect io ipaddress itertools json locale logging lzma math mimetypes msvcrt multiprocessing
    numbers operator os pathlib pickle platform pprint queue random re resource secrets select selectors
    shlex shutil signal socket socketserver sqlite3 ssl stat statistics string struct subprocess sys
    sysconfig tempfile textwrap threading time timeit tkinter token tokenize traceback types typing
    unicodedata unittest urllib uuid warnings weakref winreg xml zipfile zlib
""".split())


def stdlib_module_names():
    names = set(getattr(sys, "stdlib_module_names", STDLIB_FALLBACK))
    names.update(sys.builtin_module_names)
    return names


def imported_modules(tree):
    """Yield (line, top-level module name) for every absolute import in tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


class ShapeTests(unittest.TestCase):
    """The issue's fixed shape: Python 3.8, standard library only, Tk only when asked for."""

    def parse(self, name):
        with open(os.path.join(HERE, name), encoding="utf-8") as source:
            text = source.read()
        return text, ast.parse(text, filename=name, feature_version=(3, 8))

    def test_files_parse_as_python_3_8(self):
        for name in ("localchat.py", "test_localchat.py"):
            with self.subTest(name=name):
                self.parse(name)  # raises SyntaxError on newer syntax

    def test_only_standard_library_modules_are_imported(self):
        allowed = stdlib_module_names()
        for name, extra in (("localchat.py", set()), ("test_localchat.py", {"localchat"})):
            _, tree = self.parse(name)
            outside = [(line, module) for line, module in imported_modules(tree) if module not in allowed | extra]
            with self.subTest(name=name):
                self.assertEqual(outside, [])

    def test_tkinter_is_not_imported_at_module_level(self):
        _, tree = self.parse("localchat.py")
        nodes = list(tree.body)
        top_level = []
        for _ in range(100000):  # statements at module level, inside if/try/with too, not in defs
            if not nodes:
                break
            node = nodes.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top_level.append(node)
            for field in ("body", "orelse", "finalbody", "handlers"):
                nodes.extend(getattr(node, field, []))
        modules = [module for _, module in imported_modules(ast.Module(body=top_level, type_ignores=[]))]
        self.assertIn("socket", modules)  # the walk does see the module's imports
        self.assertNotIn("tkinter", modules)
        self.assertNotIn("_tkinter", modules)

    def test_importing_localchat_does_not_load_tkinter(self):
        code = "import sys, localchat; print('tkinter' in sys.modules, '_tkinter' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=PROCESS_TIMEOUT_S,
                                cwd=HERE)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().split(), ["False", "False"])

    def test_section_banners_match_the_table_of_contents(self):
        text, _ = self.parse("localchat.py")
        contents = localchat.__doc__.split("Sections:", 1)[1]
        listed = re.findall(r"(?m)^\s+(\d+)\. (.+?)\s*$", contents)
        banners = re.findall(r"(?m)^# (\d+)\. (.+?)\s*$", text)
        self.assertGreaterEqual(len(listed), 10)
        self.assertEqual(banners, listed)
        self.assertEqual([int(number) for number, _ in banners], list(range(1, len(banners) + 1)))


# -----------------------------------------------------------------------------
# 9. Tk window (driven for real: under Xvfb when there is no display)
# -----------------------------------------------------------------------------

_XVFB = None  # the Xvfb process the window tests started, if any


def _start_xvfb():
    """Start Xvfb on a free display and point DISPLAY at it; return a reason on failure."""
    global _XVFB
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return "no display and no Xvfb (install the xvfb package)"
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [xvfb, "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 10.0)
    number = os.read(read_end, 32).decode().strip() if ready else ""
    os.close(read_end)
    if not number.isdigit():
        process.kill()
        process.wait(5)
        return "Xvfb did not start within 10 seconds"
    _XVFB = process
    os.environ["DISPLAY"] = ":" + number
    return None


def _display_problem():
    """Return None when Tk can open windows here, else why not (the skip reason)."""
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return "this Python has no tkinter"
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        return _start_xvfb()
    return None


def tearDownModule():
    if _XVFB is not None:
        _XVFB.terminate()
        _XVFB.wait(5)


class WindowTests(unittest.TestCase):
    """The chat window, built, typed into and clicked for real."""

    @classmethod
    def setUpClass(cls):
        problem = _display_problem()
        if problem is not None:
            raise unittest.SkipTest("no display for the window tests: " + problem)
        import tkinter
        try:
            cls.root = tkinter.Tk()
        except tkinter.TclError as error:
            raise unittest.SkipTest("no display for the window tests: %s" % error)
        cls.root.withdraw()

    @classmethod
    def tearDownClass(cls):
        cls.root.update()
        cls.root.destroy()

    def setUp(self):
        import tkinter
        self.tkinter = tkinter
        self.threads_before = set(threading.enumerate())
        self.server = localchat.ChatServer(("127.0.0.1", 0))
        self.server_thread = threading.Thread(target=self.server.serve_forever, name="test-accept")
        self.server_thread.start()
        self.peers = []
        self.windows = []

    def tearDown(self):
        for window in self.windows:
            if not window._closing:
                window.close()
        for peer, _ in self.peers:
            peer.close()
        self.server.stop()
        self.server_thread.join(5)
        self.root.update()
        self.assertEqual(self.server.internal_errors, 0)
        deadline = time.monotonic() + 5
        leaked = set()
        while time.monotonic() < deadline:
            leaked = {t for t in threading.enumerate() if t not in self.threads_before and t.is_alive()}
            if not leaked:
                break
            next(iter(leaked)).join(0.05)
        self.assertEqual(leaked, set(), "threads left running")

    # -- helpers -------------------------------------------------------------

    def open_window(self, name="alice", port=None, connected=True):
        top = self.tkinter.Toplevel(self.root)
        window = localchat.ChatWindow(top, "127.0.0.1", port or self.server.port, name)
        self.windows.append(window)
        if connected:
            self.pump_until(lambda: window.connected, "the window never connected")
        return window

    def add_peer(self, name="bob"):
        events = queue.Queue()
        peer = localchat.ChatConnection("127.0.0.1", self.server.port, name, on_event=events.put)
        peer.connect()
        peer.start()
        self.peers.append((peer, events))
        return peer, events

    def pump_until(self, condition, message, timeout=5.0):
        """Run Tk's event loop until condition() holds; fail with message after timeout."""
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        while time.monotonic() < deadline:
            self.root.update()
            if condition():
                return
            tick.wait(0.01)  # a bounded poll: Tk has no way to wait for another thread
        self.fail(message)

    def wait_frame(self, events, predicate, timeout=5.0):
        """Return the first frame from a peer's queue that satisfies predicate, pumping Tk meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.root.update()
            try:
                frame = events.get(timeout=0.02)
            except queue.Empty:
                continue
            if predicate(frame):
                return frame
        self.fail("the expected frame never came")

    def log_text(self, window):
        return window.log.get("1.0", "end-1c")

    def type_and_press(self, window, text, key="<Return>"):
        window.input.insert("end", text)
        window.input.focus_force()
        window.input.event_generate(key)
        self.root.update()

    # -- tests ---------------------------------------------------------------

    def test_enter_sends_the_typed_line_and_the_log_shows_it(self):
        window = self.open_window()
        peer, events = self.add_peer()
        self.type_and_press(window, "hello from the window")
        frame = self.wait_frame(events, lambda f: f["type"] == "message")
        self.assertEqual((frame["from"], frame["text"]), ("alice", "hello from the window"))
        self.pump_until(lambda: "alice: hello from the window" in self.log_text(window), "echo not shown")
        self.assertEqual(window.input.get("1.0", "end-1c"), "", "the input box is cleared")
        self.assertIn("own", window.log.tag_names(window.log.search("hello from the window", "1.0")))

    def test_send_button_sends_and_users_button_lists_people(self):
        window = self.open_window()
        self.add_peer("bob")
        window.input.insert("end", "via the button")
        window.send_button.invoke()
        self.pump_until(lambda: "alice: via the button" in self.log_text(window), "message not shown")
        window.users_button.invoke()
        self.pump_until(lambda: "2 here: alice, bob" in self.log_text(window), "user list not shown")
        self.assertEqual(window.people.get(0, "end"), ("alice (you)", "bob"))
        self.assertEqual(window.people_title.cget("text"), "People here: 2")

    def test_people_list_follows_joins_and_leaves(self):
        window = self.open_window()
        peer, _ = self.add_peer("bob")
        self.pump_until(lambda: "bob" in window.people.get(0, "end"), "bob not listed after joining")
        self.assertIn("bob joined", self.log_text(window))
        peer.close()
        self.pump_until(lambda: "bob" not in window.people.get(0, "end"), "bob still listed after leaving")
        self.assertIn("bob left", self.log_text(window))

    def test_messages_from_others_show_with_their_name_in_a_stable_colour(self):
        window = self.open_window()
        peer, _ = self.add_peer("bob")
        peer.say("hi alice, look at this")
        self.pump_until(lambda: "bob: hi alice, look at this" in self.log_text(window), "message not shown")
        start = window.log.search("bob: hi", "1.0")
        tags = window.log.tag_names(start)
        self.assertIn("colour-" + localchat.name_colour("bob"), tags)
        self.assertEqual(localchat.name_colour("bob"), localchat.name_colour("BOB"))
        # The message names alice, so her window highlights it.
        self.assertIn("mention", window.log.tag_names(window.log.search("look at this", "1.0")))

    def test_shift_enter_adds_a_line_and_the_message_goes_as_one(self):
        window = self.open_window()
        peer, events = self.add_peer()
        window.input.insert("end", "first line")
        window.input.event_generate("<Shift-Return>")
        self.type_and_press(window, "second line")
        frame = self.wait_frame(events, lambda f: f["type"] == "message")
        self.assertEqual(frame["text"], "first line\nsecond line")

    def test_pasted_block_of_lines_is_sent_as_one_message(self):
        window = self.open_window()
        peer, events = self.add_peer()
        pasted = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad"
        window.input.insert("1.0", pasted)
        window.send_button.invoke()
        frame = self.wait_frame(events, lambda f: f["type"] == "message")
        self.assertEqual(frame["text"], pasted)
        self.pump_until(lambda: "ValueError: bad" in self.log_text(window), "paste not shown")

    def test_up_and_down_recall_sent_lines(self):
        window = self.open_window()
        self.type_and_press(window, "one")
        self.type_and_press(window, "two")
        window.input.event_generate("<Up>")
        self.assertEqual(window.input.get("1.0", "end-1c"), "two")
        window.input.event_generate("<Up>")
        self.assertEqual(window.input.get("1.0", "end-1c"), "one")
        window.input.event_generate("<Down>")
        self.assertEqual(window.input.get("1.0", "end-1c"), "two")
        window.input.event_generate("<Down>")
        self.assertEqual(window.input.get("1.0", "end-1c"), "")

    def test_escape_asks_and_leave_closes_the_window_and_others_see_quit(self):
        window = self.open_window()
        peer, events = self.add_peer()
        top = window.root
        window.input.event_generate("<Escape>")
        self.root.update()
        self.assertIsNotNone(window.confirm_dialog)
        self.assertTrue(window.confirm_dialog.top.winfo_exists())
        window.confirm_dialog.yes_button.invoke()
        self.assertFalse(top.winfo_exists())
        frame = self.wait_frame(events, lambda f: f["type"] == "left")
        self.assertEqual((frame["name"], frame["reason"]), ("alice", "quit"))

    def test_escape_then_stay_keeps_chatting(self):
        window = self.open_window()
        window.input.event_generate("<Escape>")
        self.root.update()
        window.confirm_dialog.no_button.invoke()
        self.assertTrue(window.root.winfo_exists())
        self.assertTrue(window.connected)
        self.type_and_press(window, "still here")
        self.pump_until(lambda: "alice: still here" in self.log_text(window), "could not chat after Stay")

    def test_slash_commands_help_unknown_and_double_slash(self):
        window = self.open_window()
        peer, events = self.add_peer()
        self.type_and_press(window, "/help")
        self.assertIn("/users", self.log_text(window))
        self.type_and_press(window, "/nonsense")
        self.assertIn("Unknown command /nonsense", self.log_text(window))
        self.type_and_press(window, "//not a command")
        frame = self.wait_frame(events, lambda f: f["type"] == "message")
        self.assertEqual(frame["text"], "/not a command")

    def test_log_is_read_only(self):
        window = self.open_window()
        before = self.log_text(window)
        window.log.insert("end", "typed into the log")  # a disabled Text ignores inserts
        self.assertEqual(self.log_text(window), before)
        self.assertEqual(str(window.log.cget("state")), "disabled")

    def test_log_follows_new_messages_unless_scrolled_up(self):
        window = self.open_window()
        window.root.deiconify()
        peer, _ = self.add_peer()
        for number in range(60):
            peer.say("line %d" % number)
        self.pump_until(lambda: "line 59" in self.log_text(window), "messages not shown")
        self.root.update()
        self.assertGreaterEqual(window.log.yview()[1], 0.999, "the log follows new messages")
        window.log.yview_moveto(0.0)
        self.root.update()
        top_before = window.log.yview()[0]
        peer.say("a late line")
        self.pump_until(lambda: "a late line" in self.log_text(window), "late message not shown")
        self.root.update()
        self.assertEqual(window.log.yview()[0], top_before, "a scrolled-up log stays where it is")

    def test_emoji_and_astral_characters_never_crash_and_go_unchanged_on_the_wire(self):
        window = self.open_window()
        peer, events = self.add_peer()
        text = "party \U0001F389 and \u00e9\u4e2d"
        self.type_and_press(window, text)
        frame = self.wait_frame(events, lambda f: f["type"] == "message")
        self.assertEqual(frame["text"], text)
        window.astral_ok = False  # as on Tk before 8.6.10
        peer.say("cake \U0001F382")
        self.pump_until(lambda: "cake \ufffd" in self.log_text(window), "replacement not shown")
        self.assertEqual(localchat.displayable("a\U0001F382b", False), "a\ufffdb")
        self.assertEqual(localchat.displayable("a\U0001F382b", True), "a\U0001F382b")
        self.assertTrue(localchat.tk_shows_astral("8.6.13"))
        self.assertFalse(localchat.tk_shows_astral("8.6.9"))
        self.assertFalse(localchat.tk_shows_astral("8.5.19"))

    def test_refused_connection_names_address_and_firewall(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        window = self.open_window(port=free_port, connected=False)
        self.pump_until(lambda: "firewall" in str(window.status.cget("text")), "no refusal sentence")
        status = str(window.status.cget("text"))
        self.assertIn("127.0.0.1:%d" % free_port, status)
        self.assertIn("Could not connect", self.log_text(window))
        self.assertNotIn("Traceback", self.log_text(window))
        window.input.insert("end", "nobody hears this")
        window.send_button.invoke()
        self.assertIn("not sent", self.log_text(window))
        self.assertEqual(window.input.get("1.0", "end-1c"), "nobody hears this", "the draft is kept")
        top = window.root
        window.input.event_generate("<Escape>")  # not connected: closes without asking
        self.assertFalse(top.winfo_exists())

    def test_name_taken_is_shown_as_a_sentence(self):
        self.add_peer("alice")
        window = self.open_window("ALICE", connected=False)
        self.pump_until(lambda: "already taken" in self.log_text(window), "no name-taken sentence")
        self.assertFalse(window.connected)

    def test_server_gone_shows_in_the_status_line(self):
        window = self.open_window()
        self.server.stop()
        self.pump_until(lambda: "Disconnected" in str(window.status.cget("text")), "loss not shown")
        self.assertIn("shutting down", self.log_text(window))
        self.assertFalse(window.connected)

    def test_title_names_user_and_server(self):
        window = self.open_window()
        title = window.root.title()
        self.assertIn("alice", title)
        self.assertIn("127.0.0.1:%d" % self.server.port, title)
        self.assertIn("Connected to 127.0.0.1:%d" % self.server.port, str(window.status.cget("text")))
        self.assertEqual(str(window.root.focus_get()), str(window.input))


if __name__ == "__main__":
    unittest.main()
