#!/usr/bin/env python3
"""LocalChat: a chat for one local network in one file, with no internet, accounts or installation.

Usage:
    python3 localchat.py server [--host 0.0.0.0] [--port 13333] [--quiet]
    python3 localchat.py NAME [--server HOST[:PORT]]           (the chat window)
    python3 localchat.py NAME --cli [--server HOST[:PORT]]     (a line client)

Sections:
    1. Constants
    2. Errors
    3. Protocol: wire format, frames, limits
    4. Core: users, fan-out (no sockets, no JSON)
    5. Transport: per-connection outboxes and the writer thread
    6. Doors: JSON lines
    7. Server: accept, threads, shutdown
    8. Client connection (no Tk)
    9. Tk window
    10. Terminal client
    11. Command line
"""

__version__ = "1.0"

import argparse
import collections
import errno
import json
import logging
import os
import queue
import secrets
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import unicodedata
import zlib

# =============================================================================
# 1. Constants
# =============================================================================

DEFAULT_PORT = 13333
DEFAULT_HOST = "0.0.0.0"
DEFAULT_CLIENT_HOST = "127.0.0.1"
PROTOCOL_VERSION = 1

MAX_LINE_BYTES = 64 * 1024        # one frame, newline included
MAX_TEXT_BYTES = 32000            # message text in UTF-8; even fully escaped it fits one line
MAX_NAME_CHARS = 32               # user names are 1 to this many characters
MAX_REF_CHARS = 64                # a client's own reference for a message, echoed back
RECV_BYTES = 64 * 1024            # one recv() call

HELLO_TIMEOUT_S = 10.0            # a connection must say hello within this
IDLE_PING_S = 30.0                # the server pings a connection silent this long; a second
                                  # silent period of the same length drops it as timed out
MAX_OUTBOX_BYTES = 4 * 1024 * 1024  # unsent bytes a client may owe before it is dropped as too slow
ERROR_LIMIT = 10                  # protocol errors allowed in ERROR_WINDOW_S before disconnecting
ERROR_WINDOW_S = 60.0
CLOSE_FLUSH_S = 2.0               # how long a closing connection waits for its last frames to go out
LINGER_S = 1.0                    # after the last frame, how long to read and discard before closing
SHUTDOWN_FLUSH_S = 0.5            # at shutdown, how long to wait for the goodbye frames
LISTEN_BACKLOG = 1024             # pending connections the kernel queues for accept()
SESSION_STACK_BYTES = 512 * 1024  # stack of each connection thread (touched pages only cost memory)

CONNECT_TIMEOUT_S = 5.0           # client: connecting and waiting for the welcome
CLIENT_PING_S = 20.0              # client: ping the server after this much silence
CLIENT_DEAD_S = 65.0              # client: the connection is lost after this much silence

# =============================================================================
# 2. Errors
# =============================================================================


class LocalChatError(Exception):
    """Base class of every error LocalChat raises on purpose."""


class ProtocolError(LocalChatError):
    """The peer sent something wrong: it gets an error frame with a stable code.

    `fatal` errors close the connection after the error frame is sent.
    """

    def __init__(self, code, text, fatal=False):
        super().__init__(text)
        self.code = code
        self.text = text
        self.fatal = fatal


class UserError(LocalChatError):
    """Bad input or settings, shown to a person as one sentence, never as a traceback."""


# =============================================================================
# 3. Protocol: wire format, frames, limits
# =============================================================================
#
# Runs on any thread: these functions keep no state.

PROTOCOL_DOC = """LocalChat protocol, version 1.

Transport: TCP (default port 13333). Each frame is one JSON object on one line,
UTF-8, ended by "\\n" (a "\\r\\n" is accepted), at most 65536 bytes with the newline.
Empty lines are ignored. Every frame has a string field "type". Fields a
receiver does not know are ignored, so both sides may add fields.

Client to server:
  {"type":"hello","name":"alice","version":1}  first frame, within 10 s
  {"type":"say","text":"hi","ref":"c1"}        text: 1-32000 bytes of UTF-8, may hold
                                               newlines and tabs, no other control
                                               characters; "ref" (optional, up to
                                               64 printable characters) comes back
                                               in the echo
  {"type":"users"}                              ask for the user list
  {"type":"ping","token":"x"}                   the server answers pong (token echoed)
  {"type":"pong"}                               the answer to a server ping
  {"type":"bye"}                                leave; the server answers bye and closes

Server to client:
  {"type":"welcome","name":"alice","users":["alice","bob"],"server":"host",
   "version":1,"max_text_bytes":32000}
  {"type":"message","id":17,"ts":1732435200.5,"from":"alice","text":"hi"}
        sent to everyone, the sender included: the echo confirms delivery.
        "id" is assigned by the server and increases; "from" is set by the server.
  {"type":"joined","name":"bob","ts":...}
  {"type":"left","name":"bob","reason":"quit","ts":...}
        reason: quit, lost (connection broke), timeout (no answer to pings),
        too_slow (did not read fast enough), error (too many bad frames),
        shutdown (the server stopped)
  {"type":"users","users":["alice","bob"]}
  {"type":"ping"}    answer with pong (any frame will do) within 30 s
  {"type":"pong","token":"x"}
  {"type":"error","code":"name_taken","text":"a sentence for a person","fatal":true}
        fatal errors are followed by the server closing the connection
  {"type":"bye","reason":"quit"|"shutdown","text":"a sentence"}  then the server closes

Error codes: bad_utf8, bad_json, not_object, bad_type, unknown_type, bad_field,
hello_first, already_joined, bad_version, bad_name, name_taken, empty_text,
text_too_long, bad_text, line_too_long (fatal), too_many_errors (fatal),
hello_timeout (fatal), shutting_down (fatal: a hello while the server stops).
"""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder()


def encode_frame(fields):
    """Return one frame as bytes: compact JSON, UTF-8, newline-terminated."""
    return _ENCODER.encode(fields).encode("utf-8") + b"\n"


def parse_frame(line):
    """Return the frame (a dict with a string "type") held in one line of bytes.

    The line comes without its newline. Raises ProtocolError for anything else.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "The line is not valid UTF-8.") from None
    try:
        frame = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "The line is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise ProtocolError("not_object", "Each line must be a JSON object.")
    if not isinstance(frame.get("type"), str):
        raise ProtocolError("bad_type", 'Each frame needs a string field "type".')
    return frame


def frame_field(frame, key, kind, required=True):
    """Return frame[key] if it is of `kind`, None if absent and optional; else raise bad_field."""
    value = frame.get(key)
    if value is None and not required:
        return None
    # bool is an int in Python, but true is no version number.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError("bad_field", 'The field "%s" is missing or of the wrong type.' % key)
    return value


def split_host_port(text, default_port=DEFAULT_PORT):
    """Return (host, port) from "host", "host:port", "[v6]:port" or "v6"; raise UserError."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        port = int(port)
    except ValueError:
        raise UserError("'%s' is not a valid port number." % port) from None
    if not host or not 0 < port < 65536:
        raise UserError("'%s' is not a valid server address; use HOST or HOST:PORT." % text)
    return host, port


