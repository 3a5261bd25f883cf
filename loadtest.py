"""
The live server under load, and a long soak: stream.py run as a user runs it, watched from
outside (its /state, /proc/PID for memory, threads and CPU time), then its mp4 and log checked.

    python loadtest.py                       # --serve under load (the shipped student) -> runs/load/load.json
    python loadtest.py --soak 10000          # a 10,000-frame soak, the built-in scene -> runs/soak/soak.json

Load: `stream.py --serve`; a quiet phase, then at once: --viewers readers of /events (some hang up
mid-stream, cleanly or with a reset, and come back), one viewer that connects and never reads, and
--commands POST /command of every kind from --senders threads (in and out of bounds, malformed JSON,
huge bodies, nested brackets, wrong types, unknown keys, presets, lying Content-Length, clients that
hang up before the reply), each against the status it must get; a quiet phase again; then the stop
command ('q', or --frames). Soak: `stream.py --serve --frames N` with a command a second that keeps
the camera moving. Both print their figures, write them as JSON (--out) and exit 1 if a check fails.
"""
import http.client
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

import camera
import data
from common import ArgumentParser
from stream import KEYS as STREAM_KEYS, MOVE_LIMITS as LIMITS, OFFSET_LIMITS, WRAP   # LIMITS: what one move may add

ROOT = os.path.dirname(os.path.abspath(__file__))
KEYS = "".join(STREAM_KEYS) + "r"                # every key but q


# -----------------------------------------------------------------------------
# the server, watched from outside


class Server:
    """`python stream.py --serve --port 0 ARGS` in a subprocess: .port once it listens, .lines its stdout."""

    def __init__(self, args, env=None):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "stream.py"), "--serve", "--port", "0", *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines, self.err, self.port = [], [], None
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()
        deadline = time.time() + 300
        while self.port is None:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {''.join(self.err)[-2000:]}")
            line = next((ln for ln in list(self.lines) if ln.startswith("serving http")), None)
            self.port = int(line.split()[1].rstrip("/").rsplit(":", 1)[1]) if line else None
            time.sleep(0.05)

    @staticmethod
    def _read(f, out):
        for line in iter(f.readline, ""):
            out.append(line)

    def request(self, method, path, body=None, timeout=30):
        """-> (status, reply JSON or None); (None, error name) when the connection fails."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, None
        except OSError as e:
            return None, type(e).__name__
        finally:
            conn.close()

    def state(self):
        code, s = self.request("GET", "/state")
        return s if code == 200 else None

    def proc_stats(self):
        """(RSS MB, threads, CPU seconds) of the server process."""
        try:
            status = open(f"/proc/{self.proc.pid}/status").read().split("\n")
            stat = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        field = lambda name: next(int(ln.split()[1]) for ln in status if ln.startswith(name + ":"))
        return field("VmRSS") / 1024, field("Threads"), (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        time.sleep(0.3)
        return self.proc.returncode, "".join(self.lines), "".join(self.err)


class Monitor(threading.Thread):
    """Samples the server every `every` seconds: time, frame, RSS, threads, CPU seconds, viewers, offsets."""

    def __init__(self, server, every):
        super().__init__(daemon=True)
        self.server, self.every, self.samples, self.running, self.t0 = server, every, [], True, time.time()

    def now(self):
        return time.time() - self.t0

    def run(self):
        t0 = self.t0
        while self.running and self.server.proc.poll() is None:
            s, p = self.server.state(), self.server.proc_stats()
            if s and p and "frame" in s:
                self.samples.append(dict(t=time.time() - t0, frame=s["frame"], rss_mb=p[0], threads=p[1], cpu_s=p[2],
                                         viewers=s["viewers"], offset=s["offset"]))
            time.sleep(self.every)

    def frame(self):
        return self.samples[-1]["frame"] if self.samples else -1

    def wait_frame(self, n, timeout=600):
        deadline = time.time() + timeout
        while self.frame() < n:
            if time.time() > deadline or self.server.proc.poll() is not None:
                raise RuntimeError(f"the stream did not reach frame {n} (at {self.frame()})")
            time.sleep(0.05)

# -----------------------------------------------------------------------------
# viewers


def viewer(port, stop, rec, hang_up_after=None, reset=False):
    """Read /events until stop is set (or after hang_up_after frames: hang up, cleanly or with a reset);
    rec gets the frames received and any frame index that went backwards."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        f, last = s.makefile("rb"), -1
        while not stop.is_set():
            line = f.readline()
            if not line:
                rec["closed_by_server"] += 1
                return
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])["frame"]
                rec["frames"] += 1
                rec["backwards"] += frame <= last
                last = frame
                if hang_up_after is not None and rec["frames"] >= hang_up_after:
                    break
        if reset:                                   # a reset (RST) instead of a clean close
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as e:
        rec["errors"].append(type(e).__name__)
    finally:
        s.close()


