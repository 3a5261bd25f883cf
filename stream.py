"""
Stream a video through the causal student: the same scene, seen from a camera you steer.

    python stream.py --traj orbit                            # a built-in synthetic scene -> runs/stream/stream.mp4
    python stream.py --video in.mp4 --traj pan_left --out runs/pan
    python stream.py --video in.mp4 --traj my_path.json      # per-frame relative 4x4 poses
    python stream.py --video in.mp4 --interactive            # steer from the keyboard while it runs
    printf 'a\\na\\n12 w\\n' | python stream.py --interactive  # a script: a key a chunk, or at the frame named
    python stream.py --serve                                 # live in a browser: http://127.0.0.1:8000/
    python stream.py --video in.mp4 --realtime               # the file arrives as a live camera would

Frames are read one at a time, centre-cropped and resized to the model's resolution, and
generated chunk by chunk with the KV-cached student (model.student_chunk): the source frames of a
chunk are encoded once, the targets take --steps denoising steps, then one t = 0 pass writes
their clean keys and values. The rolling window keeps memory and time per frame flat.
One loop (stream_frames) feeds every consumer: the mp4 writer, the latency log and the page of
--serve (serve.py); commands come from a script on stdin, the terminal or the page.

Keys (the terminal, a script on stdin, the page), applied at the next chunk, on top of --traj:
    a / d  orbit left / right (5 deg)     j / l  pan left / right (5 deg)
    w / s  dolly in / out (0.1)            i / k  tilt up / down (3 deg)
    t / g  pedestal up / down (0.1)        z / x  zoom in / out (x1.1)
    r      reset to --traj                 q      stop (the video so far is kept)
"""
import itertools
import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace

import torch

import camera
import data
import render
from common import ArgumentParser, check_args, check_device, check_finite, check_out_dir, default_device, fail, hold_out_dir
import hires
from model import SHIPPED_STUDENT, KVCache, load_model

KEYS = {  # key: (offset component, increment)
    "a": ("orbit", 5.0), "d": ("orbit", -5.0), "j": ("yaw", -5.0), "l": ("yaw", 5.0),
    "i": ("pitch", 3.0), "k": ("pitch", -3.0), "w": ("dz", 0.1), "s": ("dz", -0.1),
    "t": ("dy", -0.1), "g": ("dy", 0.1), "z": ("zoom", math.log(1.1)), "x": ("zoom", -math.log(1.1)),
}
ALL_KEYS = list(KEYS) + ["r", "q"]
# offset components (orbit, yaw, pitch in degrees; dz forward, dy down in scene units; zoom: log focal
# scale) and the largest increment one command from the page may carry
MOVE_LIMITS = dict(orbit=45.0, yaw=45.0, pitch=45.0, dz=1.0, dy=1.0, zoom=1.0)
# where the offsets stay however many commands come: angles wrap around (orbit, yaw) or stop at
# straight up or down (pitch), moves stop at 2 scene units, zoom at camera.MAX_ZOOM either way
WRAP, OFFSET_LIMITS = ("orbit", "yaw"), dict(pitch=90.0, dz=2.0, dy=2.0, zoom=math.log(camera.MAX_ZOOM))
FOV_RANGE = (5.0, 150.0)   # --fov, degrees: beyond, the rays of the 32x32 crop carry no usable camera
VIDEO_SIZE = 128  # --size for a --video (hires.py); the model sees 32x32
SYNTH_PERIOD = 48  # frames of the built-in scene, played forward then backward (a seamless loop)

# -----------------------------------------------------------------------------
# the camera: a trajectory plus offsets steered by commands


def parse_script(text):
    """A command script (stdin from a pipe or a file): lines of keys, optionally led by the frame
    at which they apply ('12 a d'); '#' starts a comment. -> [(frame or None, key)] in order."""
    out, last = [], 0
    for i, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        at = None
        if words and words[0].isdigit():
            at = int(words.pop(0))
            if at < last:
                raise ValueError(f"command script line {i}: frame {at} comes before frame {last} of an earlier line")
            last = at
        for w in words:
            if w not in ALL_KEYS:
                raise ValueError(f"command script line {i}: unknown key '{w}' (keys: {' '.join(ALL_KEYS)}, "
                                 f"optionally after a frame number)")
            out.append((at, w))
    return out


