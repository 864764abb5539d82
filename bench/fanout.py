#!/usr/bin/env python3
"""Fan-out benchmark for LocalChat, with ngIRCd as the yardstick.

Starts the server under test on 127.0.0.1, connects N clients from separate load
processes (non-blocking sockets driven by `selectors`), runs one workload, and prints
one JSON line per run, a readable table, and the issue's targets beside the measured
values (met / MISSED, and PASS / FAIL for delivery). Standard library only, Python 3.8+.

Usage:
    python3 bench/fanout.py --workload burst --clients 200
    python3 bench/fanout.py --workload paced --clients 1000 --senders 100 --duration 20
    python3 bench/fanout.py --workload paced --clients 1000 --all-send
    python3 bench/fanout.py --workload idle --clients 5000
    python3 bench/fanout.py --workload paste      # 10 senders paste 17 x 30 KB into 100
    python3 bench/fanout.py --all                 # the standard set, about 9-11 minutes
    python3 bench/fanout.py --all --no-compare    # LocalChat only, about 5 minutes
    python3 bench/fanout.py --workload paced --clients 200 --senders 20 --profile /tmp/prof
    python3 bench/fanout.py --irc --workload burst --clients 200,1000   # + LocalChat's IRC door
    python3 bench/fanout.py --irc --workload burst --clients 200,1000 --repeat 3
    python3 bench/fanout.py --ws --workload burst --clients 200,1000 --no-compare   # + the web door
    python3 bench/fanout.py --servers localchat-irc,ngircd --workload burst --profile /tmp/prof

Servers (--servers, in this order by default):
    localchat       LocalChat with its own clients' protocol (JSON lines)
    localchat-irc   the same server through its IRC door, driven by the IRC client code
                    used for ngIRCd (IrcProto): with --irc, and in --all for burst and
                    paced N=200 (the issue 11 target: burst CPU per delivery <= 1.5x ngIRCd's)
    localchat-ws    the same server through its web door: protocol v1 in WebSocket text
                    messages at /ws, as the chat page speaks it (WebSocketProto); with --ws
                    (the issue 10 target: burst CPU per delivery <= 1.3x JSON lines')
    ngircd          ngIRCd, when installed

Workloads:
    burst   S senders send as fast as the server takes them, each with at most
            --window own messages unconfirmed; everybody receives. Runs for
            --messages per sender or --duration seconds, whichever ends first.
    paced   S senders each send --rate messages a second for --duration seconds,
            spread evenly over the second; everybody receives. Measures latency.
    idle    N clients connect, join and stay quiet; measures memory per connection
            and the CPU an idle server burns.
    paste   the user report: S senders (default 10 of N=100; all N read) each hand
            --paste-messages (17) messages of --paste-bytes (30000) of text to the
            socket at once, no window; readers read as fast as they can. LocalChat runs
            with its DEFAULT flood limits here (17 x 30000 B fits its default burst);
            every other workload turns them off. An IRC line holds 512 bytes, so on
            ngIRCd each message goes as lines of IRC_PIECE_BYTES of text (75 for 30000 B,
            as IRC clients split a paste): deliveries count those lines. ngIRCd drops a
            client whose write buffer passes 32 KiB (WRITEBUFFER_MAX_LEN), which shows
            in its server log as "Write buffer space exhausted".

What is measured:
    connect_s        first connect() to the last client welcomed (LocalChat "welcome";
                     IRC 001 then JOIN #bench answered with 366 end of NAMES).
    drain_s          then until the last joined notice (all N(N-1)/2 in, or none for
                     --quiet-ms; pings do not count).
    deliveries       message frames received by clients, duplicates not counted.
                     LocalChat sends every message to all N clients, the sender's own
                     echo included; IRC sends it to the N-1 others. expected_deliveries
                     = messages_sent * recipients_per_msg for each server.
    deliveries_per_s deliveries / (last delivery received - start of sending).
    latency_ms_*     arrival time minus send time. The send time (time.time() in
                     microseconds, just before send()) rides in the text
                     "<kind>:<sender>:<seq>:<usec>"; the arrival time is the kernel's
                     receive timestamp of the bytes on the client socket (SO_TIMESTAMPNS,
                     CLOCK_REALTIME like time.time()), so the load process's own delay in
                     reading 1000 sockets one by one is not counted as server latency;
                     that delay is reported as read_lag_ms_*. Without kernel stamps the
                     read time is used. Blocks of up to 32 messages have every message
                     timed, larger blocks every 4th (weighted 4); histogram buckets are
                     10 us below 100 ms, 1 ms above.
    cpu_us_per_delivery  server utime+stime (/proc/PID/stat) over the measured phase,
                     from "go" until every client received everything, / deliveries.
                     server_user_s / server_sys_s: the two parts (Python vs the kernel).
    rss_kb_per_conn  server VmRSS after connecting and draining, minus before, / N.
    lost, duplicated, reordered   per receiver and sender, from the sequence numbers
                     in the text of every message (all of them, not a sample).
    dropped          connections the server closed (EOF or reset) during the run.
    drop_reasons     why, as the server told the others: names per LocalChat "left"
                     reason (too_slow, flood, ...) or IRC QUIT text. server_log_drops:
                     the same from the server's own log (ngIRCd always; LocalChat in
                     paste, which runs it without --quiet). error_frames: error codes
                     received.
    rss_kb_peak      server VmRSS sampled every RSS_SAMPLE_S over the measured phase,
                     its maximum; rss_kb_at_go at its start; vmhwm_kb the kernel's peak
                     (VmHWM) over the server's whole life.
    delivery_check   PASS when 0 dropped, 0 lost, 0 duplicated and order kept (no
                     reordering, ids rising), every expected delivery received.
    loadgen_cpu_pct, other_cpu_pct   the load processes' CPU, and what else ran on
                     the machine: on 2 cores these say whether a number is the
                     server's or the machine's.

Windows on IRC: IRC does not echo a PRIVMSG to its sender, so a designated receiver
(the "witness", the first non-sender client in the senders' load process) confirms
every sender's messages: a sender's window counts messages the witness has not seen.
On LocalChat each sender's own echo confirms its messages.

IRC on LocalChat: each client is auto-joined to #general on registration, then JOINs
#bench like on ngIRCd; the handshake ends at the 366 (end of NAMES) of #bench, and only
JOINs of #bench count as joined notices. No capability is asked for, so without
echo-message a sender does not get its own message back (as on ngIRCd): N-1 recipients,
and the witness confirms windows. LocalChat sends a text without spaces as a middle
parameter ("PRIVMSG #bench b:1:2:3", no colon), which the parsers take as well.

Targets (printed under "== targets" after the table; see render_targets):
    burst, paced, paste   0 dropped, 0 lost, 0 duplicated, order kept (flood control off
                          except paste), for every server run, the IRC door included
    burst N=200, N=1000   LocalChat server CPU per delivery <= 1.3x ngIRCd's
    burst N=200, N=1000   LocalChat's IRC door (localchat-irc): <= 1.5x ngIRCd's (issue 11)
    paced N=1000, all 1000 sending 1/s   p99 latency <= ngIRCd's, every message delivered
    idle N=5000           memory per connection no worse than 32-36 KiB (met at <= 36)

Sections:
    1. Settings and workloads
    2. /proc helpers
    3. Servers under test (LocalChat, ngIRCd)
    4. Wire protocols (parsing done by the load processes)
    5. Load process (runs with --_worker)
    6. Orchestration of one run
    7. Results: JSON lines and the table
    8. Command line
"""

import argparse
import hashlib
import json
import os
import re
import resource
import selectors
import shutil
import signal
import struct
import socket
import subprocess
import sys
import tempfile
import threading
import time
import errno

# =============================================================================
# 1. Settings and workloads
# =============================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LOCALCHAT = os.path.join(os.path.dirname(HERE), "localchat.py")
HOST = "127.0.0.1"  # the only address this benchmark ever talks to
IRC_CHANNEL = "#bench"

SERVER_START_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 10.0
CONTROL_POLL_S = 0.25

# Latency histogram: 10 us buckets below 100 ms, then 1 ms buckets up to 100 s.
HIST_FINE_US = 10
HIST_FINE_LIMIT_US = 100000
HIST_COARSE_US = 1000
HIST_FINE_N = HIST_FINE_LIMIT_US // HIST_FINE_US
HIST_N = HIST_FINE_N + 100000  # last bucket catches everything above 100 s



def hist_add(hist, us, weight=1):
    """Count `weight` observations of `us` microseconds in a latency histogram."""
    if us < HIST_FINE_LIMIT_US:
        hist[us // HIST_FINE_US if us > 0 else 0] += weight
    else:
        i = HIST_FINE_N + (us - HIST_FINE_LIMIT_US) // HIST_COARSE_US
        hist[i if i < HIST_N else HIST_N] += weight


# The standard set run by --all: (workload, clients, senders, extra settings). "irc": also
# LocalChat through its IRC door with the IRC client code (the issue 11 target is burst's).
STANDARD_SET = [
    ("burst", 200, 10, {"irc": True}),
    ("burst", 1000, 10, {"irc": True}),
    ("paced", 200, 20, {"irc": True}),
    ("paced", 1000, 100, {}),
    ("paced", 1000, 1000, {"duration": 10.0}),
    ("idle", 5000, 0, {}),
    ("paste", 100, 10, {}),
]

# paste: the user report. Each sender pastes PASTE_MESSAGES messages of PASTE_BYTES of
# text at once, with LocalChat's default flood limits (17 x 30000 B fits its default
# burst of 30 messages and 512 KiB). An IRC line holds at most 512 bytes, so on IRC
# each message goes as pieces of at most IRC_PIECE_BYTES of text (as IRC clients split a
# paste): the same bytes, more lines.
PASTE_MESSAGES = 17
PASTE_BYTES = 30000
IRC_PIECE_BYTES = 400  # ":u1234!~u1234@127.0.0.1 PRIVMSG #bench :" + text + CRLF <= 512

# The issue's targets, printed beside the measured values (see render_targets).
TARGET_CPU_RATIO = 1.3        # burst: LocalChat CPU per delivery at most 1.3x ngIRCd's
TARGET_IRC_CPU_RATIO = 1.5    # burst: LocalChat's IRC door, same IRC client code, at most 1.5x ngIRCd's
TARGET_WS_CPU_RATIO = 1.3     # burst: LocalChat's web door (WebSocket), at most 1.3x its JSON lines, same run
TARGET_RSS_KB_PER_CONN = 36.0  # idle: memory per connection no worse than 32-36 KiB
TARGET_RSS_KB_GOAL = 32.0
RSS_SAMPLE_S = 0.05           # how often the server's VmRSS is sampled in the measured phase


class Settings:
    """Everything one run needs; built from the command line, sent to load processes."""

    def __init__(self, **kw):
        self.workload = kw.get("workload", "burst")
        self.clients = kw.get("clients", 200)
        self.senders = kw.get("senders", 10)
        self.duration = kw.get("duration", 10.0)
        self.messages = kw.get("messages", 2000)
        self.window = kw.get("window", 20)
        self.rate = kw.get("rate", 1.0)
        self.payload_bytes = kw.get("payload_bytes", 0)
        self.procs = kw.get("procs", 0)
        self.connect_concurrency = kw.get("connect_concurrency", 50)
        # 0: scale with N (joining is quadratic: everyone hears of everyone)
        self.connect_timeout = kw.get("connect_timeout", 0) or max(60.0, 0.06 * self.clients)
        self.drain_timeout = kw.get("drain_timeout", 120.0)
        self.quiet_ms = kw.get("quiet_ms", 500)
        self.settle_timeout = kw.get("settle_timeout", 30.0)
        self.idle_hold = kw.get("idle_hold", 5.0)
        self.profile_dir = kw.get("profile_dir")
        self.profile_rate = kw.get("profile_rate", 100)
        self.profile_lines = kw.get("profile_lines", False)
        self.paste_messages = kw.get("paste_messages", PASTE_MESSAGES)
        self.paste_bytes = kw.get("paste_bytes", PASTE_BYTES)
        # LocalChat's flood control: off ("--messages-per-s 0 --kbytes-per-s 0") for the
        # throughput workloads, the server's defaults for paste (the user's setting).
        self.flood_defaults = kw.get("flood_defaults", self.workload == "paste")
        # also run LocalChat through its IRC door (server "localchat-irc"); see servers_for
        self.irc = kw.get("irc", False)
        self.ws = kw.get("ws", False)  # also LocalChat through its web door (server "localchat-ws")
        self.run_no = kw.get("run_no", 1)  # --repeat: which run of how many
        self.runs = kw.get("runs", 1)

    def to_dict(self):
        return dict(self.__dict__)

    def label(self):
        base = self.base_label()
        return base if self.runs <= 1 else "%s [run %d of %d]" % (base, self.run_no, self.runs)

    def base_label(self):
        if self.workload == "burst":
            return "burst N=%d senders=%d window=%d" % (self.clients, self.senders, self.window)
        if self.workload == "paced":
            return "paced N=%d senders=%d rate=%g/s for %gs" % (
                self.clients, self.senders, self.rate, self.duration)
        if self.workload == "paste":
            return "paste N=%d senders=%d %dx%dB %s" % (
                self.clients, self.senders, self.paste_messages, self.paste_bytes,
                "default flood limits" if self.flood_defaults else "flood control off")
        return "idle N=%d" % self.clients


def load_procs(s):
    """How many load processes split the clients (0 = choose)."""
    if s.procs:
        return max(1, s.procs)
    heavy = s.workload in ("burst", "paste") or (
        s.workload == "paced" and s.senders * s.rate * s.clients > 200000)
    return 2 if heavy and s.clients >= 100 else 1


# =============================================================================
# 2. /proc helpers
# =============================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    """utime+stime of pid (all threads) in seconds, or None when it is gone."""
    split = proc_cpu_split(pid)
    return None if split is None else split[0] + split[1]


def proc_cpu_split(pid):
    """(utime, stime) of pid (all threads) in seconds, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # the name may hold spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def machine_busy_s():
    """CPU seconds all cores spent not idle since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_for_quiet_machine(limit_pct, max_wait_s, log):
    """Wait (at most max_wait_s) until other work uses under limit_pct of one core.

    Returns the busy percentage of the last 1 s sample. Other jobs on a 2-core machine
    skew every number here, so each run starts on a machine as quiet as it gets.
    """
    deadline = time.time() + max_wait_s
    warned = False
    while True:
        a = machine_busy_s()
        time.sleep(1.0)
        b = machine_busy_s()
        if a is None or b is None:
            return None
        busy = 100.0 * (b - a)
        if busy < limit_pct or time.time() >= deadline:
            if warned or busy >= limit_pct:
                log("  machine %s (%.0f%% of a core busy)" % (
                    "quiet now" if busy < limit_pct else "still busy, running anyway", busy))
            return round(busy, 1)
        if not warned:
            log("  machine busy (%.0f%% of a core used by other work): waiting up to %ds"
                % (busy, max_wait_s))
            warned = True


def proc_status_kb(pid, field):
    """A "<field>: <n> kB" value of /proc/PID/status (VmRSS, VmHWM) in KiB, or None."""
    prefix = field + ":"
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_rss_kb(pid):
    """VmRSS of pid in KiB, or None."""
    return proc_status_kb(pid, "VmRSS")


class RssSampler:
    """Samples a process's VmRSS every RSS_SAMPLE_S on a thread of its own; keeps the peak.

    VmHWM (the kernel's own peak) covers the whole life of the process, connecting
    included; the sampled peak covers only the span between start() and stop().
    """

    def __init__(self, pid, interval=RSS_SAMPLE_S):
        self.pid = pid
        self.interval = interval
        self.peak_kb = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self):
        while True:
            kb = proc_rss_kb(self.pid)
            if kb is not None:
                self.samples += 1
                if self.peak_kb is None or kb > self.peak_kb:
                    self.peak_kb = kb
            if self._stop.wait(self.interval):
                return

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        kb = proc_rss_kb(self.pid)  # one last look
        if kb is not None and (self.peak_kb is None or kb > self.peak_kb):
            self.peak_kb = kb