def printable(text, limit=80):
    """Return text made safe for one log line: control characters escaped, length capped."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


# =============================================================================
# 4. Core: users, fan-out (no sockets, no JSON)
# =============================================================================
#
# The ChatHub holds who is here and hands each event to its recipients. It runs on
# whichever thread calls it (a connection's reader thread); one lock guards its
# state. A member is any object with a `deliver(event)` method that never blocks
# and never calls back into the hub: every door (JSON lines today) provides one.


def name_key(name):
    """Return the form in which two names count as the same: case and width folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_name(name):
    """Raise ProtocolError unless `name` is a valid user name.

    A name is 1-32 characters, each a letter or digit of any script, or one of
    "_", "-", "." (so names never hold spaces, quotes or control characters).
    """
    if not isinstance(name, str):
        raise ProtocolError("bad_field", 'The field "name" must be a string.')
    if not 1 <= len(name) <= MAX_NAME_CHARS or not all(ch.isalnum() or ch in "_-." for ch in name):
        raise ProtocolError(
            "bad_name",
            "A name is 1 to %d letters, digits, '_', '-' or '.', without spaces." % MAX_NAME_CHARS,
        )


_ALLOWED_CONTROLS = frozenset("\n\t")


def clean_text(text):
    """Return a message text with line ends made "\\n"; raise ProtocolError if unfit."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ProtocolError("empty_text", "The message is empty.")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError("bad_text", "The message holds invalid characters (lone surrogates).") from None
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(
            "text_too_long", "The message is %d bytes; the limit is %d." % (size, MAX_TEXT_BYTES)
        )
    if not text.isprintable() and any(
        unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS for ch in text
    ):
        raise ProtocolError("bad_text", "The message holds control characters.")
    return text


class Event:
    """One thing that happened, as plain fields; each door encodes it once, for everybody."""

    __slots__ = ("fields", "_encoded")

    def __init__(self, fields):
        self.fields = fields
        self._encoded = {}

    def encoded(self, encoder):
        """Return encoder(fields), computed on first use and then reused."""
        data = self._encoded.get(encoder)
        if data is None:
            data = self._encoded[encoder] = encoder(self.fields)
        return data


def _now():
    return round(time.time(), 3)


class ChatHub:
    """Who is in the chat, and the fan-out of everything said to them."""

    def __init__(self, server_name="LocalChat"):
        self.server_name = server_name
        # Guards everything below. Deliveries happen while it is held, so every member
        # sees events in one order; deliver() only queues bytes, so this stays short.
        self.lock = threading.Lock()
        self._members = {}  # name_key -> member
        self._next_id = 1
        self._closed = False

    def join(self, member, name):
        """Add member under `name`, welcome it and tell the others; raise ProtocolError."""
        check_name(name)
        key = name_key(name)
        with self.lock:
            if self._closed:
                raise ProtocolError("shutting_down", "The server is shutting down.", fatal=True)
            if key in self._members:
                raise ProtocolError(
                    "name_taken",
                    "The name '%s' is already taken here. Please choose another name." % name,
                    fatal=True,
                )
            member.name = name
            self._members[key] = member
            member.deliver(Event(self._welcome_fields(name)))
            self._broadcast(Event({"type": "joined", "name": name, "ts": _now()}), skip=member)

    def _welcome_fields(self, name):
        return {
            "type": "welcome",
            "name": name,
            "users": self._user_names(),
            "server": self.server_name,
            "version": PROTOCOL_VERSION,
            "max_text_bytes": MAX_TEXT_BYTES,
            "ts": _now(),
        }

    def _user_names(self):
        return sorted((m.name for m in self._members.values()), key=name_key)

    def say(self, member, text, ref=None):
        """Send a message from member to everybody, member included (the echo confirms it)."""
        text = clean_text(text)
        with self.lock:
            if self._members.get(name_key(member.name)) is not member:
                return
            fields = {"type": "message", "id": self._next_id, "ts": _now(), "from": member.name, "text": text}
            if ref is not None:
                fields["ref"] = ref
            self._next_id += 1
            self._broadcast(Event(fields))

    def users(self, member):
        """Send member the list of users."""
        with self.lock:
            member.deliver(Event({"type": "users", "users": self._user_names()}))

    def leave(self, member, reason):
        """Remove member (if it joined) and tell the others why it left."""
        with self.lock:
            name = getattr(member, "name", None)
            if name is None or self._members.get(name_key(name)) is not member:
                return False
            del self._members[name_key(name)]
            if not self._closed:
                self._broadcast(Event({"type": "left", "name": name, "reason": reason, "ts": _now()}))
            return True

    def close(self, text="The server is shutting down."):
        """Tell every member goodbye; from now on nobody may join."""
        with self.lock:
            self._closed = True
            self._broadcast(Event({"type": "bye", "reason": "shutdown", "text": text}))

    def count(self):
        with self.lock:
            return len(self._members)

    def _broadcast(self, event, skip=None):
        """Deliver event to every member but `skip`. Called with the lock held."""
        for member in self._members.values():
            if member is not skip:
                member.deliver(event)


# =============================================================================
# 5. Transport: per-connection outboxes and the writer thread
# =============================================================================
#
# Readers never write to sockets. Each connection has an Outbox that collects the
# bytes owed to it (filled under the hub's lock); one SocketWriter thread sends
# them without blocking, joining all frames pending for a connection into one
# send(). A slow connection only grows its own outbox, up to a bound.


class Outbox:
    """The bytes owed to one connection, and the state of their sending."""

    __slots__ = (
        "sock", "writer", "chunks", "pending_bytes", "unsent", "unsent_bytes",
        "queued", "closing", "failed", "drained",
    )

    def __init__(self, sock, writer):
        self.sock = sock  # a duplicate of the connection's socket, non-blocking, the writer's own
        self.writer = writer
        self.chunks = []  # frames not yet handed to the writer (guarded by the writer's lock)
        self.pending_bytes = 0
        self.unsent = b""  # what the writer has taken but the kernel has not accepted yet
        self.unsent_bytes = 0
        self.queued = False  # on the writer's list of outboxes with news
        self.closing = False  # no more frames: close once everything is sent
        self.failed = None  # why the connection is over ("too_slow", "lost"), else None
        self.drained = threading.Event()  # set when the writer is done with this outbox

    def push(self, data):
        """Queue bytes for sending. Called with the writer's lock held; never blocks."""
        if self.closing or self.failed:
            return
        self.chunks.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes + self.unsent_bytes > self.writer.max_outbox_bytes:
            self.failed = "too_slow"
            self.chunks = []
        if not self.queued:
            self.queued = True
            self.writer.note(self)

    def put(self, data):
        """Queue bytes for sending from any thread (takes the writer's lock)."""
        with self.writer.lock:
            self.push(data)

    def finish(self):
        """Send what is queued, then let the writer close its socket. Any thread."""
        with self.writer.lock:
            self.closing = True
            if not self.queued:
                self.queued = True
                self.writer.note(self)