def command_text(cmd):
    """The log's form of a command: 'a', 'move orbit=2.5 pitch=-1', 'preset orbit'."""
    kind, arg = cmd
    if kind == "key":
        return arg
    if kind == "move":
        return "move " + " ".join(f"{k}={v:g}" for k, v in arg.items())
    return f"preset {arg}"


class Controls:
    """The camera of the stream: a trajectory (a preset or a JSON path, played from the frame it
    was chosen, then held) composed with offsets that commands steer. A script is applied in order,
    a key a chunk boundary (or at the frame a line names); live commands (terminal, page) come from
    any thread through push() and all apply at the next chunk boundary. Only apply(), called by the
    stream loop, changes the camera."""

    def __init__(self, rel_path, zoom_path, traj_name="", traj_frames=48, script=()):
        self.offset = dict.fromkeys(MOVE_LIMITS, 0.0)
        self.rel_path, self.zoom_path, self.start, self.traj = rel_path, zoom_path, 0, traj_name
        self.traj_frames, self.script = traj_frames, list(script)
        self.live, self.ids = queue.Queue(), itertools.count(1)
        self.quit, self.log, self.applied = None, [], 0    # quit: why the stream stops (None: it goes on)

    def push(self, cmd):
        """A live command (any thread), applied at the next chunk boundary. Returns its id."""
        i = next(self.ids)
        self.live.put((i, cmd))
        return i

    def push_json(self, obj):
        """A command from the page: {"key": "a"}, {"move": {"orbit": 2.5, "pitch": -1}} (increments in
        MOVE_LIMITS' units) or {"preset": "orbit"}. Returns its id; ValueError on anything else."""
        if not isinstance(obj, dict) or len(obj) != 1:
            raise ValueError('a command is one JSON object: {"key": K}, {"move": {COMPONENT: NUMBER}} or {"preset": NAME}')
        (kind, arg), = obj.items()
        if kind == "key":
            if arg not in ALL_KEYS:
                raise ValueError(f"unknown key {json.dumps(arg)}: one of {' '.join(ALL_KEYS)}")
            return self.push(("key", arg))
        if kind == "move":
            if not isinstance(arg, dict) or not arg:
                raise ValueError(f"move takes an object of increments: {', '.join(MOVE_LIMITS)}")
            for k, v in arg.items():
                if k not in MOVE_LIMITS:
                    raise ValueError(f"unknown move component {json.dumps(k)}: one of {', '.join(MOVE_LIMITS)}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= MOVE_LIMITS[k]:
                    raise ValueError(f"move {k} must be a number within +-{MOVE_LIMITS[k]:g}, not {json.dumps(v)}")
            return self.push(("move", {k: float(v) for k, v in arg.items()}))
        if kind == "preset":
            if arg not in camera.PRESETS:
                raise ValueError(f"unknown preset {json.dumps(arg)}: one of {', '.join(camera.PRESETS)}")
            return self.push(("preset", arg))
        raise ValueError(f'unknown command {json.dumps(kind)}: "key", "move" or "preset"')

    def apply(self, frame):
        """At the chunk boundary before `frame`: every live command that arrived, then the script's
        due commands (those whose frame has come, else its next unnumbered one)."""
        while True:
            try:
                i, cmd = self.live.get_nowait()
            except queue.Empty:
                break
            self._do(frame, cmd)
            self.applied = i
        due = []
        while self.script and self.script[0][0] is not None and self.script[0][0] <= frame:
            due.append(self.script.pop(0)[1])
        if not due and self.script and self.script[0][0] is None:
            due.append(self.script.pop(0)[1])
        for key in due:
            self._do(frame, ("key", key))

    def _do(self, frame, cmd):
        kind, arg = cmd
        if kind == "key" and arg == "q":
            self.quit = f"the command q at frame {frame}"
        elif kind == "key" and arg == "r":
            self.offset = dict.fromkeys(self.offset, 0.0)
        elif kind == "key":
            self.add(*KEYS[arg])
        elif kind == "move":
            for k, v in arg.items():
                self.add(k, v)
        else:                                                   # a preset, played from this frame
            self.rel_path, self.zoom_path = camera.preset_path(arg, self.traj_frames)
            self.start, self.traj = frame, arg
        self.log.append((frame, command_text(cmd)))

    def add(self, name, inc):
        """One offset component moved by inc, kept where it means something (WRAP, OFFSET_LIMITS)."""
        v = self.offset[name] + inc
        if name in WRAP:
            v = v if -180.0 <= v < 180.0 else (v + 180.0) % 360.0 - 180.0
        else:
            v = max(-OFFSET_LIMITS[name], min(OFFSET_LIMITS[name], v))
        self.offset[name] = v

    def camera(self, n, m):
        """Relative poses (m, 4, 4) and focal scales (m,) of frames n..n+m-1: the trajectory, then the offset."""
        idx = (torch.arange(n, n + m) - self.start).clamp(0, len(self.rel_path) - 1)
        s, deg = self.offset, math.pi / 180
        off, zoff = camera.camera_path(yaw=s["yaw"] * deg, pitch=s["pitch"] * deg, orbit=s["orbit"] * deg,
                                       move=(0.0, s["dy"], s["dz"]), zoom=math.exp(s["zoom"]), n=1)
        return self.rel_path[idx] @ off[0], self.zoom_path[idx] * zoff[0]


def read_terminal(controls):
    """Single keystrokes from a terminal (cbreak mode, restored at exit) as live commands; runs on a thread."""
    import atexit
    import termios
    import tty
    fd = sys.stdin.fileno()
    atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, termios.tcgetattr(fd))
    tty.setcbreak(fd)
    while True:
        key = sys.stdin.read(1)
        if key in ALL_KEYS:
            controls.push(("key", key))