def proc_threads(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port():
    """A TCP port on 127.0.0.1 that is free right now."""
    s = socket.socket()
    try:
        s.bind((HOST, 0))
        return s.getsockname()[1]
    finally:
        s.close()


class ServerProfiler:
    """py-spy sampling a Python server for one phase (raw collapsed stacks).

    Only used with --profile: sampling costs CPU on a 2-core machine, so profiled
    runs are marked "profiled": 1 and their numbers are not the clean ones.
    """

    def __init__(self, pid, path, rate, lines=False):
        self.path = path
        self.proc = None
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy not found (pip install py-spy)")
        # --function: one row per function; without it, per line (--profile-lines)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--output", path, "--format", "raw"]
            + ([] if lines else ["--function"]) + ["--gil", "--nonblocking", "--rate", str(rate)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def profile_summary(path, top=12):
    """Top functions of a py-spy raw file: (self %, inclusive %, function) rows."""
    self_n = {}
    incl_n = {}
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                total += n
                frames = stack.split(";")
                self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
                for fr in set(frames):
                    incl_n[fr] = incl_n.get(fr, 0) + n
    except OSError:
        return 0, [], []
    rows = []
    for fr, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        rows.append((100.0 * n / total, 100.0 * incl_n[fr] / total, fr))
    incl_rows = []
    for fr, n in sorted(incl_n.items(), key=lambda kv: -kv[1])[:top]:
        incl_rows.append((100.0 * self_n.get(fr, 0) / total, 100.0 * n / total, fr))
    return total, rows, incl_rows


# =============================================================================
# 3. Servers under test
# =============================================================================


class ServerUnderTest:
    """A server process: start it, find its port, watch it, stop it."""

    name = "server"
    protocol = "localchat"
    irc_server = None  # the name an IRC server gives itself in its replies (":NAME 001 ...")
    python_server = False  # LocalChat: py-spy can profile it

    def __init__(self):
        self.proc = None
        self.pid = None
        self.port = None
        self.version = None
        self.tmpdir = tempfile.mkdtemp(prefix="fanout-%s-" % self.name)
        self.log_path = os.path.join(self.tmpdir, "server.log")

    def command(self):
        raise NotImplementedError

    def ready_regex(self):
        raise NotImplementedError

    def environment(self):
        return None  # inherit ours

    def start(self):
        """Start the process and wait (with a deadline) for it to listen."""
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.tmpdir, start_new_session=True, env=self.environment())
        finally:
            log.close()
        self.pid = self.proc.pid
        deadline = time.time() + SERVER_START_TIMEOUT_S
        pattern = re.compile(self.ready_regex())
        while time.time() < deadline:
            m = pattern.search(self.log_text())
            if m:
                self.on_ready(m)
                return
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s before listening: %s" % (
                    self.name, self.proc.returncode, self.log_text()[-2000:]))
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("%s did not listen within %gs" % (self.name, SERVER_START_TIMEOUT_S))

    def on_ready(self, match):
        pass

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM, wait, then SIGKILL. Returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            return None
        code = self.proc.poll()
        if code is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                code = self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
                code = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return code


