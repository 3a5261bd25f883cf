"""stream.py --serve: the live page in headless Chromium (frames arrive and advance, a key press
and a drag change the camera, bad commands get an error and the stream goes on, three viewers),
the server's commands and viewers without a browser, and a stalled viewer never blocks the stream.

Run as a script, it measures the live view on the shipped student (key press to frame, frames/s
with 0, 1 and 3 viewers, plain stream.py as the baseline): python tests/test_serve.py --help
"""
import base64
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pytest
import torch

import camera
import data
import serve
import stream
from model import PRESETS, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=960,760"]

# -----------------------------------------------------------------------------
# helpers: the server as a subprocess, an SSE client, a WebDriver client


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python stream.py --serve --port 0 ARGS` in a subprocess; .url once it listens."""

    def __init__(self, *args, cwd=ROOT):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "stream.py"), "--serve", "--port", "0",
                                      *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines, self.url = [], None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 120
        while self.url is None:
            assert time.time() < deadline and self.proc.poll() is None, f"no server: {self.proc.stderr.read()}"
            self.url = next((ln.split()[1] for ln in list(self.lines) if ln.startswith("serving http")), None)
            time.sleep(0.1)

    def _read(self):
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)

    def state(self):
        return json.load(urllib.request.urlopen(self.url + "state", timeout=30))

    def post(self, body):
        """POST /command with a raw body -> (status, JSON reply)."""
        req = urllib.request.Request(self.url + "command", data=body.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def wait_frame(self, n, timeout=120):
        """Wait until the stream is past frame n; -> the state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state()
            if s.get("frame", -1) >= n:
                return s
            time.sleep(0.1)
        raise AssertionError(f"the stream did not reach frame {n}")

    def finish(self, sig=None, timeout=120):
        """Wait for the process to end (after sending sig, if given); -> (exit code, stdout, stderr)."""
        if sig:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        return self.proc.returncode, "".join(self.lines), self.proc.stderr.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sse_messages(url, count, timeout=60, out=None):
    """Read up to `count` frame messages from /events (fewer if the stream ends), appending their
    JSON to `out` as they come; -> out."""
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("GET", "/events")
    resp, out = conn.getresponse(), [] if out is None else out
    while len(out) < count:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            out.append(json.loads(line[6:]))
    conn.close()
    return out


def image(url):
    """A PNG data URL -> float (3, H, W) in [-1, 1]."""
    import imageio.v3 as iio
    return data.to_model_frame(iio.imread(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


class Browser:
    """Headless Chromium driven by chromedriver's W3C WebDriver HTTP API (urllib + json)."""
    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="realcam-chromium-")
        port = free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except OSError:
                assert time.time() < deadline, "chromedriver did not start"
                time.sleep(0.2)
        opts = {"binary": CHROMIUM, "args": CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": opts}}}
        self.session = "/session/" + self.call("POST", "/session", caps)["sessionId"]
        self.s("POST", "/timeouts", {"script": 120000})           # async scripts may wait for slow frames

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {json.load(e)['value'].get('message', '')[:300]}")

    def s(self, method, path, body=None):
        return self.call(method, self.session + path, body)

    def open(self, url):
        self.s("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def js_async(self, script, *args):
        """script's last argument is the callback that returns its value."""
        return self.s("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait(self, expr, timeout=60):
        """Wait until the JavaScript expression is truthy; -> its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.js(f"return {expr};")
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expr}")

    def element(self, css):
        return self.s("POST", "/element", {"using": "css selector", "value": css})

    def press(self, key):
        self.s("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]})

    def drag(self, css, dx, dy, ms=400):
        """Press the mouse at the element's centre, move by (dx, dy) CSS pixels over ms, release."""
        self.s("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                                                 "actions": [
            {"type": "pointerMove", "duration": 0, "origin": self.element(css), "x": 0, "y": 0},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerMove", "duration": ms, "origin": "pointer", "x": dx, "y": dy},
            {"type": "pointerUp", "button": 0}]}]})
        self.s("DELETE", "/actions")

    def new_tab(self, url):
        handle = self.s("POST", "/window/new", {"type": "tab"})["handle"]
        self.switch(handle)
        self.open(url)
        return handle

    def switch(self, handle):
        self.s("POST", "/window", {"handle": handle})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.s("GET", "/screenshot")))

    def close(self):
        try:
            self.s("DELETE", "")
        except (OSError, RuntimeError):
            pass
        self.driver.terminate()
        self.driver.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def browser_or_skip():
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return Browser()
    if os.environ.get("REALCAM_REQUIRE_BROWSER"):                 # CI installs it: a missing browser fails there
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are required (apt-get install chromium chromium-driver)")
    pytest.skip(f"no headless browser: install Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")


KEYS_LATENCY = "window.realcam.keyLatency.length"

# -----------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    from test_model import random_model
    cfg = replace(PRESETS["tiny"], window=3)
    m = random_model(cfg)
    path = str(tmp_path_factory.mktemp("serve") / "student.pt")
    save_checkpoint(path, model=m.state_dict(), config=asdict(cfg), step=0, student=dict(steps=2, stage="selfforcing"))
    return path


def test_png_bytes_round_trip():
    import imageio.v3 as iio
    x = torch.rand(3, 7, 5) * 2 - 1
    rgb = data.to_uint8(x)
    assert (iio.imread(io.BytesIO(serve.png_bytes(rgb))) == rgb).all()
    assert (image(serve.png_url(x)) - data.to_model_frame(rgb)).abs().max() == 0


def test_a_stalled_viewer_never_blocks_the_stream(monkeypatch):
    """In-process server: a viewer that stops reading blocks only its own thread (which gives up after
    Handler.timeout); publish() stays instant and another viewer gets the latest frames."""
    monkeypatch.setattr(serve.Handler, "timeout", 1.0)
    rel, zoom = camera.preset_path("static", 2)
    hub = serve.Hub()
    server = serve.start("127.0.0.1", 0, hub, stream.Controls(rel, zoom), stream.KEYS)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(server.server_address)
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")       # then never reads
        gone = socket.create_connection(server.server_address)            # a viewer that hangs up
        gone.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        got = []
        reader = threading.Thread(target=sse_messages, args=(url, 1000, 30, got), daemon=True)
        reader.start()
        deadline = time.time() + 10
        while hub.viewers < 3:
            assert time.time() < deadline, "viewers did not connect"
            time.sleep(0.01)
        gone.close()
        g = torch.Generator().manual_seed(0)
        slowest = 0.0
        for i in range(60):                                # 2 x 256x256 noise PNGs: ~0.5 MB a message
            src, out = torch.rand(3, 256, 256, generator=g) * 2 - 1, torch.rand(3, 256, 256, generator=g) * 2 - 1
            t0 = time.perf_counter()
            hub.publish(i, src, out, dict(pose={}, i=i))
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.02)
        assert slowest < 0.05                              # never waits for a viewer
        deadline = time.time() + 20
        while not got or got[-1]["frame"] < 59:             # the healthy viewer reaches the last frame
            assert time.time() < deadline, f"the live viewer got {len(got)} frames"
            time.sleep(0.05)
        assert [m["frame"] for m in got] == sorted(m["frame"] for m in got)
        while hub.viewers > 1:                            # the stalled and the gone viewers' threads ended
            assert time.time() < deadline, f"{hub.viewers} viewers left"
            time.sleep(0.05)
        stalled.close()
    finally:
        serve.stop(server)


def test_server_commands_viewers_and_ctrl_c(tiny_student, tmp_path):
    """Without a browser: bad commands get 400 + a JSON message and the stream goes on; three event
    streams get advancing frames; a command reaches the camera; Ctrl-C ends cleanly, mp4 playable."""
    out = str(tmp_path / "o")
    srv = Server("--ckpt", tiny_student, "--traj", "static", "--realtime", "--out", out)
    try:
        s0 = srv.wait_frame(2)
        assert srv.state()["presets"] == camera.PRESETS and set(s0["keys"]) == set(stream.KEYS)
        bad = ['{"key": "p"}', "not json", "[1, 2]", '{"move": {"orbit": "far"}}', '{"preset": "/etc/passwd"}',
               '{"key": "a", "move": {}}', '{"launch": 1}', "\xff", "x" * 5000, "[" * 2000 + "]" * 2000,
               '{"key": ' + "[" * 900 + "]" * 900 + "}"]
        for body in bad:
            code, reply = srv.post(body)
            assert code == 400 and isinstance(reply["error"], str) and reply["error"], (body, reply)
        req = urllib.request.Request(srv.url + "nowhere", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 404 and "error" in json.load(e.value)
        code, reply = srv.post('{"key": "a"}')
        assert code == 200 and reply["ok"]
        s1 = srv.wait_frame(s0["frame"] + 4)                       # the stream went on
        assert s1["offset"]["orbit"] == 5 and s1["cmd"] == reply["id"]
        for _ in range(800):                                        # valid, in bounds: the zoom stops at its limit
            code, reply = srv.post('{"move": {"zoom": 1.0}}')
            assert code == 200
        s1 = srv.wait_frame(srv.state()["frame"] + 2)
        assert s1["offset"]["zoom"] == math.log(camera.MAX_ZOOM) and s1["cmd"] == reply["id"]
        # three viewers at once
        results = [[] for _ in range(3)]
        threads = [threading.Thread(target=lambda r=r: r.extend(sse_messages(srv.url, 6))) for r in results]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        for r in results:
            frames = [m["frame"] for m in r]
            assert len(r) == 6 and frames == sorted(set(frames))
            assert image(r[-1]["gen"]).shape == (3, 16, 16) and image(r[-1]["src"]).shape == (3, 16, 16)
        code, stdout, stderr = srv.finish(signal.SIGINT)
    finally:
        srv.kill()
    assert code == 0 and "interrupted" in stdout and "Traceback" not in stderr, stderr
    log = json.load(open(os.path.join(out, "stream_latency.json")))
    assert [c for _, c in log["commands"]] == ["a"] + ["move zoom=1"] * 800 and max(log["viewers"]) >= 3
    assert len(list(data.read_video(os.path.join(out, "stream.mp4")))) == log["frames"]


def mean_change(messages):
    """Mean |generated - source| of the frames of some page messages."""
    return sum((image(m["gen"]) - image(m["src"])).abs().mean().item() for m in messages) / len(messages)


def test_live_view_in_chromium(tmp_path):
    """The page in a real browser on the shipped student: frames arrive and advance, keys and a drag
    change the camera (the page's frames, the messages and the latency log show it), bad commands get
    an error and the stream goes on, three viewers at once; the stop button ends it cleanly."""
    browser = browser_or_skip()
    out = str(tmp_path / "o")
    srv = Server("--traj", "static", "--steps", "1", "--out", out)
    try:
        browser.open(srv.url)
        browser.wait("window.realcam.frames >= 3")
        f0 = browser.js("return window.realcam.last.frame;")
        browser.wait(f"window.realcam.last.frame > {f0 + 3}")            # frames advance
        assert browser.js("const g = document.getElementById('gen'); return [g.naturalWidth, g.clientWidth, "
                          "getComputedStyle(g).imageRendering];") == [32, 256, "pixelated"]
        assert "frames/s" in browser.js("return document.getElementById('readout').textContent;")
        collect = "const n = arguments[0], done = arguments[1], got = []; const t = setInterval(() => { " \
                  "const m = window.realcam.last; if (!got.length || got[got.length - 1].frame < m.frame) got.push(m); " \
                  "if (got.length >= n) { clearInterval(t); done(got); } }, 5);"
        before = browser.js_async(collect, 6)
        # four key presses: orbit 20 degrees right, each answered by a frame
        for i in range(4):
            browser.press("d")
            browser.wait(f"{KEYS_LATENCY} >= {i + 1}")
        last = browser.wait("window.realcam.last.offset.orbit == -20 && window.realcam.last")
        assert last["pose"]["x"] > 0.3 and last["pose"]["yaw"] < -15                   # right of the source, turned left
        after_keys = browser.js_async(collect, 6)
        # a drag: 60 px left (orbit -15 deg), 40 px up (tilt up 10 deg)
        browser.drag("#gen", -60, -40)
        last = browser.wait("Math.abs(window.realcam.last.offset.orbit + 35) < 0.5 && "
                            "Math.abs(window.realcam.last.offset.pitch - 10) < 0.5 && window.realcam.last")
        after_drag = browser.js_async(collect, 6)
        d0, d1, d2 = mean_change(before), mean_change(after_keys), mean_change(after_drag)
        assert d1 > d0 + 0.03 and d2 > d1 + 0.03, (d0, d1, d2)        # the generated view moves away from the source
        lat = browser.js("return window.realcam.keyLatency;")
        assert len(lat) == 4 and all(0 < ms < 10000 for ms in lat)
        # bad commands: 400 with a JSON message, shown on the page; the stream goes on
        replies = browser.js_async("const done = arguments[0]; Promise.all(['{\"key\": \"p\"}', 'not json', "
                                   "'{\"preset\": \"nope\"}'].map(b => fetch('/command', {method: 'POST', body: b})"
                                   ".then(r => r.json().then(j => [r.status, j.error])))).then(done);")
        assert [c for c, _ in replies] == [400, 400, 400] and "unknown key" in replies[0][1]
        browser.js_async("const done = arguments[0]; const s = document.getElementById('preset'); "
                         "s.add(new Option('nope', 'nope')); s.value = 'nope'; s.dispatchEvent(new Event('change')); "
                         "setTimeout(done, 500);")
        assert "unknown preset" in browser.js("return document.getElementById('status').textContent;")
        f1 = browser.js("return window.realcam.last.frame;")
        browser.wait(f"window.realcam.last.frame > {f1 + 3}")
        # three viewers at once
        first = browser.s("GET", "/window")
        tabs = [first, browser.new_tab(srv.url), browser.new_tab(srv.url)]
        deadline = time.time() + 60
        while srv.state()["viewers"] < 3:
            assert time.time() < deadline, "three viewers did not connect"
            time.sleep(0.1)
        for tab in tabs:
            browser.switch(tab)
            f = browser.wait("window.realcam.frames >= 1 && window.realcam.last.frame")
            browser.wait(f"window.realcam.last.frame > {f + 2}")
        browser.switch(first)
        browser.screenshot(str(tmp_path / "serve.png"))
        # the stop button ends the stream; the page says so
        browser.js("document.querySelector('button[data-key=q]').click();")
        code, stdout, stderr = srv.finish()
        browser.wait("window.realcam.ended")
    finally:
        srv.kill()
        browser.close()
    assert code == 0 and "the command q" in stdout and "Traceback" not in stderr, stderr
    log = json.load(open(os.path.join(out, "stream_latency.json")))
    cmds = log["commands"]
    assert [c for _, c in cmds[:4]] == ["d"] * 4 and cmds[-1][1] == "q"
    moves = [c for _, c in cmds if c.startswith("move ")]
    assert moves and all("orbit=" in c or "pitch=" in c for c in moves)
    # poses: identity before the first key, orbit -20 between the fourth key and the drag
    first_key, fourth_key, first_move = cmds[0][0], cmds[3][0], next(f for f, c in cmds if c.startswith("move"))
    poses = torch.tensor(log["poses"])
    assert torch.allclose(poses[:first_key], torch.eye(4).expand(first_key, 4, 4), atol=1e-6)
    want = camera.camera_path(orbit=-20 * torch.pi / 180, n=1)[0][0]
    assert torch.allclose(poses[fourth_key:first_move], want.expand(first_move - fourth_key, 4, 4), atol=1e-5)
    assert len(list(data.read_video(os.path.join(out, "stream.mp4")))) == log["frames"]
    assert os.path.getsize(tmp_path / "serve.png") > 1000

# -----------------------------------------------------------------------------
# measurement (not a test): python tests/test_serve.py


def cpu_seconds(root):
    """CPU seconds used so far by process `root` and its descendants (from /proc)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            procs[int(pid)] = (int(f[1]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
        except (OSError, IndexError):
            pass
    tree = {root}
    for _ in range(8):                                      # descendants, level by level
        tree |= {p for p, (pp, _) in procs.items() if pp in tree}
    return sum(procs[p][1] for p in tree if p in procs)


def plain_stream(frames):
    """Plain stream.py (no page): (generator frames/s, end-to-end frames/s)."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(ROOT, "stream.py"), "--frames", str(frames), "--out", d],
                       capture_output=True, text=True, check=True)
        log = json.load(open(os.path.join(d, "stream_latency.json")))
        return log["frames"] / (sum(log["latency_ms"]) / 1000), log["frames"] / log["t"][-1]


def measure(args):
    """Key press -> frame latency over args.presses presses (one viewer); then frames/s of one stream
    in alternating phases of 0 and k viewers (0, 1, 0, 3, 0, ...: the CPU is shared, so each k phase
    is compared with the 0-viewer phases on either side), the CPU time of the viewers' threads, and
    plain stream.py before and after as the baseline."""
    res = dict(plain_before=plain_stream(args.frames))
    browser, out = Browser(), tempfile.mkdtemp()
    srv = Server("--traj", "static", "--out", out)
    try:
        browser.open(srv.url)
        browser.wait("window.realcam.frames >= 3")
        a = srv.state()["frame"] + 1
        for i in range(args.presses):                          # alternate orbit left / right
            browser.press("ad"[i % 2])
            browser.wait(f"{KEYS_LATENCY} >= {i + 1}", timeout=120)
            time.sleep(0.3)
        res["key_ms"] = browser.js("return window.realcam.keyLatency;")
        res["key_frames"] = (a, srv.state()["frame"])           # the generator's time a frame meanwhile: below
        if args.screenshot:
            browser.drag("#gen", 40, -20)
            time.sleep(2)
            browser.screenshot(args.screenshot)
        tabs = [browser.s("GET", "/window")] + [browser.new_tab("about:blank") for _ in range(2)]
        phases = []
        for k in [0] + [k for _ in range(args.reps) for k in (1, 0, 3, 0)]:
            for j, tab in enumerate(tabs):                       # tabs 0..k-1 show the page, the others a blank one
                browser.switch(tab)
                browser.open(srv.url if j < k else "about:blank")
            time.sleep(1.5)                                    # let them connect
            s0, c0, b0 = srv.state(), cpu_seconds(srv.proc.pid), cpu_seconds(browser.driver.pid)
            time.sleep(args.phase_s)
            s1, c1, b1 = srv.state(), cpu_seconds(srv.proc.pid), cpu_seconds(browser.driver.pid)
            phases.append(dict(k=k, a=s0["frame"] + 1, b=s1["frame"], cpu=s1["viewer_cpu_s"] - s0["viewer_cpu_s"],
                               server_cpu=c1 - c0, browser_cpu=b1 - b0))
        srv.post('{"key": "q"}')
        srv.finish()
    finally:
        srv.kill()
        browser.close()
    res["plain_after"] = plain_stream(args.frames)
    report_measure(res, phases, json.load(open(os.path.join(out, "stream_latency.json"))), args)


def report_measure(res, phases, log, args):
    """measure()'s figures from the server's latency log: each phase, the medians by viewer count,
    the key latency; printed, and written to args.json if given."""
    import statistics as st
    res["phases"] = phases
    res["key_frame_ms"] = st.median(log["latency_ms"][res["key_frames"][0]:res["key_frames"][1]])
    for p in phases:
        a, b = p["a"], p["b"]
        p["viewers"] = sorted(set(log["viewers"][a:b]))
        p["ok"] = b - a > 2 and p["viewers"] == [p["k"]]
        p["gen"] = (b - a) / (sum(log["latency_ms"][a:b]) / 1000) if b - a > 2 else 0.0
        p["loop"] = (b - a - 1) / (log["t"][b - 1] - log["t"][a]) if b - a > 2 else 0.0
        p["cpu_ms"] = 1000 * p["cpu"] / max(b - a, 1)
        p["cpu_share"] = p["cpu"] / max(p["server_cpu"], 1e-9)     # of the server process's CPU time
        p["browser_cores"] = p["browser_cpu"] / args.phase_s
        print(f"phase: {p['k']} viewers, frames {a}..{b - 1} (viewers seen {p['viewers']}): generator {p['gen']:.2f} "
              f"frames/s, end to end {p['loop']:.2f}, viewer threads {p['cpu_ms']:.2f} ms CPU a frame = "
              f"{100 * p['cpu_share']:.1f}% of the server's CPU time; browser {p['browser_cores']:.2f} cores")
    for k in (0, 1, 3):
        ks = [i for i, p in enumerate(phases) if p["k"] == k and p["ok"]]
        row = {m: st.median(phases[i][m] for i in ks) for m in ("gen", "loop", "cpu_ms", "cpu_share", "browser_cores")}
        if k:                                                  # against the 0-viewer phases on either side
            for m in ("gen", "loop"):
                row[m + "_ratio"] = st.median(phases[i][m] / st.mean([phases[i - 1][m], phases[i + 1][m]]) for i in ks
                                              if phases[i - 1]["ok"] and i + 1 < len(phases) and phases[i + 1]["ok"])
        res[f"viewers_{k}"] = dict(row, phases=len(ks))
    k = sorted(res["key_ms"])
    res["key_median_ms"], res["key_p95_ms"] = st.median(k), k[round(0.95 * (len(k) - 1))]
    print(f"key press -> first frame with the new camera, {len(k)} presses: median {res['key_median_ms']:.0f} ms, "
          f"p95 {res['key_p95_ms']:.0f} ms (min {k[0]:.0f}, max {k[-1]:.0f}); the generator took a median "
          f"{res['key_frame_ms']:.0f} ms a frame meanwhile")
    for name in ("plain_before", "plain_after"):
        print(f"{name:13s} generator {res[name][0]:.2f} frames/s, end to end {res[name][1]:.2f} frames/s")
    for k in (0, 1, 3):
        r = res[f"viewers_{k}"]
        print(f"{k} viewers     generator {r['gen']:.2f} frames/s, end to end {r['loop']:.2f} frames/s, viewer threads "
              f"{r['cpu_ms']:.2f} ms CPU a frame ({100 * r['cpu_share']:.1f}% of the server's), browser "
              f"{r['browser_cores']:.2f} cores ({r['phases']} phases of {args.phase_s:g} s)"
              + (f"; against the 0-viewer phases beside them: generator x{r['gen_ratio']:.3f}, "
                 f"end to end x{r['loop_ratio']:.3f}" if k else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Measure stream.py --serve on the shipped student in headless Chromium.")
    p.add_argument("--presses", type=int, default=20, help="key presses timed (key down in the page -> frame shown)")
    p.add_argument("--reps", type=int, default=4, help="rounds of the phases 1, 0, 3, 0 viewers")
    p.add_argument("--phase_s", type=float, default=10.0, help="seconds a phase is measured")
    p.add_argument("--frames", type=int, default=200, help="frames of each plain stream.py baseline run")
    p.add_argument("--screenshot", type=str, default="", help="save a screenshot of the page here (PNG)")
    p.add_argument("--json", type=str, default="", help="write the figures here (JSON)")
    measure(p.parse_args())