def pose_summary(rel, zoom):
    """A relative pose (4, 4) for people: translation (x right, y down, z forward, scene units),
    yaw (right +), pitch (up +), roll (degrees) and the focal scale."""
    R, t, deg = rel[:3, :3], rel[:3, 3], 180 / math.pi
    f = R[:, 2]                                                        # the camera's forward axis
    return dict(x=t[0].item(), y=t[1].item(), z=t[2].item(), yaw=math.atan2(f[0], f[2]) * deg,
                pitch=math.atan2(-f[1], math.hypot(f[0], f[2])) * deg,
                roll=math.atan2(-R[1, 0], R[1, 1]) * deg, zoom=float(zoom))

# -----------------------------------------------------------------------------
# inputs: the built-in scene, a video file, pacing as a live camera


def synthetic_source(size, seed=2 ** 31 + 123, period=SYNTH_PERIOD, info=None):
    """The built-in video, endless: a held-out synthetic scene seen by a slowly moving camera,
    played forward over `period` frames, then backward, and so on (a seamless loop). info['read']
    counts the frames made."""
    g = torch.Generator().manual_seed(seed)
    scene, c2w = render.make_scene(seed), render.source_path(period, g)
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    for i in itertools.count():
        j = i % (2 * period - 2)
        j = min(j, 2 * period - 2 - j)
        rgb, _ = render.render(scene, c2w[j:j + 1], K[None], torch.tensor([j / render.FPS]), size, size, depth=False)
        if info is not None:
            info["read"] += 1
        yield rgb[0]