class LocalChatServer(ServerUnderTest):
    name = "localchat"
    protocol = "localchat"
    python_server = True

    def __init__(self, path, python, extra_args=(), flood_off=True, log_leaves=False):
        self.path = os.path.abspath(path)  # the server runs in its temp dir
        self.python = python
        self.extra_args = list(extra_args)
        self.flood_off = flood_off
        # paste: log at INFO (no --quiet) to read "NAME left (too_slow)" from the log:
        # when every reader is dropped at once, nobody is left to hear a "left" frame
        self.log_leaves = log_leaves
        self.flood_control = None  # "off" or "default", once the command is made
        self.args = []
        ServerUnderTest.__init__(self)

    def command(self):
        with open(self.path, "rb") as f:  # which localchat.py this run measured
            self.version = "sha1:" + hashlib.sha1(f.read()).hexdigest()[:12]
        self.args = self.optional_args() + self.extra_args
        quiet = [] if self.log_leaves else ["--quiet"]
        return [self.python, self.path, "server", "--host", HOST, "--port", "0"] + quiet + self.args

    LEFT_LOG_RE = re.compile(r"^\S+ \S+ (\S+) left \(([^)\n]*)\)", re.M)

    def log_drop_reasons(self):
        """{reason: names} from "NAME left (reason)" in the server log; None under --quiet."""
        if not self.log_leaves:
            return None
        why = {}
        for _name, reason in dict(self.LEFT_LOG_RE.findall(self.log_text())).items():
            why[reason] = why.get(reason, 0) + 1
        return why

    def optional_args(self):
        """Server options this localchat.py has (read from its --help), for a fair fan-out test."""
        try:
            out = subprocess.run([self.python, self.path, "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 timeout=30).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            out = ""
        args = []
        # Flood control off: the burst senders send as fast as the server takes them on
        # purpose. The paste workload keeps the defaults: that is what users run.
        self.flood_control = "default"
        if self.flood_off:
            for option in ("--messages-per-s", "--kbytes-per-s"):
                if option in out:
                    args += [option, "0"]
                    self.flood_control = "off"
        # No UDP discovery responder: the benchmark speaks TCP on 127.0.0.1 only.
        if "--no-discovery" in out:
            args.append("--no-discovery")
        return args

    def environment(self):
        """A fresh data folder per run: history never mixes with a person's or another run's."""
        env = dict(os.environ)
        env["LOCALCHAT_DATA_DIR"] = self.tmpdir
        env["XDG_DATA_HOME"] = self.tmpdir
        return env

    def ready_regex(self):
        return r"listening on (\S+):(\d+)"

    def on_ready(self, match):
        self.port = int(match.group(2))


class LocalChatIrcServer(LocalChatServer):
    """The same LocalChat server, driven through its IRC door by the IRC client code (IrcProto).

    The door is chosen by the first bytes (NICK); the server and its options are the
    JSON runs' (flood control off but in paste). Each client is auto-joined to #general
    on registration and then JOINs #bench, as on ngIRCd.
    """

    name = "localchat-irc"
    protocol = "irc"
    irc_server = "localchat"  # IRC_SERVER in localchat.py


class LocalChatWebSocketServer(LocalChatServer):
    """The same LocalChat server, driven through its web door: protocol v1 over WebSocket at /ws,
    as the chat page speaks it (WebSocketProto). Issue 10's target: server CPU per delivery at
    most 1.3x that of JSON lines, in the same run."""

    name = "localchat-ws"
    protocol = "ws"


NGIRCD_CONF = """\
[Global]
    Name = bench.localhost
    Info = fan-out benchmark
    AdminInfo1 = fanout.py
    AdminInfo2 = 127.0.0.1
    AdminEMail = bench@localhost
    Listen = 127.0.0.1
    Ports = %(port)d
    MotdPhrase = "bench"
    PidFile = %(tmpdir)s/ngircd.pid
[Limits]
    MaxConnections = 0
    MaxConnectionsIP = 0
    MaxJoins = 0
    MaxPenaltyTime = 0
    PingTimeout = 600
    PongTimeout = 600
[Options]
    DNS = no
    Ident = no
    PAM = no
    IncludeDir = %(tmpdir)s/conf.d
"""


class NgircdServer(ServerUnderTest):
    """ngIRCd in the foreground with a generated config.

    MaxPenaltyTime = 0 turns off flood penalties; limits are unlimited (0); DNS and
    IDENT look-ups are off. Started as root, ngIRCd switches to user nobody by itself,
    so the temp dir is made world-writable for its PID file.
    """

    name = "ngircd"
    protocol = "irc"
    irc_server = "bench.localhost"  # Name in NGIRCD_CONF
    flood_control = "off"  # MaxPenaltyTime = 0: no penalties

    def __init__(self, binary):
        self.binary = binary
        ServerUnderTest.__init__(self)

    def command(self):
        self.port = free_port()
        os.chmod(self.tmpdir, 0o777)
        os.mkdir(os.path.join(self.tmpdir, "conf.d"))
        conf = os.path.join(self.tmpdir, "ngircd.conf")
        with open(conf, "w") as f:
            f.write(NGIRCD_CONF % {"port": self.port, "tmpdir": self.tmpdir})
        os.chmod(conf, 0o644)
        return [self.binary, "-n", "-f", conf]

    def ready_regex(self):
        return r"Server \".*\" .*ready"

    CLOSE_RE = re.compile(r"Shutting down connection (\d+) \((.*?)\) with")

    def log_drop_reasons(self):
        """{reason: connections} from ngIRCd's own log ("Shutting down connection N (why)").

        Its QUIT to the others names no reason when it drops a client itself (the text is
        the nick), so the log is where "Write buffer space exhausted" shows. Read before
        the load processes quit, so their own QUITs are not in it yet.
        """
        why = {}
        for _conn, reason in dict(self.CLOSE_RE.findall(self.log_text())).items():
            why[reason] = why.get(reason, 0) + 1
        return why

    def on_ready(self, match):
        m = re.search(r"ngIRCd (\S+)", self.log_text())
        if m:
            self.version = m.group(1)[:40]
        m = re.search(r"with PID (\d+)", self.log_text())
        if m and int(m.group(1)) != self.pid:
            self.pid = int(m.group(1))  # should not happen with -n, but measure the right one


# =============================================================================
# 4. Wire protocols
# =============================================================================
#
# Message payloads are "<kind>:<sender index>:<seq>:<send time in us>" with kind "b"
# (burst), "p" (paced) or "t" (paste), then any padding of "~" (--payload-bytes, paste).
# In a block of complete lines, each protocol finds every message as a tuple (id, from,
# sender, seq, usec) of bytes, where `from` is the digits of the sender's name
# "u<digits>" (so it must equal `sender`) and IRC, which has no ids, gives an empty id.
# A fast regex does the common case; when it does not match every message mark in the
# block, a slow path parses each line (JSON for LocalChat) and the block's messages are
# counted as slow_lines.


def _from_digits(name, sender):
    """The sender digits if name is "u<sender>", else b"?" (a from mismatch)."""
    return sender if name == b"u" + sender else b"?"


class LocalChatProto:
    name = "localchat"
    echoes_sender = True
    # Compact JSON with the keys in the order of the spec (a "room" may sit before
    # "text"). GENERIC_RE allows other fields and spacing; json.loads is the last resort.
    FAST_RE = re.compile(
        rb'"id":(\d+),"ts":[0-9.eE+-]+,"from":"u(\d+)",(?:"room":"[^"\n]*",)?'
        rb'"text":"[a-z]:(\d+):(\d+):(\d+)~*"')
    GENERIC_RE = re.compile(
        rb'"id":\s*(\d+)[^\n]*?"from":\s*"u(\d+)"[^\n]*?"text":\s*"[a-z]:(\d+):(\d+):(\d+)~*"')
    # History replayed on joining (LocalChat with rooms/history) is not a delivery.
    REPLAY_MARK = b'"replay":true'
    TEXT_RE = re.compile(r"^[a-z]:(\d+):(\d+):(\d+)")

    def __init__(self):
        self.set_style(compact=True)

    def set_style(self, compact):
        sep = b'":"' if compact else b'": "'
        self.msg_mark = b'"type' + sep + b'message"'
        self.joined_mark = b'"type' + sep + b'joined"'
        self.ping_mark = b'"type' + sep + b'ping"'
        self.trouble_marks = (b'"type' + sep + b'error"', b'"type' + sep + b'bye"',
                              b'"type' + sep + b'left"')

    def hello(self, name):
        return b'{"type":"hello","name":"%s","version":1}\n' % name

    def joined_count(self, block):
        return block.count(self.joined_mark)

    def say(self, text):
        return b'{"type":"say","text":"%s"}\n' % text

    def pong(self):
        return b'{"type":"pong"}\n'

    def bye(self):
        return b'{"type":"bye"}\n'

    def handshake_line(self, client, line):
        """Returns (done, reply bytes or None, error text or None) for one line."""
        try:
            frame = json.loads(line)
        except ValueError:
            return False, None, "bad json in handshake: %r" % line[:200]
        kind = frame.get("type")
        if kind == "welcome":
            self.set_style(compact=b'"type":"welcome"' in line)
            return True, None, None
        if kind == "ping":
            return False, self.pong(), None
        if kind in ("error", "bye"):
            return False, None, "%s %s: %s" % (kind, frame.get("code") or frame.get("reason"),
                                               frame.get("text"))
        return False, None, None

    def slow_messages(self, block, marks):
        """Messages of block as FAST_RE tuples, replays left out; (tuples, replays)."""
        if self.REPLAY_MARK not in block:
            found = self.GENERIC_RE.findall(block)
            if len(found) == marks:
                return found, 0
        return self.json_messages(block)

    def json_messages(self, block):
        """json.loads every message line of block; (FAST_RE-shaped tuples, replays)."""
        out = []
        replays = 0
        for line in block.split(b"\n"):
            if b'"message"' not in line:
                continue
            try:
                frame = json.loads(line)
            except ValueError:
                continue
            if not isinstance(frame, dict) or frame.get("type") != "message":
                continue
            if frame.get("replay"):
                replays += 1
                continue
            m = self.TEXT_RE.match(str(frame.get("text", "")))
            if not m:
                continue
            sender = m.group(1).encode()
            out.append((str(frame.get("id", "")).encode(),
                        _from_digits(str(frame.get("from", "")).encode(), sender),
                        sender, m.group(2).encode(), m.group(3).encode()))
        return out, replays

    def pings(self, block):
        return block.count(self.ping_mark)

    LEFT_RE = re.compile(rb'"type":\s*"left"[^\n]*?"name":\s*"([^"\n]*)"[^\n]*?"reason":\s*"([^"\n]*)"')
    ERROR_RE = re.compile(rb'"type":\s*"error"[^\n]*?"code":\s*"([^"\n]*)"')

    def departures(self, block):
        """(name, reason) of every "left" frame in block (why the server let someone go)."""
        return self.LEFT_RE.findall(block)

    def error_codes(self, block):
        return self.ERROR_RE.findall(block)

    def trouble(self, block):
        """Error, bye and left frames in block, as short strings."""
        out = []
        for line in block.split(b"\n"):
            for mark in self.trouble_marks:
                if mark in line:
                    out.append(line[:200].decode("utf-8", "replace"))
        return out


class IrcProto:
    """IRC as an IRC client speaks it, the same for ngIRCd and LocalChat's IRC door.

    The server's differences are all ones an IRC client has to take anyway:
    LocalChat sends a text without spaces as a middle parameter ("PRIVMSG #bench
    b:1:2:3", no colon; so does RFC 2812 allow), names itself "localchat" in numerics,
    and auto-joins every client to #general before it JOINs #bench (so the handshake
    ends at the 366 of #bench, and only JOINs of #bench count as joined notices).
    Without the echo-message capability (never asked for) neither server sends a
    sender its own message.
    """

    name = "irc"
    echoes_sender = False
    FAST_RE = re.compile(rb"^:()u(\d+)!\S* PRIVMSG \S+ :?[a-z]:(\d+):(\d+):(\d+)", re.M)
    ANY_RE = re.compile(rb"^:([^!\s]+)\S* PRIVMSG \S+ :?[a-z]:(\d+):(\d+):(\d+)", re.M)
    msg_mark = b" PRIVMSG "
    joined_mark = b" JOIN "
    ping_mark = b"PING "
    # JOINs of the bench channel: "JOIN :#bench" (ngIRCd) or "JOIN #bench" (LocalChat)
    JOINED_RE = re.compile(rb" JOIN :?" + re.escape(IRC_CHANNEL.encode()) + rb"\r?$", re.M)

    def __init__(self, server_name="bench.localhost"):
        self.server_name = server_name.encode()
        self.numeric_mark = b":" + self.server_name + b" "  # server replies, numerics among them
    TROUBLE_RE = re.compile(rb"^(ERROR .*|:\S+ (?:[45]\d\d|KILL|KICK) .*|:\S+ (?:QUIT|PART) .*)$", re.M)

    def hello(self, name):
        return b"NICK %s\r\nUSER %s 0 * :%s\r\n" % (name, name, name)

    def say(self, text):
        return b"PRIVMSG " + IRC_CHANNEL.encode() + b" :" + text + b"\r\n"

    def pong(self):
        return b"PONG :" + self.server_name + b"\r\n"

    def joined_count(self, block):
        return len(self.JOINED_RE.findall(block))

    def bye(self):
        return b"QUIT :bye\r\n"

    def handshake_line(self, client, line):
        parts = line.split(b" ", 3)
        if line.startswith(b"PING "):
            return False, b"PONG " + line[5:].strip() + b"\r\n", None
        if len(parts) >= 2:
            code = parts[1]
            if code == b"001":
                return False, b"JOIN " + IRC_CHANNEL.encode() + b"\r\n", None
            if code == b"366" and len(parts) == 4 and parts[3].split(b" ", 1)[0] == IRC_CHANNEL.encode():
                return True, None, None  # end of NAMES of the bench channel (not #general)
            if code[:1] in (b"4", b"5") and len(code) == 3:
                return False, None, "irc error: %s" % line[:200].decode("utf-8", "replace")
        if line.startswith(b"ERROR"):
            return False, None, line[:200].decode("utf-8", "replace")
        return False, None, None

    def slow_messages(self, block, marks):
        """Any nick; a PRIVMSG whose text is not a payload is not ours. (tuples, 0)"""
        return [(b"", _from_digits(nick, s), s, q, t) for nick, s, q, t in self.ANY_RE.findall(block)], 0

    def pings(self, block):
        return len(re.findall(rb"^PING ", block, re.M))

    def trouble(self, block):
        return [t.decode("utf-8", "replace")[:200] for t in self.TROUBLE_RE.findall(block)]

    QUIT_RE = re.compile(rb"^:([^!\s]+)\S* QUIT :?([^\r\n]*)", re.M)
    NUMERIC_ERR_RE = re.compile(rb"^(?::\S+ )?([45]\d\d|ERROR) ", re.M)

    def departures(self, block):
        """(nick, reason) of every QUIT in block (ngIRCd gives its reason as the text)."""
        return self.QUIT_RE.findall(block)

    def error_codes(self, block):
        return self.NUMERIC_ERR_RE.findall(block)


class WebSocketProto(LocalChatProto):
    """LocalChat's protocol as the web page speaks it: one JSON frame per WebSocket text message at /ws.

    The client's frames are masked (RFC 6455 requires it) with a zero key, which a
    server must unmask all the same; the server's frames are unwrapped here into the
    JSON lines the rest of the load process reads, so counting is the JSON mode's.
    """

    name = "ws"

    def hello(self, name):
        upgrade = (b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % HOST.encode())
        return upgrade + self.frame(LocalChatProto.hello(self, name))

    def say(self, text):
        return self.frame(LocalChatProto.say(self, text))

    def pong(self):
        return self.frame(LocalChatProto.pong(self))

    def bye(self):
        return self.frame(LocalChatProto.bye(self))

    @staticmethod
    def frame(line):
        """A masked text frame (zero mask key) of one JSON line, its newline left out."""
        payload = line.rstrip(b"\n")
        n = len(payload)
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        return head + b"\0\0\0\0" + payload

    def decode(self, c, data):
        """Unwrap the server's bytes into JSON lines: the 101 response first, then WebSocket frames."""
        buf = c.ws_buf + data if c.ws_buf else data
        if not c.ws_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                c.ws_buf = buf
                return b""
            if not buf.startswith(b"HTTP/1.1 101"):
                return b'{"type":"error","code":"ws_refused","text":"%s"}\n' % buf[:60].replace(b'"', b"'")
            buf, c.ws_open = buf[end + 4:], True
        out, i, n = [], 0, len(buf)
        while n - i >= 2:
            size, head = buf[i + 1] & 0x7F, 2
            if size == 126:
                if n - i < 4:
                    break
                size, head = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif size == 127:
                if n - i < 10:
                    break
                size, head = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            if n - i < head + size:
                break
            if buf[i] & 0x0F == 1:  # text: one JSON frame; control frames are the server's own business
                out.append(buf[i + head:i + head + size])
            i += head + size
        c.ws_buf = buf[i:]
        return b"\n".join(out) + b"\n" if out else b""


def make_proto(name, irc_server=None):
    if name == "ws":
        return WebSocketProto()
    return LocalChatProto() if name == "localchat" else IrcProto(irc_server or "bench.localhost")


# =============================================================================
# 5. Load process
# =============================================================================
#
# One load process owns a slice of the clients. The orchestrator drives it with JSON
# lines on stdin ("connect", "status", "go", "expect", "quit"); it answers with JSON
# lines on stdout. Every wait has a deadline; EOF on stdin ends the process.

CONNECTING, HANDSHAKE, READY, CLOSED = range(4)
RECV_BYTES = 256 * 1024
# Kernel receive timestamps (Linux x86/arm value; socket has no name for it): the
# latency runs from the send() in the sender to the kernel queuing the bytes on the
# receiving socket, so the load process's own delay in reading them is left out
# (and reported separately as the read lag).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@ll")
LAT_ALL = 32   # blocks with up to this many messages have every message timed
LAT_STEP = 4   # larger blocks: every LAT_STEP-th message, weighted LAT_STEP
MAX_BUFFER = 1 << 20  # a partial line longer than this is an error


class Client:
    __slots__ = ("idx", "key", "name", "sock", "state", "buf", "out", "writing", "next_seq", "missing",
                 "last_id", "confirms", "sent", "acked", "welcomed_at", "started_at", "unique", "ws_buf", "ws_open")

    def __init__(self, idx):
        self.idx = idx
        self.key = b"%d" % idx  # how messages name their sender
        self.name = b"u%d" % idx
        self.sock = None
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.writing = False
        self.next_seq = {}   # sender -> next seq expected
        self.missing = {}    # sender -> set of seqs skipped (not yet seen)
        self.last_id = 0
        self.confirms = None  # set of sender indexes whose window this client confirms
        self.sent = 0
        self.acked = 0
        self.welcomed_at = 0.0
        self.started_at = 0.0
        self.unique = 0  # messages received, duplicates not counted
        self.ws_buf = b""  # WebSocketProto: the server's bytes not yet unwrapped
        self.ws_open = False  # ... and whether its 101 response has come


class LoadWorker:
    """Connects its clients, runs the workload, reports counts and latencies."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.s = Settings(**cfg["settings"])
        self.proto = make_proto(cfg["protocol"], cfg.get("irc_server"))
        self.port = cfg["port"]
        self.wid = cfg["worker"]
        self.clients = [Client(i) for i in cfg["indexes"]]
        self.by_idx = dict((c.idx, c) for c in self.clients)
        self.by_key = dict((c.key, c) for c in self.clients)
        self.senders = [self.by_idx[i] for i in cfg["senders"] if i in self.by_idx]
        self.sel = selectors.DefaultSelector()
        self.ctl_buf = b""
        self.phase = "init"
        self.hist = [0] * (HIST_N + 1)
        self.lat_max_us = 0
        self.lat_samples = 0
        self.lag_hist = [0] * (HIST_N + 1)  # kernel arrival to read by the load process
        self.kernel_stamps = sys.platform.startswith("linux")
        self.counts = dict(received=0, unique=0, duplicated=0, reordered=0, gaps=0,
                           from_mismatch=0, id_disorder=0, slow_lines=0, joined=0, pings=0,
                           dropped=0, connect_failed=0, handshake_errors=0, replayed=0)
        self.errors = []
        self.departed = {}     # reason -> names the server said left for it
        self.error_codes = {}  # error code (LocalChat) or numeric (IRC) -> frames received
        self.rx_bytes = 0
        self.last_rx = 0.0
        self.last_joined_rx = 0.0  # pings keep bytes flowing; notices tell the drain
        self.first_msg_rx = 0.0
        self.last_msg_rx = 0.0
        self.pending_connects = []
        self.in_handshake = 0
        self.connect_started = 0.0
        self.last_welcome = 0.0
        self.go_at = 0.0
        self.expected = None
        self.expected_total = 0
        self.send_stop_at = 0.0
        self.sent_reported = False
        self.done_reported = False
        self.settle_deadline = 0.0
        self.cpu_at_go = 0.0
        self.paced_next = 0
        self.paced_order = []
        self._setup_confirmers()
        sel = self.sel
        sel.register(0, selectors.EVENT_READ, None)

    # --- control channel ---------------------------------------------------

    def emit(self, **msg):
        data = (json.dumps(msg) + "\n").encode()
        while data:
            n = os.write(1, data)
            data = data[n:]

    def note_error(self, text):
        if len(self.errors) < 20:
            self.errors.append(text)

    def on_control(self):
        data = os.read(0, 65536)
        if not data:
            raise SystemExit(0)  # orchestrator is gone
        self.ctl_buf += data
        self.run_commands()

    def run_commands(self):
        while b"\n" in self.ctl_buf:
            line, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
            self.on_command(json.loads(line))

    def on_command(self, msg):
        cmd = msg["cmd"]
        if cmd == "connect":
            self.start_connecting()
        elif cmd == "status":
            self.emit(ev="status", worker=self.wid, joined=self.counts["joined"], rx_bytes=self.rx_bytes,
                      last_rx=self.last_rx, last_joined_rx=self.last_joined_rx,
                      dropped=self.counts["dropped"],
                      welcomed=sum(1 for c in self.clients if c.state == READY))
        elif cmd == "go":
            self.start_workload(msg["at"])
        elif cmd == "expect":
            self.set_expected(dict((k.encode(), v) for k, v in msg["sent"].items()))
        elif cmd == "report":
            self.report_done(forced=True)
        elif cmd == "quit":
            self.close_all()
            raise SystemExit(0)

    # --- connecting ----------------------------------------------------------

    def start_connecting(self):
        self.phase = "connect"
        self.connect_started = time.time()
        self.pending_connects = list(reversed(self.clients))
        self.fill_connects()

    def fill_connects(self):
        limit = max(1, self.s.connect_concurrency // self.cfg["workers"])
        while self.pending_connects and self.in_handshake < limit:
            self.open_client(self.pending_connects.pop())

    def open_client(self, c):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.kernel_stamps:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self.kernel_stamps = False
        c.sock = sock
        c.started_at = time.time()
        self.in_handshake += 1
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            self.fail_client(c, "connect: %s" % os.strerror(err), connect=True)
            return
        c.state = CONNECTING
        self.sel.register(sock, selectors.EVENT_WRITE, c)
        c.writing = True

    def on_connected(self, c):
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail_client(c, "connect: %s" % os.strerror(err), connect=True)
            return
        c.state = HANDSHAKE
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        c.writing = False
        self.queue(c, self.proto.hello(c.name))

    def on_handshake(self, c, block):
        lines = block.split(b"\n")
        for i, raw in enumerate(lines):
            line = raw.rstrip(b"\r")
            if not line:
                continue
            done, reply, err = self.proto.handshake_line(c, line)
            if reply:
                self.queue(c, reply)
            if err:
                self.counts["handshake_errors"] += 1
                self.note_error("u%d: %s" % (c.idx, err))
            if done:
                c.state = READY
                c.welcomed_at = time.time()
                self.last_welcome = c.welcomed_at
                self.in_handshake -= 1
                rest = b"\n".join(lines[i + 1:])
                if rest.strip():
                    now = time.time()
                    self.on_lines(c, rest, now, now)
                self.fill_connects()
                self.check_connected()
                return

    def check_connected(self):
        if self.phase != "connect":
            return
        if all(c.state in (READY, CLOSED) for c in self.clients):
            self.phase = "connected"
            self.emit(ev="connected", worker=self.wid, started=self.connect_started,
                      last_welcome=self.last_welcome,
                      welcomed=sum(1 for c in self.clients if c.state == READY),
                      failed=self.counts["connect_failed"] + self.counts["dropped"],
                      errors=self.errors[:5])

    # --- sockets ------------------------------------------------------------

    def queue(self, c, data):
        if c.state == CLOSED:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.fail_client(c, "send: %s" % e)
            return
        if n < len(data):
            c.out = data[n:]
            if not c.writing:
                self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                c.writing = True

    def on_writable(self, c):
        if c.state == CONNECTING:
            self.on_connected(c)
            return
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail_client(c, "send: %s" % e)
            return
        c.out = c.out[n:]
        if not c.out and c.writing:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            c.writing = False

    def on_readable(self, c):
        anc = None
        try:
            if self.kernel_stamps:
                data, anc, _flags, _addr = c.sock.recvmsg(RECV_BYTES, 64)
            else:
                data = c.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail_client(c, "recv: %s" % e)
            return
        if not data:
            self.fail_client(c, "closed by server")
            return
        now = time.time()
        arrival = now
        if anc:
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= TIMESPEC.size:
                    sec, nsec = TIMESPEC.unpack_from(raw)
                    arrival = sec + nsec * 1e-9
        self.rx_bytes += len(data)
        self.last_rx = now
        decode = getattr(self.proto, "decode", None)
        if decode is not None:  # WebSocket frames into JSON lines
            data = decode(c, data)
            if not data:
                return
        if c.buf:
            data = c.buf + data
        end = data.rfind(b"\n")
        if end < 0:
            c.buf = data
            if len(data) > MAX_BUFFER:
                self.fail_client(c, "line longer than %d bytes" % MAX_BUFFER)
            return
        if end + 1 < len(data):
            c.buf = data[end + 1:]
            data = data[:end + 1]
        else:
            c.buf = b""
        if c.state == HANDSHAKE:
            self.on_handshake(c, data)
        else:
            self.on_lines(c, data, arrival, now)

    def fail_client(self, c, why, connect=False):
        if c.state == CLOSED:
            return
        if c.state in (CONNECTING, HANDSHAKE):
            self.in_handshake -= 1
        if connect:
            self.counts["connect_failed"] += 1
        else:
            self.counts["dropped"] += 1
        self.note_error("u%d: %s (phase %s)" % (c.idx, why, self.phase))
        c.state = CLOSED
        if c.sock is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
        self.fill_connects()
        self.check_connected()

    def close_all(self):
        for c in self.clients:
            if c.state != CLOSED and c.sock is not None:
                try:
                    c.sock.close()
                except OSError:
                    pass
                c.state = CLOSED

    # --- the hot path: complete lines of a ready client ---------------------

    def on_lines(self, c, block, arrival, now):
        """Complete lines from a welcomed client; arrival is the kernel's receive time."""
        proto = self.proto
        if proto.msg_mark in block:
            found = proto.FAST_RE.findall(block)
            marks = block.count(proto.msg_mark)
            if len(found) != marks:
                found, replays = proto.slow_messages(block, marks)
                self.counts["slow_lines"] += marks
                self.counts["replayed"] += replays
            if found:
                self.account(c, found, int(arrival * 1e6))
                hist_add(self.lag_hist, int((now - arrival) * 1e6), len(found))
                if not self.first_msg_rx:
                    self.first_msg_rx = now
                self.last_msg_rx = now
        elif proto.joined_mark in block:
            joined = proto.joined_count(block)
            if joined:
                self.counts["joined"] += joined
                self.last_joined_rx = now
        if proto.ping_mark in block:
            for _ in range(proto.pings(block)):
                self.queue(c, proto.pong())
            self.counts["pings"] += 1
        for mark in getattr(proto, "trouble_marks", ()):
            if mark in block:
                for t in proto.trouble(block):
                    self.note_error("u%d got %s" % (c.idx, t))
                self.note_trouble(block)
                break
        else:
            if proto.name == "irc" and (b"ERROR" in block or b" KICK " in block or b" QUIT " in block
                                        or b" PART " in block or b" KILL " in block
                                        or proto.numeric_mark in block):  # numerics
                for t in proto.trouble(block):
                    self.note_error("u%d got %s" % (c.idx, t))
                self.note_trouble(block)

    def note_trouble(self, block):
        """Count who the server let go and why, and the error frames it sent."""
        for name, reason in self.proto.departures(block):
            names = self.departed.get(reason.decode("utf-8", "replace")[:80])
            if names is None:
                names = self.departed[reason.decode("utf-8", "replace")[:80]] = set()
            names.add(name.decode("utf-8", "replace"))
        for code in self.proto.error_codes(block):
            code = code.decode("utf-8", "replace")
            self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def account(self, c, found, now_us):
        """Check id order, sender and sequence of every message in found; time a sample.

        Sequence state is per receiver and sender (keys are the sender's digits as
        bytes): the next seq expected, and the set of seqs skipped over so far. A seq
        above the next one opens a gap (its skipped seqs become missing); one below it
        either fills a gap (reordered) or was seen before (duplicated).

        Latency: every message of a block of up to LAT_ALL messages; in larger blocks
        (only under heavy load) every LAT_STEP-th one, counted LAT_STEP times, so the
        histogram stays unbiased while the load generator saves its time.
        """
        exp = c.next_seq
        missing = c.missing
        last_id = c.last_id
        unique = dup = reord = gaps = badfrom = badid = 0
        for mid, frm, s, q, t in found:
            if frm != s:
                badfrom += 1
                continue
            q = int(q)
            if mid:
                mid = int(mid)
                if mid <= last_id:
                    badid += 1
                last_id = mid
            n = exp.get(s, 0)
            if q == n:
                exp[s] = q + 1
            elif q > n:
                if q - n > 10000000:
                    badfrom += 1
                    continue
                miss = missing.get(s)
                if miss is None:
                    miss = missing[s] = set()
                miss.update(range(n, q))
                exp[s] = q + 1
                gaps += 1
            else:
                miss = missing.get(s)
                if miss and q in miss:
                    miss.discard(q)
                    reord += 1
                else:
                    dup += 1
                    continue
            unique += 1
        c.last_id = last_id
        c.unique += unique
        counts = self.counts
        counts["received"] += unique + dup
        counts["unique"] += unique
        counts["duplicated"] += dup
        counts["reordered"] += reord
        counts["gaps"] += gaps
        counts["from_mismatch"] += badfrom
        counts["id_disorder"] += badid

        # latency
        hist = self.hist
        lat_max = self.lat_max_us
        total = len(found)
        step = 1 if total <= LAT_ALL else LAT_STEP
        for k in range(0, total, step):
            lat = now_us - int(found[k][4])
            if lat > lat_max:
                lat_max = lat
            w = step if k + step <= total else total - k
            if lat < HIST_FINE_LIMIT_US:
                hist[lat // HIST_FINE_US if lat > 0 else 0] += w
            else:
                i = HIST_FINE_N + (lat - HIST_FINE_LIMIT_US) // HIST_COARSE_US
                hist[i if i < HIST_N else HIST_N] += w
        self.lat_max_us = lat_max
        self.lat_samples += (total + step - 1) // step

        # windows: the confirming client moves its senders' acknowledgements
        confirms = c.confirms
        if confirms is not None:
            by_key = self.by_key
            for mid, frm, s, q, t in found:
                if s in confirms:
                    sc = by_key[s]
                    q = int(q)
                    if q >= sc.acked:
                        sc.acked = q + 1

    # --- workloads -------------------------------------------------------------

    def _setup_confirmers(self):
        """Who confirms each sender's window in burst (see the module docstring)."""
        if not self.senders:
            return
        if self.proto.echoes_sender:
            for c in self.senders:
                c.confirms = {c.key}
            return
        sender_set = set(c.key for c in self.senders)
        witness = next((c for c in self.clients if c.key not in sender_set), None)
        if witness is None:
            return  # paced with everybody sending: no windows there
        witness.confirms = sender_set

    def start_workload(self, at):
        self.phase = "run"
        self.go_at = at
        self.cpu_at_go = self.cpu_now()
        s = self.s
        if s.workload == "burst":
            self.send_stop_at = at + s.duration
        elif s.workload == "paced":
            self.send_stop_at = at + s.duration
            # Sender i of S sends at at + i/S/rate + k/rate: spread evenly.
            self.paced_order = sorted(self.senders, key=lambda c: c.idx)
            self.paced_next = 0
        elif s.workload == "paste":
            self.send_stop_at = at
        if not self.senders:
            self.report_sent()  # nothing to send: tell the orchestrator at once

    def paste_pieces(self):
        """Text lengths of the wire messages one pasted message becomes (IRC: <= 512 B lines)."""
        size = self.s.paste_bytes
        if self.proto.name != "irc" or size <= IRC_PIECE_BYTES:
            return [size]
        full, rest = divmod(size, IRC_PIECE_BYTES)
        return [IRC_PIECE_BYTES] * full + ([rest] if rest else [])

    def start_paste(self):
        """Every sender hands the whole paste to its socket at once: no window, no pacing."""
        pieces = self.paste_pieces()
        for c in self.senders:
            if c.state != READY:
                continue
            frames = []
            seq = 0
            for _ in range(self.s.paste_messages):
                for size in pieces:
                    head = b"t:%d:%d:%d" % (c.idx, seq, int(time.time() * 1e6))
                    frames.append(self.proto.say(head + b"~" * max(0, size - len(head))))
                    seq += 1
            c.sent = seq
            self.queue(c, b"".join(frames))
        self.report_sent()

    def payload(self, kind, c, seq):
        text = b"%s:%d:%d:%d" % (kind, c.idx, seq, int(time.time() * 1e6))
        if self.s.payload_bytes:
            text += b"~" * self.s.payload_bytes
        return text

    def tick_burst(self, now):
        if self.sent_reported:
            return
        s = self.s
        stop = now >= self.send_stop_at
        for c in self.senders:
            if c.state != READY:
                continue
            room = s.window - (c.sent - c.acked)
            left = s.messages - c.sent
            if stop or room <= 0 or left <= 0:
                continue
            n = room if room < left else left
            frames = [self.proto.say(self.payload(b"b", c, c.sent + k)) for k in range(n)]
            c.sent += n
            self.queue(c, b"".join(frames))
        finished = all(c.state != READY or c.sent >= s.messages or stop for c in self.senders)
        confirmed = all(c.state != READY or c.acked >= c.sent for c in self.senders)
        if finished and (confirmed or now > self.send_stop_at + s.settle_timeout):
            self.report_sent()

    def tick_paced(self, now):
        """Send every message that is due; return seconds until the next one."""
        if self.sent_reported:
            return 1.0
        s = self.s
        order = self.paced_order
        nsend = len(order)
        period = 1.0 / s.rate
        total_senders = max(1, s.senders)
        for _ in range(100000):
            j = self.paced_next
            c = order[j % nsend]
            due = self.go_at + (j // nsend) * period + (c.idx % total_senders) * period / total_senders
            if due >= self.send_stop_at:
                self.report_sent()
                return 1.0
            if due > now:
                return due - now
            if c.state == READY:
                self.queue(c, self.proto.say(self.payload(b"p", c, c.sent)))
                c.sent += 1
            self.paced_next = j + 1
        return 0.0

    def report_sent(self):
        if self.sent_reported:
            return
        self.sent_reported = True
        self.emit(ev="sent", worker=self.wid, sent=dict((str(c.idx), c.sent) for c in self.senders),
                  unconfirmed=sum(c.sent - c.acked for c in self.senders if c.confirms is not None
                                  or not self.proto.echoes_sender) if self.s.workload == "burst" else 0)

    def set_expected(self, sent):
        """Every client should receive every message (IRC: but its own)."""
        self.expected = sent
        total = 0
        own_excluded = not self.proto.echoes_sender
        for c in self.clients:
            for s, n in sent.items():
                if own_excluded and s == c.key:
                    continue
                total += n
        self.expected_total = total
        now = time.time()
        self.settle_deadline = now + self.s.settle_timeout
        self.check_done(now)

    def client_expected(self, c):
        own_excluded = not self.proto.echoes_sender
        return sum(n for s, n in self.expected.items() if not (own_excluded and s == c.key))

    def check_done(self, now):
        if self.expected is None or self.done_reported:
            return
        if self.counts["unique"] >= self.expected_total:
            self.report_done()
        elif self.counts["dropped"] and all(c.state == CLOSED or c.unique >= self.client_expected(c)
                                            for c in self.clients):
            self.report_done()  # the rest went to connections the server closed: never coming
        elif now > self.settle_deadline:
            self.report_done(forced=True)

    def lost(self):
        """Expected deliveries that never arrived, over every client and sender."""
        if self.expected is None:
            return 0
        lost = 0
        own_excluded = not self.proto.echoes_sender
        for c in self.clients:
            for s, n in self.expected.items():
                if own_excluded and s == c.key:
                    continue
                got = min(c.next_seq.get(s, 0), n)
                miss = c.missing.get(s)
                if miss:
                    got -= sum(1 for q in miss if q < n)
                lost += n - got
        return lost

    def cpu_now(self):
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def report_done(self, forced=False):
        if self.done_reported:
            return
        self.done_reported = True
        hist = dict((str(i), n) for i, n in enumerate(self.hist) if n)
        lag = dict((str(i), n) for i, n in enumerate(self.lag_hist) if n)
        self.emit(ev="done", worker=self.wid, forced=forced, counts=self.counts, lost=self.lost(),
                  expected=self.expected_total, hist=hist, lag=lag, lat_max_us=self.lat_max_us, lat_samples=self.lat_samples,
                  kernel_stamps=self.kernel_stamps,
                  first_msg_rx=self.first_msg_rx, last_msg_rx=self.last_msg_rx,
                  cpu_s=self.cpu_now() - self.cpu_at_go, errors=self.errors[:10],
                  departed=dict((k, sorted(v)) for k, v in self.departed.items()),
                  error_codes=self.error_codes)

    # --- the loop ----------------------------------------------------------------

    def run(self, hard_deadline):
        self.emit(ev="ready", worker=self.wid)
        self.run_commands()  # any that came with the config
        sel = self.sel
        while time.time() < hard_deadline:
            timeout = 0.05
            if self.phase == "run" and time.time() >= self.go_at:
                if self.s.workload == "paced":
                    timeout = min(timeout, self.tick_paced(time.time()))
                elif self.s.workload == "burst":
                    self.tick_burst(time.time())
                elif self.s.workload == "paste" and not self.sent_reported:
                    self.start_paste()
            for key, mask in sel.select(timeout):
                c = key.data
                if c is None:
                    self.on_control()
                    continue
                if mask & selectors.EVENT_READ and c.state != CLOSED:
                    self.on_readable(c)
                if mask & selectors.EVENT_WRITE and c.state != CLOSED:
                    self.on_writable(c)
            if self.expected is not None:
                self.check_done(time.time())
        self.note_error("load process hit its hard deadline")
        self.report_done(forced=True)


def worker_main():
    """Entry point of a load process: config on the first stdin line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    line = b""
    while b"\n" not in line:
        chunk = os.read(0, 65536)
        if not chunk:
            return
        line += chunk
    first, rest = line.split(b"\n", 1)
    cfg = json.loads(first)
    worker = LoadWorker(cfg)
    worker.ctl_buf = rest
    profile_dir = os.environ.get("FANOUT_PROFILE_DIR")  # cProfile the load process
    profiler = None
    if profile_dir:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        worker.run(time.time() + cfg["hard_timeout"])
    except SystemExit:
        pass
    finally:
        worker.close_all()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, "worker-%s-%d.prof" % (
                cfg["protocol"], cfg["worker"])))


# =============================================================================
# 6. Orchestration of one run
# =============================================================================


class WorkerHandle:
    """A load process seen from the orchestrator."""

    def __init__(self, wid, cfg):
        self.wid = wid
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = b""
        self.events = []
        self.dead = False
        self.send(cfg)

    def send(self, msg):
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stop(self):
        try:
            self.send({"cmd": "quit"})
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Control:
    """Reads events from all load processes, each wait with a deadline."""

    def __init__(self, workers):
        self.workers = workers
        self.lost_workers = []  # load processes that ended before they were told to
        self.sel = selectors.DefaultSelector()
        for w in workers:
            os.set_blocking(w.proc.stdout.fileno(), False)
            self.sel.register(w.proc.stdout.fileno(), selectors.EVENT_READ, w)

    def pump(self, timeout):
        for key, _ in self.sel.select(timeout):
            w = key.data
            try:
                data = os.read(key.fd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fd)
                w.events.append({"ev": "exit", "worker": w.wid})
                continue
            w.buf += data
            while b"\n" in w.buf:
                line, w.buf = w.buf.split(b"\n", 1)
                w.events.append(json.loads(line))

    def take(self, w, ev):
        for i, e in enumerate(w.events):
            if e.get("ev") == ev:
                return w.events.pop(i)
            if e.get("ev") == "exit":
                w.dead = True
        return None

    def wait_all(self, ev, deadline, workers=None):
        """Wait for event ev from each live worker; returns {wid: event}.

        Workers that did not answer by the deadline, or whose process ended, are
        absent from the result (a dead one is noted once in self.lost_workers).
        """
        workers = self.workers if workers is None else workers
        got = {}
        while time.time() < deadline:
            for w in workers:
                if w.wid not in got and not w.dead:
                    e = self.take(w, ev)
                    if e is not None:
                        got[w.wid] = e
            waiting = [w for w in workers if w.wid not in got and not w.dead]
            if not waiting:
                break
            self.pump(min(CONTROL_POLL_S, max(0.0, deadline - time.time())))
        for w in workers:
            if w.dead and w.wid not in self.lost_workers:
                self.lost_workers.append(w.wid)
        return got

    def close(self):
        self.sel.close()


def split_clients(s, nworkers):
    """Client indexes per load process; senders (and the IRC witness) go to process 0."""
    n = s.clients
    senders = list(range(min(s.senders, n)))
    if s.workload == "paced":
        # paced needs no windows: spread senders over the processes too
        return [list(range(w, n, nworkers)) for w in range(nworkers)], senders
    base = list(range(len(senders) + 1))  # senders plus a witness
    rest = list(range(len(base), n))
    per = [[] for _ in range(nworkers)]
    per[0] = base[:]
    target = n // nworkers
    w = 0
    for i in rest:
        while len(per[w]) >= target + (1 if w < n % nworkers else 0) and w < nworkers - 1:
            w += 1
        per[w].append(i)
    return per, senders


def hist_percentile(hist, total, p):
    """Upper edge (ms) of the bucket holding the p-quantile of a merged histogram."""
    if total <= 0:
        return None
    rank = p * total
    seen = 0
    for i in sorted(hist):
        seen += hist[i]
        if seen >= rank:
            if i < HIST_FINE_N:
                return (i + 1) * HIST_FINE_US / 1000.0
            return (HIST_FINE_LIMIT_US + (i - HIST_FINE_N + 1) * HIST_COARSE_US) / 1000.0
    return None


def run_one(s, server, log):
    """Run workload s against a started server; returns the result dict."""
    res = {"workload": s.workload, "server": server.name, "clients": s.clients,
           "senders": s.senders if s.workload != "idle" else 0, "status": "ok",
           "protocol": server.protocol,
           "server_version": server.version, "server_args": " ".join(getattr(server, "args", [])),
           "flood_control": getattr(server, "flood_control", None)}
    if s.workload == "paced":
        res["rate"] = s.rate
    if s.workload == "paste":
        pieces = s.paste_bytes if server.protocol != "irc" else IRC_PIECE_BYTES
        res["paste_messages"] = s.paste_messages
        res["paste_bytes"] = s.paste_bytes
        res["wire_msgs_per_paste_msg"] = max(1, -(-s.paste_bytes // pieces))
    notes = []
    nworkers = load_procs(s)
    per, senders = split_clients(s, nworkers)
    hard = s.connect_timeout + s.drain_timeout + s.duration + s.settle_timeout * 2 + 120
    rss0 = proc_rss_kb(server.pid)
    cpu0 = proc_cpu_s(server.pid)
    workers = []
    profiler = None
    rss_sampler = None
    try:
        for wid in range(nworkers):
            cfg = {"settings": s.to_dict(), "protocol": server.protocol, "irc_server": server.irc_server,
                   "port": server.port,
                   "worker": wid, "workers": nworkers, "indexes": per[wid], "senders": senders,
                   "hard_timeout": hard}
            workers.append(WorkerHandle(wid, cfg))
        ctl = Control(workers)
        if len(ctl.wait_all("ready", time.time() + WORKER_START_TIMEOUT_S)) < nworkers:
            raise RuntimeError("load processes did not start")
        res["load_procs"] = nworkers

        if s.profile_dir and server.python_server and s.workload == "idle":
            profiler = start_profiler(s, server, res)

        # -- connect and welcome N clients
        log("  connecting %d clients (%d load process%s)" % (s.clients, nworkers, "es" if nworkers > 1 else ""))
        for w in workers:
            w.send({"cmd": "connect"})
        got = ctl.wait_all("connected", time.time() + s.connect_timeout)
        if len(got) < nworkers:
            res["status"] = "loadgen_failed" if ctl.lost_workers else "connect_timeout"
            notes.append("not every client was welcomed within %gs" % s.connect_timeout
                         if not ctl.lost_workers else
                         "load process(es) %s ended early (traceback on stderr)" % ctl.lost_workers)
            return finish(res, notes, server)
        t0 = min(e["started"] for e in got.values())
        t1 = max(e["last_welcome"] for e in got.values())
        res["connect_s"] = round(t1 - t0, 3)
        res["welcomed"] = sum(e["welcomed"] for e in got.values())
        res["connect_failed"] = sum(e["failed"] for e in got.values())
        for e in got.values():
            notes.extend(e.get("errors", [])[:3])
        if not server.alive():
            res["status"] = "server_died"
            return finish(res, notes, server)

        # -- drain the joined notices: every client hears of everyone who joined after
        # it, N(N-1)/2 in all; done when they are all in, or none came for quiet_ms
        # (pings and pongs do not count: idle servers ping all the time).
        drain_t0 = time.time()
        deadline = drain_t0 + s.drain_timeout
        expected_joined = s.clients * (s.clients - 1) // 2
        joined = 0
        last_joined = t1
        while time.time() < deadline:
            for w in workers:
                w.send({"cmd": "status"})
            st = ctl.wait_all("status", time.time() + 5)
            if len(st) < nworkers:
                break
            joined = sum(e["joined"] for e in st.values())
            last_joined = max([t1] + [e["last_joined_rx"] for e in st.values()])
            if joined >= expected_joined or time.time() - last_joined > s.quiet_ms / 1000.0:
                break
            time.sleep(CONTROL_POLL_S)
        else:
            notes.append("joined notices still arriving after %gs" % s.drain_timeout)
            res["status"] = "drain_timeout"
        res["drain_s"] = round(max(0.0, last_joined - t1), 3)  # last welcome to last notice
        res["joined_notices"] = joined
        res["joined_expected"] = expected_joined
        if joined != expected_joined:
            notes.append("%d joined notices, expected N(N-1)/2 = %d" % (joined, expected_joined))
        rss1 = proc_rss_kb(server.pid)
        cpu1 = proc_cpu_s(server.pid)
        if cpu0 is not None and cpu1 is not None:
            res["connect_server_cpu_s"] = round(cpu1 - cpu0, 3)
        if rss0 is not None and rss1 is not None:
            res["rss_kb_before"] = rss0
            res["rss_kb_after"] = rss1
            res["rss_kb_per_conn"] = round((rss1 - rss0) / float(s.clients), 2)
        res["server_threads"] = proc_threads(server.pid)

        if s.workload == "idle":
            c0 = proc_cpu_s(server.pid)
            time.sleep(s.idle_hold)
            c1 = proc_cpu_s(server.pid)
            if c0 is not None and c1 is not None:
                res["idle_cpu_pct"] = round(100.0 * (c1 - c0) / s.idle_hold, 2)
            rss2 = proc_rss_kb(server.pid)
            if rss1 is not None and rss2 is not None:
                res["idle_rss_growth_kb"] = rss2 - rss1
            if profiler is not None:
                profiler.stop()
            res["dropped"] = sum(e["dropped"] for e in status_all(ctl, workers).values())
            return finish(res, notes, server)

        # -- the measured phase
        log("  running %s" % s.label())
        if s.profile_dir and server.python_server:
            profiler = start_profiler(s, server, res)
        res["rss_kb_at_go"] = proc_rss_kb(server.pid)
        rss_sampler = RssSampler(server.pid).start()
        split_a = proc_cpu_split(server.pid)
        cpu_a = None if split_a is None else sum(split_a)
        busy_a = machine_busy_s()
        busy_t0 = time.time()
        go = busy_t0 + 0.2
        for w in workers:
            w.send({"cmd": "go", "at": go})
        send_deadline = go + s.duration + s.settle_timeout + 10
        sent_ev = ctl.wait_all("sent", send_deadline)
        if len(sent_ev) < nworkers:
            res["status"] = "send_timeout"
            notes.append("senders did not finish by the deadline (server stalled?)")
        sent = {}
        unconfirmed = 0
        for e in sent_ev.values():
            sent.update(e["sent"])
            unconfirmed += e.get("unconfirmed", 0)
        if unconfirmed:
            notes.append("%d messages were still unconfirmed when senders stopped waiting" % unconfirmed)
        for w in workers:
            w.send({"cmd": "expect", "sent": sent})
        done = ctl.wait_all("done", time.time() + s.settle_timeout + 10)
        if len(done) < nworkers:
            for w in workers:
                w.send({"cmd": "report"})
            done.update(ctl.wait_all("done", time.time() + 10,
                                     [w for w in workers if w.wid not in done]))
        t_end = time.time()
        split_b = proc_cpu_split(server.pid)
        cpu_b = None if split_b is None else sum(split_b)
        if split_a is not None and split_b is not None:  # user: the server's own code; system: the kernel's
            res["server_user_s"] = round(split_b[0] - split_a[0], 3)
            res["server_sys_s"] = round(split_b[1] - split_a[1], 3)
        busy_b = machine_busy_s()
        rss_sampler.stop()
        res["rss_kb_peak"] = rss_sampler.peak_kb  # sampled VmRSS, measured phase only
        res["vmhwm_kb"] = proc_status_kb(server.pid, "VmHWM")  # kernel's peak, whole life
        if busy_a is not None and busy_b is not None:
            # over the same span as server_cpu_pct and loadgen_cpu_pct (t_end - go), so
            # other_cpu_pct = machine - server - load generator is not skewed negative
            res["machine_cpu_pct"] = round(100.0 * (busy_b - busy_a) / (t_end - go), 1)
        if profiler is not None:
            profiler.stop()
        summarize(res, notes, s, server, go, t_end, cpu_a, cpu_b, sent, done)
        if ctl.lost_workers:
            res["status"] = "loadgen_failed"
            notes.insert(0, "load process(es) %s ended early (traceback on stderr)" % ctl.lost_workers)
        return finish(res, notes, server)
    except RuntimeError as e:
        res["status"] = "error"
        notes.append(str(e))
        return finish(res, notes, server)
    finally:
        if profiler is not None:
            profiler.stop()
        if rss_sampler is not None:
            rss_sampler.stop()
        for w in workers:
            w.stop()


def start_profiler(s, server, res):
    path = os.path.join(s.profile_dir, "%s-%s-%d-%d.pyspy.txt" % (
        server.name, s.workload, s.clients, s.senders))
    os.makedirs(s.profile_dir, exist_ok=True)
    res["profiled"] = 1
    res["profile_path"] = path
    return ServerProfiler(server.pid, path, s.profile_rate, s.profile_lines)


def status_all(ctl, workers):
    for w in workers:
        w.send({"cmd": "status"})
    return ctl.wait_all("status", time.time() + 5)


def summarize(res, notes, s, server, go, t_end, cpu_a, cpu_b, sent, done):
    """Fold the load processes' reports into res."""
    counts = {}
    hist = {}
    lost = expected = 0
    lat_max = 0
    lat_samples = 0
    lag = {}
    kernel_stamps = True
    first_rx = None
    last_rx = 0.0
    loadgen_cpu = 0.0
    departed = {}
    error_codes = {}
    for e in done.values():
        if e.get("ev") != "done":
            continue
        for reason, names in e.get("departed", {}).items():
            for name in names:  # an IRC QUIT whose text is the nick gives no reason
                departed.setdefault("no reason given" if reason == name else reason, set()).add(name)
        for code, n in e.get("error_codes", {}).items():
            error_codes[code] = error_codes.get(code, 0) + n
        for k, v in e["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in e["hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
        lost += e["lost"]
        expected += e["expected"]
        lat_max = max(lat_max, e["lat_max_us"])
        lat_samples += e.get("lat_samples", 0)
        kernel_stamps = kernel_stamps and e.get("kernel_stamps", False)
        for k, v in e.get("lag", {}).items():
            lag[int(k)] = lag.get(int(k), 0) + v
        if e["first_msg_rx"]:
            first_rx = e["first_msg_rx"] if first_rx is None else min(first_rx, e["first_msg_rx"])
        last_rx = max(last_rx, e["last_msg_rx"])
        loadgen_cpu += e["cpu_s"]
        if e.get("forced"):
            notes.append("load process %d stopped waiting: deliveries missing" % e["worker"])
            res["status"] = "incomplete"
        notes.extend(e.get("errors", [])[:3])
    messages = sum(sent.values())
    recipients = s.clients if server.protocol in ("localchat", "ws") else s.clients - 1
    deliveries = counts.get("unique", 0)
    span = (last_rx - go) if last_rx > go else None
    wall = t_end - go
    res.update({
        "messages_sent": messages,
        "recipients_per_msg": recipients,
        "expected_deliveries": messages * recipients,
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / span, 1) if span else 0.0,
        "messages_per_s": round(messages / span, 1) if span else 0.0,
        "latency_ms_p50": hist_percentile(hist, sum(hist.values()), 0.50),
        "latency_ms_p99": hist_percentile(hist, sum(hist.values()), 0.99),
        "latency_ms_max": round(lat_max / 1000.0, 3),
        "latency_samples": lat_samples,
        "latency_from_kernel_stamps": 1 if kernel_stamps else 0,
        "read_lag_ms_p50": hist_percentile(lag, sum(lag.values()), 0.50),
        "read_lag_ms_p99": hist_percentile(lag, sum(lag.values()), 0.99),
        "lost": messages * recipients - deliveries if deliveries <= messages * recipients else 0,
        "lost_by_seq": lost,
        "duplicated": counts.get("duplicated", 0),
        "reordered": counts.get("reordered", 0),
        "bad_from": counts.get("from_mismatch", 0),
        "id_disorder": counts.get("id_disorder", 0),
        "slow_lines": counts.get("slow_lines", 0),
        "replayed": counts.get("replayed", 0),
        "dropped": counts.get("dropped", 0),
        # why, as the server told the others ("left" reasons, IRC QUIT texts): names per reason
        "drop_reasons": dict((k, len(v)) for k, v in sorted(departed.items())),
        "error_frames": error_codes,
        "measured_s": round(wall, 3),
        "loadgen_cpu_pct": round(100.0 * loadgen_cpu / wall, 1) if wall > 0 else None,
    })
    if cpu_a is not None and cpu_b is not None:
        res["server_cpu_s"] = round(cpu_b - cpu_a, 3)
        res["server_cpu_pct"] = round(100.0 * (cpu_b - cpu_a) / wall, 1) if wall > 0 else None
        res["cpu_us_per_delivery"] = round((cpu_b - cpu_a) * 1e6 / deliveries, 3) if deliveries else None
    if "machine_cpu_pct" in res and res.get("server_cpu_pct") is not None:
        # what else ran on the machine meanwhile (other jobs, kernel work not charged to us)
        res["other_cpu_pct"] = round(res["machine_cpu_pct"] - res["server_cpu_pct"]
                                     - (res["loadgen_cpu_pct"] or 0.0), 1)
    if res["lost"] or res["duplicated"] or res["reordered"] or res["bad_from"] or res["id_disorder"] \
            or res["dropped"]:
        if res["status"] == "ok":
            res["status"] = "errors"


def delivery_failures(res):
    """What keeps a run from "0 dropped, 0 lost, 0 duplicated, order kept"; [] if nothing."""
    why = []
    if not res.get("messages_sent"):
        why.append("nothing sent")
    for key in ("dropped", "lost", "lost_by_seq", "duplicated", "reordered", "id_disorder", "bad_from"):
        if res.get(key):
            why.append("%s %d" % (key, res[key]))
    if res.get("deliveries", 0) != res.get("expected_deliveries", 0):
        why.append("%s of %s deliveries" % (res.get("deliveries"), res.get("expected_deliveries")))
    if res.get("status") not in ("ok", "errors"):
        why.append("status %s" % res.get("status"))
    return why


def finish(res, notes, server):
    drops = server.log_drop_reasons() if hasattr(server, "log_drop_reasons") else None
    if drops is not None:
        res["server_log_drops"] = drops
    if not server.alive():
        res["status"] = "server_died"
        notes.insert(0, "server exited with code %s; log tail: %s" % (
            server.proc.returncode, server.log_text()[-500:].replace("\n", " | ")))
    if "messages_sent" in res:  # with the final status
        res["delivery_check"] = "PASS" if not delivery_failures(res) else "FAIL"
    res["notes"] = notes
    return res


# =============================================================================
# 7. Results
# =============================================================================

TABLE_ROWS = [
    ("connect_s", "connect+welcome N (s)", "%.3f"),
    ("drain_s", "drain joined notices (s)", "%.3f"),
    ("connect_server_cpu_s", "server CPU connect+drain (s)", "%.2f"),
    ("flood_control", "flood control", "%s"),
    ("messages_sent", "messages sent", "%d"),
    ("wire_msgs_per_paste_msg", "wire messages / pasted msg", "%d"),
    ("recipients_per_msg", "recipients per message", "%d"),
    ("expected_deliveries", "deliveries expected", "%d"),
    ("deliveries", "deliveries received", "%d"),
    ("deliveries_per_s", "deliveries / s", "%.0f"),
    ("latency_ms_p50", "latency p50 (ms)", "%.3f"),
    ("latency_ms_p99", "latency p99 (ms)", "%.3f"),
    ("latency_ms_max", "latency max (ms)", "%.3f"),
    ("read_lag_ms_p99", "load gen read lag p99 (ms)", "%.3f"),
    ("cpu_us_per_delivery", "server CPU us / delivery", "%.3f"),
    ("server_cpu_pct", "server CPU %", "%.1f"),
    ("server_user_s", "server CPU user (s)", "%.2f"),
    ("server_sys_s", "server CPU system (s)", "%.2f"),
    ("loadgen_cpu_pct", "load generator CPU %", "%.1f"),
    ("other_cpu_pct", "other CPU on machine %", "%.1f"),
    ("rss_kb_per_conn", "server RSS KiB / conn", "%.2f"),
    ("rss_kb_at_go", "server RSS at start (KiB)", "%d"),
    ("rss_kb_peak", "server RSS peak, run (KiB)", "%d"),
    ("vmhwm_kb", "server VmHWM, life (KiB)", "%d"),
    ("idle_cpu_pct", "idle server CPU %", "%.2f"),
    ("idle_rss_growth_kb", "RSS growth while idle (KiB)", "%d"),
    ("lost", "lost", "%d"),
    ("duplicated", "duplicated", "%d"),
    ("reordered", "reordered", "%d"),
    ("dropped", "clients dropped", "%d"),
    ("drop_reasons", "drop reasons (names)", "%s"),
    ("server_log_drops", "drops in server log", "%s"),
    ("error_frames", "error frames received", "%s"),
    ("connect_failed", "connects failed", "%d"),
]


def json_line(res):
    return json.dumps(dict((k, v) for k, v in res.items() if k != "notes"), sort_keys=False)


def fmt(v, f):
    if v is None:
        return "-"
    if isinstance(v, dict):  # drop reasons, error frames: "too_slow:12 ..." or "none"
        return " ".join("%s:%s" % kv for kv in sorted(v.items())) or "none"
    try:
        return f % v
    except TypeError:
        return str(v)


def _ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return "%.2f" % (float(a) / b)
    return "-"


def render_table(results, label_of):
    """Group results by workload label: LocalChat (JSON lines), LocalChat's IRC door (when it
    ran) and ngIRCd side by side, with the ratios of each LocalChat column to ngIRCd."""
    out = []
    for lab, rs in group_results(results, label_of):
        lc = next((r for r in rs if r["server"] == "localchat"), None)
        li = next((r for r in rs if r["server"] == "localchat-irc"), None)
        ng = next((r for r in rs if r["server"] == "ngircd"), None)
        out.append("")
        out.append("== %s" % lab)
        if li is None:  # the two-column table of runs without the IRC door
            out.append("%-28s %14s %14s %12s" % ("metric", "LocalChat", "ngIRCd", "LC/ngIRCd"))
        else:
            out.append("%-28s %14s %14s %14s %10s %10s" % ("metric", "LocalChat JSON", "LocalChat IRC",
                                                          "ngIRCd", "JSON/ng", "IRC/ng"))
        for key, title, f in TABLE_ROWS:
            a = lc.get(key) if lc else None
            c = li.get(key) if li else None
            b = ng.get(key) if ng else None
            if a is None and b is None and c is None:
                continue
            if li is None:
                out.append("%-28s %14s %14s %12s" % (title, fmt(a, f), fmt(b, f), _ratio(a, b)))
            else:
                out.append("%-28s %14s %14s %14s %10s %10s" % (title, fmt(a, f), fmt(c, f), fmt(b, f),
                                                              _ratio(a, b), _ratio(c, b)))
        for r in rs:
            out.append("status %s: %s" % (r["server"], r["status"]))
            for n in r.get("notes", [])[:8]:
                out.append("  note %s: %s" % (r["server"], n))
    return "\n".join(out)


def group_results(results, label_of):
    """Return [(label, [results])] in the order the labels first come."""
    groups = []
    for r in results:
        lab = label_of(r)
        for g in groups:
            if g[0] == lab:
                g[1].append(r)
                break
        else:
            groups.append((lab, [r]))
    return groups


def met(ok):
    return "met" if ok else "MISSED"


def render_targets(results, label_of):
    """The issue's targets, each beside what this run measured, with met or MISSED.

    Targets (they hold at the sizes named; smaller smoke runs print them for reference):
      burst, paced, paste: every message to every reader: 0 dropped, 0 lost,
          0 duplicated, order kept (PASS/FAIL per server);
      burst N=200 and N=1000: LocalChat's server CPU per delivery at most 1.3x ngIRCd's;
      burst N=200 and N=1000, IRC door (issue 11): LocalChat driven by the IRC client code,
          server CPU per delivery at most 1.5x ngIRCd's in the same run;
      burst, web door (issue 10, with --ws): LocalChat over WebSocket, server CPU per delivery
          at most 1.3x LocalChat over JSON lines in the same run;
      paced N=1000, all 1000 sending 1/s: p99 latency at most ngIRCd's, all delivered;
      idle N=5000: memory per connection no worse than 32-36 KiB (met at <= 36).
    """
    out = ["", "== targets"]
    for lab, rs in group_results(results, label_of):
        lc = next((r for r in rs if r["server"] == "localchat"), None)
        li = next((r for r in rs if r["server"] == "localchat-irc"), None)
        lw = next((r for r in rs if r["server"] == "localchat-ws"), None)
        ng = next((r for r in rs if r["server"] == "ngircd"), None)
        first = rs[0]
        workload, n, senders = first.get("workload"), first.get("clients"), first.get("senders")
        out.append(lab)
        if workload in ("burst", "paced", "paste"):
            for r in rs:
                if "messages_sent" not in r:
                    out.append("  %-13s 0 dropped, 0 lost, 0 duplicated, order kept: FAIL (no result: %s)"
                               % (r["server"], r.get("status")))
                    continue
                why = delivery_failures(r)
                out.append("  %-13s 0 dropped, 0 lost, 0 duplicated, order kept: %s  (flood control %s; "
                           "delivered %d of %d, dropped %d, lost %d, duplicated %d, reordered %d)" % (
                               r["server"], "PASS" if not why else "FAIL", r.get("flood_control"),
                               r.get("deliveries", 0), r.get("expected_deliveries", 0), r.get("dropped", 0),
                               r.get("lost", 0), r.get("duplicated", 0), r.get("reordered", 0)))
                if why:
                    out.append("                why: %s" % "; ".join(why))
        if workload == "burst":
            a = lc.get("cpu_us_per_delivery") if lc else None
            b = ng.get("cpu_us_per_delivery") if ng else None
            where = "" if n in (200, 1000) else "  [the target is for N=200 and N=1000; this is N=%d]" % n
            if a is not None and b:
                out.append("  server CPU / delivery: LocalChat %.3f us, ngIRCd %.3f us, ratio %.2fx; "
                           "target <= %.1fx ngIRCd: %s%s" % (a, b, a / b, TARGET_CPU_RATIO,
                                                            met(a / b <= TARGET_CPU_RATIO), where))
                out.append("      (other CPU on the machine: %s%% / %s%% of a core during the two runs)" % (
                    fmt(lc.get("other_cpu_pct"), "%.1f"), fmt(ng.get("other_cpu_pct"), "%.1f")))
            else:
                out.append("  server CPU / delivery: LocalChat %s us, ngIRCd %s us; target <= %.1fx ngIRCd: "
                           "not measured (needs both servers)%s" % (fmt(a, "%.3f"), fmt(b, "%.3f"),
                                                                    TARGET_CPU_RATIO, where))
            if li is not None:
                c = li.get("cpu_us_per_delivery")
                if c is not None and b:
                    out.append("  IRC door, server CPU / delivery: LocalChat over IRC %.3f us, ngIRCd %.3f us, "
                               "ratio %.2fx; target <= %.1fx ngIRCd: %s%s" % (
                                   c, b, c / b, TARGET_IRC_CPU_RATIO, met(c / b <= TARGET_IRC_CPU_RATIO), where))
                    out.append("      (other CPU on the machine: %s%% / %s%% of a core during the two runs; "
                               "LocalChat IRC / JSON: %s)" % (
                                   fmt(li.get("other_cpu_pct"), "%.1f"), fmt(ng.get("other_cpu_pct"), "%.1f"),
                                   _ratio(c, a) + "x" if a else "-"))
                else:
                    out.append("  IRC door, server CPU / delivery: LocalChat over IRC %s us, ngIRCd %s us; "
                               "target <= %.1fx ngIRCd: not measured (needs both servers)%s" % (
                                   fmt(c, "%.3f"), fmt(b, "%.3f"), TARGET_IRC_CPU_RATIO, where))
            if lw is not None:
                w = lw.get("cpu_us_per_delivery")
                if w is not None and a:
                    out.append("  web door, server CPU / delivery: LocalChat over WebSocket %.3f us, over JSON "
                               "lines %.3f us, ratio %.2fx; target <= %.1fx JSON lines: %s" % (
                                   w, a, w / a, TARGET_WS_CPU_RATIO, met(w / a <= TARGET_WS_CPU_RATIO)))
                else:
                    out.append("  web door, server CPU / delivery: LocalChat over WebSocket %s us, over JSON "
                               "lines %s us; target <= %.1fx JSON lines: not measured" % (
                                   fmt(w, "%.3f"), fmt(a, "%.3f"), TARGET_WS_CPU_RATIO))
        if workload == "paced":
            a = lc.get("latency_ms_p99") if lc else None
            b = ng.get("latency_ms_p99") if ng else None
            rate = first.get("rate")
            where = "" if (n == 1000 and senders == n and rate == 1.0) else (
                "  [the target is for N=1000 with all 1000 sending 1/s; this is N=%d, %d sending %s/s]"
                % (n, senders, fmt(rate, "%g")))
            if a is not None and b is not None:
                out.append("  latency p99: LocalChat %.3f ms, ngIRCd %.3f ms; target <= ngIRCd's: %s%s" % (
                    a, b, met(a <= b), where))
            else:
                out.append("  latency p99: LocalChat %s ms, ngIRCd %s ms; target <= ngIRCd's: "
                           "not measured (needs both servers)%s" % (fmt(a, "%.3f"), fmt(b, "%.3f"), where))
            if li is not None:  # no target of its own here: for reference
                c, d = li.get("latency_ms_p99"), li.get("cpu_us_per_delivery")
                e = ng.get("cpu_us_per_delivery") if ng else None
                out.append("  IRC door (for reference): latency p99 %s ms (ngIRCd %s ms); server CPU / delivery "
                           "%s us (ngIRCd %s us, ratio %s)" % (
                               fmt(c, "%.3f"), fmt(b, "%.3f"), fmt(d, "%.3f"), fmt(e, "%.3f"), _ratio(d, e)))
            for r in rs:
                if "messages_sent" in r:
                    out.append("  %-13s every message delivered: %d of %d: %s" % (
                        r["server"], r.get("deliveries", 0), r.get("expected_deliveries", 0),
                        met(r.get("deliveries", 0) == r.get("expected_deliveries", 0)
                            and r.get("messages_sent", 0) > 0)))
        if workload == "idle":
            where = "" if n == 5000 else "  [the target is for N=5000; this is N=%d]" % n
            a = lc.get("rss_kb_per_conn") if lc else None
            b = ng.get("rss_kb_per_conn") if ng else None
            if a is not None:
                out.append("  memory / connection: LocalChat %.2f KiB (ngIRCd %s KiB); target no worse than "
                           "%g-%g KiB: %s%s" % (a, fmt(b, "%.2f"), TARGET_RSS_KB_GOAL, TARGET_RSS_KB_PER_CONN,
                                                met(a <= TARGET_RSS_KB_PER_CONN), where))
            else:
                out.append("  memory / connection: not measured (LocalChat status %s)%s" % (
                    lc.get("status") if lc else "not run", where))
            if li is not None:
                out.append("  IRC door (for reference): memory / connection %s KiB" % fmt(
                    li.get("rss_kb_per_conn"), "%.2f"))
        if workload == "paste":
            for r in rs:
                if "messages_sent" not in r:
                    continue
                reasons = fmt(r.get("drop_reasons") or {}, "%s")
                if r.get("server_log_drops"):
                    reasons += "; server log: " + fmt(r["server_log_drops"], "%s")
                out.append("  %-13s deliveries expected %d, received %d, lost %d; dropped %d (%s); "
                           "server RSS peak %s KiB (at start %s, VmHWM %s)" % (
                               r["server"], r.get("expected_deliveries", 0), r.get("deliveries", 0),
                               r.get("lost", 0), r.get("dropped", 0), reasons,
                               fmt(r.get("rss_kb_peak"), "%d"), fmt(r.get("rss_kb_at_go"), "%d"),
                               fmt(r.get("vmhwm_kb"), "%d")))
                if r.get("error_frames"):
                    out.append("            error frames received: %s" % fmt(r["error_frames"], "%s"))
    return "\n".join(out)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def render_spread(results):
    """--repeat: per workload, server CPU per delivery of every run, and the ratios to ngIRCd
    of the same run, with min / median / max (how far a ratio holds on a busy machine)."""
    out = ["", "== spread over repeated runs (server CPU us / delivery; ratios to ngIRCd in the same run)"]
    for base, rs in group_results(results, lambda r: r.get("base_label", r["label"])):
        out.append(base)
        names = [n for n in SERVER_NAMES if any(r["server"] == n for r in rs)]
        ratios = dict((n, []) for n in names if n != "ngircd")
        for run in sorted(set(r.get("run", 1) for r in rs)):
            by = dict((r["server"], r) for r in rs if r.get("run", 1) == run)
            ng = by.get("ngircd", {}).get("cpu_us_per_delivery")
            cells = []
            for n in names:
                v = by.get(n, {}).get("cpu_us_per_delivery")
                cells.append("%s %s" % (n, fmt(v, "%.3f")))
                if n != "ngircd" and v is not None and ng:
                    ratios[n].append(v / ng)
                    cells[-1] += " (%.2fx)" % (v / ng)
            others = "/".join(fmt(by.get(n, {}).get("other_cpu_pct"), "%.0f") for n in names)
            checks = "/".join(by.get(n, {}).get("delivery_check", "-") for n in names)
            out.append("  run %d: %s; delivery %s; other CPU %s%%" % (run, ", ".join(cells), checks, others))
        for n, xs in ratios.items():
            if xs:
                target = TARGET_IRC_CPU_RATIO if n == "localchat-irc" else TARGET_CPU_RATIO
                out.append("  %s / ngIRCd: min %.2fx, median %.2fx, max %.2fx over %d runs (target <= %.1fx%s)" % (
                    n, min(xs), _median(xs), max(xs), len(xs), target,
                    "" if rs[0].get("workload") == "burst" else ", a burst target"))
    return "\n".join(out)


def render_profile(r):
    got = profile_summary(r["profile_path"])
    out = ["", "== py-spy: %s on %s (%s)" % (r["server"], r["label"], r["profile_path"])]
    if not got or not got[0]:
        out.append("  (no samples)")
        return "\n".join(out)
    total, rows, incl_rows = got
    out.append("  %d samples; top by own time:" % total)
    out.append("  %7s %7s  %s" % ("self%", "incl%", "function"))
    for self_pct, incl_pct, fr in rows:
        out.append("  %7.1f %7.1f  %s" % (self_pct, incl_pct, fr[:110]))
    out.append("  top by inclusive time:")
    for self_pct, incl_pct, fr in incl_rows:
        out.append("  %7.1f %7.1f  %s" % (self_pct, incl_pct, fr[:110]))
    return "\n".join(out)


# =============================================================================
# 8. Command line
# =============================================================================


def parse_args(argv):
    p = argparse.ArgumentParser(description="LocalChat fan-out benchmark (ngIRCd for comparison).")
    p.add_argument("--workload", choices=["burst", "paced", "idle", "paste"], default="burst")
    p.add_argument("--all", action="store_true", help="run the standard set of workloads")
    p.add_argument("--clients", default=None, help="N, or a comma-separated list of N")
    p.add_argument("--senders", type=int, default=None,
                   help="senders (burst default 10, paced default 100, paste default 10)")
    p.add_argument("--all-send", action="store_true", help="paced: every client sends")
    p.add_argument("--duration", type=float, default=None, help="seconds of sending (burst 10, paced 20)")
    p.add_argument("--messages", type=int, default=2000, help="burst: messages per sender at most")
    p.add_argument("--window", type=int, default=20, help="burst: unconfirmed messages per sender")
    p.add_argument("--rate", type=float, default=1.0, help="paced: messages per second per sender")
    p.add_argument("--payload-bytes", type=int, default=0, help="padding added to each text")
    p.add_argument("--paste-messages", type=int, default=PASTE_MESSAGES,
                   help="paste: messages each sender pastes at once (default %d)" % PASTE_MESSAGES)
    p.add_argument("--paste-bytes", type=int, default=PASTE_BYTES,
                   help="paste: bytes of text per message (default %d)" % PASTE_BYTES)
    p.add_argument("--procs", type=int, default=0, help="load processes (0: 2 for heavy loads, else 1)")
    p.add_argument("--connect-concurrency", type=int, default=50,
                   help="clients connecting at once, over all load processes")
    p.add_argument("--connect-timeout", type=float, default=0,
                   help="seconds to connect and welcome N (0: max(60, 0.06*N))")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="how long to wait for missing deliveries after sending stops")
    p.add_argument("--quiet-ms", type=int, default=500, help="drain: silence that ends the connect phase")
    p.add_argument("--idle-hold", type=float, default=5.0, help="idle: seconds to measure idle CPU")
    p.add_argument("--localchat", default=DEFAULT_LOCALCHAT, help="path of localchat.py")
    p.add_argument("--localchat-args", default="",
                   help="extra server options as one string, e.g. --localchat-args=--no-history")
    p.add_argument("--python", default=sys.executable, help="interpreter for the LocalChat server")
    p.add_argument("--irc", action="store_true",
                   help="also run LocalChat through its IRC door with the IRC client code used for "
                        "ngIRCd (--all does this for burst and paced N=200)")
    p.add_argument("--no-irc", action="store_true", help="never run LocalChat through its IRC door")
    p.add_argument("--ws", action="store_true",
                   help="also run LocalChat through its web door: protocol v1 over WebSocket, as the "
                        "chat page speaks it (issue 10: at most 1.3x the server CPU of JSON lines)")
    p.add_argument("--servers", default=None,
                   help="exactly these, comma-separated, in this order: localchat (JSON lines), "
                        "localchat-irc (its IRC door), ngircd")
    p.add_argument("--compare", default="auto", help="ngircd (default when installed) or none")
    p.add_argument("--no-compare", action="store_true", help="LocalChat only")
    p.add_argument("--only-compare", action="store_true", help="ngIRCd only (to check the harness)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each workload this many times (the servers take turns; on a busy "
                        "2-core machine the spread says how far to trust a ratio)")
    p.add_argument("--ngircd", default=None, help="path of the ngircd binary")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="sample the LocalChat server with py-spy during the measured phase; "
                        "raw stacks go to DIR, top functions are printed (numbers are perturbed)")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-lines", action="store_true",
                   help="--profile per line of code instead of per function")
    p.add_argument("--quiet-machine-pct", type=float, default=25.0,
                   help="before each run, wait until other work uses less than this %% of a core")
    p.add_argument("--quiet-machine-wait", type=float, default=60.0,
                   help="how long to wait for that at most (0: do not wait)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_runs(a):
    """The list of Settings to run."""
    common = dict(messages=a.messages, window=a.window, rate=a.rate, payload_bytes=a.payload_bytes,
                  procs=a.procs, connect_concurrency=a.connect_concurrency,
                  connect_timeout=a.connect_timeout, settle_timeout=a.settle_timeout,
                  quiet_ms=a.quiet_ms, idle_hold=a.idle_hold,
                  profile_dir=os.path.abspath(a.profile) if a.profile else None,
                  profile_rate=a.profile_rate, profile_lines=a.profile_lines,
                  paste_messages=a.paste_messages,
                  paste_bytes=a.paste_bytes)
    runs = []
    if a.all:
        for workload, n, senders, extra in STANDARD_SET:
            kw = dict(common, workload=workload, clients=n, senders=senders,
                      duration=10.0 if workload == "burst" else 20.0)
            if a.duration is not None:
                kw["duration"] = a.duration
            kw.update(extra)
            kw["irc"] = (kw.get("irc", False) or a.irc) and not a.no_irc
            runs.append(Settings(**kw))
        return runs
    ns = [int(x) for x in (a.clients or {"burst": "200", "paced": "1000", "idle": "5000",
                                         "paste": "100"}[a.workload]).split(",")]
    for n in ns:
        senders = a.senders
        if senders is None:
            senders = {"burst": 10, "paced": 100, "idle": 0, "paste": 10}[a.workload]
        if a.all_send:
            senders = n
        duration = a.duration if a.duration is not None else (10.0 if a.workload == "burst" else 20.0)
        runs.append(Settings(**dict(common, workload=a.workload, clients=n,
                                    senders=min(senders, n), duration=duration,
                                    irc=a.irc and not a.no_irc, ws=a.ws)))
    return runs


SERVER_NAMES = ("localchat", "localchat-ws", "localchat-irc", "ngircd")


def servers_for(a, s):
    """Factories of the servers to run workload s against, in order: LocalChat over JSON lines,
    LocalChat over its IRC door (with s.irc, or --servers), ngIRCd."""
    extra = a.localchat_args.split() if a.localchat_args else []
    ng = a.ngircd or shutil.which("ngircd") or ("/usr/sbin/ngircd" if os.path.exists("/usr/sbin/ngircd") else None)
    if a.servers:
        names = [x.strip() for x in a.servers.split(",") if x.strip()]
    else:
        names = []
        if not a.only_compare:
            names.append("localchat")
            if s.ws:
                names.append("localchat-ws")
            if s.irc:
                names.append("localchat-irc")
        if not a.no_compare and a.compare.lower() != "none":
            names.append("ngircd")
    out = []
    for name in names:
        if name == "localchat":
            out.append((name, lambda s: LocalChatServer(a.localchat, a.python, extra,
                                                        flood_off=not s.flood_defaults,
                                                        log_leaves=s.workload == "paste")))
        elif name == "localchat-ws":
            out.append((name, lambda s: LocalChatWebSocketServer(a.localchat, a.python, extra,
                                                                 flood_off=not s.flood_defaults,
                                                                 log_leaves=s.workload == "paste")))
        elif name == "localchat-irc":
            out.append((name, lambda s: LocalChatIrcServer(a.localchat, a.python, extra,
                                                           flood_off=not s.flood_defaults,
                                                           log_leaves=s.workload == "paste")))
        elif name == "ngircd":
            if ng:
                out.append((name, lambda s: NgircdServer(ng)))
            elif a.servers or a.compare.lower() == "ngircd" or s.irc:
                print("ngircd not found: comparison skipped (apt-get install ngircd)", file=sys.stderr)
    return out


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a._worker:
        worker_main()
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    log = lambda text: print(text, file=sys.stderr, flush=True)
    results = []
    for name in (a.servers.split(",") if a.servers else []):
        if name.strip() and name.strip() not in SERVER_NAMES:
            print("--servers: unknown server %r (known: %s)" % (name, ", ".join(SERVER_NAMES)), file=sys.stderr)
            return 2
    repeat = max(1, a.repeat)
    runs = [Settings(**dict(s.to_dict(), run_no=i + 1, runs=repeat)) for s in build_runs(a) for i in range(repeat)]
    for s in runs:
        for name, factory in servers_for(a, s):
            log("%s: %s" % (name, s.label()))
            busy_before = None
            if a.quiet_machine_wait > 0:
                busy_before = wait_for_quiet_machine(a.quiet_machine_pct, a.quiet_machine_wait, log)
            server = factory(s)
            try:
                server.start()
            except (RuntimeError, OSError) as e:
                server.stop()
                res = {"workload": s.workload, "server": name, "clients": s.clients,
                       "senders": s.senders, "status": "start_failed", "notes": [str(e)[:500]]}
            else:
                try:
                    res = run_one(s, server, log)
                finally:
                    code = server.stop()
                    if code not in (0, None, -signal.SIGTERM):
                        res.setdefault("notes", []).append("server exit code %s" % code)
            res["label"] = s.label()
            res["base_label"] = s.base_label()
            res["run"] = s.run_no
            res["machine_busy_before_pct"] = busy_before
            results.append(res)
            line = json_line(res)
            print(line, flush=True)
            if a.json_out:
                with open(a.json_out, "a") as f:
                    f.write(line + "\n")
    print(render_table(results, lambda r: r["label"]))
    print(render_targets(results, lambda r: r["label"]))
    if repeat > 1:
        print(render_spread(results))
    for r in results:
        if r.get("profile_path"):
            print(render_profile(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