def viewers(port, n, stop, hang_ups):
    """n viewers for as long as stop is not set; hang_ups of them hang up mid-stream, again and again
    (after 3 to 10 frames, every other time with a reset), and come back. -> (threads, records)."""
    recs = [dict(frames=0, backwards=0, closed_by_server=0, errors=[], hang_ups=0) for _ in range(n)]

    def loop(i):
        rng = random.Random(i)
        while not stop.is_set():
            if i < hang_ups:
                viewer(port, stop, recs[i], recs[i]["frames"] + rng.randint(3, 10), reset=recs[i]["hang_ups"] % 2 == 1)
                recs[i]["hang_ups"] += 1
            else:
                viewer(port, stop, recs[i])
                return
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    [t.start() for t in threads]
    return threads, recs


def stalled_viewer(port):
    """A viewer that connects and never reads (a small receive buffer: the server's sends block soon)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    return s

# -----------------------------------------------------------------------------
# commands: every kind, each with the status it must get


def command_kinds(rng, preset_names):
    """-> [(kind, body bytes, expected status)] of every kind; `raw` bodies are whole HTTP requests."""
    big = lambda n: b'{"key": "' + b"a" * n + b'"}'
    move = lambda **kw: json.dumps({"move": kw}).encode()
    comp = rng.choice(list(LIMITS))
    lim = LIMITS[comp]
    return [
        ("key", json.dumps({"key": rng.choice(KEYS)}).encode(), 200),
        ("move in bounds", move(**{c: rng.uniform(-LIMITS[c], LIMITS[c]) for c in rng.sample(list(LIMITS), 2)}), 200),
        ("move at the bound", move(**{comp: rng.choice([-lim, lim])}), 200),
        ("preset", json.dumps({"preset": rng.choice(preset_names)}).encode(), 200),
        ("move out of bounds", move(**{comp: rng.choice([-1, 1]) * lim * rng.uniform(1.001, 1e6)}), 400),
        ("move not finite", rng.choice([b'{"move": {"orbit": NaN}}', b'{"move": {"zoom": Infinity}}',
                                        b'{"move": {"dz": -Infinity}}', b'{"move": {"yaw": 1e400}}',
                                        b'{"move": {"pitch": ' + b"9" * 3000 + b"}}"]), 400),
        ("wrong type", rng.choice([b'{"key": 1}', b'{"key": null}', b'{"key": ["a"]}', b'{"move": {"orbit": "5"}}',
                                   b'{"move": {"orbit": true}}', b'{"move": {"dz": null}}', b'{"move": [1, 2]}',
                                   b'{"move": "orbit"}', b'{"move": {}}', b'{"preset": 3}', b'{"preset": {"a": 1}}',
                                   b'"a"', b"[1, 2]", b"42", b"null", b"{}"]), 400),
        ("unknown key", rng.choice([b'{"key": "p"}', b'{"key": "Q"}', b'{"key": ""}', b'{"key": "aa"}',
                                    b'{"launch": 1}', b'{"move": {"roll": 1}}', b'{"preset": "/etc/passwd"}',
                                    b'{"preset": "nope"}', b'{"key": "a", "move": {"orbit": 1}}']), 400),
        ("malformed JSON", rng.choice([b"not json", b"{", b"{'key': 'a'}", b'{"key": "a"', b"\xff\xfe\x00",
                                       b'{"key": "a"}}', b"\x00" * 10, b" "]), 400),
        ("nested brackets", rng.choice([b"[" * 2000 + b"]" * 2000, b'{"key": ' + b"[" * 1500 + b"]" * 1500 + b"}",
                                        b'{"move": ' + b'{"a": ' * 500 + b"1" + b"}" * 501]), 400),
        ("huge body", rng.choice([big(5000), big(100_000), big(1_000_000)]), 400),
        ("raw: lying Content-Length", rng.choice([b"POST /command HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}",
                                                  b"POST /command HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}",
                                                  b"POST /command HTTP/1.1\r\nContent-Length: x\r\n\r\n{}",
                                                  b"POST /command HTTP/1.1\r\n\r\n"]), 400),
        ("raw: hang up before the reply", b'POST /command HTTP/1.1\r\nContent-Length: 12\r\n\r\n{"key": "a"}', None),
        ("raw: hang up mid-body", b'POST /command HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"key": ', None),
        ("wrong path or method", rng.choice([b"POST /nowhere HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                                             b"PUT /command HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"]), -1),
    ]


def raw_request(port, body, hang_up):
    """Send a raw HTTP request; -> its status (None if hang_up: close at once, with a reset)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(body)
        if hang_up:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        head = s.makefile("rb").readline()
        return int(head.split()[1]) if head else None
    except OSError:
        return None
    finally:
        s.close()


