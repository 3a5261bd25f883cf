"""
The live view of `python stream.py --serve`: a small HTTP server from the standard library and
one page (serve.html). The page is one more consumer of the stream's frames and one more source
of its commands, beside the mp4 writer and standard input; the stream loop stays in stream.py.

    GET  /          the page
    GET  /events    Server-Sent Events, one JSON message a frame: the source and generated frames
                    (PNG data URLs), the frame index, frames/s, latency, the relative pose, the
                    offsets, the id of the last command applied. Each viewer gets the latest
                    frame: a slow viewer skips frames, it never holds up the stream. At most
                    MAX_VIEWERS at once (a thread each): more get 503.
    GET  /state     the latest message without the images, the keys and presets (JSON)
    POST /command   {"key": "a"} | {"move": {"orbit": 2.5, "pitch": -1.0}} | {"preset": "orbit"}
                    -> 200 {"ok": true, "id": N}, or 400 {"error": "..."} (the stream goes on)
"""
import base64
import json
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import camera
import data

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
MAX_BODY = 4096          # bytes of a command
MAX_DRAIN = 1 << 20      # a longer body up to this is read and dropped before the 400 (closing on unread bytes
                         # resets the connection, and the client may lose the reply); a longer one is not read
STALL_S = 10.0           # seconds a viewer's socket may block a send before its thread gives up
MAX_VIEWERS = 32         # event streams at once (a thread each); more get 503


def png_bytes(rgb):
    """uint8 (H, W, 3) numpy -> PNG file bytes (8-bit RGB, no filter; a few us for a small frame)."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))       # filter byte 0 a row
    chunk = lambda tag, body: struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


def png_url(frame):
    """(3, H, W) in [-1, 1] -> a data: URL of its PNG."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(data.to_uint8(frame))).decode()


class Hub:
    """The latest frame, for every viewer. publish() (the stream loop) stores it and returns at
    once; each viewer thread waits for a frame newer than the one it sent last. A frame's message
    (PNGs, JSON) is made by the first viewer that needs it, never by the stream loop."""

    def __init__(self):
        self.cond = threading.Condition()
        self.latest, self.message, self.closed, self.viewers = None, None, False, 0
        self.cpu_s = 0.0         # CPU time the viewers' threads spent (encoding, sending), all together

    def publish(self, index, src, out, meta):
        with self.cond:
            self.latest, self.message = (index, src, out, meta), None
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def state(self):
        with self.cond:
            return dict(self.latest[3], frame=self.latest[0]) if self.latest else {}

    def next(self, after, timeout):
        """(index, message bytes) of the latest frame if newer than `after`; (after, None) when
        none came within timeout seconds or the stream ended."""
        with self.cond:
            self.cond.wait_for(lambda: self.closed or (self.latest and self.latest[0] > after), timeout)
            if self.latest is None or self.latest[0] <= after:
                return after, None
            latest, message = self.latest, self.message
        if message is None:
            index, src, out, meta = latest
            message = json.dumps(dict(meta, frame=index, src=png_url(src), gen=png_url(out))).encode()
            with self.cond:
                if self.latest is latest:
                    self.message = message
        return latest[0], message


class Handler(BaseHTTPRequestHandler):
    timeout = STALL_S            # socket timeout: a stalled viewer's send fails after it

    def log_message(self, *args):  # quiet: the stream prints its own summary
        pass

    def handle(self):
        """One connection; a client that hangs up or stalls (reset, broken pipe, timeout) ends it
        quietly instead of a traceback on stderr for each."""
        try:
            super().handle()
        except OSError:
            self.close_connection = True

    def reply(self, code, body, ctype="application/json"):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path, srv = urlsplit(self.path).path, self.server
        if path == "/":
            self.reply(200, srv.page, "text/html; charset=utf-8")
        elif path == "/events":
            self.events()
        elif path == "/state":
            self.reply(200, dict(srv.hub.state(), viewers=srv.hub.viewers, viewer_cpu_s=srv.hub.cpu_s,
                                 ended=srv.hub.closed, keys=srv.keys, presets=camera.PRESETS))
        else:
            self.reply(404, {"error": f"no such page: {path}"})

    def do_POST(self):
        path = urlsplit(self.path).path
        if path != "/command":
            return self.reply(404, {"error": f"no such endpoint: {path} (commands go to POST /command)"})
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= MAX_BODY:
            while 0 < n <= MAX_DRAIN and self.rfile.read(min(n, 65536)):
                n -= 65536
            return self.reply(400, {"error": f"a command is a JSON body of 1 to {MAX_BODY} bytes"})
        body = self.rfile.read(n)
        try:
            obj = json.loads(body)
        except ValueError as e:                                 # JSONDecodeError, UnicodeDecodeError
            return self.reply(400, {"error": f"a command must be JSON: {e}"})
        except RecursionError:                                  # [[[[...]]]]: deeper than the parser goes
            return self.reply(400, {"error": "a command must be JSON of a few levels: this one nests too deeply"})
        if self.server.hub.closed:
            return self.reply(409, {"error": "the stream has ended"})
        try:
            ident = self.server.controls.push_json(obj)
        except (ValueError, RecursionError) as e:
            return self.reply(400, {"error": str(e)})
        self.reply(200, {"ok": True, "id": ident})

    def events(self):
        hub = self.server.hub
        with hub.cond:
            full = hub.viewers >= MAX_VIEWERS
            hub.viewers += not full
        if full:
            return self.reply(503, {"error": f"{MAX_VIEWERS} viewers already: try again later"})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            index = -1
            while not hub.closed:
                cpu = time.thread_time()                            # waiting takes none of it
                index, message = hub.next(index, timeout=2.0)
                self.wfile.write(b": waiting\n\n" if message is None else b"data: " + message + b"\n\n")
                with hub.cond:
                    hub.cpu_s += time.thread_time() - cpu
            self.wfile.write(b"event: end\ndata: {}\n\n")
        except OSError:                                             # gone (reset, broken pipe) or stalled (timeout)
            pass
        finally:
            with hub.cond:
                hub.viewers -= 1


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128     # the listen backlog (socketserver's 5 overflowed under a burst of connections:
                                 # the client's SYN was dropped and retried after 1 s)


def start(host, port, hub, controls, keys):
    """Listen on host:port (OSError if it can't) and serve on a background thread. keys: stream.KEYS,
    for the page's labels."""
    server = Server((host, port), Handler)
    server.hub, server.controls = hub, controls
    server.keys = {k: list(v) for k, v in keys.items()}
    with open(PAGE, "rb") as f:
        server.page = f.read()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    """End every viewer's event stream (they get an 'end' event) and stop listening."""
    server.hub.close()
    deadline = time.time() + 2.0
    while server.hub.viewers and time.time() < deadline:      # let the viewers read their 'end' event
        time.sleep(0.01)
    server.shutdown()
    server.server_close()