class SocketWriter:
    """One thread that sends every connection's outbox without ever blocking on one."""

    def __init__(self, lock, max_outbox_bytes=MAX_OUTBOX_BYTES):
        self.lock = lock  # the hub's lock: outboxes are filled under it
        self.max_outbox_bytes = max_outbox_bytes
        self._news = []  # outboxes with new frames or state, appended under the lock
        self._asleep = False  # the thread waits in select(); note() must wake it
        self._selector = selectors.DefaultSelector()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._selector.register(self._wake_recv, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._writer_loop, name="writer", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout=2.0):
        """End the writer thread once it has dealt with what is queued."""
        with self.lock:
            self._stopping = True
            self._wake()
        self._thread.join(timeout)
        self._selector.close()
        self._wake_recv.close()
        self._wake_send.close()

    def note(self, box):
        """Put box on the list of outboxes with news. Called with the lock held."""
        self._news.append(box)
        if self._asleep:
            self._wake()

    def _wake(self):
        self._asleep = False
        try:
            self._wake_send.send(b"\0")
        except OSError:  # the buffer is full: a wake-up is already pending
            pass

    def _writer_loop(self):
        """Runs on the writer thread: take news, send, wait for news or writable sockets."""
        while True:
            with self.lock:
                self._asleep = False
                news, self._news = self._news, []
                for box in news:
                    self._take(box)
                if not news:
                    if self._stopping:
                        break
                    self._asleep = True
            for box in news:
                self._send(box)
            if not news:
                self._wait()
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._close(key.data)

    def _take(self, box):
        """Move box's new frames behind its unsent bytes. Called with the lock held."""
        box.queued = False
        if box.chunks:
            box.unsent += b"".join(box.chunks)
            box.chunks = []
            box.pending_bytes = 0
            box.unsent_bytes = len(box.unsent)

    def _send(self, box):
        """Send as much of box.unsent as the kernel takes now; watch the socket for the rest."""
        if box.drained.is_set():
            return
        if box.failed is None and box.unsent:
            try:
                sent = box.sock.send(box.unsent)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                box.failed = "lost"
                sent = 0
            if sent:
                box.unsent = box.unsent[sent:]
                box.unsent_bytes = len(box.unsent)
        # Frames pushed while we sent (the last ones, before finish()) wait in chunks:
        # closing now would drop them. They are on the news list, so we come back.
        if box.failed is not None or (box.closing and not box.unsent and not box.chunks):
            self._close(box)
        else:
            self._watch(box, bool(box.unsent))

    def _watch(self, box, writable):
        """Have select() tell us when box's socket can take more, or stop that."""
        registered = box.sock in self._selector.get_map()
        if writable and not registered:
            self._selector.register(box.sock, selectors.EVENT_WRITE, box)
        elif not writable and registered:
            self._selector.unregister(box.sock)

    def _close(self, box):
        """Done with box: close the writer's socket, and on failure wake the session's reader."""
        self._watch(box, False)
        if box.failed is not None:
            try:
                box.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        box.sock.close()
        box.drained.set()

    def _wait(self):
        """Sleep until a wake-up byte arrives or a watched socket becomes writable."""
        for key, _ in self._selector.select():
            if key.data is None:
                try:
                    while self._wake_recv.recv(4096):
                        pass
                except OSError:
                    pass
            else:
                self._send(key.data)


# =============================================================================
# 6. Doors: JSON lines
# =============================================================================
#
# A door turns one kind of connection into calls on the hub, and the hub's events
# back into bytes. JsonLinesSession is the door for this file's own clients and for
# anything else that speaks the protocol above. Each runs on its connection's thread.

log = logging.getLogger("localchat")

_BEFORE_HELLO = frozenset(["hello", "ping", "pong", "bye"])


class JsonLinesSession(socketserver.BaseRequestHandler):
    """One connection speaking JSON lines: read frames, dispatch them by type to do_<type>.

    Runs on the connection's own thread, except deliver(), which the hub calls from
    whichever thread holds its lock.
    """

    name = None  # set by the hub when the hello is accepted

    def setup(self):
        self.hub = self.server.hub
        self.peer = "%s:%s" % self.client_address[:2]
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # The writer sends on its own non-blocking duplicate, so this thread's reads
        # can keep a timeout while the writer never waits on a full socket.
        writer_sock = sock.dup()
        writer_sock.setblocking(False)
        self.outbox = Outbox(writer_sock, self.server.writer)
        self._error_times = collections.deque()
        self._silent_periods = 0
        self.server.add_session(self)

    def deliver(self, event):
        """Queue an event for this connection. Called by the hub with its lock held."""
        self.outbox.push(event.encoded(encode_frame))

    def send_frame(self, fields):
        """Queue a frame meant for this connection only."""
        self.outbox.put(encode_frame(fields))

    def handle(self):
        reason = "lost"
        try:
            reason = self._reader_loop()
        finally:
            self._end(reason)

    # -- reading ---------------------------------------------------------------

    def _reader_loop(self):
        """Read lines until the connection ends; return why it ended."""
        sock = self.request
        sock.settimeout(self.server.hello_timeout)
        buffer = bytearray()
        while True:
            try:
                chunk = sock.recv(RECV_BYTES)
            except socket.timeout:
                if self._on_silence():
                    continue
                return "timeout"
            except OSError:
                return "lost"
            if not chunk:
                return "lost"
            self._silent_periods = 0
            buffer += chunk
            reason = self._handle_lines(buffer)
            if reason:
                return reason

    def _handle_lines(self, buffer):
        """Handle each complete line in buffer and remove it; return a reason to stop, or None."""
        start = 0
        try:
            while True:
                end = buffer.find(b"\n", start)
                if end < 0:
                    break
                if end - start >= MAX_LINE_BYTES:
                    raise ProtocolError("line_too_long", self._too_long_text(), fatal=True)
                line = bytes(buffer[start:end]).rstrip(b"\r")
                start = end + 1
                if line.strip():
                    reason = self._handle_line(line)
                    if reason:
                        return reason
            if len(buffer) - start >= MAX_LINE_BYTES:
                raise ProtocolError("line_too_long", self._too_long_text(), fatal=True)
        except ProtocolError as error:
            return self._on_protocol_error(error)
        finally:
            del buffer[:start]
        return None

    @staticmethod
    def _too_long_text():
        return "A line may hold at most %d bytes; closing the connection." % MAX_LINE_BYTES

    def _handle_line(self, line):
        """Dispatch one frame to its do_<type> method; return a reason to stop, or None."""
        try:
            frame = parse_frame(line)
            kind = frame["type"]
            handler = getattr(self, "do_" + kind, None)
            if handler is None:
                raise ProtocolError("unknown_type", "Unknown frame type '%s'." % printable(kind, 32))
            if self.name is None and kind not in _BEFORE_HELLO:
                raise ProtocolError("hello_first", "Say hello first.")
            return handler(frame)
        except ProtocolError as error:
            return self._on_protocol_error(error)

    def _on_silence(self):
        """The read timed out: ping once, then give up. Return True to keep reading."""
        if self.name is None:
            self._on_protocol_error(
                ProtocolError("hello_timeout", "No hello came in time; closing the connection.", fatal=True)
            )
            return False
        self._silent_periods += 1
        if self._silent_periods > 1:
            return False
        self.send_frame({"type": "ping"})
        return True

    def _on_protocol_error(self, error):
        """Send an error frame; return a reason to stop if it was fatal or one too many."""
        now = time.monotonic()
        self._error_times.append(now)
        while self._error_times[0] < now - ERROR_WINDOW_S:
            self._error_times.popleft()
        if not error.fatal and len(self._error_times) > ERROR_LIMIT:
            error = ProtocolError("too_many_errors", "Too many bad frames; closing the connection.", fatal=True)
        fields = {"type": "error", "code": error.code, "text": error.text}
        if error.fatal:
            fields["fatal"] = True
            log.info("%s: %s (closing)", self.peer, error.code)
        self.send_frame(fields)
        return "error" if error.fatal else None

    # -- frames ----------------------------------------------------------------

    def do_hello(self, frame):
        if self.name is not None:
            raise ProtocolError("already_joined", "You have already joined as %s." % self.name)
        try:
            version = frame_field(frame, "version", int)
            if version < 1:
                raise ProtocolError("bad_version", "Protocol version %d is not supported." % version)
            self.hub.join(self, frame_field(frame, "name", str))
        except ProtocolError as error:
            error.fatal = True  # a refused hello ends the connection
            raise
        self.request.settimeout(self.server.idle_ping)
        log.info("%s joined from %s", self.name, self.peer)
        return None

    def do_say(self, frame):
        text = frame_field(frame, "text", str)
        ref = frame_field(frame, "ref", str, required=False)
        # isprintable() also refuses lone surrogates, which encode_frame could not send back.
        if ref is not None and (len(ref) > MAX_REF_CHARS or not ref.isprintable()):
            raise ProtocolError("bad_field", 'The field "ref" may hold at most %d printable characters.'
                                % MAX_REF_CHARS)
        self.hub.say(self, text, ref)

    def do_users(self, frame):
        self.hub.users(self)

    def do_ping(self, frame):
        reply = {"type": "pong"}
        token = frame.get("token")
        if isinstance(token, (str, int, float)):
            shown = str(token)  # printable: no lone surrogates, which encode_frame could not send
            if len(shown) <= MAX_REF_CHARS and shown.isprintable():
                reply["token"] = token
        self.send_frame(reply)

    def do_pong(self, frame):
        pass  # any frame counts as a sign of life; the read loop has noted it

    def do_bye(self, frame):
        return "quit"

    # -- ending ----------------------------------------------------------------

    def _end(self, reason):
        """Leave the hub, send the last frames, close cleanly. Runs on the session's thread."""
        reason = self.outbox.failed if self.outbox.failed == "too_slow" else reason
        if self.hub.leave(self, reason):
            log.info("%s left (%s)", self.name, reason)
        if reason == "quit":
            self.send_frame({"type": "bye", "reason": "quit", "text": "Goodbye."})
        self.outbox.finish()
        self.outbox.drained.wait(CLOSE_FLUSH_S)
        if reason in ("quit", "error", "timeout"):
            self._linger()
        self.server.remove_session(self)

    def _linger(self):
        """Half-close, then read and discard until the peer closes or LINGER_S passes.

        Closing a socket with unread input sends a reset, which can destroy the last
        frames before the peer reads them (a client flooding us would never see why
        it was dropped); reading the rest first lets them arrive.
        """
        sock = self.request
        deadline = time.monotonic() + LINGER_S
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                if not sock.recv(RECV_BYTES):
                    break
        except OSError:
            pass