def send_commands(server, n, senders, seed=0):
    """n commands of every kind from `senders` threads; -> per kind: sent, answered as expected, and
    the unexpected answers (status or connection error)."""
    preset_names = list(camera.PRESETS)
    rng, lock = random.Random(seed), threading.Lock()
    jobs = [rng.choice(command_kinds(random.Random(seed * 100003 + i), preset_names)) for i in range(n)]
    stats, ms = {}, []

    def work(mine):
        for kind, body, want in mine:
            t0 = time.perf_counter()
            if kind.startswith("raw") or want == -1:
                got = raw_request(server.port, body, hang_up=want is None)
                ok = got == want if want != -1 else got in (404, 501)
            else:
                got, reply = server.request("POST", "/command", body)
                ok = got == want and (want == 200 or isinstance(reply, dict) and bool(reply.get("error")))
            with lock:
                st = stats.setdefault(kind, dict(sent=0, ok=0, unexpected={}))
                st["sent"] += 1
                st["ok"] += ok
                if not ok:
                    st["unexpected"][str(got)] = st["unexpected"].get(str(got), 0) + 1
                ms.append(1000 * (time.perf_counter() - t0))
    threads = [threading.Thread(target=work, args=(jobs[i::senders],), daemon=True) for i in range(senders)]
    t0 = time.time()
    [t.start() for t in threads]
    [t.join() for t in threads]
    ms.sort()
    return stats, dict(seconds=time.time() - t0, median_ms=ms[len(ms) // 2], p99_ms=ms[int(0.99 * (len(ms) - 1))],
                       max_ms=ms[-1])

# -----------------------------------------------------------------------------
# checks on the run's outputs


def camera_bounds(samples, poses, zoom):
    """The camera state stays bounded: every sampled offset within stream.py's limits, every logged
    pose finite with its translation under camera.MAX_TRANSLATION, every focal scale within [1/(1.5 M), 1.5 M]
    (M = camera.MAX_ZOOM; 1.5: the zoom presets). -> figures and the list of violations."""
    max_zoom = camera.MAX_ZOOM
    bad, worst = [], dict(orbit=0.0, yaw=0.0, pitch=0.0, dz=0.0, dy=0.0, zoom=0.0)
    lim = dict(OFFSET_LIMITS, **{k: 180.0 for k in WRAP})                 # wrapping angles stay within +-180
    for s in samples:
        for k, v in s["offset"].items():
            worst[k] = max(worst[k], abs(v))
            if not abs(v) <= lim[k] + 1e-9:
                bad.append(f"frame {s['frame']}: offset {k} = {v}")
    trans = [math.sqrt(sum(p[i][3] ** 2 for i in range(3))) for p in poses]
    finite = all(math.isfinite(v) for p in poses for row in p for v in row) and all(map(math.isfinite, zoom))
    if not finite:
        bad.append("a logged pose or focal scale is not finite")
    if trans and max(trans) >= camera.MAX_TRANSLATION:
        bad.append(f"a logged translation of {max(trans):.3g} scene units")
    if zoom and not 1 / (1.5 * max_zoom) - 1e-9 <= min(zoom) <= max(zoom) <= 1.5 * max_zoom + 1e-9:
        bad.append(f"focal scales {min(zoom):.3g} to {max(zoom):.3g}")
    return dict(max_abs_offset=worst, max_translation=max(trans, default=0.0), zoom_range=[min(zoom, default=1.0),
                max(zoom, default=1.0)], poses_finite=finite), bad


def outputs(out, want_frames):
    """The mp4 and the log: frame counts (log, mp4, wanted), stop reason. -> (figures, log, problems)."""
    bad, log = [], json.load(open(os.path.join(out, "stream_latency.json")))
    mp4 = sum(1 for _ in data.read_video(os.path.join(out, "stream.mp4")))
    lens = {k: len(log[k]) for k in ("latency_ms", "poses", "zoom", "t", "viewers")}
    if not mp4 == log["frames"] == want_frames or set(lens.values()) != {want_frames}:
        bad.append(f"frames: wanted {want_frames}, log {log['frames']} (lists {lens}), mp4 {mp4}")
    return dict(frames_wanted=want_frames, frames_log=log["frames"], frames_mp4=mp4, stop=log["stop"],
                commands_logged=len(log["commands"])), log, bad


def phase_rate(log, a, b):
    """Frames a..b-1 of the log: frames/s end to end, generator ms a frame (median), longest gap
    between two frames (s)."""
    t, lat = log["t"][a:b], sorted(log["latency_ms"][a:b])
    if len(t) < 3:
        return dict(frames=len(t))
    gaps = [y - x for x, y in zip(t, t[1:])]
    return dict(frames=b - a, fps=(len(t) - 1) / (t[-1] - t[0]), gen_ms=lat[len(lat) // 2], max_gap_s=max(gaps),
                median_gap_s=sorted(gaps)[len(gaps) // 2])


def rss_phase(samples, t0, t1):
    """The samples taken between t0 and t1 (monitor seconds): RSS (median, max), threads (max, last),
    the server process's CPU (cores, and ms a frame: the generator's and the serving's together)."""
    ss = [s for s in samples if t0 <= s["t"] <= t1] or samples[-1:]
    rss, a, b = sorted(s["rss_mb"] for s in ss), ss[0], ss[-1]
    return dict(rss_median_mb=rss[len(rss) // 2], rss_max_mb=rss[-1], threads_max=max(s["threads"] for s in ss),
                threads_last=b["threads"], samples=len(ss),
                cores=(b["cpu_s"] - a["cpu_s"]) / max(b["t"] - a["t"], 1e-9),
                cpu_ms=1000 * (b["cpu_s"] - a["cpu_s"]) / max(b["frame"] - a["frame"], 1))


# -----------------------------------------------------------------------------
# the two runs


def stream_flags(args, out):
    return (["--out", out, "--traj", args.traj] + (["--ckpt", args.ckpt] if args.ckpt else [])
            + (["--steps", str(args.steps)] if args.steps else []) + (["--realtime"] if args.realtime else []))


def run_load(args):
    """The server under load, --rounds times with a quiet phase before each and after the last; ->
    (figures, problems)."""
    out = os.path.join(args.out, "stream")
    server = Server(stream_flags(args, out) + (["--frames", str(args.frames)] if args.frames else []))
    mon, stall = Monitor(server, args.every), None
    mon.start()
    marks, cmds, vrecs = [], [], []                     # marks: (name, monitor seconds, frame) at each phase's end
    mark = lambda name: marks.append((name, mon.now(), mon.frame()))
    try:
        mon.wait_frame(args.warmup)
        mark("warm-up")
        for r in range(args.rounds):
            time.sleep(args.quiet_s)
            mark("before" if r == 0 else f"after {r}")
            stall = stall or stalled_viewer(server.port)      # connected in the first round, never reads
            stop = threading.Event()
            vthreads, recs = viewers(server.port, args.viewers, stop, args.hang_ups)
            n, f0 = args.commands // args.rounds + (r < args.commands % args.rounds), mon.frame()
            cmds.append(send_commands(server, n, args.senders, args.seed + 7919 * r))
            mon.wait_frame(f0 + 4, timeout=60)      # a rate needs frames: a short burst keeps its viewers on till then
            stop.set()
            [t.join(timeout=60) for t in vthreads]
            vrecs += recs
            mark(f"load {r + 1}")
        time.sleep(args.quiet_s)
        mark(f"after {args.rounds}")
        stalled_dropped = server.state()["viewers"] == 0      # the stalled viewer's thread gave up (or not yet)
        if not args.frames:
            server.request("POST", "/command", b'{"key": "q"}')
        code, stdout, stderr = server.finish()
    finally:
        mon.running = False
        stall and stall.close()
        if server.proc.poll() is None:
            server.proc.kill()
    want = args.frames or int(next(ln for ln in stdout.splitlines() if "the command q at frame" in ln).split()[-1])
    res, log, bad = outputs(out, want)
    res.update(exit_code=code, traceback="Traceback" in stderr, stderr_tail=stderr[-3000:], commands=merge(cmds),
               command_time=[t for _, t in cmds], viewers=dict(
                   n=args.viewers, hang_ups=sum(r["hang_ups"] for r in vrecs),
                   frames_min=min(r["frames"] for r in vrecs),
                   backwards=sum(r["backwards"] for r in vrecs), errors=sorted({e for r in vrecs for e in r["errors"]}),
                   stalled_dropped=stalled_dropped, max_seen=max(s["viewers"] for s in mon.samples)),
               phases={name: dict(phase_rate(log, f0 + 1, f1 + 1), **rss_phase(mon.samples, t0, t1))
                       for (_, t0, f0), (name, t1, f1) in zip(marks, marks[1:])})
    cam, bad_cam = camera_bounds(mon.samples, log["poses"], log["zoom"])
    res.update(camera=cam, marks=marks, samples=series(mon.samples))
    return res, bad + bad_cam + load_problems(res, args)


def merge(rounds):
    """The command figures of every round, per kind."""
    stats = {}
    for st, _ in rounds:
        for kind, s in st.items():
            m = stats.setdefault(kind, dict(sent=0, ok=0, unexpected={}))
            m["sent"], m["ok"] = m["sent"] + s["sent"], m["ok"] + s["ok"]
            for k, v in s["unexpected"].items():
                m["unexpected"][k] = m["unexpected"].get(k, 0) + v
    return stats


def series(samples):
    """The monitor's samples without the offsets, as columns."""
    return {k: [round(s[k], 3) for s in samples] for k in ("t", "frame", "rss_mb", "threads", "cpu_s", "viewers")}


def load_problems(res, args):
    """What the load broke, if anything."""
    bad = []
    if res["exit_code"] != 0 or res["traceback"]:
        bad.append(f"the server ended with code {res['exit_code']}" + (" and a traceback" if res["traceback"] else ""))
    for kind, st in res["commands"].items():
        if st["ok"] != st["sent"]:
            bad.append(f"{kind}: {st['sent'] - st['ok']} of {st['sent']} answered {st['unexpected']}")
    v = res["viewers"]
    if v["frames_min"] < 1 or v["backwards"] or v["errors"]:
        bad.append(f"viewers: {v}")
    ph, rounds = res["phases"], args.rounds
    b = ph["before"]
    for r in range(1, rounds + 1):
        ld, af = ph[f"load {r}"], ph[f"after {r}"]
        if "fps" not in ld or ld["fps"] < args.min_rate * b["fps"] or ld["max_gap_s"] > args.max_gap_s:
            bad.append(f"the stream slowed or stalled under load {r}: {ld} against {b} before")
        if af["threads_last"] > b["threads_last"] + 2:
            bad.append(f"threads: {b['threads_last']} before the load, {af['threads_last']} after round {r}")
    growth = ph[f"after {rounds}"]["rss_median_mb"] - ph["after 1"]["rss_median_mb"]
    if growth > args.rss_growth_mb:
        bad.append(f"RSS grew {growth:.1f} MB from after the first round of load to after the last")
    return bad


def keep_moving(server, every, stop):
    """A command every `every` seconds that keeps the camera moving: orbit round and round (it wraps),
    pan, dolly, zoom and tilt to and fro, and every 30th command a preset played from that frame."""
    preset_names = list(camera.PRESETS)
    keys, i = "aaaaaajjjlllwwsszzxxiikkdd", 0
    while not stop.is_set() and server.proc.poll() is None:
        body = {"preset": preset_names[(i // 30) % len(preset_names)]} if i % 30 == 29 else {"key": keys[i % len(keys)]}
        server.request("POST", "/command", json.dumps(body).encode())
        i += 1
        stop.wait(every)


def run_soak(args):
    """A --soak-frame stream with commands that keep the camera moving; -> (figures, problems)."""
    out, n = os.path.join(args.out, "stream"), args.soak
    server = Server(stream_flags(args, out) + ["--frames", str(n)])
    mon, stop = Monitor(server, args.every), threading.Event()
    mon.start()
    threading.Thread(target=keep_moving, args=(server, args.cmd_every, stop), daemon=True).start()
    try:
        code, stdout, stderr = server.finish(timeout=None)
    finally:
        stop.set()
        mon.running = False
    res, log, bad = outputs(out, n)
    w = args.soak_window
    early, late = (100 - w // 2, 100 + w // 2), (n - w, n)
    res.update(exit_code=code, traceback="Traceback" in stderr, stderr_tail=stderr[-3000:],
               commands_sent=len(log["commands"]), early=early,
               late=late, **{k: window_figures(log, mon.samples, *r) for k, r in (("at_100", early), ("at_end", late))})
    ss = [s for s in mon.samples if s["frame"] >= 100]
    if len(ss) > 2:                                          # least squares: RSS against frame
        mf, mr = sum(s["frame"] for s in ss) / len(ss), sum(s["rss_mb"] for s in ss) / len(ss)
        res["rss_mb_per_1000_frames"] = 1000 * sum((s["frame"] - mf) * (s["rss_mb"] - mr) for s in ss) / max(
            sum((s["frame"] - mf) ** 2 for s in ss), 1e-9)
    res["rss_min_max_mb"] = [min(s["rss_mb"] for s in ss), max(s["rss_mb"] for s in ss)] if ss else None
    cam, bad_cam = camera_bounds(mon.samples, log["poses"], log["zoom"])
    res.update(camera=cam, samples=series(mon.samples))
    if code != 0 or res["traceback"]:
        bad.append(f"the stream ended with code {code}" + (" and a traceback" if res["traceback"] else ""))
    for k in ("gen_ms", "cpu_ms", "rss_mb"):        # wall time follows the other jobs on a shared CPU: reported only
        r = res["at_end"][k] / res["at_100"][k]
        res[k + "_ratio"] = r
        if k != "gen_ms" and not 0.9 <= r <= 1.1:
            bad.append(f"{k} near frame {n}: x{r:.3f} of near frame 100")
    return res, bad + bad_cam


def window_figures(log, samples, a, b):
    """Frames a..b-1: generator ms a frame (median of the log), CPU ms a frame of the whole process
    (from the samples spanning the window) and RSS (median of the samples in it)."""
    lat = sorted(log["latency_ms"][a:b])
    ss = [s for s in samples if a <= s["frame"] < b] or [min(samples, key=lambda s: abs(s["frame"] - (a + b) / 2))]
    rss = sorted(s["rss_mb"] for s in ss)
    df = ss[-1]["frame"] - ss[0]["frame"]
    cpu = (ss[-1]["cpu_s"] - ss[0]["cpu_s"]) / df if df > 0 else None
    return dict(gen_ms=lat[len(lat) // 2], gen_p95_ms=lat[int(0.95 * (len(lat) - 1))], cpu_ms=cpu and 1000 * cpu,
                rss_mb=rss[len(rss) // 2], samples=len(ss))

# -----------------------------------------------------------------------------
# command line


def print_load(res):
    for i, c in enumerate(res["command_time"], 1):
        print(f"round {i}: commands sent in {c['seconds']:.1f} s (reply median {c['median_ms']:.1f} ms, p99 "
              f"{c['p99_ms']:.1f}, max {c['max_ms']:.1f})")
    for kind, st in sorted(res["commands"].items()):
        print(f"  {kind:30s} {st['sent']:5d} sent, {st['ok']:5d} as expected" + (f", else {st['unexpected']}" if
                                                                                  st["unexpected"] else ""))
    print(f"viewers: {res['viewers']}")
    for name, p in res["phases"].items():
        print(f"{name:8s} frames {p['frames']:5d}, {p.get('fps', 0):5.2f} frames/s, generator "
              f"{p.get('gen_ms', 0):6.1f} ms a frame, longest gap {p.get('max_gap_s', 0):.2f} s | RSS median "
              f"{p['rss_median_mb']:.1f} MB, max {p['rss_max_mb']:.1f} | threads max {p['threads_max']}, last "
              f"{p['threads_last']} | server {p['cores']:.2f} cores, {p['cpu_ms']:.0f} ms CPU a frame")


def print_soak(res):
    for k in ("at_100", "at_end"):
        w = res[k]
        print(f"frames {res['early'] if k == 'at_100' else res['late']}: generator {w['gen_ms']:.1f} ms a frame "
              f"(p95 {w['gen_p95_ms']:.1f}), process CPU {w['cpu_ms'] or 0:.1f} ms a frame, RSS {w['rss_mb']:.1f} MB")
    print(f"ratios end / frame 100: generator (wall) x{res['gen_ms_ratio']:.3f}, process CPU "
          f"x{res['cpu_ms_ratio']:.3f}, RSS x{res['rss_mb_ratio']:.3f}; RSS slope "
          f"{res.get('rss_mb_per_1000_frames', 0):+.3f} MB per 1000 frames, range {res['rss_min_max_mb']}; "
          f"{res['commands_sent']} commands applied")


def main():
    p = ArgumentParser(description="stream.py --serve under load, or a long soak of the student.")
    p.add_argument("--soak", type=int, default=0, help="soak: stream this many frames instead of the load test")
    p.add_argument("--ckpt", type=str, default="", help="student checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (default: the checkpoint's stream_steps, as stream.py)")
    p.add_argument("--traj", type=str, default="orbit", help="--traj of the stream")
    p.add_argument("--realtime", action="store_true", help="pace the built-in scene at its 8 frames/s")
    p.add_argument("--frames", type=int, default=0, help="load: stop at this frame (default: a q after the load)")
    p.add_argument("--viewers", type=int, default=20, help="load: viewers on /events")
    p.add_argument("--hang_ups", type=int, default=5, help="load: viewers among them that hang up and come back")
    p.add_argument("--commands", type=int, default=5000, help="load: POST /command of every kind, all rounds")
    p.add_argument("--rounds", type=int, default=3, help="load: rounds of load, a quiet phase before each and after")
    p.add_argument("--senders", type=int, default=4, help="load: threads sending them")
    p.add_argument("--warmup", type=int, default=30, help="load: frames before the first phase")
    p.add_argument("--quiet_s", type=float, default=10.0, help="load: seconds of the quiet phases before and after")
    p.add_argument("--min_rate", type=float, default=0.3,
                   help="load: frames/s under load at least this x before (the serving shares the CPU)")
    p.add_argument("--max_gap_s", type=float, default=5.0, help="load: no two frames further apart (a stall)")
    p.add_argument("--rss_growth_mb", type=float, default=10.0,
                   help="load: RSS after the last round at most this much over after the first")
    p.add_argument("--cmd_every", type=float, default=0.5, help="soak: seconds between commands")
    p.add_argument("--soak_window", type=int, default=100, help="soak: frames of each window measured")
    p.add_argument("--every", type=float, default=0.25, help="seconds between samples of the server")
    p.add_argument("--seed", type=int, default=0, help="seed of the commands drawn")
    p.add_argument("--out", type=str, default="", help="output folder (default: runs/load or runs/soak)")
    args = p.parse_args()
    args.out = args.out or os.path.join("runs", "soak" if args.soak else "load")
    if args.soak and args.soak < 200 + args.soak_window:
        sys.exit(f"error: --soak needs at least {200 + args.soak_window} frames")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    res, bad = run_soak(args) if args.soak else run_load(args)
    res.update(problems=bad, wall_s=time.time() - t0, args=vars(args), cpus=os.cpu_count(),
               omp_threads=os.environ.get("OMP_NUM_THREADS"))
    (print_soak if args.soak else print_load)(res)
    print(f"frames: wanted {res['frames_wanted']}, log {res['frames_log']}, mp4 {res['frames_mp4']} ({res['stop']}); "
          f"camera {res['camera']}")
    path = os.path.join(args.out, "soak.json" if args.soak else "load.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(("FAILED: " + "; ".join(bad)) if bad else "all checks passed", f"-> {path} ({res['wall_s']:.0f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
