#!/usr/bin/env python3
"""LocalChat: a chat for one local network in one file, with no internet, accounts or installation.

Usage:
    python3 localchat.py                                       (a window asks: join or host)
    python3 localchat.py server [--host 0.0.0.0] [--port 13333] [--tls] [--password] ...
    python3 localchat.py NAME [--server HOST[:PORT]]           (the chat window)
    python3 localchat.py NAME --cli [--server HOST[:PORT]]     (a line client)
    python3 localchat.py --discover                            (list the chats on this network)

Sections:
    1. Constants
    2. Errors
    3. Protocol: wire format, frames, limits
    4. Commands: what people type
    5. Core: users, rooms, direct messages, history, fan-out (no sockets, no JSON)
    6. Storage: message history, topics, identities
    7. Certificates: a self-signed one, made with the standard library alone
    8. Encryption: TLS over memory buffers
    9. Transport: outboxes, the writer threads and the send budget
    10. Web: the WebSocket handshake and frames (no sockets)
    11. Web page: HTML, CSS and JavaScript
    12. Sessions and doors: one session per connection, a door per protocol
    13. Discovery: UDP probes and replies, finding servers on the LAN
    14. QR codes: the web address for a phone's camera (ISO/IEC 18004)
    15. Server: accept, threads, shutdown
    16. Client connection (no Tk)
    17. Tk window
    18. Terminal client
    19. Command line
"""

__version__ = "1.0"

import argparse
import base64
import codecs
import collections
import datetime
import errno
import fnmatch
import getpass
import gzip
import hashlib
import hmac
import http
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import webbrowser
import zlib
from pathlib import Path
from typing import Iterable, List, NamedTuple, Sequence

# =============================================================================
# 1. Constants
# =============================================================================

log = logging.getLogger("localchat")  # the server's console log (stderr, set up by run_server)

DEFAULT_PORT = 13333
DEFAULT_HOST = "0.0.0.0"
PROTOCOL_VERSION = 1

MAX_LINE_BYTES = 64 * 1024        # one frame, newline included
MAX_TEXT_BYTES = 32000            # message text in UTF-8; even fully escaped it fits one line
MAX_NAME_CHARS = 32               # user names are 1 to this many characters
MAX_REF_CHARS = 64                # a client's own reference for a message, echoed back
RECV_BYTES = 64 * 1024            # the most one recv() call asks for
RECV_IDLE_BYTES = 512             # what a server read asks for when the last one was small: recv()
                                  # holds its buffer while it waits, so a thousand idle readers
                                  # asking for 64 KiB each would hold 64 MiB

HELLO_TIMEOUT_S = 10.0            # a connection must say hello within this
IDLE_PING_S = 30.0                # the server pings a connection silent this long; a second
                                  # silent period of the same length drops it as timed out
ERROR_LIMIT = 10                  # protocol errors allowed in ERROR_WINDOW_S before disconnecting
ERROR_WINDOW_S = 60.0
CLOSE_FLUSH_S = 2.0               # how long a closing connection waits for its last frames to go out
LINGER_S = 1.0                    # after the last frame, how long to read and discard before closing
SHUTDOWN_FLUSH_S = 0.5            # at shutdown, how long to wait for the goodbye frames
LISTEN_BACKLOG = 1024             # pending connections the kernel queues for accept()
SESSION_STACK_BYTES = 512 * 1024  # stack of each connection thread (touched pages only cost memory)
WRITER_THREADS = 2                # threads sending to sockets (each connection has one of them)
SLOW_S = 15.0                     # a client is too slow once a frame owed to it has waited this long
HOUSEKEEPING_S = 1.0              # how often the server looks for lost users whose grace period ended
TRIM_S = 5.0                      # how often the server hands freed heap back to the system (glibc keeps it)

CONNECT_TIMEOUT_S = 5.0           # client: connecting and waiting for the welcome
CLIENT_PING_S = 20.0              # client: ping the server after this much silence
CLIENT_DEAD_S = 65.0              # client: the connection is lost after this much silence
RECONNECT_MAX_S = 10.0            # client: the longest pause between attempts to reconnect

# =============================================================================
# 2. Errors
# =============================================================================


class LocalChatError(Exception):
    """Base class of every error LocalChat raises on purpose."""


class ProtocolError(LocalChatError):
    """The peer sent something wrong: it gets an error frame with a stable code.

    `fatal` errors close the connection after the error frame is sent.
    """

    def __init__(self, code, text, fatal=False, reason="error", counts=True):
        super().__init__(text)
        self.code = code
        self.text = text
        self.fatal = fatal
        self.reason = reason  # what others are told when a fatal error ends the connection
        self.counts = counts  # whether it counts towards the limit of bad frames
        self.ref = None  # a refused say's own ref, echoed in the error frame


class UserError(LocalChatError):
    """Bad input or settings, shown to a person as one sentence, never as a traceback.

    `code` is the server's error code when the sentence comes from a refusal.
    """

    def __init__(self, text, code=None):
        super().__init__(text)
        self.code = code


class UntrustedCertificate(UserError):
    """A server's certificate that nobody has trusted: new to us, or not the one trusted before.

    `previous` is the fingerprint trusted before at that address (the certificate
    changed: code "fingerprint_changed"), or None (first contact: "fingerprint_new").
    """

    def __init__(self, address, fingerprint, previous=None):
        self.address, self.fingerprint, self.previous = address, fingerprint, previous
        super().__init__(self.description() + " Not connecting.",
                         code="fingerprint_new" if previous is None else "fingerprint_changed")

    def description(self):
        """Return what a person is told before being asked: the fingerprint, and for a change the warning."""
        if self.previous is None:
            return ("The server at %s encrypts with a certificate this computer has not trusted yet; its "
                    "fingerprint (SHA-256) is %s." % (self.address, self.fingerprint))
        return ("WARNING: the certificate of %s has CHANGED since you last connected: somebody may be pretending "
                "to be that server. The fingerprint trusted before was %s; the server now shows %s. Accept the "
                "new one only if its owner really made a new certificate (compare the fingerprint the server "
                "prints)." % (self.address, self.previous, self.fingerprint))

    @property
    def changed(self):
        return self.previous is not None


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
  {"type":"hello","name":"alice","version":1}  first frame, within 10 s. Optional:
        "identity": a random token the client keeps (direct messages sent while
        it was away are delivered only to the same identity);
        "resume": the token of an earlier welcome, to take back one's place after
        a lost connection; "last_id": the last message id seen (what follows is
        replayed); "rooms": the rooms to rejoin (after a server restart)
  {"type":"say","text":"hi","room":"general","ref":"c1"}
        text: 1-32000 bytes of UTF-8, may hold newlines and tabs, no other control
        characters; "room" defaults to general; "to":"bob" instead of "room" sends
        a direct message; "action":true for /me; "notice":true for an automatic
        message that no client may answer by itself (IRC's NOTICE); "ref"
        (optional, up to 64 printable characters) comes back in the echo
  {"type":"join","room":"games"}    {"type":"leave","room":"games"}  (leave and bye may carry
        a short "message", what one says on leaving: others get it in "left")
  {"type":"users"}                  everybody; with "room": the people in that room
  {"type":"rooms"}                  the rooms, their sizes and topics
  {"type":"invite","name":"bob","room":"games"}  ask bob into a room one is in
  {"type":"topic","room":"games"}   ask; with "topic":"text" (or null) set it
  {"type":"nick","name":"alice2"}   change one's name
  {"type":"away","text":"lunch"}    {"type":"back"}
  {"type":"history","room":"games","before":120,"limit":50}
        older messages (or "with":"bob" for a direct conversation)
  {"type":"ping","token":"x"}       the server answers pong (token echoed)
  {"type":"pong"}                   the answer to a server ping
  {"type":"bye"}                    leave; the server answers bye and closes

Server to client:
  {"type":"welcome","name":"alice","users":["alice","bob"],"rooms":["general"],
   "server":"host","version":1,"max_text_bytes":32000,"resume":"token","last_id":41,
   "limits":{"messages_per_s":5.0,"message_burst":30,"kbytes_per_s":64.0,"kbyte_burst":512}}
  (the flood limits: a client that keeps inside them is never refused; 0 means none)
  then {"type":"room",...} for each room one is in, the history (message frames
  with "replay":true: a room's last messages, or with "last_id" what was missed),
  direct messages that waited, and {"type":"synced","last_id":41}.
  {"type":"message","id":17,"ts":1732435200.5,"from":"alice","room":"general","text":"hi"}
        sent to everyone in the room, the sender included: the echo confirms
        delivery. "id" is assigned by the server and increases; "from" is set by
        the server. A direct message has "to" instead of "room" and goes to sender
        and recipient only ("queued":true if the recipient is away: it is kept
        and delivered when that identity returns). One to somebody away carries
        their "away" text.
  {"type":"room","room":"games","topic":"...","users":[...],"away":{"bob":"lunch"},"ops":["alice"]}
        you are in this room (after hello or join); "ops" (when there are any): its operators
  {"type":"joined","name":"bob","room":"games","ts":...}
  {"type":"left","name":"bob","room":"games","reason":"part","ts":...}
  {"type":"left","name":"bob","reason":"quit","ts":...}   (no room: left the server)
        reason: quit, lost (connection broke), timeout (no answer to pings),
        too_slow (did not read fast enough), error (too many bad frames),
        shutdown (the server stopped). A lost or timed-out user keeps its name
        and rooms for 60 s: others hear "left" only if it does not come back.
  {"type":"users","users":[...],"away":{...},"ops":[...]}  (with "room" when asked per room)
  {"type":"rooms","rooms":[{"name":"general","users":3,"topic":null}]}
  {"type":"topic","room":"games","topic":"...","by":"alice"}   ("by": somebody set it now;
        the answer to a question and the room frame carry "set_by" and "set_at" instead,
        when the topic was set while the server ran)
  {"type":"renamed","old":"alice","name":"alice2"}
  {"type":"away","name":"bob","text":"lunch"}     (text null: back)
  {"type":"invite","from":"alice","to":"bob","room":"games"}  to both of them
  {"type":"history_end","room":"games","count":50,"more":true}
  {"type":"ping"}    answer with pong (any frame will do) within 30 s
  {"type":"pong","token":"x"}
  {"type":"error","code":"name_taken","text":"a sentence for a person","fatal":true}
        fatal errors are followed by the server closing the connection;
        an error refusing a say (not_stored, unknown_user, ...) carries the
        message's "ref", so the client does not send it again
  {"type":"bye","reason":"quit"|"shutdown"|"replaced"|"kicked"|"banned","text":"a sentence"}
        then the server closes
  {"type":"notice","action":"mute","name":"bob","by":"alice","text":"a sentence"}
        moderation and the server owner's announcements, for everybody

Password: a server that wants one answers the hello with
  {"type":"challenge","nonce":"<hex>"}; the client replies
  {"type":"auth","proof":"<hex HMAC-SHA256 keyed by the password, of the nonce>"}
  and then gets the welcome (or error auth_failed, and the connection closes).
Operators (see the README) send {"type":"kick","name":..,"reason":..},
  {"type":"ban","target":NAME_OR_IP,"minutes":..,"reason":..}, {"type":"unban","target":..},
  {"type":"mute","name":..,"minutes":..}, {"type":"unmute","name":..},
  {"type":"op","name":..}, {"type":"deop","name":..}.
Files: a file is shared in three steps, all on the chat's one port.
  1. {"type":"upload","name":"report.pdf","size":48213,"room":"general","ref":"f1"}
     ("to":"bob" instead of "room" for one person). Refused at once, before any
     byte is sent, with an error carrying the ref: file_too_large, too_many_uploads,
     not_in_room, unknown_user, muted, files_off, bad_field.
  2. The answer {"type":"upload_ready","ref":"f1","url":"/upload/<token>","expires_s":60}:
     a one-time address. The client sends the file's bytes there with HTTP on the
     same port: "PUT <url> HTTP/1.1" with "Content-Length" equal to the size asked
     for (POST is taken too), over TLS on a TLS server. Answers: 201 with
     {"id":17,"url":"/files/..."} once the file is stored and announced; 404 for an
     unknown, used or expired address; 400 when the length is not the one asked for;
     411 without a Content-Length; 408 when its bytes stop coming for 30 s; 409 when
     the sender left the chat (or was muted) before it ended; 507 when the server
     cannot store it. An upload cut short leaves nothing behind.
  3. Everybody it was shared with gets a message frame with a "file" object:
     {"type":"message","id":17,...,"text":"report.pdf (47 KB) http://host:port/files/<id>/report.pdf",
      "file":{"name":"report.pdf","size":48213,"type":"application/pdf","url":"/files/<id>/report.pdf"}}
     (the text is for clients that know nothing of files: IRC, nc)
     The name is cleaned by the server (no folders, no control or direction
     characters, no names Windows reserves, at most 120 characters and 240 bytes
     of UTF-8). <id> holds 192 random bits: only the people it was shared with
     are sent it, and any other address gets 404. "GET <url>" (or HEAD)
     downloads it, with its Content-Type, "X-Content-Type-Options: nosniff", and
     "Content-Disposition: attachment" for everything but PNG, GIF, JPEG and WebP
     pictures. A file the server no longer keeps (the oldest go when the total is
     over the limit) comes in history as {"name":..,"size":..,"type":..,
     "expired":true}, without "url".
  The welcome's "limits" carry "max_file_bytes" (0: files are turned off) and
  "uploads_per_minute".
Encryption: a TLS server expects a TLS handshake as the first bytes; a plain
  first byte gets the plain error tls_required, and a TLS handshake sent to a
  plain server gets tls_not_used (which the TLS client sees as a failed handshake).

Error codes: bad_utf8, bad_json, not_object, bad_type, unknown_type, bad_field,
hello_first, already_joined, bad_version, bad_name, bad_room, name_taken,
empty_text, text_too_long, bad_text, not_in_room, already_in_room,
too_many_rooms, unknown_user, not_stored, line_too_long (fatal),
too_many_errors (fatal), hello_timeout (fatal), shutting_down (fatal: a hello
while the server stops); and from moderation and limits: rate_limited,
flooding (fatal), muted, banned (fatal at hello), not_operator, no_identity,
not_banned, not_muted, own_address, bad_auth, auth_first (fatal), auth_failed (fatal),
server_full (fatal), too_many_connections (fatal), tls_required (fatal),
file_too_large, too_many_uploads, files_off (files are turned off), gone (the sender of a
file left before it came: HTTP 409),
tls_not_used (fatal); from the IRC and text doors, which carry a password
themselves: password_required (fatal), password_in_clear (fatal: a password
server without TLS, unless started with --allow-clear-passwords).
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
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:  # JSON has no limit; SQLite has 64 bits
        raise ProtocolError("bad_field", 'The field "%s" is out of range.' % key)
    return value


def password_proof(password, nonce):
    """Return the answer to a password challenge: HMAC-SHA256 keyed by the password, in hex.

    The password itself never crosses the network; a fresh nonce per connection
    makes a recorded answer useless.
    """
    return hmac.new(password.encode("utf-8"), nonce.encode("utf-8"), hashlib.sha256).hexdigest()


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


MAX_FILE_NAME_CHARS = 120  # a shared file's name, after cleaning
MAX_FILE_NAME_BYTES = 240  # ... and in UTF-8: Linux and macOS take 255 bytes, "name (12).pdf" needs a few more
PICTURE_TYPES = ("image/png", "image/gif", "image/jpeg", "image/webp")  # shown inline: the only files that are
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file
_PICTURE_MAGIC = ((PNG_SIGNATURE, "image/png"), (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"),
                  (b"\xff\xd8\xff", "image/jpeg"))
_WINDOWS_RESERVED = frozenset(["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"] +
                              ["%s%d" % (kind, n) for kind in ("COM", "LPT") for n in range(10)])
_NOT_IN_FILE_NAMES = '<>:"/\\|?*'  # Windows refuses these; "/" and "\\" would name folders anywhere


def clean_file_name(name):
    """Return a shared file's name made safe to show and to save on any system.

    No folders (only the last part of a path is kept), no control, format or
    direction-override characters, none that Windows refuses, no name Windows
    reserves (CON.txt becomes _CON.txt), no leading or trailing dots and spaces,
    at most MAX_FILE_NAME_CHARS characters (and MAX_FILE_NAME_BYTES in UTF-8) with the
    extension kept; "file" if nothing is left.
    """
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rstrip("/ ").rsplit("/", 1)[-1]
    name = "".join("_" if ch in _NOT_IN_FILE_NAMES else ch for ch in name
                   if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
    name = " ".join(name.split()).strip(" .")  # whitespace runs become one space
    stem, dot, extension = name.rpartition(".")
    if not dot or not 0 < len(extension) <= 16:
        stem, dot, extension = name, "", ""
    if stem.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    room = MAX_FILE_NAME_CHARS - len(dot + extension)
    room_bytes = MAX_FILE_NAME_BYTES - len((dot + extension).encode("utf-8"))
    stem = stem[:room].encode("utf-8")[:room_bytes].decode("utf-8", "ignore")  # a character cut in two goes
    name = (stem.rstrip(" .") + dot + extension).strip(" .")
    return name or "file"


def file_type(name, head):
    """Return the Content-Type of a shared file, from its first bytes (pictures) or its name.

    A picture type only when the bytes are that picture: a page named photo.png is
    no picture, and is never served as one.
    """
    for magic, kind in _PICTURE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type("x." + name.rpartition(".")[2])[0] if "." in name else None
    if guessed is None or guessed in PICTURE_TYPES or not re.match(r"^[a-z]+/[a-z0-9.+-]+$", guessed):
        return "application/octet-stream"
    return guessed


def file_size_text(size):
    """Return a size for a person: 512 bytes, 48 KB, 3.2 MB, 1.1 GB."""
    if size < 1024:
        return "1 byte" if size == 1 else "%d bytes" % size
    for unit, scale in (("KB", 1024), ("MB", 1024 ** 2), ("GB", 1024 ** 3)):
        if size < scale * 1024 or unit == "GB":
            value = size / scale
            return ("%.1f %s" % (value, unit)) if value < 10 else ("%d %s" % (round(value), unit))
    raise AssertionError("unreachable")


def printable(text, limit=80):
    """Return text made safe for one log line: control characters escaped, length capped."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


# =============================================================================
# 4. Commands: what people type
# =============================================================================
#
# One table of the /commands for every place one is typed: "chat" (the window, the
# line client, and the text and IRC doors to come) and "console" (the server's
# terminal). Runs on any thread: the table and these functions keep no state.

# Who may use a command, by place: an operator's commands are the console's too.
COMMAND_PLACES = {"chat": ("everybody", "operators"), "console": ("console", "operators")}


class Command(NamedTuple):
    """One /command: its names, how it is typed, what it does, who may use it, how it is read.

    `who` is "everybody" (anybody in a chat), "operators" (an operator in a chat, and
    the server's console) or "console" (the server's console only). `parse(argument,
    where)` gets the text after the name, stripped, and where plain text goes
    ({"room": R} or {"to": NAME}); it returns (action, value) as parse_command does,
    or None when the argument does not fit: the usage line is then the answer.
    """

    names: tuple  # the first is the one shown in the help; the others are aliases
    usage: str    # how it is typed: "/ban NAME|IP [minutes] [reason]"
    help: str     # what it does, in a few words
    who: str      # "everybody", "operators" or "console"
    parse: object  # (argument, where) -> (action, value), or None for "Usage: ..."


def _target_minutes_reason(rest):
    """Split "NAME [minutes] [reason]" into its parts (None where absent)."""
    parts = rest.split(None, 2)
    if not parts:
        return None, None, None
    # isdecimal(), not isdigit(): "²" is a digit that int() refuses.
    minutes = int(parts[1]) if len(parts) > 1 and parts[1].isdecimal() else None
    reason = " ".join(parts[2 if minutes is not None else 1:]) or None
    return parts[0], minutes, reason


def _room_argument(argument, where):
    return argument.split()[0].lstrip("#") if argument else where.get("room")


def _parse_join(argument, where):
    return ("send", {"type": "join", "room": argument.split()[0].lstrip("#")}) if argument else None


def _parse_leave(argument, where):
    room = _room_argument(argument, where)
    if not room:
        return "error", "Usage: /leave ROOM"  # in a direct conversation there is no current room
    return "send", {"type": "leave", "room": room}


def _parse_msg(argument, where):
    name, _, text = argument.partition(" ")
    if not name or not text.strip():
        return None
    return "send", {"type": "say", "to": name.lstrip("@"), "text": text}


def _parse_me(argument, where):
    return ("send", dict(where, type="say", text=argument, action=True)) if argument else None


def _parse_nick(argument, where):
    return ("send", {"type": "nick", "name": argument.split()[0]}) if argument else None


def _parse_users(argument, where):
    room = _room_argument(argument, where)
    return "send", {"type": "users", "room": room} if room else {"type": "users"}


def _parse_invite(argument, where):
    parts = argument.split()
    room = parts[1].lstrip("#") if len(parts) > 1 else where.get("room")
    if not parts or not room:
        return None
    return "send", {"type": "invite", "name": parts[0].lstrip("@"), "room": room}


def _parse_send(argument, where):
    path = argument.strip()
    if path.startswith("@") and " " in path:  # /send @bob notes.pdf: to one person, wherever one types
        name, _, path = path.partition(" ")
        where, path = {"to": name[1:]}, path.strip()
    if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"":  # a dropped or copied path may come quoted
        path = path[1:-1]
    return ("send_file", dict(where, path=path)) if path else None


def _parse_topic(argument, where):
    room = where.get("room")
    if not room:
        return "error", "Topics belong to rooms: switch to a room first."
    if argument:
        return "send", {"type": "topic", "room": room, "topic": argument}
    return "send", {"type": "topic", "room": room}


def _moderation_parser(kind, field):
    """Return the parser of an operator's command: NAME (or IP), then minutes and a reason where they fit."""
    def parse(argument, where):
        if kind in ("ban", "mute"):
            target, minutes, reason = _target_minutes_reason(argument)
        else:
            target, _, reason = argument.partition(" ")
            minutes, reason = None, reason.strip() or None
        if not target:
            return None
        frame = {"type": kind, field: target}
        if minutes is not None:
            frame["minutes"] = minutes
        if reason and kind in ("kick", "ban", "mute"):
            frame["reason"] = reason
        return "send", frame
    return parse


# In the order the help shows them. A command answered with a frame sends the same
# frame from a chat and the console; the console carries it out with its own powers.
COMMANDS = (
    Command(("join",), "/join ROOM", "join a room, or switch to it", "everybody", _parse_join),
    Command(("leave", "part"), "/leave [ROOM]", "leave a room (the current one)", "everybody", _parse_leave),
    Command(("msg",), "/msg NAME TEXT", "a direct message that only NAME sees", "everybody", _parse_msg),
    Command(("me",), "/me ACTION", "say what you do, shown as: * alice waves", "everybody", _parse_me),
    Command(("send",), "/send [@NAME] PATH", "share a file with the room (or the person, or NAME)", "everybody",
            _parse_send),
    Command(("nick",), "/nick NEWNAME", "change your name", "everybody", _parse_nick),
    Command(("invite",), "/invite NAME [ROOM]", "ask somebody into a room (the current one)", "everybody",
            _parse_invite),
    Command(("users", "names"), "/users [ROOM]", "who is in the room (the current one)", "everybody",
            _parse_users),
    Command(("rooms", "list"), "/rooms", "the rooms and their topics", "everybody",
            lambda argument, where: ("send", {"type": "rooms"})),
    Command(("topic",), "/topic [TEXT]", "show the room's topic, or set it", "everybody", _parse_topic),
    Command(("away",), "/away [TEXT]", "mark yourself away", "everybody",
            lambda argument, where: ("send", {"type": "away", "text": argument or None})),
    Command(("back",), "/back", "say you are back", "everybody",
            lambda argument, where: ("send", {"type": "back"})),
    Command(("quit", "exit"), "/quit", "leave the chat", "everybody", lambda argument, where: ("quit", None)),
    Command(("help",), "/help", "this list", "everybody", lambda argument, where: ("help", HELP_TEXT)),
    Command(("users",), "/users", "who is here (with addresses)", "console",
            lambda argument, where: ("users", None)),
    Command(("kick",), "/kick NAME [reason]", "remove somebody (they may come back)", "operators",
            _moderation_parser("kick", "name")),
    Command(("ban",), "/ban NAME|IP [minutes] [reason]", "ban a name (and its client), or an address",
            "operators", _moderation_parser("ban", "target")),
    Command(("unban",), "/unban NAME|IP", "lift a ban", "operators", _moderation_parser("unban", "target")),
    Command(("bans",), "/bans", "list the bans", "console", lambda argument, where: ("bans", None)),
    Command(("mute",), "/mute NAME [minutes]", "stop somebody from speaking", "operators",
            _moderation_parser("mute", "name")),
    Command(("unmute",), "/unmute NAME", "let somebody speak again", "operators",
            _moderation_parser("unmute", "name")),
    Command(("op",), "/op NAME", "make somebody an operator", "operators", _moderation_parser("op", "name")),
    Command(("deop",), "/deop NAME", "make an operator an ordinary user again", "operators",
            _moderation_parser("deop", "name")),
    Command(("say",), "/say TEXT", "a notice to everybody", "console",
            lambda argument, where: ("say", argument) if argument else None),
    Command(("quit",), "/quit", "stop the server", "console", lambda argument, where: ("quit", None)),
    Command(("help",), "/help", "this list", "console", lambda argument, where: ("help", CONSOLE_HELP_TEXT)),
)

# (place, name or alias) -> the command typed there under that name
_COMMAND_INDEX = {(place, name): command
                  for command in COMMANDS for place, kinds in COMMAND_PLACES.items() if command.who in kinds
                  for name in command.names}


def commands_at(place, who=None):
    """Return the commands that may be typed at place ("chat" or "console"), of one kind if `who` is given."""
    return [command for command in COMMANDS
            if command.who in COMMAND_PLACES[place] and who in (None, command.who)]


def command_help(place):
    """Return the /help text of a place, made from the table."""
    if place == "console":
        return "Console commands:\n" + _help_lines(commands_at("console"))
    return "Commands:\n%s\nOperators also have:\n%s\nStart a message with // to send text that begins with /." % (
        _help_lines(commands_at(place, "everybody")), _help_lines(commands_at(place, "operators")))


def _help_lines(commands):
    width = max(len(command.usage) for command in commands) + 4
    return "\n".join("  %s%s" % (command.usage.ljust(width), command.help) for command in commands)


HELP_TEXT = command_help("chat")
CONSOLE_HELP_TEXT = command_help("console")


def parse_command(line, where, place):
    """Return (action, value) for a line typed at place: "chat" or "console".

    `where` is {"room": name} or {"to": name}: where plain text goes ({} on the
    console). action is "send" (value: the frame to post), "error" (value: a
    sentence), None for a blank line, or one to carry out where it was typed:
    "quit", "help" (value: the help text), and on the console "users", "bans" and
    "say" (value: the text). In a chat, a line not starting with / is a message, and
    one starting with // is a message starting with /.
    """
    if not line.strip():
        return None, None
    if line.startswith("//") or not line.startswith("/"):
        if place == "console":
            return "error", "Unknown command. " + CONSOLE_HELP_TEXT
        return "send", dict(where, type="say", text=line[1:] if line.startswith("//") else line)
    word, _, argument = line[1:].partition(" ")
    word = word.split("\n")[0]
    command = _COMMAND_INDEX.get((place, word.lower()))
    if command is None:
        return "error", _refusal(word, place)
    return command.parse(argument.strip(), where) or ("error", "Usage: " + command.usage)


def _refusal(word, place):
    """Return the sentence for /word, which is no command at place."""
    shown = word[:40]
    elsewhere = any((other, word.lower()) in _COMMAND_INDEX for other in COMMAND_PLACES if other != place)
    if place == "console":
        if elsewhere:
            return "/%s is typed in a chat, not on the console. Type /help for the console's commands." % shown
        return "Unknown command. " + CONSOLE_HELP_TEXT
    if elsewhere:
        return "/%s is a command of the server's console only. Type /help for the list." % shown
    return "Unknown command /%s. Type /help for the list." % shown


# What a person reads: events as sentences and lines, for the clients and the text door.

_LEFT_WORDS = {
    "quit": "left",
    "part": "left",
    "lost": "lost the connection",
    "timeout": "timed out",
    "too_slow": "could not keep up and was disconnected",
    "flood": "was disconnected for flooding",
    "kicked": "was kicked",
    "banned": "was banned",
    "error": "was disconnected for sending bad data",
    "shutdown": "left as the server shut down",
}


def parse_input(line, where=None):
    """Return (action, value) for a line a person typed in a conversation: parse_command in a chat.

    `where` ({"room": name} or {"to": name}, where plain text goes) defaults to the
    general room. action is "send" (value: the frame to post), "quit", "help"
    (value: the help text), "error" (value: a sentence), or None for a blank line.
    """
    return parse_command(line, where if where is not None else {"room": GENERAL_ROOM}, "chat")


def room_label(room):
    return "#" + room


def notice_text(frame):
    """Return the sentence shown for a frame other than a message, or None."""
    describe = _NOTICES.get(frame.get("type"))
    return describe(frame) if describe else None


def _users_notice(frame):
    users = frame.get("users") or []
    away = frame.get("away") or {}
    shown = ", ".join(u + (" (away: %s)" % away[u] if u in away else "") for u in users)
    where = " in %s" % room_label(frame["room"]) if frame.get("room") else ""
    return "%d here%s: %s" % (len(users), where, shown)


def _left_notice(frame):
    if frame.get("text"):
        return frame["text"]  # a kick or ban, told with who did it and why
    reason = frame.get("reason")
    words = _LEFT_WORDS.get(reason, "left (%s)" % reason)
    said = ' saying "%s"' % frame["message"] if frame.get("message") else ""
    if frame.get("room"):
        return "%s %s %s%s" % (frame.get("name"), words, room_label(frame["room"]), said)
    return "%s %s%s" % (frame.get("name"), words, said)


def _topic_notice(frame):
    room, topic = room_label(str(frame.get("room"))), frame.get("topic")
    if frame.get("by"):
        return ("%s set the topic of %s: %s" % (frame["by"], room, topic) if topic
                else "%s cleared the topic of %s" % (frame["by"], room))
    return "Topic of %s: %s" % (room, topic) if topic else "%s has no topic." % room


def _rooms_notice(frame):
    rooms = frame.get("rooms") or []
    parts = ["%s (%s)%s" % (room_label(r.get("name")), r.get("users"), ": " + r["topic"] if r.get("topic") else "")
             for r in rooms]
    return "Rooms: " + ", ".join(parts) if parts else "There are no rooms."


def _room_notice(frame):
    users = frame.get("users") or []
    topic = " Topic: %s" % frame["topic"] if frame.get("topic") else ""
    return "You are in %s with %d here: %s.%s" % (room_label(frame.get("room")), len(users), ", ".join(users), topic)


_NOTICES = {
    "joined": lambda f: "%s joined %s" % (f.get("name"), room_label(f["room"])) if f.get("room")
    else "%s joined" % f.get("name"),
    "left": _left_notice,
    "users": _users_notice,
    "welcome": lambda f: "Welcome, %s!" % f.get("name") if not f.get("resumed") else "Reconnected.",
    "room": _room_notice,
    "topic": _topic_notice,
    "rooms": _rooms_notice,
    "notice": lambda f: f.get("text"),
    "renamed": lambda f: "%s is now known as %s" % (f.get("old"), f.get("name")),
    "invite": lambda f: "%s invites %s to %s (/join %s)" % (f.get("from"), f.get("to"), room_label(str(f.get("room"))),
                                                             f.get("room")),
    "away": lambda f: ("%s is away: %s" % (f.get("name"), f["text"])) if f.get("text")
    else "%s is back" % f.get("name"),
    "history_end": lambda f: None if f.get("count") else "No older messages.",
    "error": lambda f: f.get("text") or "error",
    "bye": lambda f: f.get("text") or "bye",
    "disconnected": lambda f: f.get("text") or "Disconnected.",
    "reconnecting": lambda f: f.get("text") or "Reconnecting...",
}


def message_line(frame, file_address=None):
    """Return a message as the one line the line client prints (after the time).

    file_address(url) makes a shared file's whole address (the line client knows its server).
    """
    sender, text = frame.get("from"), frame.get("text")
    shared = frame.get("file")
    if isinstance(shared, dict) and isinstance(shared.get("name"), str):
        what = "%s (%s)" % (shared["name"], file_size_text(shared.get("size") or 0))
        if shared.get("expired") or not isinstance(shared.get("url"), str):
            text = "shared a file: %s, no longer on the server" % what
        else:  # the text holds the address the server gives, which a client knowing its server can better
            text = "shared a file: " + ("%s %s" % (what, file_address(shared["url"])) if file_address else text)
    if frame.get("to") is not None:
        where = "[%s -> %s] " % (sender, frame["to"])
        return where + ("* %s %s" % (sender, text) if frame.get("action") else text) + (
            " (will be delivered when %s returns)" % frame["to"] if frame.get("queued") else "")
    room = frame.get("room")
    prefix = room_label(room) + " " if room else ""  # every line names its room (or, above, its person)
    if frame.get("action"):
        return "%s* %s %s" % (prefix, sender, text)
    return "%s<%s> %s" % (prefix, sender, text)


def clock(ts=None):
    """Return local time as HH:MM:SS for a timestamp (now if None)."""
    return time.strftime("%H:%M:%S", time.localtime(ts if isinstance(ts, (int, float)) else None))


# =============================================================================
# 5. Core: users, rooms, direct messages, history, fan-out (no sockets, no JSON)
# =============================================================================
#
# The ChatHub holds who is here, in which rooms, and hands each event to its
# recipients. It runs on whichever thread calls it (a connection's reader thread,
# the server's housekeeping thread); one lock guards its state and its store.
#
# The hub keeps a User record per person (name, rooms, identity, flood state...);
# each names the connection it delivers to, which a reconnect replaces. Methods
# ending in _locked are called with the hub's lock held; the others take it.

GENERAL_ROOM = "general"
MAX_ROOM_CHARS = 32           # room names are 1 to this many characters
MAX_TOPIC_CHARS = 300         # a room's topic
MAX_AWAY_CHARS = 120          # an away message
MAX_ROOMS_PER_USER = 50       # rooms one user may be in at once
MAX_IDENTITY_CHARS = 64       # a client's identity token, as sent in hello
DEFAULT_SCROLLBACK = 100      # messages shown from a room's history on joining it
MAX_REPLAY = 1000             # messages replayed at most on reconnect, per request
MAX_PAGE = 200                # messages per history page
RESUME_GRACE_S = 60.0         # a lost user's name and rooms wait this long for it to return
UPLOAD_WAIT_S = 60            # an upload address must be used within this
MAX_MODERATION_MINUTES = 10 * 366 * 24 * 60  # the longest ban or mute with an end: ten years


def name_key(name):
    """Return the form in which two names count as the same: case and width folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def _check_word(value, field, limit, what):
    if not isinstance(value, str):
        raise ProtocolError("bad_field", 'The field "%s" must be a string.' % field)
    if not 1 <= len(value) <= limit or not all(ch.isalnum() or ch in "_-." for ch in value):
        raise ProtocolError(
            "bad_" + field,
            "A %s is 1 to %d letters, digits, '_', '-' or '.', without spaces." % (what, limit),
        )


def check_name(name):
    """Raise ProtocolError unless `name` is a valid user name.

    A name is 1-32 characters, each a letter or digit of any script, or one of
    "_", "-", "." (so names never hold spaces, quotes or control characters).
    """
    _check_word(name, "name", MAX_NAME_CHARS, "name")


def check_room(room):
    """Raise ProtocolError unless `room` is a valid room name (same rule as user names)."""
    _check_word(room, "room", MAX_ROOM_CHARS, "room name")


_ALLOWED_CONTROLS = frozenset("\n\t")


def clean_text(text, limit=MAX_TEXT_BYTES, field="text"):
    """Return a text with line ends made "\\n"; raise ProtocolError if unfit to send."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ProtocolError("empty_text", "The message is empty.")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError("bad_text", "The %s holds invalid characters (lone surrogates)." % field) from None
    if size > limit:
        raise ProtocolError("text_too_long", "The %s is %d bytes; the limit is %d." % (field, size, limit))
    if not text.isprintable() and any(
        unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS for ch in text
    ):
        raise ProtocolError("bad_text", "The %s holds control characters." % field)
    return text


class Event:
    """One thing that happened, as plain fields; each door encodes it once, for everybody."""

    __slots__ = ("fields", "by_encoder", "withdrawn")

    def __init__(self, fields):
        self.fields = fields
        self.withdrawn = False  # a message the store could not keep: nobody may get it any more
        self.by_encoder = {}  # encoder -> bytes (Outbox.deliver_locked reads it directly: hot path)

    def encoded(self, encoder):
        """Return encoder(fields), computed on first use and then reused."""
        data = self.by_encoder.get(encoder)
        if data is None:
            data = self.by_encoder[encoder] = encoder(self.fields)
        return data

    def encodings(self):
        """Return every encoding made so far (to withdraw a message that could not be stored)."""
        return list(self.by_encoder.values())


def _now():
    return round(time.time(), 3)


class Limits:
    """The server's limits against floods and hogs. Each can be set on the command line.

    A rate of 0 turns that rate limit off (benchmarks do that).
    """

    # (attribute, default, help): the command line makes --attribute-name options of these.
    TABLE = (
        ("messages_per_s", 5.0, "messages one connection may send per second, on average"),
        ("message_burst", 30, "messages it may send at once before that rate applies"),
        ("kbytes_per_s", 64.0, "kilobytes of messages it may send per second, on average"),
        ("kbyte_burst", 512, "kilobytes it may send at once before that rate applies"),
        ("flood_strikes", 20, "refused messages within a minute before the connection is dropped"),
        ("max_per_ip", 64, "connections from one address (this computer's own are not counted)"),
        ("max_connections", 10000, "connections in all"),
        ("slow_reader_s", SLOW_S, "seconds a frame may wait for a client that does not read it, before "
         "that client is dropped as too slow"),
        ("max_rooms", MAX_ROOMS_PER_USER, "rooms one user may be in at once"),
        ("renames_per_minute", 5, "name changes one user may make per minute"),
        ("max_file_mb", 25, "megabytes in one shared file (0: nobody may share files)"),
        ("files_mb", 2048, "megabytes of shared files the server keeps; the oldest go first"),
        ("uploads_per_minute", 10, "files one user may share per minute"),
    )

    def __init__(self, **values):
        for attribute, default, _ in self.TABLE:
            setattr(self, attribute, values.pop(attribute, default))
        if values:
            raise TypeError("unknown limits: %s" % ", ".join(sorted(values)))

    @property
    def max_file_bytes(self):
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def files_bytes(self):
        return int(self.files_mb * 1024 * 1024)


class TokenBucket:
    """A rate with a burst: take() spends tokens that come back at `rate` per second."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate, capacity):
        self.rate, self.capacity = float(rate), float(capacity)
        self.tokens, self.stamp = self.capacity, time.monotonic()

    def take(self, amount=1.0):
        """Spend amount and return 0, or spend nothing and return the seconds to wait."""
        if self.rate <= 0:
            return 0.0  # no limit
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate


def take_message(messages, size_bucket, size):
    """Spend one message and its bytes from two TokenBuckets and return 0, or spend nothing and return the wait.

    The server's flood guard and the clients' pacer both count this way.
    """
    wait = messages.take(1)
    if not wait:
        wait = size_bucket.take(size)
        if wait:
            messages.tokens += 1  # not sent after all
    return wait


class RecentEvents:
    """Counts events within a sliding window of seconds; holds nothing until the first one."""

    __slots__ = ("window_s", "_times")

    def __init__(self, window_s):
        self.window_s = window_s
        self._times = None  # made on first use: most connections never err or flood

    def add(self):
        """Note one event now; return how many fell within the window."""
        if self._times is None:
            self._times = collections.deque()
        self._times.append(time.monotonic())
        return self.recent()

    def recent(self):
        """Return how many events fell within the window, up to now."""
        if not self._times:
            return 0
        oldest = time.monotonic() - self.window_s
        while self._times and self._times[0] < oldest:
            self._times.popleft()
        return len(self._times)


class FloodGuard:
    """One connection's allowance of messages and bytes, and its record of refusals.

    Used only from that connection's own thread, so it needs no lock.
    """

    def __init__(self, limits):
        self.messages = TokenBucket(limits.messages_per_s, limits.message_burst)
        self.bytes = TokenBucket(limits.kbytes_per_s * 1024, max(limits.kbyte_burst * 1024, MAX_TEXT_BYTES))
        self.renames = TokenBucket(limits.renames_per_minute / 60.0, limits.renames_per_minute)
        self.strike_limit = limits.flood_strikes
        self.strikes = RecentEvents(60.0)

    def check_message(self, size):
        """Raise rate_limited (or, after too many, a fatal flood error) if over the limit."""
        wait = take_message(self.messages, self.bytes, size)
        if wait:
            self._refuse("You are sending too fast: this message was not sent. Try again in %.0f s."
                         % max(1, wait + 0.5))

    def check_rename(self):
        wait = self.renames.take(1)
        if wait:
            self._refuse("You are changing names too often. Try again in %.0f s." % max(1, wait + 0.5))

    def _refuse(self, text):
        if self.strikes.add() > self.strike_limit:
            raise ProtocolError("flooding", "You kept sending too fast; disconnecting.", fatal=True,
                                reason="flood")
        raise ProtocolError("rate_limited", text, counts=False)


class User:
    """One person in the chat, as the hub keeps them; only the hub changes it, under its lock.

    `conn` is the connection the hub delivers to: any object with deliver_locked(event)
    and close_locked(), neither of which may block or call back into the hub. A
    reconnect moves the record to the new connection.
    """

    __slots__ = ("name", "key", "rooms", "away", "identity", "resume_token", "lost_at", "flood", "address",
                 "conn", "seat", "echoes", "uploads")

    def __init__(self, name, conn, address=None):
        self.name = name
        self.key = name_key(name)  # kept, so the hot paths never fold the name again
        self.rooms = {}  # room key -> Room
        self.away = None  # the away text, or None
        self.identity = None  # a digest of the client's identity token, or None
        self.resume_token = secrets.token_urlsafe(16)
        self.lost_at = None  # (time.monotonic(), reason) while lost within the grace period
        self.flood = None  # the FloodGuard of the current connection
        self.address = address  # the peer's IP address, for bans by address
        self.conn = conn
        self.seat = Seat(self)  # what the connection that holds this user passes to the hub
        self.echoes = True  # gets its own room messages back (an IRC client without echo-message does not)
        self.uploads = RecentEvents(60.0)  # files offered in the last minute


class Seat:
    """A connection's hold on a User: what its session passes to the hub's methods.

    A reconnect from elsewhere moves the User to a new Seat and empties the old
    one, so frames the replaced connection still handles change nothing.
    """

    __slots__ = ("user",)

    def __init__(self, user):
        self.user = user  # None once the user is another connection's, or gone

    @property
    def name(self):
        return self.user.name if self.user is not None else None


class Room:
    """A room: its users in joining order, and its topic."""

    __slots__ = ("name", "members", "topic", "topic_set")

    def __init__(self, name, topic=None):
        self.name = name
        self.members = {}  # name_key -> User
        self.topic = topic
        self.topic_set = None  # (who, when) the topic was set while the server ran; not kept across restarts


class _Page:
    """A place in a _Holding for history read from the store, and what was read."""

    __slots__ = ("kind", "args", "fields")

    def __init__(self, kind, *args):
        self.kind, self.args, self.fields = kind, args, []


class _Holding:
    """Stands in for a user's connection while the history owed to it is read without the lock.

    What the hub delivers meanwhile waits here in order, a _Page where each piece of
    history goes; _release_locked() then hands all of it to the connection.
    """

    __slots__ = ("conn", "items", "pages", "closing")

    def __init__(self, conn):
        self.conn, self.items, self.pages, self.closing = conn, [], [], False

    def deliver_locked(self, event):
        self.items.append(event)

    def close_locked(self):
        self.closing = True

    def add_page(self, kind, *args):
        page = _Page(kind, *args)
        self.items.append(page)
        self.pages.append(page)


class Upload(NamedTuple):
    """A file somebody asked to share, waiting for its bytes at a one-time address."""

    user: object  # the sender's User: the file is announced if they are still here (renamed or
                  # reconnected meanwhile: the upload is a connection of its own)
    name: str     # cleaned
    size: int
    room: object  # the room's name, or None for a direct message
    to: object    # the recipient's name, or None
    ref: object
    until: float  # time.monotonic() after which the address is no longer good


class ChatHub:
    """Who is in the chat and in which rooms, and the fan-out of what they say.

    Every public method takes the lock; what they deliver, they deliver while
    holding it, so every user sees events in one order. A store (see Storage)
    keeps messages, topics, known users, bans and operators; the hub keeps the
    small tables in memory and reads history only without the lock (see join()),
    so no SQLite statement runs while the lock is held. A message is stored before
    anybody gets it: the writers commit before they send (commit()), and a message
    that could not be stored is withdrawn and its sender told (not_stored).
    """

    def __init__(self, server_name="LocalChat", store=None, scrollback=DEFAULT_SCROLLBACK,
                 resume_grace_s=RESUME_GRACE_S, limits=None, password=None, files=None):
        self.server_name = server_name
        self.files = files  # a FileStore, or None: nobody may share files
        self.web_base = ""  # "http://192.168.1.7:13333": file messages' text holds whole addresses
        self.store = store if store is not None else MemoryStore()
        self.scrollback = scrollback
        self.resume_grace_s = resume_grace_s
        self.limits = limits if limits is not None else Limits()
        self.password = password  # doors check it before join(); the hub only says whether there is one
        saved = self.store.load()
        self._topics = saved["topics"]  # room key -> topic, for rooms with none open now too
        self._known = saved["users"]  # name key -> (name, identity) of everybody who has been here
        self.moderation = Moderation(self, saved["bans"], saved["operators"])
        self.lock = threading.Lock()
        self._users = {}  # name_key -> User, lost ones in their grace period included
        self._rooms = {}  # room key -> Room, only rooms with users
        self._next_id = self.store.last_id() + 1
        self._closed = False
        # id(frame bytes) -> (those bytes, when): frames of messages that could not be stored. By
        # identity, not equality: an IRC or text line holds no id, and the same words said again
        # and stored make equal bytes. Every recipient gets the very object Event.encoded made;
        # holding it here keeps its id from being reused.
        self._withdrawn = {}
        self._withdrawn_frames = frozenset()  # the ids, for the writers to skip
        self.store.on_unstored = self._unstored
        self._uploads = {}  # token -> Upload: files asked for whose bytes have not come yet

    # -- arriving and leaving ------------------------------------------------------

    def join(self, conn, name, identity=None, resume=None, last_id=None, rooms=None, address=None, reclaim=False,
             echo=True):
        """Admit a connection under `name`; return its Seat. Raises ProtocolError.

        Welcomes it, replays history, tells the others. `resume` is the token of a
        welcome that an earlier connection got: if that user is still here (or lost,
        within its grace period), conn takes its place silently and gets what it
        missed after `last_id`. With `reclaim` (a door with no resume token: IRC), a
        user lost within its grace period is taken back from the same address.
        Otherwise `rooms` are the rooms to rejoin (after a server restart). `echo`
        False: the user's own room messages are not sent back to it (set_echo()).
        The history is read without the lock: meanwhile what the hub delivers to
        this user waits in a _Holding, so nothing comes out of order.
        """
        check_name(name)
        if not isinstance(last_id, int) or isinstance(last_id, bool):
            last_id = None
        with self.lock:
            user, holding = self._admit_locked(conn, name, identity, resume, last_id, rooms, address, reclaim)
            user.echoes = echo
            upto = self._next_id - 1
        try:
            self._read_pages(holding, upto)
        finally:  # whatever happened, the user's connection gets what waited for it
            with self.lock:
                self._release_locked(user, holding)
        return user.seat

    def _admit_locked(self, conn, name, identity, resume, last_id, rooms, address, reclaim=False):
        if self._closed:
            raise ProtocolError("shutting_down", "The server is shutting down.", fatal=True)
        key = name_key(name)
        old = self._users.get(key)
        if old is not None and not (resume and resume == old.resume_token) and not (
                reclaim and old.lost_at is not None and old.address == address and old.identity == identity):
            raise self._name_taken(name, old)
        self.moderation.check_join_locked(name, identity, address)
        if old is not None:
            user = old
            self._take_over_locked(user)
        else:
            user = self._users[key] = User(name, conn, address)
        user.name, user.identity, user.lost_at, user.address = name, identity, None, address
        user.flood = FloodGuard(self.limits)
        holding = user.conn = _Holding(conn)
        self._remember_locked(user)
        joining = [room.name for room in user.rooms.values()] if old else self._rooms_to_rejoin(rooms)
        joining = joining or [GENERAL_ROOM]
        holding.deliver_locked(Event(self._welcome_fields(user, joining)))
        if old is not None:  # resumed: who came and went meanwhile was told to the lost connection
            for room in user.rooms.values():
                holding.deliver_locked(Event(self._room_fields(room)))
        else:
            for room_name in joining:
                self._enter_room_locked(user, room_name, replay=last_id is None)
        holding.add_page("missed", last_id, list(user.rooms), identity)
        holding.deliver_locked(Event({"type": "synced", "last_id": self._next_id - 1}))
        return user, holding

    def _name_taken(self, name, holder):
        if holder.lost_at is not None:
            text = ("The name '%s' is kept for a moment for its owner, who lost the connection. "
                    "Please choose another name or try again shortly." % name)
        else:
            text = "The name '%s' is already taken here. Please choose another name." % name
        return ProtocolError("name_taken", text, fatal=True)

    def _rooms_to_rejoin(self, rooms):
        names = []
        for room_name in (rooms or [])[:MAX_ROOMS_PER_USER]:
            if isinstance(room_name, str):
                try:
                    check_room(room_name)
                except ProtocolError:
                    continue
                names.append(room_name)
        return names

    def _take_over_locked(self, user):
        """A new connection takes user's place; one still open is told it was replaced."""
        user.seat.user = None  # what the old connection still sends is ignored
        user.seat = Seat(user)
        if user.lost_at is None:
            user.conn.deliver_locked(Event({"type": "bye", "reason": "replaced",
                                            "text": "You connected again from somewhere else."}))
            user.conn.close_locked()

    def _remember_locked(self, user):
        """Keep the name with its identity: direct messages to it wait for that identity."""
        if user.identity is not None or user.key not in self._known:
            self._known[user.key] = (user.name, user.identity)
            self.store.save_user(user.key, user.name, user.identity)

    def _seated(self, seat):
        """Return the User a Seat holds, or None once it holds none (taken over, or gone).

        Called with the lock held. A connection that was replaced may still be
        handling frames it had read: its seat is empty, so they change nothing.
        """
        user = seat.user
        return user if user is not None and self._users.get(user.key) is user else None

    def _read_pages(self, holding, upto):
        """Read the history a _Holding waits for, up to message `upto`. Runs without the lock.

        A history that cannot be read (a broken disk) leaves its page empty: the
        person joins all the same, and the log says why.
        """
        for page in holding.pages:
            try:
                if page.kind == "room":
                    room_key, limit = page.args
                    page.fields = self.store.room_history(room_key, limit, before=upto + 1)
                else:  # "missed": what followed last_id, and direct messages that waited
                    page.fields = self._missed(upto, *page.args)
            except (sqlite3.Error, OSError) as error:
                log.error("history: cannot read it for a join: %s", error)

    def _missed(self, upto, last_id, room_keys, identity):
        """Return what followed last_id in the rooms, and direct messages that waited for identity."""
        missed = []
        if last_id is not None:
            missed = self.store.since(last_id, room_keys, identity, MAX_REPLAY, upto)
        seen = set(fields["id"] for fields in missed)
        missed += [fields for fields in self.store.undelivered(identity, upto) if fields["id"] not in seen]
        missed.sort(key=lambda fields: fields["id"])
        if identity is not None:
            self.store.mark_delivered(identity, upto)
        return missed

    def _release_locked(self, user, holding):
        """Hand what waited in the holding to the connection, history in its place."""
        conn = holding.conn
        for item in holding.items:
            if isinstance(item, _Page):
                for fields in item.fields:
                    conn.deliver_locked(self._replayed(fields))
                shown = getattr(conn, "history_shown_locked", None)  # a door that marks where history ends
                if item.fields and shown is not None:
                    shown()
            elif not item.withdrawn:
                conn.deliver_locked(item)
        if user.conn is holding:  # else another connection took the user over meanwhile
            user.conn = conn
        if holding.closing:
            conn.close_locked()

    def leave(self, seat, reason, message=None):
        """The connection holding this seat ended. Return True if its user was here.

        `message`: what a person leaving said (IRC's QUIT :message), told to the others.

        A lost connection ("lost", "timeout") keeps the name and rooms for the grace
        period, so the owner can come back unnoticed; others hear of it only when
        the grace period ends (see expire()). Any other reason is final at once.
        """
        with self.lock:
            user = self._seated(seat) if seat is not None else None
            if user is None:  # taken over by another connection, kicked, or never here
                return False
            if reason in ("lost", "timeout") and self.resume_grace_s > 0 and not self._closed:
                user.lost_at = (time.monotonic(), reason)
                return True
            self._remove_locked(user, reason, message=_parting_words(message))
            return True

    def expire(self, now=None):
        """End the grace period of lost users whose time is up; return how many."""
        now = time.monotonic() if now is None else now
        with self.lock:
            expired = [u for u in self._users.values()
                       if u.lost_at is not None and now - u.lost_at[0] >= self.resume_grace_s]
            for user in expired:
                self._remove_locked(user, user.lost_at[1])
            return len(expired)

    def _remove_locked(self, user, reason, text=None, message=None):
        """Take user out of every room and tell everyone who shared one (text: a kick's or ban's sentence)."""
        del self._users[user.key]
        audience = self._sharing(user)
        for room_key in list(user.rooms):
            self._drop_from_room(user, room_key)
        if not self._closed:
            fields = {"type": "left", "name": user.name, "reason": reason, "ts": _now()}
            if text:
                fields["text"] = text
            if message:
                fields["message"] = message
            event = Event(fields)
            for other in audience:
                other.conn.deliver_locked(event)

    def close(self, text="The server is shutting down."):
        """Tell every user goodbye; from now on nobody may join."""
        with self.lock:
            self._closed = True
            event = Event({"type": "bye", "reason": "shutdown", "text": text})
            for user in self._users.values():
                user.conn.deliver_locked(event)

    # -- rooms ---------------------------------------------------------------------

    def join_room(self, seat, room_name):
        """Put user in a room (creating it), show it the room and its history."""
        check_room(room_name)
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            if name_key(room_name) in user.rooms:
                raise ProtocolError("already_in_room", "You are already in %s." % room_name)
            if len(user.rooms) >= self.limits.max_rooms:
                raise ProtocolError("too_many_rooms", "You may be in at most %d rooms." % self.limits.max_rooms)
            holding = user.conn = _Holding(user.conn)
            self._enter_room_locked(user, room_name, replay=True)
            upto = self._next_id - 1
        try:
            self._read_pages(holding, upto)
        finally:
            with self.lock:
                self._release_locked(user, holding)

    def leave_room(self, seat, room_name, message=None):
        """Take user out of a room; the room and user hear of it (and of `message`, what the user said)."""
        message = _parting_words(message)
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            room = self._user_room(user, room_name)
            fields = {"type": "left", "name": user.name, "room": room.name, "reason": "part", "ts": _now()}
            if message:
                fields["message"] = message
            event = Event(fields)
            self._deliver_to_room(room, event)
            self._drop_from_room(user, name_key(room.name))

    def _enter_room_locked(self, user, room_name, replay):
        """Put user in the room; with replay, its history follows (user.conn is a _Holding)."""
        key = name_key(room_name)
        room = self._rooms.get(key)
        if room is None:
            room = self._rooms[key] = Room(room_name, self._topics.get(key))
        self._deliver_to_room(room, Event({"type": "joined", "name": user.name, "room": room.name,
                                           "ts": _now()}))
        room.members[user.key] = user
        user.rooms[key] = room
        user.conn.deliver_locked(Event(self._room_fields(room)))
        if replay:
            user.conn.add_page("room", key, self.scrollback)

    def _drop_from_room(self, user, room_key):
        room = user.rooms.pop(room_key)
        room.members.pop(user.key, None)
        if not room.members:
            del self._rooms[room_key]

    def _user_room(self, user, room_name):
        """Return the Room user is in by that name; raise not_in_room otherwise."""
        if not isinstance(room_name, str) or name_key(room_name) not in user.rooms:
            raise ProtocolError("not_in_room", "You are not in a room called %s." % printable(str(room_name), 40))
        return user.rooms[name_key(room_name)]

    def _room_fields(self, room):
        fields = {"type": "room", "room": room.name, "topic": room.topic,
                  "users": self._names(room.members), "away": self._away(room.members.values())}
        self._with_topic_set(fields, room)
        return self._with_operators(fields, room.members)

    @staticmethod
    def _with_topic_set(fields, room):
        """Add who set the topic and when ("set_by", "set_at"), when it was set while the server ran."""
        if room.topic and room.topic_set is not None:
            fields["set_by"], fields["set_at"] = room.topic_set
        return fields

    def _with_operators(self, fields, users_by_key):
        """Add "ops", the operators among these users, when there are any."""
        ops = self.moderation.operators_among(users_by_key)
        if ops:
            fields["ops"] = ops
        return fields

    def set_topic(self, seat, room_name, topic):
        """Set a room's topic (kept across restarts) and tell the room."""
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            room = self._user_room(user, room_name)
            topic = clean_text(topic, MAX_TOPIC_CHARS, "topic").replace("\n", " ") if topic else None
            room.topic = self._topics[name_key(room.name)] = topic
            self.store.save_topic(name_key(room.name), topic)
            event = Event({"type": "topic", "room": room.name, "topic": topic, "by": user.name, "ts": _now()})
            room.topic_set = (user.name, event.fields["ts"])
            self._deliver_to_room(room, event)

    def topic(self, seat, room_name):
        """Tell user a room's topic."""
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            room = self._user_room(user, room_name)
            fields = {"type": "topic", "room": room.name, "topic": room.topic}
            user.conn.deliver_locked(Event(self._with_topic_set(fields, room)))

    def invite(self, seat, name, room_name):
        """Ask somebody here into a room one is in: both hear of it (IRC's INVITE)."""
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            room = self._user_room(user, room_name)
            guest = self._users.get(name_key(name)) if isinstance(name, str) else None
            if guest is None or guest.lost_at is not None:
                raise ProtocolError("unknown_user", "Nobody called %s is here." % printable(str(name), 40))
            if guest.key in room.members:
                raise ProtocolError("already_in_room", "%s is already in %s." % (guest.name, room_label(room.name)))
            event = Event({"type": "invite", "from": user.name, "to": guest.name, "room": room.name, "ts": _now()})
            user.conn.deliver_locked(event)
            guest.conn.deliver_locked(event)

    def set_echo(self, seat, on):
        """Send the user its own room messages back, or not (IRC's echo-message, asked for late)."""
        with self.lock:
            user = self._seated(seat)
            if user is not None:
                user.echoes = on

    def has_room(self, room_name):
        """Return True if somebody is in a room by that name now."""
        with self.lock:
            return isinstance(room_name, str) and name_key(room_name) in self._rooms

    def rooms(self, seat):
        """Tell user which rooms exist, with their sizes and topics."""
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            listing = [{"name": r.name, "users": len(r.members), "topic": r.topic}
                       for r in sorted(self._rooms.values(), key=lambda r: name_key(r.name))]
            user.conn.deliver_locked(Event({"type": "rooms", "rooms": listing}))

    # -- speaking ------------------------------------------------------------------

    def say(self, seat, text, ref=None, room=None, to=None, action=False, notice=False):
        """Send a message to a room (general by default) or, with `to`, to one user.

        The sender gets the message too: the echo confirms it. It is queued for the
        store here and committed by the writers before anybody gets it.
        """
        text = clean_text(text)
        user = seat.user
        if user is None:
            return
        user.flood.check_message(len(text.encode("utf-8")))
        # automatic (IRC's NOTICE): no client answers it by itself
        kind = {"action": True} if action else {"notice": True} if notice else {}
        with self.lock:
            if self._seated(seat) is not user:
                return
            self._post_locked(user, text, kind, ref, room, to)

    def _post_locked(self, user, text, extra, ref, room, to):
        """Make a message of what user said, store it and deliver it; return its Event."""
        self.moderation.check_speak_locked(user)
        fields = {"type": "message", "id": self._next_id, "ts": _now(), "from": user.name}
        if to is None:
            target = self._user_room(user, GENERAL_ROOM if room is None else room)
            fields["room"] = target.name
        else:
            recipient, to_name, to_identity = self._recipient(to)
            fields["to"] = to_name
            if recipient is not None and recipient.away is not None:
                fields["away"] = recipient.away  # the sender hears it (IRC's 301); not stored
            if recipient is None or recipient.lost_at is not None:
                if to_identity is None:  # nothing to deliver it to later
                    raise ProtocolError("unknown_user", "%s lost the connection, and their client cannot "
                                        "receive messages later." % to_name)
                fields["queued"] = True  # delivered when that user comes back
        fields["text"] = text
        fields.update(extra)
        if ref is not None:
            fields["ref"] = ref
        self._next_id += 1
        event = Event(fields)
        if to is None:
            self.store.add_message(fields, token=(event, user))
            self._deliver_to_room(target, event, skip=None if user.echoes else user)
            return event
        live = not fields.get("queued")
        self.store.add_message(fields, user.identity, to_identity, delivered=live, token=(event, user))
        user.conn.deliver_locked(event)
        if live and recipient is not user:
            recipient.conn.deliver_locked(event)
        return event

    # -- files -------------------------------------------------------------------------

    def offer_upload(self, seat, name, size, ref=None, room=None, to=None):
        """Check that user may share a file of this size there; return the upload_ready fields.

        Everything that can refuse it refuses here, before any of its bytes are sent.
        """
        max_bytes = self.limits.max_file_bytes if self.files is not None else 0
        if max_bytes <= 0:
            raise ProtocolError("files_off", "This chat's server does not take files.")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError("bad_field", 'The field "size" must be the file\'s size in bytes.')
        name = clean_file_name(name)
        if size > max_bytes:
            raise ProtocolError("file_too_large", "%s is %s; this chat takes files of up to %s." % (
                name, file_size_text(size), file_size_text(max_bytes)))
        with self.lock:
            user = self._seated(seat)
            if user is None:
                return None
            self.moderation.check_speak_locked(user)
            if to is None:
                room = self._user_room(user, GENERAL_ROOM if room is None else room).name
            else:
                to = self._recipient(to)[1]
            if user.uploads.recent() >= self.limits.uploads_per_minute > 0:
                raise ProtocolError("too_many_uploads", "You have shared %s in the last minute; wait a little "
                                    "before the next one." % _count_words(user.uploads.recent(), "file"))
            user.uploads.add()
            now = time.monotonic()
            self._uploads = {token: upload for token, upload in self._uploads.items() if upload.until > now}
            token = secrets.token_urlsafe(FILE_ID_BYTES)
            self._uploads[token] = Upload(user, name, size, room, to, ref, now + UPLOAD_WAIT_S)
        fields = {"type": "upload_ready", "url": "/upload/" + token, "expires_s": UPLOAD_WAIT_S}
        if ref is not None:
            fields["ref"] = ref
        return fields

    def take_upload(self, token):
        """Return the Upload waiting at this address and forget it (one use), or None."""
        with self.lock:
            upload = self._uploads.pop(token, None)
        return upload if upload is not None and upload.until > time.monotonic() else None

    def share_file(self, upload, file_id, kind):
        """Announce a file whose bytes have all come; return the message's Event.

        Raises ProtocolError when the sender may no longer share it there (gone, muted,
        left the room). The caller then calls commit() and checks event.withdrawn.
        """
        url = "/files/%s/%s" % (file_id, urllib.parse.quote(upload.name))
        shared = {"name": upload.name, "size": upload.size, "type": kind, "url": url}
        text = "%s (%s) %s%s" % (upload.name, file_size_text(upload.size), self.web_base, url)
        user = upload.user
        with self.lock:
            if self._users.get(user.key) is not user:
                raise ProtocolError("gone", "You left the chat before the file had come; it was not shared.")
            return self._post_locked(user, text, {"file": shared}, upload.ref, upload.room, upload.to)

    def _replayed(self, fields):
        """Return a stored message as the event that replays it (a waiting one is no longer queued).

        A file the server no longer keeps is marked expired, without its address.
        """
        fields = dict(fields, replay=True)
        fields.pop("queued", None)
        shared = fields.get("file")
        if shared is not None and "url" in shared and (self.files is None or self.files.about(
                shared["url"].split("/")[2]) is None):
            fields["file"] = {"name": shared["name"], "size": shared["size"], "type": shared["type"], "expired": True}
        return Event(fields)

    def _recipient(self, to):
        """Return (user or None, name, identity) for a direct message to `to`; raise if unknown."""
        if not isinstance(to, str):
            raise ProtocolError("bad_field", 'The field "to" must be a string.')
        recipient = self._users.get(name_key(to))
        if recipient is not None:
            return recipient, recipient.name, recipient.identity
        known = self._known.get(name_key(to))
        if known is None:
            raise ProtocolError("unknown_user", "Nobody called %s has been here." % printable(to, 40))
        if known[1] is None:
            raise ProtocolError("unknown_user", "%s is not here, and their client cannot receive messages "
                                "later." % known[0])
        return None, known[0], known[1]

    def commit(self):
        """Store what is queued; return the frames not to send. Runs without the lock.

        The writers call it before they send what they took, so nothing reaches a
        socket before it is stored; the housekeeping thread calls it too.
        """
        self.store.flush()
        if self._withdrawn and time.monotonic() > min(when for _, when in self._withdrawn.values()) + \
                self._withdrawn_keep_s():
            with self.lock:
                self._forget_withdrawn_locked()
        return self._withdrawn_frames

    def _unstored(self, tokens):
        """The store could not keep these messages: nobody may get them, their senders hear why.

        Called by the store, from whichever thread flushed, before that flush returns.
        """
        with self.lock:
            now = time.monotonic()
            for event, sender in tokens:
                event.withdrawn = True  # for a holding that has not encoded it yet
                for data in event.encodings():
                    self._withdrawn[id(data)] = (data, now)
                if self._users.get(sender.key) is sender:
                    error = {"type": "error", "code": "not_stored", "text": "Your message could not be saved, "
                             "so nobody got it. The server's disk may be full; try again later."}
                    if "ref" in event.fields:
                        error["ref"] = event.fields["ref"]
                    sender.conn.deliver_locked(Event(error))
            self._forget_withdrawn_locked()

    def _withdrawn_keep_s(self):
        # A frame waits in no outbox longer than slow_reader_s before its reader is dropped.
        return 2 * self.limits.slow_reader_s + 10.0

    def _forget_withdrawn_locked(self):
        oldest = time.monotonic() - self._withdrawn_keep_s()
        self._withdrawn = {key: kept for key, kept in self._withdrawn.items() if kept[1] > oldest}
        self._withdrawn_frames = frozenset(self._withdrawn)

    def users(self, seat, room_name=None):
        """Tell user who is here: everybody, or the people in one room."""
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            if room_name is None:
                people = self._users
                fields = {"type": "users"}
            else:
                room = self._user_room(user, room_name)
                people = room.members
                fields = {"type": "users", "room": room.name}
            fields["users"] = self._names(people)
            fields["away"] = self._away(people.values())
            user.conn.deliver_locked(Event(self._with_operators(fields, people)))

    def history(self, seat, room_name=None, with_name=None, before=None, limit=MAX_PAGE):
        """Send user a page of older messages of a room or of a direct conversation.

        The page is read without the lock, then delivered with history_end.
        """
        limit = max(1, min(MAX_PAGE, limit))
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            if with_name is not None:
                end = {"type": "history_end", "with": with_name}
                what = ("with", user.identity, name_key(with_name))
            else:
                room = self._user_room(user, GENERAL_ROOM if room_name is None else room_name)
                end = {"type": "history_end", "room": room.name}
                what = ("room", name_key(room.name))
        page = self._older(what, limit + 1, before)  # one more says whether anything older is left
        more = len(page) > limit
        page = page[1:] if more else page  # the extra one is the oldest
        end.update(count=len(page), more=more)
        with self.lock:
            for fields in page:
                user.conn.deliver_locked(self._replayed(fields))
            user.conn.deliver_locked(Event(end))

    def _older(self, what, limit, before):
        try:
            if what[0] == "with":
                return self.store.direct_history(what[1], what[2], limit, before)
            return self.store.room_history(what[1], limit, before)
        except (sqlite3.Error, OSError) as error:  # an empty page: the chat goes on
            log.error("history: cannot read a page of it: %s", error)
            return []

    # -- names and presence ----------------------------------------------------------

    def rename(self, seat, new_name):
        """Change user's name; everybody hears of it."""
        check_name(new_name)
        user = seat.user
        if user is None or new_name == user.name:
            return  # the same name, case and all: nothing changes, nobody is told
        user.flood.check_rename()
        with self.lock:
            if self._seated(seat) is not user:
                return
            old_name, old_key, new_key = user.name, user.key, name_key(new_name)
            holder = self._users.get(new_key)
            if holder is not None and holder is not user:
                error = self._name_taken(new_name, holder)
                error.fatal = False  # a refused rename is no reason to end the connection
                raise error
            del self._users[old_key]
            self._users[new_key] = user
            for room in user.rooms.values():
                room.members = {(new_key if k == old_key else k): u for k, u in room.members.items()}
            user.name, user.key = new_name, new_key
            self.moderation.renamed(old_name, new_name)
            self._remember_locked(user)
            self._deliver_to_all(Event({"type": "renamed", "old": old_name, "name": new_name, "ts": _now()}))

    def set_away(self, seat, text):
        """Mark user away (with a short text) or back (text None); everybody hears of it."""
        if text is not None:
            text = clean_text(text, MAX_AWAY_CHARS, "away message").replace("\n", " ")
        with self.lock:
            user = self._seated(seat)
            if user is None:  # another connection took this user over, or it left
                return
            user.away = text
            self._deliver_to_all(Event({"type": "away", "name": user.name, "text": text, "ts": _now()}))

    def count(self):
        with self.lock:
            return len(self._users)

    # -- helpers (called with the lock held) -------------------------------------------

    def _welcome_fields(self, user, rooms):
        return {
            "type": "welcome",
            "name": user.name,
            "users": self._names(self._users),
            "rooms": rooms,
            "server": self.server_name,
            "version": PROTOCOL_VERSION,
            "max_text_bytes": MAX_TEXT_BYTES,
            "resume": user.resume_token,
            "last_id": self._next_id - 1,
            "operator": self.moderation.is_operator(user),
            "limits": {"messages_per_s": self.limits.messages_per_s, "message_burst": self.limits.message_burst,
                       "kbytes_per_s": self.limits.kbytes_per_s, "kbyte_burst": self.limits.kbyte_burst,
                       "max_file_bytes": self.limits.max_file_bytes if self.files is not None else 0,
                       "uploads_per_minute": self.limits.uploads_per_minute},
            "ts": _now(),
        }

    @staticmethod
    def _names(users_by_key):
        """Return the names in a {name_key: User} dict, sorted by their keys.

        The keys are computed once, on joining: folding every name again for every
        join made a join storm quadratic in unicodedata calls.
        """
        return [users_by_key[key].name for key in sorted(users_by_key)]

    def _away(self, users):
        return {u.name: u.away for u in users if u.away is not None}

    def _sharing(self, user):
        """Return everybody who shares a room with user (user excluded)."""
        audience = {}
        for room in user.rooms.values():
            audience.update(room.members)
        audience.pop(user.key, None)
        return list(audience.values())

    def _deliver_to_room(self, room, event, skip=None):
        if skip is None:  # the hot path: one call per recipient and nothing else
            for user in room.members.values():
                user.conn.deliver_locked(event)
            return
        for user in room.members.values():
            if user is not skip:
                user.conn.deliver_locked(event)

    def _deliver_to_all(self, event):
        for user in self._users.values():
            user.conn.deliver_locked(event)


class Moderation:
    """Operators, kicks, bans and mutes: the powers of the server console and of operators.

    Public methods take the hub's lock and run on the caller's thread (the console's,
    or an operator's connection's); they log after letting go of it. `by` is the
    Seat of the connection asking, or None for the console, which may do everything. Bans and
    operators are kept in memory and saved in the hub's store, so they hold across
    restarts; mutes last while the server runs.
    """

    def __init__(self, hub, bans=None, operators=None):
        self.hub = hub
        self._bans = bans if bans is not None else {}  # (kind, value) -> (until or None, reason)
        self._operators = operators if operators is not None else {}  # name_key -> identity (None until bound)
        self._mutes = {}  # name_key -> time.time() when the mute ends, or None for ever
        self.own_addresses = set()  # this computer's LAN addresses (the server sets them): never banned

    # -- checks the hub makes (lock held) --------------------------------------------

    def check_join_locked(self, name, identity, address):
        """Refuse a banned name or address; bind a waiting --op name to this identity."""
        ban = self._find_ban(name_key(name), address, identity, time.time())
        if ban is not None:
            raise ProtocolError("banned", "You are banned from this chat%s%s." % (
                _until_words(ban[0]), ": " + ban[1] if ban[1] else ""), fatal=True)
        key = name_key(name)
        if key in self._operators and self._operators[key] is None and identity is not None:
            self._set_operator_locked(key, identity)  # --op NAME: the first to come with an identity

    def _find_ban(self, key, address, identity, now):
        for wanted in (("name", key), ("address", address), ("identity", identity)):
            ban = self._bans.get(wanted)
            if ban is not None and (ban[0] is None or ban[0] > now):
                return ban
        return None

    def check_speak_locked(self, user):
        key = user.key
        if key in self._mutes:
            until = self._mutes[key]
            if until is not None and until <= time.time():
                del self._mutes[key]
            else:
                raise ProtocolError("muted", "You are muted%s: your message was not sent." % _until_words(until),
                                    counts=False)

    def renamed(self, old_name, new_name):
        """A mute follows its user to a new name: /nick is no way out of one."""
        until = self._mutes.pop(name_key(old_name), False)
        if until is not False:
            self._mutes[name_key(new_name)] = until

    def is_own_address(self, address):
        """Return True for a loopback address or one of this computer's (own_addresses)."""
        try:
            return ipaddress.ip_address(address).is_loopback or address in self.own_addresses
        except ValueError:
            return False

    def _identity_of(self, user, name):
        """Return the identity of the user here, else the one last known under the name, or None."""
        if user is not None:
            return user.identity
        known = self.hub._known.get(name_key(name))
        return known[1] if known else None

    def is_operator(self, user):
        identity = self._operators.get(user.key)
        return identity is not None and identity == user.identity

    def operators_among(self, users_by_key):
        """Return the names of the operators in a {name_key: User} dict (the hub's lock held)."""
        return sorted(users_by_key[key].name for key in self._operators
                      if key in users_by_key and self.is_operator(users_by_key[key]))

    # -- powers ----------------------------------------------------------------------

    def kick(self, by, name, reason=None):
        """Remove a user from the chat (they may come back)."""
        with self.hub.lock:
            by = self._authorise(by)
            target, reason = self._target(name), _clean_reason(reason)
            text = "%s was kicked by %s%s" % (target.name, _who(by), _reason_words(reason))
            self._eject_locked(target, "kicked", text)
        _log_action(by, text)
        return text

    def ban(self, by, target, minutes=None, reason=None):
        """Ban a name (and the client identity known under it) or, given one, an address; eject them.

        A name's ban never takes its address along: on a shared computer, or the
        server's own, that would ban everybody there. An address is banned only when
        it is given, and never one of this computer's own.
        """
        with self.hub.lock:
            by = self._authorise(by)  # first: whoever may not ban learns nothing else
            until, reason = _until_for(minutes), _clean_reason(reason)
            if _is_address(target):
                if self.is_own_address(target):
                    raise ProtocolError("own_address", "%s is this computer's own address: banning it would ban "
                                        "everybody who joins from here. Ban the name instead." % target)
                self._add_ban_locked("address", target, until, reason)
                victims = [u for u in self.hub._users.values() if u.address == target]
                label = target
            else:
                check_name(target)  # else it could not be stored (a lone surrogate) or ever join
                user = self._target(target, must_be_here=False)
                label = user.name if user else target
                self._add_ban_locked("name", name_key(label), until, reason)
                identity = self._identity_of(user, label)
                if identity is not None:  # the same client under another name stays out too
                    self._add_ban_locked("identity", identity, until, reason)
                victims = [user] if user else []
            text = "%s was banned by %s%s%s" % (label, _who(by), _for_words(minutes), _reason_words(reason))
            for victim in victims:
                self._eject_locked(victim, "banned", text)
            if not victims:
                self._announce_locked(text, "ban", label, by)
        _log_action(by, text)
        return text

    def unban(self, by, target):
        with self.hub.lock:
            by = self._authorise(by)
            if not _is_address(target):
                check_name(target)
            kind, value = ("address", target) if _is_address(target) else ("name", name_key(target))
            if self._bans.pop((kind, value), None) is None:
                raise ProtocolError("not_banned", "%s is not banned." % printable(target, 40))
            self.hub.store.delete_ban(kind, value)
            identity = None if kind == "address" else self._identity_of(self._target(target, False), target)
            if identity is not None and self._bans.pop(("identity", identity), None) is not None:
                self.hub.store.delete_ban("identity", identity)  # what the name's ban set, it lifts
            text = self._announce_locked("%s was unbanned by %s" % (target, _who(by)), "unban", target, by)
        _log_action(by, text)
        return text

    def mute(self, by, name, minutes=None, reason=None):
        with self.hub.lock:
            by = self._authorise(by)
            target = self._target(name)
            until, reason = _until_for(minutes), _clean_reason(reason)
            self._mutes[target.key] = until
            text = "%s was muted by %s%s%s" % (target.name, _who(by), _for_words(minutes), _reason_words(reason))
            self._announce_locked(text, "mute", target.name, by)
        _log_action(by, text)
        return text

    def unmute(self, by, name):
        with self.hub.lock:
            by = self._authorise(by)
            if self._mutes.pop(name_key(name), False) is False:
                raise ProtocolError("not_muted", "%s is not muted." % printable(name, 40))
            text = self._announce_locked("%s may speak again (%s)" % (name, _who(by)), "unmute", name, by)
        _log_action(by, text)
        return text

    def set_operator(self, by, name, on=True):
        """Make a user an operator (bound to the identity they have now), or stop that."""
        with self.hub.lock:
            by = self._authorise(by)
            if not on:
                check_name(name)
                if self._operators.pop(name_key(name), False) is False:
                    raise ProtocolError("not_operator", "%s is not an operator." % printable(name, 40))
                self.hub.store.delete_operator(name_key(name))
                text = self._announce_locked("%s is no longer an operator (%s)" % (name, _who(by)), "deop", name, by)
            else:
                target = self._target(name)
                if target.identity is None:
                    raise ProtocolError("no_identity", "%s's client has no identity token, so it cannot be an "
                                        "operator." % target.name)
                self._set_operator_locked(target.key, target.identity)
                text = self._announce_locked("%s is now an operator (%s)" % (target.name, _who(by)), "op",
                                             target.name, by)
        _log_action(by, text)
        return text

    def add_operator(self, name):
        """Name an operator at start (--op NAME): the first client to join as NAME with an identity."""
        with self.hub.lock:
            if name_key(name) not in self._operators:
                self._set_operator_locked(name_key(name), None)

    def announce(self, text):
        """A notice from the server's owner to everybody."""
        with self.hub.lock:
            text = self._announce_locked("Server: " + text, "notice", None, None)
        return text  # the console prints it

    def describe(self):
        """Return one line per user for the console: name, address, operator, muted, lost."""
        with self.hub.lock:
            lines = []
            for user in sorted(self.hub._users.values(), key=lambda u: u.key):
                flags = [word for word, on in (("operator", self.is_operator(user)),
                                               ("muted", user.key in self._mutes),
                                               ("away", user.away is not None),
                                               ("lost", user.lost_at is not None)) if on]
                lines.append("%s  %s  %s" % (user.name, user.address or "?", " ".join(flags)))
            return lines

    def bans(self):
        """Return the bans in force: (kind, value, until, reason), sorted."""
        now = time.time()
        with self.hub.lock:
            return [(kind, value, until, reason) for (kind, value), (until, reason) in sorted(self._bans.items())
                    if until is None or until > now]

    # -- helpers (lock held) -----------------------------------------------------------

    def _authorise(self, by):
        """Return the User asking (None: the console); raise unless it may use these powers."""
        if by is None:
            return None
        user = self.hub._seated(by)
        if user is None or not self.is_operator(user):
            raise ProtocolError("not_operator", "Only operators may do that.")
        return user

    def _target(self, name, must_be_here=True):
        user = self.hub._users.get(name_key(name)) if isinstance(name, str) else None
        if user is None and must_be_here:
            raise ProtocolError("unknown_user", "Nobody called %s is here." % printable(str(name), 40))
        return user

    def _add_ban_locked(self, kind, value, until, reason):
        self._bans[(kind, value)] = (until, reason)
        self.hub.store.save_ban(kind, value, until, reason)

    def _set_operator_locked(self, key, identity):
        self._operators[key] = identity
        self.hub.store.save_operator(key, identity)

    def _eject_locked(self, target, reason, text):
        target.conn.deliver_locked(Event({"type": "bye", "reason": reason, "text": "You were removed: %s." % text}))
        self.hub._remove_locked(target, reason, text)
        target.conn.close_locked()

    def _announce_locked(self, text, action, name, by):
        fields = {"type": "notice", "action": action, "text": text, "ts": _now()}
        if name is not None:
            fields["name"] = name
        if by is not None:
            fields["by"] = by.name
        self.hub._deliver_to_all(Event(fields))
        return text


def _count_words(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def _log_action(by, text):
    """Log what an operator did. The console's own actions are printed by the console, once."""
    if by is not None:
        log.info("%s", text)


def _is_address(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _who(by):
    return "the server's owner" if by is None else by.name


def _for_words(minutes):
    return " for %d minute%s" % (minutes, "" if minutes == 1 else "s") if minutes else ""


def _reason_words(reason):
    return ": %s" % reason if reason else ""


def _until_for(minutes):
    """Return the time.time() at which a ban or mute of `minutes` ends (None: never); raise bad_field."""
    if not minutes:
        return None
    if not isinstance(minutes, int) or not 0 < minutes <= MAX_MODERATION_MINUTES:
        raise ProtocolError("bad_field", "The minutes must be a whole number from 1 to %d."
                            % MAX_MODERATION_MINUTES)
    return time.time() + minutes * 60


def _parting_words(message):
    """Return what somebody said on leaving, on one line and short, or None; nothing unfit goes out."""
    if not isinstance(message, str) or not message.strip():
        return None
    try:
        return " ".join(clean_text(message, MAX_TOPIC_CHARS, "message").split())
    except ProtocolError:
        return None


def _clean_reason(reason):
    """Return a reason fit for a notice and the store, on one line, or None; raise ProtocolError."""
    if reason is None or not reason.strip():
        return None
    return " ".join(clean_text(reason, MAX_TOPIC_CHARS, "reason").split())


def _until_words(until):
    return " until %s" % time.strftime("%H:%M", time.localtime(until)) if until else ""


# =============================================================================
# 6. Storage: message history, topics, identities
# =============================================================================
#
# Two stores with one interface: MemoryStore (--no-history) and SqliteStore.
# With the hub's lock held the hub only queues: add_message() and the save_*,
# delete_* and mark_delivered() calls. flush() writes and commits the queue, and
# the reads (history, since, undelivered) write it first; both run on the thread
# that asks (a writer, housekeeping, a connection's), never inside the hub's lock.
# Stored messages are the fields of "message" frames.

LOCK_SUFFIX = ".lock"  # beside the history file: held by the one server that uses it


def data_dir():
    """Return the folder for the server's history (LOCALCHAT_DATA_DIR overrides it)."""
    override = os.environ.get("LOCALCHAT_DATA_DIR")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "LocalChat"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "LocalChat"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "localchat"


def private_folder(path):
    """Make the folder (and its parents) if it is missing, the new one the owner's alone (0700).

    An existing folder keeps its modes: LOCALCHAT_DATA_DIR may name a shared one.
    Where the system has no such modes (Windows), the user's profile is private already.
    """
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        if os.name == "posix":
            os.chmod(str(path), 0o700)  # mkdir's mode passes through the umask
    return path


def private_file(path):
    """Create the file if it is missing, and make it the owner's alone (0600) where modes exist."""
    if os.name == "posix":
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the mode of os.open only applies to a new file
        finally:
            os.close(fd)
    return path


def _empty_state():
    return {"topics": {}, "users": {}, "bans": {}, "operators": {}}


class MemoryStore:
    """History kept in memory only, lost when the server stops."""

    def __init__(self, max_messages=100000):
        self._messages = collections.deque(maxlen=max_messages)  # [fields, from_id, to_id, delivered]
        self._lock = threading.Lock()  # the hub appends under its lock; reads come from other threads
        self._state = _empty_state()
        self._last_id = 0
        self.on_unstored = None  # a memory store never fails to store

    def load(self):
        """Return the saved topics, users, bans and operators (copies the hub may change)."""
        return {table: dict(rows) for table, rows in self._state.items()}

    def last_id(self):
        return self._last_id

    def add_message(self, fields, from_identity=None, to_identity=None, delivered=True, token=None):
        with self._lock:
            self._messages.append([dict(fields), from_identity, to_identity, delivered])
            self._last_id = max(self._last_id, fields["id"])

    def _select(self, keep, limit=None, newest=True):
        """Return up to limit (None: all) messages for which keep(entry) holds, oldest first."""
        with self._lock:
            entries = list(self._messages)
        found = []
        for entry in (reversed(entries) if newest else entries):
            if keep(entry):
                found.append(entry[0])
                if newest and limit is not None and len(found) >= limit:
                    break
        if newest:
            return found[::-1]
        return found if limit is None else found[-limit:]

    def room_history(self, room_key, limit, before=None):
        return self._select(lambda e: "room" in e[0] and name_key(e[0]["room"]) == room_key and (
            before is None or e[0]["id"] < before), limit)

    def direct_history(self, identity, other_key, limit, before=None):
        if identity is None:
            return []
        return self._select(lambda e: "to" in e[0] and identity in (e[1], e[2]) and other_key in (
            name_key(e[0]["to"]), name_key(e[0]["from"])) and (before is None or e[0]["id"] < before), limit)

    def since(self, last_id, room_keys, identity, limit, upto=None):
        def keep(entry):
            fields = entry[0]
            if fields["id"] <= last_id or (upto is not None and fields["id"] > upto):
                return False
            return ("room" in fields and name_key(fields["room"]) in room_keys) or (
                identity is not None and identity in (entry[1], entry[2]))
        return self._select(keep, limit, newest=False)

    def undelivered(self, identity, upto=None):
        if identity is None:
            return []
        return self._select(lambda e: e[2] == identity and not e[3] and (upto is None or e[0]["id"] <= upto),
                            newest=False)

    def mark_delivered(self, identity, upto=None):
        with self._lock:
            for entry in self._messages:
                if entry[2] == identity and (upto is None or entry[0]["id"] <= upto):
                    entry[3] = True

    def save_user(self, key, name, identity):
        self._state["users"][key] = (name, identity)

    def save_topic(self, room_key, topic):
        self._state["topics"][room_key] = topic

    def save_ban(self, kind, value, until, reason):
        self._state["bans"][(kind, value)] = (until, reason)

    def delete_ban(self, kind, value):
        self._state["bans"].pop((kind, value), None)

    def save_operator(self, key, identity):
        self._state["operators"][key] = identity

    def delete_operator(self, key):
        self._state["operators"].pop(key, None)

    def flush(self):
        pass  # nothing to commit: memory only

    def close(self):
        pass


def _lock_history_file(history):
    """Hold the lock file beside a history file, or raise UserError if another server holds it.

    The system lets go of it when the process ends, however it ends (kill -9 too).
    """
    handle = open(str(private_file(Path(str(history) + LOCK_SUFFIX))), "a+b")
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError("the history file %s is in use by another LocalChat server on this computer; stop that "
                        "server first, or give this one a file of its own with --history FILE." % history) from None
    return handle


_MESSAGE_KINDS = {"action": 1, "notice": 2}  # the "action" column: 0 a message, 1 a /me, 2 an automatic notice


def _message_kind(fields):
    """Return the "action" column's value for a message (see _MESSAGE_KINDS)."""
    return next((number for kind, number in _MESSAGE_KINDS.items() if fields.get(kind)), 0)


class SqliteStore:
    """History, topics, known users, bans and operators in an SQLite database (WAL).

    Everything is queued and written in order, in one transaction per flush(): the
    writer threads flush before they send anything, so in WAL mode with
    synchronous=NORMAL a message somebody saw survives the server being killed the
    next instant (only a power cut can take the last commits). A flush that fails
    is rolled back, and on_unstored(tokens) is called with the tokens of its
    messages before flush() returns. One server at a time uses a file: a second
    gets a UserError.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            sender TEXT NOT NULL,
            room TEXT,
            room_key TEXT,
            recipient TEXT,
            recipient_key TEXT,
            sender_key TEXT,
            sender_identity TEXT,
            recipient_identity TEXT,
            text TEXT NOT NULL,
            action INTEGER NOT NULL DEFAULT 0,
            ref TEXT,
            delivered INTEGER NOT NULL DEFAULT 1,
            file TEXT
        );
        CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room_key, id);
        CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages (recipient_identity, delivered);
        CREATE TABLE IF NOT EXISTS topics (room_key TEXT PRIMARY KEY, topic TEXT);
        CREATE TABLE IF NOT EXISTS users (name_key TEXT PRIMARY KEY, name TEXT NOT NULL, identity TEXT);
        CREATE TABLE IF NOT EXISTS bans (kind TEXT NOT NULL, value TEXT NOT NULL, until REAL, reason TEXT,
                                         PRIMARY KEY (kind, value));
        CREATE TABLE IF NOT EXISTS operators (name_key TEXT PRIMARY KEY, identity TEXT);
    """
    COLUMNS = "id, ts, sender, room, recipient, text, action, ref, delivered, file"
    INSERT_MESSAGE = ("INSERT INTO messages (id, ts, sender, room, room_key, recipient, recipient_key, sender_key,"
                      " sender_identity, recipient_identity, text, action, ref, delivered, file)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def __init__(self, path):
        self.path = Path(path)
        self.on_unstored = None  # called with the tokens of messages a failed flush lost
        self._pending = []  # (sql, parameters, token) in order, not yet written (guarded by _pending_lock)
        self._pending_lock = threading.Lock()
        self._db_lock = threading.Lock()  # one user of the connection at a time
        try:
            private_folder(self.path.parent)  # history holds direct messages: the owner's alone
            private_file(self.path)
            self._lock_file = _lock_history_file(self.path)
        except OSError as error:
            raise UserError("cannot open the history database %s: %s" % (self.path, error)) from None
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(self.SCHEMA)
            if "file" not in [row[1] for row in self.db.execute("PRAGMA table_info(messages)")]:
                self.db.execute("ALTER TABLE messages ADD COLUMN file TEXT")  # a history from before files
        except (OSError, sqlite3.Error) as error:
            self._lock_file.close()
            raise UserError("cannot open the history database %s: %s" % (self.path, error)) from None

    # -- queued (the hub's lock may be held: no database work here) ------------------

    def _queue(self, sql, parameters, token=None):
        with self._pending_lock:
            self._pending.append((sql, parameters, token))

    def add_message(self, fields, from_identity=None, to_identity=None, delivered=True, token=None):
        """Queue a message's row for the next flush(); `token` comes back if it cannot be stored."""
        room, to = fields.get("room"), fields.get("to")
        self._queue(self.INSERT_MESSAGE, (
            fields["id"], fields["ts"], fields["from"], room, room and name_key(room), to, to and name_key(to),
            name_key(fields["from"]), from_identity, to_identity, fields["text"], _message_kind(fields),
            fields.get("ref"), int(delivered), json.dumps(fields["file"]) if "file" in fields else None),
            token if token is not None else fields["id"])

    def mark_delivered(self, identity, upto=None):
        self._queue("UPDATE messages SET delivered = 1 WHERE recipient_identity = ? AND delivered = 0 AND id <= ?",
                    (identity, upto if upto is not None else 2 ** 62))

    def save_user(self, key, name, identity):
        self._queue("INSERT OR REPLACE INTO users (name_key, name, identity) VALUES (?, ?, ?)", (key, name, identity))

    def save_topic(self, room_key, topic):
        self._queue("INSERT OR REPLACE INTO topics (room_key, topic) VALUES (?, ?)", (room_key, topic))

    def save_ban(self, kind, value, until, reason):
        self._queue("INSERT OR REPLACE INTO bans (kind, value, until, reason) VALUES (?, ?, ?, ?)",
                    (kind, value, until, reason))

    def delete_ban(self, kind, value):
        self._queue("DELETE FROM bans WHERE kind = ? AND value = ?", (kind, value))

    def save_operator(self, key, identity):
        self._queue("INSERT OR REPLACE INTO operators (name_key, identity) VALUES (?, ?)", (key, identity))

    def delete_operator(self, key):
        self._queue("DELETE FROM operators WHERE name_key = ?", (key,))

    # -- written (never inside the hub's lock) ----------------------------------------

    def flush(self):
        """Write and commit what is queued, in one transaction (group commit).

        _db_lock makes a second caller wait for the first one's commit, so when
        flush() returns, whatever was queued before it was called is committed or
        reported to on_unstored.
        """
        with self._db_lock:
            self._write_pending()

    def _write_pending(self):
        """Write the queued statements in one transaction. Called with _db_lock held."""
        with self._pending_lock:
            entries, self._pending = self._pending, []
        if not entries:
            return
        try:
            self.db.execute("BEGIN")
            start = 0
            while start < len(entries):  # runs of message rows go in one executemany()
                end = start + 1
                while end < len(entries) and entries[end][0] == entries[start][0]:
                    end += 1
                self.db.executemany(entries[start][0], [entry[1] for entry in entries[start:end]])
                start = end
            self.db.execute("COMMIT")
        except sqlite3.Error as error:
            try:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            except sqlite3.Error:  # the connection itself is broken: nothing to roll back
                pass
            tokens = [entry[2] for entry in entries if entry[2] is not None]
            log.error("history: cannot store %d messages and %d changes: %s", len(tokens),
                      len(entries) - len(tokens), error)
            if tokens and self.on_unstored is not None:
                self.on_unstored(tokens)

    def _query(self, sql, parameters=()):
        """Run one SELECT after the queued statements are written; return its rows."""
        with self._db_lock:
            self._write_pending()
            return self.db.execute(sql, parameters).fetchall()

    def load(self):
        """Return the saved topics, users, bans and operators, as the hub keeps them in memory."""
        return {
            "topics": dict(self._query("SELECT room_key, topic FROM topics")),
            "users": {key: (name, identity) for key, name, identity in
                      self._query("SELECT name_key, name, identity FROM users")},
            "bans": {(kind, value): (until, reason) for kind, value, until, reason in
                     self._query("SELECT kind, value, until, reason FROM bans")},
            "operators": dict(self._query("SELECT name_key, identity FROM operators")),
        }

    def last_id(self):
        return self._query("SELECT COALESCE(MAX(id), 0) FROM messages")[0][0]

    def room_history(self, room_key, limit, before=None):
        rows = self._query(
            "SELECT %s FROM messages WHERE room_key = ? AND id < ? ORDER BY id DESC LIMIT ?" % self.COLUMNS,
            (room_key, before if before is not None else 2 ** 62, limit),
        )
        return [self._fields(row) for row in reversed(rows)]

    def direct_history(self, identity, other_key, limit, before=None):
        if identity is None:
            return []
        rows = self._query(
            "SELECT %s FROM messages WHERE room_key IS NULL AND id < ?"
            " AND ((sender_identity = ? AND recipient_key = ?) OR (recipient_identity = ? AND sender_key = ?))"
            " ORDER BY id DESC LIMIT ?" % self.COLUMNS,
            (before if before is not None else 2 ** 62, identity, other_key, identity, other_key, limit),
        )
        return [self._fields(row) for row in reversed(rows)]

    def since(self, last_id, room_keys, identity, limit, upto=None):
        marks = ",".join("?" * len(room_keys)) or "NULL"
        rows = self._query(
            "SELECT %s FROM messages WHERE id > ? AND id <= ? AND (room_key IN (%s)"
            " OR (room_key IS NULL AND ? IS NOT NULL AND (sender_identity = ? OR recipient_identity = ?)))"
            " ORDER BY id DESC LIMIT ?" % (self.COLUMNS, marks),
            [last_id, upto if upto is not None else 2 ** 62] + list(room_keys) + [identity, identity, identity,
                                                                                  limit],
        )
        return [self._fields(row) for row in reversed(rows)]

    def undelivered(self, identity, upto=None):
        if identity is None:
            return []
        rows = self._query(
            "SELECT %s FROM messages WHERE recipient_identity = ? AND delivered = 0 AND id <= ? ORDER BY id"
            % self.COLUMNS, (identity, upto if upto is not None else 2 ** 62),
        )
        return [self._fields(row) for row in rows]

    def close(self):
        self.flush()
        self.db.close()
        self._lock_file.close()

    @staticmethod
    def _fields(row):
        message_id, ts, sender, room, recipient, text, action, ref, delivered, shared = row
        fields = {"type": "message", "id": message_id, "ts": ts, "from": sender}
        if room is not None:
            fields["room"] = room
        else:
            fields["to"] = recipient
        fields["text"] = text
        for kind, number in _MESSAGE_KINDS.items():
            if action == number:
                fields[kind] = True
        if ref is not None:
            fields["ref"] = ref
        if shared is not None:
            fields["file"] = json.loads(shared)
        return fields


FILE_ID_BYTES = 24          # random bytes in a shared file's id: 192 bits, 32 characters in its address
_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
_PART_SUFFIX = ".part"      # a file still arriving; one left from a crash is removed at start
_ABOUT_SUFFIX = ".json"     # beside each file: its name, type, size and when it came


class FileStore:
    """Shared files in one folder, each named by its random id (never by the name it came with).

    Beside each file a small JSON file says what it is. While the files together
    hold more than total_bytes, the oldest go first (expire). Any thread: one lock
    guards the index; the files themselves are written by the one connection that
    receives each.
    """

    def __init__(self, folder, total_bytes):
        self.folder = Path(folder)
        self.total_bytes = total_bytes
        self._lock = threading.Lock()
        self._index = {}  # id -> {"name", "type", "size", "stored"}, oldest first
        try:
            private_folder(self.folder)
            self._load()
        except OSError as error:
            raise UserError("cannot use the folder for shared files %s: %s" % (self.folder, error)) from None

    @staticmethod
    def new_id():
        return secrets.token_urlsafe(FILE_ID_BYTES)

    def _load(self):
        """Read what is kept; remove what a crash left half-written."""
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(_PART_SUFFIX) or (path.suffix == "" and not (
                    self.folder / (path.name + _ABOUT_SUFFIX)).exists()):
                _remove(path)
            elif path.name.endswith(_ABOUT_SUFFIX):
                about = self._read_about(path)
                file_id = path.name[:-len(_ABOUT_SUFFIX)]
                data = self.folder / file_id
                if about is None or not _FILE_ID.match(file_id) or not data.is_file() or \
                        data.stat().st_size != about["size"]:
                    _remove(path)
                    _remove(data)
                else:
                    found.append((about["stored"], file_id, about))
        for _, file_id, about in sorted(found, key=lambda item: item[:2]):
            self._index[file_id] = about
        for file_id in self._over_total_locked(keep=None):  # the total may be smaller than last time
            self._delete(file_id)

    @staticmethod
    def _read_about(path):
        try:
            about = json.loads(path.read_text(encoding="utf-8"))
            # The type goes into a header as it is: only a plain one (a note edited by hand may hold anything).
            if isinstance(about.get("name"), str) and isinstance(about.get("type"), str) and \
                    re.match(r"^[a-z]+/[a-z0-9.+-]+\Z", about["type"]) and type(about.get("size")) is int and \
                    isinstance(about.get("stored"), (int, float)):
                return about
        except (OSError, ValueError, AttributeError, RecursionError):  # "[[[[..." recurses in json
            pass
        return None

    def open_part(self, file_id):
        """Return a new file, open for writing, where the bytes of file_id arrive (raises OSError)."""
        path = self.folder / (file_id + _PART_SUFFIX)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        return os.fdopen(os.open(str(path), flags, 0o600), "wb")

    def keep(self, file_id, name, kind, size):
        """Make an arrived file one of the kept ones; return the ids that expired to make room.

        Raises OSError if it cannot be kept (then nothing of it is left).
        """
        about = {"name": name, "type": kind, "size": size, "stored": time.time()}
        part = self.folder / (file_id + _PART_SUFFIX)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
            with os.fdopen(os.open(str(self.folder / (file_id + _ABOUT_SUFFIX)), flags, 0o600), "wb") as out:
                out.write(json.dumps(about).encode("utf-8"))  # the owner's alone, as the file itself
            os.replace(str(part), str(self.folder / file_id))
        except OSError:
            self.forget(file_id)
            raise
        with self._lock:
            self._index[file_id] = about
            gone = self._over_total_locked(keep=file_id)
        for old in gone:
            self._delete(old)
        return gone

    def _over_total_locked(self, keep):
        total = sum(about["size"] for about in self._index.values())
        gone = []
        for file_id in list(self._index):
            if total <= self.total_bytes:
                break
            if file_id != keep:
                total -= self._index.pop(file_id)["size"]
                gone.append(file_id)
        return gone

    def forget(self, file_id):
        """Remove a file, kept or still arriving (an upload cut short, or refused at the end)."""
        with self._lock:
            self._index.pop(file_id, None)
        _remove(self.folder / (file_id + _PART_SUFFIX))
        self._delete(file_id)

    def _delete(self, file_id):
        _remove(self.folder / file_id)
        _remove(self.folder / (file_id + _ABOUT_SUFFIX))

    def about(self, file_id):
        """Return what is known of a kept file ({"name", "type", "size", ...}), or None."""
        if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
            return None
        with self._lock:
            return self._index.get(file_id)

    def open(self, file_id):
        """Return a kept file open for reading, or None if it is not kept (any more)."""
        if self.about(file_id) is None:
            return None
        try:
            return open(str(self.folder / file_id), "rb")
        except OSError:
            return None

    def total(self):
        with self._lock:
            return sum(about["size"] for about in self._index.values())


def _remove(path):
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.error("files: cannot remove %s: %s", path, error)


# =============================================================================
# 7. Certificates: a self-signed one, made with the standard library alone
# =============================================================================
#
# `server --tls` needs a certificate, and the openssl command is not on every machine
# (Windows). So this section makes one itself: a tiny DER encoder, RSA key generation
# (random primes, sieve and Miller-Rabin), an X.509 v3 certificate signed with
# sha256WithRSAEncryption, and the SHA-256 fingerprint people compare. Runs on the
# thread that starts the server, once.
#
# The certificate is a leaf (CA:FALSE); clients trust it by fingerprint (like SSH),
# never by a certificate authority, so every OpenSSL version accepts it.

# --- DER encoding (ITU-T X.690) --------------------------------------------

_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_BIT_STRING = 0x03
_TAG_OCTET_STRING = 0x04
_TAG_NULL = 0x05
_TAG_OBJECT_IDENTIFIER = 0x06
_TAG_UTF8_STRING = 0x0C
_TAG_UTC_TIME = 0x17
_TAG_GENERALIZED_TIME = 0x18
_TAG_SEQUENCE = 0x30  # 0x10 with the "constructed" bit set
_TAG_SET = 0x31  # 0x11 with the "constructed" bit set

_TAG_CLASS_CONTEXT = 0x80
_TAG_CONSTRUCTED = 0x20


def _der_length(length: int) -> bytes:
    """Encode a DER length: one byte below 128, else 0x80|count + big-endian bytes."""
    if length < 0x80:
        return bytes([length])
    length_bytes = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(length_bytes)]) + length_bytes


def _der_tlv(tag: int, content: bytes) -> bytes:
    """Encode one tag-length-value element (single-byte tags only)."""
    return bytes([tag]) + _der_length(len(content)) + content


def _der_boolean(value: bool) -> bytes:
    """Encode a BOOLEAN; DER requires TRUE to be exactly 0xFF."""
    return _der_tlv(_TAG_BOOLEAN, b"\xff" if value else b"\x00")


def _der_integer(value: int) -> bytes:
    """Encode an INTEGER as minimal big-endian two's complement.

    One byte more than the magnitude needs leaves room for the sign bit, so
    128 becomes 00 80 (positive) while -128 stays 80.
    """
    magnitude_bits = value.bit_length() if value >= 0 else (~value).bit_length()
    byte_count = magnitude_bits // 8 + 1
    return _der_tlv(_TAG_INTEGER, value.to_bytes(byte_count, "big", signed=True))


def _der_bit_string(data: bytes, unused_bits: int = 0) -> bytes:
    """Encode a BIT STRING; the first content byte counts unused trailing bits."""
    if not 0 <= unused_bits <= 7 or (unused_bits and not data):
        raise ValueError("invalid number of unused bits")
    return _der_tlv(_TAG_BIT_STRING, bytes([unused_bits]) + data)


def _der_octet_string(data: bytes) -> bytes:
    """Encode an OCTET STRING."""
    return _der_tlv(_TAG_OCTET_STRING, data)


def _der_null() -> bytes:
    """Encode NULL (the parameters of RSA algorithm identifiers)."""
    return _der_tlv(_TAG_NULL, b"")


def _der_oid_arc(arc: int) -> bytes:
    """Encode one OID arc in base 128, high bit set on all but the last byte."""
    chunks = [arc & 0x7F]
    arc >>= 7
    while arc:
        chunks.append(0x80 | (arc & 0x7F))
        arc >>= 7
    return bytes(reversed(chunks))


def _der_oid(dotted: str) -> bytes:
    """Encode an OBJECT IDENTIFIER given as "1.2.840.113549.1.1.11"."""
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError("invalid object identifier: %r" % dotted)
    # X.690 packs the first two arcs into one number: 40 * first + second.
    content = _der_oid_arc(40 * arcs[0] + arcs[1])
    content += b"".join(_der_oid_arc(arc) for arc in arcs[2:])
    return _der_tlv(_TAG_OBJECT_IDENTIFIER, content)


def _der_utf8_string(text: str) -> bytes:
    """Encode a UTF8String."""
    return _der_tlv(_TAG_UTF8_STRING, text.encode("utf-8"))


def _der_utc_time(moment: datetime.datetime) -> bytes:
    """Encode a UTCTime "YYMMDDHHMMSSZ" (RFC 5280: years 1950-2049 only)."""
    if not 1950 <= moment.year <= 2049:
        raise ValueError("UTCTime only covers the years 1950-2049")
    text = _as_utc(moment).strftime("%y%m%d%H%M%SZ")
    return _der_tlv(_TAG_UTC_TIME, text.encode("ascii"))


def _der_generalized_time(moment: datetime.datetime) -> bytes:
    """Encode a GeneralizedTime "YYYYMMDDHHMMSSZ" (no fractional seconds)."""
    # Format the year by hand: strftime("%Y") does not zero-pad on every OS.
    moment = _as_utc(moment)
    text = "%04d" % moment.year + moment.strftime("%m%d%H%M%SZ")
    return _der_tlv(_TAG_GENERALIZED_TIME, text.encode("ascii"))


def _der_time(moment: datetime.datetime) -> bytes:
    """Encode an X.509 Time: UTCTime up to 2049, GeneralizedTime from 2050 on.

    RFC 5280 section 4.1.2.5 makes this choice mandatory, not a preference.
    """
    if 1950 <= moment.year <= 2049:
        return _der_utc_time(moment)
    return _der_generalized_time(moment)


def _der_sequence(*elements: bytes) -> bytes:
    """Encode a SEQUENCE of already-encoded elements, in the given order."""
    return _der_tlv(_TAG_SEQUENCE, b"".join(elements))


def _der_set(*elements: bytes) -> bytes:
    """Encode a SET OF; DER requires the encoded elements in sorted order."""
    return _der_tlv(_TAG_SET, b"".join(sorted(elements)))


def _der_explicit(tag_number: int, inner_der: bytes) -> bytes:
    """Wrap a complete element in a constructed context tag, e.g. [0] EXPLICIT."""
    if not 0 <= tag_number <= 30:
        raise ValueError("only low tag numbers are supported")
    tag = _TAG_CLASS_CONTEXT | _TAG_CONSTRUCTED | tag_number
    return _der_tlv(tag, inner_der)


def _der_implicit(tag_number: int, content: bytes, constructed: bool = False) -> bytes:
    """Encode content under a context tag that replaces the universal one, e.g. [2] IMPLICIT."""
    if not 0 <= tag_number <= 30:
        raise ValueError("only low tag numbers are supported")
    tag = _TAG_CLASS_CONTEXT | tag_number
    if constructed:
        tag |= _TAG_CONSTRUCTED
    return _der_tlv(tag, content)


def _as_utc(moment: datetime.datetime) -> datetime.datetime:
    """Return the moment in UTC; naive datetimes are taken to already be UTC."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(datetime.timezone.utc)


# --- Prime numbers and RSA keys --------------------------------------------

_RSA_PUBLIC_EXPONENT = 65537
_MINIMUM_RSA_BITS = 512  # only for tests; TLS peers demand 2048 or more

# Each Miller-Rabin round with a random base catches a composite with
# probability at least 3/4 (Rabin 1980), so 64 rounds leave a worst-case
# error of 4**-64 = 2**-128 per number.  For random 1024-bit candidates the
# true error is far smaller still (Damgard, Landrock, Pomerance 1993).
_MILLER_RABIN_ROUNDS = 64

_SMALL_PRIME_LIMIT = 10000


def _small_primes_up_to(limit: int) -> List[int]:
    """Return all primes <= limit (sieve of Eratosthenes)."""
    is_prime = bytearray([1]) * (limit + 1)
    is_prime[0] = is_prime[1] = 0
    for number in range(2, math.isqrt(limit) + 1):
        if is_prime[number]:
            multiples = range(number * number, limit + 1, number)
            is_prime[number * number :: number] = bytes(len(multiples))
    return [number for number in range(limit + 1) if is_prime[number]]


_SMALL_PRIMES = _small_primes_up_to(_SMALL_PRIME_LIMIT)
_SMALL_PRIMES_SET = frozenset(_SMALL_PRIMES)
# One gcd against the product of all small primes replaces ~1200 trial
# divisions; it rejects most random odd candidates before the expensive
# Miller-Rabin step.
_SMALL_PRIMES_PRODUCT = math.prod(_SMALL_PRIMES)


def _is_miller_rabin_witness(base: int, odd_part: int, twos: int, n: int) -> bool:
    """Return True if base proves n composite; n - 1 == odd_part * 2**twos."""
    x = pow(base, odd_part, n)
    if x == 1 or x == n - 1:
        return False
    for _ in range(twos - 1):
        x = pow(x, 2, n)
        if x == n - 1:
            return False
    return True


def _passes_miller_rabin(n: int, rounds: int = _MILLER_RABIN_ROUNDS) -> bool:
    """Run Miller-Rabin with random bases from secrets on an odd n > 3.

    A composite n survives with probability at most 4**-rounds.
    """
    odd_part, twos = n - 1, 0
    while odd_part % 2 == 0:
        odd_part //= 2
        twos += 1
    for _ in range(rounds):
        base = 2 + secrets.randbelow(n - 3)  # uniform in [2, n - 2]
        if _is_miller_rabin_witness(base, odd_part, twos, n):
            return False
    return True


def _is_probable_prime(n: int, rounds: int = _MILLER_RABIN_ROUNDS) -> bool:
    """Return True if n is prime (certain below 10**8, else error <= 4**-rounds)."""
    if n <= _SMALL_PRIME_LIMIT:
        return n in _SMALL_PRIMES_SET
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        return False
    # No factor <= 10000 and n < 10001**2 means n has no factor at all.
    if n < (_SMALL_PRIME_LIMIT + 1) ** 2:
        return True
    return _passes_miller_rabin(n, rounds)


def _random_rsa_prime(bits: int) -> int:
    """Return a random prime of exactly `bits` bits with gcd(e, p - 1) == 1."""
    # Setting the top two bits makes the product of two such primes have
    # exactly twice as many bits; the low bit makes the candidate odd.
    top_two_bits = 0b11 << (bits - 2)
    while True:
        candidate = secrets.randbits(bits) | top_two_bits | 1
        # Checked first because it is cheap: d exists only if e is
        # invertible modulo p - 1.
        if math.gcd(_RSA_PUBLIC_EXPONENT, candidate - 1) != 1:
            continue
        if _is_probable_prime(candidate):
            return candidate


class _RsaPrivateKey(NamedTuple):
    """An RSA private key with the CRT values PKCS#1 stores (RFC 8017, A.1.2)."""

    n: int  # modulus p * q
    e: int  # public exponent
    d: int  # private exponent, e * d == 1 mod lcm(p - 1, q - 1)
    p: int
    q: int
    dp: int  # d mod (p - 1)
    dq: int  # d mod (q - 1)
    qinv: int  # q**-1 mod p


def _primes_too_close(p: int, q: int, bits: int) -> bool:
    """FIPS 186-4 B.3.1: |p - q| must exceed 2**(bits/2 - 100) (Fermat factoring)."""
    return abs(p - q) <= 1 << (bits // 2 - 100)


def generate_rsa_key(bits: int = 2048) -> _RsaPrivateKey:
    """Generate an RSA private key with public exponent 65537.

    The modulus has exactly `bits` bits.  Takes a fraction of a second for
    2048 bits in CPython; the time varies because prime search is random.
    """
    if bits < _MINIMUM_RSA_BITS:
        raise ValueError("RSA keys need at least %d bits" % _MINIMUM_RSA_BITS)
    e = _RSA_PUBLIC_EXPONENT
    while True:
        p = _random_rsa_prime(bits - bits // 2)
        q = _random_rsa_prime(bits // 2)
        if p != q and not _primes_too_close(p, q, bits):
            break
    # Carmichael's lambda(n) gives the smallest valid d (as FIPS 186 asks).
    lambda_n = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = pow(e, -1, lambda_n)  # pow(x, -1, m) needs Python 3.8+
    return _RsaPrivateKey(
        n=p * q, e=e, d=d, p=p, q=q,
        dp=d % (p - 1), dq=d % (q - 1), qinv=pow(q, -1, p),
    )


# --- Object identifiers used below ------------------------------------------

_OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
_OID_COMMON_NAME = "2.5.4.3"
_OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"
_OID_KEY_USAGE = "2.5.29.15"
_OID_SUBJECT_ALT_NAME = "2.5.29.17"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_EXTENDED_KEY_USAGE = "2.5.29.37"
_OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"

# DER of DigestInfo{sha256, NULL} up to the 32 hash bytes (RFC 8017, 9.2).
_SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


# --- PEM and the private key ------------------------------------------------


def _pem_encode(label: str, der: bytes) -> str:
    """Wrap DER bytes as PEM text with 64-character lines (RFC 7468)."""
    encoded = base64.b64encode(der).decode("ascii")
    lines = [encoded[start : start + 64] for start in range(0, len(encoded), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def _rsa_algorithm_identifier() -> bytes:
    """AlgorithmIdentifier for rsaEncryption; RFC 3279 requires NULL parameters."""
    return _der_sequence(_der_oid(_OID_RSA_ENCRYPTION), _der_null())


def _rsa_private_key_der(key: _RsaPrivateKey) -> bytes:
    """PKCS#1 RSAPrivateKey (RFC 8017, A.1.2), version 0 = two primes."""
    fields = (0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv)
    return _der_sequence(*(_der_integer(value) for value in fields))


def private_key_pem(key: _RsaPrivateKey) -> str:
    """Return the key as PKCS#8 "BEGIN PRIVATE KEY" PEM (unencrypted).

    PKCS#8 (RFC 5208) is the format modern OpenSSL writes by default and
    ssl.SSLContext.load_cert_chain reads on every platform.
    """
    private_key_info = _der_sequence(
        _der_integer(0),
        _rsa_algorithm_identifier(),
        _der_octet_string(_rsa_private_key_der(key)),
    )
    return _pem_encode("PRIVATE KEY", private_key_info)


# --- Signing ----------------------------------------------------------------


def _modulus_byte_length(key: _RsaPrivateKey) -> int:
    """Return k, the length of the modulus in bytes (RFC 8017 notation)."""
    return (key.n.bit_length() + 7) // 8


def _emsa_pkcs1_v1_5_sha256(message: bytes, encoded_length: int) -> bytes:
    """EMSA-PKCS1-v1_5 encoding: 00 01 FF..FF 00 DigestInfo (RFC 8017, 9.2)."""
    digest_info = _SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(message).digest()
    padding_length = encoded_length - len(digest_info) - 3
    if padding_length < 8:
        raise ValueError("RSA modulus too short for a SHA-256 signature")
    return b"\x00\x01" + b"\xff" * padding_length + b"\x00" + digest_info


def _rsa_private_operation(key: _RsaPrivateKey, m: int) -> int:
    """Compute m**d mod n with the Chinese remainder theorem (about 3x faster)."""
    m1 = pow(m, key.dp, key.p)
    m2 = pow(m, key.dq, key.q)
    h = (key.qinv * (m1 - m2)) % key.p
    return m2 + h * key.q


def _rsa_sign_sha256(key: _RsaPrivateKey, message: bytes) -> bytes:
    """Sign with RSASSA-PKCS1-v1_5 and SHA-256; returns k signature bytes."""
    k = _modulus_byte_length(key)
    m = int.from_bytes(_emsa_pkcs1_v1_5_sha256(message, k), "big")
    s = _rsa_private_operation(key, m)
    # A miscomputed CRT signature would reveal a factor of n, so check it
    # with the cheap public operation before anything leaves this function.
    if pow(s, key.e, key.n) != m:
        raise RuntimeError("RSA signature self-check failed")
    return s.to_bytes(k, "big")


# --- The certificate --------------------------------------------------------

_MAX_COMMON_NAME_LENGTH = 64  # ub-common-name in RFC 5280


def _name_with_common_name(common_name: str) -> bytes:
    """X.501 Name holding a single CN, as a UTF8String (RFC 5280 4.1.2.6)."""
    if not 1 <= len(common_name) <= _MAX_COMMON_NAME_LENGTH:
        raise ValueError("common name must be 1-64 characters")
    attribute = _der_sequence(_der_oid(_OID_COMMON_NAME), _der_utf8_string(common_name))
    relative_distinguished_name = _der_set(attribute)
    return _der_sequence(relative_distinguished_name)


def _rsa_public_key_der(key: _RsaPrivateKey) -> bytes:
    """PKCS#1 RSAPublicKey: SEQUENCE { modulus, publicExponent }."""
    return _der_sequence(_der_integer(key.n), _der_integer(key.e))


def _subject_public_key_info(key: _RsaPrivateKey) -> bytes:
    """SubjectPublicKeyInfo with rsaEncryption (RFC 5280 4.1.2.7, RFC 3279)."""
    return _der_sequence(
        _rsa_algorithm_identifier(), _der_bit_string(_rsa_public_key_der(key))
    )


def _key_identifier(key: _RsaPrivateKey) -> bytes:
    """Leftmost 160 bits of SHA-256 of the public key (RFC 7093, method 1).

    SHA-256 instead of RFC 5280's SHA-1 so FIPS-restricted systems work too.
    """
    return hashlib.sha256(_rsa_public_key_der(key)).digest()[:20]


def _extension(oid: str, value_der: bytes, critical: bool = False) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical DEFAULT FALSE, extnValue }."""
    # DER forbids encoding a DEFAULT value, so "critical" appears only if TRUE.
    parts = [_der_oid(oid)]
    if critical:
        parts.append(_der_boolean(True))
    parts.append(_der_octet_string(value_der))
    return _der_sequence(*parts)


def _general_name(name: str) -> bytes:
    """A subjectAltName entry: iPAddress [7] for IPs, else dNSName [2]."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        return _der_implicit(7, address.packed)
    try:
        return _der_implicit(2, name.encode("ascii"))  # IA5String
    except UnicodeEncodeError:
        raise ValueError("DNS names must be ASCII (use punycode): %r" % name) from None


def _key_usage_digital_signature_and_key_encipherment() -> bytes:
    """KeyUsage BIT STRING with bits 0 and 2 set (RFC 5280 4.2.1.3).

    Bit 0 is the most significant bit: 1010 0000 = 0xA0.  DER drops the
    trailing zero bits, so 5 of the 8 bits are marked unused.
    """
    return _der_bit_string(b"\xa0", unused_bits=5)


def _certificate_extensions(key: _RsaPrivateKey, alt_names: Sequence[str]) -> bytes:
    """The [3] EXPLICIT extensions block of a TLS server leaf certificate."""
    extensions = [
        # CA:FALSE is the DEFAULT, so DER leaves the SEQUENCE empty.
        _extension(_OID_BASIC_CONSTRAINTS, _der_sequence(), critical=True),
        _extension(
            _OID_KEY_USAGE,
            _key_usage_digital_signature_and_key_encipherment(),
            critical=True,
        ),
        _extension(_OID_EXTENDED_KEY_USAGE, _der_sequence(_der_oid(_OID_SERVER_AUTH))),
    ]
    # RFC 5280 forbids an empty subjectAltName, so leave it out when empty.
    if alt_names:
        san = _der_sequence(*(_general_name(name) for name in alt_names))
        extensions.append(_extension(_OID_SUBJECT_ALT_NAME, san))
    extensions.append(
        _extension(_OID_SUBJECT_KEY_IDENTIFIER, _der_octet_string(_key_identifier(key)))
    )
    return _der_explicit(3, _der_sequence(*extensions))


def _random_serial_number() -> int:
    """A random positive 159-bit serial (fits RFC 5280's 20-octet limit)."""
    # Forcing the top bit keeps the length fixed; bit 159 stays clear so the
    # DER INTEGER needs no sign padding byte.
    return secrets.randbits(159) | (1 << 158)


def _validity(days: int) -> bytes:
    """Validity from one day ago (tolerates clock skew) until `days` from now."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=days)
    return _der_sequence(_der_time(not_before), _der_time(not_after))


def _tbs_certificate(
    key: _RsaPrivateKey, common_name: str, days: int, alt_names: Sequence[str]
) -> bytes:
    """TBSCertificate (RFC 5280 4.1): the part that gets signed."""
    name = _name_with_common_name(common_name)
    signature_algorithm = _der_sequence(_der_oid(_OID_SHA256_WITH_RSA), _der_null())
    return _der_sequence(
        _der_explicit(0, _der_integer(2)),  # version: 2 means X.509 v3
        _der_integer(_random_serial_number()),
        signature_algorithm,
        name,  # issuer: self-signed, so the same as the subject
        _validity(days),
        name,  # subject
        _subject_public_key_info(key),
        _certificate_extensions(key, alt_names),
    )


def make_self_signed_certificate(
    key: _RsaPrivateKey, common_name: str, days: int = 3650, alt_names: Iterable[str] = ()
) -> str:
    """Return a PEM X.509 v3 certificate for `key`, signed by `key` itself.

    alt_names are strings; IP addresses become iPAddress entries and all
    others dNSName entries.  TLS clients check host names against these,
    not against the common name, so list every name clients will dial.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    tbs = _tbs_certificate(key, common_name, days, list(alt_names))
    signature_algorithm = _der_sequence(_der_oid(_OID_SHA256_WITH_RSA), _der_null())
    certificate = _der_sequence(
        tbs, signature_algorithm, _der_bit_string(_rsa_sign_sha256(key, tbs))
    )
    return _pem_encode("CERTIFICATE", certificate)


def certificate_fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER as "AB:CD:...", for users to compare."""
    return der_fingerprint(ssl.PEM_cert_to_DER_cert(cert_pem))


def der_fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate in DER as "AB:CD:..."."""
    return ":".join("%02X" % byte for byte in hashlib.sha256(der).digest())


def _write_private_file(path, text: str) -> None:
    """Write text to path readable only by the owner where the OS supports it."""
    data = text.encode("ascii")
    if os.name != "posix":
        # Windows ignores POSIX modes; files in the user's profile are
        # already private to that user by default ACLs.
        path.write_bytes(data)
        return
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        # os.open's mode only applies to new files; tighten an existing one.
        os.fchmod(file.fileno(), 0o600)
        file.write(data)


def write_certificate_files(
    cert_path, key_path, common_name: str, alt_names: Iterable[str] = ()
) -> str:
    """Create a new key and self-signed certificate, write both, return the fingerprint.

    cert_path and key_path are pathlib.Path objects; existing files are
    replaced.  The key file gets mode 0o600 on POSIX systems.
    """
    key = generate_rsa_key()
    cert_pem = make_self_signed_certificate(key, common_name, alt_names=alt_names)
    _write_private_file(key_path, private_key_pem(key))
    cert_path.write_bytes(cert_pem.encode("ascii"))
    return certificate_fingerprint(cert_pem)


# =============================================================================
# 8. Encryption: TLS over memory buffers
# =============================================================================
#
# An ssl.SSLSocket cannot be dup()ed for the writer thread, nor used by two threads
# at once. So the TCP socket stays plain and a TlsChannel does the TLS in memory: the
# connection's reader thread decrypts what it received, the writer thread encrypts
# what it is about to send, one at a time under the channel's lock. The handshake runs
# first, on the connection's own thread. Clients trust by fingerprint, not by
# certificate authority: the caller compares fingerprint() with the one it saw before.

TLS_MIN_VERSION = ssl.TLSVersion.TLSv1_2  # both sides refuse anything older
TLS_CHUNK_BYTES = 64 * 1024               # one recv() during the handshake, one SSLObject.read()

# What an ssl.SSLError's reason means for a person, for tls_error_sentence().
_TLS_FAILURES = (
    (("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
      "UNKNOWN_PROTOCOL", "RECORD_LENGTH_MISMATCH"),  # it answered our ClientHello with a JSON line
     "The server at %s does not use encryption: connect without --tls, or ask its owner."),
    (("UNEXPECTED_EOF_WHILE_READING",),
     "The server at %s closed the connection during the encrypted handshake: it may not use "
     "encryption (connect without --tls), or it may not be a LocalChat server."),
    (("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"),
     "The server at %s and this computer have no version of encryption in common (LocalChat needs "
     "TLS 1.2 or newer): update LocalChat, or ask the server's owner to."),
    (("SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "NO_SUITABLE_SIGNATURE_ALGORITHM",
      "TLSV1_ALERT_INSUFFICIENT_SECURITY", "SSLV3_ALERT_BAD_CERTIFICATE"),
     "The server at %s and this computer could not agree on how to encrypt: ask its owner to "
     "update LocalChat, or to make a new certificate."),
)


class TlsChannel:
    """One connection's TLS state, kept in memory; the caller moves raw bytes over a plain socket.

    Thread contract: handshake() runs once, on the connection's thread, before anyone
    else uses the channel. After it, decrypt() (the reader thread) and encrypt() (the
    writer thread) may be called at the same time: each holds the channel's lock while
    it touches the SSLObject, and nothing blocks or does I/O with the lock held.
    Ciphertext must reach the wire in the order the channel produced it (see decrypt()).
    """

    def __init__(self, context, server_side, server_hostname=None):
        self._incoming = ssl.MemoryBIO()  # raw bytes received, not yet decrypted
        self._outgoing = ssl.MemoryBIO()  # raw bytes the TLS layer wants sent
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                        server_hostname=server_hostname)
        # OpenSSL's SSL object keeps one state for both directions: a read and a write
        # running at once on two threads could corrupt it, so they take turns.
        self._lock = threading.Lock()
        self.closed = False  # the peer sent close_notify: nothing more will come

    def alpn(self):
        """Return the application protocol agreed in the handshake (ALPN: "http/1.1" for a browser), or None."""
        with self._lock:
            return self._sslobj.selected_alpn_protocol()

    # -- handshake (the connection's thread, before the reader and writer start) --

    def handshake(self, sock, timeout):
        """Run the TLS handshake over the blocking socket sock, all of it within timeout seconds.

        Returns the application data that came in with the handshake's last bytes,
        usually b"": a peer may send its first frame right behind its last handshake
        message, and the caller must treat it as the start of the stream. Raises
        socket.timeout at the deadline, ssl.SSLError when the peer does not speak TLS
        or refuses ours, OSError when the connection fails. Restores sock's timeout.
        """
        deadline = time.monotonic() + timeout
        old_timeout = sock.gettimeout()
        try:
            while not self._handshake_step(sock, deadline):
                self._receive(sock, deadline)
            plaintext, to_send = self.decrypt(b"")  # TLS 1.3 tickets, or a first frame right behind
            _send_by(sock, to_send, deadline)
            return plaintext
        finally:
            sock.settimeout(old_timeout)

    def _handshake_step(self, sock, deadline):
        """Advance the handshake and send what it wrote; return True once it is complete."""
        try:
            with self._lock:
                self._sslobj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            try:  # tell the peer why, if it still listens (an alert)
                _send_by(sock, self.encrypt(b""), deadline)
            except OSError:
                pass
            raise
        _send_by(sock, self.encrypt(b""), deadline)
        return done

    def _receive(self, sock, deadline):
        """Wait for the peer's next handshake bytes and put them in the incoming buffer."""
        sock.settimeout(_seconds_left(deadline))
        data = sock.recv(TLS_CHUNK_BYTES)
        with self._lock:
            if data:
                self._incoming.write(data)
            elif self._incoming.eof:  # OpenSSL asked for more after the end: never loop on it
                raise ssl.SSLEOFError("EOF occurred in violation of protocol")
            else:
                self._incoming.write_eof()

    # -- after the handshake (reader and writer threads) -------------------------

    def encrypt(self, data):
        """Return the TLS records carrying data, behind anything the channel still owed the peer.

        Runs on the writer thread (or whichever one thread sends); holds the lock,
        never blocks. The caller sends the result raw, in order. encrypt(b"") only
        returns what is owed.
        """
        view = memoryview(data)
        with self._lock:
            while view:  # Python 3.8's write(b"") raises, so empty data writes nothing
                written = self._sslobj.write(view)
                view = view[written:]
            return self._outgoing.read()

    def decrypt(self, raw, keep_output=False):
        """Take raw bytes from the socket; return (plaintext, to_send).

        Runs on the reader thread; holds the lock, never blocks. plaintext is every
        byte of application data that raw completes (b"" when it ends mid-record).
        When the peer's close_notify arrives, `closed` is set and what came before it
        is returned. Raises ssl.SSLError if raw is not valid TLS from this peer.

        to_send is what the TLS layer wrote while reading, usually b"" (a TLS 1.3
        KeyUpdate answer, say). It must reach the wire before anything a later
        encrypt() returns, or the peer gets records out of order and drops us. A
        reader that does not send itself passes keep_output=True: the bytes stay in
        the channel, output_waiting() says so, and the next encrypt(b"") sends them.
        """
        with self._lock:
            if raw:
                self._incoming.write(raw)
            plaintext = self._read_all()
            to_send = b"" if keep_output else self._outgoing.read()
        return plaintext, to_send

    def _read_all(self):
        """Return all the plaintext the incoming buffer completes. Called with the lock held."""
        chunks = []
        while not self.closed:
            try:
                chunk = self._sslobj.read(TLS_CHUNK_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:  # the peer's close_notify: read() returns b"" or raises the above
                self.closed = True
            chunks.append(chunk)
        return b"".join(chunks)

    def output_waiting(self):
        """Return True if the channel holds bytes owed to the peer (encrypt(b"") returns them). Any thread."""
        with self._lock:
            return self._outgoing.pending > 0

    def peer_certificate_der(self):
        """Return the peer's certificate as DER bytes, or None (no handshake yet, or none sent).

        Runs on any thread; holds the lock.
        """
        with self._lock:
            try:
                return self._sslobj.getpeercert(binary_form=True)
            except ValueError:  # "handshake not done yet"
                return None

    def fingerprint(self):
        """Return the SHA-256 of the peer's certificate as "AB:CD:...", or None. Any thread.

        On the client this is the server's identity: compare it with the one seen the
        first time (trust on first use, as SSH does).
        """
        der = self.peer_certificate_der()
        if der is None:
            return None
        return der_fingerprint(der)


def _seconds_left(deadline):
    """Return the seconds until deadline (a time.monotonic() value); raise socket.timeout if none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("the TLS handshake did not finish in time")
    return left


def _send_by(sock, data, deadline):
    """Send all of data on the blocking socket sock before deadline."""
    if data:
        sock.settimeout(_seconds_left(deadline))
        sock.sendall(data)


def server_tls_context(cert_path, key_path):
    """Return the server's TLS context: TLS 1.2 or newer, with this certificate and key.

    Raises OSError if a file cannot be read, ssl.SSLError if they do not fit together.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MIN_VERSION
    # Each connection is a new TLS session: tickets to resume one would only be bytes
    # every client has to read after the handshake. Renegotiation would make the
    # reader thread write; TLS 1.3 has none and 1.2's is not needed.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def client_tls_context():
    """Return the client's TLS context: TLS 1.2 or newer, any certificate accepted.

    Accepting any certificate is on purpose: LocalChat servers sign their own, so the
    caller checks TlsChannel.fingerprint() after the handshake instead (as SSH does).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # before verify_mode: CERT_NONE is refused while it is on
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = TLS_MIN_VERSION
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def looks_like_tls(first_bytes):
    """Return True if a connection's first bytes are the start of TLS, not of a JSON line.

    A TLS ClientHello starts with 0x16 (a handshake record) and 0x03 (version 3.x); a
    LocalChat frame starts with "{" or blank space. One byte is enough to tell, as from
    sock.recv(1, socket.MSG_PEEK); b"" (the peer closed) is not TLS.
    """
    head = bytes(first_bytes[:2])
    return head[:1] == b"\x16" and head[1:2] in (b"", b"\x03")


def tls_error_sentence(error, address, timeout_s=None):
    """Return one sentence for a person saying why the encrypted handshake with address failed.

    address is (host, port) or "host:port"; timeout_s is the handshake's time limit.
    """
    where = "%s:%s" % tuple(address[:2]) if isinstance(address, tuple) else str(address)
    if isinstance(error, (socket.timeout, TimeoutError)):
        within = "in %g s" % timeout_s if timeout_s else "in time"
        return ("The server at %s did not complete the encrypted handshake %s: it may not use encryption "
                "(connect without --tls), or the network is very slow." % (where, within))
    reason = getattr(error, "reason", None)
    # An EOF or a reset mid-handshake (Python 3.8 and 3.9 with OpenSSL 3 call an EOF a "zero return").
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        reason = "UNEXPECTED_EOF_WHILE_READING"
    for reasons, sentence in _TLS_FAILURES:
        if reason in reasons:
            return sentence % where
    if isinstance(error, ssl.SSLError):
        detail = reason.replace("_", " ").lower() if reason else str(error).split(" (_ssl.c:")[0]
        return "The encrypted connection to %s failed: %s." % (where, detail)
    return "The connection to %s was lost during the encrypted handshake: %s." % (
        where, getattr(error, "strerror", None) or error)


# =============================================================================
# 9. Transport: outboxes, the writer threads and the send budget
# =============================================================================
#
# Readers never write to sockets. Each connection has an Outbox that collects the
# frames owed to it (filled under the hub's lock); the SocketWriter thread it
# belongs to sends them without blocking. The Transport holds the writers and one
# budget for all outboxes together: while they owe more than it, readers wait
# before their next frame (so TCP slows the senders down), and a connection whose
# oldest owed frame has waited SLOW_S is dropped as too_slow.
#
# The lock rule shows in the names: a method ending in _locked is called with the
# hub's lock held (it is the writers' lock too); every other method takes it.

QUEUE_BUDGET_BYTES = 64 * 1024 * 1024  # frames owed to all connections together before readers wait
QUEUE_RESUME_BYTES = 48 * 1024 * 1024  # ... and how far it must fall before they read again
SEND_BYTES = 256 * 1024       # the most one send() is given: bounds the copy each outbox holds
SENDS_PER_VISIT = 4           # sends to one connection before the writer turns to the next
SELECT_LIMIT = 500            # sockets one selector watches: select() on Windows takes at most 512
OVERFLOW_RETRY_S = 0.05       # how often sockets beyond SELECT_LIMIT are tried without a selector
SWEEP_S = 1.0                 # how often a writer looks for connections that stopped reading
MARK_S = 0.25                 # frames taken within this share one timestamp (for their age)


class Latch:
    """A one-way flag that threads can wait for: a threading.Event for one use, in a lock.

    An Event costs a Condition, a lock and a deque: about 1 KiB for each of
    thousands of connections. This is one lock, held until set(), and a flag.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self):
        """Set the flag and wake the waiters. Only the writer thread calls it."""
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self):
        return self._set

    def wait(self, timeout):
        """Return True once set, False if timeout seconds passed first."""
        if self._lock.acquire(timeout=max(0.0, timeout)):
            self._lock.release()
            return True
        return False


class Outbox:
    """The frames owed to one connection, and the state of their sending.

    The hub delivers to it (deliver_locked, close_locked: it is a User's `conn`);
    filled under the hub's lock, everything past `chunks` belongs to the writer thread.
    """

    __slots__ = (
        "sock", "writer", "encrypt", "encode", "chunks", "queued", "closing", "hangup", "failed",
        "drained", "taken", "taken_bytes", "unsent", "unsent_plain", "marks", "taken_total", "sent_total",
        "fresh_at", "watch", "pushed", "paced",
    )

    def __init__(self, sock, writer, encrypt=None):
        self.sock = sock  # a duplicate of the connection's socket, non-blocking, the writer's own
        self.writer = writer
        self.encrypt = encrypt  # a TlsChannel's encrypt(), used by the writer thread, or None
        self.encode = encode_frame  # the connection's door's encoder (JSON lines until one is chosen)
        self.chunks = []  # frames not yet handed to the writer (guarded by the lock)
        self.queued = False  # on the writer's list of outboxes with news
        self.closing = False  # no more frames: close once everything is sent
        self.hangup = False  # once closed, also end the connection (wakes its reader)
        self.failed = None  # why the connection is over ("too_slow", "lost"), else None
        self.drained = Latch()  # set when the writer is done with this outbox
        # The writer thread's own: frames taken, the bytes of the send under way, and
        # marks [taken_total, time] that tell how long the oldest owed frame has waited
        # (kept only while the connection is behind; fresh_at stands in until then).
        self.taken = []
        self.taken_bytes = 0
        self.fresh_at = 0.0
        self.unsent = b""
        self.unsent_plain = 0  # frame bytes in `unsent` not yet counted as sent
        self.marks = []
        self.taken_total = self.sent_total = 0
        self.watch = None  # None, "selector" or "overflow": how the writer waits for the socket
        self.pushed = 0  # bytes queued by push_locked (not by deliver_locked): see owed_pushed()
        self.paced = None  # (bytes, Event) while a download waits for its owed bytes to fall that low

    def deliver_locked(self, event):
        """Queue an event, encoded by the connection's door. Called by the hub with its lock held.

        This is what the hub delivers to (a User's conn): it runs once per recipient,
        so it does push_locked()'s work itself instead of calling it.
        """
        if self.closing or self.failed:
            return
        data = event.by_encoder.get(self.encode)  # Event.encoded(), without a call per recipient
        if data is None:
            data = event.encoded(self.encode)  # once per event and door, shared by all
        self.chunks.append(data)
        self.writer.queued_bytes += len(data)
        if not self.queued:
            self.queued = True
            self.writer.note_locked(self)

    def push_locked(self, data):
        """Queue bytes for sending. Called with the hub's lock held; never blocks."""
        if self.closing or self.failed:
            return
        self.chunks.append(data)
        self.writer.queued_bytes += len(data)  # the one count per frame: the writer sums chunks itself
        self.pushed += len(data)
        if not self.queued:
            self.queued = True
            self.writer.note_locked(self)

    def owed_pushed(self):
        """Return the bytes queued by push_locked and not sent yet, on a connection the hub delivers
        nothing to (an HTTP one): how far ahead of its reader a download may run. Any thread."""
        return self.pushed - self.sent_total

    def wait_for_sent(self, most, timeout):
        """Block until owed_pushed() is at most `most`, the connection ends, or timeout passes.

        Runs on the connection's own thread (a download); the writer thread wakes it
        (see SocketWriter._credit), so a connection that reads slowly costs no polling.
        """
        if self.paced is None or self.paced[0] != most:
            self.paced = (most, threading.Event())  # only connections that download make one
        event = self.paced[1]
        event.clear()
        if self.owed_pushed() > most:  # looked at after clear(): the writer's set() from now on is not lost
            event.wait(timeout)

    def put(self, data):
        """Queue bytes for sending from a thread that does not hold the hub's lock."""
        with self.writer.lock:
            self.push_locked(data)

    def close_locked(self, hangup=True):
        """Send what is queued, then close (and hang up). Called with the hub's lock held."""
        self.closing = True
        self.hangup = self.hangup or hangup
        if not self.queued:
            self.queued = True
            self.writer.note_locked(self)

    def finish(self):
        """Send what is queued, then let the writer close its socket (takes the lock)."""
        with self.writer.lock:
            self.close_locked(hangup=False)


class SocketWriter:
    """One thread that sends its connections' outboxes without ever blocking on one.

    queued_bytes is written only under the lock, done_bytes only by this thread,
    so the Transport can add them up from any thread without a lock of its own.
    """

    __slots__ = ("transport", "lock", "queued_bytes", "done_bytes", "_news", "_asleep", "_selector", "_registered",
                 "_overflow", "_overflow_at", "_withdrawn", "_wake_recv", "_wake_send", "_stopping", "_thread")

    def __init__(self, transport, name="writer"):
        self.transport = transport
        self.lock = transport.lock  # the hub's lock: outboxes are filled under it
        self.queued_bytes = 0  # everything ever pushed to this writer's outboxes
        self.done_bytes = 0  # ... of which sent, or dropped with their connection
        self._news = []  # outboxes with new frames or state, appended under the lock
        self._asleep = False  # the thread waits in select(); note_locked() must wake it
        self._selector = selectors.DefaultSelector()
        self._registered = 0  # sockets in the selector besides the wake-up socket
        self._overflow = []  # outboxes waiting for their socket beyond SELECT_LIMIT: tried in turn
        self._overflow_at = 0.0  # when to try them next
        self._withdrawn = ()  # frames not to send: their messages could not be stored
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._selector.register(self._wake_recv, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._writer_loop, name=name, daemon=True)

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

    def note_locked(self, box):
        """Put box on the list of outboxes with news. Called with the hub's lock held."""
        self._news.append(box)
        if self._asleep:
            self._wake()

    def _wake(self):
        self._asleep = False
        try:
            self._wake_send.send(b"\0")
        except OSError:  # the buffer is full: a wake-up is already pending
            pass

    # -- the loop (the writer thread) ---------------------------------------------

    def _writer_loop(self):
        """Runs on the writer thread: take news, send, wait for news or writable sockets."""
        again = []  # outboxes the kernel still takes from, with more to send
        next_sweep = time.monotonic() + SWEEP_S
        while True:
            try:
                again, stop = self._round(again)
                if stop:
                    break
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_S
            except Exception:  # a bug: say so and go on, or every connection of this writer stalls
                self.transport.report_error("writer %s" % self._thread.name)
                again = []
        for box in self._waiting_boxes():
            self._close(box)

    def _round(self, again):
        """One turn of the loop: return (outboxes to send to at once, whether to stop)."""
        with self.lock:
            news, self._news = self._news, []
            now = time.monotonic()
            for box in news:
                self._take_locked(box, now)
            idle = not news and not again
            if idle and self._stopping:
                return [], True
            self._asleep = idle  # from here on, note_locked() wakes the select() below
        if idle:
            again = self._wait(self._wait_timeout())
        else:
            if news and self.transport.before_send is not None:
                # Outside the lock: commit the history rows of these frames (group commit).
                self._withdrawn = self.transport.before_send()
            work, again = again + news, []
            for box in work:
                if self._send(box):
                    again.append(box)
            if self._registered or self._overflow:  # sockets that became writable meanwhile
                again += self._wait(0)
        self.transport.progress()
        return again, False

    def _take_locked(self, box, now):
        """Take box's new frames for sending. Called with the lock held: only list moves here."""
        box.queued = False
        if not box.chunks:
            return
        pending = sum(map(len, box.chunks))
        if box.drained.is_set():  # closed meanwhile: nobody will send these
            self.queued_bytes -= pending
        else:
            box.taken_total += pending
            if not box.taken and not box.unsent:  # it keeps up: no marks (see _send)
                box.fresh_at = now
            elif box.marks and now - box.marks[-1][1] < MARK_S:
                box.marks[-1][0] = box.taken_total
            else:
                box.marks.append([box.taken_total, now])
            box.taken.extend(box.chunks)
            box.taken_bytes += pending
        box.chunks = []

    def _send(self, box):
        """Send what the kernel takes now; return True if more could go at once."""
        if box.drained.is_set():
            return False
        for _ in range(SENDS_PER_VISIT):
            if not box.unsent and box.taken:
                self._fill(box)
            if box.failed is not None or not box.unsent:
                break
            try:
                sent = box.sock.send(box.unsent)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                box.failed = "lost"
                break
            self._count_sent(box, sent)
            if box.unsent:
                break  # the kernel took part: it is full
        if box.failed is not None or (box.closing and not box.unsent and not box.taken and not box.chunks):
            self._close(box)
            return False
        if (box.unsent or box.taken) and not box.marks:  # behind from now on: since the last take
            box.marks.append([box.taken_total, box.fresh_at])
        if box.unsent:
            self._wait_for_socket(box)
            return False
        self._stop_waiting(box)
        return bool(box.taken)

    def _fill(self, box):
        """Join the next frames (up to SEND_BYTES) into box.unsent, encrypted if need be."""
        if box.taken_bytes <= SEND_BYTES:  # the usual case: everything at once
            parts, size = box.taken, box.taken_bytes
            box.taken = []
        else:
            count, size = 0, 0
            while size < SEND_BYTES:
                size += len(box.taken[count])
                count += 1
            parts = box.taken[:count]
            del box.taken[:count]
        box.taken_bytes -= size
        if self._withdrawn:
            kept = [part for part in parts if id(part) not in self._withdrawn]
            dropped = size - sum(map(len, kept))
            if dropped:
                parts, size = kept, size - dropped
                self._credit(box, dropped)
        data = b"".join(parts)
        box.unsent_plain = size
        if box.encrypt is not None:
            try:
                data = box.encrypt(data)  # b"" too: it sends what TLS owes the peer
            except (OSError, ValueError):  # the TLS channel is closed
                box.failed = "lost"
                return
        elif not data:
            return
        box.unsent = data

    def _count_sent(self, box, sent):
        if sent == len(box.unsent):
            box.unsent = b""
            self._credit(box, box.unsent_plain)
            box.unsent_plain = 0
        else:
            box.unsent = box.unsent[sent:]
            if box.encrypt is None:  # plain: each byte sent is a frame byte (TLS counts whole sends)
                self._credit(box, sent)
                box.unsent_plain -= sent
        if box.paced is not None and sent and box.marks:
            # A download: its reader is slow, not stuck, while bytes still go. Its oldest
            # piece may wait longer than slow_s for a phone on a crowded network to take
            # the megabyte ahead of it; only slow_s without a byte taken drops it.
            box.marks[0][1] = time.monotonic()

    def _credit(self, box, count):
        """Count bytes as done: the budget gets them back, the age marks move on."""
        self.done_bytes += count
        box.sent_total += count
        marks = box.marks
        while marks and marks[0][0] <= box.sent_total:
            marks.pop(0)
        if box.paced is not None and box.pushed - box.sent_total <= box.paced[0]:
            box.paced[1].set()  # a download may queue its next piece

    def _close(self, box):
        """Done with box: close the writer's socket; on failure or hang-up wake the session's reader."""
        self._stop_waiting(box)
        self._credit(box, box.taken_bytes + box.unsent_plain)  # what was owed is owed no more
        box.taken.clear()
        box.taken_bytes = box.unsent_plain = 0
        box.unsent = b""
        box.marks = []
        if box.failed is not None or box.hangup:
            try:
                box.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        box.sock.close()
        box.drained.set()
        if box.paced is not None:
            box.paced[1].set()  # a download waiting for room: the connection is over

    # -- waiting for sockets ----------------------------------------------------------

    def _wait_for_socket(self, box):
        """Have select() tell us when box's socket can take more (or try it in turn)."""
        if box.watch is not None:
            return
        if self._registered < self.transport.select_limit:
            self._selector.register(box.sock, selectors.EVENT_WRITE, box)
            self._registered += 1
            box.watch = "selector"
        else:  # select() on Windows takes no more sockets
            self._overflow.append(box)
            box.watch = "overflow"

    def _stop_waiting(self, box):
        if box.watch == "selector":
            self._selector.unregister(box.sock)
            self._registered -= 1
        elif box.watch == "overflow":
            self._overflow.remove(box)
        box.watch = None

    def _waiting_boxes(self):
        boxes = [key.data for key in self._selector.get_map().values() if key.data is not None]
        return boxes + self._overflow

    def _wait_timeout(self):
        if self._overflow:
            return OVERFLOW_RETRY_S
        return SWEEP_S if self._registered else None

    def _wait(self, timeout):
        """Wait for news, a writable socket or the timeout; send where it can go.

        Returns the outboxes that could take more at once.
        """
        more = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                try:
                    while self._wake_recv.recv(4096):
                        pass
                except OSError:
                    pass
            elif self._send(key.data):
                more.append(key.data)
        if self._overflow and time.monotonic() >= self._overflow_at:
            self._overflow_at = time.monotonic() + OVERFLOW_RETRY_S
            for box in list(self._overflow):
                if self._send(box):
                    more.append(box)
        return more

    def _sweep(self, now):
        """Drop the connections whose oldest owed frame has waited longer than SLOW_S."""
        slow_s = self.transport.slow_s
        for box in self._waiting_boxes():
            if box.marks and now - box.marks[0][1] > slow_s:
                box.failed = "too_slow"
                self._close(box)


class Transport:
    """The writer threads, and the budget of bytes that all outboxes together may owe."""

    def __init__(self, lock, before_send=None, writers=WRITER_THREADS, budget=QUEUE_BUDGET_BYTES,
                 resume_at=None, slow_s=SLOW_S, select_limit=SELECT_LIMIT):
        self.lock = lock
        self.before_send = before_send  # commits history; returns frames not to send
        self.on_error = None  # called after an internal error of a writer (the server counts them)
        self.budget = budget
        self.resume_at = budget * 3 // 4 if resume_at is None else resume_at
        self.slow_s = slow_s
        self.select_limit = select_limit
        self._room = threading.Condition(threading.Lock())
        self._shares = []  # the share of the budget each reader waiting for it waits for (changed under _room)
        self._wake_at = 0  # progress() wakes them once the outboxes owe this little: then some may go on
        # Sending is mostly system calls, which run without the GIL: one writer per
        # core sends to different sockets at the same time.
        self.writers = [SocketWriter(self, "writer-%d" % number) for number in range(writers)]
        self._turn = itertools.cycle(self.writers)
        self._turn_lock = threading.Lock()
        for writer in self.writers:
            writer.start()

    def report_error(self, where):
        """Log the exception being handled (a bug) and count it. Any thread, no lock held."""
        log.exception("%s: internal error", where)
        if self.on_error is not None:
            self.on_error()

    def outbox(self, sock, encrypt=None):
        """Return an Outbox for a connection's writer socket, on the next writer in turn."""
        with self._turn_lock:
            writer = next(self._turn)
        return Outbox(sock, writer, encrypt)

    def owed(self):
        """Return the bytes all outboxes owe now (any thread; no lock: each count has one writer)."""
        return sum(writer.queued_bytes - writer.done_bytes for writer in self.writers)

    def wait_for_room(self, give_up, share=1.0):
        """Block while the outboxes owe more than the budget. Runs on a reader thread.

        Returns once they owe less than resume_at, or when give_up() is true. A `share`
        below 1 waits at that share of both (downloads: what is left is the chat's).
        """
        if self.owed() <= self.budget * share:
            return
        with self._room:
            self._shares.append(share)
            self._wake_at = self.resume_at * max(self._shares)
            try:
                while self.owed() > self.resume_at * share and not give_up():
                    self._room.wait(0.25)
            finally:
                self._shares.remove(share)
                self._wake_at = self.resume_at * max(self._shares, default=0)

    def progress(self):
        """Wake the waiting readers if the budget has room again for some of them. Runs on a writer thread.

        Not before: downloads parked at a share of it would wake on every round of the writer.
        """
        if self._shares and self.owed() <= self._wake_at:
            with self._room:
                self._room.notify_all()

    def stop(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        with self._room:
            self._room.notify_all()
        for writer in self.writers:
            writer.stop(max(0.1, deadline - time.monotonic()))


# =============================================================================
# 10. Web: the WebSocket handshake and frames (no sockets)
# =============================================================================
#
# The web door's codec, pure and socket-free like the Protocol section: the
# WebSocket handshake (RFC 6455 section 4) as a check of parsed request headers,
# server frames, and a WebSocketReader that is fed a client's bytes and returns its
# messages and control frames, each with the frame to send back. One reader per
# connection, fed only by that connection's thread.

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3: hashed with the key into the accept value
WEBSOCKET_VERSION = "13"              # the only version RFC 6455 defines and browsers speak
WS_MAX_MESSAGE_BYTES = 64 * 1024      # a message, all its fragments together, may be this long; longer gets 1009
WS_MAX_CONTROL_BYTES = 125            # RFC 6455 5.5: the longest payload of a ping, pong or close
WS_MAX_REASON_BYTES = 123             # a close frame's reason: the control limit less the two-byte code
WS_DEFAULT_PORTS = {"http": 80, "https": 443}  # the port an Origin without one means, by scheme
WS_OP_CONTINUATION = 0x0
WS_OP_TEXT = 0x1
WS_OP_BINARY = 0x2
WS_OP_CLOSE = 0x8
WS_OP_PING = 0x9
WS_OP_PONG = 0xA
WS_CLOSE_NORMAL = 1000                # done
WS_CLOSE_GOING_AWAY = 1001            # the server stops, or the page is left
WS_CLOSE_PROTOCOL_ERROR = 1002        # a frame broke RFC 6455
WS_CLOSE_UNSUPPORTED = 1003           # a kind of message this endpoint does not take (binary, for the chat)
WS_CLOSE_NO_STATUS = 1005             # reported when a close frame has no code; never sent
WS_CLOSE_INVALID_DATA = 1007          # a text message that is not UTF-8
WS_CLOSE_POLICY = 1008                # a message the chat refuses for another reason
WS_CLOSE_TOO_BIG = 1009               # a message over WS_MAX_MESSAGE_BYTES
# Codes a peer may send in a close frame: RFC 6455 7.4.1's and those its IANA registry added
# (1011 to 1014), then 3000-4999 for libraries and applications. 1004-1006 and 1015 are
# reserved, never sent; the rest up to 2999 is unassigned (Autobahn's cases 7.7 and 7.9 agree).
_WS_PEER_CLOSE_CODES = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)])
_WS_DATA_OPCODES = frozenset([WS_OP_CONTINUATION, WS_OP_TEXT, WS_OP_BINARY])
_WS_CONTROL_OPCODES = frozenset([WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG])


def websocket_accept(key):
    """Return the Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


class WebSocketHandshake(NamedTuple):
    """The answer to a WebSocket upgrade request: 101 with its headers, or a refusal with a sentence."""

    status: int         # 101 Switching Protocols, or the HTTP status of the refusal
    headers: list       # (name, value) pairs for the response
    sentence: str = ""  # why it was refused: the response's text and the log's


def _ws_header_table(headers):
    """Return the headers as {lower-case name: [values]}, from a mapping with items() or (name, value) pairs."""
    table = {}
    for name, value in (headers.items() if hasattr(headers, "items") else headers):
        table.setdefault(name.strip().lower(), []).append(value.strip())
    return table


def _ws_tokens(table, name):
    """Return the lower-case comma-separated tokens of every value of a list header."""
    return {token.strip().lower() for value in table.get(name, []) for token in value.split(",")}


def _ws_single(table, name):
    """Return a header that must appear once, or None if it is missing or repeated."""
    values = table.get(name, [])
    return values[0] if len(values) == 1 else None


def _ws_valid_key(key):
    """Tell whether a Sec-WebSocket-Key is 16 bytes in base64, as RFC 6455 4.1 requires."""
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except ValueError:  # binascii.Error and UnicodeEncodeError are both ValueErrors
        return False


def _ws_same_authority(origin, host):
    """Tell whether an Origin (scheme://host[:port]) names the host and port of a Host header."""
    try:
        page = urllib.parse.urlsplit(origin)
        target = urllib.parse.urlsplit("//" + host)
        default = WS_DEFAULT_PORTS.get(page.scheme)
        if default is None or page.hostname is None or "@" in page.netloc or page.path or page.query:
            return False  # "null", a file: page, an extension, or no origin at all
        if "@" in target.netloc or target.path or target.query:
            return False
        return (page.hostname, page.port or default) == (target.hostname, target.port or default)
    except ValueError:  # a port that is no number, or out of range
        return False


def _ws_upgrade_refusal(table):
    """Return the refusal of a request that is no valid WebSocket upgrade, or None if it is one."""
    if "websocket" not in _ws_tokens(table, "upgrade"):
        return WebSocketHandshake(426, [("Upgrade", "websocket"), ("Connection", "Upgrade")],
                                  "This address speaks WebSocket only.")
    if "upgrade" not in _ws_tokens(table, "connection"):
        return WebSocketHandshake(400, [], "A WebSocket request must say Connection: Upgrade.")
    if _ws_single(table, "sec-websocket-version") != WEBSOCKET_VERSION:
        return WebSocketHandshake(426, [("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
                                  "This server speaks WebSocket version 13 only.")
    if not _ws_valid_key(_ws_single(table, "sec-websocket-key")):
        return WebSocketHandshake(400, [], "Sec-WebSocket-Key must be 16 bytes in base64.")
    if _ws_single(table, "host") is None:
        return WebSocketHandshake(400, [], "A WebSocket request must name its Host.")
    return None


def _ws_origin_refusal(table):
    """Return a 403 refusal when a browser page from another site asks, None otherwise.

    Browsers send Origin with every WebSocket request; a client without one is no
    browser, so no other site's page can be speaking through it.
    """
    if "origin" not in table:
        return None
    origin = _ws_single(table, "origin")
    if origin is None or not _ws_same_authority(origin, _ws_single(table, "host")):
        return WebSocketHandshake(403, [], "A page from another site may not join this chat.")
    return None


def websocket_handshake(method, headers):
    """Check a WebSocket upgrade request (RFC 6455 4.2.1) and return the WebSocketHandshake answering it.

    `headers` is a mapping with items() (an http.client.HTTPMessage, a dict) or a
    list of (name, value) pairs. Every extension offered is declined (the answer
    names none, so permessage-deflate is off) and no subprotocol is chosen.
    """
    if method != "GET":
        return WebSocketHandshake(405, [("Allow", "GET")], "A WebSocket upgrade must use GET.")
    table = _ws_header_table(headers)
    refusal = _ws_upgrade_refusal(table) or _ws_origin_refusal(table)
    if refusal is not None:
        return refusal
    accept = websocket_accept(table["sec-websocket-key"][0])
    return WebSocketHandshake(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                    ("Sec-WebSocket-Accept", accept)])


def websocket_frame(opcode, payload, fin=True):
    """Return one server frame: unmasked, its length in 7, 16 or 64 bits (RFC 6455 5.2).

    Raises ValueError for a control frame over 125 bytes, which no peer may accept.
    """
    length = len(payload)
    if opcode in _WS_CONTROL_OPCODES and length > WS_MAX_CONTROL_BYTES:
        raise ValueError("a WebSocket control frame carries at most 125 bytes")
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        return head + bytes([length]) + payload
    if length < 1 << 16:
        return head + bytes([126]) + length.to_bytes(2, "big") + payload
    return head + bytes([127]) + length.to_bytes(8, "big") + payload


def websocket_close_frame(code=None, reason=""):
    """Return a close frame with a code and a reason cut to 123 bytes of UTF-8; no code, no payload."""
    if code is None:
        return websocket_frame(WS_OP_CLOSE, b"")
    reason_bytes = reason.encode("utf-8")[:WS_MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return websocket_frame(WS_OP_CLOSE, code.to_bytes(2, "big") + reason_bytes)


def _ws_unmask(payload, mask):
    """Return the payload XORed with the four-byte mask repeated (one big-integer XOR, not a byte loop)."""
    if not payload:
        return b""
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


def _ws_close_payload(payload):
    """Return (code, reason) of a close frame's payload: (1005, "") when empty; ProtocolError when invalid."""
    if not payload:
        return WS_CLOSE_NO_STATUS, ""
    code = int.from_bytes(payload[:2], "big")
    if len(payload) == 1 or code not in _WS_PEER_CLOSE_CODES:
        raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "The close frame's code is not one a peer may send.")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(WS_CLOSE_INVALID_DATA, "The close frame's reason is not UTF-8.") from None


class WebSocketEvent(NamedTuple):
    """What a WebSocketReader found in a client's bytes, and the frame to send back for it."""

    kind: str            # "text", "binary", "ping", "pong", "close" (the peer's) or "fail" (a violation)
    data: object = b""   # str for text, bytes for binary, ping and pong
    code: int = 0        # close and fail: the close code (1005 when the peer's close had none)
    reason: str = ""     # close and fail: the reason, for the log
    reply: bytes = b""   # the frame to send now (a pong, the close echo, the failure's close), or b""


class _WsHeader(NamedTuple):
    """A frame's header, read before its payload has arrived."""

    fin: bool
    opcode: int
    length: int     # payload bytes
    size: int       # header bytes, mask included
    mask: bytes     # the client's four-byte masking key


class WebSocketReader:
    """Cuts a client's bytes into WebSocket messages and control frames (RFC 6455), with no socket.

    feed() returns WebSocketEvents: send each one's reply, then act on it. After a
    "close" or "fail" event the reader is closed: feed() ignores everything, and
    the connection should be closed once the reply is out (the server closes TCP
    first). After begin_close(), messages the peer sent before it saw our close may
    still come, and pings get no pong. Runs on the connection's reader thread only.

    A data frame's payload is taken as it arrives (the buffer holds no more than one
    read and a header), so text that is not UTF-8 fails at its first bad byte.
    """

    def __init__(self, max_message_bytes=WS_MAX_MESSAGE_BYTES):
        self.max_message_bytes = max_message_bytes
        self.closing = False    # a close frame of ours is out: nothing more may be sent
        self.closed = False     # the close handshake is over or the connection failed
        self._buffer = bytearray()
        self._frame = None      # the header of the data frame whose payload is arriving
        self._left = 0          # ... and how many of its payload bytes are still to come
        self._opcode = None     # the data opcode of the message being reassembled, None between messages
        self._parts = []        # its pieces: bytes, or str for text decoded so far
        self._size = 0          # its bytes so far
        self._decoder = None    # text: an incremental UTF-8 decoder, so that bad text fails where it is

    def begin_close(self, code=WS_CLOSE_GOING_AWAY, reason=""):
        """Return the close frame that starts the server's side of the close handshake, or b"" if one went out."""
        if self.closing:
            return b""
        self.closing = True
        return websocket_close_frame(code, reason)

    def feed(self, data):
        """Take the bytes that arrived and return the events of every frame and message they complete."""
        if self.closed:
            return []
        self._buffer += data
        events = []
        try:
            for _ in range(2 * len(self._buffer) + 2):  # every other step at least takes a byte: bounded
                found = self._take_payload() if self._frame else self._take_header()
                if found is None:
                    break
                events.extend(found)
                if self.closed:
                    break
        except ProtocolError as error:
            events.append(self._fail(error.code, error.text))
        return events

    def _fail(self, code, reason):
        """Return the event that fails the connection: our close frame with the code, and nothing after it."""
        reply = self.begin_close(code, reason)
        self.closed = True
        self._buffer = bytearray()
        return WebSocketEvent("fail", code=code, reason=reason, reply=reply)

    def _header(self):
        """Return the next frame's header once it is all in, None before; ProtocolError if it breaks a rule."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        self._check_bits(buffer[0], buffer[1])
        fin, opcode, length = bool(buffer[0] & 0x80), buffer[0] & 0x0F, buffer[1] & 0x7F
        extra = {126: 2, 127: 8}.get(length, 0)  # the 16- and 64-bit lengths that follow
        if len(buffer) < 2 + extra:
            return None
        if extra:
            length = int.from_bytes(buffer[2:2 + extra], "big")
        if length >> 63:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A frame's 64-bit length has its top bit set.")
        self._check_order(opcode, length)
        size = 2 + extra + 4
        if len(buffer) < size:
            return None
        return _WsHeader(fin, opcode, length, size, bytes(buffer[size - 4:size]))

    @staticmethod
    def _check_bits(first, second):
        """Refuse reserved bits and opcodes, an unmasked frame, and a fragmented or long control frame."""
        opcode = first & 0x0F
        if first & 0x70:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A frame set reserved bits, and no extension was agreed.")
        if opcode not in _WS_DATA_OPCODES and opcode not in _WS_CONTROL_OPCODES:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A frame has the reserved opcode %d." % opcode)
        if not second & 0x80:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A client's frames must be masked.")
        if opcode in _WS_CONTROL_OPCODES and (not first & 0x80 or second & 0x7F > WS_MAX_CONTROL_BYTES):
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A control frame must be whole and at most 125 bytes.")

    def _check_order(self, opcode, length):
        """Refuse a data frame out of order, or one that makes its message too long, before its payload comes."""
        if opcode in _WS_CONTROL_OPCODES:
            return
        if opcode == WS_OP_CONTINUATION and self._opcode is None:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A continuation frame came with no message to continue.")
        if opcode != WS_OP_CONTINUATION and self._opcode is not None:
            raise ProtocolError(WS_CLOSE_PROTOCOL_ERROR, "A new message began before the last one ended.")
        if self._size + length > self.max_message_bytes:
            raise ProtocolError(WS_CLOSE_TOO_BIG, "A message is longer than %d bytes." % self.max_message_bytes)

    def _take_header(self):
        """Take the next header (a control frame whole) and return its events; None until it is all in."""
        header = self._header()
        if header is None:
            return None
        if header.opcode in _WS_CONTROL_OPCODES:
            end = header.size + header.length
            if len(self._buffer) < end:
                return None
            payload = _ws_unmask(bytes(self._buffer[header.size:end]), header.mask)
            del self._buffer[:end]
            return [self._control(header.opcode, payload)]
        del self._buffer[:header.size]
        if header.opcode != WS_OP_CONTINUATION:
            self._opcode = header.opcode
            self._decoder = codecs.getincrementaldecoder("utf-8")() if header.opcode == WS_OP_TEXT else None
        self._frame, self._left = header, header.length
        return []

    def _take_payload(self):
        """Take what has come of the current data frame's payload; return the message's event once it is whole."""
        count = min(self._left, len(self._buffer))
        if count == 0 and self._left:
            return None
        header, done = self._frame, count == self._left
        turn = (header.length - self._left) % 4  # the mask goes on where the last piece stopped
        piece = _ws_unmask(bytes(self._buffer[:count]), header.mask[turn:] + header.mask[:turn])
        del self._buffer[:count]
        self._left -= count
        self._size += count
        self._parts.append(self._decoded(piece, done and header.fin) if self._decoder else piece)
        if not done:
            return []
        self._frame = None
        return self._message() if header.fin else []

    def _decoded(self, piece, final):
        """Return a piece of text decoded so far; a bad sequence fails here, not at the message's end."""
        try:
            return self._decoder.decode(piece, final)
        except UnicodeDecodeError:
            raise ProtocolError(WS_CLOSE_INVALID_DATA, "A text message is not UTF-8.") from None

    def _message(self):
        """Return the event of the message whose last piece has come, and start afresh."""
        kind = "text" if self._opcode == WS_OP_TEXT else "binary"
        data = ("" if kind == "text" else b"").join(self._parts)
        self._opcode, self._parts, self._size, self._decoder = None, [], 0, None
        return [WebSocketEvent(kind, data)]

    def _control(self, opcode, payload):
        """Return the event of a ping, a pong or a close; after a close the reader takes nothing more."""
        if opcode == WS_OP_PING:
            pong = b"" if self.closing else websocket_frame(WS_OP_PONG, payload)
            return WebSocketEvent("ping", payload, reply=pong)
        if opcode == WS_OP_PONG:
            return WebSocketEvent("pong", payload)
        code, reason = _ws_close_payload(payload)
        reply = self.begin_close(None if code == WS_CLOSE_NO_STATUS else code)  # the echo, if ours is not out
        self.closed = True
        return WebSocketEvent("close", code=code, reason=reason, reply=reply)


# =============================================================================
# 11. Web page: HTML, CSS and JavaScript
# =============================================================================
#
# What a browser gets from the web door, served as is: one document, one
# stylesheet, one script, a web app manifest and an icon. No templating: the page
# gets everything else over its WebSocket, as protocol frames, and puts what people
# typed on the screen only as text (textContent), never as markup. Plain data.

WEB_PAGE_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="color-scheme" content="light dark">
<meta name="theme-color" content="#f6f7f9" media="(prefers-color-scheme: light)">
<meta name="theme-color" content="#111318" media="(prefers-color-scheme: dark)">
<meta name="referrer" content="no-referrer">
<title>LocalChat</title>
<link rel="stylesheet" href="/app.css">
<link rel="manifest" href="/manifest.webmanifest">
<link rel="icon" href="/icon.svg">
<link rel="apple-touch-icon" href="/icon.svg">
<script src="/app.js" defer></script>
</head>
<body>
<section id="join" class="join">
  <form id="join-form" class="card" autocomplete="on">
    <img class="logo" src="/icon.svg" alt="" width="64" height="64">
    <h1>LocalChat</h1>
    <p class="lead">Chat with everybody on this network. No account, nothing to install.</p>
    <p id="join-message" class="join-message" role="alert" hidden></p>
    <label for="name-input">Your name</label>
    <input id="name-input" name="name" type="text" maxlength="32" autocomplete="nickname" autocapitalize="off"
           autocorrect="off" spellcheck="false" enterkeyhint="go" required placeholder="e.g. alice">
    <div id="password-row" class="password-row" hidden>
      <label for="password-input">Password of this chat</label>
      <input id="password-input" name="password" type="password" autocomplete="current-password" enterkeyhint="go">
    </div>
    <button id="join-button" class="primary" type="submit">Join</button>
    <noscript><p class="join-message">LocalChat needs JavaScript to run in this browser.</p></noscript>
  </form>
</section>

<div id="app" class="app" hidden>
  <header class="topbar">
    <button id="rooms-button" class="icon-button drawer-button" type="button" aria-label="Rooms and direct messages">
      <svg viewBox="0 0 24 24" width="24" height="24" aria-hidden="true"><path fill="currentColor" d="M3 6h18v2H3zm0 5h18v2H3zm0 5h18v2H3z"/></svg>
    </button>
    <div class="heading">
      <h1 id="title">LocalChat</h1>
      <p id="subtitle"></p>
    </div>
    <button id="people-button" class="icon-button drawer-button" type="button" aria-label="People in this room">
      <svg viewBox="0 0 24 24" width="24" height="24" aria-hidden="true"><path fill="currentColor" d="M9 12a4 4 0 1 0 0-8 4 4 0 0 0 0 8zm0 2c-3.3 0-7 1.7-7 4v2h14v-2c0-2.3-3.7-4-7-4zm7.5-2.2a3.5 3.5 0 1 0-1-6.8 6 6 0 0 1 0 6.8 3.5 3.5 0 0 0 1 0zM17.8 14c1.4.9 2.2 2.1 2.2 4v2h3v-2c0-2-2.4-3.5-5.2-4z"/></svg>
      <span id="people-count" class="people-count"></span>
    </button>
  </header>

  <nav id="rooms" class="pane rooms-pane" aria-label="Rooms">
    <h2>Rooms</h2>
    <ul id="room-list" class="list"></ul>
    <h2 id="direct-heading" hidden>Direct messages</h2>
    <ul id="direct-list" class="list"></ul>
    <h2 id="other-heading" hidden>More rooms</h2>
    <ul id="other-rooms" class="list"></ul>
    <form id="join-room-form" class="join-room">
      <label for="join-room-input">Join or start a room</label>
      <div class="row">
        <input id="join-room-input" type="text" maxlength="33" placeholder="room name" autocapitalize="off"
               autocorrect="off" spellcheck="false" enterkeyhint="go">
        <button class="secondary" type="submit">Join</button>
      </div>
    </form>
    <div class="me">
      <p id="me-name"></p>
      <button id="leave-button" class="secondary" type="button">Leave the chat</button>
    </div>
  </nav>

  <main class="main">
    <div id="status" class="status" role="status" hidden>
      <span id="status-text"></span>
      <button id="status-action" class="link-button" type="button" hidden></button>
    </div>
    <div id="logs" class="logs">
      <button id="jump" class="jump" type="button" hidden></button>
      <div id="drop-hint" class="drop-hint" hidden>
        <svg viewBox="0 0 24 24" width="40" height="40" aria-hidden="true"><path fill="currentColor" d="M11 16V7.8l-3.1 3.1-1.4-1.4L12 4l5.5 5.5-1.4 1.4L13 7.8V16zm-6 4v-5h2v3h10v-3h2v5z"/></svg>
        <p id="drop-text">Drop files to send them</p>
      </div>
    </div>
    <form id="composer" class="composer">
      <button id="attach-button" class="icon-button attach" type="button" aria-label="Send a file" title="Send a file" hidden>
        <svg viewBox="0 0 24 24" width="24" height="24" aria-hidden="true"><path fill="currentColor" d="M16.5 6.5v10.6a4.5 4.5 0 0 1-9 0V5.8a3 3 0 0 1 6 0v10.3a1.5 1.5 0 0 1-3 0V6.5H9v9.6a3 3 0 0 0 6 0V5.8a4.5 4.5 0 0 0-9 0v11.3a6 6 0 0 0 12 0V6.5z"/></svg>
      </button>
      <input id="file-input" type="file" multiple hidden tabindex="-1">
      <textarea id="input" rows="1" dir="auto" placeholder="Message" aria-label="Message"
                enterkeyhint="send" autocomplete="off"></textarea>
      <button class="send" type="submit" aria-label="Send">
        <svg viewBox="0 0 24 24" width="22" height="22" aria-hidden="true"><path fill="currentColor" d="M3.4 20.4 21 12 3.4 3.6 3.4 10l12.6 2-12.6 2z"/></svg>
      </button>
    </form>
  </main>

  <aside id="people" class="pane people-pane" aria-label="People">
    <h2 id="people-heading">People</h2>
    <ul id="people-list" class="list"></ul>
    <p class="hint">Tap a name to send a direct message. Type /help for the commands.</p>
  </aside>
  <div id="scrim" class="scrim"></div>
</div>
</body>
</html>
"""

WEB_PAGE_CSS = r"""/* LocalChat's web page. Phone first: one column with drawers; side panes from 900 px.
   Both themes are the custom properties below; prefers-color-scheme picks one. */
:root {
  color-scheme: light dark;
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", Ubuntu, Cantarell, "Helvetica Neue", Arial, sans-serif;
  --mono: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  --bg: #f6f7f9;
  --pane: #ffffff;
  --raised: #ffffff;
  --text: #16181d;
  --muted: #5d6370;
  --line: #e2e5eb;
  --hover: #eef1f6;
  --accent: #2f6fed;
  --accent-strong: #1f56c9;
  --on-accent: #ffffff;
  --bubble: #ffffff;
  --bubble-line: #e2e5eb;
  --own: #2f6fed;
  --on-own: #ffffff;
  --own-link: #ffffff;
  --mention: #fff4cc;
  --mention-line: #e5b53a;
  --danger: #c62828;
  --danger-bg: #fdecec;
  --warn-bg: #fff4d6;
  --warn-text: #6b4b00;
  --info-bg: #e8f0fe;
  --info-text: #1d3f8f;
  --scrim: rgba(15, 17, 21, 0.45);
  --shadow: 0 1px 2px rgba(16, 24, 40, 0.06), 0 1px 3px rgba(16, 24, 40, 0.08);
  --drawer-shadow: 0 10px 40px rgba(16, 24, 40, 0.25);
  --radius: 18px;
  --tap: 44px;
}

@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111318;
    --pane: #171a21;
    --raised: #1e222b;
    --text: #e8eaef;
    --muted: #9aa1ae;
    --line: #2a2f3a;
    --hover: #232833;
    --accent: #6d9bff;
    --accent-strong: #8fb2ff;
    --on-accent: #0b1020;
    --bubble: #1f232c;
    --bubble-line: #2b303b;
    --own: #3b6fe0;
    --on-own: #ffffff;
    --own-link: #ffffff;
    --mention: #3a3216;
    --mention-line: #b8902a;
    --danger: #ff8a80;
    --danger-bg: #3a1d1d;
    --warn-bg: #3a3016;
    --warn-text: #f3d98b;
    --info-bg: #1c2a48;
    --info-text: #b9cdfb;
    --scrim: rgba(0, 0, 0, 0.6);
    --shadow: none;
    --drawer-shadow: 0 10px 40px rgba(0, 0, 0, 0.6);
  }
}

/* Name colours: the Tk window's NAME_COLOURS (light, and dark below), in the same order. */
.c0 { --name: #c62828; } .c1 { --name: #b45309; } .c2 { --name: #7a6f00; } .c3 { --name: #2e7d32; } .c4 { --name: #00798a; }
.c5 { --name: #1565c0; } .c6 { --name: #4338ca; } .c7 { --name: #7b1fa2; } .c8 { --name: #ad1457; } .c9 { --name: #6d4c41; }
@media (prefers-color-scheme: dark) {
  .c0 { --name: #ff8a80; } .c1 { --name: #f5a35c; } .c2 { --name: #d9c95a; } .c3 { --name: #7ccf7f; } .c4 { --name: #4dd0e1; }
  .c5 { --name: #6aaeff; } .c6 { --name: #b3a4ff; } .c7 { --name: #d58ef0; } .c8 { --name: #f48fb1; } .c9 { --name: #c9a786; }
}

*, *::before, *::after { box-sizing: border-box; }
[hidden] { display: none !important; }

html, body {
  margin: 0;
  height: 100%;
  background: var(--bg);
  color: var(--text);
  font: 16px/1.45 var(--font);
  -webkit-text-size-adjust: 100%;
  text-size-adjust: 100%;
}
body { overflow: hidden; }

button, input, textarea { font: inherit; color: inherit; }
input, textarea { font-size: 16px; } /* 16 px or more: phones do not zoom in on focus */
button { cursor: pointer; -webkit-tap-highlight-color: transparent; }
button:disabled { cursor: default; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
a { color: var(--accent); text-decoration: underline; text-underline-offset: 2px; overflow-wrap: anywhere; }

h1, h2, p { margin: 0; }

input[type="text"], input[type="password"], textarea {
  width: 100%;
  min-height: var(--tap);
  padding: 10px 14px;
  border: 1px solid var(--line);
  border-radius: 12px;
  background: var(--raised);
  outline: none;
}
input[type="text"]:focus, input[type="password"]:focus, textarea:focus {
  border-color: var(--accent);
  box-shadow: 0 0 0 3px color-mix(in srgb, var(--accent) 25%, transparent);
}

.primary, .secondary {
  min-height: var(--tap);
  padding: 0 20px;
  border-radius: 12px;
  font-weight: 600;
}
.primary { border: none; background: var(--accent); color: var(--on-accent); }
.primary:hover:not(:disabled) { background: var(--accent-strong); }
.primary:disabled { opacity: 0.7; }
.secondary { border: 1px solid var(--line); background: var(--raised); }
.secondary:hover { background: var(--hover); }
.link-button {
  min-height: var(--tap);
  padding: 0 10px;
  border: none;
  border-radius: 8px;
  background: transparent;
  color: inherit;
  font-weight: 600;
  text-decoration: underline;
}

/* -- the join screen ------------------------------------------------------------------- */

.join {
  display: flex;
  align-items: center;
  justify-content: center;
  min-height: 100%;
  padding: 24px 16px calc(24px + env(safe-area-inset-bottom));
  overflow-y: auto;
  height: 100%;
}
.card {
  display: flex;
  flex-direction: column;
  gap: 12px;
  width: 100%;
  max-width: 380px;
  padding: 28px 24px;
  border: 1px solid var(--line);
  border-radius: 24px;
  background: var(--pane);
  box-shadow: var(--shadow);
}
.logo { align-self: center; width: 64px; height: 64px; }
.card h1 { text-align: center; font-size: 26px; letter-spacing: -0.01em; }
.lead { text-align: center; color: var(--muted); margin-bottom: 8px; }
.card label { font-weight: 600; font-size: 15px; }
.card .primary { margin-top: 8px; }
.password-row { display: flex; flex-direction: column; gap: 12px; }
.join-message {
  padding: 10px 14px;
  border-radius: 12px;
  background: var(--danger-bg);
  color: var(--danger);
  font-weight: 500;
}
.join-message.info { background: var(--info-bg); color: var(--info-text); }

/* -- the chat: one column, drawers ------------------------------------------------------------ */

.app {
  display: grid;
  grid-template-columns: 1fr;
  grid-template-rows: auto 1fr;
  grid-template-areas: "top" "main";
  height: 100vh;
  height: 100dvh;
}

.topbar {
  grid-area: top;
  display: flex;
  align-items: center;
  gap: 4px;
  min-height: 56px;
  padding: 6px 6px;
  padding-top: calc(6px + env(safe-area-inset-top));
  border-bottom: 1px solid var(--line);
  background: var(--pane);
}
.heading { flex: 1; min-width: 0; padding: 0 6px; }
.heading h1 {
  font-size: 17px;
  font-weight: 700;
  white-space: nowrap;
  overflow: hidden;
  text-overflow: ellipsis;
}
.heading p {
  font-size: 13px;
  color: var(--muted);
  white-space: nowrap;
  overflow: hidden;
  text-overflow: ellipsis;
}
.icon-button {
  position: relative;
  display: inline-flex;
  align-items: center;
  justify-content: center;
  gap: 2px;
  min-width: var(--tap);
  height: var(--tap);
  padding: 0 8px;
  border: none;
  border-radius: 12px;
  background: transparent;
}
.icon-button:hover { background: var(--hover); }
.people-count { font-size: 14px; font-weight: 600; color: var(--muted); }
.drawer-button.has-unread::after {
  content: "";
  position: absolute;
  top: 9px;
  right: 8px;
  width: 10px;
  height: 10px;
  border-radius: 50%;
  background: var(--danger);
  border: 2px solid var(--pane);
}

.pane {
  position: fixed;
  top: 0;
  bottom: 0;
  z-index: 20;
  width: min(320px, 86vw);
  padding: calc(12px + env(safe-area-inset-top)) 10px calc(12px + env(safe-area-inset-bottom));
  overflow-y: auto;
  background: var(--pane);
  box-shadow: var(--drawer-shadow);
  transition: transform 0.2s ease, visibility 0.2s;
  visibility: hidden;
}
.rooms-pane { left: 0; transform: translateX(-105%); }
.people-pane { right: 0; transform: translateX(105%); }
.rooms-open .rooms-pane, .people-open .people-pane { transform: none; visibility: visible; }
.scrim {
  position: fixed;
  inset: 0;
  z-index: 10;
  background: var(--scrim);
  opacity: 0;
  pointer-events: none;
  transition: opacity 0.2s ease;
}
.rooms-open .scrim, .people-open .scrim { opacity: 1; pointer-events: auto; }
@media (prefers-reduced-motion: reduce) {
  .pane, .scrim { transition: none; }
}

.pane h2 {
  margin: 14px 8px 6px;
  font-size: 12px;
  font-weight: 700;
  letter-spacing: 0.06em;
  text-transform: uppercase;
  color: var(--muted);
}
.pane h2:first-child { margin-top: 4px; }
.list { list-style: none; margin: 0; padding: 0; }
.entry {
  display: flex;
  align-items: center;
  gap: 10px;
  width: 100%;
  min-height: var(--tap);
  padding: 6px 10px;
  border: none;
  border-radius: 10px;
  background: transparent;
  text-align: left;
}
.entry:hover:not(:disabled) { background: var(--hover); }
.entry.current { background: color-mix(in srgb, var(--accent) 14%, transparent); font-weight: 600; }
.entry.unread .label { font-weight: 700; }
.entry:disabled { opacity: 1; }
.entry-row { display: flex; align-items: center; }
.entry-row .entry { flex: 1; min-width: 0; }
.close { flex: none; font-size: 22px; color: var(--muted); }
.sigil { width: 18px; text-align: center; color: var(--muted); font-weight: 600; }
.label { flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.detail {
  display: block;
  font-size: 13px;
  font-weight: 400;
  color: var(--muted);
  overflow: hidden;
  text-overflow: ellipsis;
}
.badge, .count, .tag {
  min-width: 22px;
  padding: 1px 7px;
  border-radius: 11px;
  font-size: 12px;
  font-weight: 700;
  text-align: center;
}
.badge { background: var(--muted); color: var(--pane); }
.badge.loud { background: var(--danger); color: #fff; }
.count { color: var(--muted); font-weight: 500; }
.tag { border: 1px solid var(--line); color: var(--muted); font-weight: 600; }
.person.away .avatar { opacity: 0.5; }
.join-room { margin: 18px 8px 0; display: flex; flex-direction: column; gap: 6px; }
.join-room label { font-size: 13px; color: var(--muted); font-weight: 600; }
.row { display: flex; gap: 8px; }
.row input { flex: 1; min-width: 0; }
.me { margin: 24px 8px 0; padding-top: 14px; border-top: 1px solid var(--line); display: flex; flex-direction: column; gap: 8px; }
.me p { font-size: 13px; color: var(--muted); }
.hint { margin: 16px 8px 0; font-size: 13px; color: var(--muted); }

/* -- the conversation ------------------------------------------------------------------------ */

.main {
  grid-area: main;
  display: flex;
  flex-direction: column;
  min-height: 0;
  min-width: 0;
}
.status {
  display: flex;
  align-items: center;
  justify-content: center;
  flex-wrap: wrap;
  gap: 4px 8px;
  padding: 4px 14px;
  font-size: 14px;
  text-align: center;
  background: var(--info-bg);
  color: var(--info-text);
}
.status.warn { background: var(--warn-bg); color: var(--warn-text); }
.status.error { background: var(--danger-bg); color: var(--danger); }
.logs { position: relative; flex: 1; min-height: 0; }
.jump {
  position: absolute;
  left: 50%;
  bottom: 12px;
  z-index: 2;
  transform: translateX(-50%);
  min-height: var(--tap);
  padding: 0 18px;
  border: none;
  border-radius: 22px;
  background: var(--accent);
  color: var(--on-accent);
  font-size: 14px;
  font-weight: 600;
  box-shadow: var(--drawer-shadow);
}
.log {
  position: absolute;
  inset: 0;
  display: flex;
  flex-direction: column;
  overflow-y: auto;
  overscroll-behavior: contain;
  padding: 8px 12px 12px;
}
.older {
  display: block;
  flex: none;
  margin: auto auto 8px; /* auto above: a short conversation sits at the bottom, next to the box */
  min-height: var(--tap);
  padding: 0 14px;
  border: 1px solid var(--line);
  border-radius: 22px;
  background: var(--raised);
  color: var(--accent);
  font-size: 14px;
  font-weight: 600;
}
.older.done, .older:disabled { border-color: transparent; background: transparent; color: var(--muted); font-weight: 500; }

.day {
  position: sticky;
  top: 0;
  z-index: 1;
  width: fit-content;
  margin: 12px auto 6px;
  padding: 3px 12px;
  border-radius: 12px;
  background: var(--raised);
  box-shadow: var(--shadow);
  border: 1px solid var(--line);
  font-size: 12px;
  font-weight: 600;
  color: var(--muted);
}
.new-line {
  display: flex;
  align-items: center;
  gap: 8px;
  margin: 10px 0 4px;
  font-size: 12px;
  font-weight: 700;
  color: var(--danger);
}
.new-line::before, .new-line::after { content: ""; flex: 1; height: 1px; background: var(--danger); opacity: 0.6; }

.group { display: flex; align-items: flex-start; gap: 8px; margin-top: 10px; max-width: 100%; }
.group-body { display: flex; flex-direction: column; align-items: flex-start; gap: 3px; min-width: 0; max-width: min(85%, 640px); }
.group.own { justify-content: flex-end; }
.group.own .group-body { align-items: flex-end; }
.avatar {
  flex: none;
  display: inline-flex;
  align-items: center;
  justify-content: center;
  width: 34px;
  height: 34px;
  margin-top: 20px;
  border-radius: 50%;
  background: var(--name);
  color: #fff;
  font-size: 15px;
  font-weight: 700;
}
@media (prefers-color-scheme: dark) { .avatar { color: #111318; } }
.avatar.small { width: 30px; height: 30px; margin-top: 0; font-size: 13px; }
.meta { display: flex; align-items: baseline; gap: 8px; padding: 0 4px; }
.name { color: var(--name); font-weight: 700; font-size: 14px; }
.group.own .name { color: var(--muted); font-weight: 600; }
.time { color: var(--muted); font-size: 12px; }
.bubble {
  max-width: 100%;
  padding: 8px 12px;
  border: 1px solid var(--bubble-line);
  border-radius: var(--radius);
  background: var(--bubble);
  white-space: pre-wrap;
  overflow-wrap: anywhere;
  word-break: break-word;
}
.group:not(.own) .meta + .bubble { border-top-left-radius: 6px; }
.group.own .bubble { background: var(--own); border-color: var(--own); color: var(--on-own); }
.group.own .bubble a { color: var(--own-link); }
.group.own .meta + .bubble { border-top-right-radius: 6px; }
.bubble.auto { font-style: italic; color: var(--muted); } /* an automatic notice (IRC's NOTICE): from a bot */
.bubble.mention, .action.mention { background: var(--mention); border-color: var(--mention-line); }
.bubble.pending { /* not confirmed yet: the own colour as a dashed outline, the text fully readable */
  align-self: flex-end;
  margin: 6px 0 0 auto;
  max-width: min(85%, 640px);
  background: transparent;
  border: 1.5px dashed var(--own);
  color: var(--text);
}
.pending-items { display: flex; flex-direction: column; align-items: flex-end; }
.bubble.pending.failed { opacity: 1; background: var(--danger-bg); border-color: var(--danger); color: var(--text); }
.note { margin-top: 2px; font-size: 12px; opacity: 0.85; white-space: normal; }
.bubble.failed .note { color: var(--danger); font-weight: 600; }
.action {
  margin: 8px 0 0;
  padding: 4px 12px;
  border-radius: 12px;
  font-style: italic;
  white-space: pre-wrap;
  overflow-wrap: anywhere;
  color: var(--text);
}
.action .name { font-style: normal; }
.action .time { margin-left: 8px; font-style: normal; }
.notice {
  margin: 8px auto 0;
  max-width: 92%;
  text-align: center;
  font-size: 13px;
  color: var(--muted);
  white-space: pre-wrap;
  overflow-wrap: anywhere;
}
.notice.error { color: var(--danger); font-weight: 500; }
.notice.announce span {
  display: inline-block;
  padding: 6px 12px;
  border-radius: 12px;
  background: var(--info-bg);
  color: var(--info-text);
  font-weight: 500;
}
.help {
  margin: 10px 0 0;
  padding: 12px 14px;
  border: 1px solid var(--line);
  border-radius: 14px;
  background: var(--raised);
  font-size: 14px;
}
.help h3 { margin: 0 0 6px; font-size: 13px; color: var(--muted); text-transform: uppercase; letter-spacing: 0.05em; }
.help dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 12px; margin: 0 0 12px; }
.help dt { font-family: var(--mono); font-size: 13px; font-weight: 600; }
.help dd { margin: 0; color: var(--muted); }
.help p { color: var(--muted); font-size: 13px; }
.help p + h3 { margin-top: 14px; }
@media (max-width: 520px) {
  .help dl { grid-template-columns: 1fr; gap: 0; }
  .help dd { margin-bottom: 6px; }
}

.composer {
  display: flex;
  align-items: flex-end;
  gap: 8px;
  padding: 8px 10px calc(8px + env(safe-area-inset-bottom));
  border-top: 1px solid var(--line);
  background: var(--pane);
}
.composer textarea {
  flex: 1;
  min-width: 0;
  max-height: 160px;
  resize: none;
  border-radius: 22px;
  padding: 10px 16px;
  line-height: 1.4;
  background: var(--bg);
}
.send {
  flex: none;
  display: inline-flex;
  align-items: center;
  justify-content: center;
  width: var(--tap);
  height: var(--tap);
  border: none;
  border-radius: 50%;
  background: var(--accent);
  color: var(--on-accent);
}
.send:hover { background: var(--accent-strong); }
.attach { flex: none; color: var(--muted); border-radius: 50%; }
.attach:hover { color: var(--text); }
@media (hover: none) {
  .icon-button:hover { background: transparent; }  /* a touch screen keeps :hover on what was tapped */
}

/* -- files and pictures ---------------------------------------------------------------------- */

.bubble.file { padding: 4px; white-space: normal; }
.file-card {
  display: flex;
  align-items: center;
  gap: 10px;
  min-width: min(220px, 100%);
  max-width: 320px;
  min-height: var(--tap);
  padding: 6px 8px 6px 6px;
  border-radius: 14px;
  color: inherit;
  text-decoration: none;
}
a.file-card:hover { background: color-mix(in srgb, currentColor 8%, transparent); }
.file-icon {
  flex: none;
  display: inline-flex;
  align-items: center;
  justify-content: center;
  width: 40px;
  height: 40px;
  border-radius: 10px;
  background: color-mix(in srgb, var(--accent) 14%, transparent);
  color: var(--accent);
  font-size: 10px;
  font-weight: 800;
  letter-spacing: 0.02em;
}
.file-info { flex: 1; min-width: 0; display: flex; flex-direction: column; }
.file-name { font-weight: 600; font-size: 15px; line-height: 1.3; overflow-wrap: anywhere; }
.file-size { font-size: 13px; color: var(--muted); }
.file-get { flex: none; display: inline-flex; color: var(--accent); }
.group.own .file-icon { background: rgba(255, 255, 255, 0.2); color: var(--on-own); }
.group.own .file-size { color: inherit; opacity: 0.8; }
.group.own .file-get { color: inherit; }
.group.own .file-card { color: var(--on-own); }
.file-card.expired { opacity: 0.85; }
.file-card.expired .file-icon { background: var(--hover); color: var(--muted); }
.file-card.expired .file-size { font-style: italic; }
.thumb {
  display: block;
  width: fit-content;
  max-width: 100%;
  border-radius: 14px;
  overflow: hidden;
  line-height: 0;
  background: var(--hover);
}
.thumb img { display: block; max-width: min(240px, 100%); max-height: 200px; width: auto; height: auto; }
.thumb.loading img { width: 200px; height: 150px; max-width: 100%; }  /* room kept while it loads */
.thumb + .file-card { min-height: 0; margin-top: 2px; padding: 4px 6px; }
.thumb + .file-card .file-icon { display: none; }

.bubble.pending.upload { display: flex; align-items: center; gap: 10px; white-space: normal; min-width: min(260px, 100%); }
.upload-preview { flex: none; width: 48px; height: 48px; border-radius: 10px; object-fit: cover; }
.upload-body { flex: 1; min-width: 0; display: flex; flex-direction: column; gap: 4px; }
.upload-body .file-name { font-size: 14px; }
.upload-body .note { margin: 0; }
.upload-actions { display: flex; flex-wrap: wrap; gap: 0 4px; margin: -6px -10px -8px; }
.upload-actions .link-button { font-size: 14px; color: inherit; }
progress {
  width: 100%;
  height: 6px;
  border: none;
  border-radius: 3px;
  background: var(--line);
  color: var(--accent);
  -webkit-appearance: none;
  appearance: none;
}
progress::-webkit-progress-bar { background: var(--line); border-radius: 3px; }
progress::-webkit-progress-value { background: var(--accent); border-radius: 3px; }
progress::-moz-progress-bar { background: var(--accent); border-radius: 3px; }

.drop-hint {
  position: absolute;
  inset: 10px;
  z-index: 3;
  display: flex;
  flex-direction: column;
  align-items: center;
  justify-content: center;
  gap: 8px;
  border: 2px dashed var(--accent);
  border-radius: 20px;
  background: color-mix(in srgb, var(--bg) 88%, transparent);
  color: var(--accent);
  font-size: 17px;
  font-weight: 600;
  text-align: center;
  pointer-events: none;  /* the drop lands on the conversation beneath */
}

/* -- wide screens: rooms and people as side panes ---------------------------------------------- */

@media (min-width: 900px) {
  .app {
    grid-template-columns: 260px minmax(0, 1fr) 240px;
    grid-template-areas: "rooms top people" "rooms main people";
  }
  .pane {
    position: static;
    width: auto;
    transform: none;
    visibility: visible;
    box-shadow: none;
    transition: none;
  }
  .rooms-pane { grid-area: rooms; border-right: 1px solid var(--line); }
  .people-pane { grid-area: people; border-left: 1px solid var(--line); }
  .drawer-button, .scrim { display: none; }
  .topbar { padding-left: 16px; padding-right: 16px; }
  .log { padding: 8px 24px 16px; }
}
"""

WEB_PAGE_JS = r""""use strict";
// LocalChat's web page: one script, no framework, ES2017. All state is in `state`;
// the functions below are grouped by concern: storage, SHA-256 and HMAC (for password
// servers, since WebCrypto is missing outside secure contexts), commands, rendering,
// input, the connection and the frames. Text from the server reaches the page only
// through textContent and createTextNode, never as markup.

var RECONNECT_FIRST_MS = 500;   // the first pause before reconnecting; it doubles each time
var RECONNECT_MAX_MS = 10000;   // the longest pause between attempts (the other clients' RECONNECT_MAX_S)
var PING_AFTER_MS = 20000;      // ping the server after this much silence
var DEAD_AFTER_MS = 65000;      // the connection is lost after this much silence
var CONNECT_TIMEOUT_MS = 10000; // a WebSocket not open after this is given up (a phone on another network)
var PROBE_MS = 5000;            // back on the page, a ping unanswered for this long means the connection died
var GROUP_GAP_S = 300;          // messages from one person closer than this share one name and time
var HISTORY_PAGE = 50;          // messages asked for by "Show earlier messages"
var STICKY_PX = 48;             // a log scrolled to within this of its end follows new messages
var INPUT_MAX_PX = 160;         // the message box grows with its text up to this height
var INPUT_HISTORY = 100;        // sent lines that Up and Down recall (as in the window)
var NAME_PATTERN = /^[0-9A-Za-z_.\-\u00c0-\uffff]{1,32}$/;  // a rough check; the server has the last word
var PICTURE_TYPES = ["image/png", "image/gif", "image/jpeg", "image/webp"];  // the server shows these, not downloads
var UPLOAD_SETTLE_MS = 5000;    // a file the server took: its message frame is awaited this long, then the row goes
var DROP_HINT_MS = 200;         // the drop hint goes this long after the last dragover (dragleave fires per child)
// Refusals of a say. They carry no ref, but the server answers frames in order: such an error
// answers the oldest say still in flight (join, leave and topic have errors of their own).
var SAY_ERRORS = ["empty_text", "text_too_long", "bad_text", "rate_limited", "muted", "unknown_user"];
var NAME_ERRORS = ["name_taken", "bad_name"];  // refusals at hello that another name fixes
var FINAL_ERRORS = ["banned", "auth_failed", "bad_auth", "auth_first", "server_full", "too_many_connections",
                    "bad_version", "password_required", "flooding", "too_many_errors"];

var state = {
  name: "",              // our name, once the server welcomed us
  identity: "",          // a random token kept in localStorage, sent in every hello
  password: null,        // kept in memory only, for reconnecting to a password server
  ws: null,              // the WebSocket, while one is open or opening
  open: false,           // the WebSocket is open (hello sent)
  synced: false,         // welcomed and caught up: what is typed goes out at once
  welcome: null,         // the last welcome (its resume token resumes the session)
  welcomed: false,       // welcomed at least once since the page loaded
  lastId: null,          // the highest message id seen (sent as last_id when reconnecting)
  epoch: 0,              // counts the times the server's ids started again (a server without history)
  helloLastId: null,     // lastId when the last hello went out
  seen: new Set(),       // message ids shown, so a replay never shows one twice
  bye: null,             // the bye frame the server sent before closing, if any
  stopped: true,         // not connecting: before joining, or after a final refusal
  retryMs: RECONNECT_FIRST_MS,
  retryTimer: null,
  retryAt: 0,
  retryWhy: "",
  lastHeard: 0,          // when the server last sent anything (Date.now())
  pinged: false,
  connectingSince: 0,    // when the WebSocket being opened was made
  probeAt: 0,            // when the ping sent on coming back to the page went out (0: none pending)
  conversations: {},     // key ("#room" or "@name", folded) -> conversation
  current: null,         // the key of the conversation shown
  switchTo: null,        // the key to show once its room frame comes (after /join)
  outbox: [],            // {frame, ref, conv}: what waits to be sent or, for a say, echoed
  inflight: [],          // refs of the says sent on this connection, not yet echoed, oldest first
  refPrefix: "",
  refCount: 0,
  sentLines: [],         // what was typed and sent, oldest first, for Up and Down
  recall: 0,             // the index in sentLines shown in the box (sentLines.length: none)
  allRooms: [],          // the last answer to {"type":"rooms"}
  roomsAsked: 0,         // answers to /rooms still to show as a notice
  focused: true,         // the window has the focus (blur/focus events)
  clockOffset: 0,        // the server's clock less ours, in seconds, from the last live frame with a time
  uploads: [],           // files being shared, oldest first (see queueUpload): sent one at a time
  dropTimer: null,
  renderTimer: null
};

var ui = {};  // the page's fixed elements, by id (filled in by start())

// -- storage ----------------------------------------------------------------------

function loadSetting(key, storage) {
  // localStorage keeps the name and identity; sessionStorage (one tab) the resume token.
  try {
    return (storage || window.localStorage).getItem("localchat." + key);
  } catch (error) {
    return null;  // storage blocked (private mode, settings): the page works without
  }
}

function saveSetting(key, value, storage) {
  try {
    (storage || window.localStorage).setItem("localchat." + key, value);
  } catch (error) {
    // Not kept: the next visit asks again.
  }
}

function randomHex(bytes) {
  var values = new Uint8Array(bytes);
  window.crypto.getRandomValues(values);  // available outside secure contexts too
  return toHex(values);
}

function toHex(bytes) {
  var out = "";
  for (var i = 0; i < bytes.length; i++) {
    out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
  }
  return out;
}

function loadIdentity() {
  var identity = loadSetting("identity");
  if (!identity || !/^[0-9a-f]{32}$/.test(identity)) {
    identity = randomHex(16);
    saveSetting("identity", identity);
  }
  return identity;
}

// -- SHA-256 and HMAC (FIPS 180-4, RFC 2104) ----------------------------------------

var SHA256_K = [
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
];

function rotr(x, n) {
  return (x >>> n) | (x << (32 - n));
}

function sha256(bytes) {
  // Pad to whole 64-byte blocks: 0x80, zeros, then the length in bits (big-endian, 64 bits).
  var total = (bytes.length + 9 + 63) & ~63;
  var data = new Uint8Array(total);
  data.set(bytes);
  data[bytes.length] = 0x80;
  var view = new DataView(data.buffer);
  view.setUint32(total - 8, Math.floor(bytes.length / 0x20000000));
  view.setUint32(total - 4, (bytes.length * 8) >>> 0);
  var h = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
  var w = new Int32Array(64);
  for (var offset = 0; offset < total; offset += 64) {
    sha256Block(h, w, view, offset);
  }
  var out = new Uint8Array(32);
  var outView = new DataView(out.buffer);
  for (var i = 0; i < 8; i++) {
    outView.setUint32(4 * i, h[i] >>> 0);
  }
  return out;
}

function sha256Block(h, w, view, offset) {
  var i;
  for (i = 0; i < 16; i++) {
    w[i] = view.getUint32(offset + 4 * i);
  }
  for (i = 16; i < 64; i++) {
    var s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
    var s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
    w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
  }
  var a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
  for (i = 0; i < 64; i++) {
    var t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i]) | 0;
    var t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
    k = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
  }
  var values = [a, b, c, d, e, f, g, k];
  for (i = 0; i < 8; i++) {
    h[i] = (h[i] + values[i]) | 0;
  }
}

function hmacSha256Hex(key, message) {
  // The answer to a password challenge: HMAC-SHA256 keyed by the password (UTF-8), of the nonce.
  var encoder = new TextEncoder();
  var keyBytes = encoder.encode(key);
  var messageBytes = encoder.encode(message);
  if (keyBytes.length > 64) {
    keyBytes = sha256(keyBytes);
  }
  var inner = new Uint8Array(64 + messageBytes.length);
  var outer = new Uint8Array(64 + 32);
  for (var i = 0; i < 64; i++) {
    var byte = i < keyBytes.length ? keyBytes[i] : 0;
    inner[i] = byte ^ 0x36;
    outer[i] = byte ^ 0x5c;
  }
  inner.set(messageBytes, 64);
  outer.set(sha256(inner), 64);
  return toHex(sha256(outer));
}

// -- names and text ------------------------------------------------------------------

function nameKey(name) {
  // How the server compares names: width and case folded (NFKC, then lower case).
  return String(name).normalize("NFKC").toLowerCase();
}

function isWordChar(ch) {
  return /[0-9a-z_\-]/.test(ch) || (ch > "\u007f" && ch.toLowerCase() !== ch.toUpperCase());
}

function mentions(text, name) {
  // True if text names `name` as a word (with or without @), ignoring case.
  var key = nameKey(name);
  var folded = nameKey(text);
  var start = folded.indexOf(key);
  while (key && start >= 0) {
    var before = start ? folded.charAt(start - 1) : " ";
    var end = start + key.length;
    var after = end < folded.length ? folded.charAt(end) : " ";
    if (!isWordChar(before) && !isWordChar(after)) {
      return true;
    }
    start = folded.indexOf(key, start + 1);
  }
  return false;
}

function crc32(text) {
  var bytes = new TextEncoder().encode(text);
  var crc = -1;
  for (var i = 0; i < bytes.length; i++) {
    crc ^= bytes[i];
    for (var bit = 0; bit < 8; bit++) {
      crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
    }
  }
  return (crc ^ -1) >>> 0;
}

function colourClass(name) {
  // The same colour as the Tk window gives the name (NAME_COLOURS, picked by CRC-32 of the folded name).
  return "c" + (crc32(nameKey(name)) % 10);
}

function conversationKey(kind, name) {
  return (kind === "room" ? "#" : "@") + nameKey(name);
}

function dayKey(ts) {
  var date = new Date(ts * 1000);
  return date.getFullYear() + "-" + date.getMonth() + "-" + date.getDate();
}

function dayLabel(ts) {
  var date = new Date(ts * 1000);
  var today = new Date();
  var yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(ts) === dayKey(today.getTime() / 1000)) {
    return "Today";
  }
  if (dayKey(ts) === dayKey(yesterday.getTime() / 1000)) {
    return "Yesterday";
  }
  var options = {weekday: "long", day: "numeric", month: "long"};
  if (date.getFullYear() !== today.getFullYear()) {
    options.year = "numeric";
  }
  return date.toLocaleDateString(undefined, options);
}

function timeLabel(ts) {
  return new Date(ts * 1000).toLocaleTimeString(undefined, {hour: "2-digit", minute: "2-digit"});
}

function nowSeconds() {
  // The server's time as best known: a phone's clock may be minutes off, and notices go among messages.
  return Date.now() / 1000 + state.clockOffset;
}

// -- commands: the same table as the other clients (see COMMANDS in localchat.py) ----------

function firstWord(text) {
  return text.split(/\s+/)[0];
}

function roomArgument(argument, where) {
  return argument ? firstWord(argument).replace(/^#+/, "") : where.room;
}

function targetMinutesReason(rest) {
  var parts = rest.split(/\s+/).filter(Boolean);
  var minutes = parts.length > 1 && /^[0-9]+$/.test(parts[1]) ? parseInt(parts[1], 10) : null;
  var words = rest.replace(/^\s*\S+\s*/, "");
  if (minutes !== null) {
    words = words.replace(/^\S+\s*/, "");
  }
  return {target: parts[0], minutes: minutes, reason: words.trim() || null};
}

function moderation(kind, field) {
  return function (argument) {
    var parsed = kind === "ban" || kind === "mute" ? targetMinutesReason(argument) : null;
    if (!parsed) {
      var target = firstWord(argument);
      parsed = {target: target, minutes: null, reason: argument.slice(target.length).trim() || null};
    }
    if (!parsed.target) {
      return null;
    }
    var frame = {type: kind};
    frame[field] = parsed.target;
    if (parsed.minutes !== null) {
      frame.minutes = parsed.minutes;
    }
    if (parsed.reason && (kind === "kick" || kind === "ban" || kind === "mute")) {
      frame.reason = parsed.reason;
    }
    return {send: frame};
  };
}

function sayHere(where, fields) {
  return {send: Object.assign({type: "say"}, where, fields)};
}

var COMMANDS = [
  {names: ["join"], usage: "/join ROOM", help: "join a room, or switch to it", who: "everybody",
   parse: function (argument) {
     return argument ? {join: firstWord(argument).replace(/^#+/, "")} : null;
   }},
  {names: ["leave", "part"], usage: "/leave [ROOM]", help: "leave a room (the current one)", who: "everybody",
   parse: function (argument, where) {
     var room = roomArgument(argument, where);
     return room ? {send: {type: "leave", room: room}} : {error: "Usage: /leave ROOM"};
   }},
  {names: ["msg"], usage: "/msg NAME TEXT", help: "a direct message that only NAME sees", who: "everybody",
   parse: function (argument) {
     var name = firstWord(argument);
     var text = argument.slice(name.length + 1);
     return name && text.trim() ? {direct: name.replace(/^@+/, ""), text: text} : null;
   }},
  {names: ["me"], usage: "/me ACTION", help: "say what you do, shown as: * alice waves", who: "everybody",
   parse: function (argument, where) {
     return argument ? sayHere(where, {text: argument, action: true}) : null;
   }},
  {names: ["send"], usage: "/send [@NAME] PATH", help: "share a file with the room (or the person, or NAME)", who: "everybody",
   parse: function (argument) {
     var to = /^@(\S+)(\s|$)/.exec(argument);  // /send @bob: bob's conversation, then the picker
     return {pick: true, to: to ? to[1] : null, path: to ? argument.slice(to[0].length).trim() : argument};
   }},
  {names: ["nick"], usage: "/nick NEWNAME", help: "change your name", who: "everybody",
   parse: function (argument) {
     return argument ? {send: {type: "nick", name: firstWord(argument)}} : null;
   }},
  {names: ["invite"], usage: "/invite NAME [ROOM]", help: "ask somebody into a room (the current one)",
   who: "everybody",
   parse: function (argument, where) {
     var words = argument.split(/\s+/).filter(Boolean);
     var room = words.length > 1 ? words[1].replace(/^#+/, "") : where.room;
     return words.length && room ? {send: {type: "invite", name: words[0].replace(/^@+/, ""), room: room}} : null;
   }},
  {names: ["users", "names"], usage: "/users [ROOM]", help: "who is in the room (the current one)", who: "everybody",
   parse: function (argument, where) {
     var room = roomArgument(argument, where);
     return {send: room ? {type: "users", room: room} : {type: "users"}};
   }},
  {names: ["rooms", "list"], usage: "/rooms", help: "the rooms and their topics", who: "everybody",
   parse: function () {
     return {rooms: true};
   }},
  {names: ["topic"], usage: "/topic [TEXT]", help: "show the room's topic, or set it", who: "everybody",
   parse: function (argument, where) {
     if (!where.room) {
       return {error: "Topics belong to rooms: switch to a room first."};
     }
     return {send: argument ? {type: "topic", room: where.room, topic: argument} : {type: "topic", room: where.room}};
   }},
  {names: ["away"], usage: "/away [TEXT]", help: "mark yourself away", who: "everybody",
   parse: function (argument) {
     return {send: {type: "away", text: argument || null}};
   }},
  {names: ["back"], usage: "/back", help: "say you are back", who: "everybody",
   parse: function () {
     return {send: {type: "back"}};
   }},
  {names: ["quit", "exit"], usage: "/quit", help: "leave the chat", who: "everybody",
   parse: function () {
     return {quit: true};
   }},
  {names: ["help"], usage: "/help", help: "this list", who: "everybody",
   parse: function () {
     return {help: true};
   }},
  {names: ["kick"], usage: "/kick NAME [reason]", help: "remove somebody (they may come back)", who: "operators",
   parse: moderation("kick", "name")},
  {names: ["ban"], usage: "/ban NAME|IP [minutes] [reason]", help: "ban a name (and its client), or an address",
   who: "operators", parse: moderation("ban", "target")},
  {names: ["unban"], usage: "/unban NAME|IP", help: "lift a ban", who: "operators",
   parse: moderation("unban", "target")},
  {names: ["mute"], usage: "/mute NAME [minutes]", help: "stop somebody from speaking", who: "operators",
   parse: moderation("mute", "name")},
  {names: ["unmute"], usage: "/unmute NAME", help: "let somebody speak again", who: "operators",
   parse: moderation("unmute", "name")},
  {names: ["op"], usage: "/op NAME", help: "make somebody an operator", who: "operators",
   parse: moderation("op", "name")},
  {names: ["deop"], usage: "/deop NAME", help: "make an operator an ordinary user again", who: "operators",
   parse: moderation("deop", "name")}
];
var CONSOLE_ONLY = ["bans", "say"];  // commands of the server's console, not of a chat

function helpLines(who) {
  var commands = COMMANDS.filter(function (command) {
    return command.who === who;
  });
  var width = Math.max.apply(null, commands.map(function (command) {
    return command.usage.length;
  })) + 4;
  return commands.map(function (command) {
    return "  " + command.usage.padEnd(width) + command.help;
  }).join("\n");
}

function helpText() {
  return "Commands:\n" + helpLines("everybody") + "\nOperators also have:\n" + helpLines("operators") +
    "\nStart a message with // to send text that begins with /.";
}

function parseInput(line, where) {
  // Return what a typed line asks for: {send}, {join}, {direct, text}, {rooms}, {help}, {quit} or {error}.
  if (!line.trim()) {
    return null;
  }
  if (line.indexOf("//") === 0 || line.charAt(0) !== "/") {
    return sayHere(where, {text: line.indexOf("//") === 0 ? line.slice(1) : line});
  }
  var space = line.indexOf(" ");
  var word = (space < 0 ? line.slice(1) : line.slice(1, space)).split("\n")[0];
  var argument = space < 0 ? "" : line.slice(space + 1).trim();
  var lower = word.toLowerCase();
  var command = COMMANDS.find(function (entry) {
    return entry.names.indexOf(lower) >= 0;
  });
  if (!command) {
    if (CONSOLE_ONLY.indexOf(lower) >= 0) {
      return {error: "/" + word.slice(0, 40) + " is a command of the server's console only. Type /help for the list."};
    }
    return {error: "Unknown command /" + word.slice(0, 40) + ". Type /help for the list."};
  }
  return command.parse(argument, where) || {error: "Usage: " + command.usage};
}

// -- conversations -----------------------------------------------------------------------

function el(tag, className, text) {
  var element = document.createElement(tag);
  if (className) {
    element.className = className;
  }
  if (text !== undefined && text !== null) {
    element.textContent = String(text);
  }
  return element;
}

function openConversation(kind, name) {
  var key = conversationKey(kind, name);
  var conv = state.conversations[key];
  if (conv) {
    return conv;
  }
  conv = {
    kind: kind, name: String(name), key: key, users: [], away: {}, ops: [], topic: null,
    joined: kind === "direct", unread: 0, mentions: 0, items: [], unreadFrom: null,
    loading: false, more: true, dirty: false, log: null, box: null, pendingBox: null, older: null,
    atEnd: true, behind: 0  // scrolled to the end; messages come since the person scrolled up
  };
  buildConversation(conv);
  state.conversations[key] = conv;
  if (!state.current) {
    showConversation(key);
  }
  renderRooms();
  return conv;
}

function buildConversation(conv) {
  conv.log = el("div", "log");
  conv.log.hidden = true;
  conv.log.setAttribute("role", "log");
  conv.log.setAttribute("aria-live", "polite");
  conv.older = el("button", "older", "Show earlier messages");
  conv.older.type = "button";
  conv.older.hidden = conv.kind === "room";  // as in the window: a room with no history has nothing earlier
  conv.older.addEventListener("click", function () {
    requestOlder(conv);
  });
  conv.log.addEventListener("scroll", function () {
    onLogScroll(conv);
  });
  conv.box = el("div", "items");
  conv.pendingBox = el("div", "pending-items");
  conv.log.appendChild(conv.older);
  conv.log.appendChild(conv.box);
  conv.log.appendChild(conv.pendingBox);
  ui.logs.appendChild(conv.log);
}

function closeConversation(conv) {
  conv.items.forEach(function (item) {
    if (item.kind === "message") {
      state.seen.delete(item.frame.id);  // shown again if the conversation is opened again
    }
  });
  delete state.conversations[conv.key];
  conv.log.remove();
  if (state.current === conv.key) {
    state.current = null;
    var next = Object.keys(state.conversations)[0];
    if (next) {
      showConversation(next);
    }
  }
  renderRooms();
  renderHeader();
}

function currentConversation() {
  return state.conversations[state.current] || null;
}

function whereOf(conv) {
  if (!conv) {
    return {room: "general"};
  }
  return conv.kind === "room" ? {room: conv.name} : {to: conv.name};
}

function isViewing(conv) {
  return conv.key === state.current && !document.hidden && state.focused && !ui.app.hidden;
}

function showConversation(key) {
  var conv = state.conversations[key];
  var old = currentConversation();
  if (!conv) {
    return;
  }
  if (old && old !== conv) {
    old.log.hidden = true;
    clearUnreadLine(old);
  }
  state.current = key;
  conv.log.hidden = false;
  conv.unread = 0;
  conv.mentions = 0;
  var line = conv.box.querySelector(".new-line");
  if (line) {
    line.scrollIntoView({block: "center"});
  } else {
    scrollToEnd(conv);
  }
  renderHeader();
  renderPeople();
  renderRooms();
  updateTitle();
  ui.input.placeholder = "Message " + (conv.kind === "room" ? "#" : "@") + conv.name;
  renderJump();
  closeDrawers();
}

function clearUnreadLine(conv) {
  conv.unreadFrom = null;
  var line = conv.box.querySelector(".new-line");
  if (line) {
    line.remove();
  }
}

function addNotice(conv, text, tone, ts) {
  conv = conv || currentConversation();
  if (!conv || !text) {
    return;
  }
  if (!ts) {  // said here and now: after everything shown, whatever the clocks say
    var last = conv.items[conv.items.length - 1];
    ts = Math.max(nowSeconds(), last ? last.ts : 0);
  }
  insertItem(conv, {kind: "notice", text: String(text), tone: tone || "", ts: ts, epoch: state.epoch});
}

function addMessage(conv, frame, mention) {
  insertItem(conv, {kind: "message", frame: frame, mention: mention, ts: Number(frame.ts) || nowSeconds(),
                    epoch: state.epoch});
}

function insertItem(conv, item) {
  // Items stay in time order: replays and pages of older messages go in where they belong.
  var items = conv.items;
  var at = items.length;
  while (at > 0 && comesBefore(item, items[at - 1])) {
    at--;
  }
  items.splice(at, 0, item);
  if (at === items.length - 1 && !conv.dirty) {
    var follow = isAtEnd(conv);
    renderItem(conv, item);
    if (follow) {
      scrollToEnd(conv);
    } else if (item.kind === "message") {
      conv.behind++;  // the person is reading further up: say that more came, do not pull them down
      renderJump();
    }
  } else {
    scheduleRender(conv);
  }
}

function comesBefore(item, other) {
  // Messages in the server's order (their ids); anything else by time.
  if (item.epoch !== other.epoch) {
    return item.epoch < other.epoch;
  }
  if (item.kind === "message" && other.kind === "message" && typeof item.frame.id === "number" &&
      typeof other.frame.id === "number") {
    return item.frame.id < other.frame.id;
  }
  return item.ts < other.ts;
}

function newEpoch() {
  // The server's message ids started again: what is shown stays, before whatever comes now.
  state.epoch++;
  state.seen = new Set();
  state.lastId = null;
  state.helloLastId = null;
}

// -- rendering: messages ---------------------------------------------------------------------

function isAtEnd(conv) {
  var log = conv.log;
  return log.hidden || log.scrollHeight - log.scrollTop - log.clientHeight < STICKY_PX;
}

function scrollToEnd(conv) {
  conv.log.scrollTop = conv.log.scrollHeight;
}

function onLogScroll(conv) {
  conv.atEnd = isAtEnd(conv);
  if (conv.atEnd && conv.behind) {
    conv.behind = 0;
    renderJump();
  }
}

function renderJump() {
  var conv = currentConversation();
  var behind = conv ? conv.behind : 0;
  ui.jump.hidden = !behind;
  ui.jump.textContent = behind + (behind === 1 ? " new message" : " new messages") + " \u2193";
}

function onResize() {
  // The phone's keyboard opening shrinks the view: a log that was at its end stays there.
  var conv = currentConversation();
  if (conv && conv.atEnd) {
    scrollToEnd(conv);
  }
}

function scheduleRender(conv) {
  conv.dirty = true;
  if (!state.renderTimer) {
    state.renderTimer = setTimeout(renderDirty, 0);
  }
}

function renderDirty() {
  state.renderTimer = null;
  Object.keys(state.conversations).forEach(function (key) {
    var conv = state.conversations[key];
    if (conv.dirty) {
      renderConversation(conv);
    }
  });
}

function renderConversation(conv) {
  // Draw every item again, keeping the view where it was (measured from the end).
  var log = conv.log;
  var follow = isAtEnd(conv);
  var fromEnd = log.scrollHeight - log.scrollTop;
  conv.dirty = false;
  conv.box.textContent = "";
  conv.ctx = null;
  conv.items.forEach(function (item) {
    renderItem(conv, item);
  });
  log.scrollTop = follow ? log.scrollHeight : log.scrollHeight - fromEnd;
}

function renderItem(conv, item) {
  var ctx = conv.ctx || (conv.ctx = {day: null, group: null});
  var day = dayKey(item.ts);
  if (day !== ctx.day) {
    conv.box.appendChild(el("div", "day", dayLabel(item.ts)));
    ctx.day = day;
    ctx.group = null;
  }
  if (item.kind === "notice") {
    conv.box.appendChild(noticeElement(item));
    ctx.group = null;
    return;
  }
  var frame = item.frame;
  if (conv.unreadFrom !== null && frame.id === conv.unreadFrom) {
    conv.box.appendChild(el("div", "new-line", "New messages"));
    ctx.group = null;
  }
  if (frame.action) {
    conv.box.appendChild(actionElement(item));
    ctx.group = null;
    return;
  }
  var from = nameKey(frame.from);
  if (!ctx.group || ctx.group.from !== from || item.ts - ctx.group.ts > GROUP_GAP_S) {
    ctx.group = {from: from, ts: item.ts, body: null};
    conv.box.appendChild(groupElement(frame, ctx.group));
  }
  ctx.group.ts = item.ts;
  ctx.group.body.appendChild(bubbleElement(item));
}

function isOwn(frame) {
  return nameKey(frame.from) === nameKey(state.name);
}

function groupElement(frame, group) {
  var own = isOwn(frame);
  var root = el("div", "group" + (own ? " own" : ""));
  var colour = colourClass(frame.from);
  if (!own) {
    var avatar = el("div", "avatar " + colour, Array.from(String(frame.from))[0].toUpperCase());
    avatar.setAttribute("aria-hidden", "true");
    root.appendChild(avatar);
  }
  var body = el("div", "group-body");
  var meta = el("div", "meta");
  meta.appendChild(el("span", "name " + colour, own ? "You" : frame.from));
  var time = el("time", "time", timeLabel(Number(frame.ts) || nowSeconds()));
  meta.appendChild(time);
  body.appendChild(meta);
  root.appendChild(body);
  group.body = body;
  return root;
}

function bubbleElement(item) {
  var frame = item.frame;
  var file = fileOf(frame);
  var bubble = el("div", "bubble" + (item.mention ? " mention" : "") + (frame.notice ? " auto" : "") +
                  (file ? " file" : ""));
  bubble.dataset.id = String(frame.id);
  bubble.dir = "auto";  // Arabic or Hebrew text runs right to left
  bubble.title = new Date((Number(frame.ts) || nowSeconds()) * 1000).toLocaleString();
  if (file) {
    // Made once and kept: drawing the conversation again moves it, and the picture is not fetched again.
    bubble.appendChild(item.card || (item.card = fileElement(frame, file)));
  } else {
    appendText(bubble, String(frame.text));
  }
  if (frame.queued) {
    bubble.appendChild(el("div", "note", "Delivered when " + frame.to + " returns"));
  } else if (frame.away && isOwn(frame)) {
    bubble.appendChild(el("div", "note", frame.to + " is away: " + frame.away));  // only the sender hears it
  }
  return bubble;
}

// -- rendering: files and pictures ------------------------------------------------------------

function fileOf(frame) {
  return frame.file && typeof frame.file === "object" ? frame.file : null;
}

function isPicture(type) {
  return PICTURE_TYPES.indexOf(String(type || "").toLowerCase()) >= 0;
}

function localPath(url) {
  // An address on this server (a path such as /files/17/a.png), or null: never another site's.
  return typeof url === "string" && /^\/[^\/\\]/.test(url) ? url : null;
}

function formatSize(bytes) {
  // A size for a person, as the other clients write it (file_size_text): 900 bytes, 4.5 KB, 48 KB, 3.2 MB.
  var size = Math.max(0, Math.floor(Number(bytes) || 0));
  if (size < 1024) {
    return size === 1 ? "1 byte" : size + " bytes";
  }
  var units = [["KB", 1024], ["MB", 1048576], ["GB", 1073741824]];
  for (var i = 0; i < units.length; i++) {
    var value = size / units[i][1];
    if (value < 1024 || i === units.length - 1) {
      return (value < 10 ? (roundHalfEven(value * 10) / 10).toFixed(1) : String(roundHalfEven(value))) +
        " " + units[i][0];
    }
  }
}

function roundHalfEven(value) {
  // Python's round(): a half goes to the even neighbour (Math.round would send 10.5 KB to 11 KB, not 10).
  var floor = Math.floor(value);
  var rest = value - floor;
  return rest > 0.5 || (rest === 0.5 && floor % 2 === 1) ? floor + 1 : floor;
}

function extensionLabel(name) {
  // "PDF" for report.pdf: what the file icon shows (a name without a short extension gets FILE).
  var dot = name.lastIndexOf(".");
  var extension = dot > 0 ? name.slice(dot + 1) : "";
  return /^[0-9A-Za-z]{1,4}$/.test(extension) ? extension.toUpperCase() : "FILE";
}

function svgIcon(path, size) {
  var ns = "http://www.w3.org/2000/svg";
  var svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", String(size));
  svg.setAttribute("height", String(size));
  svg.setAttribute("aria-hidden", "true");
  var shape = document.createElementNS(ns, "path");
  shape.setAttribute("fill", "currentColor");
  shape.setAttribute("d", path);
  svg.appendChild(shape);
  return svg;
}

var DOWNLOAD_ICON = "M11 4h2v8.2l3.1-3.1 1.4 1.4L12 16l-5.5-5.5 1.4-1.4 3.1 3.1zM5 18h14v2H5z";

function fileElement(frame, file) {
  // A shared file: a picture's thumbnail (opens full size), then a card with its name, size and a download link.
  var name = String(file.name || frame.text || "file");
  var url = file.expired ? null : localPath(file.url);
  var box = el("div", "file-box");
  if (url && isPicture(file.type)) {
    box.appendChild(thumbnailElement(url, name));
  }
  box.appendChild(fileCard(name, file.size, url));
  return box;
}

function fileCard(name, size, url) {
  var card = el(url ? "a" : "div", "file-card" + (url ? "" : " expired"));
  var icon = el("span", "file-icon", extensionLabel(name));
  icon.setAttribute("aria-hidden", "true");
  card.appendChild(icon);
  var info = el("span", "file-info");
  info.appendChild(el("span", "file-name", name));  // the name as text: never markup
  info.appendChild(el("span", "file-size", url ? formatSize(size) : " \u2014 expired (no longer on the server)"));
  card.appendChild(info);
  if (url) {
    card.href = url;
    card.download = name;
    card.title = "Download " + name + " (" + formatSize(size) + ")";
    var get = el("span", "file-get");
    get.appendChild(svgIcon(DOWNLOAD_ICON, 22));
    card.appendChild(get);
  }
  return card;
}

function thumbnailElement(url, name) {
  var link = el("a", "thumb loading");
  link.href = url;
  link.target = "_blank";  // full size in a new tab (pictures are served to be shown, not downloaded)
  link.rel = "noopener noreferrer";
  link.title = "Open " + name + " full size";
  var picture = el("img");
  picture.alt = name;
  picture.loading = "lazy";  // set before src, or the picture is fetched at once
  picture.decoding = "async";
  picture.addEventListener("load", function () {
    link.classList.remove("loading");
    keepAtEnd(link);
  });
  picture.addEventListener("error", function () {
    link.hidden = true;  // gone from the server since: the card below still names it
    keepAtEnd(link);
  });
  picture.src = url;
  link.appendChild(picture);
  return link;
}

function keepAtEnd(node) {
  // A picture changed size as it loaded: a conversation followed to its end stays at its end.
  Object.keys(state.conversations).forEach(function (key) {
    var conv = state.conversations[key];
    if (conv.atEnd && conv.log.contains(node)) {
      scrollToEnd(conv);
    }
  });
}

function actionElement(item) {
  var frame = item.frame;
  var line = el("div", "action" + (item.mention ? " mention" : ""));
  line.dataset.id = String(frame.id);
  var text = el("span", "action-text");
  text.dir = "auto";
  text.appendChild(el("span", "name " + colourClass(frame.from), frame.from));
  text.appendChild(document.createTextNode(" "));
  appendText(text, String(frame.text));
  line.appendChild(text);
  line.appendChild(el("time", "time", timeLabel(item.ts)));
  return line;
}

function noticeElement(item) {
  if (item.tone === "help") {
    return helpElement();
  }
  var notice = el("div", "notice" + (item.tone ? " " + item.tone : ""));
  notice.appendChild(el("span", "", item.text));
  return notice;
}

function helpElement() {
  // /help as a card that wraps on a phone (the text form, helpText(), is the other clients' HELP_TEXT).
  var card = el("div", "help");
  [["everybody", "Commands"], ["operators", "Operators also have"]].forEach(function (part) {
    card.appendChild(el("h3", "", part[1]));
    var list = el("dl");
    COMMANDS.filter(function (command) {
      return command.who === part[0];
    }).forEach(function (command) {
      list.appendChild(el("dt", "", command.usage));
      list.appendChild(el("dd", "", command.help));
    });
    card.appendChild(list);
  });
  card.appendChild(el("p", "", "Start a message with // to send text that begins with /. Shift+Enter starts a new line."));
  if (fileLimit()) {
    card.appendChild(el("p", "", "Share a file with the paperclip beside the message box, by pasting a picture " +
      "into it, or by dropping files on the conversation (up to " + formatSize(fileLimit()) + " each)."));
  }
  if (location.protocol === "https:") {
    card.appendChild(el("h3", "", "Is this the real server?"));
    card.appendChild(el("p", "", "The server made its own certificate, so the browser warned about it the first time: " +
      "no authority vouches for it. Compare its SHA-256 fingerprint (the browser shows it under the address bar's " +
      "site information, then the certificate) with the one the server printed when it started. If they are the " +
      "same, nobody is in between."));
  }
  return card;
}

var URL_PATTERN = /\bhttps?:\/\/[^\s<>"]+/gi;

function appendText(parent, text) {
  // Text as text nodes, and each http(s) address as a link made with createElement.
  var last = 0;
  var match;
  URL_PATTERN.lastIndex = 0;
  while ((match = URL_PATTERN.exec(text)) !== null) {
    var url = trimUrl(match[0]);
    parent.appendChild(document.createTextNode(text.slice(last, match.index)));
    var link = el("a", "", url);
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    parent.appendChild(link);
    last = match.index + url.length;
    URL_PATTERN.lastIndex = last;
  }
  parent.appendChild(document.createTextNode(text.slice(last)));
}

function trimUrl(url) {
  // A sentence's full stop or closing bracket is not part of the address (unless the address opened it).
  var trimmed = url.replace(/[.,;:!?'*]+$/, "");
  while (/[)\]]$/.test(trimmed)) {
    var close = trimmed.slice(-1);
    var open = close === ")" ? "(" : "[";
    if (trimmed.split(open).length >= trimmed.split(close).length) {
      break;
    }
    trimmed = trimmed.slice(0, -1).replace(/[.,;:!?'*]+$/, "");
  }
  return trimmed;
}

// -- rendering: what is waiting to be sent ----------------------------------------------------

function showPending(entry) {
  var conv = entry.conv;
  var bubble = el("div", "bubble pending");
  bubble.dir = "auto";
  appendText(bubble, entry.frame.action ? "* " + state.name + " " + entry.frame.text : entry.frame.text);
  entry.status = el("div", "note");
  bubble.appendChild(entry.status);
  entry.el = bubble;
  conv.pendingBox.appendChild(bubble);
  updatePending(entry);
  scrollToEnd(conv);
}

function updatePending(entry) {
  if (entry.status) {
    entry.status.textContent = state.synced ? "Sending\u2026" : "Waiting for the connection\u2026";
  }
}

function dropPending(entry, why) {
  if (!entry.el) {
    return;
  }
  if (why) {
    entry.el.classList.add("failed");
    entry.status.textContent = "Not sent: " + why + " (tap to dismiss)";
    entry.el.addEventListener("click", function () {
      entry.el.remove();
    });
  } else {
    entry.el.remove();
  }
}

// -- rendering: header, rooms, people, status and title -----------------------------------------

function renderHeader() {
  var conv = currentConversation();
  if (!conv) {
    ui.title.textContent = "LocalChat";
    ui.subtitle.textContent = "";
    return;
  }
  ui.title.textContent = (conv.kind === "room" ? "#" : "@") + conv.name;
  if (conv.kind === "room") {
    var count = conv.users.length + (conv.users.length === 1 ? " person" : " people");
    ui.subtitle.textContent = conv.topic ? conv.topic : count + " here";
  } else {
    var away = awayText(conv.name);
    ui.subtitle.textContent = away ? "Away: " + away : "Direct messages";
  }
  ui.peopleCount.textContent = conv.kind === "room" ? String(conv.users.length) : "";
}

function awayText(name) {
  var key = nameKey(name);
  var found = null;
  Object.keys(state.conversations).forEach(function (k) {
    var away = state.conversations[k].away;
    Object.keys(away).forEach(function (who) {
      if (nameKey(who) === key) {
        found = away[who];
      }
    });
  });
  return found;
}

function conversationsOf(kind) {
  return Object.keys(state.conversations).map(function (key) {
    return state.conversations[key];
  }).filter(function (conv) {
    return conv.kind === kind;
  }).sort(function (a, b) {
    return nameKey(a.name) < nameKey(b.name) ? -1 : 1;
  });
}

function renderRooms() {
  ui.meName.textContent = state.name ? "You are " + state.name + " \u00b7 /nick changes it" : "";
  fillList(ui.roomList, conversationsOf("room"), conversationButton);
  var directs = conversationsOf("direct");
  fillList(ui.directList, directs, function (conv) {
    var row = el("div", "entry-row");
    row.appendChild(conversationButton(conv));
    row.appendChild(closeButton(conv));
    return row;
  });
  ui.directHeading.hidden = directs.length === 0;
  var others = state.allRooms.filter(function (room) {
    return !state.conversations[conversationKey("room", room.name)];
  });
  fillList(ui.otherRooms, others, otherRoomButton);
  ui.otherHeading.hidden = others.length === 0;
  var unread = Object.keys(state.conversations).some(function (key) {
    return key !== state.current && state.conversations[key].unread > 0;
  });
  ui.roomsButton.classList.toggle("has-unread", unread);
}

function fillList(list, entries, make) {
  list.textContent = "";
  entries.forEach(function (entry) {
    var item = el("li");
    item.appendChild(make(entry));
    list.appendChild(item);
  });
}

function conversationButton(conv) {
  var button = el("button", "entry" + (conv.key === state.current ? " current" : "") + (conv.unread ? " unread" : ""));
  button.type = "button";
  button.appendChild(el("span", "sigil", conv.kind === "room" ? "#" : "@"));
  button.appendChild(el("span", "label", conv.name));
  if (conv.unread) {
    button.appendChild(el("span", "badge" + (conv.mentions ? " loud" : ""), String(conv.unread)));
  }
  button.addEventListener("click", function () {
    showConversation(conv.key);
    ui.input.focus();
  });
  button.setAttribute("aria-current", conv.key === state.current ? "true" : "false");
  button.dataset.key = conv.key;
  return button;
}

function closeButton(conv) {
  // A direct conversation is the page's own: closing it forgets it here (the server keeps its history).
  var button = el("button", "icon-button close", "\u00d7");
  button.type = "button";
  button.setAttribute("aria-label", "Close the conversation with " + conv.name);
  button.addEventListener("click", function () {
    closeConversation(conv);
  });
  return button;
}

function otherRoomButton(room) {
  var button = el("button", "entry other");
  button.type = "button";
  button.appendChild(el("span", "sigil", "#"));
  var label = el("span", "label", room.name);
  if (room.topic) {
    label.appendChild(el("span", "detail", room.topic));
  }
  button.appendChild(label);
  button.appendChild(el("span", "count", String(room.users)));
  button.addEventListener("click", function () {
    joinRoom(room.name);
  });
  return button;
}

function renderPeople() {
  var conv = currentConversation();
  var people = !conv ? [] : conv.kind === "room" ? conv.users.slice() : [conv.name, state.name];
  people.sort(function (a, b) {
    return nameKey(a) < nameKey(b) ? -1 : 1;
  });
  fillList(ui.peopleList, people, function (name) {
    return personButton(conv, name);
  });
  ui.peopleHeading.textContent = conv && conv.kind === "room" ? "People in #" + conv.name : "People";
}

function personButton(conv, name) {
  var own = nameKey(name) === nameKey(state.name);
  var button = el("button", "entry person" + (own ? " own" : ""));
  button.type = "button";
  button.dataset.name = name;
  var colour = colourClass(name);
  button.appendChild(el("span", "avatar small " + colour, Array.from(name)[0].toUpperCase()));
  var label = el("span", "label", name + (own ? " (you)" : ""));
  var away = conv.kind === "room" ? conv.away[name] : awayText(name);
  if (away) {
    label.appendChild(el("span", "detail", "Away: " + away));
    button.classList.add("away");
  }
  button.appendChild(label);
  if (conv.kind === "room" && conv.ops.some(function (op) { return nameKey(op) === nameKey(name); })) {
    button.appendChild(el("span", "tag", "op"));
  }
  if (!own) {
    button.title = "Send " + name + " a direct message";
    button.addEventListener("click", function () {
      openDirect(name);
      ui.input.focus();
    });
  } else {
    button.disabled = true;
  }
  return button;
}

function updateTitle() {
  var unread = 0;
  Object.keys(state.conversations).forEach(function (key) {
    unread += state.conversations[key].unread;
  });
  var conv = currentConversation();
  var where = conv ? (conv.kind === "room" ? "#" : "@") + conv.name + " \u00b7 " : "";
  document.title = (unread ? "(" + unread + ") " : "") + where + "LocalChat";
}

function showStatus(text, tone, action) {
  ui.status.hidden = !text;
  ui.status.className = "status" + (tone ? " " + tone : "");
  ui.statusText.textContent = text || "";
  ui.statusAction.hidden = !action;
  if (action) {
    ui.statusAction.textContent = action;
  }
}

function retryStatus() {
  if (!state.retryTimer) {
    return;
  }
  var seconds = Math.max(1, Math.ceil((state.retryAt - Date.now()) / 1000));
  var text = state.retryWhy + " Reconnecting in " + seconds + " s\u2026";
  if (state.welcomed) {
    showStatus(text, "warn", "Try now");
  } else {
    showJoin(text, "", true, "info");
  }
}

// -- the join screen and the drawers --------------------------------------------------

function showJoin(message, ask, keepTrying, tone) {
  // The first screen, also for "that name is taken", a password, or a final refusal.
  ui.app.hidden = true;
  ui.join.hidden = false;
  ui.joinMessage.textContent = message || "";
  ui.joinMessage.hidden = !message;
  ui.joinMessage.className = "join-message" + (tone ? " " + tone : "");
  ui.passwordRow.hidden = !(ask === "password" || state.password !== null);
  ui.joinButton.textContent = keepTrying ? "Connecting\u2026" : "Join";
  ui.joinButton.disabled = !!keepTrying;
  if (!ui.nameInput.value) {
    ui.nameInput.value = state.name || loadSetting("name") || "";
  }
  if (ask === "password") {
    ui.passwordInput.value = "";
    ui.passwordInput.focus();
  } else if (ask === "name") {
    ui.nameInput.focus();
    ui.nameInput.select();
  }
  updateTitle();
}

function showApp() {
  ui.join.hidden = true;
  ui.app.hidden = false;
}

function onJoinSubmit(event) {
  event.preventDefault();
  var name = ui.nameInput.value.trim().replace(/^@+/, "");
  if (!NAME_PATTERN.test(name)) {
    showJoin("A name is 1 to 32 letters, digits, '_', '-' or '.', without spaces.", "name");
    return;
  }
  if (!ui.passwordRow.hidden) {
    state.password = ui.passwordInput.value;
  }
  state.name = name;
  saveSetting("name", name);
  state.stopped = false;
  state.retryMs = RECONNECT_FIRST_MS;
  ui.joinButton.disabled = true;
  ui.joinButton.textContent = "Connecting\u2026";
  connect();
}

function toggleDrawer(which) {
  var open = !document.body.classList.contains(which + "-open");
  closeDrawers();
  document.body.classList.toggle(which + "-open", open);
  if (open && which === "rooms" && state.synced) {
    sendFrame({type: "rooms"});  // the rooms one could join, fresh
  }
}

function closeDrawers() {
  document.body.classList.remove("rooms-open", "people-open");
}

// -- input ---------------------------------------------------------------------------------

function onInputKey(event) {
  var box = ui.input;
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submitInput();
  } else if (event.key === "Escape") {
    closeDrawers();
  } else if (event.key === "ArrowUp" && box.value.lastIndexOf("\n", box.selectionStart - 1) < 0) {
    recallLine(event, -1);  // on the first line: the line sent before
  } else if (event.key === "ArrowDown" && box.value.indexOf("\n", box.selectionEnd) < 0) {
    recallLine(event, 1);   // on the last line: the line sent after
  } else if (event.key === "Tab" && !event.shiftKey && completeName()) {
    event.preventDefault();
  }
}

function rememberLine(line) {
  if (state.sentLines[state.sentLines.length - 1] !== line) {
    state.sentLines.push(line);
    state.sentLines.splice(0, state.sentLines.length - INPUT_HISTORY);
  }
  state.recall = state.sentLines.length;
}

function recallLine(event, step) {
  var index = state.recall + step;
  if (index < 0 || index > state.sentLines.length || (step < 0 && ui.input.value && state.recall === state.sentLines.length)) {
    return;  // nothing further; and a line being typed is never replaced by one recalled
  }
  event.preventDefault();
  state.recall = index;
  ui.input.value = index < state.sentLines.length ? state.sentLines[index] : "";
  autoGrow();
}

function completeName() {
  // Tab after the start of a name completes it from the people here (and the direct conversations).
  var box = ui.input;
  var before = box.value.slice(0, box.selectionStart);
  var match = /@?([^\s@]+)$/.exec(before);
  if (!match) {
    return false;
  }
  var prefix = nameKey(match[1]);
  var conv = currentConversation();
  var names = (conv ? conv.users : []).concat(conversationsOf("direct").map(function (c) { return c.name; }));
  var found = names.filter(function (name) {
    return nameKey(name).indexOf(prefix) === 0 && nameKey(name) !== nameKey(state.name);
  });
  if (!found.length) {
    return false;
  }
  var name = found[0];
  var start = before.length - match[1].length;
  var suffix = start === 0 ? ": " : " ";  // "bob: " at the start, as chat clients do
  box.value = before.slice(0, start) + name + suffix + box.value.slice(box.selectionStart);
  box.selectionStart = box.selectionEnd = start + name.length + suffix.length;
  return true;
}

function autoGrow() {
  ui.input.style.height = "auto";  // set through the CSSOM, which the page's CSP allows
  ui.input.style.height = Math.min(ui.input.scrollHeight, INPUT_MAX_PX) + "px";
}

function submitInput() {
  var line = ui.input.value;
  var conv = currentConversation();
  var result = parseInput(line, whereOf(conv));
  if (!result) {
    return;
  }
  var error = result.error || tooLong(result);
  if (error) {
    addNotice(conv, error, "error");  // the line stays in the box, to be mended
    return;
  }
  rememberLine(line);
  ui.input.value = "";
  autoGrow();
  carryOut(result, conv);
}

function tooLong(result) {
  // Said here rather than by the server: a message over its limit would be refused at every reconnection.
  var text = result.send && result.send.type === "say" ? result.send.text : result.direct ? result.text : null;
  var limit = state.welcome && state.welcome.max_text_bytes > 0 ? state.welcome.max_text_bytes : 32000;
  var size = text === null ? 0 : new TextEncoder().encode(text).length;
  return size > limit ? "That message is too long: " + size + " bytes, of the " + limit + " a message may have." : null;
}

function carryOut(result, conv) {
  if (result.send && result.send.type === "say") {
    say(result.send);
  } else if (result.send) {
    post(result.send);
  } else if (result.join) {
    joinRoom(result.join);
  } else if (result.direct) {
    var direct = openDirect(result.direct);
    say({type: "say", to: direct.name, text: result.text});
  } else if (result.rooms) {
    state.roomsAsked++;
    post({type: "rooms"});
  } else if (result.pick) {
    pickFiles(result.to ? openDirect(result.to) : conv, result.path);
  } else if (result.help) {
    addNotice(conv, helpText(), "help");
  } else if (result.quit) {
    post({type: "bye"});
    stop("You left the chat.", "", "info");
  }
}

function joinRoom(name) {
  var conv = state.conversations[conversationKey("room", name)];
  if (conv && conv.joined) {
    showConversation(conv.key);
    return;
  }
  state.switchTo = conversationKey("room", name);
  post({type: "join", room: name});
  closeDrawers();
}

function openDirect(name) {
  var conv = state.conversations[conversationKey("direct", name)];
  var fresh = !conv;
  conv = openConversation("direct", name);
  showConversation(conv.key);
  if (fresh) {
    requestOlder(conv);  // the conversation so far, if there is one
  }
  return conv;
}

function requestOlder(conv) {
  if (conv.loading || !conv.more) {
    return;
  }
  var request = {type: "history", limit: HISTORY_PAGE};
  if (conv.kind === "room") {
    request.room = conv.name;
  } else {
    request["with"] = conv.name;
  }
  var oldest = null;
  conv.items.forEach(function (item) {
    var id = item.kind === "message" && item.epoch === state.epoch ? item.frame.id : null;
    if (typeof id === "number" && (oldest === null || id < oldest)) {
      oldest = id;
    }
  });
  if (oldest !== null) {
    request.before = oldest;
  }
  conv.loading = true;
  conv.older.disabled = true;
  conv.older.textContent = "Loading\u2026";
  post(request);
}

// -- sending ----------------------------------------------------------------------------------

function post(frame) {
  // Send now if connected and caught up; else keep it for the next connection, in order.
  if (state.synced) {
    sendFrame(frame);
  } else {
    state.outbox.push({frame: frame, ref: null});
  }
}

function say(frame) {
  // A message gets a ref and stays in the outbox until its echo comes back: never lost, never doubled.
  state.refCount++;
  frame.ref = state.refPrefix + "-" + state.refCount;
  var conv = frame.to !== undefined ? openConversation("direct", frame.to) : openConversation("room", frame.room);
  clearUnreadLine(conv);
  var entry = {frame: frame, ref: frame.ref, conv: conv};
  state.outbox.push(entry);
  showPending(entry);
  if (state.synced) {
    sendFrame(frame);
    state.inflight.push(frame.ref);
  }
}

function sendFrame(frame) {
  if (state.ws && state.open && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function flushOutbox() {
  // Caught up: what the echoes did not confirm goes out again, and what waited goes out once.
  state.inflight = [];
  state.outbox = state.outbox.filter(function (entry) {
    sendFrame(entry.frame);
    if (entry.ref) {
      state.inflight.push(entry.ref);
      updatePending(entry);
    }
    return !!entry.ref;
  });
}

function takeFromOutbox(ref) {
  var index = state.outbox.findIndex(function (entry) {
    return entry.ref === ref;
  });
  state.inflight = state.inflight.filter(function (other) {
    return other !== ref;
  });
  return index < 0 ? null : state.outbox.splice(index, 1)[0];
}

// -- files: choosing, sending, following (PROTOCOL_DOC's "Files:") ----------------------------------
// A file goes in three steps: an upload frame asks for a one-time address, the page PUTs the bytes
// there (XMLHttpRequest, for its progress events), and the server announces it as a message frame.

function fileLimit() {
  // The largest file the server takes, in bytes; 0 when it takes none (or is too old to know of files).
  var limits = state.welcome && state.welcome.limits;
  var limit = limits ? Number(limits.max_file_bytes) : 0;
  return limit > 0 ? limit : 0;
}

function picked(files) {
  return Array.from(files || []).map(function (file) {
    return {file: file, name: file.name || "file"};
  });
}

function pastedName(file) {
  // A picture pasted from the clipboard comes as "image.png": it gets a name that says where it came from.
  if (file.name && !/^image\.[a-z]+$/i.test(file.name)) {
    return file.name;
  }
  var extensions = {"image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"};
  return "pasted-picture." + (extensions[file.type] || "png");
}

function shareFiles(chosen, conv) {
  // Send each file to the conversation shown; one over the limit is refused here, before a byte is sent.
  conv = conv || currentConversation();
  if (!conv || !chosen.length) {
    return;
  }
  var limit = fileLimit();
  if (!limit) {
    addNotice(conv, "This chat does not take files.", "error");
    return;
  }
  chosen.forEach(function (entry) {
    if (entry.file.size > limit) {
      addNotice(conv, entry.name + " is " + formatSize(entry.file.size) + ": this chat takes files of up to " +
                formatSize(limit) + ".", "error");
    } else {
      queueUpload(entry.file, entry.name, conv);
    }
  });
  pumpUploads();
}

function queueUpload(file, name, conv) {
  // stage: waiting (for the connection, or its turn), asking (upload sent), sending (PUT), sent, failed.
  state.refCount++;
  var upload = {ref: state.refPrefix + "-f" + state.refCount, file: file, name: name, conv: conv,
                stage: "waiting", done: 0, xhr: null, id: null, timer: null, why: ""};
  state.uploads.push(upload);
  showUpload(upload);
}

function findUpload(test) {
  return state.uploads.find(test) || null;
}

function pumpUploads() {
  // One file at a time: its one-time address is asked for when its turn comes (the address expires).
  var busy = findUpload(function (upload) {
    return upload.stage === "asking" || upload.stage === "sending";
  });
  var next = findUpload(function (upload) {
    return upload.stage === "waiting";
  });
  if (state.synced && !busy && next) {
    next.stage = "asking";
    sendFrame(Object.assign({type: "upload", name: next.name, size: next.file.size, ref: next.ref},
                            whereOf(next.conv)));
  }
  state.uploads.forEach(updateUpload);
}

function putFile(upload, url) {
  var path = localPath(url);
  if (!path) {
    failUpload(upload, "The server gave an address that is not its own.");
    return;
  }
  var xhr = new XMLHttpRequest();
  upload.xhr = xhr;
  upload.stage = "sending";
  xhr.upload.addEventListener("progress", function (event) {
    if (event.lengthComputable && event.total) {
      upload.done = event.loaded / event.total;
      updateUpload(upload);
    }
  });
  xhr.addEventListener("load", function () {
    if (isQueued(upload)) {
      uploadAnswered(upload, xhr);
    }
  });
  xhr.addEventListener("error", function () {
    if (isQueued(upload)) {
      failUpload(upload, "The connection broke while the file was on its way.");
    }
  });
  xhr.open("PUT", path);
  xhr.send(upload.file);
  updateUpload(upload);
}

function uploadAnswered(upload, xhr) {
  // 201 with {"id", "url"}: stored and announced; any other status comes with a sentence as plain text.
  upload.xhr = null;
  if (xhr.status !== 201) {
    var sentence = String(xhr.responseText || "").trim().slice(0, 300);
    failUpload(upload, sentence || "The server answered " + xhr.status + ".");
    return;
  }
  var answer = null;
  try {
    answer = JSON.parse(xhr.responseText);
  } catch (error) {
    answer = null;
  }
  upload.stage = "sent";
  upload.done = 1;
  upload.id = answer && typeof answer.id === "number" ? answer.id : null;
  if (upload.id === null || state.seen.has(upload.id)) {
    finishUpload(upload);  // its message is shown already
  } else {
    upload.timer = setTimeout(function () {
      finishUpload(upload);
    }, UPLOAD_SETTLE_MS);
  }
  pumpUploads();
}

function settleUpload(frame) {
  // Our file's message came (it carries the upload's ref, and the id the 201 named): the row gives way to it.
  var upload = findUpload(function (each) {
    return each.ref === frame.ref || (each.id !== null && each.id === frame.id);
  });
  if (upload) {
    upload.xhr = null;  // the file is shared: its PUT's answer is no longer needed, but it is not cut off
    finishUpload(upload);
  }
}

function isQueued(upload) {
  return state.uploads.indexOf(upload) >= 0;  // not cancelled, dismissed or shared meanwhile
}

function failUpload(upload, why) {
  upload.xhr = null;
  upload.stage = "failed";
  upload.why = why;
  pumpUploads();
}

function finishUpload(upload) {
  // Sent, cancelled or dismissed: forgotten, and its row goes.
  clearTimeout(upload.timer);
  if (upload.xhr) {
    upload.xhr.abort();  // a PUT cut short leaves nothing on the server
    upload.xhr = null;
  }
  state.uploads = state.uploads.filter(function (other) {
    return other !== upload;
  });
  if (upload.preview) {
    URL.revokeObjectURL(upload.preview);
  }
  upload.el.remove();
  pumpUploads();
}

function uploadRefused(frame, text) {
  // An error frame with an upload's ref: that file is refused (too large, too many, files off).
  var upload = frame.ref ? findUpload(function (each) {
    return each.ref === frame.ref;
  }) : null;
  if (upload) {
    failUpload(upload, text);
  }
  return !!upload;
}

function uploadsInterrupted() {
  // The connection went: an address asked for but not given is asked for again on the next one.
  state.uploads.forEach(function (upload) {
    if (upload.stage === "asking") {
      upload.stage = "waiting";
    }
  });
  state.uploads.forEach(updateUpload);
}

// -- rendering: files on their way --------------------------------------------------------------

function showUpload(upload) {
  var row = el("div", "bubble pending upload");
  if (isPicture(upload.file.type)) {
    upload.preview = URL.createObjectURL(upload.file);  // the page's CSP allows blob: pictures
    var preview = el("img", "upload-preview");
    preview.alt = "";
    preview.src = upload.preview;
    row.appendChild(preview);
  } else {
    var icon = el("span", "file-icon", extensionLabel(upload.name));
    icon.setAttribute("aria-hidden", "true");
    row.appendChild(icon);
  }
  var body = el("div", "upload-body");
  body.appendChild(el("span", "file-name", upload.name));
  upload.bar = el("progress");
  upload.bar.max = 1;
  body.appendChild(upload.bar);
  upload.status = el("div", "note");
  upload.status.setAttribute("role", "status");
  body.appendChild(upload.status);
  upload.actions = el("div", "upload-actions");
  body.appendChild(upload.actions);
  row.appendChild(body);
  upload.el = row;
  upload.shown = null;
  upload.conv.pendingBox.appendChild(row);
  updateUpload(upload);
  scrollToEnd(upload.conv);
}

function updateUpload(upload) {
  var size = formatSize(upload.file.size);
  var texts = {
    waiting: state.synced ? "Waiting to be sent \u00b7 " + size : "Waiting for the connection\u2026",
    asking: "Sending\u2026 " + size,
    sending: "Sending\u2026 " + Math.floor(upload.done * 100) + "% of " + size,
    sent: "Sent",
    failed: "Not sent: " + upload.why
  };
  upload.status.textContent = texts[upload.stage];
  if (upload.stage === "sending" || upload.stage === "sent") {
    upload.bar.value = upload.done;
  } else {
    upload.bar.removeAttribute("value");  // no value: a bar that says "working" without a share
  }
  upload.bar.hidden = upload.stage === "failed";
  upload.el.classList.toggle("failed", upload.stage === "failed");
  if (upload.shown !== upload.stage) {
    upload.shown = upload.stage;
    showUploadActions(upload);
  }
}

function showUploadActions(upload) {
  upload.actions.textContent = "";
  if (upload.stage === "failed") {
    upload.actions.appendChild(actionButton("Try again", function () {
      upload.stage = "waiting";
      upload.done = 0;
      pumpUploads();
    }));
    upload.actions.appendChild(actionButton("Dismiss", function () {
      finishUpload(upload);
    }));
  } else if (upload.stage !== "sent") {
    upload.actions.appendChild(actionButton("Cancel", function () {
      finishUpload(upload);
    }));
  }
}

function actionButton(label, onClick) {
  var button = el("button", "link-button", label);
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

// -- files: the paperclip, pasting and dropping ----------------------------------------------------

function pickFiles(conv, path) {
  // The paperclip, or /send: the browser's file picker (Enter and a tap both count as the person's doing).
  if (!fileLimit()) {
    addNotice(conv, "This chat does not take files.", "error");
    return;
  }
  if (path) {
    addNotice(conv, "A web page cannot open a file by its path: choose it in the picker.", "");
  }
  ui.fileInput.click();
}

function onFilesPicked() {
  var chosen = picked(ui.fileInput.files);
  ui.fileInput.value = "";  // the same file may be chosen again
  shareFiles(chosen);
}

function onPaste(event) {
  // A picture pasted into the message box is sent; pasted text (even with pictures) is pasted as text.
  var data = event.clipboardData;
  var files = data && data.files ? Array.from(data.files) : [];
  if (!files.length || Array.from(data.types || []).indexOf("text/plain") >= 0) {
    return;
  }
  event.preventDefault();
  shareFiles(files.map(function (file) {
    return {file: file, name: pastedName(file)};
  }));
}

function draggingFiles(event) {
  return !!event.dataTransfer && Array.from(event.dataTransfer.types || []).indexOf("Files") >= 0;
}

function onDragOver(event) {
  // Files dragged over the page: they go to the conversation shown (never does the browser open them).
  if (!draggingFiles(event)) {
    return;
  }
  event.preventDefault();
  var conv = ui.app.hidden ? null : currentConversation();
  event.dataTransfer.dropEffect = conv ? "copy" : "none";
  if (conv) {
    ui.dropText.textContent = fileLimit() ? "Drop to send to " + (conv.kind === "room" ? "#" : "@") + conv.name :
      "This chat does not take files.";
    ui.dropHint.hidden = false;
  }
  clearTimeout(state.dropTimer);
  state.dropTimer = setTimeout(hideDropHint, DROP_HINT_MS);
}

function hideDropHint() {
  clearTimeout(state.dropTimer);
  ui.dropHint.hidden = true;
}

function onDrop(event) {
  if (!draggingFiles(event)) {
    return;
  }
  event.preventDefault();
  hideDropHint();
  if (!ui.app.hidden) {
    shareFiles(picked(event.dataTransfer.files));
  }
}

function renderAttach() {
  ui.attachButton.hidden = !fileLimit();
}

// -- the connection -----------------------------------------------------------------------------

function socketUrl() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (state.ws || state.stopped) {
    return;
  }
  state.bye = null;
  var ws;
  try {
    ws = new WebSocket(socketUrl());
  } catch (error) {
    scheduleReconnect("Could not open a connection to " + location.host + ".");
    return;
  }
  state.ws = ws;
  state.connectingSince = Date.now();
  ws.onopen = function () {
    if (ws === state.ws) {
      state.open = true;
      state.lastHeard = Date.now();
      state.pinged = false;
      sendFrame(helloFrame());
    }
  };
  ws.onmessage = function (event) {
    if (ws === state.ws) {
      receive(event.data);
    }
  };
  ws.onclose = function () {
    if (ws === state.ws) {
      connectionClosed();
    }
  };
}

function helloFrame() {
  var hello = {type: "hello", name: state.name, version: 1, identity: state.identity};
  var kept = loadSetting("resume", window.sessionStorage);  // a reload takes this tab's place back
  if (!state.welcome && kept && kept.indexOf(nameKey(state.name) + " ") === 0) {
    hello.resume = kept.slice(kept.indexOf(" ") + 1);
  }
  if (state.welcome) {  // reconnecting: take our place back, and what was missed
    hello.resume = state.welcome.resume;
    hello.rooms = conversationsOf("room").filter(function (conv) {
      return conv.joined;
    }).map(function (conv) {
      return conv.name;
    });
    if (state.lastId !== null) {
      hello.last_id = state.lastId;
    }
  }
  state.helloLastId = state.lastId;  // what follows it is news, even replayed
  return hello;
}

function dropConnection() {
  // Forget the WebSocket now (its close event may come much later, or never).
  var ws = state.ws;
  state.ws = null;
  state.open = false;
  if (ws) {
    try {
      ws.close();
    } catch (error) {
      // Closing a socket that never opened can throw in old browsers: it is gone either way.
    }
  }
}

function connectionClosed() {
  var wasSynced = state.synced;
  var bye = state.bye;
  state.ws = null;
  state.open = false;
  state.synced = false;
  state.outbox.forEach(updatePending);
  uploadsInterrupted();
  if (state.stopped) {
    return;
  }
  if (bye && ["kicked", "banned", "replaced", "quit"].indexOf(bye.reason) >= 0) {
    stop(byeSentence(bye));
    return;
  }
  var why = bye && bye.reason === "shutdown" ? "The server shut down." :
    state.welcomed ? "The connection to the server was lost." :
    "Could not reach the chat server at " + location.host + ".";
  if (wasSynced) {
    addNotice(null, why + " What you type meanwhile is sent once the connection is back.", "error");
  }
  scheduleReconnect(why);
}

function byeSentence(bye) {
  var text = bye.text ? String(bye.text) : "";
  if (bye.reason === "kicked") {
    return (text || "You were removed from the chat.") + " You may join again.";
  }
  if (bye.reason === "banned") {
    return text || "You are banned from this chat.";
  }
  if (bye.reason === "replaced") {
    return "You joined as " + state.name + " somewhere else, so this page was disconnected.";
  }
  return text || "You left the chat.";
}

function scheduleReconnect(why) {
  var delay = state.retryMs;
  state.retryMs = Math.min(delay * 2, RECONNECT_MAX_MS);
  state.retryWhy = why;
  state.retryAt = Date.now() + delay;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay);
  retryStatus();
}

function reconnectNow() {
  if (state.retryTimer) {
    state.retryMs = RECONNECT_FIRST_MS;
    connect();
  }
}

function stop(sentence, ask, tone) {
  // A final answer: stop reconnecting and say why on the join screen.
  state.stopped = true;
  state.synced = false;
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  dropConnection();
  showStatus("");
  showJoin(sentence, ask, false, tone);
}

function watchdog() {
  // Runs every second: ping a silent server, give up on a dead one, count down to the next attempt.
  var now = Date.now();
  var silent = now - state.lastHeard;
  var dead = state.open && (silent > DEAD_AFTER_MS || (state.probeAt && now - state.probeAt > PROBE_MS));
  var stuck = state.ws && !state.open && now - state.connectingSince > CONNECT_TIMEOUT_MS;
  if (!state.stopped && (dead || stuck)) {
    state.probeAt = 0;
    dropConnection();
    connectionClosed();
  } else if (state.open && silent > PING_AFTER_MS && !state.pinged) {
    state.pinged = sendFrame({type: "ping"});
  }
  retryStatus();
}

function probe() {
  // Back on the page: a phone may have slept with the connection dead but not closed; ask at once.
  if (state.open && !state.probeAt && sendFrame({type: "ping"})) {
    state.probeAt = Date.now();
  }
}

// -- frames from the server -----------------------------------------------------------------------

function receive(text) {
  state.lastHeard = Date.now();
  state.pinged = false;
  state.probeAt = 0;
  var frame;
  try {
    frame = JSON.parse(text);
  } catch (error) {
    return;  // not a frame: the server never sends one
  }
  if (!frame || typeof frame.type !== "string" || !Object.prototype.hasOwnProperty.call(ON_FRAME, frame.type)) {
    return;  // a frame type of a later version: ignored, as the protocol says
  }
  if (typeof frame.ts === "number" && !frame.replay) {
    state.clockOffset = frame.ts - Date.now() / 1000;
  }
  ON_FRAME[frame.type](frame);
}

var ON_FRAME = {
  challenge: function (frame) {
    if (state.password === null) {
      stop("This chat needs a password. Ask the person who runs it.", "password", "info");
      return;
    }
    sendFrame({type: "auth", proof: hmacSha256Hex(state.password, String(frame.nonce || ""))});
  },

  welcome: function (frame) {
    var resumed = !!(state.welcome && frame.resume && frame.resume === state.welcome.resume);
    if (typeof frame.last_id === "number" && state.lastId !== null && frame.last_id < state.lastId) {
      newEpoch();  // a server without its history (--no-history) came back: its ids start again
    }
    var again = state.welcomed;
    state.welcome = frame;
    state.welcomed = true;
    state.name = String(frame.name);
    state.retryMs = RECONNECT_FIRST_MS;
    state.inflight = [];
    saveSetting("name", state.name);
    saveSetting("resume", nameKey(state.name) + " " + frame.resume, window.sessionStorage);
    if (!resumed) {
      conversationsOf("room").forEach(function (conv) {
        conv.joined = false;  // a new session: the room frames say where we are
      });
    }
    showApp();
    renderAttach();
    showStatus(resumed || state.lastId === null ? "" : "Catching up\u2026", "info");
    if (again) {
      addNotice(null, "Reconnected.", "");
    }
  },

  room: function (frame) {
    var conv = openConversation("room", frame.room);
    var fresh = !conv.joined;
    conv.joined = true;
    conv.users = (frame.users || []).map(String);
    conv.away = frame.away || {};
    conv.ops = frame.ops || [];
    conv.topic = frame.topic || null;
    if (fresh && !conv.announced) {
      conv.announced = true;
      addNotice(conv, "You joined #" + conv.name + (conv.topic ? ". Topic: " + conv.topic : "."), "", 0);
    }
    if (state.switchTo === conv.key) {
      state.switchTo = null;
      showConversation(conv.key);
    }
    refreshConversation(conv);
  },

  message: function (frame) {
    if (typeof frame.id === "number") {
      if (state.seen.has(frame.id)) {
        return;
      }
      state.seen.add(frame.id);
      state.lastId = Math.max(state.lastId || 0, frame.id);
    }
    var own = isOwn(frame);
    if (own && frame.ref) {
      var entry = takeFromOutbox(frame.ref);
      if (entry) {
        dropPending(entry);
      }
    }
    var conv = frame.room !== undefined && frame.room !== null ? openConversation("room", frame.room) :
      openConversation("direct", own ? frame.to : frame.from);
    // A bot's notice never rings, nor does a file whose name holds ours.
    var mention = !own && !frame.notice && !fileOf(frame) && mentions(String(frame.text), state.name);
    var unseen = !own && !isViewing(conv) && isNews(frame, conv);
    if (unseen) {
      conv.unread++;
      conv.mentions += mention || conv.kind === "direct" ? 1 : 0;  // both ring: the badge is red
      if (conv.unreadFrom === null) {
        conv.unreadFrom = frame.id;
      }
    }
    if (frame.replay) {
      conv.older.hidden = false;  // history came: there may be more of it
    }
    addMessage(conv, frame, mention);
    if (own && fileOf(frame)) {
      settleUpload(frame);
    }
    if (unseen) {
      renderRooms();
      updateTitle();
    }
  },

  joined: function (frame) {
    var conv = state.conversations[conversationKey("room", frame.room || "general")];
    if (conv) {
      if (!conv.users.some(function (user) { return nameKey(user) === nameKey(frame.name); })) {
        conv.users.push(String(frame.name));
      }
      addNotice(conv, frame.name + " joined", "", frame.ts);
      refreshConversation(conv);
    }
  },

  left: function (frame) {
    var name = String(frame.name);
    if (frame.room && nameKey(name) === nameKey(state.name)) {
      var mine = state.conversations[conversationKey("room", frame.room)];
      if (mine) {
        closeConversation(mine);
      }
      return;
    }
    roomsWith(name, frame.room).forEach(function (conv) {
      conv.users = conv.users.filter(function (user) {
        return nameKey(user) !== nameKey(name);
      });
      delete conv.away[name];
      addNotice(conv, leftSentence(frame), "", frame.ts);
      refreshConversation(conv);
    });
  },

  users: function (frame) {
    var conv = frame.room ? state.conversations[conversationKey("room", frame.room)] : null;
    if (conv) {
      conv.users = (frame.users || []).map(String);
      conv.away = frame.away || {};
      conv.ops = frame.ops || conv.ops;
      refreshConversation(conv);
    }
    var users = (frame.users || []).map(function (user) {
      var away = (frame.away || {})[user];
      return user + (away ? " (away: " + away + ")" : "");
    });
    addNotice(null, users.length + " here" + (frame.room ? " in #" + frame.room : "") + ": " + users.join(", "));
  },

  rooms: function (frame) {
    state.allRooms = (frame.rooms || []).filter(function (room) {
      return room && typeof room.name === "string";
    });
    renderRooms();
    if (state.roomsAsked > 0) {
      state.roomsAsked--;
      var parts = state.allRooms.map(function (room) {
        return "#" + room.name + " (" + room.users + ")" + (room.topic ? ": " + room.topic : "");
      });
      addNotice(null, parts.length ? "Rooms: " + parts.join(", ") : "There are no rooms.");
    }
  },

  topic: function (frame) {
    var conv = state.conversations[conversationKey("room", String(frame.room))];
    if (conv) {
      conv.topic = frame.topic || null;
      refreshConversation(conv);
    }
    var room = "#" + frame.room;
    var text = frame.by ? (frame.topic ? frame.by + " set the topic: " + frame.topic : frame.by + " cleared the topic") :
      (frame.topic ? "Topic of " + room + ": " + frame.topic : room + " has no topic.");
    addNotice(conv, text, "", frame.ts);
  },

  invite: function (frame) {
    var me = nameKey(String(frame.to)) === nameKey(state.name);
    var room = "#" + frame.room;
    addNotice(me ? null : state.conversations[conversationKey("room", String(frame.room))],
              me ? frame.from + " invites you to " + room + " (/join " + frame.room + ")" :
              "You invited " + frame.to + " to " + room + ".", "", frame.ts);
  },

  renamed: function (frame) {
    var old = String(frame.old);
    var name = String(frame.name);
    var isMe = nameKey(old) === nameKey(state.name);
    roomsWith(old).forEach(function (conv) {
      conv.users = conv.users.map(function (user) {
        return nameKey(user) === nameKey(old) ? name : user;
      });
      if (conv.away[old] !== undefined) {
        conv.away[name] = conv.away[old];
        delete conv.away[old];
      }
      addNotice(conv, isMe ? "You are now known as " + name : old + " is now known as " + name, "", frame.ts);
      refreshConversation(conv);
    });
    renameDirect(old, name);
    if (isMe) {
      state.name = name;
      saveSetting("name", name);
      renderRooms();
    }
  },

  away: function (frame) {
    var name = String(frame.name);
    var rooms = roomsWith(name);
    rooms.forEach(function (conv) {
      if (frame.text) {
        conv.away[name] = String(frame.text);
      } else {
        delete conv.away[name];
      }
      refreshConversation(conv);
    });
    var me = nameKey(name) === nameKey(state.name);
    var text = frame.text ? (me ? "You are away: " : name + " is away: ") + frame.text :
      (me ? "You are back." : name + " is back");
    var direct = state.conversations[conversationKey("direct", name)];
    (rooms.length ? rooms : [currentConversation()]).concat(direct ? [direct] : []).forEach(function (conv) {
      addNotice(conv, text, "", frame.ts);
    });
    renderHeader();
  },

  history_end: function (frame) {
    var conv = frame.room ? state.conversations[conversationKey("room", frame.room)] :
      state.conversations[conversationKey("direct", String(frame["with"]))];
    if (!conv) {
      return;
    }
    conv.loading = false;
    conv.more = !!frame.more;
    conv.older.hidden = false;
    conv.older.disabled = !conv.more;
    conv.older.textContent = conv.more ? "Show earlier messages" :
      conv.kind === "room" ? "The beginning of #" + conv.name : "The beginning of your conversation with " + conv.name;
    conv.older.classList.toggle("done", !conv.more);
  },

  synced: function (frame) {
    state.synced = true;
    if (typeof frame.last_id === "number") {
      state.lastId = Math.max(state.lastId || 0, frame.last_id);
    }
    conversationsOf("room").forEach(function (conv) {
      if (!conv.joined) {
        closeConversation(conv);
        addNotice(null, "You are no longer in #" + conv.name + ".", "error");
      }
    });
    showStatus("");
    conversationsOf("room").forEach(function (conv) {
      if (!conv.items.some(function (item) { return item.kind === "message"; })) {
        requestOlder(conv);  // a resumed session gets no scrollback: ask for the room's last messages
      }
    });
    flushOutbox();
    pumpUploads();
    post({type: "rooms"});  // the rooms one could join, for the drawer
    if (!state.current) {
      var first = Object.keys(state.conversations)[0];
      if (first) {
        showConversation(first);
      }
    }
  },

  error: function (frame) {
    var code = String(frame.code || "");
    var text = frame.text ? String(frame.text) : "The server refused that (" + code + ").";
    if (NAME_ERRORS.indexOf(code) >= 0 && !state.synced) {
      stop(text, "name");  // the server's sentence: taken, or kept a moment for somebody who lost the connection
      return;
    }
    if (code === "auth_failed" || code === "bad_auth") {
      state.password = null;
      stop("Wrong password. Ask the person who runs the chat for it.", "password");
      return;
    }
    if (FINAL_ERRORS.indexOf(code) >= 0) {
      stop(text);
      return;
    }
    if (uploadRefused(frame, text)) {
      return;
    }
    var entry = refusedEntry(frame, code);
    if (entry) {
      dropPending(entry, text);
      return;
    }
    addNotice(null, text, "error");
  },

  upload_ready: function (frame) {
    var upload = findUpload(function (each) {
      return each.ref === frame.ref && each.stage === "asking";
    });
    if (upload) {  // else cancelled meanwhile: the address expires unused
      putFile(upload, frame.url);
    }
  },

  bye: function (frame) {
    state.bye = frame;
  },

  notice: function (frame) {
    addNotice(null, frame.text, "announce", frame.ts);
  },

  ping: function () {
    sendFrame({type: "pong"});
  },

  pong: function () {
    // Any frame is a sign of life; receive() noted it.
  }
};

function isNews(frame, conv) {
  // Live, or replayed but new to this page: a direct message that waited, or what was missed offline.
  if (!frame.replay) {
    return true;
  }
  if (conv.loading) {
    return false;  // a page of earlier messages
  }
  return conv.kind === "direct" || (state.helloLastId !== null && frame.id > state.helloLastId);
}

function refusedEntry(frame, code) {
  // Which say an error answers: its ref (not_stored), or else the oldest one in flight.
  if (frame.ref) {
    return takeFromOutbox(frame.ref);
  }
  if (SAY_ERRORS.indexOf(code) >= 0 && state.inflight.length) {
    return takeFromOutbox(state.inflight[0]);
  }
  return null;
}

function roomsWith(name, room) {
  var key = nameKey(name);
  return conversationsOf("room").filter(function (conv) {
    return (!room || nameKey(conv.name) === nameKey(room)) && conv.users.some(function (user) {
      return nameKey(user) === key;
    });
  });
}

function leftSentence(frame) {
  if (frame.text) {
    return String(frame.text);
  }
  var words = {
    quit: "left", part: "left", lost: "lost the connection", timeout: "timed out",
    too_slow: "could not keep up and was disconnected", flood: "was disconnected for flooding",
    kicked: "was kicked", banned: "was banned", error: "was disconnected for sending bad data",
    shutdown: "left as the server shut down"
  };
  var said = frame.message ? ' saying "' + frame.message + '"' : "";  // what one says on leaving
  return frame.name + " " + (words[frame.reason] || "left") + said;
}

function renameDirect(old, name) {
  // A direct conversation follows its person to the new name.
  var conv = state.conversations[conversationKey("direct", old)];
  if (!conv || state.conversations[conversationKey("direct", name)]) {
    return;
  }
  delete state.conversations[conv.key];
  conv.name = name;
  conv.key = conversationKey("direct", name);
  state.conversations[conv.key] = conv;
  if (state.current === conversationKey("direct", old)) {
    state.current = conv.key;
  }
  addNotice(conv, old + " is now known as " + name);
  refreshConversation(conv);
}

function refreshConversation(conv) {
  if (conv.key === state.current) {
    renderHeader();
    renderPeople();
  }
  renderRooms();
}

// -- start -------------------------------------------------------------------------------

function onVisible() {
  var conv = currentConversation();
  if (conv && isViewing(conv)) {
    conv.unread = 0;
    conv.mentions = 0;
    renderRooms();
    updateTitle();
  }
  if (!document.hidden) {
    reconnectNow();  // phones drop connections in the background: try at once on return
    probe();
  }
}

function start() {
  ["join", "join-form", "join-message", "name-input", "password-row", "password-input", "join-button",
   "app", "title", "subtitle", "rooms-button", "people-button", "people-count", "room-list", "direct-list",
   "direct-heading", "other-rooms", "other-heading", "join-room-form", "join-room-input", "people-list",
   "people-heading", "logs", "jump", "status", "status-text", "status-action", "composer", "input", "scrim",
   "me-name", "leave-button", "attach-button", "file-input", "drop-hint", "drop-text"
  ].forEach(function (id) {
    ui[id.replace(/-([a-z])/g, function (all, letter) { return letter.toUpperCase(); })] = document.getElementById(id);
  });
  state.identity = loadIdentity();
  state.refPrefix = "w" + randomHex(4);
  ui.joinForm.addEventListener("submit", onJoinSubmit);
  ui.composer.addEventListener("submit", function (event) {
    event.preventDefault();
    submitInput();
    ui.input.focus();
  });
  ui.input.addEventListener("keydown", onInputKey);
  ui.input.addEventListener("input", autoGrow);
  ui.input.addEventListener("paste", onPaste);
  ui.attachButton.addEventListener("click", function () {
    pickFiles(currentConversation(), "");
  });
  ui.fileInput.addEventListener("change", onFilesPicked);
  document.addEventListener("dragover", onDragOver);
  document.addEventListener("drop", onDrop);
  ui.roomsButton.addEventListener("click", function () { toggleDrawer("rooms"); });
  ui.peopleButton.addEventListener("click", function () { toggleDrawer("people"); });
  ui.scrim.addEventListener("click", closeDrawers);
  ui.statusAction.addEventListener("click", reconnectNow);
  ui.leaveButton.addEventListener("click", function () {
    closeDrawers();
    carryOut({quit: true}, currentConversation());
  });
  ui.jump.addEventListener("click", function () {
    var conv = currentConversation();
    if (conv) {
      scrollToEnd(conv);
    }
  });
  window.addEventListener("resize", onResize);
  ui.joinRoomForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var room = ui.joinRoomInput.value.trim().replace(/^#+/, "");
    if (room) {
      ui.joinRoomInput.value = "";
      joinRoom(room);
    }
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      closeDrawers();
    }
  });
  document.addEventListener("visibilitychange", onVisible);
  window.addEventListener("focus", function () { state.focused = true; onVisible(); });
  window.addEventListener("blur", function () { state.focused = false; });
  window.addEventListener("online", reconnectNow);
  setInterval(watchdog, 1000);
  var saved = loadSetting("name");
  showJoin("", "name");
  if (saved && NAME_PATTERN.test(saved)) {
    ui.nameInput.value = saved;
    onJoinSubmit({preventDefault: function () {}});  // a returning visitor goes straight in
  }
}

document.addEventListener("DOMContentLoaded", start);
"""

WEB_ICON_SVG = r"""<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 512 512">
<rect width="512" height="512" rx="112" fill="#2f6fed"/>
<path fill="#ffffff" d="M256 104c-97 0-176 62-176 142 0 44 24 83 62 109-3 26-14 50-34 71 40-3 76-17 104-40 14 2 29 4 44 4 97 0 176-62 176-144S353 104 256 104z"/>
<circle cx="184" cy="248" r="24" fill="#2f6fed"/>
<circle cx="256" cy="248" r="24" fill="#2f6fed"/>
<circle cx="328" cy="248" r="24" fill="#2f6fed"/>
</svg>
"""

# "Add to Home Screen" makes a chat icon that opens the page without the browser's bars.
WEB_MANIFEST = json.dumps({
    "name": "LocalChat",
    "short_name": "LocalChat",
    "description": "Chat with everybody on this network.",
    "start_url": "/",
    "scope": "/",
    "display": "standalone",
    "background_color": "#f6f7f9",
    "theme_color": "#2f6fed",
    "icons": [{"src": "/icon.svg", "sizes": "any", "type": "image/svg+xml", "purpose": "any"}],
}, indent=2)


# =============================================================================
# 12. Sessions and doors: one session per connection, a door per protocol
# =============================================================================
#
# A Session handles one connection whatever it speaks: the TLS sniff, bounded
# reads, the hello deadline and idle pings, the hello/password/resume gate,
# dispatch to the hub by frame type (do_<type>), error counting and the end. A
# door is a small codec, chosen by the connection's first bytes: it cuts bytes
# into protocol frames (dicts, as in the Protocol section) and encodes the hub's
# events, once per event for every connection on that door. A session runs on
# its connection's thread; the hub delivers to its Outbox (see Transport).

_BEFORE_HELLO = frozenset(["hello", "auth", "ping", "pong", "bye", "door"])
AUTH_FAILED_DELAY_S = 1.0  # a wrong password waits this long for its answer, so guessing is slow
WRONG_PASSWORDS_PER_MINUTE = 10  # from one address; then every try is refused for the rest of the minute
DOOR_SNIFF_BYTES = 16      # the most first bytes a door may need to see before it says yes or no
SILENT_PROMPT_S = 2.0      # a connection that has sent nothing this long is asked for a name (nc, telnet)


class Door:
    """A way in: which first bytes it claims, how it cuts frames, how it encodes events.

    One instance per connection (a door may keep the state of its framing); it
    knows no hub and no socket: the Session reads, writes and dispatches. `encode`
    turns the fields of any server frame (events, errors, pongs) into the door's
    bytes; it must be one function for all connections of the door, so that
    Event.encoded() encodes each event once for all of them.
    """

    name = "door"
    encode = staticmethod(encode_frame)
    for_silence = False     # chosen for a connection that says nothing for SILENT_PROMPT_S (a person at nc)
    alpn = ()               # TLS application protocols (ALPN) that choose this door at the handshake
    hello_timeout_s = None  # how long it may take to join; None: the server's hello timeout
    password_in_hello = False  # the protocol carries the password itself (no challenge): refused in clear
    retries_hello = False   # a refused name is asked for again instead of ending the connection
    reclaims = False        # with no resume token, a lost user's name is taken back from the same address
    answers_pings = True    # the peer answers pings; a person at nc does not, and silence is no fault
    echo = True             # the peer gets its own room messages back (IRC without echo-message: no)

    @staticmethod
    def claims(first):
        """Return True if a connection starting with these bytes is this door's, False if not,
        or None if it cannot tell yet (it is never asked about more than DOOR_SNIFF_BYTES)."""
        raise NotImplementedError

    def greet(self, session):
        """The door was chosen: say what this protocol says first (nothing, by default)."""

    def receiver(self, outbox):
        """Return what the hub delivers this connection's events to: the outbox, unless the door
        renders some of them for this connection alone (see DoorReceiver)."""
        return outbox

    def encode_own(self, fields):
        """Return the bytes of a frame meant for this connection only (an error, a pong)."""
        return self.encode(fields)

    def handle(self, session, frame):
        """Carry out a frame of type "door": a command of the door's own protocol. Return a reason to stop, or None."""
        raise ProtocolError("unknown_type", "Unknown frame type 'door'.")

    def idle(self):
        """Return True if a connection that has not said hello may end quietly when its time is up."""
        return False

    def close(self):
        """The connection has ended, however it ended: let go of what the door holds."""

    def frames(self, buffer):
        """Cut what is complete off the bytearray buffer; return its frames (dicts) and ProtocolErrors.

        A fatal ProtocolError ends the connection; others are answered and reading goes on.
        A list, not a generator: on Python 3.11 each generator resumed from a loop costs
        another level of C stack, and thousands of connection threads each keep the
        deepest page they touched.
        """
        raise NotImplementedError


class JsonLinesDoor(Door):
    """The protocol of this file's own clients: one JSON object per line (see the Protocol section)."""

    name = "json"
    max_line_bytes = MAX_LINE_BYTES  # one frame, newline included

    @staticmethod
    def claims(first):
        stripped = first.lstrip(b" \t\r\n")
        return stripped[:1] == b"{" if stripped else None

    def frames(self, buffer):
        end = buffer.rfind(b"\n")
        lines = []
        if end >= 0:
            lines = bytes(buffer[:end]).split(b"\n")
            del buffer[:end + 1]
        found = []
        for line in lines:
            if len(line) >= self.max_line_bytes:
                found.append(self._too_long())
                return found
            line = line.rstrip(b"\r")
            if line.strip():
                try:
                    found.append(parse_frame(line))
                except ProtocolError as error:
                    found.append(error)
        if len(buffer) >= self.max_line_bytes:
            found.append(self._too_long())
        return found

    def _too_long(self):
        return ProtocolError("line_too_long", "A line may hold at most %d bytes; closing the connection."
                             % self.max_line_bytes, fatal=True)


class DoorReceiver:
    """Stands between the hub and a connection's Outbox for a door that renders some events itself.

    The hub delivers to it as to an Outbox (deliver_locked, close_locked, with the
    hub's lock held); the door decides what each event becomes for this connection.
    """

    __slots__ = ("outbox", "door")

    def __init__(self, outbox, door):
        self.outbox, self.door = outbox, door

    def deliver_locked(self, event):
        self.door.deliver_locked(self.outbox, event)

    def close_locked(self, hangup=True):
        self.outbox.close_locked(hangup)


class IrcReceiver(DoorReceiver):
    """The IRC door's receiver: what reads the same for every IRC client goes straight to the outbox.

    A chat message in a room is most of what a server sends: it takes one call and one
    lookup of its bytes, encoded once for every IRC connection, as Outbox.deliver_locked
    does for JSON lines (whose queuing it repeats, for the same reason: one call a
    recipient). What the encoder leaves empty goes to the door.
    """

    __slots__ = ("encoder",)

    def __init__(self, outbox, door, encoder):
        DoorReceiver.__init__(self, outbox, door)
        self.encoder = encoder  # irc_encode or irc_encode_timed, shared by every IRC connection

    def history_shown_locked(self):
        """The hub has delivered a page of replayed history (the hub's lock held)."""
        self.door.history_shown_locked(self.outbox)

    def deliver_locked(self, event):
        data = event.by_encoder.get(self.encoder)
        if data is None:
            data = event.encoded(self.encoder)
        if not data:
            self.door.deliver_locked(self.outbox, event)
            return
        outbox = self.outbox
        if outbox.closing or outbox.failed:
            return
        outbox.chunks.append(data)
        outbox.writer.queued_bytes += len(data)
        if not outbox.queued:
            outbox.queued = True
            outbox.writer.note_locked(outbox)


# -- IRC: the client protocol of RFC 1459/2812, with IRCv3 capability negotiation --
#
# Rooms are channels (#general). Each IRC line becomes a "door" frame that
# IrcDoor.handle carries out, mostly by handing protocol frames to the session, so
# the hub's rules hold for IRC as for every client. Events that read the same for
# everybody are encoded once for all IRC connections (irc_encode, irc_encode_timed);
# replies and history are rendered for the one connection (IrcDoor.deliver_locked).

IRC_MAX_LINE_BYTES = 512   # RFC 2812: a line, its CRLF included
IRC_MAX_TAGS_BYTES = 8191  # IRCv3 message tags may come before a line (and are ignored)
IRC_SERVER = "localchat"   # the server's name in replies (the computer's own name may hold spaces)
IRC_HOST = "lan"           # the host in every nick!user@host: addresses are nobody else's business
IRC_CAPS = ("echo-message", "server-time")  # the IRCv3 capabilities offered: only what is implemented
IRC_BEFORE_WELCOME = frozenset(["CAP", "PASS", "NICK", "USER", "PING", "PONG", "QUIT"])
_IRC_FORMATTING = re.compile("\x03(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?|[\x02\x0f\x11\x16\x1d\x1e\x1f]")


def irc_nick(name):
    """Return the IRC form of a LocalChat name: "." becomes "|", and a name that IRC does not let
    start as it does (a digit or "-") gets a "`" in front. Names hold neither, so it maps back."""
    nick = name.replace(".", "|")
    return "`" + nick if nick and nick[0] in "0123456789-" else nick


def name_from_irc(nick):
    """Return the LocalChat name an IRC nick stands for (irc_nick backwards); check_name judges it."""
    return (nick[1:] if nick.startswith("`") else nick).replace("|", ".")


def _irc_mask(name):
    return "%s!%s@%s" % (irc_nick(name), "u", IRC_HOST)


def irc_line(prefix, command, *params):
    """Return one IRC line as bytes, CRLF included; the last parameter goes as trailing where it must.

    A client's own words come back in some replies: nothing in them may end the line, and
    a middle parameter may be neither empty nor hold a space.
    """
    params = [str(param).replace("\r", " ").replace("\n", " ").replace("\0", "") for param in params]
    params = [param.replace(" ", "_").lstrip(":") or "*" for param in params[:-1]] + params[-1:]
    if params and (not params[-1] or " " in params[-1] or params[-1].startswith(":")):
        params[-1] = ":" + params[-1]
    head = ":%s %s" % (prefix, command) if prefix else command
    return (" ".join([head] + params) + "\r\n").encode("utf-8")


def _split_utf8(text, limit):
    """Return text cut into pieces of at most `limit` UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8")
    pieces = []
    while len(data) > limit:
        cut = limit
        while cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte: step back to a whole character
            cut -= 1
        space = data.rfind(b" ", 0, cut)
        if space > cut // 2:  # a word boundary not too far back reads better
            cut = space + 1
        pieces.append(data[:cut].decode("utf-8"))
        data = data[cut:]
    pieces.append(data.decode("utf-8"))
    return pieces


def _irc_time(ts):
    """Return a timestamp as IRCv3 server-time: 2026-12-06T22:00:00.000Z."""
    moment = datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def _irc_target(fields):
    return "#" + fields["room"] if fields.get("room") else irc_nick(fields["to"])


def _irc_message(fields, stamp=""):
    """Return a message as PRIVMSG lines: one a line of its text, each under 512 bytes."""
    prefix, target = _irc_mask(fields["from"]), _irc_target(fields)
    action = fields.get("action")
    command = "NOTICE" if fields.get("notice") else "PRIVMSG"
    # ":prefix PRIVMSG target :" and CRLF, and "\x01ACTION " ... "\x01" for an action
    room = IRC_MAX_LINE_BYTES - len(("%s PRIVMSG %s :" % (prefix, target)).encode("utf-8")) - 3 - (9 if action else 0)
    lines = []
    for text in fields["text"].split("\n"):
        if not text.strip():
            continue  # IRC has no empty message
        for piece in _split_utf8(stamp + text, max(64, room - len(stamp.encode("utf-8")))):
            lines.append(irc_line(prefix, command, target, "\x01ACTION %s\x01" % piece if action else piece))
    return lines


def _irc_left(fields):
    if fields.get("room"):
        part = ("#" + fields["room"],) + ((fields["message"],) if fields.get("message") else ())
        return [irc_line(_irc_mask(fields["name"]), "PART", *part)]
    reason = fields.get("reason")
    words = fields.get("text") or ("Quit: " + fields["message"] if fields.get("message") else
                                   _LEFT_WORDS.get(reason, reason))
    return [irc_line(_irc_mask(fields["name"]), "QUIT", words)]


def _irc_topic(fields):
    return [irc_line(_irc_mask(fields["by"]), "TOPIC", "#" + fields["room"], fields.get("topic") or "")]


# Events that read the same for every IRC client, by type: fields -> lines
_IRC_SHARED = {
    "message": _irc_message,
    "joined": lambda f: [irc_line(_irc_mask(f["name"]), "JOIN", "#" + f["room"])],
    "left": _irc_left,
    "renamed": lambda f: [irc_line(_irc_mask(f["old"]), "NICK", irc_nick(f["name"]))],
    "topic": _irc_topic,  # when somebody set it ("by"); the answer to a question is a reply
    "notice": lambda f: [irc_line(IRC_SERVER, "NOTICE", "*", f.get("text") or "")],
    "away": lambda f: [],  # IRC hears of it only when it asks (301 on a PRIVMSG, WHOIS)
}


# What every IRC client gets the same bytes of, encoded once: IrcReceiver's fast path. The rest
# (replays, direct messages, leavings and renames, which the door keeps track of) goes through
# IrcDoor.deliver_locked, for each connection.
_IRC_FAST = frozenset(["message", "joined", "topic", "notice"])


def _irc_shared(fields, timed):
    """Return the event's lines, or b"" for what each connection renders itself (see _IRC_FAST)."""
    kind = fields["type"]
    if kind not in _IRC_FAST or fields.get("replay") or fields.get("to") is not None or (
            kind == "topic" and not fields.get("by")):
        return b""
    return _irc_lines(fields, timed)


def _irc_lines(fields, timed):
    lines = _IRC_SHARED[fields["type"]](fields)
    if timed and lines and fields.get("ts"):
        tag = ("@time=%s " % _irc_time(fields["ts"])).encode("ascii")
        lines = [tag + line for line in lines]
    return b"".join(lines)


def irc_encode(fields):
    """The IRC encoder of events that read the same for everybody (see Event.encoded)."""
    return _irc_shared(fields, False)


def irc_encode_timed(fields):
    """The same for clients that asked for server-time: each line tagged with the event's time."""
    return _irc_shared(fields, True)


def irc_encode_whole(fields):
    """An event's lines, whatever it is (a direct message, a leaving, a rename): the door's own path
    uses it where the same lines go to several IRC clients, so they are encoded once."""
    return _irc_lines(fields, False)


def irc_encode_whole_timed(fields):
    return _irc_lines(fields, True)


# A hub error code -> the IRC numeric that answers it (refined by the command in IrcDoor._error_lines)
_IRC_ERRORS = {
    "name_taken": "433", "bad_name": "432", "bad_room": "403", "unknown_user": "401", "empty_text": "412",
    "not_operator": "482", "too_many_rooms": "405", "banned": "465", "auth_failed": "464",
    "password_required": "464", "password_in_clear": "464", "line_too_long": "417", "already_joined": "462",
    "hello_first": "451", "not_in_room": "442", "muted": "404",
}


class IrcDoor(Door):
    """IRC clients (HexChat, irssi, WeeChat, phone apps): registration, channels, the common commands.

    One per connection. frames() and handle() run on the connection's thread;
    deliver_locked() on whichever thread holds the hub's lock. The state both use
    (nick, capabilities, channels) is written under the lock or before the welcome.
    """

    name = "irc"
    encode = staticmethod(irc_encode)
    password_in_hello = True  # PASS: refused in clear without TLS (see Session._check_password)
    retries_hello = True      # 433 and 432: the client offers another nick
    reclaims = True           # no resume token: a lost nick is taken back from the same address
    first_words = (b"CAP", b"NICK", b"USER", b"PASS")  # what an IRC client sends first

    @classmethod
    def claims(cls, first):
        word, space, _ = first.partition(b" ")
        word = word.upper()
        if space:
            return word in cls.first_words
        if len(first) < 5 and any(known.startswith(word) for known in cls.first_words):
            return None
        return False

    def __init__(self):
        self.session = None
        self.nick = "*"  # what the client is called in replies: "*" until the welcome
        self.me = None  # the LocalChat name the welcome gave (and renames change)
        self.wanted = None  # the nick asked for before the welcome
        self.user = None  # USER's user name and real name
        self.password = None
        self.capping = False  # CAP LS or REQ came: registration waits for CAP END
        self.caps = set()
        self.encoder = irc_encode
        self._receiver = None  # the IrcReceiver, once registered
        self.channels = {}  # room key -> room name, for JOIN 0 and our own PARTs
        self.registered = False
        self._asking = None  # (command, argument) whose answer the hub is about to deliver
        self._skipping = False  # the rest of an overlong line is being dropped
        self._quiet = False  # NOTICE: errors are never answered (RFC 2812 3.3.2)
        self._replaying = None  # the channel (or nick) whose replayed messages are arriving

    def greet(self, session):
        self.session = session

    def receiver(self, outbox):
        self._receiver = IrcReceiver(outbox, self, self.encoder)
        return self._receiver

    @property
    def echo(self):
        return "echo-message" in self.caps

    # -- reading -------------------------------------------------------------------

    def frames(self, buffer):
        found = []
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[:end + 1]
            if self._skipping:
                self._skipping = False  # the end of a line already refused
                continue
            item = self._parse(line)
            if item is not None:
                found.append(item)
        if len(buffer) > IRC_MAX_LINE_BYTES + IRC_MAX_TAGS_BYTES or (
                len(buffer) > IRC_MAX_LINE_BYTES and not buffer.startswith(b"@")):
            del buffer[:]
            self._skipping = True
            found.append(self._too_long())
        return found

    def _too_long(self):
        return ProtocolError("line_too_long", "Input line was too long: an IRC line holds at most %d bytes; "
                             "it was not sent." % IRC_MAX_LINE_BYTES)

    def _parse(self, line):
        """Return the door frame of one IRC line, a ProtocolError, or None for a blank line."""
        if line.startswith(b"@"):  # message tags: none is offered, so none means anything here
            line = line.partition(b" ")[2]
        if len(line) > IRC_MAX_LINE_BYTES - 2:
            return self._too_long()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolError("bad_utf8", "That line was not UTF-8: this server speaks UTF-8 only (UTF8ONLY).")
        if text.startswith(":"):
            text = text.partition(" ")[2]  # a client's own prefix says nothing a server may believe
        head, colon, trailing = text.partition(" :")
        params = [param for param in head.split(" ") if param]
        if colon:
            params.append(trailing)
        if not params:
            return None
        return {"type": "door", "command": params[0].upper(), "params": params[1:]}

    # -- commands (on the connection's thread) --------------------------------------

    def handle(self, session, frame):
        command, params = frame.get("command"), frame.get("params")
        if not isinstance(command, str) or not isinstance(params, list):
            raise ProtocolError("bad_field", "A door frame needs a command and its parameters.")
        handler = getattr(self, "irc_" + command, None) if command.isalpha() else None
        if not self.registered and command not in IRC_BEFORE_WELCOME:
            self._send(self._numeric("451", "You have not registered" if handler else
                                     "You have not registered (%s)" % command[:20]))
            return None
        if handler is None:
            self._send(self._numeric("421", command[:32], "Unknown command"))
            return None
        self._asking = _asking(command, params[0] if params else None)
        try:
            return handler(params)
        finally:
            self._asking, self._quiet = None, False

    def _run(self, frame, command=None, argument=None, channel=None):
        """Carry out a protocol frame as if the client had sent it; return a reason to stop, or None.

        command and argument (and the channel, if it is not the argument) name what
        the client asked, for the numerics of the answer and of any error.
        """
        if command is not None:
            self._asking = _asking(command, argument, channel)
        return self.session._handle_frame(frame)

    def _channel_room(self, channel):
        """Return the room a channel names, or None after answering 403 (it is no channel name)."""
        if channel.startswith("#") and len(channel) > 1:
            return channel[1:]
        self._send(self._numeric("403", channel[:40] or "*", "No such channel"))
        return None

    def _send(self, data):
        if data:
            self.session.outbox.put(data)

    def _numeric(self, code, *params):
        return irc_line(IRC_SERVER, code, self.nick, *params)

    def _need(self, params, count, command):
        """Return True if params has count of them; else answer 461."""
        if len(params) >= count and all(params[:count]):
            return True
        self._send(self._numeric("461", command, "Not enough parameters"))
        return False

    def irc_CAP(self, params):
        sub = params[0].upper() if params else ""
        if sub == "LS":
            self.capping = not self.registered
            self._send(irc_line(IRC_SERVER, "CAP", self.nick, "LS", " ".join(IRC_CAPS)))
        elif sub == "LIST":
            self._send(irc_line(IRC_SERVER, "CAP", self.nick, "LIST", " ".join(sorted(self.caps))))
        elif sub == "REQ" and len(params) > 1:
            self.capping = not self.registered
            self._request_caps(params[1])
        elif sub == "END":
            self.capping = False
            return self._register()
        else:
            self._send(self._numeric("410", sub or "*", "Invalid CAP command"))
        return None

    def _request_caps(self, wanted):
        asked = wanted.split()
        if not asked or any(cap.lstrip("-") not in IRC_CAPS for cap in asked):
            self._send(irc_line(IRC_SERVER, "CAP", self.nick, "NAK", wanted))
            return
        for cap in asked:
            if cap.startswith("-"):
                self.caps.discard(cap[1:])
            else:
                self.caps.add(cap)
        self.encoder = irc_encode_timed if "server-time" in self.caps else irc_encode
        if self._receiver is not None:  # asked for after registering
            self._receiver.encoder = self.encoder
            self.session.hub.set_echo(self.session.seat, self.echo)
        self._send(irc_line(IRC_SERVER, "CAP", self.nick, "ACK", wanted))

    def irc_PASS(self, params):
        if self.registered:
            self._send(self._numeric("462", "You may not reregister"))
        elif self._need(params, 1, "PASS"):
            self.password = params[0]

    def irc_NICK(self, params):
        if not params or not params[0]:
            self._send(self._numeric("431", "No nickname given"))
            return None
        if self.registered:
            return self._run({"type": "nick", "name": name_from_irc(params[0])})
        try:
            check_name(name_from_irc(params[0]))
        except ProtocolError as error:
            self._send(self._numeric("432", params[0][:40], "Erroneous nickname: " + error.text))
            return None
        self.wanted = params[0]
        return self._register()

    def irc_USER(self, params):
        if self.registered:
            self._send(self._numeric("462", "You may not reregister"))
        elif len(params) < 4 or not params[0] or not params[3]:
            self._send(self._numeric("461", "USER", "Not enough parameters"))
        else:
            self.user = (params[0], params[3])
            return self._register()
        return None

    def _register(self):
        """Join the chat once NICK, USER and any CAP negotiation are done."""
        if self.registered or self.capping or self.wanted is None or self.user is None:
            return None
        hello = {"type": "hello", "name": name_from_irc(self.wanted), "version": PROTOCOL_VERSION}
        if self.session.hub.password is not None:
            hello["password"] = self.password
        elif self.password:  # on a chat with no password, PASS is the client's identity token
            hello["identity"] = hashlib.sha256(self.password.encode("utf-8")).hexdigest()
        reason = self._run(hello, "NICK", self.wanted)
        self.registered = self.session.seat is not None
        return reason

    def irc_PING(self, params):
        if not params:
            self._send(self._numeric("409", "No origin specified"))
        else:
            self._send(irc_line(IRC_SERVER, "PONG", IRC_SERVER, params[0]))

    def irc_PONG(self, params):
        return None  # any line is a sign of life: the read loop has noted it

    def irc_QUIT(self, params):
        return self._run({"type": "bye", "message": params[0]} if params else {"type": "bye"})

    def irc_JOIN(self, params):
        if not self._need(params, 1, "JOIN"):
            return None
        if params[0] == "0":
            return self._part(["#" + room for room in self.channels.values()])
        def join(room):  # already there: IRC says nothing
            return None if name_key(room) in self.channels else {"type": "join", "room": room}
        return self._each_channel(params[0].split(","), "JOIN", join)

    def irc_PART(self, params):
        if self._need(params, 1, "PART"):
            return self._part(params[0].split(","), params[1] if len(params) > 1 else None)
        return None

    def _part(self, channels, message=None):
        def leave(room):
            return {"type": "leave", "room": room, "message": message} if message else {"type": "leave", "room": room}
        return self._each_channel(channels, "PART", leave)

    def _each_channel(self, channels, command, frame_for):
        """Run frame_for(room) for each channel named (403 for what is no channel, nothing where it
        gives None); stop at a reason to."""
        for channel in channels[:MAX_ROOMS_PER_USER]:
            room = self._channel_room(channel)
            frame = room and frame_for(room)
            reason = frame and self._run(frame, command, channel)
            if reason:
                return reason
        return None

    def irc_PRIVMSG(self, params):
        return self._message(params, "PRIVMSG")

    def irc_NOTICE(self, params):
        self._quiet = True  # a NOTICE is never answered, errors included
        return self._message(params, "NOTICE")

    def _message(self, params, command):
        if not params or not params[0]:
            self._send(None if self._quiet else self._numeric("411", "No recipient given (%s)" % command))
            return None
        text, action = (params[1] if len(params) > 1 else ""), False
        if text.startswith("\x01"):  # CTCP: ACTION is /me; the server answers the others itself
            inner = text.strip("\x01")
            if not inner.upper().startswith("ACTION"):
                if not self._quiet:  # a NOTICE carries CTCP answers, which are never answered
                    self._ctcp(params[0].split(",")[0], inner)
                return None
            text, action = inner[7:], True
        text = _IRC_FORMATTING.sub("", text)
        if not text.strip():
            self._send(None if self._quiet else self._numeric("412", "No text to send"))
            return None
        for target in params[0].split(",")[:4]:
            reason = self._say(target, text, action)
            if reason:
                return reason
        return None

    def _ctcp(self, target, request):
        """Answer a CTCP request to a person in their stead: their client may be no IRC client at all."""
        if target.startswith("#"):
            return
        word, _, argument = request.partition(" ")
        answers = {"VERSION": "LocalChat %s (the server answers for %s)" % (__version__, target),
                   "PING": argument, "TIME": time.strftime("%a %b %d %H:%M:%S %Y"),
                   "CLIENTINFO": "ACTION CLIENTINFO PING TIME VERSION"}
        answer = answers.get(word.upper())
        if answer is not None:
            self._send(irc_line(_irc_mask(name_from_irc(target)), "NOTICE", self.nick,
                                "\x01%s %s\x01" % (word.upper(), answer) if answer else "\x01%s\x01" % word.upper()))

    def _say(self, target, text, action):
        frame = {"type": "say", "text": text}
        if action:
            frame["action"] = True
        elif self._quiet:
            frame["notice"] = True
        if target.startswith("#"):
            frame["room"] = self._channel_room(target)
            if frame["room"] is None:
                return None
        else:
            frame["to"] = name_from_irc(target)
            if irc_nick(frame["to"]).lower() != target.lower() and not self._quiet:
                # "d.o.t" for d|o|t: it would arrive, but the answers would come from another nick
                self._send(self._numeric("401", target, "No such nick: on IRC, %s is called %s"
                                         % (frame["to"], irc_nick(frame["to"]))))
                return None
        return self._run(frame, "NOTICE" if self._quiet else "PRIVMSG", target)

    def irc_TOPIC(self, params):
        if not self._need(params, 1, "TOPIC"):
            return None
        if self._not_on(params[0]):
            return None
        frame = {"type": "topic", "room": params[0][1:]}
        if len(params) > 1:
            frame["topic"] = params[1] or None
        return self._run(frame)

    def irc_NAMES(self, params):
        if not params:
            self._send(self._numeric("366", "*", "End of /NAMES list"))
            return None
        for channel in params[0].split(",")[:MAX_ROOMS_PER_USER]:
            if not channel.startswith("#") or len(channel) < 2:  # no channel, nobody in it
                self._send(self._numeric("366", channel[:40] or "*", "End of /NAMES list"))
                continue
            reason = self._run({"type": "users", "room": channel[1:]}, "NAMES", channel)
            if reason:
                return reason
        return None

    def irc_WHO(self, params):
        mask = params[0] if params else "*"
        if mask.startswith("#") and len(mask) > 1:
            return self._run({"type": "users", "room": mask[1:]}, "WHO", mask)
        return self._run({"type": "users"}, "WHO", mask)

    def irc_WHOIS(self, params):
        if not params or not params[-1]:
            self._send(self._numeric("431", "No nickname given"))
            return None
        return self._run({"type": "users"}, "WHOIS", params[-1].split(",")[0])

    def irc_WHOWAS(self, params):
        if self._need(params, 1, "WHOWAS"):
            self._send(self._numeric("406", params[0], "There was no such nickname")
                       + self._numeric("369", params[0], "End of WHOWAS"))

    def irc_ISON(self, params):
        if self._need(params, 1, "ISON"):
            return self._run({"type": "users"}, "ISON", " ".join(params))
        return None

    def irc_USERHOST(self, params):
        if self._need(params, 1, "USERHOST"):
            return self._run({"type": "users"}, "USERHOST", " ".join(params[:5]))
        return None

    def irc_LIST(self, params):
        wanted = params[0] if params and params[0].startswith("#") else None  # LIST #a,#b: those only
        return self._run({"type": "rooms"}, "LIST", wanted)

    def irc_AWAY(self, params):
        if params and params[0].strip():
            return self._run({"type": "away", "text": _IRC_FORMATTING.sub("", params[0])})
        return self._run({"type": "back"})

    def irc_INVITE(self, params):
        if not self._need(params, 2, "INVITE"):
            return None
        if self._not_on(params[1]):
            return None
        return self._run({"type": "invite", "name": name_from_irc(params[0]), "room": params[1][1:]},
                         "INVITE", params[0], params[1])

    def _not_on(self, channel):
        """Answer 403 (no such channel) or 442 (not on it) and return True, unless we are on the channel."""
        if channel.startswith("#") and name_key(channel[1:]) in self.channels:
            return False
        if not channel.startswith("#") or not self.session.hub.has_room(channel[1:]):
            self._send(self._numeric("403", channel[:40] or "*", "No such channel"))
        else:
            self._send(self._numeric("442", channel, "You're not on that channel"))
        return True

    def irc_KICK(self, params):
        if not self._need(params, 2, "KICK") or self._not_on(params[0]):
            return None
        for nick in params[1].split(",")[:4]:
            frame = {"type": "kick", "name": name_from_irc(nick)}
            if len(params) > 2 and params[2].strip():
                frame["reason"] = params[2]
            reason = self._run(frame, "KICK", nick, params[0])
            if reason:
                return reason
        return None

    def irc_MODE(self, params):
        if not self._need(params, 1, "MODE"):
            return None
        target = params[0]
        if not target.startswith("#"):
            if name_key(name_from_irc(target)) != name_key(name_from_irc(self.nick)):
                self._send(self._numeric("502", "Can't change mode for other users"))
            else:
                self._send(self._numeric("221", "+i"))
            return None
        if self._not_on(target):
            return None
        if len(params) == 1:
            self._send(self._numeric("324", target, "+n"))
            return None
        return self._channel_modes(target, params[1], params[2:])

    def _channel_modes(self, channel, modes, arguments):
        """Carry out +b/-b (bans by name or address) and +o/-o (operators); answer the rest."""
        adding, arguments = True, list(arguments)
        for char in modes[:8]:
            if char in "+-":
                adding = char == "+"
            elif char in "bo" and not arguments:
                if char == "b":
                    self._send(self._numeric("368", channel, "End of channel ban list"))
            elif char == "n":
                continue  # always on: only a channel's people speak in it
            elif char in "bo":
                argument = arguments.pop(0)
                reason = self._run(_irc_mode_frame(char, adding, argument), "MODE", argument, channel)
                if reason:
                    return reason
            else:
                self._send(self._numeric("472", char, "is unknown mode char to me"))
        return None

    def irc_KILL(self, params):
        self._send(self._numeric("481", "Permission Denied- You're not an IRC operator"))

    def irc_OPER(self, params):
        self._send(self._numeric("491", "No O-lines for your host: operators are named by the chat's owner"))

    def irc_MOTD(self, params):
        self._send(self._motd())

    def irc_LUSERS(self, params):
        self._send(self._lusers(self.session.hub.count()))

    def irc_VERSION(self, params):
        self._send(self._numeric("351", "LocalChat-%s." % __version__, IRC_SERVER, "LocalChat, one file for one network")
                   + self._isupport())

    def irc_TIME(self, params):
        self._send(self._numeric("391", IRC_SERVER, time.strftime("%A %d %B %Y -- %H:%M:%S %z")))

    # -- what the hub delivers (with the hub's lock held) ---------------------------

    def deliver_locked(self, outbox, event):
        """What IrcReceiver's fast path leaves: each connection's own (the hub's lock held)."""
        fields = event.fields
        kind = fields["type"]
        if fields.get("replay") or kind not in _IRC_SHARED or (kind == "topic" and not fields.get("by")):
            data = self.encode_own(fields)  # a reply, or history
        elif kind == "away":
            data = self._away_locked(fields)
        elif kind == "message":  # a direct message
            data = self._direct_locked(outbox, event)
        else:
            if kind == "renamed" and fields["old"] == self.me:
                self.me, self.nick = fields["name"], irc_nick(fields["name"])
            if kind == "left" and fields.get("room") and fields["name"] == self.me:
                self.channels.pop(name_key(fields["room"]), None)
            data = event.encoded(self._whole_encoder())
        if data:
            outbox.push_locked(data)

    def _whole_encoder(self):
        return irc_encode_whole_timed if "server-time" in self.caps else irc_encode_whole

    def _direct_locked(self, outbox, event):
        """Queue a direct message: its line, or for its sender 301 if it waits, and the echo if asked for.

        The line is encoded once per event (Event.encoded), and queued as a frame of its
        own: a message the store could not keep is withdrawn by its bytes, these too.
        """
        fields = event.fields
        line = event.encoded(self._whole_encoder())
        if fields["from"] == self.me:
            if fields.get("away") is not None and not fields.get("notice"):  # the answer to a message to somebody away
                outbox.push_locked(self._numeric("301", irc_nick(fields["to"]), fields["away"]))
            if not self.echo:
                return b""
        outbox.push_locked(line)
        return b""

    def history_shown_locked(self, outbox):
        """A page of replayed history is all out: end it with a notice (clients that ignore server-time
        show it at the time it arrives: the notices tell history from what is said now)."""
        if self._replaying is not None:
            channel, self._replaying = self._replaying, None
            outbox.push_locked(irc_line(IRC_SERVER, "NOTICE", channel, "End of the messages said before you came."))

    def _away_locked(self, fields):
        if fields["name"] != self.me:
            return None
        if fields.get("text"):
            return self._numeric("306", "You have been marked as being away")
        return self._numeric("305", "You are no longer marked as being away")

    def encode_own(self, fields):
        """Return the lines of an event or reply for this connection alone."""
        render = getattr(self, "_own_" + fields["type"], None)
        return render(fields) if render is not None else b""

    def _own_message(self, fields):  # a replayed one: history, or a direct message that waited
        target = _irc_target(fields) if fields.get("room") else self.nick
        data = b""
        if self._replaying != target:
            self._replaying = target
            data += irc_line(IRC_SERVER, "NOTICE", target, "Messages said before you came, with the times "
                             "they were said:" if fields.get("room") else "Messages that waited for you:")
        return data + self._replayed(fields)

    def _replayed(self, fields):
        """A message said earlier: its time in a server-time tag, or at the start of its text."""
        if "server-time" in self.caps:
            return _irc_lines(fields, True)
        return b"".join(_irc_message(fields, "[%s] " % _history_time(fields.get("ts"))))

    def _own_welcome(self, fields):
        self.me, self.nick = fields["name"], irc_nick(fields["name"])
        name = printable(str(fields.get("server")), 60)
        return b"".join([
            self._numeric("001", "Welcome to LocalChat on %s, %s" % (name, self.nick)),
            self._numeric("002", "Your host is %s, running LocalChat %s" % (IRC_SERVER, __version__)),
            self._numeric("003", "This server is the chat of %s" % name),
            self._numeric("004", IRC_SERVER, "LocalChat-" + __version__, "i", "bno"),
            self._isupport(),
            self._lusers(len(fields.get("users") or ())),
            self._motd(),
        ])

    def _isupport(self):
        limits = self.session.hub.limits
        tokens = ["AWAYLEN=%d" % MAX_AWAY_CHARS, "CASEMAPPING=ascii", "CHANLIMIT=#:%d" % limits.max_rooms,
                  "CHANMODES=b,,,n", "CHANNELLEN=%d" % (MAX_ROOM_CHARS + 1), "CHANTYPES=#",
                  "KICKLEN=%d" % MAX_TOPIC_CHARS, "MAXTARGETS=4", "NETWORK=LocalChat",
                  "NICKLEN=%d" % (MAX_NAME_CHARS + 1), "PREFIX=(o)@", "TOPICLEN=%d" % MAX_TOPIC_CHARS, "UTF8ONLY"]
        return self._numeric("005", *(tokens + ["are supported by this server"]))

    def _lusers(self, count):
        return (self._numeric("251", "There are %d users and 0 invisible on 1 servers" % count)
                + self._numeric("255", "I have %d clients and 0 servers" % count)
                + self._numeric("265", count, count, "Current local users %d, max %d" % (count, count))
                + self._numeric("266", count, count, "Current global users %d, max %d" % (count, count)))

    def _motd(self):
        lines = ["- %s Message of the day -" % IRC_SERVER,
                 "- This is LocalChat: its rooms are channels. /list shows them (irssi: /list -yes), /join #name joins one.",
                 "- Joining a channel replays what was said there before you came.",
                 "- The same chat is open to LocalChat's window, its line client, and nc."]
        return (self._numeric("375", lines[0]) + b"".join(self._numeric("372", line) for line in lines[1:])
                + self._numeric("376", "End of /MOTD command."))

    def _own_room(self, fields):
        channel = "#" + fields["room"]
        self.channels[name_key(fields["room"])] = fields["room"]
        lines = [irc_line(_irc_mask(self.me), "JOIN", channel)]
        lines += self._topic_lines(channel, fields)
        lines += self._names(channel, fields)
        return b"".join(lines)

    def _names(self, channel, fields):
        ops = set(fields.get("ops") or ())
        nicks = [("@" if name in ops else "") + irc_nick(name) for name in fields.get("users") or ()]
        lines, batch, size = [], [], 0
        room = IRC_MAX_LINE_BYTES - 80 - len(channel.encode("utf-8"))
        for nick in nicks:
            if batch and size + len(nick.encode("utf-8")) + 1 > room:
                lines.append(self._numeric("353", "=", channel, " ".join(batch)))
                batch, size = [], 0
            batch.append(nick)
            size += len(nick.encode("utf-8")) + 1
        if batch:
            lines.append(self._numeric("353", "=", channel, " ".join(batch)))
        return lines + [self._numeric("366", channel, "End of /NAMES list")]

    def _own_users(self, fields):
        command, argument, _ = self._asking or ("NAMES", None, None)
        if command == "NAMES":
            return b"".join(self._names("#" + fields["room"], fields)) if fields.get("room") else b""
        present = {name_key(name): name for name in fields.get("users") or ()}
        away = fields.get("away") or {}
        if command == "WHO":
            return self._who(argument, fields, present, away)
        if command == "WHOIS":
            return self._whois(argument, present, away)
        found = [present[key] for key in (name_key(name_from_irc(nick)) for nick in argument.split()) if key in present]
        if command == "ISON":
            return self._numeric("303", " ".join(irc_nick(name) for name in found))
        return self._numeric("302", " ".join("%s=%s%s@%s" % (irc_nick(name), "-" if name in away else "+", "u",
                                                             IRC_HOST) for name in found))

    def _who(self, mask, fields, present, away):
        ops = set(fields.get("ops") or ())
        if mask.startswith("#"):
            names, channel = fields.get("users") or [], mask
        else:
            pattern = mask.lower() if mask != "0" else "*"
            names = [name for name in present.values() if fnmatch.fnmatchcase(irc_nick(name).lower(), pattern)]
            channel = "*"
        lines = [self._numeric("352", channel, "u", IRC_HOST, IRC_SERVER, irc_nick(name),
                               ("G" if name in away else "H") + ("@" if name in ops else ""), "0 " + name)
                 for name in names[:500]]
        return b"".join(lines) + self._numeric("315", mask, "End of /WHO list")

    def _whois(self, nick, present, away):
        name = present.get(name_key(name_from_irc(nick)))
        if name is None:
            return self._numeric("401", nick, "No such nick/channel") + self._numeric("318", nick, "End of /WHOIS list")
        shown = irc_nick(name)
        lines = [self._numeric("311", shown, "u", IRC_HOST, "*", name),
                 self._numeric("312", shown, IRC_SERVER, "LocalChat")]
        if name in away:
            lines.append(self._numeric("301", shown, away[name]))
        return b"".join(lines) + self._numeric("318", shown, "End of /WHOIS list")

    def _own_rooms(self, fields):
        lines = [self._numeric("321", "Channel", "Users  Name")]
        wanted = self._asking[1] if self._asking else None
        keys = None if wanted is None else {name_key(channel[1:]) for channel in wanted.split(",")}
        for room in fields.get("rooms") or ():
            if keys is not None and name_key(room["name"]) not in keys:
                continue
            lines.append(self._numeric("322", "#" + room["name"], room.get("users", 0), room.get("topic") or ""))
        return b"".join(lines) + self._numeric("323", "End of /LIST")

    def _own_topic(self, fields):  # the answer to TOPIC #room
        channel = "#" + fields["room"]
        if fields.get("topic"):
            return b"".join(self._topic_lines(channel, fields))
        return self._numeric("331", channel, "No topic is set")

    def _topic_lines(self, channel, fields):
        """Return 332 with the topic and, when it is known, 333 with who set it and when."""
        if not fields.get("topic"):
            return []
        lines = [self._numeric("332", channel, fields["topic"])]
        if fields.get("set_by") and isinstance(fields.get("set_at"), (int, float)):
            lines.append(self._numeric("333", channel, _irc_mask(fields["set_by"]), int(fields["set_at"])))
        return lines

    def _own_error(self, fields):
        return b"".join(self._error_lines(fields.get("code"), fields.get("text") or "", fields.get("fatal")))

    def _error_lines(self, code, text, fatal):
        command, argument, channel = self._asking or (None, None, None)
        numeric = _IRC_ERRORS.get(code)
        if code == "not_in_room" and command in ("PRIVMSG", "NOTICE"):
            numeric = "404"
        if code == "already_in_room" and command == "INVITE":
            lines = [self._numeric("443", argument, channel, "is already on channel")]
        elif code == "not_in_room" and command in ("NAMES", "WHO"):
            lines = [self._numeric("366" if command == "NAMES" else "315", argument,
                                   "End of /%s list" % command)]
        elif code == "already_in_room" or (self._quiet and not fatal):
            lines = []
        elif numeric in ("433", "432"):
            lines = [self._numeric(numeric, argument or "*", text)]
        elif numeric in ("403", "404", "405", "442", "482"):
            lines = [self._numeric(numeric, channel or argument or "*", text)]
        elif numeric == "401":
            lines = [self._numeric(numeric, argument or "*", text)]
        elif code == "bad_utf8":  # IRCv3 standard replies, for UTF8ONLY
            lines = [irc_line(IRC_SERVER, "FAIL", command or "*", "INVALID_UTF8", text)]
        elif numeric is not None:
            lines = [self._numeric(numeric, text)]
        else:
            lines = [irc_line(IRC_SERVER, "NOTICE", self.nick, text)]
        if fatal:
            lines.append(irc_line(None, "ERROR", "Closing Link: %s" % text))
        return lines

    def _own_invite(self, fields):
        channel = "#" + fields["room"]
        if fields["to"] == self.me:
            return irc_line(_irc_mask(fields["from"]), "INVITE", self.nick, channel)
        return self._numeric("341", irc_nick(fields["to"]), channel)

    def _own_bye(self, fields):
        return irc_line(None, "ERROR", "Closing Link: %s" % (fields.get("text") or "Goodbye."))

    def _own_ping(self, fields):
        return irc_line(None, "PING", IRC_SERVER)

    def _own_pong(self, fields):
        return irc_line(IRC_SERVER, "PONG", IRC_SERVER, str(fields.get("token", IRC_SERVER)))

    def _own_notice(self, fields):
        return irc_line(IRC_SERVER, "NOTICE", self.nick, fields.get("text") or "")


def _asking(command, argument, channel=None):
    """Return what an IRC client asked: (command, argument, the channel it concerns)."""
    if channel is None and isinstance(argument, str) and argument.startswith("#"):
        channel = argument
    return command, argument, channel


def _irc_mode_frame(char, adding, argument):
    """Return the protocol frame of MODE #room +b/-b MASK or +o/-o NICK."""
    if char == "o":
        return {"type": "op" if adding else "deop", "name": name_from_irc(argument)}
    nick, _, host = argument.partition("!")
    host = host.partition("@")[2]
    target = host if nick in ("", "*") and host not in ("", "*") else name_from_irc(nick)
    return {"type": "ban" if adding else "unban", "target": target}


def _history_time(ts):
    """Return when a replayed message was sent, for a client with no server-time: 14:05, or with its date."""
    if not isinstance(ts, (int, float)):
        return "?"
    moment = time.localtime(ts)
    if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M", moment)
    return time.strftime("%Y-%m-%d %H:%M", moment)


# -- Text: nc, telnet, PuTTY's raw mode, openssl s_client ------------------------------
#
# A person types: the first line is a name (then, on a chat with a password, the
# password), then each line is a message to the current room, and /commands work as
# in the line client. Events come back as the lines the line client prints.

TEXT_HELLO_TIMEOUT_S = 300.0  # a person at nc has this long to type a name (and a password)
TEXT_MAX_LINE_BYTES = MAX_TEXT_BYTES  # one typed line is one message
# Telnet's commands start with IAC (0xFF, never in UTF-8 text):
_TELNET_OPTION_VERBS = frozenset([251, 252, 253, 254])  # WILL, WON'T, DO, DON'T: one option byte follows
_TELNET_SB = 250                      # a subnegotiation runs from IAC SB to IAC SE (0xFF 0xF0)


def text_encode(fields):
    """The text door's encoder: an event as the line a person at nc reads, with its time and room."""
    kind = fields["type"]
    if kind == "message":
        text = message_line(fields)
    elif kind in ("ping", "pong", "synced", "challenge"):
        return b""
    else:
        text = notice_text(fields)
        if not text:
            return b""
        text = ("! " if kind in ("error", "bye") else "* ") + text
    stamp = "[%s] " % (_history_time(fields.get("ts")) if fields.get("replay") else clock(fields.get("ts")))
    return (stamp + text.replace("\n", "\r\n" + " " * len(stamp)) + "\r\n").encode("utf-8")


def _drop_telnet_commands(buffer):
    """Delete telnet's option negotiation from a bytearray, in place; leave an unfinished one at the end."""
    start = buffer.find(b"\xff")
    while start >= 0:
        if start + 1 >= len(buffer):
            return
        verb = buffer[start + 1]
        if verb in _TELNET_OPTION_VERBS:
            if start + 2 >= len(buffer):
                return
            end = start + 3
        elif verb == _TELNET_SB:
            close = buffer.find(b"\xff\xf0", start + 2)
            if close < 0:
                if len(buffer) - start > 1024:  # an endless subnegotiation: no telnet sends one
                    del buffer[start:]
                return
            end = close + 2
        else:  # IAC IAC (a 0xFF byte, never UTF-8), IAC IP (Ctrl+C), IAC AYT...: two bytes
            end = start + 2
        del buffer[start:end]
        start = buffer.find(b"\xff", start)


class TextDoor(Door):
    """People at nc or telnet: a name, then lines; the door every connection no other door claims comes to."""

    name = "text"
    encode = staticmethod(text_encode)
    for_silence = True                      # asked for a name after SILENT_PROMPT_S of silence
    hello_timeout_s = TEXT_HELLO_TIMEOUT_S  # a person types slower than a program
    password_in_hello = True                # asked for after the name: refused in clear without TLS
    retries_hello = True                    # a name that is taken is asked for again
    reclaims = True                         # nc has no resume token: a lost name comes back from the same address
    answers_pings = False                   # a person reading is silent, not gone

    @staticmethod
    def claims(first):
        return True  # the last door: whatever nobody else claims

    def __init__(self):
        self.session = None
        self.me = None  # the name the welcome gave
        self.name = None  # the name typed, while the password is asked for
        self.where = {"room": GENERAL_ROOM}  # where typed lines go: the room joined last
        self.rooms = set()  # keys of the rooms one is in
        self._skipping = False  # the rest of an overlong line is being dropped

    def greet(self, session):
        self.session = session
        self._tell("Welcome to LocalChat on %s. Type your name and press Enter:" % session.hub.server_name)

    def _tell(self, text, mark="*"):
        self.session.outbox.put(("%s %s\r\n" % (mark, text)).encode("utf-8"))

    def receiver(self, outbox):
        return DoorReceiver(outbox, self)

    def deliver_locked(self, outbox, event):
        """Runs with the hub's lock held: keep track of one's name and rooms, skip one's own echo."""
        fields = event.fields
        kind = fields["type"]
        if kind == "message" and fields.get("from") == self.me and not fields.get("replay") and \
                fields.get("room") and not fields.get("action"):
            return  # the line one typed is on one's screen already (a /msg or /me is shown as it went)
        data = event.encoded(text_encode)
        if kind == "welcome":
            self.me = fields["name"]
            data += ("* Type a line and press Enter to send it; /help lists the commands.\r\n").encode("utf-8")
        elif kind == "renamed" and fields["old"] == self.me:
            self.me = fields["name"]
        elif kind == "room":
            self.rooms.add(name_key(fields["room"]))
            self.where = {"room": fields["room"]}
            data += ("* Lines you type now go to %s.\r\n" % room_label(fields["room"])).encode("utf-8")
        elif kind == "left" and fields.get("room") and fields.get("name") == self.me:
            self.rooms.discard(name_key(fields["room"]))
            if name_key(self.where.get("room", "")) == name_key(fields["room"]):
                self.where = {"room": GENERAL_ROOM}
        if data:
            outbox.push_locked(data)

    def frames(self, buffer):
        _drop_telnet_commands(buffer)
        found = []
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end]).replace(b"\r", b"").replace(b"\x00", b"")
            del buffer[:end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > TEXT_MAX_LINE_BYTES:
                found.append(self._too_long())
                continue
            try:
                found.append({"type": "door", "line": line.decode("utf-8")})
            except UnicodeDecodeError:
                found.append(ProtocolError("bad_utf8", "That line was not UTF-8; set your terminal to UTF-8."))
        if len(buffer) > TEXT_MAX_LINE_BYTES:
            del buffer[:]
            self._skipping = True
            found.append(self._too_long())
        return found

    @staticmethod
    def _too_long():
        return ProtocolError("line_too_long", "That line was longer than %d bytes, so it was not sent."
                             % TEXT_MAX_LINE_BYTES)

    def handle(self, session, frame):
        line = frame.get("line")
        if not isinstance(line, str):
            raise ProtocolError("bad_field", 'A text line is missing.')
        if session.seat is None:
            return self._log_in(session, line)
        where = dict(self.where)
        action, value = parse_command(line, where, "chat")
        if action == "send":
            if value["type"] == "join" and name_key(value["room"]) in self.rooms:
                self.where = {"room": value["room"]}  # already there: what follows goes to it
                self._tell("Lines you type now go to %s." % room_label(value["room"]))
                return None
            return session._handle_frame(value)
        if action == "quit":
            return session._handle_frame({"type": "bye"})
        if action == "help":
            self._tell(value.replace("\n", "\r\n"))
        elif action == "send_file":
            self._tell("Files are shared from the window, the line client or the web page; here, shared files "
                       "show as addresses to open in a browser.", "!")
        elif action == "error":
            self._tell(value, "!")
        return None

    def _log_in(self, session, line):
        """The first line is the name; on a chat with a password, the next one is the password."""
        if self.name is None:
            name = line.strip()
            if not name:
                self._tell("Type your name and press Enter:")
                return None
            if name.lower() in ("/quit", "/exit"):
                return session._handle_frame({"type": "bye"})
            if session.hub.password is not None and not session._authenticated and (
                    session.channel is not None or session.server.clear_passwords):
                self.name = name
                self._tell("This chat has a password. Type it and press Enter (it shows as you type):")
                return None
            return session._handle_frame({"type": "hello", "name": name, "version": PROTOCOL_VERSION})
        name, self.name = self.name, None
        return session._handle_frame({"type": "hello", "name": name, "version": PROTOCOL_VERSION,
                                      "password": line})


# -- Web: the chat page over HTTP, live traffic over WebSocket ----------------------
#
# A browser asks for the page (GET /, its script, style, manifest and icon), then
# opens a WebSocket at /ws. Each WebSocket text message carries exactly one frame
# of protocol v1, so the page speaks the same JSON as every other client and the
# hub cannot tell them apart. HTTP is bounded: the request line and headers in
# HTTP_MAX_HEAD_BYTES and HTTP_MAX_HEADERS, a deadline for them, and keep-alive
# bounded in requests and idle time.

HTTP_MAX_HEAD_BYTES = 8 * 1024   # a request line and its headers
HTTP_MAX_HEADERS = 100           # headers in one request
HTTP_HEAD_TIMEOUT_S = 10.0       # a request's line and headers must all come within this (slowloris)
HTTP_KEEPALIVE_S = 15.0          # an idle keep-alive connection is closed after this
HTTP_MAX_REQUESTS = 100          # requests on one keep-alive connection
WS_ECHO_TIMEOUT_S = 120.0        # /ws/echo (--diagnostics only) may stay this long without a hello
HTTP_BODY_IDLE_S = 30.0          # an upload whose bytes stop coming this long is cut off (and forgotten)
FILE_CHUNK_BYTES = 128 * 1024    # a download is read and queued this much at a time ...
FILE_AHEAD_BYTES = 1024 * 1024   # ... while its connection owes less than this
FILE_WAIT_S = 0.25               # how often a download waiting for its connection looks again, if the
                                 # writer has not woken it (the server stops: it checks _gone())
FILE_SEND_BUFFER_BYTES = 256 * 1024  # the kernel's send buffer of a downloading connection: small enough
                                 # that a slow reader's progress shows every few seconds (the writer
                                 # hears of room in it only when a third or so is free), big enough for a LAN
FILE_BUDGET_SHARE = 0.5          # downloads queue only while all outboxes owe less than this share of
                                 # the send budget: stuck downloads never leave the chat's readers waiting
FILE_SECURITY_HEADERS = (        # a shared file is never a page of the chat's origin: no script, no frame
    ("Content-Security-Policy", "default-src 'none'; sandbox"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
_HTTP_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 5.6.2: a header's name, a method
WEB_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: "
     "blob:; connect-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


class WebResource(NamedTuple):
    """One file the page is made of: its bytes, gzipped, and the ETag that makes a reload cost nothing."""

    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def web_resource(text, content_type):
    body = text.encode("utf-8")
    return WebResource(body, gzip.compress(body, mtime=0), content_type,
                       '"%s"' % hashlib.sha256(body).hexdigest()[:20])


def web_resources():
    """Return {path: WebResource} of the page: made once, on first use."""
    global _WEB_RESOURCES
    if _WEB_RESOURCES is None:
        _WEB_RESOURCES = {
            "/": web_resource(WEB_PAGE_HTML, "text/html; charset=utf-8"),
            "/app.js": web_resource(WEB_PAGE_JS, "text/javascript; charset=utf-8"),
            "/app.css": web_resource(WEB_PAGE_CSS, "text/css; charset=utf-8"),
            "/manifest.webmanifest": web_resource(WEB_MANIFEST, "application/manifest+json; charset=utf-8"),
            "/icon.svg": web_resource(WEB_ICON_SVG, "image/svg+xml; charset=utf-8"),
        }
    return _WEB_RESOURCES


_WEB_RESOURCES = None


def ws_encode(fields):
    """The web door's encoder: a frame as one WebSocket text message; a goodbye also closes the WebSocket."""
    data = websocket_frame(WS_OP_TEXT, encode_frame(fields)[:-1])
    if fields.get("type") == "bye" or fields.get("fatal"):
        going = fields.get("type") == "bye" and fields.get("reason") == "shutdown"
        data += websocket_close_frame(WS_CLOSE_GOING_AWAY if going else
                                      WS_CLOSE_NORMAL if fields.get("type") == "bye" else WS_CLOSE_POLICY)
    return data


class HttpRequest(NamedTuple):
    method: str
    path: str
    version: str
    headers: dict  # lower-case name -> value (repeated headers joined with ", ")
    pairs: list    # (name, value) as they came, for the WebSocket handshake


def parse_http_head(head):
    """Return the HttpRequest of a request line and headers (bytes, no blank line), or raise ValueError."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not _HTTP_TOKEN.match(parts[0]) or not parts[1].startswith("/") or \
            parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError("a bad request line")
    if len(lines) - 1 > HTTP_MAX_HEADERS:
        raise OverflowError("too many headers")
    headers, pairs = {}, []
    for line in lines[1:]:
        name, colon, value = line.rstrip("\r").partition(":")
        if not colon or not _HTTP_TOKEN.match(name):
            raise ValueError("a bad header line")
        name, value = name.lower(), value.strip(" \t")
        pairs.append((name, value))
        headers[name] = headers[name] + ", " + value if name in headers else value
    return HttpRequest(parts[0], parts[1].partition("?")[0], parts[2], headers, pairs)


class WebDoor(Door):
    """Browsers: the chat page over HTTP, then protocol v1 over a WebSocket at /ws.

    One per connection, on the connection's thread. Until the upgrade it answers
    HTTP requests itself; after it, WebSocket text messages are protocol frames.
    """

    name = "web"
    encode = staticmethod(ws_encode)
    alpn = ("http/1.1",)  # every browser offers it over TLS: its idle spare connections are never prompted
    hello_timeout_s = HTTP_HEAD_TIMEOUT_S  # the first request's line and headers
    keepalive_s = HTTP_KEEPALIVE_S         # each request after it: to begin and end
    methods = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")

    @classmethod
    def claims(cls, first):
        if any(first.startswith(method) for method in cls.methods):
            return True
        return None if any(method.startswith(first) for method in cls.methods) else False

    def __init__(self):
        self.session = None
        self.reader = None  # the WebSocketReader, after the upgrade
        self.echo_endpoint = False  # /ws/echo (--diagnostics): messages come back as they are
        self.requests = 0
        self.receiving = False  # part of a request has come (a timeout then gets 408)
        self.pipelined = False  # more requests came behind the one being answered
        self.body = None  # the _UploadBody of a file arriving

    def greet(self, session):
        self.session = session

    # -- HTTP ------------------------------------------------------------------------

    def frames(self, buffer):
        found = []
        for _ in range(HTTP_MAX_REQUESTS + 1):  # each turn answers one request or stops
            if not buffer and (self.body is None or self.body.left):
                break
            if self.reader is not None:
                data = bytes(buffer)
                del buffer[:]
                return found + self._websocket(data)
            if self.body is not None:
                answer = self._receive_body(buffer)
                if answer is None:
                    break  # more of the file is to come
                return found + answer
            end, size = _head_end(buffer)
            self.receiving = True
            if end < 0:
                if len(buffer) > HTTP_MAX_HEAD_BYTES:
                    return found + self._refuse(431, "The request's headers are too long.")
                break
            head = bytes(buffer[:end])
            del buffer[:end + size]
            self.receiving = False
            # Over the send budget, wait as every reader does: an answer is bigger than its request.
            self.session.server.transport.wait_for_room(self.session._gone)
            answer = self._request(head, pipelined=bool(buffer))
            if answer:
                return found + answer
        return found

    def _request(self, head, pipelined=False):
        """Answer one request; return frames for the session ([bye] to close), or [] to read on.

        Requests sent before the last answer came (pipelined: no browser does it) get one
        answer, and the connection closes: a few bytes must not buy megabytes of answers.
        """
        if len(head) > HTTP_MAX_HEAD_BYTES:
            return self._refuse(431, "The request's headers are too long.")
        try:
            request = parse_http_head(head)
        except OverflowError:
            return self._refuse(431, "The request has too many headers.")
        except ValueError:
            return self._refuse(400, "That is not an HTTP request this server understands.")
        self.requests += 1
        if request.path.startswith("/upload/") and request.method in ("PUT", "POST"):
            return self._begin_upload(request)
        if request.headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in request.headers:
            return self._refuse(400, "This server takes no request bodies.")  # never read as the next request
        if request.path in ("/ws", "/ws/echo") and "upgrade" in request.headers:
            return self._upgrade(request)
        self.pipelined = pipelined
        if request.path.startswith("/files/") and request.method in ("GET", "HEAD"):
            return self._download(request)
        resource = web_resources().get(request.path)
        if resource is None and request.path != "/ws":
            return self._answer(request, 404, b"Not found. The chat is at /.\n")
        if request.method not in ("GET", "HEAD") or resource is None:
            allow = "GET" if resource is None else "GET, HEAD"
            return self._answer(request, 405, b"That method is not allowed here.\n", [("Allow", allow)],
                                close=request.method not in ("GET", "HEAD"))  # a body may follow: not read
        return self._serve(request, resource)

    def _serve(self, request, resource):
        if resource.etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
            return self._answer(request, 304, b"", [("ETag", resource.etag)])
        zipped = _accepts_gzip(request.headers.get("accept-encoding", ""))
        extra = [("ETag", resource.etag), ("Cache-Control", "no-cache"), ("Vary", "Accept-Encoding")]
        if zipped:
            extra.append(("Content-Encoding", "gzip"))
        return self._answer(request, 200, resource.gzipped if zipped else resource.body, extra,
                            content_type=resource.content_type)

    def _answer(self, request, status, body, extra=(), content_type="text/plain; charset=utf-8", close=False,
                source=None, security=WEB_SECURITY_HEADERS):
        """Send a response; return [bye] if the connection ends with it, else [] (keep-alive).

        `source` (a shared file: (file open for reading, its length), `body` then empty) is
        sent as the body instead; the caller closes the file.
        """
        close = close or request.version == "HTTP/1.0" or self.requests >= HTTP_MAX_REQUESTS or \
            "close" in request.headers.get("connection", "").lower() or self.pipelined
        head_only = request.method == "HEAD"
        length = len(body) if source is None else source[1]
        self._send_response(status, body, extra, content_type, close, head_only, length, security)
        if source is not None and not head_only and not self._send_file(source[0]):
            return [{"type": "bye"}]
        if close:
            return [{"type": "bye"}]
        self.session.extend_hello(self.keepalive_s)  # the next request has this long to begin and end
        return []

    def _refuse(self, status, sentence, extra=()):
        """Answer with a sentence and close; return [bye]."""
        self.session.outbox.put(_http_error(status, sentence, extra))
        log.info("%s: HTTP %d: %s", self.session.peer, status, sentence)
        return [{"type": "bye"}]

    def _send_response(self, status, body, extra, content_type, close, head_only, length, security):
        headers = [("Content-Type", content_type), ("Content-Length", str(length))]
        headers += list(extra) + list(security)
        headers.append(("Connection", "close") if close else
                       ("Keep-Alive", "timeout=%d, max=%d" % (self.keepalive_s, HTTP_MAX_REQUESTS)))
        self.session.outbox.put(_http_head(status, headers) + (b"" if head_only else body))

    # -- files ---------------------------------------------------------------------

    def _begin_upload(self, request):
        """A file's bytes are coming to a one-time address: check it, then receive them (see frames())."""
        files, hub = self.session.hub.files, self.session.hub
        length = request.headers.get("content-length", "").strip()
        if "transfer-encoding" in request.headers or not (length.isascii() and length.isdigit()):  # "²" is a digit
            return self._refuse(411, "Send the file with a Content-Length, as one request.")
        upload = hub.take_upload(request.path[len("/upload/"):])
        if upload is None or files is None:
            return self._refuse(404, "This upload address is unknown, used or expired: ask for a new one.")
        if length.lstrip("0") != str(upload.size).lstrip("0"):  # as text: int() refuses 5,000 digits
            return self._refuse(400, "The file's length is not the one asked for (%d bytes): ask again."
                                % upload.size)
        file_id = files.new_id()
        try:
            handle = files.open_part(file_id)
        except OSError as error:
            log.error("files: cannot write a file: %s", error)
            return self._refuse(507, "The server cannot store files now: its disk may be full.")
        self.body = _UploadBody(request, upload, file_id, handle, upload.size)
        self.receiving = True
        if "100-continue" in request.headers.get("expect", "").lower():
            self.session.outbox.put(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this
        self.session.extend_hello(HTTP_BODY_IDLE_S)
        return []

    def _receive_body(self, buffer):
        """Write what came of the file; return the answer once all of it is here, or None for more."""
        body = self.body
        take = min(len(buffer), body.left)
        if take:
            if len(body.head) < 16:
                body.head += bytes(buffer[:16 - len(body.head)])
            try:
                body.handle.write(buffer[:take])
            except OSError as error:
                log.error("files: cannot write a file: %s", error)
                self.close()
                return self._refuse(507, "The server could not store the file: its disk may be full.")
            del buffer[:take]
            body.left -= take
            self.session.extend_hello(HTTP_BODY_IDLE_S)  # a deadline for each stretch, not for the whole
        if body.left:
            return None
        return self._finish_upload()

    def _finish_upload(self):
        """Keep the file that came and announce it; answer 201, or say why not (nothing is left of it)."""
        body, self.body = self.body, None
        self.receiving = False
        hub, upload = self.session.hub, body.upload
        kind = file_type(upload.name, body.head)
        try:
            body.handle.flush()
            os.fsync(body.handle.fileno())  # on disk before anybody is told of it
            body.handle.close()
            hub.files.keep(body.file_id, upload.name, kind, upload.size)
        except OSError as error:
            log.error("files: cannot keep a file: %s", error)
            self._discard(body)
            return self._refuse(507, "The server could not store the file: its disk may be full.")
        try:
            event = hub.share_file(upload, body.file_id, kind)
        except ProtocolError as error:
            hub.files.forget(body.file_id)
            return self._refuse(409, error.text)
        hub.commit()  # the message is stored now, or withdrawn
        if event.withdrawn:
            hub.files.forget(body.file_id)
            return self._refuse(507, "The server could not store the message for the file; it was not shared.")
        log.info("%s shared %s (%s)", upload.user.name, printable(upload.name, 60), file_size_text(upload.size))
        answer = encode_frame({"id": event.fields["id"], "url": event.fields["file"]["url"]})
        return self._answer(body.request, 201, answer, content_type="application/json", close=True)

    def _download(self, request):
        """Send a shared file: 404 for any address that is not one (a guessed one, an expired one)."""
        files = self.session.hub.files
        parts = request.path.split("/")
        file_id = parts[2] if len(parts) > 2 else ""
        about = files.about(file_id) if files is not None else None
        source = files.open(file_id) if about is not None else None
        if source is None:
            return self._answer(request, 404, b"This file is unknown, or no longer kept by the server.\n")
        with source:
            etag = '"%s"' % file_id
            if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
                return self._answer(request, 304, b"", [("ETag", etag)], security=FILE_SECURITY_HEADERS)
            picture = about["type"] in PICTURE_TYPES
            extra = [("Content-Disposition", _content_disposition("inline" if picture else "attachment",
                                                                  about["name"])),
                     ("ETag", etag), ("Cache-Control", "private, max-age=31536000, immutable")]
            return self._answer(request, 200, b"", extra, content_type=about["type"],
                                source=(source, about["size"]), security=FILE_SECURITY_HEADERS)

    def _send_file(self, source):
        """Queue a file in pieces, never far ahead of what its reader takes; return False if it went away.

        A reader that takes bytes slowly is never dropped (see SocketWriter._count_sent);
        one that takes none for slow_reader_s is, as any stuck reader.
        """
        outbox, transport = self.session.outbox, self.session.server.transport
        try:
            self.session.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FILE_SEND_BUFFER_BYTES)
        except OSError:  # the system keeps its own size: progress shows less often, nothing else
            pass
        while True:
            if not self._sent_down_to(FILE_AHEAD_BYTES):
                return False
            transport.wait_for_room(self.session._gone, FILE_BUDGET_SHARE)
            if self.session._gone():
                return False
            try:
                chunk = source.read(FILE_CHUNK_BYTES)
            except OSError as error:  # removed while being sent: the length is wrong now, so close
                log.error("files: cannot read a file: %s", error)
                return False
            if not chunk:
                # All of it with the kernel before the keep-alive clock starts: a slow reader's
                # connection must not be closed under the file's last megabyte.
                return self._sent_down_to(0)
            outbox.put(chunk)

    def _sent_down_to(self, most):
        """Wait until the connection owes at most `most` bytes of what it was given; False if it ended first."""
        outbox = self.session.outbox
        while outbox.owed_pushed() > most:
            if self.session._gone():
                return False
            outbox.wait_for_sent(most, FILE_WAIT_S)  # a stuck reader is dropped as too slow
        return True

    def close(self):
        if self.body is not None:  # an upload cut short: nothing of it is kept
            body, self.body = self.body, None
            self._discard(body)

    def _discard(self, body):
        """Close an arriving file and remove it: nothing of it is kept.

        On a full disk close() fails again, flushing what the buffer held; it closes the
        descriptor all the same.
        """
        try:
            body.handle.close()
        except OSError:
            pass
        self.session.hub.files.forget(body.file_id)

    # -- WebSocket -----------------------------------------------------------------

    def _upgrade(self, request):
        echo = request.path == "/ws/echo"
        if echo and not self.session.server.diagnostics:
            return self._answer(request, 404, b"Not found. The chat is at /.\n")
        answer = websocket_handshake(request.method, request.pairs)
        if answer.status != 101:
            return self._refuse(answer.status, answer.sentence, answer.headers)
        self.session.outbox.put(_http_head(101, answer.headers))
        self.reader, self.echo_endpoint = WebSocketReader(), echo
        self.session.extend_hello(WS_ECHO_TIMEOUT_S if echo else self.session.server.hello_timeout)
        return []

    def _websocket(self, data):
        """Return the protocol frames (and ProtocolErrors) in bytes that came over the WebSocket."""
        found = []
        for event in self.reader.feed(data):
            if event.reply:
                self.session.outbox.put(event.reply)
            if event.kind == "text" and not self.echo_endpoint:
                found.append(self._parsed(event.data))
            elif event.kind in ("text", "binary") and self.echo_endpoint:
                opcode = WS_OP_TEXT if event.kind == "text" else WS_OP_BINARY
                self.session.outbox.put(websocket_frame(opcode, event.data.encode("utf-8") if event.kind == "text"
                                                        else event.data))
            elif event.kind == "binary":
                self.session.outbox.put(self.reader.begin_close(WS_CLOSE_UNSUPPORTED, "Text messages only."))
                return found + [{"type": "bye"}]
            elif event.kind == "close":
                # 1000: the page said goodbye. 1001 and the rest: a reload, a closed tab, a phone
                # asleep: the name waits for the page to come back (resume), as for a lost connection.
                return found + [{"type": "bye"} if event.code == WS_CLOSE_NORMAL else {"type": "bye", "reason": "lost"}]
            elif event.kind == "fail":
                log.info("%s: WebSocket failed (%d): %s", self.session.peer, event.code, event.reason)
                return found + [{"type": "bye"}]
        return found

    @staticmethod
    def _parsed(text):
        try:
            return parse_frame(text.encode("utf-8"))
        except ProtocolError as error:
            return error

    def idle(self):
        return self.reader is None and not self.receiving  # between keep-alive requests

    def encode_own(self, fields):
        if self.reader is None:  # still HTTP: a request that did not come in time gets 408
            if fields.get("code") == "hello_timeout" and self.receiving:
                return _http_error(408, "The request did not come in time.")
            if fields.get("code") == "tls_required":  # http:// on a TLS server
                return _http_error(400, fields.get("text", ""))
            return b""
        if self.reader.closing or self.echo_endpoint:
            return b""  # nothing may follow our close frame
        if fields.get("type") == "bye" or fields.get("fatal"):
            self.reader.closing = True
        return ws_encode(fields)


class _UploadBody:
    """A file arriving over HTTP: where it goes, and how much of it is still to come."""

    __slots__ = ("request", "upload", "file_id", "handle", "left", "head")

    def __init__(self, request, upload, file_id, handle, left):
        self.request, self.upload, self.file_id, self.handle, self.left = request, upload, file_id, handle, left
        self.head = b""  # its first bytes, which tell a picture


def _content_disposition(kind, name):
    """Return a Content-Disposition header's value for a file's name (RFC 6266: ASCII, then UTF-8)."""
    fallback = "".join(ch if " " <= ch < "\x7f" and ch not in '"\\%' else "_" for ch in name)
    return "%s; filename=\"%s\"; filename*=UTF-8''%s" % (kind, fallback, urllib.parse.quote(name, safe=""))


def _accepts_gzip(accept_encoding):
    """Tell whether an Accept-Encoding header takes gzip ("gzip;q=0" refuses it)."""
    for item in accept_encoding.lower().split(","):
        coding, _, parameters = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip"):
            return parameters.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _head_end(buffer):
    """Return (where the headers end, the length of the blank line), or (-1, 0) if not yet."""
    end = buffer.find(b"\r\n\r\n")
    bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))
    if bare >= 0:
        return bare, 2
    return (end, 4) if end >= 0 else (-1, 0)


def _http_error(status, sentence, extra=()):
    """Return a whole response that refuses with a sentence and closes the connection."""
    body = (sentence + "\n").encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return _http_head(status, headers + list(extra) + list(WEB_SECURITY_HEADERS) + [("Connection", "close")]) + body


def _http_head(status, headers):
    lines = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase)]
    lines += ["%s: %s" % pair for pair in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


DOORS = (JsonLinesDoor, WebDoor, IrcDoor, TextDoor)  # tried in order on a connection's first bytes; the last one takes the rest


class Session(socketserver.BaseRequestHandler):
    """One connection, whatever door it came in by: read frames, dispatch them by type to do_<type>.

    Runs on the connection's own thread. The hub delivers to the session's Outbox,
    from whichever thread holds the hub's lock.
    """

    seat = None  # the hub's Seat for this connection's user, once the hello is accepted
    channel = None  # the TlsChannel when the server uses TLS
    door = None  # the Door chosen by the first bytes (its encoder goes to the outbox)
    _recv_size = RECV_IDLE_BYTES  # what the next recv() asks for

    def setup(self):
        self.hub = self.server.hub
        self.peer = "%s:%s" % self.client_address[:2]
        self.address = self.client_address[0]  # for bans by address
        self._challenge = None  # (nonce, hello frame) while a password is asked for
        self._parting = None  # what a bye said, for the others
        self._authenticated = False
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # The writer sends on its own non-blocking duplicate, so this thread's reads
        # can keep a timeout while the writer never waits on a full socket.
        writer_sock = sock.dup()
        writer_sock.setblocking(False)
        self.outbox = self.server.transport.outbox(writer_sock)
        self._errors = RecentEvents(ERROR_WINDOW_S)
        self._silent_periods = 0
        self._opened_at = time.monotonic()
        self._hello_deadline = self._opened_at + self.server.hello_timeout
        self.server.add_session(self)

    def send_frame(self, fields):
        """Queue a frame meant for this connection only (takes the hub's lock)."""
        self.outbox.put(self.door.encode_own(fields) if self.door is not None else self.outbox.encode(fields))

    def handle(self):
        reason = "lost"
        try:
            first = self._open()
            reason = self._reader_loop(first) if isinstance(first, bytes) else first
        finally:
            self._end(reason)

    # -- reading ---------------------------------------------------------------

    def _open(self):
        """Start TLS if this server uses it; return the first plaintext bytes, or why to stop.

        The first byte tells a TLS client (a handshake record) from a plain one ("{"),
        so each gets a clear answer from a server of the other kind instead of a hang.
        """
        sock = self.request
        context = self.server.tls_context
        # Wait only a moment: a silent peer may be a person at nc (TLS clients speak first).
        silence_door = self.server.door_for_silence()
        sock.settimeout(min(self.server.hello_timeout, SILENT_PROMPT_S) if silence_door else self.server.hello_timeout)
        try:
            first = sock.recv(DOOR_SNIFF_BYTES, socket.MSG_PEEK)
        except socket.timeout:
            if silence_door and context is None:
                return b""  # the reader loop asks for a name
            if silence_door:
                self.door = silence_door()  # a person at nc on a TLS server: told so in words
                return self._on_protocol_error(self._tls_required())
            return self._on_protocol_error(ProtocolError("hello_timeout", "No hello came in time.", fatal=True))
        except OSError:
            return "lost"
        if not first:
            return "lost"
        if looks_like_tls(first[:1]) != (context is not None):
            if context is None:
                return self._on_protocol_error(ProtocolError(
                    "tls_not_used", "This server does not use encryption; connect without it.", fatal=True))
            door = self.server.door_for(first)
            self.door = door() if door is not None else None  # the refusal in the peer's own protocol
            return self._on_protocol_error(self._tls_required())
        if context is None:
            return b""
        return self._start_tls(context)

    def _tls_required(self):
        host, port = self.request.getsockname()[:2]
        return ProtocolError("tls_required", "This server encrypts its connections (TLS); connect with encryption "
                             "(nc users: openssl s_client -quiet -connect %s:%d; browsers: https://)." % (host, port),
                             fatal=True)

    def _start_tls(self, context):
        channel = TlsChannel(context, server_side=True)
        try:
            first = channel.handshake(self.request, self.server.hello_timeout)
        except (OSError, ValueError) as error:  # ssl.SSLError and socket.timeout are OSErrors
            log.info("%s: encrypted handshake failed: %s", self.peer, printable(str(error)))
            return "lost"
        self.channel = channel
        self.outbox.encrypt = channel.encrypt
        door = self.server.door_for_alpn(channel.alpn())
        if door is not None:  # a browser, known by what it agreed: its spare connections wait, never prompted
            self._choose(door)
        return first

    def _receive(self, sock):
        """Return the next plaintext bytes (maybe b"" while TLS records are incomplete), or None at the end."""
        raw = sock.recv(self._recv_size)
        if not raw:
            return None
        # Ask for more while reads come back full (a paste, a flood), little while idle.
        self._recv_size = min(RECV_BYTES, self._recv_size * 4) if len(raw) == self._recv_size else RECV_IDLE_BYTES
        if self.channel is None:
            return raw
        plaintext, _ = self.channel.decrypt(raw, keep_output=True)
        if self.channel.output_waiting():
            self.outbox.put(b"")  # the writer's next encrypt() sends what TLS owes the peer, in order
        return None if self.channel.closed and not plaintext else plaintext

    def _reader_loop(self, first=b""):
        """Read lines until the connection ends; return why it ended."""
        sock = self.request
        buffer = bytearray(first)
        reason = self._feed(buffer) if buffer else None
        while not reason:
            if self.seat is None:  # the hello has a deadline: a byte now and then must not hold a thread for ever
                sock.settimeout(max(0.01, self._wait_before_hello(buffer)))
            try:
                chunk = self._receive(sock)
            except socket.timeout:
                if self.door is None and not buffer and self._silence_door():
                    continue
                if self._on_silence():
                    continue
                return "timeout"
            except OSError:  # ssl.SSLError too: what came was not valid TLS
                return "lost"
            if chunk is None:
                return "lost"
            self._silent_periods = 0
            buffer += chunk
            reason = self._feed(buffer)
        return reason

    def _wait_before_hello(self, buffer):
        """Return the seconds to wait for bytes before the hello (or, when silent, before asking for a name)."""
        left = self._hello_deadline - time.monotonic()
        if self.door is None and not buffer and self.server.door_for_silence() is not None:
            return min(left, self._opened_at + SILENT_PROMPT_S - time.monotonic())
        return left

    def _silence_door(self):
        """The peer has said nothing: open the door for people at nc or telnet. Return True if there is one."""
        door = self.server.door_for_silence()
        if door is None or time.monotonic() < self._opened_at + SILENT_PROMPT_S - 0.05:
            return False
        self._choose(door)
        return True

    def _choose(self, door):
        self.door = door()
        self.outbox.encode = door.encode
        if door.hello_timeout_s is not None:
            self._hello_deadline = time.monotonic() + door.hello_timeout_s
        self.door.greet(self)

    def _feed(self, buffer):
        """Choose the door if need be, then handle each complete frame; return a reason to stop, or None."""
        if self.door is None:
            door = self.server.door_for(bytes(buffer[:DOOR_SNIFF_BYTES]))
            if door is None:
                return None  # it cannot tell yet: read on (the hello deadline still holds)
            self._choose(door)
        for item in self.door.frames(buffer):
            if isinstance(item, ProtocolError):
                reason = self._on_protocol_error(item)
            else:
                # Over the budget, stop reading: TCP then slows this sender down.
                self.server.transport.wait_for_room(self._gone)
                reason = self._handle_frame(item)
            if reason:
                return reason
        return None

    def _gone(self):
        """Return True once this connection is ending: stop waiting for the budget."""
        return self.outbox.closing or self.outbox.failed is not None or self.server.stopping

    def _handle_frame(self, frame):
        """Dispatch one frame to its do_<type> method; return a reason to stop, or None."""
        try:
            kind = frame["type"]
            handler = getattr(self, "do_" + kind, None)
            if handler is None:
                raise ProtocolError("unknown_type", "Unknown frame type '%s'." % printable(kind, 32))
            if self.seat is None and kind not in _BEFORE_HELLO:
                raise ProtocolError("hello_first", "Say hello first.")
            return handler(frame)
        except ProtocolError as error:
            return self._on_protocol_error(error)

    def _on_silence(self):
        """The read timed out: ping once, then give up. Return True to keep reading."""
        if self.seat is None and self.door is not None and self.door.idle():
            return False  # an idle keep-alive connection: its time is up, and nothing went wrong
        if self.seat is None:
            self._on_protocol_error(
                ProtocolError("hello_timeout", "No hello came in time; closing the connection.", fatal=True)
            )
            return False
        if not self.door.answers_pings:
            return True  # a person reading is silent, not gone (TCP keepalive finds a dead peer)
        self._silent_periods += 1
        if self._silent_periods > 1:
            return False
        self.send_frame({"type": "ping"})
        return True

    def _on_protocol_error(self, error):
        """Send an error frame; return a reason to stop if it was fatal or one too many."""
        if error.counts:
            if self._errors.add() > ERROR_LIMIT and not error.fatal:
                error = ProtocolError("too_many_errors", "Too many bad frames; closing the connection.", fatal=True)
        fields = {"type": "error", "code": error.code, "text": error.text}
        if error.ref is not None:
            fields["ref"] = error.ref
        if error.fatal:
            fields["fatal"] = True
            log.info("%s: %s (closing)", self.peer, error.code)
        self.send_frame(fields)
        return error.reason if error.fatal else None

    # -- frames ----------------------------------------------------------------

    def do_hello(self, frame):
        if self.seat is not None:
            raise ProtocolError("already_joined", "You have already joined as %s." % self.seat.name)
        if self.hub.password is not None and not self._authenticated and self.door.password_in_hello:
            self._check_password(frame.get("password"))
        if self.hub.password is not None and not self._authenticated:
            if self._challenge is not None:
                raise ProtocolError("auth_first", "Answer the password challenge first.", fatal=True)
            nonce = secrets.token_hex(16)
            self._challenge = (nonce, frame)
            self.send_frame({"type": "challenge", "nonce": nonce,
                             "text": "This server needs a password."})
            return None
        try:
            version = frame_field(frame, "version", int)
            if version < 1:
                raise ProtocolError("bad_version", "Protocol version %d is not supported." % version)
            self.seat = self.hub.join(
                self.door.receiver(self.outbox), frame_field(frame, "name", str), address=self.address,
                identity=self._identity(frame),
                resume=self._short_field(frame, "resume"),
                last_id=frame_field(frame, "last_id", int, required=False),
                rooms=frame_field(frame, "rooms", list, required=False),
                reclaim=self.door.reclaims, echo=self.door.echo,
            )
        except ProtocolError as error:
            # A refused hello ends the connection, unless the door asks a person for another name.
            error.fatal = not (self.door.retries_hello and error.code in ("name_taken", "bad_name"))
            raise
        self.request.settimeout(self.server.idle_ping)
        log.info("%s joined from %s", self.seat.name, self.peer)
        return None

    @staticmethod
    def _short_field(frame, key):
        """Return an optional short string field (a ref or token), or raise bad_field."""
        value = frame_field(frame, key, str, required=False)
        # isprintable() also refuses lone surrogates, which encode_frame could not send back.
        if value is not None and (len(value) > MAX_REF_CHARS or not value.isprintable()):
            raise ProtocolError("bad_field", 'The field "%s" may hold at most %d printable characters.'
                                % (key, MAX_REF_CHARS))
        return value

    def _identity(self, frame):
        """Return a digest of the client's identity token: the store never holds the token."""
        token = self._short_field(frame, "identity")
        return hashlib.sha256(token.encode("utf-8")).hexdigest()[:32] if token else None

    def _check_password(self, password):
        """Check a password a door carries itself (IRC's PASS, the text door's prompt); raise unless right.

        Such a password crosses the network as it is: without TLS it is refused, unless
        the server's owner allowed it (--allow-clear-passwords).
        """
        if self.channel is None and not self.server.clear_passwords:
            raise ProtocolError("password_in_clear", "This chat has a password, and this server does not encrypt "
                                "connections, so the password would cross the network in clear. Use LocalChat's "
                                "own window or line client, or ask the server's owner for --tls.", fatal=True)
        if not isinstance(password, str):
            raise ProtocolError("password_required", "This chat needs a password.", fatal=True)
        self._judge_password(password.encode("utf-8", "replace"), self.hub.password.encode("utf-8"))

    def do_door(self, frame):
        return self.door.handle(self, frame)

    def extend_hello(self, seconds):
        """Give the hello (or a door's next request) `seconds` from now: a door's own deadlines."""
        self._hello_deadline = time.monotonic() + seconds

    def do_auth(self, frame):
        """The answer to a password challenge: HMAC-SHA256(password, nonce), in hex."""
        if self._challenge is None or self.seat is not None:
            raise ProtocolError("bad_auth", "No password was asked for.")
        nonce, hello = self._challenge
        proof = frame_field(frame, "proof", str)
        self._judge_password(proof.encode("utf-8", "replace"), password_proof(self.hub.password, nonce).encode())
        return self.do_hello(hello)

    def _judge_password(self, given, expected):
        """Accept the password, or wait and refuse; an address that guessed too often is refused at once.

        Each connection gets one try and a second's wait; parallel connections from one
        address share WRONG_PASSWORDS_PER_MINUTE, so guessing stays slow.
        """
        if self.server.guessing(self.address):
            raise ProtocolError("auth_failed", "Too many wrong passwords from your computer: wait a minute, "
                                "then try again.", fatal=True)
        if not hmac.compare_digest(given, expected):
            log.info("%s: wrong password", self.peer)
            self.server.note_wrong_password(self.address)
            time.sleep(AUTH_FAILED_DELAY_S)  # this connection's own thread: slows guessing down
            raise ProtocolError("auth_failed", "Wrong password.", fatal=True)
        self._authenticated = True

    def do_say(self, frame):
        ref = self._short_field(frame, "ref")
        try:
            self.hub.say(self.seat, frame_field(frame, "text", str), ref,
                room=frame_field(frame, "room", str, required=False),
                to=self._short_field(frame, "to"),  # printable: a lone surrogate cannot be looked up in SQLite
                action=frame.get("action") is True,
                notice=frame.get("notice") is True,
            )
        except ProtocolError as error:
            error.ref = ref  # the client forgets a refused message instead of sending it again
            raise

    def do_upload(self, frame):
        ref = self._short_field(frame, "ref")
        try:
            ready = self.hub.offer_upload(self.seat, frame_field(frame, "name", str), frame_field(frame, "size", int),
                                          ref, room=frame_field(frame, "room", str, required=False),
                                          to=self._short_field(frame, "to"))
        except ProtocolError as error:
            error.ref = ref  # the client knows which file was refused
            raise
        if ready is not None:
            self.send_frame(ready)

    def do_users(self, frame):
        self.hub.users(self.seat, frame_field(frame, "room", str, required=False))

    def do_join(self, frame):
        self.hub.join_room(self.seat, frame_field(frame, "room", str))

    def do_leave(self, frame):
        self.hub.leave_room(self.seat, frame_field(frame, "room", str),
                            frame_field(frame, "message", str, required=False))

    def do_nick(self, frame):
        self.hub.rename(self.seat, frame_field(frame, "name", str))

    def do_invite(self, frame):
        self.hub.invite(self.seat, frame_field(frame, "name", str), frame_field(frame, "room", str))

    def do_rooms(self, frame):
        self.hub.rooms(self.seat)

    def do_topic(self, frame):
        room = frame_field(frame, "room", str)
        if "topic" in frame:
            self.hub.set_topic(self.seat, room, frame_field(frame, "topic", str, required=False))
        else:
            self.hub.topic(self.seat, room)

    def do_away(self, frame):
        self.hub.set_away(self.seat, frame_field(frame, "text", str, required=False) or "away")

    def do_back(self, frame):
        self.hub.set_away(self.seat, None)

    def do_kick(self, frame):
        self.hub.moderation.kick(self.seat, frame_field(frame, "name", str),
                                 frame_field(frame, "reason", str, required=False))

    def do_ban(self, frame):
        self.hub.moderation.ban(self.seat, frame_field(frame, "target", str),
                                frame_field(frame, "minutes", int, required=False),
                                frame_field(frame, "reason", str, required=False))

    def do_unban(self, frame):
        self.hub.moderation.unban(self.seat, frame_field(frame, "target", str))

    def do_mute(self, frame):
        self.hub.moderation.mute(self.seat, frame_field(frame, "name", str),
                                 frame_field(frame, "minutes", int, required=False),
                                 frame_field(frame, "reason", str, required=False))

    def do_unmute(self, frame):
        self.hub.moderation.unmute(self.seat, frame_field(frame, "name", str))

    def do_op(self, frame):
        self.hub.moderation.set_operator(self.seat, frame_field(frame, "name", str), True)

    def do_deop(self, frame):
        self.hub.moderation.set_operator(self.seat, frame_field(frame, "name", str), False)

    def do_history(self, frame):
        self.hub.history(self.seat,
            room_name=frame_field(frame, "room", str, required=False),
            with_name=self._short_field(frame, "with"),
            before=frame_field(frame, "before", int, required=False),
            limit=frame_field(frame, "limit", int, required=False) or MAX_PAGE,
        )

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
        """Leave: "quit", or "lost" when a door knows the peer means to come back (a reloading page)."""
        self._parting = frame.get("message")  # told to the others when the hub hears of the leaving
        return "lost" if frame.get("reason") == "lost" else "quit"

    # -- ending ----------------------------------------------------------------

    def _end(self, reason):
        """Leave the hub, send the last frames, close cleanly. Runs on the session's thread."""
        reason = self.outbox.failed if self.outbox.failed == "too_slow" else reason
        if self.server.stopping and reason in ("lost", "timeout"):
            reason = "shutdown"  # the server closed the connection: nobody lost it
        name = self.seat.name if self.seat is not None else None
        if self.door is not None:
            self.door.close()
        if self.hub.leave(self.seat, reason, self._parting if reason == "quit" else None):
            log.info("%s left (%s)", name, reason)
        if reason == "quit":
            self.send_frame({"type": "bye", "reason": "quit", "text": "Goodbye."})
        self.outbox.finish()
        self.outbox.drained.wait(CLOSE_FLUSH_S)
        if reason in ("quit", "error", "timeout", "flood"):
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
# 13. Discovery: UDP probes and replies, finding servers on the LAN
# =============================================================================
#
# A server's DiscoveryResponder answers probes on its own "discovery" thread;
# discover_servers() runs on whichever thread calls it (never the Tk thread: it
# blocks for about DISCOVERY_WAIT_S). Discovery is IPv4 only: IPv6 has no broadcast.

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


# LocalChat discovery, version 1.
#
# Transport: UDP, by default on the same port number as the server's TCP port.
#
# Probe (client to server, sent to broadcast addresses and to 127.0.0.1):
#   b"LOCALCHAT-DISCOVER 1\n" followed by NUL bytes up to exactly 512 bytes.
#   A server answers only a datagram of 512 to 2048 bytes made of that prefix and
#   NUL bytes, from a source port of 1024 or more, at most 5 times a second to one
#   address; everything else is dropped without a word.
#
# Reply (server to the probe's source address and port): one JSON object on one
# line, UTF-8, at most 400 bytes (less than the probe, so a reply never amplifies):
#   {"type":"localchat","name":"lab-pc","port":13333,"users":3,"password":false,
#    "tls":true,"fingerprint":"AB:CD:...","version":1,"id":"9f3c2a71d04be815"}
#   name: the server's display name (cut to fit); port: its TCP port; users: how
#   many people are connected; password: whether it asks for one; tls: whether it
#   encrypts; fingerprint: SHA-256 of its certificate in hex pairs, or null;
#   version: its protocol version; id: random, one per running server, so one
#   server seen through several of its addresses is listed once.
#   Fields a receiver does not know are ignored.

DISCOVERY_PROBE = b"LOCALCHAT-DISCOVER 1\n"  # a probe starts so; the rest is NUL padding
DISCOVERY_PROBE_BYTES = 512             # probes are padded to this; shorter ones get no reply
DISCOVERY_REPLY_MAX_BYTES = 400         # a reply fits this, below the probe size: no amplification
DISCOVERY_MAX_PACKET_BYTES = 2048       # longer datagrams are dropped unread
DISCOVERY_WAIT_S = 1.0                  # how long discover_servers() listens for replies
DISCOVERY_POLL_S = 0.2                  # the responder looks at stop() this often
DISCOVERY_RATE_PER_S = 5                # replies per second to any one source address
DISCOVERY_RATE_SOURCES = 1024           # source addresses the rate limit remembers at once
DISCOVERY_MAX_FOUND = 256               # discover_servers() keeps at most this many replies
DISCOVERY_NAME_MAX_CHARS = 64           # a server name longer than this is cut in replies
DISCOVERY_MIN_SOURCE_PORT = 1024        # probes from service ports are reflection attempts
DISCOVERY_TARGETS_ENV = "LOCALCHAT_DISCOVERY_TARGETS"  # comma-separated addresses to probe

_LIMITED_BROADCAST = "255.255.255.255"
_SIOCGIFBRDADDR = 0x8919                # Linux ioctl: an interface's IPv4 broadcast address
_FINGERPRINT_CHARS = frozenset("0123456789ABCDEFabcdef:")
_REPLY_FIELDS = (("name", str), ("port", int), ("users", int), ("password", bool),
                 ("tls", bool), ("version", int))


def discovery_probe():
    """Return the probe datagram: the prefix padded with NUL bytes to DISCOVERY_PROBE_BYTES."""
    return DISCOVERY_PROBE.ljust(DISCOVERY_PROBE_BYTES, b"\0")


def is_discovery_probe(data):
    """Return True if a datagram is exactly a valid probe: prefix, NUL padding, sane size."""
    if not DISCOVERY_PROBE_BYTES <= len(data) <= DISCOVERY_MAX_PACKET_BYTES:
        return False
    if not data.startswith(DISCOVERY_PROBE):
        return False
    return not data[len(DISCOVERY_PROBE):].strip(b"\0")


def encode_discovery_reply(description, server_id=None, limit=DISCOVERY_REPLY_MAX_BYTES):
    """Return the reply datagram for a describe() dict, the name cut so it fits `limit` bytes.

    Returns None if even an empty name does not fit. Raises KeyError, TypeError or
    ValueError if the description lacks "name" or "port" or holds values of the wrong kind.
    """
    fields = {
        "type": "localchat",
        "name": _clean_server_name(description["name"]),
        "port": int(description["port"]),
        "users": int(description.get("users", 0)),
        "password": bool(description.get("password", False)),
        "tls": bool(description.get("tls", False)),
        "fingerprint": _optional_str(description.get("fingerprint")),
        "version": int(description.get("version", PROTOCOL_VERSION)),
    }
    if server_id is not None:
        fields["id"] = server_id
    return _fit_reply(fields, limit)


def _clean_server_name(name):
    """Return the name as text that UTF-8 can carry, at most DISCOVERY_NAME_MAX_CHARS long."""
    # A name from the command line may hold lone surrogates (undecodable bytes on Linux).
    text = str(name).encode("utf-8", "replace").decode("utf-8")
    return text[:DISCOVERY_NAME_MAX_CHARS]


def _optional_str(value):
    return None if value is None else str(value)


def _fit_reply(fields, limit):
    """Return the encoded fields, shortening fields["name"] until they fit `limit` bytes."""
    while True:
        data = encode_frame(fields)
        excess = len(data) - limit
        if excess <= 0:
            return data
        if not fields["name"]:
            return None
        # One character takes at most 6 bytes in JSON ("\u001b"): cut at least that many.
        fields["name"] = fields["name"][:-max(1, -(-excess // 6))]


def parse_discovery_reply(data, address):
    """Return the server a reply describes, with its "address", or None if it is malformed."""
    if len(data) > DISCOVERY_PROBE_BYTES:
        return None
    try:
        frame = parse_frame(data.rstrip(b"\r\n"))
    except ProtocolError:
        return None
    if frame["type"] != "localchat" or not _reply_fields_valid(frame):
        return None
    found = {key: frame[key] for key, _ in _REPLY_FIELDS}
    found["fingerprint"] = frame.get("fingerprint")
    found["id"] = frame.get("id")
    found["address"] = address
    return found


def _reply_fields_valid(frame):
    """Return True if a reply's fields have the right kinds and sane values."""
    for key, kind in _REPLY_FIELDS:
        value = frame.get(key)
        # bool is an int in Python, but true is no port number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return False
    if len(frame["name"]) > DISCOVERY_NAME_MAX_CHARS or not 0 < frame["port"] < 65536:
        return False
    if frame["users"] < 0 or frame["version"] < 1:
        return False
    fingerprint, server_id = frame.get("fingerprint"), frame.get("id")
    if fingerprint is not None and not _is_fingerprint(fingerprint):
        return False
    return server_id is None or (isinstance(server_id, str) and 0 < len(server_id) <= 32
                                 and server_id.isascii() and server_id.isalnum())


def _is_fingerprint(value):
    return isinstance(value, str) and 0 < len(value) <= 128 and set(value) <= _FINGERPRINT_CHARS


class ReplyRateLimit:
    """Allow at most `per_window` replies per `window_s` to one source address.

    Remembers at most `max_sources` addresses: entries whose window has ended are
    forgotten first, and a new address is refused while the table is full of
    current ones, so a flood from spoofed addresses costs bounded memory.
    Not thread-safe: the responder's own thread is its only user.
    """

    def __init__(self, per_window=DISCOVERY_RATE_PER_S, window_s=1.0,
                 max_sources=DISCOVERY_RATE_SOURCES, clock=time.monotonic):
        self.per_window = per_window
        self.window_s = window_s
        self.max_sources = max_sources
        self._clock = clock
        self._windows = {}  # address -> [window start, replies]; insertion order is start order

    def allow(self, address):
        """Return True if one more reply to `address` is allowed now, and count it."""
        now = self._clock()
        window = self._windows.get(address)
        if window is not None and now - window[0] < self.window_s:
            if window[1] >= self.per_window:
                return False
            window[1] += 1
            return True
        self._windows.pop(address, None)
        self._forget_ended(now)
        if len(self._windows) >= self.max_sources:
            return False
        self._windows[address] = [now, 1]
        return True

    def _forget_ended(self, now):
        """Drop the windows that have ended; they are the oldest, so stop at the first live one."""
        while self._windows:
            oldest = next(iter(self._windows))
            if now - self._windows[oldest][0] < self.window_s:
                break
            del self._windows[oldest]


class DiscoveryResponder:
    """Answer discovery probes on a UDP socket, on a daemon thread named "discovery".

    `describe()` runs on that thread for every probe answered and returns a dict:
    {"name", "port", "users", "password", "tls", "fingerprint", "version"} ("name"
    and "port" required); it must be quick and thread-safe. Binds in __init__, so
    an OSError (port taken) comes from the constructor. Bind to "0.0.0.0" to be
    found: on Linux a socket bound to one unicast address does not get broadcasts.
    `rate_limit` (tests) replaces the default ReplyRateLimit. `failed` counts the
    probes describe() or sending failed to answer (the first describe() failure is logged).
    """

    def __init__(self, host, port, describe, rate_limit=None):
        self.describe = describe
        self.server_id = secrets.token_hex(8)
        self.failed = 0
        self._rate_limit = rate_limit if rate_limit is not None else ReplyRateLimit()
        self._stopping = threading.Event()
        self._thread = None
        self._sock = _bind_udp(host, port)
        self.address = self._sock.getsockname()[:2]

    def start(self):
        """Start answering on the "discovery" thread."""
        self._thread = threading.Thread(target=self._responder_loop, name="discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout=1.0):
        """Stop answering, join the thread and close the socket. Safe to call twice."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # Closed after the join: closing does not wake a blocked recvfrom() on Linux,
        # and a closed descriptor number could be reused under the thread's feet.
        self._sock.close()

    def _responder_loop(self):
        """Runs on the discovery thread: read datagrams until stop(), answering valid probes."""
        while not self._stopping.is_set():
            try:
                data, source = self._sock.recvfrom(DISCOVERY_MAX_PACKET_BYTES + 1)
            except socket.timeout:
                continue
            except OSError:
                # Windows reports an oversized datagram, or an ICMP "port unreachable"
                # caused by an earlier reply, as an error on the next read.
                continue
            self._handle_datagram(data, source)

    def _handle_datagram(self, data, source):
        """Runs on the discovery thread: answer one datagram if it deserves it; never raise.

        Nothing is logged per datagram, so a hostile flood cannot flood the log.
        """
        if is_discovery_probe(data) and _fair_source(source) and self._rate_limit.allow(source[0]):
            self._answer(len(data), source)

    def _answer(self, probe_bytes, source):
        """Runs on the discovery thread: send one reply, never longer than the probe."""
        try:
            reply = encode_discovery_reply(self.describe(), self.server_id)
        except Exception:  # a bug in describe(): log it once, keep answering nothing
            self.failed += 1
            if self.failed == 1:
                log.exception("discovery: describe() failed; probes go unanswered")
            return
        if reply is None or len(reply) > probe_bytes:
            self.failed += 1
            return
        try:
            self._sock.sendto(reply, source)
        except OSError:
            self.failed += 1


def _bind_udp(host, port):
    """Return a UDP socket bound to (host, port), with a read timeout of DISCOVERY_POLL_S."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # No SO_REUSEADDR: UDP has no TIME_WAIT to skip, and on Linux and BSD it would
    # let a second server bind the same port and silently take half the probes.
    try:
        sock.settimeout(DISCOVERY_POLL_S)
        sock.bind((host or "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _fair_source(source):
    """Return True if replying to this source cannot reflect traffic at a service or a group."""
    host, port = source[:2]
    try:
        first = int(host.split(".", 1)[0])
    except ValueError:
        return False
    # Below 1024 sit services (echo, chargen) that would answer back; 0 and 224+ are
    # "this network", multicast and broadcast, which no real probe comes from.
    return port >= DISCOVERY_MIN_SOURCE_PORT and 0 < first < 224


def default_discovery_targets():
    """Return the addresses discover_servers() probes when given none.

    The environment variable LOCALCHAT_DISCOVERY_TARGETS (comma-separated addresses)
    replaces the list: it is for tests, which must keep to loopback, and for
    networks where broadcasts do not arrive (list the servers' addresses). Otherwise:
    255.255.255.255, the broadcast address of each local IPv4 network (exact on
    Linux, guessed as the /24 one elsewhere: the standard library cannot read
    netmasks portably), and 127.0.0.1 for a server on this computer.
    Computing the list sends nothing.
    """
    configured = os.environ.get(DISCOVERY_TARGETS_ENV, "")
    if configured.strip():
        return _unique(part.strip() for part in configured.split(",") if part.strip())
    guessed = [address.rsplit(".", 1)[0] + ".255" for address in lan_addresses()]
    return _unique([_LIMITED_BROADCAST] + _linux_broadcast_addresses() + guessed + ["127.0.0.1"])


def _unique(items):
    """Return the items in their first order, without repeats."""
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _linux_broadcast_addresses():
    """Return the IPv4 broadcast address of every Linux network interface (elsewhere: [])."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        import fcntl  # Unix only
        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return []
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            # struct ifreq: 16 bytes of name, then a sockaddr_in whose address is at 20.
            request = name.encode("utf-8", "replace")[:15].ljust(40, b"\0")
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFBRDADDR, request)
            except OSError:  # no IPv4 address on that interface
                continue
            address = socket.inet_ntoa(answer[20:24])
            if address != "0.0.0.0" and not address.startswith("127."):
                found.append(address)
    return found


def discover_servers(port=DEFAULT_PORT, targets=None, wait_s=DISCOVERY_WAIT_S):
    """Probe `targets` on UDP `port` and return the servers that answer within `wait_s`.

    Runs on the calling thread and blocks it for wait_s (never call it on the Tk
    thread). `targets` defaults to default_discovery_targets(). Returns a list of
    reply dicts (see DISCOVERY_DOC) each with the sender's "address", one per
    (address, port) and one per server seen through several addresses (its
    non-loopback address kept), sorted by name. Malformed replies are ignored;
    targets that cannot be sent to are skipped (a host name among them is looked
    up first, which may block). Raises nothing but OSError if no UDP socket can be made.
    """
    if targets is None:
        targets = default_discovery_targets()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if not _send_probes(sock, targets, port):
            return []
        found = _collect_replies(sock, time.monotonic() + wait_s)
    return _distinct_servers(found)


def _send_probes(sock, targets, port):
    """Send one probe to each target; return how many went out."""
    probe, sent = discovery_probe(), 0
    for target in targets:
        try:
            sock.sendto(probe, (target, port))
            sent += 1
        except (OSError, ValueError, TypeError):  # a network gone or unreachable, a malformed name
            pass
    return sent


def _collect_replies(sock, deadline):
    """Return the valid replies read from sock until the deadline (at most DISCOVERY_MAX_FOUND)."""
    found = []
    while len(found) < DISCOVERY_MAX_FOUND:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data, source = sock.recvfrom(DISCOVERY_MAX_PACKET_BYTES + 1)
        except socket.timeout:
            break
        except OSError:  # Windows: an ICMP "port unreachable" from a target without a server
            continue
        server = parse_discovery_reply(data, source[0])
        if server is not None:
            found.append(server)
    return found


def _distinct_servers(found):
    """Return the servers found, one per (address, port) and per server id, sorted by name."""
    by_address = {}
    for server in found:
        by_address.setdefault((server["address"], server["port"]), server)
    kept = {}
    for server in by_address.values():
        # The same id with the same name, port and fingerprint is one server reached
        # through two of its addresses (127.0.0.1 and its LAN address, typically).
        key = (server["id"], server["name"], server["port"], server["fingerprint"])
        if server["id"] is None:
            key = (server["address"], server["port"])
        if key not in kept or (_is_loopback(kept[key]["address"]) and not _is_loopback(server["address"])):
            kept[key] = server
    return sorted(kept.values(), key=lambda s: (s["name"].casefold(), s["address"], s["port"]))


def _is_loopback(address):
    return address.startswith("127.")


def describe_found_server(found):
    """Return one line about a found server for a person, its text made printable."""
    parts = [printable(found["name"] or "(no name)", DISCOVERY_NAME_MAX_CHARS),
             "%s:%d" % (found["address"], found["port"])]
    parts.append("1 user" if found["users"] == 1 else "%d users" % found["users"])
    if found["password"]:
        parts.append("password")
    if found["tls"]:
        parts.append("encrypted (%s)" % _short_fingerprint(found["fingerprint"]))
    else:
        parts.append("not encrypted")
    if found["version"] > PROTOCOL_VERSION:
        parts.append("needs a newer LocalChat (protocol %d)" % found["version"])
    return "  ".join(parts)


def _short_fingerprint(fingerprint):
    """Return "AB:CD:...:12" for a colon-separated fingerprint, "no fingerprint" for None."""
    if not fingerprint:
        return "no fingerprint"
    pairs = fingerprint.split(":")
    if len(pairs) <= 4:
        return fingerprint
    return "%s:%s:...:%s" % (pairs[0], pairs[1], pairs[-1])


# =============================================================================
# 14. QR codes: the web address for a phone's camera (ISO/IEC 18004)
# =============================================================================
#
# qr_matrix() makes the symbol: byte mode (UTF-8), error correction level M, the
# smallest of the 40 versions that holds the text, and of the eight masks the one
# the standard's penalty rules score lowest. qr_terminal() draws it with half
# blocks, qr_png() as a PNG image (Tk's PhotoImage reads it too). Pure functions:
# any thread may call them.

QR_MAX_VERSION = 40               # the largest symbol, 177 x 177 modules
QR_QUIET_MODULES = 4              # the light margin readers need around a symbol (the standard's minimum)
QR_PNG_SCALE = 8                  # pixels a module in qr_png(): an address like http://192.168.1.7:13333/ is 264 wide
QR_WINDOW_SCALE = 10              # ... in the hosting window's code: 330 pixels, for a phone's camera across a desk
# Error correction codewords per block and the number of blocks at level M, versions 1 to 40
# (ISO/IEC 18004:2015 table 9); the data codewords are what is left of the symbol's capacity.
QR_EC_PER_BLOCK_M = (10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26,
                     26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28)
QR_BLOCKS_M = (1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16,
               17, 17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)
QR_LEVEL_M_BITS = 0b00            # level M's two bits in the format information
QR_BYTE_MODE = 0b0100             # the mode indicator of byte mode
QR_PAD_CODEWORDS = b"\xec\x11"    # what fills the data capacity after the text, alternately
QR_FIELD_POLYNOMIAL = 0x11D       # x^8 + x^4 + x^3 + x^2 + 1: GF(256) for Reed-Solomon
QR_FORMAT_GENERATOR = 0x537       # BCH (15, 5) code of the format information
QR_FORMAT_XOR = 0x5412            # XORed over the format information so that it is never all light
QR_VERSION_GENERATOR = 0x1F25     # BCH (18, 6) code of the version information (versions 7 and up)
QR_PENALTY_RUN = 3                # N1: a run of five modules of one colour in a line, plus 1 a module more
QR_PENALTY_BLOCK = 3              # N2: each 2 x 2 block of one colour
QR_PENALTY_FINDER = 40            # N3: each dark-light-dark-dark-dark-light-dark with 4 light beside it
QR_PENALTY_BALANCE = 10           # N4: each full 5 % by which the dark share strays from half
# Black on white whatever the terminal's theme, as a phone's reader expects: 47 (white) for
# terminals that know eight colours, then 107 (bright white), which overrides it where known.
QR_TERMINAL_COLOURS = "\x1b[30;47;107m"
QR_TERMINAL_RESET = "\x1b[0m"
_QR_HALF_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}
_QR_MASKS = (  # the eight mask patterns: a module (row, column) is flipped where it gives True
    lambda r, c: (r + c) % 2 == 0,
    lambda r, c: r % 2 == 0,
    lambda r, c: c % 3 == 0,
    lambda r, c: (r + c) % 3 == 0,
    lambda r, c: (r // 2 + c // 3) % 2 == 0,
    lambda r, c: r * c % 2 + r * c % 3 == 0,
    lambda r, c: (r * c % 2 + r * c % 3) % 2 == 0,
    lambda r, c: ((r + c) % 2 + r * c % 3) % 2 == 0,
)


def _qr_field_tables():
    """Return GF(256)'s exponent table (doubled, so sums of logarithms need no modulo) and log table."""
    exponents, logarithms = [0] * 510, [0] * 256
    value = 1
    for power in range(255):
        exponents[power] = exponents[power + 255] = value
        logarithms[value] = power
        value <<= 1
        if value & 0x100:
            value ^= QR_FIELD_POLYNOMIAL
    return exponents, logarithms


_QR_EXP, _QR_LOG = _qr_field_tables()


def _qr_multiply(a, b):
    """Return the product of two elements of GF(256)."""
    if a == 0 or b == 0:
        return 0
    return _QR_EXP[_QR_LOG[a] + _QR_LOG[b]]


def _qr_generator(degree):
    """Return the Reed-Solomon generator polynomial (x - 1)(x - a)...(x - a^(degree-1)), highest power first."""
    polynomial = [1]
    for power in range(degree):
        product = polynomial + [0]
        for index, coefficient in enumerate(polynomial):
            product[index + 1] ^= _qr_multiply(coefficient, _QR_EXP[power])
        polynomial = product
    return polynomial


def qr_error_correction(data, count):
    """Return the `count` Reed-Solomon codewords of a block: data times x^count modulo the generator."""
    generator = _qr_generator(count)
    remainder = [0] * count
    for byte in data:
        factor = byte ^ remainder[0]
        remainder = remainder[1:] + [0]
        for index in range(count):
            remainder[index] ^= _qr_multiply(generator[index + 1], factor)
    return bytes(remainder)


def _qr_bch(value, bits, generator):
    """Return value followed by its BCH check bits: value * x^bits plus the remainder modulo generator."""
    shifted = value << bits
    remainder = shifted
    for shift in range(value.bit_length() - 1, -1, -1):
        if remainder >> (shift + bits) & 1:
            remainder ^= generator << shift
    return shifted | remainder


def qr_format_bits(mask):
    """Return the 15 format information bits of level M with this mask (0-7), XOR-masked."""
    return _qr_bch(QR_LEVEL_M_BITS << 3 | mask, 10, QR_FORMAT_GENERATOR) ^ QR_FORMAT_XOR


def qr_version_bits(version):
    """Return the 18 version information bits that versions 7 and up carry twice."""
    return _qr_bch(version, 12, QR_VERSION_GENERATOR)


def qr_alignment_positions(version):
    """Return the rows (and columns) on which the version's alignment patterns are centred."""
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2  # even, the last gap takes the rest
    last = version * 4 + 10
    return [6] + [last - step * index for index in range(count - 2, -1, -1)]


def _qr_raw_codewords(version):
    """Return the codewords a symbol holds: its modules less the function patterns, in whole bytes."""
    modules = (16 * version + 128) * version + 64
    if version >= 2:
        count = version // 7 + 2
        modules -= (25 * count - 10) * count - 55  # alignment patterns, less their overlap with timing
    if version >= 7:
        modules -= 36  # the two copies of the version information
    return modules // 8


def qr_data_capacity(version):
    """Return the data codewords of a level M symbol of this version."""
    return _qr_raw_codewords(version) - QR_EC_PER_BLOCK_M[version - 1] * QR_BLOCKS_M[version - 1]


def _qr_count_bits(version):
    """Return the length in bits of byte mode's character count for this version."""
    return 8 if version <= 9 else 16


def qr_byte_capacity(version):
    """Return the most bytes a level M symbol of this version holds in byte mode."""
    return (qr_data_capacity(version) * 8 - 4 - _qr_count_bits(version)) // 8


def qr_version_for(length):
    """Return the smallest version that holds `length` bytes; UserError if even version 40 does not."""
    for version in range(1, QR_MAX_VERSION + 1):
        if length <= qr_byte_capacity(version):
            return version
    raise UserError("A QR code holds at most %d bytes; this text has %d."
                    % (qr_byte_capacity(QR_MAX_VERSION), length))


def _qr_data_codewords(data, version):
    """Return the data codewords: mode, count, the bytes, a terminator, then padding to capacity."""
    capacity = qr_data_capacity(version)
    bits = format(QR_BYTE_MODE, "04b") + format(len(data), "0%db" % _qr_count_bits(version))
    bits += "".join(format(byte, "08b") for byte in data)
    bits += "0" * min(4, capacity * 8 - len(bits))  # the terminator, cut short when space runs out
    bits += "0" * (-len(bits) % 8)
    codewords = bytes(int(bits[start:start + 8], 2) for start in range(0, len(bits), 8))
    padding = QR_PAD_CODEWORDS * capacity
    return codewords + padding[:capacity - len(codewords)]


def _qr_blocks(codewords, version):
    """Return the data codewords cut into the version's blocks: the short ones first, then one longer."""
    count = QR_BLOCKS_M[version - 1]
    short, longer = divmod(len(codewords), count)
    blocks, start = [], 0
    for index in range(count):
        size = short + (index >= count - longer)
        blocks.append(codewords[start:start + size])
        start += size
    return blocks


def _qr_interleave(blocks):
    """Return the first codeword of every block, then every second, and so on."""
    result = bytearray()
    for index in range(max(len(block) for block in blocks)):
        result.extend(block[index] for block in blocks if index < len(block))
    return bytes(result)


def qr_codewords(data, version):
    """Return every codeword of a symbol in placement order: data blocks interleaved, then their error correction."""
    blocks = _qr_blocks(_qr_data_codewords(data, version), version)
    count = QR_EC_PER_BLOCK_M[version - 1]
    return _qr_interleave(blocks) + _qr_interleave([qr_error_correction(block, count) for block in blocks])


class _QrGrid:
    """A symbol being built: its modules (True is dark) and which of them belong to function patterns."""

    def __init__(self, version):
        self.size = size = version * 4 + 17
        self.dark = [[False] * size for _ in range(size)]
        self.fixed = [[False] * size for _ in range(size)]
        self._draw_finders()
        self._draw_timing()
        self._draw_alignments(qr_alignment_positions(version))
        for row, column, _dark in self._format_modules(0):
            self._set(row, column, False)  # reserved here; masked() draws the real bits
        if version >= 7:
            self._draw_version(qr_version_bits(version))

    def _set(self, row, column, dark):
        self.dark[row][column] = dark
        self.fixed[row][column] = True

    def _draw_finders(self):
        """Draw the three finder patterns with their light separators."""
        for top, left in ((0, 0), (0, self.size - 7), (self.size - 7, 0)):
            for row in range(max(top - 1, 0), min(top + 8, self.size)):
                for column in range(max(left - 1, 0), min(left + 8, self.size)):
                    ring = max(abs(row - top - 3), abs(column - left - 3))
                    self._set(row, column, ring not in (2, 4))

    def _draw_timing(self):
        """Draw the timing patterns: alternate modules on row 6 and column 6 between the finders."""
        for index in range(8, self.size - 8):
            self._set(6, index, index % 2 == 0)
            self._set(index, 6, index % 2 == 0)

    def _draw_alignments(self, positions):
        """Draw a 5 x 5 alignment pattern at every crossing of positions not taken by a finder."""
        corners = {(6, 6), (6, positions[-1] if positions else 6), (positions[-1] if positions else 6, 6)}
        for centre_row, centre_column in itertools.product(positions, positions):
            if (centre_row, centre_column) in corners:
                continue
            for row in range(centre_row - 2, centre_row + 3):
                for column in range(centre_column - 2, centre_column + 3):
                    self._set(row, column, max(abs(row - centre_row), abs(column - centre_column)) != 1)

    def _format_modules(self, bits):
        """Yield (row, column, dark) for both copies of the 15 format bits, then the dark module."""
        size = self.size
        for index in range(15):  # index 0 is the least significant bit
            dark = bool(bits >> index & 1)
            if index < 8:
                yield (index if index < 6 else index + 1), 8, dark  # down column 8, over the timing row
                yield 8, size - 1 - index, dark
            else:
                yield 8, (7 if index == 8 else 14 - index), dark  # along row 8, over the timing column
                yield size - 15 + index, 8, dark
        yield size - 8, 8, True  # the dark module, always there

    def _draw_version(self, bits):
        """Draw the 18 version bits in the 6 x 3 blocks beside the top right and bottom left finders."""
        for index in range(18):
            dark = bool(bits >> index & 1)
            near, far = index // 3, self.size - 11 + index % 3
            self._set(near, far, dark)
            self._set(far, near, dark)

    def _data_positions(self):
        """Yield the free modules in placement order: up and down two-column strips from the bottom right."""
        size = self.size
        for right in list(range(size - 1, 7, -2)) + [5, 3, 1]:  # column 6 is the timing pattern's
            upward = (right + 1) & 2 == 0
            for step in range(size):
                row = size - 1 - step if upward else step
                for column in (right, right - 1):
                    if not self.fixed[row][column]:
                        yield row, column

    def place(self, codewords):
        """Place the codewords' bits, most significant first; remainder bits stay light."""
        bits = "".join(format(byte, "08b") for byte in codewords)
        for (row, column), bit in zip(self._data_positions(), bits):
            self.dark[row][column] = bit == "1"

    def masked(self, mask):
        """Return the rows with mask applied to the free modules and the matching format bits drawn."""
        flip = _QR_MASKS[mask]
        rows = [[dark != (not fixed and flip(r, c)) for c, (dark, fixed) in enumerate(zip(dark_row, fixed_row))]
                for r, (dark_row, fixed_row) in enumerate(zip(self.dark, self.fixed))]
        for row, column, dark in self._format_modules(qr_format_bits(mask)):
            rows[row][column] = dark
        return rows


def _qr_run_penalty(line):
    """Return rule N1 for one row or column: runs of five or more modules of one colour."""
    total = 0
    for _colour, run in itertools.groupby(line):
        length = sum(1 for _ in run)
        if length >= 5:
            total += QR_PENALTY_RUN + length - 5
    return total


def _qr_finder_penalty(line):
    """Return rule N3 for one line: each 1:1:3:1:1 pattern with four light modules before or after it.

    The quiet zone counts as light, since it is light in every drawing.
    """
    text = "0000" + "".join("1" if dark else "0" for dark in line) + "0000"
    count = 0
    start = text.find("1011101")
    while start >= 0:
        if text[start - 4:start] == "0000" or text[start + 7:start + 11] == "0000":
            count += 1
        start = text.find("1011101", start + 1)
    return count * QR_PENALTY_FINDER


def _qr_block_penalty(rows):
    """Return rule N2: each 2 x 2 block of one colour (overlapping blocks all count)."""
    count = 0
    for upper, lower in zip(rows, rows[1:]):
        for column in range(len(upper) - 1):
            count += upper[column] == upper[column + 1] == lower[column] == lower[column + 1]
    return count * QR_PENALTY_BLOCK


def _qr_balance_penalty(rows):
    """Return rule N4: how far the share of dark modules strays from half, in whole steps of 5 %."""
    total = len(rows) * len(rows[0])
    dark = sum(map(sum, rows))
    return abs(dark * 20 - total * 10) // total * QR_PENALTY_BALANCE


def qr_penalty(rows):
    """Return a symbol's penalty under the standard's rules N1 to N4: the encoder keeps the lowest."""
    lines = [list(row) for row in rows] + [list(column) for column in zip(*rows)]
    return (sum(_qr_run_penalty(line) + _qr_finder_penalty(line) for line in lines)
            + _qr_block_penalty(rows) + _qr_balance_penalty(rows))


def qr_matrix(text, mask=None):
    """Return the QR code of text as rows of booleans, True for dark, without the quiet zone.

    Byte mode with UTF-8, error correction level M, the smallest version that holds
    the text; the mask is the one with the lowest penalty (the first of equals)
    unless `mask` names one (0-7). Raises UserError past 2,331 bytes.
    """
    data = text.encode("utf-8")
    version = qr_version_for(len(data))
    grid = _QrGrid(version)
    grid.place(qr_codewords(data, version))
    candidates = [grid.masked(each) for each in (range(8) if mask is None else [mask])]
    return min(candidates, key=qr_penalty)


def _qr_framed(text, mask=None):
    """Return qr_matrix(text, mask) inside its light quiet zone."""
    rows = qr_matrix(text, mask)
    width = len(rows) + 2 * QR_QUIET_MODULES
    margin = [False] * QR_QUIET_MODULES
    blank = [[False] * width for _ in range(QR_QUIET_MODULES)]
    return blank + [margin + row + margin for row in rows] + [list(row) for row in blank]


def qr_terminal(text):
    """Return the QR code of text for a terminal: half blocks, two module rows a line, black on white.

    The colours are set explicitly on every line, so the code reads the same on dark
    and light themes; print it only where escape sequences work (a terminal).
    """
    rows = _qr_framed(text)
    rows.append([False] * len(rows[0]))  # an odd count: the last line's lower half is margin
    lines = []
    for upper, lower in zip(rows[0::2], rows[1::2]):
        cells = "".join(_QR_HALF_BLOCKS[pair] for pair in zip(upper, lower))
        lines.append(QR_TERMINAL_COLOURS + cells + QR_TERMINAL_RESET)
    return "\n".join(lines) + "\n"


def _png_chunk(kind, data):
    """Return one PNG chunk: length, type, data and the CRC of type and data."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def qr_png(text, scale=QR_PNG_SCALE, mask=None):
    """Return a PNG image (bytes) of qr_matrix(text, mask): 8-bit grey, `scale` pixels a module, quiet zone included.

    Tk shows it with tkinter.PhotoImage(data=base64.b64encode(png)) (Tk 8.6 reads PNG).
    """
    rows = _qr_framed(text, mask)
    side = len(rows) * scale
    dark, light = b"\x00" * scale, b"\xff" * scale
    pixels = b"".join((b"\x00" + b"".join(dark if module else light for module in row)) * scale
                      for row in rows)  # each line starts with filter type 0: none
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # depth 8, grey, deflate, no interlace
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(pixels, 9)) + _png_chunk(b"IEND", b""))


# =============================================================================
# 15. Server: accept, threads, shutdown
# =============================================================================
#
# ChatServer accepts on the thread running serve_forever() and gives every
# connection a thread of its own; stop() is called from another thread.


class ChatServer(socketserver.ThreadingTCPServer):
    """The threaded TCP server: a Session per connection (its door chosen by the first bytes), writers that send."""

    daemon_threads = True
    allow_reuse_address = os.name != "nt"  # on Windows it would let two servers share a port
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address=(DEFAULT_HOST, DEFAULT_PORT), hub=None, hello_timeout=HELLO_TIMEOUT_S,
                 idle_ping=IDLE_PING_S, tls_context=None, queue_budget=QUEUE_BUDGET_BYTES,
                 select_limit=SELECT_LIMIT, doors=DOORS, clear_passwords=False, diagnostics=False):
        self.tls_context = tls_context  # an ssl.SSLContext: every connection is encrypted
        self.diagnostics = diagnostics  # --diagnostics: the web door answers /ws/echo (for Autobahn|Testsuite)
        self.clear_passwords = clear_passwords  # the IRC and text doors may take a password without TLS
        protocols = [protocol for door in doors for protocol in door.alpn]
        if tls_context is not None and protocols:
            tls_context.set_alpn_protocols(protocols)  # browsers say who they are before any byte of HTTP
        self.doors = tuple(doors)  # Door classes, tried in order on each connection's first bytes
        self.local_exempt = True  # connections from this computer do not count towards max_per_ip
        self.hub = hub if hub is not None else ChatHub(server_name=socket.gethostname())
        self.hello_timeout = hello_timeout
        self.idle_ping = idle_ping
        self.internal_errors = 0  # tracebacks caught at the session boundary
        self._sessions = set()
        self._session_threads = set()
        self._per_address = collections.Counter()  # connections open per peer address
        self._wrong_passwords = {}  # address -> RecentEvents of wrong passwords (see guessing())
        self._state_lock = threading.Lock()
        self._serving = threading.Event()
        self._stopped = False
        self.stopping = False  # set first thing by stop(): readers waiting for the budget give up
        super().__init__(address, Session)
        self.transport = Transport(self.hub.lock, before_send=self.hub.commit, budget=queue_budget,
                                   slow_s=self.hub.limits.slow_reader_s, select_limit=select_limit)
        self.transport.on_error = self._count_internal_error
        self._housekeeping_stop = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        self._housekeeper.start()

    def _housekeeping_loop(self):
        """Runs on the housekeeping thread: end grace periods in time, commit what nobody was sent."""
        interval = max(0.05, min(HOUSEKEEPING_S, self.hub.resume_grace_s / 4))
        trim = _heap_trimmer()
        next_trim = time.monotonic() + TRIM_S
        while not self._housekeeping_stop.wait(interval):
            try:
                self.hub.expire()
                self.hub.commit()
                if trim is not None and time.monotonic() >= next_trim:
                    trim(0)  # after a join storm or a flood: without it, the freed heap stays ours
                    next_trim = time.monotonic() + TRIM_S
            except Exception:  # a bug: say so and go on, or grace periods never end
                log.exception("housekeeping: internal error")
                self._count_internal_error()

    @property
    def port(self):
        return self.server_address[1]

    def door_for_alpn(self, protocol):
        """Return the Door for a TLS connection that agreed on this application protocol (ALPN), or None."""
        for door in self.doors:
            if protocol is not None and protocol in door.alpn:
                return door
        return None

    def door_for_silence(self):
        """Return the Door for a connection that says nothing at first (a person at nc), or None."""
        for door in self.doors:
            if door.for_silence:
                return door
        return None

    def door_for(self, first):
        """Return the Door class for a connection that began with `first`, or None to read more.

        The first door that claims the bytes takes the connection; when none does, or
        DOOR_SNIFF_BYTES came and a door still cannot tell, the last door takes it.
        """
        undecided = False
        for door in self.doors[:-1]:
            claim = door.claims(first)
            if claim:
                return door
            undecided = undecided or claim is None
        return None if undecided and len(first) < DOOR_SNIFF_BYTES else self.doors[-1]

    def serve_forever(self, poll_interval=0.2):
        self._serving.set()
        super().serve_forever(poll_interval)

    def process_request(self, request, client_address):
        """Start the connection's thread, named after the peer, if the limits allow one more."""
        refusal = self._admit(client_address[0])
        if refusal is not None:
            try:  # a short sentence fits the socket's buffer: this never blocks the accept loop
                request.setblocking(False)
                request.send(encode_frame({"type": "error", "code": refusal[0], "text": refusal[1], "fatal": True}))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="session-%s:%s" % client_address[:2],
            daemon=True,
        )
        with self._state_lock:
            self._session_threads.add(thread)
        thread.start()

    def _admit(self, address):
        """Count a new connection from address; return (code, sentence) if it is one too many."""
        limits = self.hub.limits
        with self._state_lock:
            if len(self._session_threads) >= limits.max_connections:
                return "server_full", "The server is full (%d connections). Try again later." % limits.max_connections
            local = self.local_exempt and (address.startswith("127.") or address == "::1")
            if not local and self._per_address[address] >= limits.max_per_ip:
                return "too_many_connections", ("Too many connections from your address (at most %d)."
                                                % limits.max_per_ip)
            self._per_address[address] += 1
        return None

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._state_lock:
                self._session_threads.discard(threading.current_thread())
                self._per_address[client_address[0]] -= 1
                if not self._per_address[client_address[0]]:
                    del self._per_address[client_address[0]]

    def _count_internal_error(self):
        with self._state_lock:  # session, writer and housekeeping threads fail at the same time too
            self.internal_errors += 1

    def handle_error(self, request, client_address):
        """A session raised: log one line with the peer's address and keep serving."""
        self._count_internal_error()
        error = sys.exc_info()[1]
        log.error("%s:%s: internal error: %r", client_address[0], client_address[1], error, exc_info=True)

    def guessing(self, address):
        """Return True if this address gave WRONG_PASSWORDS_PER_MINUTE wrong passwords in the last minute."""
        with self._state_lock:
            wrong = self._wrong_passwords.get(address)
            return wrong is not None and wrong.recent() >= WRONG_PASSWORDS_PER_MINUTE

    def note_wrong_password(self, address):
        with self._state_lock:
            if len(self._wrong_passwords) > 10000:  # addresses that guessed long ago
                self._wrong_passwords.clear()
            self._wrong_passwords.setdefault(address, RecentEvents(60.0)).add()

    def add_session(self, session):
        with self._state_lock:
            self._sessions.add(session)
            stopped = self._stopped
        if stopped:  # accepted while stop() ran: it did not see this one
            try:
                session.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def remove_session(self, session):
        with self._state_lock:
            self._sessions.discard(session)

    def stop(self, timeout=2.0):
        """Say goodbye to every client, close every socket and join the threads.

        Call from another thread than serve_forever(). Safe to call twice.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = self.stopping = True
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
        self._housekeeping_stop.set()
        self._housekeeper.join(max(0.1, deadline - time.monotonic()))
        self.transport.stop(max(0.1, deadline - time.monotonic()))
        self.hub.store.close()
        if self.internal_errors:
            log.warning("%d internal errors while serving (see the tracebacks above)", self.internal_errors)


def _heap_trimmer():
    """Return glibc's malloc_trim() (it gives freed heap back to the system), or None elsewhere.

    glibc keeps what a burst freed in the middle of the heap: 5,000 connections
    joining left about 4 KiB each of freed memory counted against the server.
    Other C libraries (macOS, Windows, musl) have no such call; nothing is needed.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return None


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


class ServerConsole:
    """The server's terminal as a console: its owner types /kick, /ban, /say and so on.

    Runs on the "console" thread, reading stdin until it ends; a stdin that is not a
    terminal (a service, nohup, CI) simply ends at once and the server runs on.
    """

    HELP = CONSOLE_HELP_TEXT

    def __init__(self, server, stdin=None, stdout=None):
        self.server = server
        self.quit_requested = threading.Event()  # set by /quit; run_server's main loop watches it
        self.moderation = server.hub.moderation
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout

    def start(self):
        if self.stdin is not None:
            threading.Thread(target=self._console_loop, name="console", daemon=True).start()

    def _console_loop(self):
        """Runs on the console thread: one command a line, until stdin ends."""
        try:
            for line in self.stdin:
                if line.strip():
                    self._print(self.run_command(line.strip()))
        except (OSError, ValueError):  # stdin closed or not readable: nothing to do
            return

    def _print(self, text):
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def run_command(self, line):
        """Carry out one console command; return what to show its owner."""
        action, value = parse_command(line, {}, "console")
        if action is None:  # a blank line
            return "Unknown command. " + self.HELP
        if action == "error":
            return value
        if action == "send":  # an operator's frame, carried out with the console's own powers (by=None)
            action = value["type"]
        try:
            return getattr(self, "_do_" + action)(value)
        except ProtocolError as error:
            return error.text

    def _do_help(self, text):
        return text

    def _do_users(self, _):
        lines = self.moderation.describe()
        return "%d here:\n  %s" % (len(lines), "\n  ".join(lines)) if lines else "Nobody is here."

    def _do_kick(self, frame):
        return self.moderation.kick(None, frame["name"], frame.get("reason"))

    def _do_ban(self, frame):
        return self.moderation.ban(None, frame["target"], frame.get("minutes"), frame.get("reason"))

    def _do_unban(self, frame):
        return self.moderation.unban(None, frame["target"])

    def _do_bans(self, _):
        bans = self.moderation.bans()
        lines = ["%s %s%s%s" % (kind, value, _until_words(until), _reason_words(reason))
                 for kind, value, until, reason in bans]
        return "\n".join(lines) if lines else "Nobody is banned."

    def _do_mute(self, frame):
        return self.moderation.mute(None, frame["name"], frame.get("minutes"), frame.get("reason"))

    def _do_unmute(self, frame):
        return self.moderation.unmute(None, frame["name"])

    def _do_op(self, frame):
        return self.moderation.set_operator(None, frame["name"], True)

    def _do_deop(self, frame):
        return self.moderation.set_operator(None, frame["name"], False)

    def _do_say(self, text):
        return self.moderation.announce(text)

    def _do_quit(self, _):
        # Not interrupt_main(): a server started in the background of a shell script
        # ignores SIGINT, and the interrupt would be lost.
        self.quit_requested.set()
        return "Stopping the server."


def start_discovery(server, host, fingerprint=None):
    """Answer discovery probes on the server's port number (UDP); return the responder or None."""
    hub = server.hub

    def describe():  # runs on the discovery thread
        return {"name": hub.server_name, "port": server.port, "users": hub.count(),
                "password": hub.password is not None, "tls": fingerprint is not None,
                "fingerprint": fingerprint, "version": PROTOCOL_VERSION}
    try:
        responder = DiscoveryResponder(host, server.port, describe)
    except OSError as error:
        log.warning("discovery is off: UDP port %d: %s", server.port, error.strerror or error)
        return None
    responder.start()
    return responder


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


def web_address(host, port, tls):
    """Return the address a browser opens for the chat: http://192.168.1.7:13333/ (https with TLS)."""
    shown = "[%s]" % host if ":" in host else host
    return "%s://%s:%d/" % ("https" if tls else "http", shown, port)


def print_qr_code(text, stream=None):
    """Draw text's QR code on a terminal that can show it; return True if it was drawn."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()) or os.environ.get("TERM") == "dumb":
        return False
    try:
        drawing = qr_terminal(text)
        drawing.encode(stream.encoding or "ascii")  # a console that cannot show half blocks gets none
    except (UnicodeEncodeError, LookupError, UserError):
        return False
    if os.name == "nt":
        os.system("")  # lets a Windows 10 console obey the colour escape sequences
    stream.write(drawing)
    return True


def print_join_instructions(server, host):
    """Print where the server listens, the command the others should run, and the web address with its QR code.

    Return the web address people were given (shared files' addresses begin with it).
    """
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
        print("IRC clients (HexChat, irssi, WeeChat...) and nc or telnet use the same address and port %d:" % port)
        print("    nc %s %d" % (addresses[0], port))
        web = web_address(addresses[0], port, server.tls_context is not None)
        print("Phones and browsers open %s, or point a phone's camera at this code:" % web)
        sys.stdout.flush()
        if not print_qr_code(web):
            print("    (the code is drawn when the server runs in a terminal)")
    elif host in ("", "0.0.0.0", "::"):
        print("No network address found: is this computer connected to the network?")
    print("On this computer: python3 localchat.py YOUR-NAME%s" % (" --server 127.0.0.1" + suffix if suffix else ""))
    if not addresses:
        web = web_address("127.0.0.1" if host in ("", "0.0.0.0", "::") else host, port,
                          server.tls_context is not None)
        print("A browser on this computer opens %s" % web)
    print("Stop the server with Ctrl+C.")
    sys.stdout.flush()
    return web


def server_certificate(args):
    """Return (ssl context, fingerprint) for --tls, making a certificate the first time."""
    if bool(args.cert) != bool(args.key):
        raise UserError("--cert and --key go together.")
    if args.cert:
        cert_path, key_path = Path(args.cert), Path(args.key)
    else:
        cert_path, key_path = data_dir() / "tls-cert.pem", data_dir() / "tls-key.pem"
        if not (cert_path.is_file() and key_path.is_file()):
            print("Making a certificate for encryption (once; it is kept in %s)..." % cert_path.parent)
            sys.stdout.flush()
            private_folder(cert_path.parent)  # the key goes there
            host = socket.gethostname()
            names = [host, "localhost", "127.0.0.1"] + lan_addresses()
            # A certificate's DNS names are ASCII: a computer named "Jürgen-PC" leaves its name out.
            write_certificate_files(cert_path, key_path, host[:64] or "localchat",
                                    [name for name in names if name and name.isascii()])
    try:
        context = server_tls_context(str(cert_path), str(key_path))
        fingerprint = certificate_fingerprint(cert_path.read_text(encoding="ascii"))
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise UserError("cannot use the certificate %s with the key %s: %s" % (cert_path, key_path, error)) from None
    return context, fingerprint


def server_password(asked):
    """Return the server's password (from LOCALCHAT_PASSWORD or a prompt), or None."""
    password = os.environ.get("LOCALCHAT_PASSWORD")
    if password or not asked:
        return password or None
    if not sys.stdin or not sys.stdin.isatty():
        raise UserError("--password needs the password: set LOCALCHAT_PASSWORD, or start the server in a terminal.")
    password = getpass.getpass("Password for this chat: ")
    if not password:
        raise UserError("the password may not be empty.")
    return password


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
    temporary = Path(tempfile.mkdtemp(prefix="localchat-files-")) if args.no_history else None
    try:
        return _serve(args, temporary)
    finally:  # with --no-history shared files go with the server, however it ends (a port taken, Ctrl+C)
        if temporary is not None:
            shutil.rmtree(str(temporary), ignore_errors=True)


def _serve(args, temporary):
    """Run the server, with shared files in the folder `temporary` if it is given; return the exit code."""
    limits = Limits(**{attribute: getattr(args, attribute) for attribute, _, _ in Limits.TABLE})
    if args.no_history:
        store, where = MemoryStore(), "History: kept in memory only (--no-history): it ends with the server."
        files_folder = temporary
    else:
        path = Path(args.history) if args.history else data_dir() / "history.sqlite3"
        store, where = SqliteStore(path), "History: kept in %s" % path
        files_folder = path.with_name(path.stem + "-files")  # history-files beside history.sqlite3
    files = FileStore(files_folder, limits.files_bytes) if limits.max_file_bytes > 0 else None
    if files is None:
        where += "\nShared files: turned off (--max-file-mb 0)."
    elif temporary is None:
        where += "\nShared files: kept in %s (up to %s in all)" % (files_folder, file_size_text(limits.files_bytes))
    else:
        where += "\nShared files: kept until the server stops (up to %s in all)." % file_size_text(limits.files_bytes)
    hub = ChatHub(args.server_name or socket.gethostname(), store, scrollback=args.scrollback, limits=limits,
                  password=server_password(args.password), files=files)
    for name in args.op or []:
        hub.moderation.add_operator(name)
    hub.moderation.own_addresses = set(lan_addresses())  # and loopback: never banned by address
    context, fingerprint = server_certificate(args) if args.tls else (None, None)
    try:
        server = ChatServer((args.host, args.port), hub=hub, tls_context=context,
                            clear_passwords=args.allow_clear_passwords, diagnostics=args.diagnostics)
    except OSError as error:
        store.close()
        raise UserError(bind_error_sentence(error, args.host, args.port)) from None
    # SIGTERM goes Ctrl+C's way. Set before the address is printed: whoever reads it may
    # signal at once. Not a handler that sets an Event: it runs on the main thread, maybe
    # while that thread holds the same Event's lock inside wait(), and would deadlock.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    hub.web_base = print_join_instructions(server, args.host).rstrip("/")
    print(where)
    if hub.password is not None:
        print("A password is needed to join.")
        if context is None and not args.allow_clear_passwords:
            print("IRC clients and nc cannot join: they would send the password unencrypted. Use --tls, or "
                  "--allow-clear-passwords to let them anyway.")
    if fingerprint:
        print("Connections are encrypted. Certificate fingerprint (SHA-256), for people to compare:")
        print("    " + fingerprint)
    print("Type /help for the console's commands.")
    sys.stdout.flush()
    discovery = None if args.no_discovery else start_discovery(server, args.host, fingerprint)
    console = ServerConsole(server)
    console.start()
    log.info("server started on %s:%d", args.host, server.port)
    accept_thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    try:
        accept_thread.start()  # inside the try: a signal the moment clients can join still stops cleanly
        while True:
            time.sleep(0.5)  # in steps, so Ctrl+C is seen on Windows too
            if console.quit_requested.is_set():
                break
    except KeyboardInterrupt:
        pass
    log.info("shutting down")
    if discovery is not None:
        discovery.stop()
    server.stop()
    if accept_thread.is_alive():
        accept_thread.join(1.0)
    log.info("server stopped")
    return 0


# =============================================================================
# 16. Client connection (no Tk)
# =============================================================================
#
# ChatConnection is what both clients use: connect and hello on the caller's
# thread, then a reader thread hands every frame to a callback. It knows nothing
# of Tk, so the tests drive it over real sockets without a display.


def connect_error_sentence(error, host, port, shut_down=False):
    """Return one sentence for a person saying why connecting to host:port failed.

    shut_down: the server said goodbye as it shut down, so there is no firewall to blame.
    """
    where = "%s:%d" % (host, port)
    if shut_down:
        return "The server at %s has shut down; LocalChat joins again once it is back." % where
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


class SendPacer:
    """A client's copy of the server's flood allowance (announced in the welcome), to stay inside it.

    A little below the server's own figures: the server's allowance starts a
    moment before the welcome arrives.
    """

    MARGIN = 0.9  # of the server's rates

    def __init__(self, limits=None):
        limits = limits if isinstance(limits, dict) else {}

        def number(key):
            value = limits.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e9
            return float(value) if ok else 0.0
        self.messages = TokenBucket(number("messages_per_s") * self.MARGIN, max(1.0, number("message_burst") - 2))
        self.bytes = TokenBucket(number("kbytes_per_s") * 1024 * self.MARGIN,
                                 max(number("kbyte_burst") * 1024 - 4096, MAX_TEXT_BYTES))

    def wait_for(self, size):
        """Spend the allowance of one message of size bytes and return 0, or return the seconds to wait."""
        return take_message(self.messages, self.bytes, size)


FILE_ANSWER_S = 10.0       # client: how long the server may take to answer a request to share a file
FILE_TRANSFER_S = 30.0     # client: an upload or download that makes no progress this long has failed
FILE_SEND_BYTES = 64 * 1024  # client: an upload is read and sent this much at a time


def downloads_folder():
    """Return where downloads are saved: the user's Downloads folder, or the home folder without one."""
    folder = Path.home() / "Downloads"
    return folder if folder.is_dir() else Path.home()


def open_with_system(path, on_failure=None):
    """Open a file with the application the system has for it; return a sentence if that failed, else None.

    On Linux and macOS the opener runs on: a thread waits for it (so no zombie is left)
    and, if it says it failed, calls on_failure(sentence) from that thread.
    """
    try:
        if sys.platform == "win32":
            os.startfile(str(path))  # pylint: disable=no-member  (Windows only)
            return None
        opener = subprocess.Popen(["open" if sys.platform == "darwin" else "xdg-open", str(path)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as error:
        return "Cannot open %s: %s." % (path, error.strerror or error)

    def wait():
        if opener.wait() != 0 and on_failure is not None:
            on_failure("This computer has no application that opens %s; it is saved in %s." % (Path(path).name, Path(path).parent))
    threading.Thread(target=wait, name="opener", daemon=True).start()
    return None


def _new_file(folder, name):
    """Create and open a new file for name in folder, never over another: "name (1).pdf" if it is taken."""
    name = clean_file_name(name)
    stem, dot, extension = name.rpartition(".")
    if not dot:
        stem, extension = name, ""
    for number in range(1000):
        candidate = Path(folder) / (name if number == 0 else "%s (%d)%s" % (stem, number, dot + extension))
        try:
            return candidate, open(str(candidate), "xb")
        except FileExistsError:
            continue
    raise UserError("%s holds too many files called %s." % (folder, name))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a LocalChat server whose certificate must be the one its chat connection checked."""

    def __init__(self, host, port, fingerprint, timeout):
        context = client_tls_context()
        context.set_alpn_protocols(["http/1.1"])
        super().__init__(host, port, timeout=timeout, context=context)
        self.fingerprint = fingerprint

    def connect(self):
        super().connect()
        der = self.sock.getpeercert(binary_form=True)
        if der_fingerprint(der or b"") != self.fingerprint:
            self.close()
            raise ssl.SSLError("the server's certificate is not the one the chat connection trusted")


class ChatConnection:
    """A client's connection to a LocalChat server, reconnecting by itself when asked to.

    connect() blocks (call it off the Tk thread) and raises UserError. start() then
    runs a reader thread that calls on_event(frame) for every frame, and a sender
    thread that sends what post() queued. When the connection drops and
    `reconnect` is set, the reader thread reconnects with backoff, resuming the
    session: the server replays what was missed, and messages that were not
    confirmed are sent again. A server certificate nobody has trusted yet (new,
    or changed) is put to `trust` before anything is sent (see connect()).
    Local frames the server never sends:
      {"type": "reconnecting", "text": ..., "delay": seconds}
      {"type": "disconnected", "text": ..., "expected": bool, "code": why or None}
                                                      (the very last frame)
    `code` says why it ended for good: a bye's reason ("kicked", "banned",
    "replaced", "quit") or a refusal's code ("name_taken", "auth_failed", ...).
    `rooms` may be set before connect(): the hello asks to join them again.
    """

    def __init__(self, host, port, name, on_event=None, identity=None, reconnect=False, password=None,
                 tls=False, fingerprint=None, trust=None):
        self.host = host
        self.port = port
        self.name = name
        self.identity = identity
        self.password = password
        # Encrypt; also switched on when a server says it needs it. A pinned fingerprint
        # can only be checked encrypted: a plain server must not get around it.
        self.tls = tls or bool(fingerprint)
        self.pinned = fingerprint  # the certificate fingerprint the server's owner gave, if any
        self.channel = None  # the TlsChannel while connected with encryption
        self.fingerprint = None  # the server's certificate fingerprint, once seen
        self.fingerprint_status = None  # "accepted", "known", "pinned" or "unsaved" (see trust_fingerprint)
        self.fingerprint_problem = None  # with "unsaved": why the fingerprint could not be kept
        # Asked trust(UntrustedCertificate) -> bool before a certificate nobody trusted yet
        # is used (see connect()); without it such a certificate is refused.
        self.trust = trust
        self.accepted = None  # the fingerprint a person trusted through `trust` (kept while we run)
        self.reconnect = reconnect
        self.on_event = on_event or (lambda frame: None)
        self.welcome = None
        self.pacer = SendPacer()  # no limits known until a welcome says them
        self.last_id = None  # the highest message id seen
        self.rooms = []  # the rooms we are in, in joining order
        self.end_code = None  # why the connection ended for good (see the class docstring)
        self.server_shut_down = False  # the server's last word was a shutdown bye
        self._sock = None
        self._sock_lock = threading.Lock()  # connect() attaching a socket vs close() taking it away
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._closing = threading.Event()
        self._leaving = threading.Event()  # close() began: the server's goodbye is expected
        self._synced = threading.Event()  # set while connected and caught up
        self._outgoing = queue.Queue()  # frames for the sender thread (see post())
        self.unconfirmed = collections.OrderedDict()  # ref -> say frame sent but not yet echoed
        self._answers = {}  # ref -> queue.Queue for the answer to a request to share a file
        self._threads = []

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    @property
    def started(self):
        """True once start() ran: its threads read and send (or did)."""
        return bool(self._threads)

    @property
    def closed(self):
        """True once close() began: nothing more will come of this connection. Any thread."""
        return self._leaving.is_set() or self._closing.is_set()

    # -- connecting ------------------------------------------------------------

    def connect(self, timeout=CONNECT_TIMEOUT_S):
        """Connect, say hello and wait for the welcome; return it or raise UserError.

        A certificate that is new to us, or changed, ends the attempt before any hello
        or password is sent; the socket is closed and `trust` is asked (on this
        thread: it may wait for a person as long as it likes). If it says yes, the
        fingerprint is saved only when the next attempt meets the same certificate.
        Raises UntrustedCertificate (a UserError) when nobody trusted it.
        """
        try:
            return self._connect_once(timeout)
        except UntrustedCertificate as untrusted:
            if self.trust is None or not self.trust(untrusted):
                raise
            self.accepted = untrusted.fingerprint
        return self._connect_once(timeout)  # asked once: a different certificate now is refused

    def _connect_once(self, timeout):
        """Connect once (switching to encryption when the server asks for it); return the welcome."""
        hello = {"type": "hello", "name": self.name, "version": PROTOCOL_VERSION}
        if self.identity:
            hello["identity"] = self.identity
        if self.rooms:  # the rooms to be in again: after a lost connection, or from last time
            hello["rooms"] = list(self.rooms)
        if self.welcome is not None:  # reconnecting: resume where we were
            hello["resume"] = self.welcome.get("resume")
            if self.last_id is not None:
                hello["last_id"] = self.last_id
        self._buffer = bytearray()
        self.channel = None
        if not self.tls and self.address in known_fingerprints():
            self.tls = True  # encrypted before: a plain server at that address must not slip past the check
        try:
            self._attach(socket.create_connection((self.host, self.port), timeout=timeout))
            if self.tls:
                self._buffer = bytearray(self._start_tls(timeout))
            self.send(hello)
            frame = self._answer_challenge(self._read_frame())
        except OSError as error:
            self._close_socket()
            raise UserError(connect_error_sentence(error, self.host, self.port, self.server_shut_down),
                            code="unreachable") from None
        except ProtocolError:
            self._close_socket()
            raise UserError("%s does not speak the LocalChat protocol." % self.address) from None
        if frame is not None and frame.get("code") == "tls_required" and not self.tls:
            self._close_socket()
            self.tls = True  # the server encrypts: do so too, from now on
            return self._connect_once(timeout)
        return self._check_welcome(frame)

    def _attach(self, sock):
        """Make sock the connection's socket; if close() came first, close it and raise OSError.

        Without this, a socket connected just after close() took the old one would
        wait the whole CONNECT_TIMEOUT_S for a welcome nobody wants any more.
        """
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self._sock_lock:
            if not self._closing.is_set():
                self._sock = sock
                return
        sock.close()
        raise OSError(errno.ECANCELED, "the connection was closed while connecting")

    def _start_tls(self, timeout):
        """Encrypt the new connection and check the server's certificate; return early plaintext."""
        channel = TlsChannel(client_tls_context(), server_side=False)
        try:
            early = channel.handshake(self._sock, timeout)
        except (OSError, ValueError) as error:  # ssl.SSLError and socket.timeout are OSErrors
            self._close_socket()
            raise UserError(tls_error_sentence(error, self.address, timeout)) from None
        fingerprint = channel.fingerprint()
        try:
            self.fingerprint_status, self.fingerprint_problem = trust_fingerprint(
                self.address, fingerprint, self.pinned, self.accepted)
        except UserError:
            self._close_socket()
            raise
        self.fingerprint = fingerprint  # only now: files go to the server with this certificate (see _http)
        self.channel = channel
        return early

    def _answer_challenge(self, frame):
        """If the server asks for a password, prove we know it; return the next frame."""
        if frame is None or frame["type"] != "challenge":
            return frame
        if not self.password:
            self._close_socket()
            raise UserError("The server at %s needs a password." % self.address, code="password_required")
        nonce = frame.get("nonce") if isinstance(frame.get("nonce"), str) else ""
        self.send({"type": "auth", "proof": password_proof(self.password, nonce)})
        return self._read_frame()

    def _check_welcome(self, frame):
        if frame is None:
            self._close_socket()
            raise UserError("The server at %s closed the connection without welcoming us." % self.address)
        if frame["type"] != "welcome":
            self._close_socket()
            raise UserError(frame.get("text") or "The server at %s refused us." % self.address,
                            code=frame.get("code"))
        frame["resumed"] = self.welcome is not None and frame.get("resume") == self.welcome.get("resume")
        self.welcome = frame
        self.server_shut_down = False
        self.pacer = SendPacer(frame.get("limits"))  # the server's flood allowance starts anew
        self.name = frame.get("name", self.name)
        if not frame["resumed"]:
            self.rooms = list(frame.get("rooms") or [])
        return frame

    def start(self):
        """Start the reader and sender threads (after connect() succeeded)."""
        for target, name in ((self._reader_loop, "reader"), (self._sender_loop, "sender")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    # -- sending ---------------------------------------------------------------

    def send(self, fields):
        """Send one frame now; raise OSError if the connection is gone. Any thread."""
        data = encode_frame(fields)
        with self._send_lock:
            if self._sock is None:
                raise OSError(errno.ENOTCONN, "not connected")
            if self.channel is not None:
                data = self.channel.encrypt(data)
            self._sock.sendall(data)

    def post(self, fields):
        """Queue a frame for the sender thread; never blocks (for the Tk thread).

        Frames posted while disconnected wait for the reconnection.
        """
        self._outgoing.put(fields)

    def _sender_loop(self):
        """Runs on the sender thread: send posted frames in order, waiting while disconnected."""
        while True:
            fields = self._outgoing.get()
            if fields is None:
                return
            while not self._synced.wait(0.5):
                if self._closing.is_set():
                    return
            if fields.get("type") == "say":
                if self._pace(fields):
                    return
                if fields.get("ref"):
                    self.unconfirmed[fields["ref"]] = fields
            try:
                self.send(fields)
            except OSError:
                pass  # a say stays unconfirmed and is sent again after reconnecting

    def _pace(self, fields):
        """Wait until the server's limits let this message go; return True if closing meanwhile.

        Runs on the sender thread. A script piping lines is slowed down, never refused.
        """
        size = len(str(fields.get("text", "")).encode("utf-8", "replace"))
        for _ in range(100000):
            wait = self.pacer.wait_for(size)
            if not wait:
                return False
            if self._closing.wait(wait):
                return True
        return False

    # -- reading ---------------------------------------------------------------

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
            if self.channel is not None:
                chunk = self._decrypt(chunk)
                if chunk is None:
                    return None
            self._buffer += chunk

    def _decrypt(self, raw):
        """Return the plaintext in raw (maybe b""), or None once the server closed TLS."""
        plaintext, _ = self.channel.decrypt(raw, keep_output=True)
        if self.channel.output_waiting():
            with self._send_lock:  # what TLS owes the server goes before any later frame
                if self._sock is not None:
                    self._sock.sendall(self.channel.encrypt(b""))
        return None if self.channel.closed and not plaintext else plaintext

    def _reader_loop(self):
        """Runs on the reader thread: read until the connection ends, then reconnect or stop."""
        self.on_event(self.welcome)
        while True:
            text, final = self._read_until_closed()
            self._synced.clear()
            if final or self.closed or not self.reconnect:  # closed: close() began, nothing to come back to
                break
            text, final = self._reconnect(text)
            if final:
                break
        expected = self._closing.is_set() or self._leaving.is_set()
        self.on_event({"type": "disconnected", "text": text, "expected": expected, "code": self.end_code})

    def _read_until_closed(self):
        """Hand each frame to on_event until the connection ends; return (why, final)."""
        text, final = "The server closed the connection.", False
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
                        return "The server stopped answering.", False
                    self.send({"type": "ping"})
                    continue
                silent_since = time.monotonic()
                if frame is None:
                    break
                if frame["type"] == "bye":
                    text = frame.get("text") or text
                    final = frame.get("reason") in ("quit", "replaced", "kicked", "banned")
                    self.end_code = frame.get("reason") if final else None
                    self.server_shut_down = frame.get("reason") == "shutdown"
                self._note(frame)
        except (OSError, ProtocolError):
            text = "The connection to the server was lost."
        finally:
            self._close_socket()
        return text, final

    def _note(self, frame):
        """Keep track of ids, rooms and confirmations, answer pings; pass the frame on."""
        kind = frame["type"]
        if kind == "ping":
            self.send({"type": "pong"})
            return
        waiting = self._answers.get(frame.get("ref")) if kind in ("upload_ready", "error") else None
        if waiting is not None:  # share_file() is waiting for it, and says what became of it
            try:
                waiting.put_nowait(frame)
            except queue.Full:  # a second answer to one request (a confused server): the first counts
                pass
            return
        if kind == "message" and isinstance(frame.get("id"), int):
            self.last_id = max(self.last_id or 0, frame["id"])
            if frame.get("from") == self.name:
                self.unconfirmed.pop(frame.get("ref"), None)
        elif kind == "room" and frame.get("room") not in self.rooms:
            self.rooms.append(frame.get("room"))
        elif kind == "left" and frame.get("room") and frame.get("name") == self.name:
            self.rooms = [r for r in self.rooms if name_key(r) != name_key(frame["room"])]
        elif kind == "renamed" and frame.get("old") == self.name:
            self.name = frame.get("name")
        elif kind == "synced":
            self.last_id = max(self.last_id or 0, frame.get("last_id") or 0)
            self._resend_unconfirmed()
            self._synced.set()
        elif kind == "error" and frame.get("ref"):  # refused (not_stored): never sent again
            self.unconfirmed.pop(frame.get("ref"), None)
        self.on_event(frame)

    # -- files (each call blocks: run them off the Tk thread) ---------------------------

    def share_file(self, path, room=None, to=None, progress=None):
        """Share a file with a room (general by default) or, with `to`, with one person.

        Asks the server, sends the bytes over HTTP on the same port (encrypted with the
        certificate this connection checked), and returns the file's address once it is
        announced. progress(sent, total) is called as the bytes go. Raises UserError.
        """
        path = self.check_file(path)
        try:
            source = open(str(path), "rb")
            size = os.fstat(source.fileno()).st_size
        except OSError as error:
            raise UserError("Cannot read %s: %s." % (path, error.strerror or error)) from None
        with source:
            return self._share(source, size, path.name, room, to, progress)

    def check_file(self, path):
        """Return path as a Path if it is a file this chat may take; else raise UserError with why not."""
        path = Path(path).expanduser()
        try:
            size = path.stat().st_size
        except OSError as error:
            raise UserError("Cannot read %s: %s." % (path, error.strerror or error)) from None
        if path.is_dir():
            raise UserError("%s is a folder: share the files in it one by one." % path)
        self._check_size(path.name, size)
        return path

    def share_bytes(self, data, name, room=None, to=None, progress=None):
        """Share bytes held in memory (a pasted picture) as a file called name; see share_file()."""
        return self._share(io.BytesIO(data), len(data), name, room, to, progress)

    def _check_size(self, name, size):
        limit = ((self.welcome or {}).get("limits") or {}).get("max_file_bytes")
        if limit == 0:
            raise UserError("This chat's server does not take files.")
        if isinstance(limit, int) and size > limit:
            raise UserError("%s is %s; this chat takes files of up to %s." % (
                clean_file_name(name), file_size_text(size), file_size_text(limit)))

    def _share(self, source, size, name, room, to, progress):
        self._check_size(name, size)
        ref = "f" + secrets.token_hex(6)
        request = {"type": "upload", "name": name, "size": size, "ref": ref}
        request.update({"to": to} if to is not None else {"room": room or GENERAL_ROOM})
        answers = self._answers[ref] = queue.Queue(1)
        try:
            self.send(request)
            answer = answers.get(timeout=FILE_ANSWER_S)
        except (OSError, UserError):
            raise UserError("The connection to the server was lost; the file was not shared.") from None
        except queue.Empty:
            raise UserError("The server did not answer; the file was not shared.") from None
        finally:
            self._answers.pop(ref, None)
        if answer["type"] == "error":
            raise UserError(answer.get("text") or "The server refused the file.", code=answer.get("code"))
        return self._upload(answer["url"], source, size, progress)

    def _upload(self, url, source, size, progress):
        """Send the bytes to the one-time address; return the file's address. Raises UserError."""
        connection = self._http()
        try:
            connection.putrequest("PUT", url, skip_accept_encoding=True)
            connection.putheader("Content-Length", str(size))
            connection.putheader("Content-Type", "application/octet-stream")
            connection.endheaders()
            sent = 0
            while sent < size:
                chunk = source.read(min(FILE_SEND_BYTES, size - sent))
                if not chunk:
                    raise UserError("The file got shorter while it was being sent; it was not shared.")
                try:
                    connection.send(chunk)
                except ConnectionError:  # answered before the end (a full disk) and closed: the answer says why
                    break
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)
            response = connection.getresponse()
            body = response.read(64 * 1024)
        except (OSError, http.client.HTTPException) as error:
            raise UserError("Sending the file failed: %s." % (getattr(error, "strerror", None) or error)) from None
        finally:
            connection.close()
        if response.status != 201:
            text = body.decode("utf-8", "replace").strip()
            raise UserError(text or "The server refused the file (HTTP %d)." % response.status)
        try:
            return json.loads(body.decode("utf-8"))["url"]
        except (ValueError, KeyError, TypeError):
            raise UserError("The server's answer to the file was not understood.") from None

    def fetch_file(self, url, folder=None, progress=None):
        """Download a shared file's address into folder (Downloads by default); return the Path saved.

        Never writes over a file: "report (1).pdf" when "report.pdf" is there. Raises UserError.
        """
        folder = Path(folder) if folder is not None else downloads_folder()
        name = urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
        connection, response = self._get(url)
        try:
            target, output = _new_file(folder, name)
        except OSError as error:
            connection.close()
            raise UserError("Cannot save into %s: %s." % (folder, error.strerror or error)) from None
        try:
            with output:
                self._copy_body(response, output, progress)
        except BaseException:
            _remove(target)  # nothing half-downloaded is left behind
            raise
        finally:
            connection.close()
        return target

    def fetch_bytes(self, url, limit):
        """Download a shared file's bytes (a picture for a thumbnail); raises UserError, also past limit bytes."""
        connection, response = self._get(url)
        try:
            data = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as error:
            raise UserError("The download failed: %s." % (getattr(error, "strerror", None) or error)) from None
        finally:
            connection.close()
        if len(data) > limit:
            raise UserError("The file is larger than %s." % file_size_text(limit))
        return data

    def file_address(self, url):
        """Return a shared file's whole address, for a browser or curl: https://host:port/files/..."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d%s" % ("https" if self.tls else "http", host, self.port, url)

    def _get(self, url):
        """GET a shared file; return (connection, response) once its answer is 200. Raises UserError."""
        if not url.startswith("/files/") or not url.isascii():  # a server quotes names; http.client takes ASCII
            raise UserError("That is not the address of a shared file.")
        connection = self._http()
        try:
            connection.request("GET", url)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise UserError("The download failed: %s." % (getattr(error, "strerror", None) or error)) from None
        if response.status != 200:
            connection.close()
            if response.status == 404:
                raise UserError("This file is no longer on the server.", code="expired")
            raise UserError("The server refused the download (HTTP %d)." % response.status)
        return connection, response

    @staticmethod
    def _copy_body(response, output, progress):
        total = response.length  # http.client's reading of Content-Length: None if absent or no number
        if total is None and response.getheader("Content-Length") is not None:
            raise UserError("The server's answer to the download was not understood; nothing was saved.")
        done = 0
        try:
            while True:
                chunk = response.read(FILE_SEND_BYTES)
                if not chunk:
                    break
                output.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total or 0)  # 0: the size is not known
        except (OSError, http.client.HTTPException) as error:
            raise UserError("The download failed: %s." % (getattr(error, "strerror", None) or error)) from None
        if total is not None and done != total:
            raise UserError("The download was cut short; nothing was saved.")

    def _http(self):
        """Return an HTTP connection to the chat's server: encrypted, and with the very certificate
        this connection checked, when it is."""
        if self.tls and self.fingerprint is None:  # never in clear, and never to a certificate nobody trusted
            raise UserError("The connection to the server is not encrypted yet; try again once it is.")
        if self.tls:
            return _PinnedHTTPSConnection(self.host, self.port, self.fingerprint, FILE_TRANSFER_S)
        return http.client.HTTPConnection(self.host, self.port, timeout=FILE_TRANSFER_S)

    def _resend_unconfirmed(self):
        """After (re)connecting: send again what the server never echoed, in order."""
        for fields in list(self.unconfirmed.values()):
            self.send(fields)

    def _reconnect(self, why):
        """Try to connect again with growing pauses; return (text, final) on giving up."""
        delay = 0.5
        while not self._closing.is_set():
            self.on_event({"type": "reconnecting", "delay": delay, "why": why,
                           "text": "%s Reconnecting in %g s..." % (why, delay)})
            if self._closing.wait(delay):
                break
            try:
                self.on_event(self.connect())
                return None, False
            except UserError as error:
                if error.code in ("name_taken", "bad_name", "banned", "auth_failed", "password_required",
                                  "fingerprint_new", "fingerprint_changed", "fingerprint_mismatch"):
                    self.end_code = error.code
                    return str(error), True
                why = str(error)
            delay = min(delay * 2, RECONNECT_MAX_S)
        return "Disconnected.", True

    # -- closing ---------------------------------------------------------------

    def close(self, say_bye=True, wait_s=2.0):
        """Leave: send what is posted and a bye (if asked), then close the socket.

        Blocks for up to wait_s (a server that stopped reading never takes the bye),
        so the window calls it on a worker thread. A connect() still under way on
        another thread gives up at once.
        """
        self._leaving.set()  # before the bye: the server's answer may end the reader before _closing is set
        if say_bye:
            self._outgoing.put({"type": "bye"})
        self._outgoing.put(None)
        deadline = time.monotonic() + wait_s
        sender = self._threads[1] if len(self._threads) > 1 else None
        if sender is not None and self._synced.is_set():
            sender.join(wait_s)
        elif say_bye and self._sock is not None:  # not synced (yet): the sender thread would hold it
            try:
                self.send({"type": "bye"})
            except OSError:
                pass
        self._closing.set()
        self._close_socket()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _close_socket(self):
        with self._sock_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def config_dir():
    """Return the folder for the client's settings (LOCALCHAT_CONFIG_DIR overrides it)."""
    override = os.environ.get("LOCALCHAT_CONFIG_DIR")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "LocalChat"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "LocalChat"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "localchat"


def load_settings():
    """Return the saved client settings (a dict; empty when there are none yet)."""
    try:
        settings = json.loads((config_dir() / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def save_settings(settings):
    """Save the client settings; return None, or why they could not be saved (a short phrase).

    Most callers can carry on without: a name or an identity not kept is only a
    nuisance. A fingerprint not kept is a security matter, and is told.
    """
    folder = config_dir()
    temporary = folder / "settings.json.tmp"
    try:
        private_folder(folder)  # the identity token is in it: the owner's alone
        with open(str(private_file(temporary)), "w", encoding="utf-8") as file:
            file.write(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(str(temporary), str(folder / "settings.json"))
        return None
    except OSError as error:
        try:
            temporary.unlink()
        except OSError:
            pass
        return "cannot write %s (%s)" % (folder / "settings.json", error.strerror or error)


def encryption_notice(connection):
    """Return the sentence that tells a person the connection is encrypted, and by whom."""
    words = {"accepted": "trusted by you just now, and remembered",
             "unsaved": "trusted by you for this session only",
             "known": "the same as last time", "pinned": "as given"}
    notice = "Encrypted. The server's certificate fingerprint is %s (%s)." % (
        connection.fingerprint, words.get(connection.fingerprint_status, ""))
    if connection.fingerprint_status == "unsaved":
        notice += " It could not be saved, so next time it cannot be checked: %s." % connection.fingerprint_problem
    return notice


def normal_fingerprint(text):
    """Return a fingerprint as "AB:CD:...", whatever its case, colons or spaces."""
    digits = "".join(ch for ch in text.upper() if ch in "0123456789ABCDEF")
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def known_fingerprints(settings=None):
    """Return the {address: fingerprint} of the servers this client has trusted before."""
    settings = load_settings() if settings is None else settings
    known = settings.get("fingerprints")
    return known if isinstance(known, dict) else {}


def trust_fingerprint(address, fingerprint, pinned=None, accepted=None):
    """Check a server's certificate as SSH checks host keys; return (status, problem).

    status is "pinned" (the fingerprint given), "known" (trusted before), "accepted"
    (`accepted`, the one a person trusted just now: saved here, never earlier) or
    "unsaved" (accepted, but the settings could not be written: problem says why).
    Raises UntrustedCertificate for a certificate nobody trusted, and UserError for
    a pin that does not match.
    """
    if pinned:
        if normal_fingerprint(pinned) != fingerprint:
            raise UserError("The certificate of %s does not match the fingerprint you gave: somebody may be "
                            "pretending to be that server. Not connecting." % address, code="fingerprint_mismatch")
        return "pinned", None
    settings = load_settings()
    known = known_fingerprints(settings)
    previous = known.get(address)
    if fingerprint != accepted:
        if previous != fingerprint:
            raise UntrustedCertificate(address, fingerprint, previous)
        return "known", None
    if previous == fingerprint:
        return "accepted", None  # saved by an earlier attempt of this run (say, before a password)
    known[address] = fingerprint
    settings["fingerprints"] = known
    problem = save_settings(settings)
    return ("accepted", None) if problem is None else ("unsaved", problem)


def load_identity():
    """Return this computer's client identity: a random token, made once and kept.

    The server delivers direct messages that came while we were away only to the
    same identity, never to somebody else who took the name meanwhile.
    """
    settings = load_settings()
    identity = settings.get("identity")
    if not isinstance(identity, str) or not 16 <= len(identity) <= MAX_IDENTITY_CHARS:
        identity = secrets.token_hex(16)
        settings["identity"] = identity
        save_settings(settings)
    return identity


# =============================================================================
# 17. Tk window
# =============================================================================
#
# ChatWindow runs on the Tk thread only. The connection's threads put frames on
# a queue that an after() poll drains; connecting happens on a worker thread.
# tkinter is imported by run_window(), so the server runs where Tk is missing.
# Look holds the theme and text size, Conversation one log, Banner the strip that
# says what went wrong and offers the way on, Notifier the desktop notifications.
# Files go and come on "upload", "download" and "thumbnails" threads (FileSharing),
# which hand their progress and results to the same queue; a FileCard is one shared
# file in a log.

POLL_INTERVAL_MS = 50       # how often the window drains the event queue
EVENTS_PER_POLL = 500       # at most this many events per drain, so typing stays responsive
INPUT_HISTORY = 100         # sent lines that Up/Down can recall
MAX_SAVED_ROOMS = 50        # rooms remembered per server for the next start
GROUP_GAP_S = 300           # messages from one sender closer than this share one name-and-time line
TEXT_SIZES = (9, 10, 11, 12, 13, 14, 16, 18, 20, 24)  # Ctrl+plus/minus steps, in points
DEFAULT_TEXT_SIZE = 11      # readable on a laptop without glasses
NARROW_WIDTH_PX = 760       # below this the people pane hides (a menu item brings it back)
NARROWER_WIDTH_PX = 620     # below this the conversation list hides too
WIDE_WIDTH_PX = 1200        # from this width on the side panes are wider
SYSTEM_QUERY_TIMEOUT_S = 1.5  # asking the system for its dark mode must never hold the window up
URL_PATTERN = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]}]", re.IGNORECASE)
FILE_CARD_WIDTH_PX = 340    # a shared file's card in the log is this wide (less in a narrow window)
THUMBNAIL_WIDTH_PX = 240    # a picture shows in the log at most this wide ...
THUMBNAIL_HEIGHT_PX = 180   # ... and this high, subsampled by a whole step to fit
THUMBNAIL_MAX_BYTES = 8 * 1024 * 1024  # larger pictures get a card only: Tk decodes them on its own thread
THUMBNAIL_MAX_PIXELS = 3840 * 2160     # ... and so do pictures larger than a 4K screenshot
PROGRESS_EVERY_S = 0.2      # a transfer tells the Tk thread how far it is at most this often
# X11 clipboard targets that mean "there is text here" (with any text/plain...): then Ctrl+V
# pastes the text, even if the program that copied offers a picture of it too (office suites do).
TEXT_TARGETS = frozenset(("UTF8_STRING", "STRING", "TEXT", "COMPOUND_TEXT"))

# Each name keeps one colour; the two lists are the same hues, readable on white and on the dark
# background. Ten hues far apart (no two oranges), each dark or light enough for 4.5:1 contrast.
NAME_COLOURS = {
    "light": ("#c62828", "#b45309", "#7a6f00", "#2e7d32", "#00798a",
              "#1565c0", "#4338ca", "#7b1fa2", "#ad1457", "#6d4c41"),
    "dark": ("#ff8a80", "#f5a35c", "#d9c95a", "#7ccf7f", "#4dd0e1",
             "#6aaeff", "#b3a4ff", "#d58ef0", "#f48fb1", "#c9a786"),
}

# The two themes: what every part of the window is painted with.
PALETTES = {
    "light": {"bg": "#f6f7f9", "panel": "#eef0f3", "surface": "#ffffff", "text": "#1d2127",
              "muted": "#6b7380", "border": "#d9dde3", "accent": "#2f6fde", "accent_text": "#ffffff",
              "select": "#dce7fb", "hover": "#e6e9ee", "mention": "#fff4c2", "own": "#ffffff",
              "error": "#b3261e", "link": "#1a5fd0", "banner": "#fdecea", "new": "#d93025",
              "code": "#f1f3f5", "thumb": "#c4c9d1", "card": "#eef1f6"},
    "dark": {"bg": "#1b1e23", "panel": "#202329", "surface": "#16181c", "text": "#e4e6ea",
             "muted": "#959ca8", "border": "#30343b", "accent": "#5b8def", "accent_text": "#ffffff",
             "select": "#2c3a55", "hover": "#2a2e35", "mention": "#3d3516", "own": "#16181c",
             "error": "#ff8a80", "link": "#8ab4f8", "banner": "#3b2423", "new": "#ff6b5e",
             "code": "#23262c", "thumb": "#454b55", "card": "#252a33"},
}


def name_colour_index(name):
    """Return which of the NAME_COLOURS a name always gets (the same on every computer)."""
    return zlib.crc32(name_key(name).encode("utf-8")) % len(NAME_COLOURS["light"])


def name_colour(name, theme="light"):
    """Return the colour a name is shown in, in a theme."""
    return NAME_COLOURS.get(theme, NAME_COLOURS["light"])[name_colour_index(name)]


def split_links(text):
    """Return text as (piece, url or None) pairs: the web addresses in it, and the rest."""
    pieces, at = [], 0
    for match in URL_PATTERN.finditer(text):
        if match.start() > at:
            pieces.append((text[at:match.start()], None))
        url = match.group(0)
        pieces.append((url, url if "://" in url else "http://" + url))
        at = match.end()
    if at < len(text) or not pieces:
        pieces.append((text[at:], None))
    return pieces


def day_label(ts, now=None):
    """Return the words a date separator shows: Today, Yesterday, or the date."""
    day = datetime.date.fromtimestamp(ts)
    today = datetime.date.fromtimestamp(now if now is not None else time.time())
    if day == today:
        return "Today"
    if day == today - datetime.timedelta(days=1):
        return "Yesterday"
    label = "%s %d %s" % (day.strftime("%A"), day.day, day.strftime("%B"))
    return label if day.year == today.year else "%s %d" % (label, day.year)


def _query_system(command):
    """Return what a short system command prints, or "" if it fails, is missing or is slow."""
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=SYSTEM_QUERY_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.decode("utf-8", "replace").strip()


def system_theme():
    """Return "dark" or "light": the system's choice where it can be read, else "light"."""
    if sys.platform == "win32":
        try:
            import winreg
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, r"Software\Microsoft\Windows\CurrentVersion"
                                r"\Themes\Personalize") as key:
                return "light" if winreg.QueryValueEx(key, "AppsUseLightTheme")[0] else "dark"
        except (ImportError, OSError):
            return "light"
    if sys.platform == "darwin":
        return "dark" if _query_system(["defaults", "read", "-g", "AppleInterfaceStyle"]) == "Dark" else "light"
    if shutil.which("gsettings"):
        scheme = _query_system(["gsettings", "get", "org.gnome.desktop.interface", "color-scheme"])
        return "dark" if "dark" in scheme else "light"
    return "light"


class Look:
    """The window's theme and text size: fonts and colours every widget takes. Runs on the Tk thread.

    The fonts are named Tk fonts, so changing the size changes every widget at once.
    They are made in Tcl and only looked at from Python (exists=True): a tkinter Font
    deletes its Tk font when collected, and the collector may run on any thread.
    """

    _numbers = itertools.count()

    def __init__(self, tk, root, theme="system", size=DEFAULT_TEXT_SIZE):
        import tkinter.font
        self.root = root
        self.choice = theme if theme in ("system", "light", "dark") else "system"
        self.theme = self._resolve(self.choice)
        self.size = size if size in TEXT_SIZES else DEFAULT_TEXT_SIZE
        # Font(name=..., exists=True), not nametofont(): its root= is Python 3.10's.
        family = tkinter.font.Font(root=root, name="TkDefaultFont", exists=True).actual("family")
        mono = tkinter.font.Font(root=root, name="TkFixedFont", exists=True).actual("family")
        def make(**options):
            name = "localchat%d" % next(self._numbers)
            root.tk.call("font", "create", name, *itertools.chain.from_iterable(
                ("-" + key, value) for key, value in options.items()))
            return tkinter.font.Font(root=root, name=name, exists=True)
        self.body = make(family=family)
        self.bold = make(family=family, weight="bold")
        self.small = make(family=family)
        self.italic = make(family=family, slant="italic")
        self.title = make(family=family, weight="bold")
        self.mono = make(family=mono)
        self.tiny = make(family=family, size=1)  # an empty line of next to no height
        self.set_size(self.size)

    @staticmethod
    def _resolve(choice):
        return system_theme() if choice == "system" else choice

    @property
    def colours(self):
        return PALETTES[self.theme]

    def set_theme(self, choice):
        self.choice = choice
        self.theme = self._resolve(choice)

    def set_size(self, size):
        self.size = size
        for font, step in ((self.body, 0), (self.bold, 0), (self.italic, 0), (self.small, -2),
                           (self.title, 2), (self.mono, -1)):
            font.configure(size=max(7, size + step))

    def bigger(self, steps):
        """Return the text size `steps` steps up (or down) from now, within TEXT_SIZES."""
        index = min(range(len(TEXT_SIZES)), key=lambda i: abs(TEXT_SIZES[i] - self.size))
        return TEXT_SIZES[max(0, min(len(TEXT_SIZES) - 1, index + steps))]

    def style(self, ttk):
        """Paint the ttk widgets: flat, calm, thin scrollbars, one accent colour."""
        c = self.colours
        style = ttk.Style(self.root)
        if "clam" in style.theme_names():
            style.theme_use("clam")  # the one built-in theme that takes colours everywhere
        style.configure(".", background=c["bg"], foreground=c["text"], bordercolor=c["border"],
                        lightcolor=c["bg"], darkcolor=c["bg"], troughcolor=c["bg"], focuscolor=c["accent"],
                        fieldbackground=c["surface"], selectbackground=c["select"],
                        selectforeground=c["text"], insertcolor=c["text"], font=self.body)
        style.configure("TButton", padding=(10, 4), background=c["surface"], width=-4,
                        bordercolor=c["border"], lightcolor=c["surface"], darkcolor=c["surface"])
        style.map("TButton", background=[("active", c["hover"]), ("pressed", c["select"])],
                  bordercolor=[("focus", c["accent"])])
        style.configure("TMenubutton", padding=(10, 4), background=c["surface"], bordercolor=c["border"],
                        lightcolor=c["surface"], darkcolor=c["surface"], arrowcolor=c["muted"])
        style.map("TMenubutton", background=[("active", c["hover"])])
        style.configure("Accent.TButton", background=c["accent"], foreground=c["accent_text"],
                        bordercolor=c["accent"], lightcolor=c["accent"], darkcolor=c["accent"])
        style.map("Accent.TButton", background=[("active", c["link"]), ("pressed", c["link"])])
        style.configure("TEntry", padding=(6, 4), fieldbackground=c["surface"], lightcolor=c["surface"],
                        darkcolor=c["surface"])
        style.map("TEntry", bordercolor=[("focus", c["accent"])], lightcolor=[("focus", c["accent"])])
        style.configure("Panel.TFrame", background=c["panel"])
        style.configure("Panel.TLabel", background=c["panel"], foreground=c["muted"], font=self.small)
        style.configure("Title.TLabel", font=self.title)
        style.configure("Muted.TLabel", foreground=c["muted"], font=self.small)
        style.configure("Status.TLabel", foreground=c["muted"], font=self.small, background=c["bg"])
        style.configure("Error.Status.TLabel", foreground=c["error"])
        style.configure("Banner.TFrame", background=c["banner"])
        style.configure("Banner.TLabel", background=c["banner"], foreground=c["text"])
        style.configure("Surface.TFrame", background=c["surface"])
        style.configure("Target.TLabel", background=c["surface"], foreground=c["muted"], font=self.small)
        style.configure("TPanedwindow", background=c["border"])
        style.configure("Sash", sashthickness=1, gripcount=0, background=c["border"])
        for orient in ("Vertical", "Horizontal"):
            name = "Thin.%s.TScrollbar" % orient
            style.layout(name, [("%s.Scrollbar.trough" % orient, {"sticky": "nswe", "children": [
                ("%s.Scrollbar.thumb" % orient, {"expand": "1", "sticky": "nswe"})]})])
            style.configure(name, troughcolor=c["surface"], background=c["thumb"], bordercolor=c["surface"],
                            lightcolor=c["thumb"], darkcolor=c["thumb"], arrowsize=8, gripcount=0)
            style.map(name, background=[("active", c["muted"])])
        style.layout("Idle.Vertical.TScrollbar", style.layout("Thin.Vertical.TScrollbar"))
        style.configure("Idle.Vertical.TScrollbar", troughcolor=c["surface"], background=c["surface"],
                        bordercolor=c["surface"], lightcolor=c["surface"], darkcolor=c["surface"], arrowsize=8)
        style.map("Idle.Vertical.TScrollbar", background=[("active", c["surface"])])
        self.root.configure(background=c["bg"])

    def paint_list(self, listbox):
        """Colour a classic Listbox like the rest."""
        c = self.colours
        listbox.configure(background=c["panel"], foreground=c["text"], selectbackground=c["select"],
                          selectforeground=c["text"], highlightthickness=0, borderwidth=0, font=self.body)

    def log_tags(self):
        """Return (tag, options) for every part of a log line in this theme."""
        c = self.colours
        tags = [
            ("time", {"foreground": c["muted"], "font": self.small}),
            ("name", {"font": self.bold}),
            ("head", {"spacing1": 8}),
            ("body", {"lmargin1": 2, "lmargin2": 2, "spacing1": 1, "spacing3": 1}),
            ("more", {}),
            ("code", {"font": self.mono, "background": c["code"], "lmargin1": 8, "lmargin2": 8}),
            ("own", {}),
            ("mention", {"background": c["mention"]}),
            ("action", {"font": self.italic, "spacing1": 6}),
            ("notice", {"foreground": c["muted"], "font": self.small, "spacing1": 4, "spacing3": 2}),
            ("error", {"foreground": c["error"], "font": self.small, "spacing1": 4, "spacing3": 2}),
            ("older", {"foreground": c["link"], "underline": True, "font": self.small, "justify": "center"}),
            ("daysep", {"foreground": c["muted"], "font": self.small, "justify": "center",
                        "spacing1": 12, "spacing3": 4}),
            ("newline", {"foreground": c["new"], "font": self.small, "justify": "right", "spacing1": 8}),
            ("link", {"foreground": c["link"], "underline": True}),
            # A shared file: a flat card (its left margin painted too, where Tk can), a bold
            # name, muted size and state, its actions styled as links.
            ("file", {"background": c["card"], "lmargin1": 12, "lmargin2": 12, "lmargincolor": c["card"],
                      "rmargincolor": c["surface"]}),
            ("filegap", {"font": self.tiny, "spacing1": 2, "spacing3": 2}),  # between a card and the next
            ("filename", {"font": self.bold, "spacing1": 8}),
            ("filethumb", {"spacing1": 10, "spacing3": 2}),
            ("filemeta", {"foreground": c["muted"], "font": self.small}),
            ("fileend", {"spacing3": 8}),
            ("filebad", {"foreground": c["error"]}),
            ("fileaction", {"foreground": c["link"], "underline": True, "font": self.small}),
        ]
        tags += [("name-%d" % i, {"foreground": colour})
                 for i, colour in enumerate(NAME_COLOURS[self.theme])]
        return tags

    def paint_text(self, text):
        c = self.colours
        text.configure(background=c["surface"], foreground=c["text"], insertbackground=c["text"],
                       selectbackground=c["select"], selectforeground=c["text"], font=self.body,
                       highlightthickness=0, borderwidth=0, relief="flat")


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


def picture_size(data):
    """Return (width, height) of PNG or GIF bytes, read from their header; None for anything else."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def thumbnail_step(width, height):
    """Return the subsample step that fits a picture in THUMBNAIL_WIDTH_PX x THUMBNAIL_HEIGHT_PX.

    A whole step: Tk can also zoom after subsampling (2/3 is every third pixel shown
    twice), which comes closer to the box but shows a coarser, blocky picture.
    """
    return max(1, math.ceil(width / THUMBNAIL_WIDTH_PX), math.ceil(height / THUMBNAIL_HEIGHT_PX))


def clipboard_bytes(value):
    """Return the bytes Tk gave for a binary clipboard target (a picture), or None if they cannot be read.

    Tk 8.6 on X11 hands a target it does not know as text, such as image/png, as
    each byte written out in hex: "0x89 0x50 0x4e 0x47 0xd 0xa ...". A Tk that
    hands them as characters, one per byte, is read too.
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        return None
    sample = value[:60].split()
    head = sample[:-1] or sample  # the last word of the sample may be cut short
    if head and all(word[:2] in ("0x", "0X") and 3 <= len(word) <= 4 for word in head):
        try:  # "0xd" -> "0d", "0x89" -> "89"; fromhex skips the spaces between them
            return bytes.fromhex(re.sub(r"0[xX]([0-9a-fA-F])(?![0-9a-fA-F])", r"0\1", value).replace("0x", "")
                                 .replace("0X", ""))
        except ValueError:
            return None
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return None


def pasted_picture_name(ts=None):
    """Return the name a picture pasted from the clipboard is shared under."""
    return time.strftime("pasted-picture-%Y%m%d-%H%M%S.png", time.localtime(ts))


def home_relative(path):
    """Return a path as a person reads it: ~/Downloads/report.pdf under the home folder."""
    path = Path(path)
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


class ConfirmDialog:
    """A small question window with two buttons that does not block the event loop.

    The safe answer (`no`) is the default: it has the focus, so Enter and Escape
    both take it; the other is a deliberate Tab or click away.
    """

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
        self.no_button.configure(default="active", style="Accent.TButton")  # the one Enter presses
        self.top.bind("<Return>", self._on_return)
        self.top.bind("<Escape>", lambda event: self.no_button.invoke())
        self.top.protocol("WM_DELETE_WINDOW", self.no_button.invoke)
        self.no_button.focus_set()

    def _on_return(self, event):
        """Enter presses the button with the focus: "Stay" unless the person moved to the other."""
        button = self.yes_button if event.widget is self.yes_button else self.no_button
        button.invoke()
        return "break"

    def _answer(self, callback):
        def answer():
            self.top.destroy()
            callback()
        return answer


class PasswordDialog:
    """A small window asking for the server's password; does not block the event loop."""

    def __init__(self, parent, tk, ttk, why, on_done):
        self.top = tk.Toplevel(parent)
        self.top.title("Password")
        self.top.transient(parent)
        frame = ttk.Frame(self.top, padding=16)
        frame.pack(fill="both", expand=True)
        ttk.Label(frame, text=why + " Enter it to join:").pack(anchor="w", pady=(0, 8))
        self.entry = ttk.Entry(frame, show="\u2022", width=30)
        self.entry.pack(fill="x", pady=(0, 12))
        self.ok_button = ttk.Button(frame, text="Join", command=lambda: self._done(on_done, self.entry.get()))
        self.ok_button.pack(side="right")
        self.top.bind("<Return>", lambda event: self.ok_button.invoke())
        self.top.bind("<Escape>", lambda event: self._done(on_done, None))
        self.top.protocol("WM_DELETE_WINDOW", lambda: self._done(on_done, None))
        self.entry.focus_set()

    def _done(self, on_done, password):
        self.top.destroy()
        on_done(password)


class TrustDialog:
    """Asks whether to trust a server's certificate; does not block the event loop.

    First contact: the fingerprint, Trust / Cancel (Return trusts). A changed
    certificate: the warning, both fingerprints, "Accept the new certificate" /
    Cancel, and Return and Escape cancel: it is never accepted by reflex.
    on_answer(True or False) is called once.
    """

    def __init__(self, parent, tk, ttk, untrusted, on_answer, warning_colour="#b3261e"):
        self.top = tk.Toplevel(parent)
        self.top.title("Certificate changed" if untrusted.changed else "Trust this server?")
        self.top.transient(parent)
        self.top.resizable(False, False)
        self._on_answer = on_answer
        frame = ttk.Frame(self.top, padding=16)
        frame.pack(fill="both", expand=True)
        rows = self._rows(untrusted)
        self.text = "\n".join(text for text, _ in rows)  # all it says, for the tests
        for text, style in rows:
            font = "TkFixedFont" if style == "fingerprint" else ("TkHeadingFont" if style == "warning" else "")
            ttk.Label(frame, text=text, wraplength=480, justify="left", font=font,
                      foreground=warning_colour if style == "warning" else "").pack(anchor="w", pady=(0, 8))
        buttons = ttk.Frame(frame)
        buttons.pack(anchor="e", pady=(4, 0))
        self.cancel_button = ttk.Button(buttons, text="Cancel", command=lambda: self._answer(False))
        self.trust_button = ttk.Button(buttons, text="Accept the new certificate" if untrusted.changed else "Trust",
                                       command=lambda: self._answer(True))
        self.cancel_button.pack(side="right")
        self.trust_button.pack(side="right", padx=(0, 8))
        default = self.cancel_button if untrusted.changed else self.trust_button
        self.top.bind("<Return>", lambda event: default.invoke())
        self.top.bind("<Escape>", lambda event: self.cancel_button.invoke())
        self.top.protocol("WM_DELETE_WINDOW", self.cancel_button.invoke)
        default.focus_set()

    @staticmethod
    def _rows(untrusted):
        """Return the dialog's lines of text as (text, style): "warning", "fingerprint" or ""."""
        if untrusted.changed:
            return [("WARNING: the certificate of %s has CHANGED since you last connected: somebody may be "
                     "pretending to be that server." % untrusted.address, "warning"),
                    ("Accept the new certificate only if its owner really made a new one, and the fingerprint the "
                     "server shows now is the one it prints (ask whoever runs it).", ""),
                    ("Trusted before:", ""), (_fingerprint_rows(untrusted.previous), "fingerprint"),
                    ("The server shows now:", ""), (_fingerprint_rows(untrusted.fingerprint), "fingerprint")]
        return [("The server at %s encrypts the chat with a certificate this computer has not trusted yet. "
                 "Compare its fingerprint (SHA-256) with the one the server printed when it started (ask whoever "
                 "runs it):" % untrusted.address, ""), (_fingerprint_rows(untrusted.fingerprint), "fingerprint")]

    def _answer(self, yes):
        self.top.destroy()
        self._on_answer(yes)


def _fingerprint_rows(fingerprint):
    """Return a fingerprint on two rows of 16 pairs, easier to compare by eye."""
    pairs = fingerprint.split(":")
    return ":".join(pairs[:16]) + ("\n" + ":".join(pairs[16:]) if len(pairs) > 16 else "")


class FileCard:
    """One shared file as a log shows it: its name and size, and what became of its download.

    Runs on the Tk thread. state is "ready", "busy" (downloading), "saved", "failed"
    or "expired" (the server no longer keeps it). The card's text carries the tag
    "card-N"; its last line, which changes with the state, "cardstate-N" too.
    """

    def __init__(self, number, shared):
        self.number = number
        # Cleaned by the server, and again here: what is shown is what a download saves.
        self.name = clean_file_name(shared.get("name") if isinstance(shared.get("name"), str) else "")
        size = shared.get("size")
        self.size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
        self.kind = shared.get("type") if isinstance(shared.get("type"), str) else ""
        url = shared.get("url")
        self.url = url if isinstance(url, str) and url.startswith("/files/") else None
        self.state = "expired" if shared.get("expired") or self.url is None else "ready"
        self.done = self.total = 0  # bytes downloaded, of all, while busy
        self.saved = None  # where the last download went
        self.problem = None  # why the last download failed

    @property
    def tag(self):
        return "card-%d" % self.number

    @property
    def state_tag(self):
        return "cardstate-%d" % self.number

    @property
    def picture(self):
        """True for a PNG or GIF small enough to be shown (Tk decodes no other pictures)."""
        return (self.kind in ("image/png", "image/gif") and self.url is not None and self.size is not None
                and self.size <= THUMBNAIL_MAX_BYTES)

    def pieces(self, note=""):
        """Return the whole card as (text, tags) pieces: name and size, then its state."""
        card = ("file", self.tag)
        size = file_size_text(self.size) if self.size is not None else ""
        return [(self.name, card + ("filename",)), ("  " + size + note + "\n", card + ("filemeta",))] + \
            self.state_pieces() + [("\n", card + ("fileend",)), ("\n", ("filegap",))]

    def state_pieces(self):
        """Return the card's last line: what can be done with the file now, or what became of it."""
        tags = ("file", self.tag, "filemeta", "fileend", self.state_tag)  # "fileend": the card's last line
        dot = (" \u00b7 ", tags)

        def action(label, name):
            return label, tags + ("fileaction", "act-%d-%s" % (self.number, name))
        if self.state == "busy":
            shown = " %d%%" % (100 * self.done // self.total) if self.total else ""
            return [("Downloading\u2026" + shown, tags)]
        if self.state == "saved":
            above = tuple(tag for tag in tags if tag != "fileend")
            return [("Saved to %s\n" % home_relative(self.saved), above), action("Open", "open"), dot,
                    action("Download again", "download")]
        if self.state == "failed":
            return [(self.problem, tags + ("filebad",)), dot, action("Try again", "download")]
        if self.state == "expired":
            return [("Expired: the server no longer keeps this file.", tags)]
        return [action("Download", "download")]


class Conversation:
    """One room or direct conversation as the window shows it: its log (a Text) and its people.

    Runs on the Tk thread. The window makes one per room and per direct partner and
    shows one at a time. Messages from one sender in a row share one line with the
    name and time; a line shows each new day, and one where the unread part starts.
    """

    def __init__(self, kind, name, astral_ok=True):
        self.kind = kind  # "room" or "direct"
        self.name = name
        self.key = conversation_key(kind, name)
        self.astral_ok = astral_ok
        self.users = []
        self.away = {}
        self.topic = None
        self.unread = 0
        self.oldest_id = None  # the oldest message shown, for paging back
        self.page_before = None  # while a page is coming: messages older than this go on top
        self.frame = None  # the Tk frame holding the log (see build())
        self.log = None
        self.links = {}  # "url-N" tag -> the address it opens
        self._last = None  # (sender key, ts, day) of the last message at the end, for grouping
        self._page_last = None  # the same for the page being inserted on top
        self._no_earlier = False  # the server said there is nothing older
        self.following = True  # the view is at the end, and stays there as lines come
        self.scrollbar = None
        self.cards = {}  # number -> the FileCard of each shared file shown
        # The thumbnails' PhotoImages: kept here, or Tk would blank them when Python collects
        # them; let go of (release_images) on the Tk thread, where deleting them is allowed.
        self.images = []

    @property
    def where(self):
        """Where text typed in this conversation goes, as say-frame fields."""
        return {"room": self.name} if self.kind == "room" else {"to": self.name}

    @property
    def label(self):
        prefix = "# " if self.kind == "room" else "@ "
        return prefix + self.name + (" (%d)" % self.unread if self.unread else "")

    def build(self, tk, ttk, parent, on_older, on_link, look, on_file=None):
        """Make the log: a read-only Text with a thin scrollbar.

        on_file(conversation, card, action) is called when a card's action is clicked.
        """
        self.frame = ttk.Frame(parent, style="Surface.TFrame")
        log = self.log = tk.Text(self.frame, wrap="word", state="disabled", padx=14, pady=8,
                                 cursor="arrow", spacing1=1, spacing3=1)
        self.scrollbar = scrollbar = ttk.Scrollbar(self.frame, command=log.yview, style="Thin.Vertical.TScrollbar")
        log.configure(yscrollcommand=self._on_scrolled)
        log.bind("<Configure>", lambda event: self.following and log.see("end"))  # resized: stay at the end
        log.bind("<Configure>", self._on_log_resize, add="+")
        scrollbar.pack(side="right", fill="y")
        log.pack(side="left", fill="both", expand=True)
        self.paint(look)
        log.tag_bind("older", "<Button-1>", lambda event: on_older(self))
        log.tag_bind("link", "<Button-1>", lambda event: self._on_link(on_link))
        log.tag_bind("fileaction", "<Button-1>", lambda event: self._on_file_action(on_file))
        for tag in ("older", "link", "fileaction"):
            log.tag_bind(tag, "<Enter>", lambda event: log.configure(cursor="hand2"))
            log.tag_bind(tag, "<Leave>", lambda event: log.configure(cursor="arrow"))
        log.mark_set("page", "1.0")

    def paint(self, look):
        """Colour and size the log for the look (on building, and when the theme changes)."""
        look.paint_text(self.log)
        for tag, options in look.log_tags():
            try:
                self.log.tag_configure(tag, **options)
            except self.log.tk.TclError:  # a Tk before 8.6.6 paints no margins: the card starts at its text
                options.pop("lmargincolor", None)
                options.pop("rmargincolor", None)
                self.log.tag_configure(tag, **options)
        for tag in ("link", "older", "fileaction"):
            self.log.tag_raise(tag)

    def _on_log_resize(self, event):
        """Cards keep their width as the log widens: the rest of the line is their right margin."""
        inside = event.width - 2 * int(self.log.cget("padx"))  # the log has no border
        self.log.tag_configure("file", rmargin=max(0, inside - FILE_CARD_WIDTH_PX))

    def _on_scrolled(self, first, last):
        """The view moved: move the scrollbar; its thumb shows only when there is more to see."""
        self.scrollbar.set(first, last)
        self.following = float(last) >= 0.999
        whole = float(first) <= 0.0 and float(last) >= 1.0
        self.scrollbar.configure(style="Idle.Vertical.TScrollbar" if whole else "Thin.Vertical.TScrollbar")

    def _on_link(self, on_link):
        for tag in self.log.tag_names("current"):
            if tag in self.links:
                on_link(self.links[tag])
                return

    def _on_file_action(self, on_file):
        for tag in self.log.tag_names("current"):
            if tag.startswith("act-") and on_file is not None:
                _, number, action = tag.split("-", 2)
                card = self.cards.get(int(number))
                if card is not None:
                    on_file(self, card, action)
                return

    def append(self, pieces, index="end"):
        """Insert (text, tags) pieces into the log; follow the end unless scrolled up."""
        following = self.log.yview()[1] >= 0.999
        self.log.configure(state="normal")
        for text, tags in pieces:
            self.log.insert(index, displayable(text, self.astral_ok), tags)
        self.log.configure(state="disabled")
        if following and index == "end":
            self.log.see("end")

    def add_message(self, frame, extra=()):
        """Show a message; older ones (a page) go on top. extra: tags for the whole message.

        Return the FileCard made for a shared file's message, else None.
        """
        sender, text = str(frame.get("from")), str(frame.get("text"))
        ts = frame.get("ts") if isinstance(frame.get("ts"), (int, float)) else time.time()
        message_id = frame.get("id") if isinstance(frame.get("id"), int) else None
        older = self.page_before is not None and message_id is not None and message_id < self.page_before
        if message_id is not None and (self.oldest_id is None or message_id < self.oldest_id):
            self.oldest_id = message_id
        if frame.get("replay"):
            self._offer_earlier()  # history came: there may be more of it
        index = "page" if older else "end"
        day = time.strftime("%Y-%m-%d", time.localtime(ts))
        last = self._page_last if older else self._last
        pieces = []
        if last is None or last[2] != day:
            pieces += self._day_pieces(day, ts, index)
        grouped = (last is not None and last[0] == name_key(sender) and last[2] == day
                   and 0 <= ts - last[1] < GROUP_GAP_S and not frame.get("action"))
        card = None
        if isinstance(frame.get("file"), dict) and not frame.get("action"):
            card = self.cards[len(self.cards)] = FileCard(len(self.cards), frame["file"])
        pieces += self._message_pieces(frame, sender, text, ts, grouped, extra, card)
        this = None if frame.get("action") else (name_key(sender), ts, day)
        if older:
            self._page_last = this or (None, ts, day)
        else:
            self._last = this or (None, ts, day)
        self.append(pieces, index)
        return card

    def _day_pieces(self, day, ts, index):
        """A separator for a new day; an existing one for that day below a page goes."""
        tag = "day:" + day
        ranges = self.log.tag_ranges(tag)
        if ranges and index == "page":
            self.log.configure(state="normal")
            self.log.delete(ranges[0], ranges[1])
            self.log.configure(state="disabled")
        return [("\u2500\u2500  %s  \u2500\u2500\n" % day_label(ts), ("daysep", tag))]

    def _message_pieces(self, frame, sender, text, ts, grouped, extra, card=None):
        colour = "name-%d" % name_colour_index(sender)
        pieces = []
        queued = "  (delivered when %s returns)" % frame.get("to") if frame.get("queued") else ""
        if card is not None:  # a shared file: its card instead of the text, which has its address
            if not grouped:
                pieces += [(sender, ("head", "name", colour)), ("  " + clock(ts)[:5] + "\n", ("head", "time"))]
            return pieces + card.pieces(queued)
        if frame.get("action"):
            pieces += [("\u2022 ", ("action",) + extra), (sender, ("action", "name", colour) + extra),
                       (" ", ("action",) + extra)]
            pieces += self._text_pieces(text, ("action",) + extra)
        else:
            if not grouped:
                pieces += [(sender, ("head", "name", colour)), ("  " + clock(ts)[:5] + "\n", ("head", "time"))]
            first, _, rest = text.partition("\n")
            body = ("body", "code") if rest else ("body",)
            pieces += self._text_pieces(first + ("\n" if rest else ""), body + extra)
            if rest:
                pieces += self._text_pieces(rest, ("more", "code") + extra)
        if queued:
            pieces.append((queued, ("time",)))
        pieces.append(("\n", extra))
        return pieces

    def redraw_card(self, card):
        """Show what became of a card's file: its last line is drawn again."""
        ranges = self.log.tag_ranges(card.state_tag)
        if not ranges:
            return
        following = self.log.yview()[1] >= 0.999  # a line more ("Saved to", then Open) keeps the end in view
        self.log.configure(state="normal")
        self.log.mark_set("cardedit", ranges[0])
        self.log.mark_gravity("cardedit", "right")  # each piece goes after the one before
        self.log.delete(ranges[0], ranges[1])
        for text, tags in card.state_pieces():
            self.log.insert("cardedit", displayable(text, self.astral_ok), tags)
        self.log.configure(state="disabled")
        if following:
            self.log.see("end")

    def add_thumbnail(self, card, image):
        """Show a picture (a PhotoImage, already small) at the top of its card, once."""
        ranges = self.log.tag_ranges(card.tag)
        if not ranges or self.log.tag_ranges("thumb-%d" % card.number):
            return
        start = str(ranges[0])
        following = self.log.yview()[1] >= 0.999
        self.log.configure(state="normal")
        self.log.image_create(start, image=image)
        tags = ("file", card.tag, "filethumb", "thumb-%d" % card.number)
        for tag in tags:
            self.log.tag_add(tag, start)
        self.log.insert(start + " +1c", "\n", tags)
        self.log.configure(state="disabled")
        self.images.append(image)
        if following:
            self.log.see("end")

    def release_images(self):
        """Let go of the thumbnails (on the Tk thread: only it may delete a Tk image)."""
        del self.images[:]

    def _text_pieces(self, text, tags):
        """Split text into plain and link pieces; each link gets its own tag for its address."""
        pieces = []
        for piece, url in split_links(text):
            if url is None:
                pieces.append((piece, tags))
            else:
                tag = "url-%d" % len(self.links)
                self.links[tag] = url
                pieces.append((piece, tags + ("link", tag)))
        return pieces

    def _break_run(self):
        """The next message shows its name again (its day line only if the day changes)."""
        if self._last is not None:
            self._last = (None,) + self._last[1:]

    def add_notice(self, text, ts=None, tag="notice"):
        self._break_run()
        self.append([(clock(ts)[:5] + "  ", ("time", tag)), (text + "\n", (tag,))])

    def mark_unread_start(self):
        """Draw the "new messages" line here (the one drawn before goes)."""
        self.log.configure(state="normal")
        ranges = self.log.tag_ranges("newline")
        if ranges:
            self.log.delete(ranges[0], ranges[1])
        self.log.configure(state="disabled")
        self._break_run()
        self.append([("new messages \u2500\u2500\n", ("newline",))])

    def _offer_earlier(self):
        """Show the "Show earlier messages" link at the top, once, unless nothing is older."""
        if self._no_earlier or self.log.tag_ranges("older"):
            return
        self.log.configure(state="normal")
        self.log.insert("1.0", "Show earlier messages\n", ("older",))
        self.log.configure(state="disabled")

    def start_page(self):
        """Get ready for a page of older messages; return the id they come before (or None)."""
        self.page_before = self.oldest_id
        self._page_last = None
        # Older messages go in above what is shown, in order: each is inserted at
        # this mark, which moves on past it.
        ranges = self.log.tag_ranges("older")
        self.log.mark_set("page", ranges[1] if ranges else "1.0")
        self.log.mark_gravity("page", "right")
        return self.page_before

    def end_page(self, more):
        self.page_before = None
        if not more:
            self._no_earlier = True
            self.log.configure(state="normal")
            ranges = self.log.tag_ranges("older")
            if ranges:
                self.log.delete(ranges[0], ranges[1])
                self.log.insert("1.0", "No earlier messages\n", ("notice", "older-none"))
            self.log.configure(state="disabled")


def conversation_key(kind, name):
    return kind + ":" + name_key(name)


class InputBox:
    """Where a person types: Enter sends, Shift+Enter adds a line, Up/Down recall, Tab completes.

    Runs on the Tk thread. on_submit() is called for Enter; complete(prefix)
    returns the names that may complete a word.
    """

    def __init__(self, tk, parent, on_submit, complete):
        self.on_submit = on_submit
        self.complete = complete
        self.history = []
        self._history_index = 0
        self._completion = None  # (matches, index, text inserted) while Tab cycles through names
        self.text = tk.Text(parent, height=2, wrap="word", undo=True, padx=8, pady=6, highlightthickness=0,
                            borderwidth=0)
        for key, handler in (("<Return>", self._on_return), ("<KP_Enter>", self._on_return),
                             ("<Shift-Return>", self._on_shift_return), ("<Up>", self._on_history_up),
                             ("<Down>", self._on_history_down), ("<Tab>", self._on_tab)):
            self.text.bind(key, handler)
        self.text.bind("<Key>", self._on_key, add="+")

    def get(self):
        return self.text.get("1.0", "end-1c")

    def clear(self):
        self.text.delete("1.0", "end")

    def remember(self, line):
        """Keep a sent line for Up/Down."""
        if not self.history or self.history[-1] != line:
            self.history.append(line)
            del self.history[:-INPUT_HISTORY]
        self._history_index = len(self.history)

    def _on_return(self, event):
        self.on_submit()
        return "break"

    def _on_shift_return(self, event):
        self.text.insert("insert", "\n")
        self.text.see("insert")
        return "break"

    def _on_history_up(self, event):
        if self.text.compare("insert linestart", "!=", "1.0") or not self.history:
            return None  # move within a multi-line draft as usual
        self._history_index = max(0, self._history_index - 1)
        self._show_history()
        return "break"

    def _on_history_down(self, event):
        if self.text.compare("insert lineend", "!=", "end-1c") or not self.history:
            return None
        self._history_index = min(len(self.history), self._history_index + 1)
        self._show_history()
        return "break"

    def _show_history(self):
        self.clear()
        if self._history_index < len(self.history):
            self.text.insert("1.0", self.history[self._history_index])

    def _on_tab(self, event):
        """Complete the name before the cursor; Tab again cycles through the matches."""
        before = self.text.get("insert linestart", "insert")
        if self._completion and before.endswith(self._completion[2]):
            matches, index, word = self._completion
            index = (index + 1) % len(matches)
        else:
            word = before.split()[-1] if before.strip() and not before[-1].isspace() else ""
            matches = self.complete(word.lstrip("@")) if word.lstrip("@") else []
            index = 0
        if matches:
            at = "@" if word.startswith("@") else ""
            suffix = ": " if before[:len(before) - len(word)].strip() == "" and not at else " "
            completed = at + matches[index] + suffix
            self.text.delete("insert - %dc" % len(word), "insert")
            self.text.insert("insert", completed)
            self._completion = (matches, index, completed)
        return "break"

    def _on_key(self, event):
        if event.keysym != "Tab":
            self._completion = None


class Notifier:
    """Desktop notifications with what the system has, nothing installed: notify-send on Linux,
    osascript on macOS, a flashing taskbar button on Windows.

    notify() is called on the Tk thread and never blocks it: the command runs on a
    short-lived thread. The text goes as an argument, never as part of a script.
    """

    TIMEOUT_S = 5  # a notification command that hangs is left behind after this

    def __init__(self):
        if sys.platform == "win32":
            self.command = "flash"
        elif sys.platform == "darwin":
            self.command = shutil.which("osascript")
        else:
            self.command = shutil.which("notify-send")

    def notify(self, root, title, text):
        """Show title and text; return False where there is no way to (the caller rings instead)."""
        text = text if len(text) <= 200 else text[:199] + "\u2026"
        if self.command == "flash":
            return self._flash(root)
        if not self.command:
            return False
        if sys.platform == "darwin":
            argv = [self.command, "-e", "on run argv", "-e",
                    "display notification (item 2 of argv) with title (item 1 of argv)", "-e", "end run",
                    title, text]
        else:  # notify-send reads a little markup in the body: escape it so the text shows as typed
            argv = [self.command, "--app-name=LocalChat", "--", title,
                    text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")]
        threading.Thread(target=self._run, args=(argv,), name="notify", daemon=True).start()
        return True

    def _run(self, argv):
        """Runs on a notify thread."""
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=self.TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            pass

    @staticmethod
    def _flash(root):
        """Flash the window's taskbar button (Windows) until it is looked at."""
        try:
            import ctypes
            from ctypes import wintypes

            class FlashInfo(ctypes.Structure):
                _fields_ = [("cbSize", wintypes.UINT), ("hwnd", wintypes.HWND), ("dwFlags", wintypes.DWORD),
                            ("uCount", wintypes.UINT), ("dwTimeout", wintypes.DWORD)]
            hwnd = ctypes.windll.user32.GetParent(root.winfo_id())  # the frame around Tk's window
            info = FlashInfo(ctypes.sizeof(FlashInfo), hwnd, 0x0000000F, 0, 0)  # FLASHW_ALL | FLASHW_TIMERNOFG
            ctypes.windll.user32.FlashWindowEx(ctypes.byref(info))  # returns the old state, not success
            return True
        except (ImportError, AttributeError, OSError):
            return False


class TkSetting:
    """A menu's check or choice, kept in a Tcl variable by name. Runs on the Tk thread."""

    def __init__(self, root, key, value):
        self.root = root
        self.name = "localchat%s.%s" % (str(root).replace(".", "_"), key)
        self.boolean = isinstance(value, bool)
        self.set(value)

    def get(self):
        value = self.root.getvar(self.name)
        return bool(self.root.getboolean(value)) if self.boolean else str(value)

    def set(self, value):
        self.root.setvar(self.name, int(value) if self.boolean else value)


class Banner:
    """A strip above the log that says what went wrong and offers the way on (a button, a name).

    Runs on the Tk thread. Hidden until show(); the sentence wraps to the width.
    """

    def __init__(self, tk, ttk, parent):
        self.ttk = ttk
        self.frame = ttk.Frame(parent, style="Banner.TFrame", padding=(10, 8))
        self.label = ttk.Label(self.frame, style="Banner.TLabel", justify="left", anchor="w")
        self.label.pack(side="top", fill="x")
        self.row = ttk.Frame(self.frame, style="Banner.TFrame")
        self.row.pack(side="top", fill="x")
        self.entry = ttk.Entry(self.row, width=24)
        self.entry.bind("<Return>", lambda event: self.button.invoke())
        self.button = ttk.Button(self.row, style="Accent.TButton")
        self.frame.bind("<Configure>", lambda event: self.label.configure(wraplength=max(200, event.width - 24)))

    @property
    def shown(self):
        return bool(self.frame.winfo_manager())

    def show(self, text, entry=None, button=None):
        """Show text; with entry, a box holding that text; with button, (label, command)."""
        self.label.configure(text=text)
        self.entry.pack_forget()
        self.button.pack_forget()
        if entry is not None:
            self.entry.delete(0, "end")
            self.entry.insert(0, entry)
            self.entry.pack(side="left", pady=(6, 0))
            self.entry.select_range(0, "end")
        if button is not None:
            self.button.configure(text=button[0], command=button[1])
            self.button.pack(side="left", padx=(6 if entry is not None else 0, 0), pady=(6, 0))
        if not self.shown:
            siblings = self.frame.master.pack_slaves()
            self.frame.pack(side="top", fill="x", before=siblings[-1] if siblings else None)
        if entry is not None:
            self.entry.focus_set()

    def entry_text(self):
        return self.entry.get()

    def hide(self):
        self.frame.pack_forget()


class ChatPanels:
    """The chat window's widgets: building, painting and arranging them (a mixin of ChatWindow).

    Runs on the Tk thread. What the widgets show comes from ChatWindow; here is only
    where they are, how they look, and how they give way in a narrow window.
    """

    def _build_window(self):
        root = self.root
        # As big as suits a chat, but never bigger than a small screen (800x600 still fits whole).
        root.geometry("%dx%d" % (min(960, root.winfo_screenwidth() - 40), min(640, root.winfo_screenheight() - 80)))
        root.minsize(480, 360)
        root.protocol("WM_DELETE_WINDOW", self._on_close_request)
        # Escape does not leave (a reflex, often followed by Enter, must not end a chat): the
        # window's close button, Ctrl+Q and /quit do, after asking, with "Stay" the default.
        root.bind("<Control-q>", lambda event: self._on_close_request())
        for keys, steps in (("<Control-plus>", 1), ("<Control-equal>", 1), ("<Control-KP_Add>", 1),
                            ("<Control-minus>", -1), ("<Control-KP_Subtract>", -1), ("<Control-0>", 0)):
            root.bind(keys, lambda event, steps=steps: self._on_text_size(steps))
        root.bind("<FocusIn>", self._on_focus_in)
        root.bind("<FocusOut>", self._on_focus_out)
        self.look.style(self.ttk)
        self._build_menu()
        self._build_status()
        self.panes = self.ttk.PanedWindow(root, orient="horizontal")
        self.panes.pack(side="top", fill="both", expand=True)
        self.sidebar = self._build_sidebar(self.panes)
        self.centre = self._build_centre(self.panes)
        self.people_pane = self._build_people(self.panes)
        self.panes.add(self.sidebar, weight=0)
        self.panes.add(self.centre, weight=1)
        self.panes.add(self.people_pane, weight=0)
        root.bind("<Configure>", self._on_resize, add="+")
        self._update_title()
        self.input.focus_set()

    def _build_menu(self):
        tk = self.tk
        self.menu = tk.Menu(self.root, tearoff=False)
        chat = tk.Menu(self.menu, tearoff=False)
        chat.add_command(label="Join a room...", command=lambda: self.join_entry.focus_set())
        chat.add_command(label="Reconnect", command=self._reconnect)
        chat.add_separator()
        chat.add_command(label="Leave the chat", accelerator="Ctrl+Q", command=self._on_close_request)
        view = tk.Menu(self.menu, tearoff=False)
        # Tcl variables by name, not tkinter Variables: those may be collected on another
        # thread (a reference cycle), and deleting one there fails.
        self.theme_choice = TkSetting(self.root, "theme", self.look.choice)
        for label, value in (("Theme as the system's", "system"), ("Light theme", "light"), ("Dark theme", "dark")):
            view.add_radiobutton(label=label, value=value, variable=self.theme_choice.name,
                                 command=lambda: self.set_theme(self.theme_choice.get()))
        view.add_separator()
        view.add_command(label="Bigger text", accelerator="Ctrl++", command=lambda: self._on_text_size(1))
        view.add_command(label="Smaller text", accelerator="Ctrl+-", command=lambda: self._on_text_size(-1))
        view.add_command(label="Normal text size", accelerator="Ctrl+0", command=lambda: self._on_text_size(0))
        view.add_separator()
        self.show_people = TkSetting(self.root, "people", True)
        view.add_checkbutton(label="People list", variable=self.show_people.name, command=self._arrange_panes)
        notify = tk.Menu(self.menu, tearoff=False)
        self.notify_desktop = TkSetting(self.root, "desktop", self.settings.get("notify_desktop", True) is not False)
        self.notify_sound = TkSetting(self.root, "sound", self.settings.get("notify_sound", True) is not False)
        notify.add_checkbutton(label="Desktop notifications (mentions and direct messages)",
                               variable=self.notify_desktop.name, command=self._save_look)
        notify.add_checkbutton(label="Sound", variable=self.notify_sound.name, command=self._save_look)
        for label, submenu in (("Chat", chat), ("View", view), ("Notifications", notify)):
            self.menu.add_cascade(label=label, menu=submenu)
        self.menus = (self.menu, chat, view, notify)
        self.root.configure(menu=self.menu)

    def _build_sidebar(self, parent):
        frame = self.ttk.Frame(parent, style="Panel.TFrame", padding=(8, 10, 8, 8))
        self.ttk.Label(frame, text="CONVERSATIONS", style="Panel.TLabel").pack(side="top", anchor="w", pady=(0, 6))
        join_row = self.ttk.Frame(frame, style="Panel.TFrame")
        join_row.pack(side="bottom", fill="x", pady=(2, 0))
        self.ttk.Label(frame, text="JOIN A ROOM", style="Panel.TLabel").pack(side="bottom", anchor="w", pady=(8, 0))
        self.join_entry = self.ttk.Entry(join_row, width=8)
        self.join_entry.pack(side="left", fill="x", expand=True)
        self.join_entry.bind("<Return>", lambda event: self._on_join_button())
        self.join_button = self.ttk.Button(join_row, text="Join", width=5, command=self._on_join_button)
        self.join_button.pack(side="left", padx=(4, 0))
        self.conversation_list = self.tk.Listbox(frame, activestyle="none", takefocus=0, width=14,
                                                 exportselection=False)
        self.conversation_list.pack(side="top", fill="both", expand=True)
        self.conversation_list.bind("<<ListboxSelect>>", self._on_conversation_selected)
        return frame

    def _build_centre(self, parent):
        frame = self.ttk.Frame(parent, style="Surface.TFrame")
        header = self.ttk.Frame(frame, style="Surface.TFrame", padding=(14, 8, 8, 6))
        header.pack(side="top", fill="x")
        self.leave_button = self.ttk.Button(header, text="Leave room", command=self._on_leave_button)
        self.leave_button.pack(side="right", anchor="n")
        self.switch_button = self.ttk.Menubutton(header, text="Conversations")  # when the list is hidden
        self.switch_menu = self.tk.Menu(self.switch_button, tearoff=False)
        self.switch_button.configure(menu=self.switch_menu)
        self.title_label = self.ttk.Label(header, text="", style="Title.TLabel", background=self.look.colours["surface"])
        self.title_label.pack(side="top", anchor="w", fill="x")
        self.topic_label = self.ttk.Label(header, text="", style="Target.TLabel", justify="left")
        self.topic_label.pack(side="top", anchor="w", fill="x")
        # Wrap to the room the buttons leave it: a long topic shows whole, over several lines.
        self.topic_label.bind("<Configure>", lambda event: self.topic_label.configure(wraplength=max(80, event.width)))
        self.host_label = self.ttk.Label(frame, text="", style="Banner.TLabel", padding=(14, 6), justify="left")
        self.code_button = self.ttk.Button(frame, text="Code for phones", command=self._on_show_code)
        if self.hosted is not None:  # stays in sight: the others need it for as long as the chat runs
            self.host_label.configure(text=self.hosted.join_hint(), style="Host.TLabel")
            if self.hosted.web_url() is not None:
                self.code_button.pack(side="top", anchor="e", padx=14)
            self.host_label.pack(side="top", fill="x")
        self._build_input(frame)
        self.banner = Banner(self.tk, self.ttk, frame)
        self.log_stack = self.ttk.Frame(frame, style="Surface.TFrame")
        self.log_stack.pack(side="top", fill="both", expand=True)
        frame.bind("<Configure>", self._on_centre_resize)
        return frame

    def _on_show_code(self):
        """Show the web address as a QR code, large enough for a phone's camera across a desk."""
        url = self.hosted.web_url() if self.hosted is not None else None
        if url is None:
            return
        if self.code_window is not None:
            self.code_window.lift()
            return
        top = self.code_window = self.tk.Toplevel(self.root)
        top.title("Join from a phone")
        top.configure(background="white")  # a code reads best dark on light, whatever the theme
        png = qr_png(url, scale=QR_WINDOW_SCALE)
        self.code_image = self.tk.PhotoImage(master=top, data=base64.b64encode(png).decode("ascii"))
        self.tk.Label(top, image=self.code_image, background="white", borderwidth=0).pack(padx=16, pady=(16, 8))
        self.tk.Label(top, text="Point a phone's camera at the code, or open\n" + url, background="white",
                      foreground="black", justify="center").pack(padx=16)
        self.ttk.Button(top, text="Close", command=self._on_close_code).pack(pady=(8, 16))
        top.protocol("WM_DELETE_WINDOW", self._on_close_code)
        top.bind("<Escape>", lambda event: self._on_close_code())

    def _on_close_code(self):
        if self.code_window is not None:
            self.code_window.destroy()
        self.code_window = self.code_image = None  # let go of the image here, on the Tk thread

    def _build_people(self, parent):
        frame = self.ttk.Frame(parent, style="Panel.TFrame", padding=(8, 10, 8, 8))
        self.people_title = self.ttk.Label(frame, text="People", style="Panel.TLabel")
        self.people_title.pack(side="top", anchor="w", pady=(0, 6))
        self.people = self.tk.Listbox(frame, activestyle="none", takefocus=0, width=14, exportselection=False)
        self.people.pack(side="top", fill="both", expand=True)
        self.people.bind("<Double-Button-1>", self._on_person_double_click)
        self.people.bind("<Configure>", lambda event: self._show_people())
        return frame

    def _build_input(self, parent):
        frame = self.ttk.Frame(parent, style="Surface.TFrame", padding=(14, 4, 14, 10))
        frame.pack(side="bottom", fill="x")
        # Files on their way: "Sending report.pdf... 40% of 3.2 MB", above where the typing goes;
        # shown only while there are some (see _show_uploads).
        self.transfer_label = self.ttk.Label(frame, text="", style="Target.TLabel")
        self.target_label = self.ttk.Label(frame, text="", style="Target.TLabel")
        self.target_label.pack(side="top", anchor="w", pady=(0, 3))
        row = self.ttk.Frame(frame, style="Surface.TFrame")
        row.pack(side="top", fill="x")
        self.send_button = self.ttk.Button(row, text="Send", style="Accent.TButton", command=self._on_send)
        self.send_button.pack(side="right", fill="y", padx=(8, 0))
        self.file_button = self.ttk.Button(row, text="Send file\u2026", command=self._on_file_button)
        self.file_button.pack(side="right", fill="y", padx=(8, 0))
        border = self.tk.Frame(row, highlightthickness=1)  # a thin frame that lights up with the focus
        border.pack(side="left", fill="both", expand=True)
        self.input_box = InputBox(self.tk, border, self._on_send, self._names_starting)
        self.input = self.input_box.text
        self.input.pack(fill="both", expand=True)
        self.input.bind("<<Paste>>", self._on_paste)  # a picture on the clipboard is shared, not pasted
        self.input_border = border

    def _build_status(self):
        self.status = self.ttk.Label(self.root, text="", anchor="w", style="Status.TLabel", padding=(10, 3),
                                     justify="left")
        self.status.pack(side="bottom", fill="x")

    # -- look: theme, text size, width ------------------------------------------------

    def _paint(self):
        """Colour everything for the current theme (on building, and when it changes)."""
        c = self.look.colours
        self.look.style(self.ttk)
        self.ttk.Style(self.root).configure("Host.TLabel", background=c["select"], foreground=c["text"],
                                            font=self.look.small)
        self.title_label.configure(background=c["surface"])
        for listbox in (self.conversation_list, self.people):
            self.look.paint_list(listbox)
        self.look.paint_text(self.input)
        self.input.configure(padx=8, pady=6)
        self.input_border.configure(background=c["surface"], highlightbackground=c["border"],
                                    highlightcolor=c["accent"])
        for menu in self.menus + (self.switch_menu,):
            menu.configure(background=c["panel"], foreground=c["text"], activebackground=c["select"],
                           activeforeground=c["text"], selectcolor=c["accent"], borderwidth=0,
                           activeborderwidth=0, font=self.look.body, relief="flat")
        for conversation in self.conversations.values():
            conversation.paint(self.look)
        self._show_people()
        self._update_conversation_list()
        self._set_status(self._status_text, self._status_error)

    def set_theme(self, choice):
        """Switch to "light", "dark" or "system" (the system's own), and remember it."""
        self.look.set_theme(choice)
        self.theme_choice.set(choice)
        self._paint()
        self._save_look()

    def _on_text_size(self, steps):
        self.look.set_size(self.look.bigger(steps) if steps else DEFAULT_TEXT_SIZE)
        self._save_look()
        return "break"

    def _save_look(self):
        self.settings = load_settings()
        self.settings.update(theme=self.look.choice, text_size=self.look.size,
                             notify_desktop=self.notify_desktop.get(), notify_sound=self.notify_sound.get())
        save_settings(self.settings)

    def _on_resize(self, event):
        if event.widget is self.root:
            self._arrange_panes()

    def _arrange_panes(self):
        """Hide the side panes where the window is too narrow for them (nothing gets cut)."""
        width = self.root.winfo_width()
        if width <= 1:
            return
        people = self.show_people.get() and width >= NARROW_WIDTH_PX
        sidebar = width >= NARROWER_WIDTH_PX
        chars = 20 if width >= WIDE_WIDTH_PX else 14  # long names fit where there is room
        if int(self.people.cget("width")) != chars:
            for listbox in (self.conversation_list, self.people):
                listbox.configure(width=chars)
            self.root.after_idle(self._fit_sashes)
        shown = [str(p) for p in self.panes.panes()]
        if (str(self.sidebar) in shown) != sidebar:
            if sidebar:
                self.panes.insert(0, self.sidebar, weight=0)
                self.switch_button.pack_forget()
            else:
                self.panes.forget(self.sidebar)
                self.switch_button.pack(side="right", anchor="n", padx=(6, 0), before=self.leave_button)
        if (str(self.people_pane) in shown) != people:
            if people:
                self.panes.add(self.people_pane, weight=0)
            else:
                self.panes.forget(self.people_pane)

    def _fit_sashes(self):
        """Give the side panes the width their lists ask for (a paned window keeps the old one)."""
        if self._closing:
            return
        panes = [str(p) for p in self.panes.panes()]
        total = self.panes.winfo_width()
        if str(self.sidebar) in panes and len(panes) > 1:
            self.panes.sashpos(0, self.sidebar.winfo_reqwidth())
        if str(self.people_pane) in panes and len(panes) > 1:
            self.panes.sashpos(len(panes) - 2, total - self.people_pane.winfo_reqwidth())

    def _on_centre_resize(self, event):
        self.host_label.configure(wraplength=max(200, event.width - 40))
        self.status.configure(wraplength=max(200, self.root.winfo_width() - 24))

    def _fitted(self, text, pixels):
        """Return text, shortened with an ellipsis where it would not fit in pixels (never cut)."""
        if pixels is None or self.look.body.measure(text) <= pixels:
            return text
        for end in range(len(text) - 1, 0, -1):
            if self.look.body.measure(text[:end] + "\u2026") <= pixels:
                return text[:end] + "\u2026"
        return text[:1] + "\u2026"

    def _set_status(self, text, error=False):
        self._status_text, self._status_error = text, error
        self.status.configure(text=text, style="Error.Status.TLabel" if error else "Status.TLabel")


class ServerMemory:
    """What a chat window keeps per server in settings.json: its rooms and an unsent draft (a mixin).

    Runs on the Tk thread; needs self.settings, self.connection and self.input_box.
    """

    def _remembered(self, key):
        """Return this server's entry in the settings' `key` table (a dict by address)."""
        table = self.settings.get(key)
        return table.get(self.connection.address) if isinstance(table, dict) else None

    def _remember(self, key, value):
        """Keep value for this server under key in settings.json (None forgets it)."""
        self.settings = load_settings()  # another window may have saved meanwhile
        table = self.settings.get(key)
        table = dict(table) if isinstance(table, dict) else {}
        if value:
            table[self.connection.address] = value
        else:
            table.pop(self.connection.address, None)
        self.settings[key] = table
        save_settings(self.settings)

    def _saved_rooms(self):
        rooms = self._remembered("rooms")
        return [r for r in rooms if isinstance(r, str)][:MAX_SAVED_ROOMS] if isinstance(rooms, list) else []

    def _save_rooms(self):
        rooms = [c.name for c in self.conversations.values() if c.kind == "room"]
        if rooms != self._saved_rooms():
            self._remember("rooms", rooms)

    def _save_draft(self):
        """Keep what is typed and not sent, in every conversation, so that closing never throws it away."""
        drafts = dict(self.drafts)
        if self.current is not None:
            drafts[self.current] = self.input_box.get()
        drafts = {key: text for key, text in drafts.items() if text.strip()}
        if drafts or self._remembered("drafts"):
            self._remember("drafts", drafts)

    def _restore_draft(self):
        """Put back the drafts kept at closing: the current conversation's now, the others' when shown."""
        saved = self._remembered("drafts")
        if isinstance(saved, dict):
            self.drafts = {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)}
        draft = self.drafts.pop(self.current, "")
        if draft.strip():
            self.input.insert("1.0", draft)
        if saved:
            self._remember("drafts", None)


class ThumbnailFetcher:
    """Fetches the pictures for thumbnails, one at a time, on a "thumbnails" thread.

    want() is called on the Tk thread and never blocks it; the thread runs while
    there is something to fetch, and hands each picture (as bytes: PhotoImages are
    made on the Tk thread) to the window's queue as a local "thumbnail" frame.
    """

    def __init__(self, events):
        self.events = events
        self._wanted = collections.deque()  # (connection, conversation key, card number, url)
        self._lock = threading.Lock()  # want() and the thread deciding to end, which must not cross
        self._running = False
        self._stopped = threading.Event()

    def want(self, connection, key, card):
        with self._lock:
            self._wanted.append((connection, key, card.number, card.url))
            if self._running or self._stopped.is_set():
                return
            self._running = True
        threading.Thread(target=self._fetch_loop, name="thumbnails", daemon=True).start()

    def stop(self):
        """Fetch nothing more (the window closes); a fetch under way ends by itself."""
        self._stopped.set()

    def _fetch_loop(self):
        """Runs on the thumbnails thread: fetch what is wanted until nothing is."""
        while not self._stopped.is_set():
            with self._lock:
                if not self._wanted:
                    self._running = False
                    return
                connection, key, number, url = self._wanted.popleft()
            try:
                data = connection.fetch_bytes(url, THUMBNAIL_MAX_BYTES)
            except UserError:
                continue  # gone, or too big: the card stays without a picture
            except Exception:  # a bug must not end the thumbnails of every picture to come
                log.exception("thumbnail of %s", printable(url))
                continue
            size = picture_size(data)
            if size is not None and 0 < size[0] * size[1] <= THUMBNAIL_MAX_PIXELS:
                self.events.put((None, {"type": "thumbnail", "key": key, "number": number, "data": data}))


def _progress_reporter(events, fields):
    """Return progress(done, total) for a transfer's thread: it hands the Tk thread a frame
    at most every PROGRESS_EVERY_S (and at the end), never one for each chunk."""
    last = [0.0]

    def progress(done, total):
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or 0 < total <= done:
            last[0] = now
            events.put((None, dict(fields, done=done, total=total)))
    return progress


class FileSharing:
    """The chat window's side of sharing files: sending, pasting pictures, downloading (a mixin).

    Runs on the Tk thread; each transfer runs on a thread of its own ("upload",
    "download") that blocks in the connection's calls and reports through the
    window's queue, so the window never waits for one. Needs self.connection,
    self.events, self.uploads and the conversations.
    """

    # -- sending -----------------------------------------------------------------------

    def _on_file_button(self):
        """"Send file...": choose files and send them where the typing goes."""
        from tkinter import filedialog
        where = self._where()
        label = room_label(where["room"]) if "room" in where else where["to"]
        # One file: a dialog for several reads a typed name as a Tcl list, so "screen shot.png"
        # would be two names, and a clicked one shows in braces.
        chosen = filedialog.askopenfilename(parent=self.root, title="Send a file to %s" % label)
        if chosen:
            self._send_file(chosen, where)
        self.input.focus_set()

    def _send_file(self, path, where):
        """Send the file at path to where ({"room": R} or {"to": NAME}); say so if there is none."""
        path = Path(path).expanduser()
        if path.is_dir():
            self._add_notice("%s is a folder: send the files in it one by one." % path, tag="error")
        elif not path.is_file():
            self._add_notice("There is no file at %s: check its name and folder." % path, tag="error")
        else:
            share_file = self.connection.share_file  # the thread holds the connection, never the window
            self._share(path.name, lambda **options: share_file(str(path), **options), where)

    def _on_paste(self, event):
        """Ctrl+V: a picture on the clipboard (and no text) is shared; anything else pastes as usual."""
        data = self._clipboard_picture()
        if data is None:
            return None
        name, share_bytes = pasted_picture_name(), self.connection.share_bytes
        self._share(name, lambda **options: share_bytes(data, name, **options), self._where())
        return "break"

    def _clipboard_picture(self):
        """Return the PNG picture on the clipboard, or None (text there, nothing, or unreadable).

        Only X11's clipboard offers pictures to Tk: on Windows and macOS Tk reads
        text alone, and asking for TARGETS fails, so Ctrl+V pastes text there. As
        for any paste in Tk, the window waits for the program that copied to answer.
        """
        try:
            targets = self.root.tk.splitlist(self.root.clipboard_get(type="TARGETS"))
            if "image/png" not in targets or any(target in TEXT_TARGETS or target.lower().startswith("text/plain")
                                                 for target in targets):
                return None
            data = clipboard_bytes(self.root.clipboard_get(type="image/png"))
        except self.tk.TclError:
            return None
        return data if data is not None and data.startswith(PNG_SIGNATURE) else None

    def _share(self, name, send, where):
        """Send a file on an upload thread: send(room=, to=, progress=) blocks there."""
        if self.ended or not self.connected:
            self._add_notice("Not connected: %s was not sent." % name, tag="error")
            return
        self._next_upload += 1
        number = self._next_upload
        self.uploads[number] = [name, 0, 0]
        progress = _progress_reporter(self.events, {"type": "upload_progress", "number": number})
        threading.Thread(target=self._upload_worker, args=(self.events, number, name, send, dict(where), progress),
                         name="upload", daemon=True).start()
        self._show_uploads()

    @staticmethod
    def _upload_worker(events, number, name, send, where, progress):
        """Runs on an upload thread: send the file, then say how it went."""
        outcome = {"type": "upload_done", "number": number, "name": name, "where": where,
                   "error": "Sending %s stopped unexpectedly." % name}  # kept only if send() breaks
        try:
            send(room=where.get("room"), to=where.get("to"), progress=progress)
            outcome["error"] = None
        except UserError as error:
            outcome["error"] = str(error)
        finally:
            events.put((None, outcome))

    def _on_frame_upload_progress(self, frame):
        if frame["number"] in self.uploads:
            self.uploads[frame["number"]][1:] = [frame["done"], frame["total"]]
            self._show_uploads()

    def _on_frame_upload_done(self, frame):
        """A file went (its card comes as the server's message), or it did not: say why, where it was sent."""
        self.uploads.pop(frame["number"], None)
        self._show_uploads()
        if frame["error"] is None:
            return
        where = frame["where"]
        key = conversation_key("room", where["room"]) if "room" in where else conversation_key("direct", where["to"])
        text = frame["error"] if frame["name"] in frame["error"] else "%s was not sent: %s" % (frame["name"],
                                                                                              frame["error"])
        self._add_notice(text, tag="error", conversation=self.conversations.get(key))

    def _show_uploads(self):
        """Say how far the files on their way are, on a line above where the typing goes."""
        if not self.uploads:
            self.transfer_label.configure(text="")
            self.transfer_label.pack_forget()
            return
        done = sum(sent for _, sent, _ in self.uploads.values())
        total = sum(size for _, _, size in self.uploads.values())
        percent = " %d%%" % (100 * done // total) if total else ""
        if len(self.uploads) == 1:
            name, _, size = next(iter(self.uploads.values()))
            text = "Sending %s\u2026%s%s" % (name, percent, " of " + file_size_text(size) if size else "")
        else:
            text = "Sending %d files\u2026%s" % (len(self.uploads), percent)
        width = self.target_label.master.winfo_width() - 28  # the input panel, less its padding
        self.transfer_label.configure(text=displayable(self._fitted(text, width if width > 100 else None),
                                                       self.astral_ok))
        if not self.transfer_label.winfo_manager():
            self.transfer_label.pack(side="top", anchor="w", pady=(0, 2), before=self.target_label)

    # -- receiving -----------------------------------------------------------------------

    def _on_file_action(self, conversation, card, action):
        """A card's Download (again), Try again or Open was clicked."""
        if action == "open":
            events, key = self.events, conversation.key
            problem = open_with_system(card.saved, lambda sentence: events.put(
                (None, {"type": "open_failed", "key": key, "text": sentence})))
            if problem:
                self._add_notice(problem, tag="error", conversation=conversation)
            return
        if card.state == "busy" or card.url is None:
            return
        card.state, card.done, card.total = "busy", 0, 0
        conversation.redraw_card(card)
        fields = {"key": conversation.key, "number": card.number}
        progress = _progress_reporter(self.events, dict(fields, type="download_progress"))
        threading.Thread(target=self._download_worker, args=(self.events, self.connection, card.url, fields, progress),
                         name="download", daemon=True).start()

    @staticmethod
    def _download_worker(events, connection, url, fields, progress):
        """Runs on a download thread: save the file into Downloads, then say where (or why not)."""
        outcome = dict(fields, type="download_done", path=None, code=None, error="The download stopped unexpectedly.")
        try:
            outcome["path"] = connection.fetch_file(url, progress=progress)
            outcome["error"] = None
        except UserError as error:
            outcome.update(error=str(error), code=error.code)
        finally:
            events.put((None, outcome))

    def _card_of(self, frame):
        """Return (conversation, card) a transfer's frame is about, or (None, None) if it is gone."""
        conversation = self.conversations.get(frame["key"])
        card = conversation.cards.get(frame["number"]) if conversation is not None else None
        return (conversation, card) if card is not None else (None, None)

    def _on_frame_open_failed(self, frame):
        conversation = self.conversations.get(frame["key"])
        self._add_notice(frame["text"], tag="error", conversation=conversation)

    def _on_frame_download_progress(self, frame):
        conversation, card = self._card_of(frame)
        if card is not None and card.state == "busy":
            card.done, card.total = frame["done"], frame["total"]
            conversation.redraw_card(card)

    def _on_frame_download_done(self, frame):
        conversation, card = self._card_of(frame)
        if card is None:
            return
        if frame["error"] is None:
            card.state, card.saved = "saved", frame["path"]
        elif frame["code"] == "expired":
            card.state = "expired"
        else:
            card.state, card.problem = "failed", frame["error"]
        conversation.redraw_card(card)

    def _on_frame_thumbnail(self, frame):
        """A picture came for a card: make it small enough and show it there."""
        conversation, card = self._card_of(frame)
        if card is None:
            return
        try:
            whole = self.tk.PhotoImage(master=self.root, data=base64.b64encode(frame["data"]).decode("ascii"))
        except self.tk.TclError:
            return  # Tk cannot read it after all: the card alone
        step = thumbnail_step(whole.width(), whole.height())
        conversation.add_thumbnail(card, whole.subsample(step) if step > 1 else whole)


class ChatWindow(ChatPanels, ServerMemory, FileSharing):
    """The chat window: conversations, log, people, input, status line. Runs on the Tk thread.

    Here: the connection's frames and what the person does. The widgets themselves are
    ChatPanels' (built, painted, arranged); what is kept per server is ServerMemory's;
    files sent, downloaded and shown as pictures are FileSharing's.
    """

    def __init__(self, root, host, port, name, identity=None, hosted=None, tls=False, fingerprint=None):
        import tkinter
        from tkinter import ttk
        self.tk, self.ttk, self.root = tkinter, ttk, root
        self.settings = load_settings()
        self.connection = None
        self.events = queue.Queue()  # (connection, frame) from the connections' threads; (None, frame) from files'
        self.thumbnails = ThumbnailFetcher(self.events)
        self.uploads = {}  # number -> [name, bytes sent, bytes in all] of each file on its way
        self._next_upload = 0
        self._make_connection(ChatConnection(host, port, name, identity=identity, reconnect=True,
                                             password=os.environ.get("LOCALCHAT_PASSWORD"),
                                             tls=tls, fingerprint=fingerprint))
        self.trust_dialog = None  # the TrustDialog while one is open
        saved = self._saved_rooms()  # general too: the window always shows it
        self.connection.rooms = saved if not saved or GENERAL_ROOM in saved else [GENERAL_ROOM] + saved
        self.conversations = {}  # key -> Conversation, in the order they opened
        self.astral_ok = tk_shows_astral(str(root.tk.call("info", "patchlevel")))
        self.connected = False
        self.ended = False  # the connection ended for good: nothing typed is sent until Reconnect
        self.has_focus = True
        self.current = None
        self.seen_ids = set()  # message ids shown, so nothing shows twice
        self.drafts = {}  # conversation key -> what was typed there and not sent, while another is shown
        self._switch_to = conversation_key("room", GENERAL_ROOM)  # open this room when it arrives
        self._closing = False
        self._poll_id = None
        self.confirm_dialog = None
        self.password_dialog = None
        self._ref_prefix = secrets.token_hex(3)
        self._next_ref = 0
        self.hosted = hosted  # a HostedServer this window started, stopped when it closes
        self.code_window = self.code_image = None  # the QR code of the web address, while it is shown
        self.look = Look(tkinter, root, self.settings.get("theme", "system"),
                         self.settings.get("text_size", DEFAULT_TEXT_SIZE))
        self.notifier = Notifier()
        self._status_text, self._status_error = "", False
        self._build_window()
        self._open_conversation("room", GENERAL_ROOM)
        self._paint()
        self._restore_draft()
        self._poll_id = root.after(POLL_INTERVAL_MS, self._poll)
        self._connect()

    def _make_connection(self, connection):
        """Make connection the window's; frames of an earlier one are dropped from now on.

        The threads hold the queue, never the window: the window's last reference must
        go on the Tk thread (Tk variables may only be deleted there).
        """
        events = self.events

        def events_put(frame):
            """Runs on the connection's threads: hand a frame to the Tk thread."""
            events.put((connection, frame))

        def ask_trust(untrusted):
            """Runs on the connecting thread: ask on the Tk thread, and wait for the answer.

            No socket is open meanwhile, so the person may take their time; closing the
            window (or giving this connection up) closes the connection, which answers no.
            """
            answers = queue.Queue()
            events.put((connection, {"type": "trust", "untrusted": untrusted, "answers": answers}))
            while not connection.closed:
                try:
                    return answers.get(timeout=POLL_INTERVAL_MS / 1000.0)
                except queue.Empty:
                    pass
            return False
        connection.on_event = events_put
        connection.trust = ask_trust
        self.connection = connection

    @property
    def astral_ok(self):
        """Whether this Tk shows characters above U+FFFF (else they show as U+FFFD)."""
        return self._astral_ok

    @astral_ok.setter
    def astral_ok(self, value):
        self._astral_ok = value
        for conversation in self.conversations.values():
            conversation.astral_ok = value

    # -- conversations -------------------------------------------------------------

    @property
    def log(self):
        """The log of the current conversation."""
        return self.conversations[self.current].log

    def _open_conversation(self, kind, name):
        """Return the conversation, making it (and its log) on first use."""
        key = conversation_key(kind, name)
        conversation = self.conversations.get(key)
        if conversation is None:
            conversation = self.conversations[key] = Conversation(kind, name, self.astral_ok)
            conversation.build(self.tk, self.ttk, self.log_stack, self._on_older, self._on_link, self.look,
                               on_file=self._on_file_action)
            if self.current is None:
                self._show_conversation(key)
            self._update_conversation_list()
        return conversation

    def _close_conversation(self, key):
        conversation = self.conversations.pop(key, None)
        if conversation is None:
            return
        conversation.frame.destroy()
        conversation.release_images()
        if self.current == key:
            self.current = None
            if self.conversations:
                self._show_conversation(next(iter(self.conversations)))
        self._update_conversation_list()

    def _show_conversation(self, key):
        """Make a conversation the current one: its log, topic, people, and its own draft."""
        if self.current in self.conversations:
            self.conversations[self.current].frame.pack_forget()
            # Each conversation keeps its draft: text typed for one never goes to another.
            self.drafts[self.current] = self.input_box.get()
            self.input_box.clear()
        self.current = key
        self.input.insert("1.0", self.drafts.pop(key, ""))
        conversation = self.conversations[key]
        conversation.frame.pack(fill="both", expand=True)
        conversation.log.see("end")
        conversation.unread = 0
        self._show_topic()
        self._show_people()
        self._update_conversation_list()
        self._update_title()

    def _update_conversation_list(self):
        keys = list(self.conversations)
        self.conversation_list.delete(0, "end")
        for index, key in enumerate(keys):
            conversation = self.conversations[key]
            width = self.conversation_list.winfo_width()
            self.conversation_list.insert("end", self._fitted(displayable(conversation.label, self.astral_ok),
                                                              width - 12 if width > 50 else None))
            if conversation.unread:
                self.conversation_list.itemconfigure(index, foreground=self.look.colours["new"])
        if self.current in keys:
            self.conversation_list.selection_clear(0, "end")
            self.conversation_list.selection_set(keys.index(self.current))
        unread = sum(c.unread for c in self.conversations.values())
        self.switch_button.configure(text="Conversations" + (" (%d)" % unread if unread else ""))
        self.switch_menu.delete(0, "end")
        for key in keys:
            self.switch_menu.add_command(label=displayable(self.conversations[key].label, self.astral_ok),
                                         command=lambda key=key: self._show_conversation(key))

    def _on_conversation_selected(self, event):
        selection = self.conversation_list.curselection()
        if selection:
            keys = list(self.conversations)
            if selection[0] < len(keys) and keys[selection[0]] != self.current:
                self._show_conversation(keys[selection[0]])
        self.input.focus_set()

    def _show_topic(self):
        """The header names the conversation (and its topic); the input says where text goes."""
        conversation = self.conversations.get(self.current)
        if conversation is None:
            return
        if conversation.kind == "direct":
            title, topic = "@ " + conversation.name, "Only you and %s see this conversation." % conversation.name
            target = "Message to %s (only %s sees it)" % (conversation.name, conversation.name)
        else:
            title, topic = "#" + conversation.name, conversation.topic or ""
            target = "Message to #%s (everybody in the room sees it)" % conversation.name
        self.title_label.configure(text=displayable(title, self.astral_ok))
        self.topic_label.configure(text=displayable(topic, self.astral_ok))
        self.target_label.configure(text=displayable(target, self.astral_ok))

    def _show_people(self):
        conversation = self.conversations.get(self.current)
        if conversation is not None and conversation.kind == "direct":
            users = [conversation.name, self.connection.name]  # who sees this conversation
            self.people_title.configure(text="Just the two of you")
            self.leave_button.configure(text="Close conversation")
        else:
            users = conversation.users if conversation else []
            self.people_title.configure(text="People here: %d" % len(users) if self.connected else
                                        "Not connected")
            self.leave_button.configure(text="Leave room")
        self.people.delete(0, "end")
        own = name_key(self.connection.name)
        width = self.people.winfo_width()
        room = width - 12 if width > 50 else None  # None: not shown yet, nothing to fit
        for index, user in enumerate(users):
            label = user + (" (you)" if name_key(user) == own else "")
            if user in (conversation.away if conversation else {}):
                label += " (away)"
            self.people.insert("end", self._fitted(displayable(label, self.astral_ok), room))
            self.people.itemconfigure(index, foreground=name_colour(user, self.look.theme))

    def _set_room_users(self, conversation, users):
        conversation.users = sorted(set(users), key=name_key)
        if conversation.key == self.current:
            self._show_people()

    def _rooms_with(self, name):
        """Return the room conversations in which `name` is listed."""
        key = name_key(name)
        return [c for c in self.conversations.values()
                if c.kind == "room" and any(name_key(u) == key for u in c.users)]

    # -- connection --------------------------------------------------------------

    def _connect(self):
        self._set_status("Connecting to %s..." % self.connection.address)
        threading.Thread(target=self._connect_worker, args=(self.connection,), name="connect", daemon=True).start()

    @staticmethod
    def _connect_worker(connection):
        """Runs on the connect thread: connect, then report through the queue."""
        try:
            connection.connect()
        except UserError as error:
            connection.on_event({"type": "connect_failed", "text": str(error), "code": error.code})
            return
        connection.start()

    def _reconnect(self, name=None):
        """Start afresh (after a kick, a refusal or a new name): a new connection, the same rooms."""
        if not self.ended:
            return  # connected, or reconnecting by itself: a second connection would fight the first
        old = self.connection
        fresh = ChatConnection(old.host, old.port, name or old.name, identity=old.identity, reconnect=True,
                               password=old.password, tls=old.tls, fingerprint=old.pinned)
        fresh.rooms = [c.name for c in self.conversations.values() if c.kind == "room"]
        self._make_connection(fresh)
        self.ended = False
        self.banner.hide()
        threading.Thread(target=old.close, kwargs={"say_bye": False}, name="closing-old", daemon=True).start()
        self._update_title()
        self._connect()

    def _poll(self):
        """Drain the event queue, then re-arm while the window is open."""
        self._poll_id = None
        for _ in range(EVENTS_PER_POLL):
            try:
                connection, frame = self.events.get_nowait()
            except queue.Empty:
                break
            if connection is not None and connection is not self.connection:
                continue  # from a connection this window has given up on (Reconnect, another name)
            handler = getattr(self, "_on_frame_" + str(frame.get("type")), None)
            if handler is not None:
                handler(frame)
        if not self._closing:
            self._poll_id = self.root.after(POLL_INTERVAL_MS, self._poll)

    # -- frames from the server ----------------------------------------------------

    def _show_connected(self):
        self._set_status("Connected to %s as %s%s" % (self.connection.address, self.connection.name,
                                                      " (encrypted)" if self.connection.channel else ""))

    def _on_frame_welcome(self, frame):
        self.connected = True
        self.banner.hide()
        self._show_connected()
        self._update_title()
        self._add_notice(notice_text(frame))
        if self.connection.channel is not None and not frame.get("resumed"):
            unsaved = self.connection.fingerprint_status == "unsaved"
            self._add_notice(encryption_notice(self.connection), tag="error" if unsaved else "notice")

    def _on_frame_connect_failed(self, frame):
        self._set_status(frame["text"], error=True)
        self._add_notice(frame["text"], tag="error")
        self._offer_way_back(frame["text"], frame.get("code"))

    def _offer_way_back(self, text, code):
        """After the connection ended for good: say what now, and offer what can work."""
        self.ended = True
        self._clear_people()
        unsent = " Nothing you type is sent until you reconnect."
        if code in ("name_taken", "bad_name"):
            self.banner.show(text, entry=self.connection.name, button=("Join with this name", self._on_new_name))
        elif code in ("password_required", "auth_failed"):
            self.banner.show(text + unsent, button=("Enter the password", lambda: self._ask_password(text)))
            self._ask_password(text)
        elif code in ("banned", "fingerprint_mismatch"):
            self.banner.show(text + " Nothing you type is sent.")  # trying again cannot help
        elif code == "quit":
            self.banner.show("You left the chat from another window." + unsent,
                             button=("Reconnect", self._reconnect))
        else:
            self.banner.show(text + unsent, button=("Reconnect", self._reconnect))

    def _on_new_name(self):
        """The Join button by a refused name: join again with the name typed there."""
        name = self.banner.entry_text().strip()
        try:
            check_name(name)
        except ProtocolError as error:
            self.banner.show(error.text, entry=name, button=("Join with this name", self._on_new_name))
            return
        self._reconnect(name)

    def _on_frame_trust(self, frame):
        untrusted = frame["untrusted"]
        self._set_status("The certificate of %s has CHANGED: look at the warning." % untrusted.address
                         if untrusted.changed else "Check the server's certificate to connect.", error=untrusted.changed)
        self.trust_dialog = TrustDialog(self.root, self.tk, self.ttk, untrusted, frame["answers"].put,
                                        self.look.colours["error"])  # readable in the dark theme too

    def _ask_password(self, why):
        """Ask for the server's password in a small window, then connect again."""
        if self.password_dialog is not None and self.password_dialog.top.winfo_exists():
            return  # asked already
        self.password_dialog = PasswordDialog(self.root, self.tk, self.ttk, why, self._on_password)

    def _on_password(self, password):
        if not password or self.connected:
            return
        self.connection.password = password
        if self.connection.started:  # it ran and ended: a fresh one
            self._reconnect()
            return
        self.ended = False  # never got in: the same connection tries again, what it learned kept
        self.banner.hide()
        self._connect()

    def _on_frame_room(self, frame):
        conversation = self._open_conversation("room", str(frame.get("room")))
        conversation.topic = frame.get("topic")
        conversation.away = dict(frame.get("away") or {})
        self._set_room_users(conversation, frame.get("users") or [])
        self._add_notice(notice_text(frame), conversation=conversation)
        self._save_rooms()
        if conversation.key == self._switch_to:
            self._switch_to = None
            self._show_conversation(conversation.key)
        elif conversation.key == self.current:
            self._show_topic()

    def _on_frame_message(self, frame):
        if frame.get("id") in self.seen_ids:
            return
        self.seen_ids.add(frame.get("id"))
        sender, text = str(frame.get("from")), str(frame.get("text"))
        own = name_key(sender) == name_key(self.connection.name)
        if frame.get("room") is not None:
            conversation = self._open_conversation("room", str(frame["room"]))
        else:
            conversation = self._open_conversation("direct", str(frame.get("to") if own else sender))
        direct = conversation.kind == "direct"
        fresh = not frame.get("replay") and not own
        highlight = not own and (direct or mentions(text, self.connection.name))
        extra = ("own",) if own else ("mention",) if highlight else ()
        if fresh and conversation.unread == 0 and (conversation.key != self.current or not self.has_focus):
            conversation.mark_unread_start()
        card = conversation.add_message(frame, extra)
        if card is not None and card.picture:
            self.thumbnails.want(self.connection, conversation.key, card)
        if conversation.key == self._switch_to:  # the echo of a /msg: the conversation is real
            self._switch_to = None
            self._show_conversation(conversation.key)
        if fresh:
            self._count_unread(conversation, frame, ring=highlight)

    def _on_frame_joined(self, frame):
        room = frame.get("room") or GENERAL_ROOM
        conversation = self.conversations.get(conversation_key("room", room))
        if conversation is not None:
            self._set_room_users(conversation, conversation.users + [str(frame.get("name"))])
            self._add_notice(notice_text(frame), frame.get("ts"), conversation=conversation)

    def _on_frame_left(self, frame):
        name = str(frame.get("name"))
        if frame.get("room"):
            if name_key(name) == name_key(self.connection.name):
                self._close_conversation(conversation_key("room", frame["room"]))
                self._save_rooms()
                return
            rooms = [c for c in [self.conversations.get(conversation_key("room", frame["room"]))] if c]
        else:
            rooms = self._rooms_with(name)
        for conversation in rooms:
            self._set_room_users(conversation, [u for u in conversation.users if name_key(u) != name_key(name)])
            self._add_notice(notice_text(frame), frame.get("ts"), conversation=conversation)

    def _on_frame_users(self, frame):
        if frame.get("room"):
            conversation = self.conversations.get(conversation_key("room", frame["room"]))
            if conversation is not None:
                conversation.away = dict(frame.get("away") or {})
                self._set_room_users(conversation, frame.get("users") or [])
        self._add_notice(notice_text(frame))

    def _on_frame_topic(self, frame):
        conversation = self.conversations.get(conversation_key("room", str(frame.get("room"))))
        if conversation is not None:
            conversation.topic = frame.get("topic")
            self._show_topic()
        self._add_notice(notice_text(frame), frame.get("ts"), conversation=conversation)

    def _on_frame_renamed(self, frame):
        old, new = str(frame.get("old")), str(frame.get("name"))
        rooms = self._rooms_with(old)
        for conversation in rooms:
            users = [new if name_key(u) == name_key(old) else u for u in conversation.users]
            self._set_room_users(conversation, users)
            self._add_notice(notice_text(frame), frame.get("ts"), conversation=conversation)
        if name_key(old) == name_key(self.connection.name) or name_key(new) == name_key(self.connection.name):
            self._update_title()
            if self.connected:
                self._show_connected()
            self._show_people()
            if not rooms:
                self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_away(self, frame):
        name = str(frame.get("name"))
        for conversation in self._rooms_with(name):
            if frame.get("text"):
                conversation.away[name] = frame["text"]
            else:
                conversation.away.pop(name, None)
            if conversation.key == self.current:
                self._show_people()
        self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_rooms(self, frame):
        self._add_notice(notice_text(frame))

    def _on_frame_notice(self, frame):
        """Moderation and the server owner's announcements (they were never shown before)."""
        self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_invite(self, frame):
        """Somebody asks somebody into a room: say so where the person is looking."""
        self._add_notice(notice_text(frame), frame.get("ts"))

    def _on_frame_history_end(self, frame):
        if frame.get("room"):
            conversation = self.conversations.get(conversation_key("room", frame["room"]))
        else:
            conversation = self.conversations.get(conversation_key("direct", str(frame.get("with"))))
        if conversation is None:
            return
        conversation.end_page(frame.get("more"))

    def _on_frame_error(self, frame):
        if frame.get("ref") and self._switch_to and self._switch_to.startswith("direct:"):
            self._switch_to = None  # a /msg refused: no conversation opens for it
        self._add_notice(notice_text(frame), tag="error")

    def _on_frame_bye(self, frame):
        if frame.get("reason") != "quit":
            self._add_notice(notice_text(frame), tag="error")

    def _on_frame_synced(self, frame):
        self._show_connected()

    def _on_frame_reconnecting(self, frame):
        was_connected, self.connected = self.connected, False
        self._set_status(frame["text"], error=True)
        self._clear_people()
        if was_connected:
            why = ("The server shut down; LocalChat joins again once it is back." if self.connection.server_shut_down
                   else "Connection lost; reconnecting.")
            self._add_notice(why + " What you type meanwhile is sent once the connection is back.", tag="error")

    def _on_frame_disconnected(self, frame):
        self.connected = False
        if frame.get("expected"):
            return
        text = frame.get("text") or "The connection was lost."
        self._set_status("Disconnected from %s: %s" % (self.connection.address, text), error=True)
        if frame.get("code") not in ("kicked", "banned", "replaced"):  # the bye already said it
            self._add_notice(text, tag="error")
        self._offer_way_back(text, frame.get("code"))

    def _clear_people(self):
        """Not connected: nobody is known to be here (the lists fill again on reconnecting)."""
        for conversation in self.conversations.values():
            conversation.users = []
            conversation.away = {}
        self._show_people()

    # -- showing -----------------------------------------------------------------

    def _update_title(self):
        unread = sum(c.unread for c in self.conversations.values()) if not self.has_focus else 0
        title = "%s - LocalChat (%s)" % (self.connection.name, self.connection.address)
        self.root.title(("(%d) " % unread if unread else "") + title)

    def _count_unread(self, conversation, frame, ring):
        """A new message from somebody else: count it if unseen, tell of it if it is for us."""
        if conversation.key != self.current or not self.has_focus:
            conversation.unread += 1
            self._update_conversation_list()
            self._update_title()
        if not ring:
            return
        told = False
        if not self.has_focus and self.notify_desktop.get():
            where = "" if conversation.kind == "direct" else " in #" + conversation.name
            shared = frame.get("file") if isinstance(frame.get("file"), dict) else None
            text = "shared %s" % clean_file_name(shared.get("name")) if shared else str(frame.get("text"))
            told = self.notifier.notify(self.root, "%s%s" % (frame.get("from"), where), text)
        if not told and self.notify_sound.get():
            self.root.bell()

    def _add_notice(self, text, ts=None, tag="notice", conversation=None):
        conversation = conversation or self.conversations.get(self.current)
        if text and conversation is not None:
            conversation.add_notice(text, ts, tag)

    # -- what the person does ---------------------------------------------------------

    def _where(self):
        """Return where what is typed (or sent as a file) goes now: {"room": R} or {"to": NAME}."""
        conversation = self.conversations.get(self.current)
        return conversation.where if conversation else {"room": GENERAL_ROOM}

    def _on_send(self):
        text = self.input_box.get()
        action, value = parse_input(text, self._where())
        if action is None:
            return
        if action == "send" and (self.ended or not self.connection.welcome):
            self._add_notice("Not connected: your message was not sent (it is still in the input box).",
                             tag="error")
            return
        if action == "send_file" and (self.ended or not self.connected):
            self._add_notice("Not connected: no file was sent (the command is still in the input box).", tag="error")
            return
        self.input_box.remember(text)
        self.input_box.clear()
        if action == "send":
            self._send(value)
        elif action == "send_file":
            self._send_file(value.pop("path"), value)
        elif action == "quit":
            self.close()
            return
        elif action == "help":
            self._add_notice(value)
        else:
            self._add_notice(value, tag="error")
        self.input.focus_set()

    def _send(self, fields):
        """Post a frame; a message gets a ref, and a /join or /msg opens its conversation."""
        if fields["type"] == "say":
            self._next_ref += 1
            fields["ref"] = "%s-%d" % (self._ref_prefix, self._next_ref)
            key = conversation_key("direct", fields["to"]) if fields.get("to") else None
            if key in self.conversations:
                self._show_conversation(key)
            elif key is not None:  # opened when the echo comes: a refused /msg opens nothing
                self._switch_to = key
        elif fields["type"] == "join":
            key = conversation_key("room", fields["room"])
            if key in self.conversations:
                self._show_conversation(key)
                return
            self._switch_to = key
        if not self.connected:
            self._add_notice("Not connected: this will be sent when the connection is back.", tag="error")
        self.connection.post(fields)

    def _on_link(self, url):
        """A link in the log was clicked: open it in the browser (http and https only)."""
        if url.lower().startswith(("http://", "https://")):
            try:
                webbrowser.open(url, new=2)
            except webbrowser.Error as error:
                self._add_notice("Could not open %s: %s" % (url, error), tag="error")

    def _on_join_button(self):
        room = self.join_entry.get().strip().lstrip("#")
        if room:
            self.join_entry.delete(0, "end")
            self._send({"type": "join", "room": room})
        self.input.focus_set()

    def _on_leave_button(self):
        conversation = self.conversations.get(self.current)
        if conversation is None:
            return
        if conversation.kind == "room":
            self._send({"type": "leave", "room": conversation.name})
        else:
            self._close_conversation(conversation.key)
        self.input.focus_set()

    def _on_person_double_click(self, event):
        selection = self.people.curselection()
        conversation = self.conversations.get(self.current)
        if selection and conversation is not None and selection[0] < len(conversation.users):
            name = conversation.users[selection[0]]
            if name_key(name) != name_key(self.connection.name):
                self._show_conversation(self._open_conversation("direct", name).key)
        self.input.focus_set()

    def _on_older(self, conversation):
        """Ask the server for the page of messages before the oldest one shown."""
        request = {"type": "history", "limit": 50}
        request.update({"room": conversation.name} if conversation.kind == "room" else {"with": conversation.name})
        before = conversation.start_page()
        if before is not None:
            request["before"] = before
        self.connection.post(request)

    def _names_starting(self, prefix):
        conversation = self.conversations.get(self.current)
        names = list(conversation.users if conversation else [])
        for other in self.conversations.values():
            names += other.users + ([other.name] if other.kind == "direct" else [])
        key, found = name_key(prefix), []
        for name in names:
            if name_key(name).startswith(key) and name not in found and name_key(name) != name_key(self.connection.name):
                found.append(name)
        return found

    def _on_focus_in(self, event):
        if not self.has_focus:
            self.has_focus = True
            conversation = self.conversations.get(self.current)
            if conversation is not None:
                conversation.unread = 0
                self._update_conversation_list()
            self._update_title()

    def _on_focus_out(self, event):
        # Focus moving between our own widgets also sends FocusOut: check once it settles.
        self.root.after_idle(self._check_focus)

    def _check_focus(self):
        if self._closing:
            return
        try:
            widget = self.root.focus_get()
        except KeyError:  # focus is in a widget Tk no longer knows (a closed dialog)
            widget = None
        focused = widget is not None and str(widget.winfo_toplevel()) == str(self.root)
        if not focused and self.has_focus:
            self.has_focus = False

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
        """Leave the chat and destroy the window, at once.

        Saying goodbye can take seconds (a server that stopped reading), and so can
        stopping a hosted server: a "closing" thread does both. It is no daemon, so
        when this was the last window Python waits for it before exiting, and the
        bye and the hosted chat's history still get where they go.
        """
        if self._closing:
            return
        self._closing = True
        if self._poll_id is not None:
            self.root.after_cancel(self._poll_id)
            self._poll_id = None
        self._save_draft()
        self.thumbnails.stop()
        for conversation in self.conversations.values():
            conversation.release_images()
        threading.Thread(target=self._close_worker, args=(self.connection, self.hosted, self.connected),
                         name="closing").start()
        self.root.destroy()

    @staticmethod
    def _close_worker(connection, hosted, say_bye):
        """Runs on the closing thread: leave the server, then stop the hosted one, if any."""
        connection.close(say_bye=say_bye)
        if hosted is not None:
            hosted.stop()


class HostedServer:
    """A server started inside the window's process ("Host a chat on this computer")."""

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT):
        # Its own files: a `localchat.py server` on this computer may be using history.sqlite3.
        files = FileStore(data_dir() / "hosted-history-files", Limits().files_bytes)
        hub = ChatHub(socket.gethostname(), SqliteStore(data_dir() / "hosted-history.sqlite3"), files=files)
        try:
            self.server = ChatServer((host, port), hub=hub)
        except OSError:  # the usual port is taken (another server here?): any free one will do
            self.server = ChatServer((host, 0), hub=hub)
        self.discovery = start_discovery(self.server, host)
        self.thread = threading.Thread(target=self.server.serve_forever, name="accept", daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.server.port

    def join_hint(self):
        """Return the sentence that tells the others how to join."""
        addresses = lan_addresses()
        suffix = "" if self.port == DEFAULT_PORT else ":%d" % self.port
        if not addresses:
            return "You are hosting this chat, but this computer has no network address others could use."
        return ("You are hosting this chat. Others join by starting LocalChat (it finds this chat by "
                "itself), or with: python3 localchat.py NAME --server %s%s. Phones and browsers open %s"
                % (addresses[0], suffix, self.web_url()))

    def web_url(self):
        """Return the address a phone's browser opens for this chat, or None without a network address."""
        addresses = lan_addresses()
        return web_address(addresses[0], self.port, False) if addresses else None

    def stop(self):
        if self.discovery is not None:
            self.discovery.stop()
        self.server.stop()
        self.thread.join(2.0)


class JoinWindow:
    """The window a double-click opens: a name, the chats found nearby, an address, or host one.

    Runs on the Tk thread; discovery runs on a worker thread and reports by a queue.
    on_join(host, port, name, hosted) is called once the person has chosen.
    """

    def __init__(self, root, on_join, name=None, found=None, port=DEFAULT_PORT, host_address=None):
        import tkinter
        from tkinter import ttk
        self.tk, self.ttk, self.root = tkinter, ttk, root
        self.on_join = on_join
        self.port = port  # where discovery probes go
        self.host_address = host_address or (DEFAULT_HOST, DEFAULT_PORT)  # where "Host a chat" listens
        self.settings = load_settings()
        self.found = []
        self.results = queue.Queue()  # lists of servers from the discovery thread
        self._poll_id = None
        self._closed = False
        self._build(name or self.settings.get("name", ""))
        if found is None:
            self.refresh()
        else:
            self._show_found(found)
        self._poll_id = root.after(POLL_INTERVAL_MS, self._poll)

    def _build(self, name):
        self.root.title("LocalChat - join a chat")
        self.root.geometry("560x470")
        self.look = Look(self.tk, self.root, self.settings.get("theme", "system"),
                         self.settings.get("text_size", DEFAULT_TEXT_SIZE))
        self.look.style(self.ttk)
        self.frame = self.ttk.Frame(self.root, padding=20)
        self.frame.pack(fill="both", expand=True)
        self.ttk.Label(self.frame, text="Your name").pack(anchor="w")
        self.name_entry = self.ttk.Entry(self.frame, width=32)
        self.name_entry.insert(0, name)
        self.name_entry.pack(anchor="w", fill="x", pady=(0, 10))
        self.ttk.Label(self.frame, text="Chats found on this network").pack(anchor="w")
        self.server_list = self.tk.Listbox(self.frame, height=6, activestyle="none", exportselection=False)
        self.look.paint_list(self.server_list)
        self.server_list.configure(background=self.look.colours["surface"], highlightthickness=1,
                                   highlightbackground=self.look.colours["border"])
        self.server_list.pack(fill="both", expand=True)
        self.server_list.bind("<Double-Button-1>", lambda event: self.join())
        self.server_list.bind("<<ListboxSelect>>", lambda event: self.address_entry.delete(0, "end"))
        self.refresh_button = self.ttk.Button(self.frame, text="Look again", command=self.refresh)
        self.refresh_button.pack(anchor="e", pady=(4, 10))
        self.ttk.Label(self.frame, text="Or the address of a chat (HOST or HOST:PORT)").pack(anchor="w")
        self.address_entry = self.ttk.Entry(self.frame, width=32)
        self.address_entry.insert(0, self.settings.get("server", ""))
        self.address_entry.pack(anchor="w", fill="x", pady=(0, 10))
        self.address_entry.bind("<Key>", lambda event: self.server_list.selection_clear(0, "end"))
        buttons = self.ttk.Frame(self.frame)
        buttons.pack(fill="x")
        self.join_button = self.ttk.Button(buttons, text="Join", style="Accent.TButton", command=self.join)
        self.join_button.pack(side="right")
        self.host_button = self.ttk.Button(buttons, text="Host a chat on this computer", command=self.host)
        self.host_button.pack(side="left")
        self.status = self.ttk.Label(self.frame, text="", foreground=self.look.colours["error"], wraplength=500)
        self.status.pack(anchor="w", pady=(10, 0))
        self.root.bind("<Return>", lambda event: self.join())
        self.name_entry.focus_set()

    def refresh(self):
        """Look for chats on a worker thread; the list fills in when it answers."""
        self.status.configure(text="Looking for chats...", foreground="")
        self.refresh_button.state(["disabled"])
        threading.Thread(target=self._discovery_worker, name="discovery-client", daemon=True).start()

    def _discovery_worker(self):
        """Runs on the discovery-client thread."""
        self.results.put(discover_servers(self.port))

    def _poll(self):
        self._poll_id = None
        try:
            self._show_found(self.results.get_nowait())
        except queue.Empty:
            pass
        if not self._closed:
            self._poll_id = self.root.after(POLL_INTERVAL_MS, self._poll)

    def _show_found(self, found):
        self.found = list(found)
        self.refresh_button.state(["!disabled"])
        self.server_list.delete(0, "end")
        for server in self.found:
            self.server_list.insert("end", describe_found_server(server))
        if self.found:
            if not self.address_entry.get().strip():
                self.server_list.selection_set(0)
            self.status.configure(text="")
        else:
            self.status.configure(text="No chat found on this network. Type the address of one "
                                       "(ask whoever runs it), or host one here.", foreground="")

    def _chosen_name(self):
        name = self.name_entry.get().strip()
        try:
            check_name(name)
        except ProtocolError as error:
            self._complain(error.text)
            return None
        return name

    def _complain(self, text):
        self.status.configure(text=text, foreground=self.look.colours["error"])

    def join(self):
        """Join the typed address, else the chat selected in the list."""
        name = self._chosen_name()
        if name is None:
            return
        typed = self.address_entry.get().strip()
        selection = self.server_list.curselection()
        try:
            if typed:
                host, port = split_host_port(typed)
            elif selection:
                server = self.found[selection[0]]
                host, port = server["address"], server["port"]
            else:
                self._complain("Choose a chat from the list, type an address, or host a chat here.")
                return
        except UserError as error:
            self._complain(str(error))
            return
        self._finish(host, port, name, None, typed or None)

    def host(self):
        """Start a server in this process and join it."""
        name = self._chosen_name()
        if name is None:
            return
        try:
            hosted = HostedServer(*self.host_address)
        except (OSError, UserError) as error:
            self._complain("Could not start a chat here: %s" % error)
            return
        self._finish("127.0.0.1", hosted.port, name, hosted, None)

    def _finish(self, host, port, name, hosted, typed):
        self.settings["name"] = name
        if typed:
            self.settings["server"] = typed
        save_settings(self.settings)
        self.close()
        self.on_join(host, port, name, hosted)

    def close(self):
        self._closed = True
        if self._poll_id is not None:
            self.root.after_cancel(self._poll_id)
            self._poll_id = None
        self.root.unbind("<Return>")
        self.frame.destroy()


def run_window(args):
    """Open the join window or the chat window, and run Tk's main loop until it closes."""
    try:
        import tkinter
    except ImportError:
        raise UserError(
            "The chat window needs Tkinter, which this Python does not have: install it (on Debian or "
            "Ubuntu: sudo apt install python3-tk), or use --cli for the line client."
        ) from None
    try:
        root = tkinter.Tk()
    except tkinter.TclError as error:
        raise UserError("Could not open a window (%s); use --cli for the line client." % error) from None
    identity = load_identity()

    def open_chat(host, port, name, hosted=None, tls=False):
        ChatWindow(root, host, port, name, identity=identity, hosted=hosted, tls=tls or args.tls,
                   fingerprint=args.fingerprint)

    if args.server:
        open_chat(*split_host_port(args.server), args.name)
    elif args.name is None:
        JoinWindow(root, open_chat)
    else:
        found = discover_servers()
        if len(found) == 1:
            open_chat(found[0]["address"], found[0]["port"], args.name, tls=found[0].get("tls", False))
        else:
            JoinWindow(root, open_chat, name=args.name, found=found)
    root.mainloop()
    return 0


# =============================================================================
# 18. Terminal client
# =============================================================================
#
# A line client for terminals and scripts. The main thread owns stdout; a stdin
# thread and the connection's reader thread hand it lines and frames by a queue.
# On a terminal with readline, TerminalScreen keeps the line being typed whole
# while the main thread prints above it.

CONFIRM_TIMEOUT_S = 10.0  # at the end of input, how long to wait for our messages' echoes
LINE_TURN_S = 2.0         # on a terminal, how long the next prompt waits for the last line to be handled
PROMPT_DRAW_S = 0.5       # how long a line to print waits for readline to finish drawing the prompt
PAUSE_LATE_S = 1.0        # readline calls the input hook every 0.1 s: this much later, it never will


PIPED_LINES_PER_MESSAGE = 100     # piped lines that come together go as one message of at most this many
PIPED_BYTES_PER_MESSAGE = 16000   # ... and about this many bytes (half the largest message)


class TerminalScreen:
    """A terminal whose input line stays whole while lines arrive, with readline's editing and history.

    Used when stdin and stdout are both terminals and the readline module exists
    (Windows' Python has none: there the client reads plain lines). The stdin
    thread reads with input() under a prompt that names where the line goes
    ("#general> "). show() prints a line above the prompt and draws the prompt
    and what was typed again. What was typed stays on the screen as the sent
    line: the server's echo is not printed.

    Readline handles keys on the stdin thread without the GIL, so a line printed
    from another thread could land while it is half-way through one (the line
    drawn from a stale buffer, the cursor in the wrong place). So while a line is
    being typed, show() only queues, and the stdin thread prints the queue from
    inside input() between two keys, through PyOS_InputHook, which readline calls
    at least every 0.1 s. Where that hook cannot be set, show() prints at once.
    """

    def __init__(self, readline, stdout, stdin_fd=None):
        self.readline = readline
        self.stdout = stdout
        self.prompt = ""
        self._lock = threading.Condition()  # notified when readline has drawn the prompt
        self._editing = False  # the prompt is drawn and a line is being typed
        self._drawing = False  # readline is drawing the prompt: a line printed now would land inside it
        self._pending = []  # lines for the stdin thread to print between two keys
        self._last_pause = 0.0  # when readline last called the input hook (or a prompt began)
        self._closed = False
        self._hooked = hasattr(readline, "set_pre_input_hook")  # libedit may lack it
        self._saved_mode = _terminal_mode(stdin_fd)  # readline's mode would outlive us if we end mid-line
        self._stdin_fd = stdin_fd
        self._point = _readline_point(readline)
        self._paused = _set_input_hook(self._on_readline_pause)
        if self._hooked:
            readline.set_pre_input_hook(self._on_prompt_drawn)

    def read_line(self, prompt):
        """Return the next line typed under prompt; raise EOFError at Ctrl+D. Runs on the stdin thread."""
        with self._lock:
            self.prompt = prompt
            self._last_pause = time.monotonic()
            if self._hooked:
                self._drawing = True
            else:
                self._editing = True  # the best we can do: the prompt is about to be drawn
        try:
            return input(prompt)
        except EOFError:
            with self._lock:
                self._write("\r\x1b[K")  # the empty prompt goes: what follows starts on a clean line
            raise
        finally:
            with self._lock:
                self._editing = self._drawing = False
                self._print_pending()
                self._lock.notify_all()

    def _on_prompt_drawn(self):
        """Runs on the stdin thread, inside input(), once readline has drawn the prompt."""
        with self._lock:
            self._editing, self._drawing = True, False
            self._lock.notify_all()

    def _on_readline_pause(self):
        """Runs on the stdin thread, inside input(), between two keys: print what waits above the line."""
        try:
            with self._lock:
                self._last_pause = time.monotonic()
                if self._editing and self._pending and not self._closed:
                    text, self._pending = "\n".join(self._pending), []
                    self._print_above(text)
        except Exception:  # a C callback cannot raise: the line is lost, the chat goes on
            pass
        return 0

    def show(self, text):
        """Print text (a line, or lines) above the input line, then draw the input line again. Any thread."""
        with self._lock:
            self._pending.append(text)
            if self._paused is not None and (self._editing or self._drawing):
                if time.monotonic() - self._last_pause < PAUSE_LATE_S:
                    return  # the stdin thread prints it within 0.1 s
            self._lock.wait_for(lambda: not self._drawing, PROMPT_DRAW_S)
            text, self._pending = "\n".join(self._pending), []
            self._print_above(text)

    def _print_above(self, text):
        """Print text above the input line and draw that line again; call with the lock held."""
        if not self._editing:
            self._write(text + "\n")
            return
        typed = self.readline.get_line_buffer()
        point = len(typed) if self._point is None else self._point_in(typed, self._point.value)
        columns = self._columns()
        before, end = _width(self.prompt + typed[:point]), _width(self.prompt + typed)
        # Up to the input line's first row, erase to the end of the screen, print, draw it
        # again, and put the cursor back where readline has it.
        self._write("\r" + _cursor_up(before // columns) + "\x1b[J" + text + "\n"
                    + self.prompt + typed + _cursor_back(before, end, columns))

    def _point_in(self, typed, offset):
        """Return readline's cursor as an index into typed: rl_point counts bytes, not characters."""
        encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        try:
            data = typed.encode(encoding, "surrogateescape")
            return len(data[:max(0, offset)].decode(encoding, "ignore"))
        except (LookupError, UnicodeError):
            return len(typed)

    def _columns(self):
        """Return the terminal's width now (it may have been resized; COLUMNS may be stale)."""
        try:
            return max(1, os.get_terminal_size(self.stdout.fileno()).columns)
        except (AttributeError, OSError, ValueError):
            return max(1, shutil.get_terminal_size().columns)

    def _print_pending(self):
        """Print the queued lines as they are (no input line is shown); call with the lock held."""
        if self._pending:
            text, self._pending = "\n".join(self._pending), []
            self._write(text + "\n")

    def _write(self, data):
        self.stdout.write(data)
        self.stdout.flush()

    def close(self):
        """Clear the input line, print what waits, give the terminal back as it was.

        The stdin thread may still be in input(), and stays there until the end.
        """
        with self._lock:
            self._closed = True
            try:
                if self._editing:
                    self._editing = False
                    self._write("\r\x1b[K")
                self._print_pending()
            except (OSError, ValueError):
                pass
        _restore_terminal_mode(self._stdin_fd, self._saved_mode)


_INPUT_HOOKS = []  # the C callbacks given to PyOS_InputHook: they must live as long as the process


def _set_input_hook(function):
    """Have readline call function() while it waits for keys in input(); return the hook, or None.

    PyOS_InputHook is the C variable through which Tk keeps its windows alive at
    the interactive prompt; readline calls it after each wait for input of at most
    0.1 s. It is never unset (readline reads it twice, unlocked): a closed
    TerminalScreen's hook does nothing.
    """
    try:
        import ctypes
        variable = ctypes.c_void_p.in_dll(ctypes.pythonapi, "PyOS_InputHook")
        if variable.value:  # somebody else's (Tk's): leave it
            return None
        hook = ctypes.CFUNCTYPE(ctypes.c_int)(function)
        _INPUT_HOOKS.append(hook)
        variable.value = ctypes.cast(hook, ctypes.c_void_p).value
        return hook
    except (ImportError, AttributeError, OSError, ValueError):
        return None


def _readline_point(readline):
    """Return readline's cursor position in the line (rl_point, through ctypes), or None where it cannot be had.

    The readline module does not tell it; without it a line printed while the
    cursor is in the middle of what was typed leaves the cursor at its end.
    """
    try:
        import ctypes
        return ctypes.c_int.in_dll(ctypes.CDLL(readline.__file__), "rl_point")
    except (ImportError, AttributeError, OSError, ValueError):
        return None


def _cursor_up(rows):
    return "\x1b[%dA" % rows if rows > 0 else ""


def _cursor_back(here, end, columns):
    """Return what moves the cursor from column `end` of the input line back to column `here`."""
    wrap = " \r\x1b[K" if end and end % columns == 0 else ""  # off the right margin, as readline does
    if here >= end:
        return wrap
    column = here % columns
    return wrap + "\r" + _cursor_up(end // columns - here // columns) + ("\x1b[%dC" % column if column else "")


def _width(text):
    """Return the columns text takes on a terminal: two for wide characters, none for combining ones."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _terminal_mode(fd):
    """Return the terminal settings of fd (to put back later), or None where there is no termios."""
    try:
        import termios  # POSIX only
        return termios.tcgetattr(fd)
    except (ImportError, OSError, TypeError, ValueError):
        return None


def _restore_terminal_mode(fd, mode):
    if mode is None:
        return
    try:
        import termios
        termios.tcsetattr(fd, termios.TCSADRAIN, mode)
    except (ImportError, OSError, ValueError):
        pass


def terminal_screen(stdin, stdout):
    """Return a TerminalScreen when stdin and stdout are terminals and readline exists, else None."""
    try:
        if not (stdin.isatty() and stdout.isatty()):
            return None
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        # Imported here, not at the top: importing it can write to stdout, and only a
        # person at a terminal needs it.
        import readline
    except ImportError:
        return None
    return TerminalScreen(readline, stdout, fd)


class TerminalTrust:
    """The line client's answer when a server's certificate is new or changed (ChatConnection.trust).

    A first contact is asked about while a person can answer at the terminal
    (`ask`); a changed certificate is accepted only with --accept-new-certificate,
    its warning printed all the same. Runs on the thread that connects: the main
    thread, or the reader thread when reconnecting, when nobody is asked (the
    stdin thread has the terminal then).
    """

    def __init__(self, ask=False, accept_new=False, stdin=None, stderr=None):
        self.ask = ask
        self.accept_new = accept_new
        self.stdin = stdin or sys.stdin
        self.stderr = stderr or sys.stderr
        self.tell = None  # once the chat runs: tell(text) puts a warning among its lines
        self.refused = None  # the last UntrustedCertificate said no to

    def __call__(self, untrusted):
        yes = self._answer(untrusted)
        self.refused = None if yes else untrusted
        return yes

    def _answer(self, untrusted):
        if untrusted.changed:
            if self.accept_new:
                self._say(untrusted.description() + "\nAccepting the new certificate on purpose "
                          "(--accept-new-certificate).\n")
            return self.accept_new
        if not self.ask:
            return False
        self._say("The server at %s encrypts with a certificate this computer has not trusted yet.\n"
                  "Its fingerprint (SHA-256) is:\n    %s\n"
                  "Compare it with the one the server printed when it started (ask whoever runs it).\n"
                  "Trust this server? [y/N] " % (untrusted.address, untrusted.fingerprint))
        answer = self.stdin.readline()
        return answer.strip().lower() in ("y", "yes")

    def _say(self, text):
        if self.tell is not None:
            self.tell(text.rstrip("\n"))
            return
        self.stderr.write(text)
        self.stderr.flush()


def trust_hint(untrusted, interactive):
    """Return what a person can do about a certificate the line client did not trust."""
    if untrusted.changed:
        return " If its owner really made a new certificate, run again with --accept-new-certificate."
    if interactive:
        return ""  # the person was asked, and said no
    return (" Compare it with the fingerprint the server printed when it started and give it with "
            "--fingerprint FP, or run the line client once in a terminal to be asked.")


class TerminalClient:
    """Send each stdin line (piped lines that come together as one message), print each event as a line."""

    def __init__(self, host, port, name, stdin=None, stdout=None, identity=None, password=None,
                 tls=False, fingerprint=None, trust=None, screen=None):
        self.connection = ChatConnection(host, port, name, on_event=self._on_event, identity=identity,
                                         reconnect=True, password=password, tls=tls, fingerprint=fingerprint,
                                         trust=trust)
        self.trust = trust
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.screen = screen  # a TerminalScreen: typed lines stay as typed, incoming ones go above them
        self._typed = set()  # refs of messages shown as typed: their echo is not printed again
        self._line_handled = threading.Event()  # the last typed line was handled: prompt for the next
        self.where = {"room": GENERAL_ROOM}  # where plain lines go: the last room joined
        self._inbox = queue.Queue()
        self._pending = set()  # refs of our messages not yet echoed
        self._ref_prefix = secrets.token_hex(3)
        self._next_ref = 0
        self._leaving_since = None
        self._bye_sent = False
        self.stdout_closed = False  # what reads our output went away (`| head -4`): leave quietly
        self._held = None  # an item taken from the inbox while gathering lines, handled next
        self._last_why = None  # why the last reconnection attempt failed, already printed
        isatty = getattr(self.stdin, "isatty", None)
        self._piped = not (isatty and isatty())  # piped lines that come together go as one message

    def run(self):
        """Connect and chat until input ends or the connection does; return the exit code."""
        self.connection.connect()
        if self.trust is not None:  # from now on the stdin thread has the terminal, the main thread stdout
            self.trust.ask = False
            self.trust.tell = lambda text: self._inbox.put(("frame", {"type": "warning", "text": text}))
        self._print(clock(), "* Connected to %s." % self.connection.address)
        if self.connection.channel is not None:
            unsaved = self.connection.fingerprint_status == "unsaved"
            self._print(clock(), ("! " if unsaved else "* ") + encryption_notice(self.connection))
        self.connection.start()
        threading.Thread(target=self._stdin_loop, name="stdin", daemon=True).start()
        try:
            return self._main_loop()
        finally:
            self.connection.close(say_bye=self.stdout_closed)
            if self.screen is not None:
                self.screen.close()

    def _on_event(self, frame):
        """Runs on the reader thread: hand the frame to the main thread."""
        self._inbox.put(("frame", frame))

    def _stdin_loop(self):
        """Runs on the stdin thread: hand each line to the main thread, then "eof"."""
        if self.screen is not None:
            self._typed_lines()
        else:
            for line in self.stdin:
                self._inbox.put(("line", line.rstrip("\r\n")))
        self._inbox.put(("eof", None))

    def _typed_lines(self):
        """Runs on the stdin thread: read lines with readline under a prompt naming where they go."""
        while True:
            where = self.where  # set by the main thread; read once for this prompt
            self._line_handled.clear()
            try:
                line = self.screen.read_line("%s> " % (room_label(where["room"]) if "room" in where
                                                       else where.get("to")))
            except EOFError:
                return
            self._inbox.put(("line", line))
            self._line_handled.wait(LINE_TURN_S)  # so that after /join the prompt names the new room

    def _main_loop(self):
        while True:
            try:
                kind, value = self._next_item()
            except queue.Empty:
                self._print(clock(), "! %d message(s) were not confirmed by the server." % len(self._pending))
                return 1
            if kind == "frame":
                code = self._show(value)
                if code is not None:
                    return code
            elif kind == "line":
                self._on_line(self._gather(value) if self._piped else value)
                self._line_handled.set()
            elif kind == "shared":  # a file's sending ended: value is (its token, a sentence if it failed)
                self._pending.discard(value[0])
                if value[1]:
                    self._print(clock(), "! " + value[1])
            elif self._leaving_since is None:
                self._leaving_since = time.monotonic()
            if self.stdout_closed:
                return 0
            if self._leaving_since is not None and not self._pending and not self._bye_sent:
                self._bye_sent = True
                self.connection.post({"type": "bye"})

    def _next_item(self):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return self._inbox.get(timeout=self._wait_limit())

    def _gather(self, line):
        """Join the plain lines already waiting behind this one (a piped file) into one text.

        A 1,000-line log then goes as ten messages, not a thousand the server's flood
        limits would slow down for minutes. A command or anything else ends the run.
        """
        if line.startswith("/"):
            return line
        lines, size = [line], len(line)
        while len(lines) < PIPED_LINES_PER_MESSAGE and size < PIPED_BYTES_PER_MESSAGE:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] != "line" or item[1].startswith("/"):
                self._held = item
                break
            lines.append(item[1])
            size += len(item[1].encode("utf-8", "replace")) + 1
        return "\n".join(lines)

    def _wait_limit(self):
        if self._leaving_since is None:
            return None
        return max(0.0, self._leaving_since + CONFIRM_TIMEOUT_S - time.monotonic())

    def _on_line(self, line):
        if self._leaving_since is not None:
            return
        action, value = parse_input(line, self.where)
        if action == "send":
            if value["type"] == "say":
                self._next_ref += 1
                value["ref"] = "%s-%d" % (self._ref_prefix, self._next_ref)
                self._pending.add(value["ref"])
                if self.screen is not None:  # it stays on the screen as typed, under its prompt
                    self._typed.add(value["ref"])
            elif value["type"] == "join":  # what follows goes to the new room
                self.where = {"room": value["room"]}
            elif value["type"] == "leave" and self.where.get("room") == value["room"]:
                self.where = {"room": GENERAL_ROOM}
            self.connection.post(value)
        elif action == "send_file":
            self._send_file(value)
        elif action == "quit":
            self._leaving_since = time.monotonic()
        elif action == "help":
            self._print(clock(), value)
        elif action == "error":
            self._print(clock(), "! " + value)

    def _send_file(self, value):
        """Share a file on a thread of its own; the main loop hears how it ended ("shared")."""
        try:
            path = self.connection.check_file(value.pop("path"))
        except UserError as error:
            self._print(clock(), "! %s" % error)
            return
        self._next_ref += 1
        token = "file-%d" % self._next_ref
        self._pending.add(token)  # input that ends now waits for the file before saying bye
        self._print(clock(), "* Sending %s..." % path.name)

        def share():
            try:
                self.connection.share_file(path, room=value.get("room"), to=value.get("to"))
                self._inbox.put(("shared", (token, None)))
            except UserError as error:
                self._inbox.put(("shared", (token, str(error))))
        threading.Thread(target=share, name="send-file", daemon=True).start()

    def _show(self, frame):
        """Print one frame; return an exit code once the connection has ended."""
        kind = frame.get("type")
        if kind == "message":
            own = frame.get("from") == self.connection.name
            if own:
                self._pending.discard(frame.get("ref"))
            if own and frame.get("ref") in self._typed:
                self._typed.discard(frame.get("ref"))  # shown once: as it was typed
            else:
                self._print(clock(frame.get("ts")), message_line(frame, self.connection.file_address))
        elif kind == "disconnected":
            if not frame.get("expected") and not self._bye_sent:
                refused = self.trust.refused if self.trust is not None else None
                hint = trust_hint(refused, False) if refused and frame["text"] == str(refused) else ""
                self._print(clock(), "! " + frame["text"] + hint)
                return 1
            return 0 if not self._pending else 1
        elif kind in ("error", "warning"):  # a warning: the trust hook's, from the reader thread
            self._print(clock(), "! " + (frame.get("text") if kind == "warning" else notice_text(frame)))
        elif kind == "reconnecting" and frame.get("why") == self._last_why:
            self._print(clock(), "* Still no connection. Reconnecting in %g s..." % frame.get("delay", 0))
        elif kind not in ("bye", "synced"):
            if kind == "reconnecting":  # the reason, with its hint, once; then only the attempts
                self._last_why = frame.get("why")
            text = notice_text(frame)
            if text:
                self._print(clock(frame.get("ts")), "* " + text)
        return None

    def _print(self, stamp, text):
        """Print one event; the lines of a multi-line text are indented under the first."""
        prefix = "[%s] " % stamp
        body = text.replace("\n", "\n" + " " * len(prefix))
        try:
            if self.screen is not None:
                self.screen.show(prefix + body)
                return
            self.stdout.write(prefix + body + "\n")
            self.stdout.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the file was closed
            self.stdout_closed = True


def run_discover():
    """Print the chats found on this network, one a line; exit 1 if there is none."""
    found = discover_servers()
    for server in found:
        print(describe_found_server(server))
    if not found:
        sys.stderr.write("No LocalChat server answered on this network.\n")
    return 0 if found else 1


def server_from_discovery():
    """Return (host, port) of the one chat found on this network; raise UserError otherwise."""
    found = discover_servers()
    if len(found) == 1:
        return found[0]["address"], found[0]["port"]
    if not found:
        raise UserError("no LocalChat server answered on this network. Ask whoever runs it for its "
                        "address, and give it with --server HOST[:PORT].")
    raise UserError("several chats answered; choose one with --server HOST:PORT:\n  "
                    + "\n  ".join(describe_found_server(server) for server in found))


def _silence_stdout():
    """Point stdout at the null device: its reader has gone, and nothing more is to be said."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


def run_cli(args):
    host, port = split_host_port(args.server) if args.server else server_from_discovery()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a Windows console cannot show every character
    interactive = sys.stdin.isatty()
    trust = TerminalTrust(ask=interactive, accept_new=args.accept_new_certificate)
    client = TerminalClient(host, port, args.name, identity=load_identity(),
                            password=os.environ.get("LOCALCHAT_PASSWORD"), tls=args.tls,
                            fingerprint=args.fingerprint, trust=trust,
                            screen=terminal_screen(sys.stdin, sys.stdout))
    for attempt in range(3):
        try:
            code = client.run()
            if client.stdout_closed:
                _silence_stdout()  # else the flush at exit reports the broken pipe once more
            return code
        except UntrustedCertificate as error:
            raise UserError(str(error) + trust_hint(error, interactive)) from None
        except UserError as error:
            if error.code not in ("password_required", "auth_failed") or not interactive or attempt == 2:
                if error.code == "password_required":
                    raise UserError("%s Set LOCALCHAT_PASSWORD, or run the client in a terminal to be asked."
                                    % error) from None
                raise
            if error.code == "auth_failed":
                sys.stderr.write("Wrong password.\n")
            client.connection.password = getpass.getpass("Password for %s: " % client.connection.address)
    return 1


def run_send_file(args):
    """Share one file with a room or a person, print its address, and exit (0, or 1 with a sentence)."""
    host, port = split_host_port(args.server) if args.server else server_from_discovery()
    trust = TerminalTrust(ask=sys.stdin.isatty(), accept_new=args.accept_new_certificate)
    connection = ChatConnection(host, port, args.name, identity=load_identity(),
                                password=os.environ.get("LOCALCHAT_PASSWORD"), tls=args.tls,
                                fingerprint=args.fingerprint, trust=trust)
    if args.room:
        connection.rooms = [args.room]  # joined with the hello
    connection.check_file(args.send_file)  # before anybody sees us come and go
    try:
        connection.connect()
        connection.check_file(args.send_file)  # now with the server's limit
        connection.start()
        url = connection.share_file(args.send_file, room=args.room, to=args.to)
    except UntrustedCertificate as error:
        raise UserError(str(error) + trust_hint(error, False)) from None
    finally:
        connection.close()
    print("Shared %s: %s" % (Path(args.send_file).name, connection.file_address(url)))
    return 0


# =============================================================================
# 19. Command line
# =============================================================================

DESCRIPTION = """\
LocalChat: chat with the people on your local network. No internet, no accounts.

  python3 localchat.py                     a window asks for your name and finds the chats
  python3 localchat.py server              run the server (on one computer)
  python3 localchat.py NAME                open the chat window as NAME
  python3 localchat.py NAME --cli          chat from a terminal or a script
  python3 localchat.py --discover          list the chats on this network

Clients find the server on the network by themselves; --server HOST[:PORT] names it.
"""

EPILOG = """\
examples:
  python3 localchat.py server --port 13333
  python3 localchat.py alice --server 192.168.1.7
  echo "build finished" | python3 localchat.py ci --cli --server 192.168.1.7
  python3 localchat.py ci --send-file report.pdf --room builds --server 192.168.1.7
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="localchat.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME|server", nargs="?",
                        help="your name in the chat (1-%d letters, digits, _ - .), or 'server'; "
                        "without it, a window asks" % MAX_NAME_CHARS)
    parser.add_argument("--version", action="version", version="LocalChat %s" % __version__)
    client = parser.add_argument_group("client options")
    client.add_argument("--server", metavar="HOST[:PORT]",
                        help="the server to join (default: look for one on this network)")
    client.add_argument("--discover", action="store_true", help="list the chats found on this network, and exit")
    client.add_argument("--fingerprint", metavar="FP",
                        help="the server certificate's SHA-256 fingerprint, as its owner gave it: "
                        "anything else is refused")
    client.add_argument("--accept-new-certificate", action="store_true",
                        help="line client: the server's certificate has changed and you know why (its owner "
                        "made a new one): accept the new one and remember it (the window asks instead)")
    client.add_argument("--cli", action="store_true", help="use the line client instead of the window")
    client.add_argument("--send-file", metavar="PATH", help="share this file, print its address and exit "
                        "(to the general room, or --room ROOM, or --to NAME)")
    client.add_argument("--room", metavar="ROOM", help="with --send-file: the room to share it with")
    client.add_argument("--to", metavar="NAME", help="with --send-file: the one person to share it with")
    server = parser.add_argument_group("server options")
    server.add_argument("--host", help="the address to listen on (default %s: all of them)" % DEFAULT_HOST)
    server.add_argument("--port", type=int, help="the TCP port to listen on (default %d; 0 picks a free one)"
                        % DEFAULT_PORT)
    server.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    server.add_argument("--history", metavar="PATH", help="the SQLite file that keeps the history "
                        "(default: history.sqlite3 in your data folder)")
    server.add_argument("--no-history", action="store_true", help="keep history in memory only")
    server.add_argument("--scrollback", type=int, metavar="N",
                        help="messages shown of a room's history on joining it (default %d)" % DEFAULT_SCROLLBACK)
    server.add_argument("--name", dest="server_name", metavar="TEXT",
                        help="the name others see when they look for chats (default: this computer's name)")
    server.add_argument("--no-discovery", action="store_true",
                        help="do not answer when clients on the network look for chats")
    server.add_argument("--cert", metavar="FILE", help="with --tls: use this certificate (PEM) ...")
    server.add_argument("--key", metavar="FILE", help="... and this private key (PEM)")
    server.add_argument("--op", action="append", metavar="NAME",
                        help="make NAME an operator (may be given several times)")
    server.add_argument("--diagnostics", action="store_true",
                        help="answer WebSocket echo requests at /ws/echo, for testing the WebSocket framing "
                        "with Autobahn|Testsuite; not for a chat in use")
    server.add_argument("--allow-clear-passwords", action="store_true",
                        help="with --password and without --tls: let IRC clients and nc join, though "
                        "their password then crosses the network unencrypted (refused by default)")
    parser.add_argument("--tls", action="store_true",
                        help="server: encrypt every connection (a certificate is made the first time); "
                        "client: insist on encryption (used anyway when the server asks for it)")
    parser.add_argument("--password", action="store_true",
                        help="server: ask for a password to join (from LOCALCHAT_PASSWORD, or prompted); "
                        "client: the password is taken from LOCALCHAT_PASSWORD or asked for")
    limits = parser.add_argument_group("server limits (a rate of 0 turns that limit off)")
    for attribute, default, text in Limits.TABLE:
        limits.add_argument("--" + attribute.replace("_", "-"), type=type(default), metavar="N",
                            help="%s (default %s)" % (text, default))
    return parser


def check_args(parser, args):
    """Reject options that do not fit the mode; fill in defaults."""
    if args.name == "server":
        for option, value in (("--server", args.server), ("--cli", args.cli), ("--fingerprint", args.fingerprint),
                              ("--send-file", args.send_file), ("--room", args.room), ("--to", args.to),
                              ("--discover", args.discover), ("--accept-new-certificate", args.accept_new_certificate)):
            if value:
                parser.error("%s is a client option; see the server options in --help" % option)
        args.host = DEFAULT_HOST if args.host is None else args.host
        args.port = DEFAULT_PORT if args.port is None else args.port
        args.scrollback = DEFAULT_SCROLLBACK if args.scrollback is None else args.scrollback
        for attribute, default, _ in Limits.TABLE:
            if getattr(args, attribute) is None:
                setattr(args, attribute, default)
            elif getattr(args, attribute) < 0:
                parser.error("--%s may not be negative" % attribute.replace("_", "-"))
        if not 0 <= args.port <= 65535:
            parser.error("--port must be between 0 and 65535")
        if not 0 <= args.scrollback <= MAX_REPLAY:
            parser.error("--scrollback must be between 0 and %d" % MAX_REPLAY)
        if args.history and args.no_history:
            parser.error("--history and --no-history exclude each other")
        return
    for option, value in (("--host", args.host), ("--port", args.port), ("--quiet", args.quiet),
                          ("--history", args.history), ("--no-history", args.no_history),
                          ("--scrollback", args.scrollback), ("--op", args.op),
                          ("--name", args.server_name), ("--no-discovery", args.no_discovery),
                          ("--cert", args.cert), ("--key", args.key),
                          ("--allow-clear-passwords", args.allow_clear_passwords),
                          ("--diagnostics", args.diagnostics)) + tuple(
            ("--" + attribute.replace("_", "-"), getattr(args, attribute)) for attribute, _, _ in Limits.TABLE):
        if value is not None and value is not False:
            parser.error("%s is a server option; a client takes --server HOST[:PORT]" % option)
    if (args.room or args.to) and not args.send_file:
        parser.error("--room and --to go with --send-file")
    if args.room and args.to:
        parser.error("--room and --to exclude each other: a file goes to a room or to one person")
    if args.send_file and (args.cli or args.discover):
        parser.error("--send-file shares a file and exits: it goes without --cli and --discover")
    if args.accept_new_certificate and not (args.cli or args.send_file):
        parser.error("--accept-new-certificate is for the line client (--cli): the window asks, with a button")
    if args.discover:
        return
    if args.name is None:
        if args.cli or args.send_file:
            parser.error("the line client and --send-file need a NAME")
        return
    try:
        check_name(args.name)
        split_host_port(args.server or "")
    except ProtocolError as error:
        parser.error("invalid name '%s': %s" % (args.name, error.text))
    except UserError as error:
        if args.server is not None:
            parser.error(str(error))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if args.discover:
            return run_discover()
        if args.name == "server":
            return run_server(args)
        if args.send_file:
            return run_send_file(args)
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