def paced(frames, fps, info):
    """Frames as a live camera delivers them: frame i arrives i / fps seconds after the first. Each
    request gets the newest frame that has arrived; older ones that arrived while the consumer was
    busy are dropped (info['dropped']). Arrival times go to info['arrivals'] (perf_counter seconds)."""
    frames, t0, i = iter(frames), None, 0
    while True:
        now = time.perf_counter()
        t0 = now if t0 is None else t0
        newest = int((now - t0) * fps)                        # the last frame that has arrived by now
        if newest < i:                                        # none waiting: wait for the next one
            time.sleep(t0 + i / fps - now)
        for _ in range(newest - i):
            if next(frames, None) is None:
                return
            info["dropped"] += 1
            i += 1
        frame = next(frames, None)
        if frame is None:
            return
        info["arrivals"].append(t0 + i / fps)
        i += 1
        yield frame

# -----------------------------------------------------------------------------
# the streaming loop


@torch.no_grad()
def stream_frames(model, frames, controls, steps, seed=0, device="cpu", fx=1.0):
    """The streaming loop, one code path for every consumer: gather a chunk of source frames as they
    arrive, take the camera commands, generate the chunk with the student's KV cache, hand the frames
    out. fx: focal length / image width of the input (source and target rays). Frames larger than
    the model's size come out at their size (hires.py): the network sees them at its own. Yields
    (source (3, R, R), generated (3, R, R), relative pose (4, 4), focal scale, seconds a frame)."""
    cfg, S = model.cfg, model.cfg.size
    cache, gen = KVCache(cfg), torch.Generator(device=device).manual_seed(seed)
    K, n, frames = torch.tensor([fx, fx, 0.5, 0.5]), 0, iter(frames)
    while True:
        chunk = [f for _, f in zip(range(cfg.chunk), frames)]
        if not chunk:
            return
        t0 = time.perf_counter()
        controls.apply(n)
        if controls.quit:
            return
        m = len(chunk)
        src = torch.stack(chunk)[None]                                         # (1, m, 3, R, R)
        rel, zoom = controls.camera(n, m)                                      # (m, 4, 4), (m,)
        Kt = K.expand(m, 4).clone()
        Kt[:, :2] *= zoom[:, None]
        noise = torch.randn((steps, 1, m, 3, S, S), generator=gen, device=device)   # as model.student_sample
        out = hires.chunk(model, cache, src.to(device), rel[None].to(device), K.expand(1, m, 4).to(device),
                          Kt[None].to(device), torch.arange(n, n + m, device=device), steps, noise)[0][0].cpu()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / m
        for i in range(m):
            yield src[0, i], out[i], rel[i], zoom[i].item(), dt
        n += m

# -----------------------------------------------------------------------------
# command line