# =============================================================================
# 7. Server: accept, threads, shutdown
# =============================================================================
#
# ChatServer accepts on the thread running serve_forever() and gives every
# connection a thread of its own; stop() is called from another thread.


class ChatServer(socketserver.ThreadingTCPServer):
    """The threaded TCP server: a JSON-lines session per connection, one writer thread."""

    daemon_threads = True
    allow_reuse_address = os.name != "nt"  # on Windows it would let two servers share a port
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address=(DEFAULT_HOST, DEFAULT_PORT), hub=None, hello_timeout=HELLO_TIMEOUT_S,
                 idle_ping=IDLE_PING_S, max_outbox_bytes=MAX_OUTBOX_BYTES):
        self.hub = hub or ChatHub(socket.gethostname())
        self.hello_timeout = hello_timeout
        self.idle_ping = idle_ping
        self.internal_errors = 0  # tracebacks caught at the session boundary
        self._sessions = set()
        self._session_threads = set()
        self._state_lock = threading.Lock()
        self._serving = threading.Event()
        self._stopped = False
        super().__init__(address, JsonLinesSession)
        self.writer = SocketWriter(self.hub.lock, max_outbox_bytes)
        self.writer.start()

    @property
    def port(self):
        return self.server_address[1]

    def serve_forever(self, poll_interval=0.2):
        self._serving.set()
        super().serve_forever(poll_interval)

    def process_request(self, request, client_address):
        """Start the connection's thread, named after the peer."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="session-%s:%s" % client_address[:2],
            daemon=True,
        )
        with self._state_lock:
            self._session_threads.add(thread)
        thread.start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._state_lock:
                self._session_threads.discard(threading.current_thread())

    def handle_error(self, request, client_address):
        """A session raised: log one line with the peer's address and keep serving."""
        self.internal_errors += 1
        error = sys.exc_info()[1]
        log.error("%s:%s: internal error: %r", client_address[0], client_address[1], error, exc_info=True)

    def add_session(self, session):
        with self._state_lock:
            self._sessions.add(session)

    def remove_session(self, session):
        with self._state_lock:
            self._sessions.discard(session)

    def session_count(self):
        with self._state_lock:
            return len(self._sessions)

    def stop(self, timeout=2.0):
        """Say goodbye to every client, close every socket and join the threads.

        Call from another thread than serve_forever(). Safe to call twice.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            sessions = list(self._sessions)
        deadline = time.monotonic() + timeout
        self.hub.close()
        for session in sessions:
            session.outbox.finish()
        for session in sessions:
            session.outbox.drained.wait(max(0.0, min(SHUTDOWN_FLUSH_S, deadline - time.monotonic())))
        if self._serving.is_set():
            self.shutdown()
        for session in sessions:
            try:
                session.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()
        with self._state_lock:
            threads = list(self._session_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.writer.stop(max(0.1, deadline - time.monotonic()))


def lan_addresses():
    """Return this computer's IPv4 addresses that others on the network could reach."""
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM):
            found.add(info[4][0])
    except OSError:
        pass
    # Connecting a UDP socket sends nothing: it only asks the routing table which
    # local address would be used, which finds the LAN address when the host name
    # resolves to 127.0.1.1 (as on Debian).
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))
        found.add(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    return sorted(a for a in found if not a.startswith(("127.", "0.", "169.254.")))


def bind_error_sentence(error, host, port):
    """Return one sentence saying why the server could not listen on host:port."""
    if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
        return ("port %d is already in use on this computer: is another LocalChat server running? "
                "Stop it, or choose another port with --port." % port)
    if error.errno in (errno.EACCES, getattr(errno, "WSAEACCES", -1)):
        return "not allowed to listen on port %d; choose a port above 1024 with --port." % port
    if error.errno in (errno.EADDRNOTAVAIL, getattr(errno, "WSAEADDRNOTAVAIL", -1)):
        return "this computer has no address %s; leave out --host to listen on all of them." % host
    return "could not listen on %s:%d: %s." % (host, port, error.strerror or error)



def raise_open_file_limit():
    """Let the process hold as many sockets as the system allows (each client needs two)."""
    try:
        import resource  # Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def print_join_instructions(server, host):
    """Print where the server listens and the command the others should run."""
    port = server.port
    print("LocalChat %s server listening on %s:%d" % (__version__, host, port))
    if host in ("", "0.0.0.0", "::"):
        addresses = lan_addresses()
    elif host.startswith("127.") or host == "localhost":
        addresses = []
        print("Only this computer can join: it listens on %s." % host)
    else:
        addresses = [host]
    suffix = "" if port == DEFAULT_PORT else ":%d" % port
    if addresses:
        print("People on this network can join with:")
        for address in addresses:
            print("    python3 localchat.py YOUR-NAME --server %s%s" % (address, suffix))
    elif host in ("", "0.0.0.0", "::"):
        print("No network address found: is this computer connected to the network?")
    print("On this computer: python3 localchat.py YOUR-NAME%s" % (" --server 127.0.0.1" + suffix if suffix else ""))
    print("Stop the server with Ctrl+C.")
    sys.stdout.flush()


def run_server(args):
    """Run the server until Ctrl+C or SIGTERM; return the exit code."""
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    raise_open_file_limit()
    threading.stack_size(SESSION_STACK_BYTES)
    try:
        server = ChatServer((args.host, args.port))
    except OSError as error:
        raise UserError(bind_error_sentence(error, args.host, args.port)) from None
    # SIGTERM goes Ctrl+C's way. Set before the address is printed: whoever reads it may
    # signal at once. Not a handler that sets an Event: it runs on the main thread, maybe
    # while that thread holds the same Event's lock inside wait(), and would deadlock.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print_join_instructions(server, args.host)
    log.info("server started on %s:%d", args.host, server.port)
    accept_thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    try:
        accept_thread.start()  # inside the try: a signal the moment clients can join still stops cleanly
        while True:
            time.sleep(0.5)  # in steps, so Ctrl+C is seen on Windows too
    except KeyboardInterrupt:
        pass
    log.info("shutting down")
    server.stop()
    if accept_thread.is_alive():
        accept_thread.join(1.0)
    log.info("server stopped")
    return 0


# =============================================================================
# 8. Client connection (no Tk)
# =============================================================================
#
# ChatConnection is what both clients use: connect and hello on the caller's
# thread, then a reader thread hands every frame to a callback. It knows nothing
# of Tk, so the tests drive it over real sockets without a display.


def connect_error_sentence(error, host, port):
    """Return one sentence for a person saying why connecting to host:port failed."""
    where = "%s:%d" % (host, port)
    if isinstance(error, socket.gaierror):
        return "Could not find the computer '%s'. Check the name, or use its IP address." % host
    if isinstance(error, ConnectionRefusedError):
        return ("Could not connect to %s: nothing answered there. Is the LocalChat server running on "
                "that computer, and does its firewall allow TCP port %d?" % (where, port))
    if isinstance(error, socket.timeout):
        return ("Could not connect to %s: no answer within %d seconds. Is the address right, is the "
                "server running, and does a firewall allow TCP port %d?" % (where, CONNECT_TIMEOUT_S, port))
    return ("Could not connect to %s: %s. Is the server running, and does a firewall allow TCP port %d?"
            % (where, error.strerror or error, port))


class ChatConnection:
    """A client's connection to a LocalChat server.

    connect() blocks (call it off the Tk thread); afterwards a reader thread calls
    on_event(frame) for every frame the server sends, and finally on_event with
    {"type": "disconnected", "text": ..., "expected": bool} once. send() may be
    called from any thread.
    """

    def __init__(self, host, port, name, on_event=None):
        self.host = host
        self.port = port
        self.name = name
        self.on_event = on_event or (lambda frame: None)
        self.welcome = None
        self._sock = None
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._closing = False
        self._reader = None
        self._sender = None
        self._outgoing = queue.Queue()  # frames for the sender thread (see post())

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def connect(self, timeout=CONNECT_TIMEOUT_S):
        """Connect, say hello and wait for the welcome; return it or raise UserError."""
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self.send({"type": "hello", "name": self.name, "version": PROTOCOL_VERSION})
            frame = self._read_frame()
        except OSError as error:
            self._close_socket()
            raise UserError(connect_error_sentence(error, self.host, self.port)) from None
        except ProtocolError:
            self._close_socket()
            raise UserError("%s does not speak the LocalChat protocol." % self.address) from None
        if frame is None:
            self._close_socket()
            raise UserError("The server at %s closed the connection without welcoming us." % self.address)
        if frame["type"] != "welcome":
            self._close_socket()
            raise UserError(frame.get("text") or "The server at %s refused us." % self.address)
        self.welcome = frame
        self.name = frame.get("name", self.name)
        return frame

    def start(self):
        """Start the reader and sender threads (after connect() succeeded)."""
        self._reader = threading.Thread(target=self._reader_loop, name="reader", daemon=True)
        self._sender = threading.Thread(target=self._sender_loop, name="sender", daemon=True)
        self._reader.start()
        self._sender.start()

    def post(self, fields):
        """Queue a frame for the sender thread; never blocks (for the Tk thread)."""
        self._outgoing.put(fields)

    def send(self, fields):
        """Send one frame; raise OSError if the connection is gone. Any thread."""
        data = encode_frame(fields)
        with self._send_lock:
            if self._sock is None:
                raise OSError(errno.ENOTCONN, "not connected")
            self._sock.sendall(data)

    def say(self, text, ref=None):
        fields = {"type": "say", "text": text}
        if ref is not None:
            fields["ref"] = ref
        self.send(fields)

    def close(self, say_bye=True, wait_s=2.0):
        """Leave: send what is posted and a bye (if asked), then close the socket.

        Waits at most wait_s for the sender and reader threads.
        """
        self._closing = True
        if say_bye:
            self._outgoing.put({"type": "bye"})
        self._outgoing.put(None)
        if self._sender is not None:
            self._sender.join(wait_s)
        elif say_bye:
            self._send_quietly({"type": "bye"})
        self._close_socket()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(wait_s)

    def _sender_loop(self):
        """Runs on the sender thread: send posted frames in order until None comes."""
        while True:
            fields = self._outgoing.get()
            if fields is None or not self._send_quietly(fields):
                return

    def _send_quietly(self, fields):
        """Send; return False if the connection is gone (the reader thread reports it)."""
        try:
            self.send(fields)
            return True
        except OSError:
            return False

    def _close_socket(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _read_frame(self):
        """Return the next frame, or None once the server has closed. Blocks."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[:end + 1]
                if line.strip():
                    return parse_frame(line)
                continue
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ProtocolError("line_too_long", "The server sent an over-long line.")
            sock = self._sock
            if sock is None:
                return None
            chunk = sock.recv(RECV_BYTES)
            if not chunk:
                return None
            self._buffer += chunk

    def _reader_loop(self):
        """Runs on the reader thread: hand each frame to on_event; ping when quiet."""
        text, expected = "The server closed the connection.", False
        silent_since = time.monotonic()
        try:
            sock = self._sock
            if sock is None:
                raise OSError(errno.ENOTCONN, "not connected")
            sock.settimeout(CLIENT_PING_S)
            while True:
                try:
                    frame = self._read_frame()
                except socket.timeout:
                    if time.monotonic() - silent_since > CLIENT_DEAD_S:
                        text = "The server stopped answering."
                        break
                    self.send({"type": "ping"})
                    continue
                silent_since = time.monotonic()
                if frame is None:
                    break
                if frame["type"] == "ping":
                    self.send({"type": "pong"})
                    continue
                if frame["type"] == "bye":
                    expected = frame.get("reason") == "quit"
                    text = frame.get("text") or text
                self.on_event(frame)
        except (OSError, ProtocolError):
            text = "The connection to the server was lost."
        finally:
            self._close_socket()
            expected = expected or self._closing
            self.on_event({"type": "disconnected", "text": text, "expected": expected})



# What a person types, for both clients.

HELP_TEXT = ("Commands: /users lists who is here, /quit leaves, /help shows this. "
             "To send text that starts with /, start it with //.")

COMMANDS = ("/users", "/quit", "/help")

_LEFT_WORDS = {
    "quit": "left",
    "lost": "lost the connection",
    "timeout": "timed out",
    "too_slow": "could not keep up and was disconnected",
    "error": "was disconnected for sending bad data",
    "shutdown": "left as the server shut down",
}


def parse_input(line):
    """Return (command, argument) for a line typed by a person.

    command is "say", "users", "quit", "help" or "unknown" (argument: a sentence),
    or None for a blank line. Text starting with // is sent starting with /.
    """
    if not line.strip():
        return None, None
    if line.startswith("//"):
        return "say", line[1:]
    if not line.startswith("/"):
        return "say", line
    word = line.split(None, 1)[0].lower()
    if word in COMMANDS:
        return word[1:], None
    return "unknown", "Unknown command %s. Type /help for the list." % word.split("\n")[0][:40]


def notice_text(frame):
    """Return the sentence shown for a frame other than a message, or None."""
    kind = frame.get("type")
    if kind == "joined":
        return "%s joined" % frame.get("name")
    if kind == "left":
        reason = frame.get("reason")
        return "%s %s" % (frame.get("name"), _LEFT_WORDS.get(reason, "left (%s)" % reason))
    if kind == "users":
        users = frame.get("users") or []
        return "%d here: %s" % (len(users), ", ".join(users))
    if kind == "welcome":
        users = frame.get("users") or []
        return "Welcome, %s! %d here: %s" % (frame.get("name"), len(users), ", ".join(users))
    if kind in ("error", "bye", "disconnected"):
        return frame.get("text") or kind
    return None


def clock(ts=None):
    """Return local time as HH:MM:SS for a timestamp (now if None)."""
    return time.strftime("%H:%M:%S", time.localtime(ts if isinstance(ts, (int, float)) else None))


# =============================================================================
# 9. Tk window
# =============================================================================
#
# ChatWindow runs on the Tk thread only. The connection's threads put frames on
# a queue that an after() poll drains; connecting happens on a worker thread.
# tkinter is imported by run_window(), so the server runs where Tk is missing.

POLL_INTERVAL_MS = 50       # how often the window drains the event queue
EVENTS_PER_POLL = 500       # at most this many events per drain, so typing stays responsive
INPUT_HISTORY = 100         # sent lines that Up/Down can recall
NAME_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                "#17becf", "#bcbd22", "#ff7f0e", "#393b79", "#637939", "#843c39")


def name_colour(name):
    """Return the colour a name is always shown in (the same on every computer)."""
    return NAME_COLOURS[zlib.crc32(name_key(name).encode("utf-8")) % len(NAME_COLOURS)]


def tk_shows_astral(patchlevel):
    """Return True if a Tk of this patch level can show characters above U+FFFF."""
    parts = []
    for part in patchlevel.replace("b", ".").replace("a", ".").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts) >= (8, 6, 10)


def displayable(text, astral_ok):
    """Return text ready for a Tk widget: old Tks get U+FFFD for characters above U+FFFF."""
    if astral_ok or all(ord(ch) <= 0xFFFF for ch in text):
        return text
    return "".join(ch if ord(ch) <= 0xFFFF else "\ufffd" for ch in text)


def mentions(text, name):
    """Return True if text names `name` as a word (with or without @), ignoring case."""
    key = name_key(name)
    folded = name_key(text)
    start = folded.find(key)
    while start >= 0:
        before = folded[start - 1] if start else " "
        end = start + len(key)
        after = folded[end] if end < len(folded) else " "
        if not (before.isalnum() or before in "_-") and not (after.isalnum() or after in "_-"):
            return True
        start = folded.find(key, start + 1)
    return False


class ConfirmDialog:
    """A small question window with two buttons that does not block the event loop."""

    def __init__(self, parent, tk, ttk, title, question, yes, no, on_yes, on_no):
        self.top = tk.Toplevel(parent)
        self.top.title(title)
        self.top.transient(parent)
        self.top.resizable(False, False)
        frame = ttk.Frame(self.top, padding=16)
        frame.pack(fill="both", expand=True)
        ttk.Label(frame, text=question).pack(anchor="w", pady=(0, 12))
        buttons = ttk.Frame(frame)
        buttons.pack(anchor="e")
        self.no_button = ttk.Button(buttons, text=no, command=self._answer(on_no))
        self.yes_button = ttk.Button(buttons, text=yes, command=self._answer(on_yes))
        self.no_button.pack(side="right")
        self.yes_button.pack(side="right", padx=(0, 8))
        self.top.bind("<Return>", lambda event: self.yes_button.invoke())
        self.top.bind("<Escape>", lambda event: self.no_button.invoke())
        self.top.protocol("WM_DELETE_WINDOW", self.no_button.invoke)
        self.yes_button.focus_set()

    def _answer(self, callback):
        def answer():
            self.top.destroy()
            callback()
        return answer


class ChatWindow:
    """The chat window: log, people list, input, status line. Runs on the Tk thread."""

    def __init__(self, root, host, port, name):
        import tkinter
        from tkinter import ttk
        self.tk, self.ttk, self.root = tkinter, ttk, root
        self.connection = ChatConnection(host, port, name, on_event=self._queue_event)
        self.events = queue.Queue()  # frames from the connection's threads
        self.astral_ok = tk_shows_astral(str(root.tk.call("info", "patchlevel")))
        self.connected = False
        self.users = []
        self.history = []
        self._history_index = 0
        self._closing = False
        self._poll_id = None
        self.confirm_dialog = None
        self._ref_prefix = secrets.token_hex(3)
        self._next_ref = 0
        self._build_window()
        self._poll_id = root.after(POLL_INTERVAL_MS, self._poll)
        self._connect()

    # -- building --------------------------------------------------------------

    def _build_window(self):
        root = self.root
        root.title("%s - LocalChat (%s)" % (self.connection.name, self.connection.address))
        root.geometry("760x520")
        root.minsize(420, 300)
        root.protocol("WM_DELETE_WINDOW", self._on_close_request)
        root.bind("<Escape>", lambda event: self._on_close_request())
        style = self.ttk.Style(root)
        if "clam" in style.theme_names() and sys.platform.startswith("linux"):
            style.theme_use("clam")
        self._build_status()
        self._build_input()
        panes = self.ttk.PanedWindow(root, orient="horizontal")
        panes.pack(side="top", fill="both", expand=True, padx=6, pady=(6, 0))
        panes.add(self._build_log(panes), weight=4)
        panes.add(self._build_people(panes), weight=1)
        self.input.focus_set()

    def _build_log(self, parent):
        frame = self.ttk.Frame(parent)
        self.log = self.tk.Text(frame, wrap="word", state="disabled", padx=8, pady=6, font="TkDefaultFont",
                                relief="flat", borderwidth=0, highlightthickness=1, cursor="arrow")
        scrollbar = self.ttk.Scrollbar(frame, command=self.log.yview)
        self.log.configure(yscrollcommand=scrollbar.set)
        scrollbar.pack(side="right", fill="y")
        self.log.pack(side="left", fill="both", expand=True)
        bold = ("TkDefaultFont", 10, "bold")
        self.log.tag_configure("time", foreground="#8a8a8a")
        self.log.tag_configure("name", font=bold)
        self.log.tag_configure("body", lmargin2=24)
        self.log.tag_configure("more", lmargin1=24, lmargin2=24)
        self.log.tag_configure("code", font="TkFixedFont")  # pasted logs and code keep their columns
        self.log.tag_configure("own", background="#eef4ff")
        self.log.tag_configure("mention", background="#fff3b0")
        self.log.tag_configure("notice", foreground="#6b6b6b", font=("TkDefaultFont", 9, "italic"))
        self.log.tag_configure("error", foreground="#b00020")
        return frame

    def _build_people(self, parent):
        frame = self.ttk.Frame(parent)
        self.people_title = self.ttk.Label(frame, text="People")
        self.people_title.pack(side="top", anchor="w", padx=4, pady=(0, 4))
        self.people = self.tk.Listbox(frame, activestyle="none", relief="flat", borderwidth=0,
                                      highlightthickness=1, takefocus=0, width=18)
        self.people.pack(side="top", fill="both", expand=True)
        return frame

    def _build_input(self):
        frame = self.ttk.Frame(self.root)
        frame.pack(side="bottom", fill="x", padx=6, pady=6)
        buttons = self.ttk.Frame(frame)
        buttons.pack(side="right", fill="y", padx=(6, 0))
        self.send_button = self.ttk.Button(buttons, text="Send", command=self._on_send)
        self.users_button = self.ttk.Button(buttons, text="Users", command=self._on_users)
        self.send_button.pack(side="top", fill="x")
        self.users_button.pack(side="top", fill="x", pady=(4, 0))
        self.input = self.tk.Text(frame, height=3, wrap="word", undo=True, padx=6, pady=4,
                                  font="TkDefaultFont", highlightthickness=1)
        self.input.pack(side="left", fill="both", expand=True)
        self.input.bind("<Return>", self._on_return)
        self.input.bind("<KP_Enter>", self._on_return)
        self.input.bind("<Shift-Return>", self._on_shift_return)
        self.input.bind("<Up>", self._on_history_up)
        self.input.bind("<Down>", self._on_history_down)

    def _build_status(self):
        self.status = self.ttk.Label(self.root, text="", anchor="w", padding=(8, 2))
        self.status.pack(side="bottom", fill="x")

    # -- connection --------------------------------------------------------------

    def _connect(self):
        self._set_status("Connecting to %s..." % self.connection.address)
        threading.Thread(target=self._connect_worker, name="connect", daemon=True).start()

    def _connect_worker(self):
        """Runs on the connect thread: connect, then report through the queue."""
        try:
            welcome = self.connection.connect()
        except UserError as error:
            self.events.put({"type": "connect_failed", "text": str(error)})
            return
        self.events.put(welcome)
        self.connection.start()

    def _queue_event(self, frame):
        """Runs on the connection's reader thread: hand the frame to the Tk thread."""
        self.events.put(frame)

    def _poll(self):
        """Drain the event queue, then re-arm while the window is open."""
        self._poll_id = None
        for _ in range(EVENTS_PER_POLL):
            try:
                frame = self.events.get_nowait()
            except queue.Empty:
                break
            handler = getattr(self, "_on_frame_" + str(frame.get("type")), None)
            if handler is not None:
                handler(frame)
        if not self._closing:
            self._poll_id = self.root.after(POLL_INTERVAL_MS, self._poll)

    # -- frames from the server ----------------------------------------------------

    def _on_frame_welcome(self, frame):
        self.connected = True
        self._set_users(frame.get("users") or [])
        self._set_status("Connected to %s as %s" % (self.connection.address, self.connection.name))
        self._add_notice(notice_text(frame))

    def _on_frame_connect_failed(self, frame):
        self._set_status(frame["text"], error=True)
        self._add_notice(frame["text"], tag="error")

    def _on_frame_message(self, frame):
        sender, text = str(frame.get("from")), str(frame.get("text"))
        own = name_key(sender) == name_key(self.connection.name)
        highlight = not own and mentions(text, self.connection.name)
        extra = ("own",) if own else ("mention",) if highlight else ()
        self._add_message(frame.get("ts"), sender, text, extra)
        if highlight:
            self.root.bell()

    def _on_frame_joined(self, frame):
        self._set_users(self.users + [str(frame.get("name"))])
        self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_left(self, frame):
        gone = name_key(str(frame.get("name")))
        self._set_users([u for u in self.users if name_key(u) != gone])
        self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_users(self, frame):
        self._set_users(frame.get("users") or [])
        self._add_notice(notice_text(frame))

    def _on_frame_error(self, frame):
        self._add_notice(notice_text(frame), tag="error")

    def _on_frame_bye(self, frame):
        if frame.get("reason") != "quit":
            self._add_notice(notice_text(frame), tag="error")

    def _on_frame_disconnected(self, frame):
        self.connected = False
        if frame.get("expected"):
            return
        text = frame.get("text") or "The connection was lost."
        self._set_status("Disconnected from %s: %s" % (self.connection.address, text), error=True)
        self._add_notice(text, tag="error")

    # -- showing -----------------------------------------------------------------

    def _set_status(self, text, error=False):
        self.status.configure(text=text, foreground="#b00020" if error else "")

    def _set_users(self, users):
        self.users = sorted(set(users), key=name_key)
        self.people_title.configure(text="People here: %d" % len(self.users))
        self.people.delete(0, "end")
        own = name_key(self.connection.name)
        for index, user in enumerate(self.users):
            label = user + (" (you)" if name_key(user) == own else "")
            self.people.insert("end", displayable(label, self.astral_ok))
            self.people.itemconfigure(index, foreground=name_colour(user))

    def _append(self, pieces):
        """Append (text, tags) pieces to the log; follow the end unless scrolled up."""
        following = self.log.yview()[1] >= 0.999
        self.log.configure(state="normal")
        for text, tags in pieces:
            self.log.insert("end", displayable(text, self.astral_ok), tags)
        self.log.configure(state="disabled")
        if following:
            self.log.see("end")

    def _add_message(self, ts, sender, text, extra=()):
        colour_tag = "colour-" + name_colour(sender)
        self.log.tag_configure(colour_tag, foreground=name_colour(sender))
        first, _, rest = text.partition("\n")
        body = ("body", "code") if rest else ("body",)
        pieces = [("%s " % clock(ts), ("time",) + extra),
                  (sender, ("name", colour_tag) + extra),
                  (": ", ("body",) + extra),
                  (first + ("\n" if rest else ""), body + extra)]
        if rest:
            pieces.append((rest, ("more", "code") + extra))
        pieces.append(("\n", extra))
        self._append(pieces)

    def _add_notice(self, text, ts=None, tag="notice"):
        self._append([("%s " % clock(ts), ("time",)), ("* " + text + "\n", (tag,))])

    # -- what the person does ---------------------------------------------------------

    def _on_return(self, event):
        self._on_send()
        return "break"

    def _on_shift_return(self, event):
        self.input.insert("insert", "\n")
        self.input.see("insert")
        return "break"

    def _on_send(self):
        text = self.input.get("1.0", "end-1c")
        command, argument = parse_input(text)
        if command is None:
            return
        self._remember(text)
        self.input.delete("1.0", "end")
        if command == "say":
            self._say(argument, text)
        elif command == "users":
            self._on_users()
        elif command == "quit":
            self.close()
        elif command == "help":
            self._add_notice(HELP_TEXT)
        else:
            self._add_notice(argument, tag="error")
        self.input.focus_set()

    def _say(self, text, typed):
        if not self.connected:
            self.input.insert("1.0", typed)
            self._add_notice("Not connected: your message was not sent (it is still in the input box).",
                             tag="error")
            return
        self._next_ref += 1
        self.connection.post({"type": "say", "text": text, "ref": "%s-%d" % (self._ref_prefix, self._next_ref)})

    def _on_users(self):
        if self.connected:
            self.connection.post({"type": "users"})
        self.input.focus_set()

    def _remember(self, text):
        if not self.history or self.history[-1] != text:
            self.history.append(text)
            del self.history[:-INPUT_HISTORY]
        self._history_index = len(self.history)

    def _on_history_up(self, event):
        if self.input.compare("insert linestart", "!=", "1.0") or not self.history:
            return None  # move within a multi-line draft as usual
        self._history_index = max(0, self._history_index - 1)
        self._show_history()
        return "break"

    def _on_history_down(self, event):
        if self.input.compare("insert lineend", "!=", "end-1c") or not self.history:
            return None
        self._history_index = min(len(self.history), self._history_index + 1)
        self._show_history()
        return "break"

    def _show_history(self):
        self.input.delete("1.0", "end")
        if self._history_index < len(self.history):
            self.input.insert("1.0", self.history[self._history_index])

    def _on_close_request(self):
        """The X or Escape: ask first while connected; close at once otherwise."""
        if not self.connected:
            self.close()
            return
        if self.confirm_dialog is not None and self.confirm_dialog.top.winfo_exists():
            return
        self.confirm_dialog = ConfirmDialog(
            self.root, self.tk, self.ttk, "Leave LocalChat?",
            "Leave the chat? The others will see that you left.",
            "Leave", "Stay", self.close, self.input.focus_set,
        )

    def close(self):
        """Leave the chat and destroy the window."""
        if self._closing:
            return
        self._closing = True
        if self._poll_id is not None:
            self.root.after_cancel(self._poll_id)
            self._poll_id = None
        self.connection.close(say_bye=self.connected)
        self.root.destroy()


def run_window(args):
    """Open the chat window and run Tk's main loop until it closes."""
    try:
        import tkinter
    except ImportError:
        raise UserError(
            "The chat window needs Tkinter, which this Python does not have: install it (on Debian or "
            "Ubuntu: sudo apt install python3-tk), or use --cli for the line client."
        ) from None
    host, port = split_host_port(args.server)
    try:
        root = tkinter.Tk()
    except tkinter.TclError as error:
        raise UserError("Could not open a window (%s); use --cli for the line client." % error) from None
    ChatWindow(root, host, port, args.name)
    root.mainloop()
    return 0


# =============================================================================
# 10. Terminal client
# =============================================================================
#
# A line client for terminals and scripts. The main thread owns stdout; a stdin
# thread and the connection's reader thread hand it lines and frames by a queue.

CONFIRM_TIMEOUT_S = 10.0  # at the end of input, how long to wait for our messages' echoes


class TerminalClient:
    """Send each stdin line, print each event as one timestamped line."""

    def __init__(self, host, port, name, stdin=None, stdout=None):
        self.connection = ChatConnection(host, port, name, on_event=self._on_event)
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self._inbox = queue.Queue()
        self._pending = set()  # refs of our messages not yet echoed
        self._ref_prefix = secrets.token_hex(3)
        self._next_ref = 0
        self._leaving_since = None
        self._bye_sent = False

    def run(self):
        """Connect and chat until input ends or the connection does; return the exit code."""
        welcome = self.connection.connect()
        self._print(clock(welcome.get("ts")), "* Connected to %s. %s" % (self.connection.address,
                                                                        notice_text(welcome)))
        self.connection.start()
        threading.Thread(target=self._stdin_loop, name="stdin", daemon=True).start()
        try:
            return self._main_loop()
        finally:
            self.connection.close(say_bye=False)

    def _on_event(self, frame):
        """Runs on the reader thread: hand the frame to the main thread."""
        self._inbox.put(("frame", frame))

    def _stdin_loop(self):
        """Runs on the stdin thread: hand each line to the main thread, then "eof"."""
        for line in self.stdin:
            self._inbox.put(("line", line.rstrip("\r\n")))
        self._inbox.put(("eof", None))

    def _main_loop(self):
        while True:
            try:
                kind, value = self._inbox.get(timeout=self._wait_limit())
            except queue.Empty:
                self._print(clock(), "! %d message(s) were not confirmed by the server." % len(self._pending))
                return 1
            if kind == "frame":
                code = self._show(value)
                if code is not None:
                    return code
            elif kind == "line":
                self._on_line(value)
            else:
                self._leave()
            if self._leaving_since is not None and not self._pending and not self._bye_sent:
                self._bye_sent = True
                self._send(lambda: self.connection.send({"type": "bye"}))

    def _wait_limit(self):
        if self._leaving_since is None:
            return None
        return max(0.0, self._leaving_since + CONFIRM_TIMEOUT_S - time.monotonic())

    def _on_line(self, line):
        command, argument = parse_input(line)
        if command == "say" and self._leaving_since is None:
            self._next_ref += 1
            ref = "%s-%d" % (self._ref_prefix, self._next_ref)
            self._pending.add(ref)
            self._send(lambda: self.connection.say(argument, ref))
        elif command == "users":
            self._send(lambda: self.connection.send({"type": "users"}))
        elif command == "quit":
            self._leave()
        elif command == "help":
            self._print(clock(), "* " + HELP_TEXT)
        elif command == "unknown":
            self._print(clock(), "! " + argument)

    def _send(self, action):
        try:
            action()
        except OSError:
            pass  # the reader thread reports the lost connection

    def _leave(self):
        if self._leaving_since is None:
            self._leaving_since = time.monotonic()

    def _show(self, frame):
        """Print one frame; return an exit code once the connection has ended."""
        kind = frame.get("type")
        if kind == "message":
            if frame.get("from") == self.connection.name:
                self._pending.discard(frame.get("ref"))
            self._print(clock(frame.get("ts")), "<%s> %s" % (frame.get("from"), frame.get("text")))
        elif kind == "disconnected":
            if not frame.get("expected"):
                self._print(clock(), "! " + frame["text"])
                return 1
            return 0 if not self._pending else 1
        elif kind == "error":
            self._print(clock(), "! " + notice_text(frame))
        elif kind != "bye":
            text = notice_text(frame)
            if text:
                self._print(clock(frame.get("ts")), "* " + text)
        return None

    def _print(self, stamp, text):
        """Print one event; the lines of a multi-line text are indented under the first."""
        prefix = "[%s] " % stamp
        body = text.replace("\n", "\n" + " " * len(prefix))
        self.stdout.write(prefix + body + "\n")
        self.stdout.flush()


def run_cli(args):
    host, port = split_host_port(args.server)
    return TerminalClient(host, port, args.name).run()


# =============================================================================
# 11. Command line
# =============================================================================

DESCRIPTION = """\
LocalChat: chat with the people on your local network. No internet, no accounts.

  python3 localchat.py server              run the server (on one computer)
  python3 localchat.py NAME                open the chat window as NAME
  python3 localchat.py NAME --cli          chat from a terminal or a script

The server prints the address the others should use with --server.
"""

EPILOG = """\
examples:
  python3 localchat.py server --port 13333
  python3 localchat.py alice --server 192.168.1.7
  echo "build finished" | python3 localchat.py ci --cli --server 192.168.1.7
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="localchat.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME|server",
                        help="your name in the chat (1-%d letters, digits, _ - .), or 'server'" % MAX_NAME_CHARS)
    parser.add_argument("--version", action="version", version="LocalChat %s" % __version__)
    client = parser.add_argument_group("client options")
    client.add_argument("--server", metavar="HOST[:PORT]",
                        help="the server to join (default %s:%d)" % (DEFAULT_CLIENT_HOST, DEFAULT_PORT))
    client.add_argument("--cli", action="store_true", help="use the line client instead of the window")
    server = parser.add_argument_group("server options")
    server.add_argument("--host", help="the address to listen on (default %s: all of them)" % DEFAULT_HOST)
    server.add_argument("--port", type=int, help="the TCP port to listen on (default %d; 0 picks a free one)"
                        % DEFAULT_PORT)
    server.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    return parser


def check_args(parser, args):
    """Reject options that do not fit the mode; fill in defaults."""
    if args.name == "server":
        for option, value in (("--server", args.server), ("--cli", args.cli)):
            if value:
                parser.error("%s is a client option; the server takes --host, --port and --quiet" % option)
        args.host = DEFAULT_HOST if args.host is None else args.host
        args.port = DEFAULT_PORT if args.port is None else args.port
        if not 0 <= args.port <= 65535:
            parser.error("--port must be between 0 and 65535")
        return
    for option, value in (("--host", args.host), ("--port", args.port), ("--quiet", args.quiet)):
        if value:
            parser.error("%s is a server option; a client takes --server HOST[:PORT]" % option)
    try:
        check_name(args.name)
        split_host_port(args.server or "")
    except ProtocolError as error:
        parser.error("invalid name '%s': %s" % (args.name, error.text))
    except UserError as error:
        if args.server is not None:
            parser.error(str(error))
    args.server = args.server or "%s:%d" % (DEFAULT_CLIENT_HOST, DEFAULT_PORT)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if args.name == "server":
            return run_server(args)
        if args.cli:
            return run_cli(args)
        return run_window(args)
    except UserError as error:
        sys.stderr.write("localchat: error: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("localchat: interrupted, bye.\n")
        return 0


if __name__ == "__main__":
    sys.exit(main())