def parser():
    p = ArgumentParser(description="Stream a video through the RealCam-min student with camera control.")
    p.add_argument("--video", type=str, default=None,
                   help="input video file (default: a built-in synthetic scene, 8 frames/s)")
    p.add_argument("--traj", type=str, default="orbit", help=f"preset ({', '.join(camera.PRESETS)}) or a JSON file")
    p.add_argument("--traj_frames", type=int, default=48, help="frames a preset takes to play out (then it holds)")
    p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT,
                   help="student checkpoint (default: the shipped checkpoints/student_small.pt; "
                        "distill.py writes runs/student/ckpt.pt)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps a chunk (1..trained; default: the checkpoint's stream_steps, the fewest that "
                        "held its quality when it was released, else trained)")
    p.add_argument("--window", type=int, default=None,
                   help="chunks in the rolling KV cache (0 = all; default: as trained)")
    p.add_argument("--frames", type=int, default=None,
                   help="stop after this many frames (default: the whole video; 48 of the built-in scene; "
                        "no limit with --serve)")
    p.add_argument("--size", type=int, default=None,
                   help=f"side of the output, pixels, at least the model's: above it, the warp head samples the input "
                        f"at this size (hires.py) (default: {VIDEO_SIZE} for --video; the model's for the built-in scene, "
                        f"whose renderer costs more than the model at {VIDEO_SIZE})")
    p.add_argument("--fov", type=float, default=2 * math.degrees(math.atan(0.5)),
                   help="horizontal field of view of the input's square crop, degrees (default 53.13: "
                        "focal length = crop width; the built-in scene's); fx = 0.5 / tan(fov / 2)")
    p.add_argument("--out", type=str, default="runs/stream",
                   help="output folder (created if missing): stream.mp4 (source | generated), stream_latency.json")
    p.add_argument("--interactive", action="store_true",
                   help="commands from stdin: keys from a terminal, or a script from a pipe or a file")
    p.add_argument("--realtime", action="store_true",
                   help="pace the input at its frame rate as a live camera; drop frames that arrive while busy")
    p.add_argument("--serve", action="store_true",
                   help="serve a live page (view and steer in a browser); the input loops until Ctrl-C or q")
    p.add_argument("--host", type=str, default="127.0.0.1", help="--serve: address to listen on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000, help="--serve: TCP port (0: any free one)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    return p


def parse_args():
    """The flags, with everything that can be checked before loading anything."""
    args = parser().parse_args()
    check_args(args, positive=("frames", "steps", "traj_frames", "size"), nonneg=("window",))
    if args.size is not None and not (args.size % 2 == 0 and args.size <= 1024):
        fail(f"--size is the output's side in pixels, even (H.264) and at most 1024, not {args.size}")
    check_finite(args, ("fov",))
    if not FOV_RANGE[0] <= args.fov <= FOV_RANGE[1]:
        fail(f"--fov is the horizontal field of view in degrees, between {FOV_RANGE[0]:g} and {FOV_RANGE[1]:g} (a focal "
             f"length of 5.7 to 0.13 crop widths; the shipped models know 45 to 64), not {args.fov:g}")
    if not 0 <= args.port <= 65535:
        fail(f"--port must be between 0 and 65535, not {args.port}")
    if args.serve and args.window == 0:
        fail("--window 0 keeps every chunk: memory would grow without bound in an endless --serve stream")
    check_device(args.device)
    check_out_dir(args.out)
    return args


def make_controls(args):
    """The camera: --traj, and with --interactive from a pipe or a file, the script read to its end."""
    try:
        rel_path, zoom_path = camera.trajectory(args.traj, args.traj_frames)
    except ValueError as e:
        fail(e)
    script = []
    if args.interactive and not sys.stdin.isatty():
        try:
            script = parse_script(sys.stdin.read())
        except (ValueError, UnicodeDecodeError) as e:
            fail(e)
    return Controls(rel_path, zoom_path, args.traj, args.traj_frames, script)


def open_input(args, S):
    """-> (frame rate, frames at S x S, info dict of what was read); fails early on an unreadable input."""
    info = dict(read=0, declared=0, exact=True, loops=0, dropped=0, arrivals=deque())
    try:
        if args.video:
            fps, info["declared"], info["exact"] = data.probe_video(args.video)
            frames = data.video_source(args.video, S, info, loop=args.serve)
            first = next(frames)                                 # an empty or broken file fails here
            frames = itertools.chain([first], frames)
        else:
            fps, frames = render.FPS, synthetic_source(S, info=info)
    except data.VideoError as e:
        fail(e)
    return fps, (paced(frames, fps, info) if args.realtime else frames), info


def load_student(args):
    """-> (model, trained steps, default steps), or one error line with the right hint."""
    try:
        model, ckpt = load_model(args.ckpt, args.device)
    except FileNotFoundError:
        if os.path.abspath(args.ckpt) == SHIPPED_STUDENT:
            fail(f"the shipped student is missing: {SHIPPED_STUDENT} (restore it with git checkout -- "
                 f"{SHIPPED_STUDENT}, or make one with python distill.py and pass --ckpt runs/student/ckpt.pt)")
        fail(f"checkpoint not found: {args.ckpt} (python distill.py writes runs/student/ckpt.pt; "
             "leave out --ckpt for the shipped student)")
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        fail(f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (--ckpt takes a student checkpoint written "
             "by distill.py; leave it out for the shipped student)")
    if "student" not in ckpt:
        fail(f"{args.ckpt} is not a student checkpoint (it is a bidirectional teacher); use distill.py's output")
    trained = ckpt["student"]["steps"]
    return model, trained, min(trained, ckpt["student"].get("stream_steps", trained))

# -----------------------------------------------------------------------------
# the run: every generated frame to the mp4, the latency log and the page


class FrameLog:
    """The log's per-frame lists, spooled to an unnamed temporary file a line a frame so that memory
    stays flat however long the stream (in memory: 1 KB a frame, 9 MB at frame 10,000); dump()
    writes them out as the lists of stream_latency.json."""
    KEYS = ("latency_ms", "poses", "zoom", "t", "viewers", "delay_ms")

    def __init__(self):
        self.file, self.n, self.recent = tempfile.TemporaryFile("w+"), 0, deque(maxlen=17)

    def add(self, **row):
        self.file.write(json.dumps([row.get(k) for k in self.KEYS]) + "\n")
        self.n += 1
        self.recent.append(row["t"])

    def column(self, key):
        """The values of one key, frame by frame (read back from the file)."""
        i = self.KEYS.index(key)
        self.file.seek(0)
        for line in self.file:
            v = json.loads(line)[i]
            if v is not None:
                yield v

    def dump(self, path, head):
        """stream_latency.json: the dict head, then each key's list, written a value at a time."""
        with open(path, "w") as f:
            f.write(json.dumps(head)[:-1])
            for k in self.KEYS:
                f.write(f', "{k}": [')
                for j, v in enumerate(self.column(k)):
                    f.write((", " if j else "") + json.dumps(v))
                f.write("]")
            f.write("}")


def record(args, model, frames, controls, steps, info, writer, hub):
    """Stream until the input ends, --frames, q or Ctrl-C; every frame to the writer, the log and
    the page (hub). Returns (the log (FrameLog), why it stopped, the damage if the input broke, the
    start time)."""
    log = FrameLog()
    limit = args.frames or (None if args.serve or args.video else SYNTH_PERIOD)
    stop, damaged, fx = None, None, 0.5 / math.tan(math.radians(args.fov) / 2)
    t_start = time.perf_counter()
    try:
        for src, out, rel, zoom, dt in stream_frames(model, frames, controls, steps, args.seed, args.device, fx):
            writer.write(data.side_by_side(src[None], out[None])[0])
            n, now = log.n, time.perf_counter()
            log.add(latency_ms=dt * 1000, poses=rel.tolist(), zoom=zoom, t=now - t_start,
                    viewers=hub.viewers if hub else 0,
                    delay_ms=(now - info["arrivals"].popleft()) * 1000 if args.realtime else None)
            if hub:
                k = min(n, 16)                                      # frames/s over the last 16 frames
                rate = k / (now - t_start - log.recent[-1 - k]) if k else 0.0
                hub.publish(n, src, out, dict(fps=rate, latency_ms=dt * 1000, pose=pose_summary(rel, zoom),
                                              offset=dict(controls.offset), traj=controls.traj, cmd=controls.applied,
                                              viewers=hub.viewers))
            if limit and n + 1 >= limit:
                stop = f"--frames {limit} reached" if args.frames else f"the built-in scene's {limit} frames"
                break
        else:
            stop = controls.quit or "the end of the video"
    except KeyboardInterrupt:
        stop = "interrupted (Ctrl-C): keeping the frames done so far"
    except data.VideoError as e:
        stop, damaged = "the input broke", str(e)
    return log, stop, damaged, t_start


def report(args, flog, info, steps, fps, stop, damaged, hub, controls, t_start, mp4):
    """What was read and why it stopped, the latency log (stream_latency.json) and the speed;
    one error line if nothing was generated or the input broke."""
    n = flog.n
    if args.video:
        loops = f" (restarted {info['loops']} times)" if info["loops"] else ""
        print(f"read {info['read']} frames of {args.video}{loops}; stopped: {stop}")
    else:
        print(f"stopped: {stop}")
    if n == 0:
        fail(f"no frames were generated ({damaged or stop})")
    lat, wall = torch.tensor(list(flog.column("latency_ms"))), time.perf_counter() - t_start
    log = dict(fps_input=fps, frames=n, frames_read=info["read"], steps=steps, fov=args.fov, stop=stop,
               damaged=damaged, wall_s=wall, viewer_cpu_s=hub.cpu_s if hub else 0.0, commands=controls.log)
    if args.realtime:
        d = torch.tensor(list(flog.column("delay_ms")))
        late = int((d > 1000 / fps).sum())
        log.update(dropped=info["dropped"], late=late)
        print(f"live input at {fps:.1f} fps: {n} frames generated, {info['dropped']} dropped (they arrived while the "
              f"generator was busy), {late} late (out more than a frame interval after arriving); delay from arrival "
              f"to output mean {d.mean():.1f} ms, p95 {d.quantile(0.95):.1f} ms")
    log_path = os.path.join(args.out, "stream_latency.json")
    flog.dump(log_path, log)
    gen_fps = n / (lat.sum().item() / 1000)
    print(f"{n} frames | {gen_fps:.1f} frames/s ({n / wall:.1f} end to end) | latency mean {lat.mean():.1f} ms, "
          f"p95 {lat.quantile(0.95):.1f} ms | real-time factor {gen_fps / fps:.2f}x "
          f"({'faster' if gen_fps >= fps else 'slower'} than the input's {fps:.1f} fps) -> {mp4}, {log_path}")
    if damaged:
        fail(f"{damaged}; the {n} frames generated before it are kept in {mp4}")


def main():
    args = parse_args()
    controls = make_controls(args)
    hold_out_dir(args.out)                                   # refused if another live run writes there
    hub = server = None
    if args.serve:                                           # bind first: a busy port fails before loading
        import serve
        hub = serve.Hub()
        try:
            server = serve.start(args.host, args.port, hub, controls, KEYS)
        except OSError as e:
            fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    model, trained, default = load_student(args)
    steps = default if args.steps is None else args.steps
    if steps > trained:
        fail(f"--steps must be between 1 and {trained} (the trained number of steps)")
    if args.window is not None:
        model.cfg = replace(model.cfg, window=args.window)
    cfg, S = model.cfg, model.cfg.size
    R = args.size or (VIDEO_SIZE if args.video else S)
    if R < S:
        fail(f"--size must be at least the model's size, {S} (the output is rendered at or above it)")
    if R > S and not cfg.warp:
        fail(f"--size above the model's {S} needs a student with the warp head (this one has none)")
    fps, frames, info = open_input(args, R)
    if args.interactive and sys.stdin.isatty():
        threading.Thread(target=read_terminal, args=(controls,), daemon=True).start()
    print(f"streaming {args.video or 'the built-in scene'} at {fps:.1f} fps through {args.ckpt} ({S}x{S}"
          f"{f', output {R}x{R}' if R > S else ''}, chunk {cfg.chunk}, "
          f"window {cfg.window or 'all'}, {steps} steps, fov {args.fov:.2f} deg), trajectory {args.traj}"
          + (" + script" if controls.script else " + keys" if args.interactive else "")
          + (", paced as a live camera" if args.realtime else ""), flush=True)
    if server:
        print(f"serving http://{args.host}:{server.server_address[1]}/  (Ctrl-C or q stops)", flush=True)
    mp4 = os.path.join(args.out, "stream.mp4")
    writer = data.VideoWriter(mp4, fps, upscale=max(1, 128 // R))
    try:
        flog, stop, damaged, t_start = record(args, model, frames, controls, steps, info, writer, hub)
    finally:
        writer.close()
        if server:
            serve.stop(server)
    report(args, flog, info, steps, fps, stop, damaged, hub, controls, t_start, mp4)


if __name__ == "__main__":
    main()
