"""
Stream a video through the causal student: the same scene, seen from a camera you steer.

    python stream.py --traj orbit                          # a built-in synthetic scene -> out.mp4
    python stream.py --video in.mp4 --traj pan_left --out pan.mp4
    python stream.py --video in.mp4 --traj my_path.json    # per-frame relative 4x4 poses
    python stream.py --video in.mp4 --interactive          # steer from the keyboard while it runs
    printf 'a\\na\\nw\\n' | python stream.py --interactive  # or pipe the commands in

Frames are read one at a time, centre-cropped and resized to the model's resolution, and
generated chunk by chunk with the KV-cached student (model.student_chunk): the source frames of a
chunk are encoded once, the targets take --steps denoising steps, then one t = 0 pass writes
their clean keys and values. The rolling window keeps memory and time per frame flat.

Interactive keys (one a line when piped; single keystrokes in a terminal), applied from the
next chunk on, on top of --traj:
    a / d  orbit left / right (5 deg)     j / l  pan left / right (5 deg)
    w / s  dolly in / out (0.1)            i / k  tilt up / down (3 deg)
    t / g  pedestal up / down (0.1)        z / x  zoom in / out (x1.1)
    r      reset to --traj                 q      stop (the video so far is kept)
"""
import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import replace

import torch

import data
from model import SHIPPED_STUDENT, KVCache, decode_target, load_model, student_chunk

KEYS = {  # key: (component, increment)
    "a": ("orbit", 5.0), "d": ("orbit", -5.0), "j": ("yaw", -5.0), "l": ("yaw", 5.0),
    "i": ("pitch", 3.0), "k": ("pitch", -3.0), "w": ("dz", 0.1), "s": ("dz", -0.1),
    "t": ("dy", -0.1), "g": ("dy", 0.1), "z": ("zoom", math.log(1.1)), "x": ("zoom", -math.log(1.1)),
}


class Controls:
    """Camera offsets steered by commands from standard input, read on a background thread
    (line by line from a pipe; key by key from a terminal, in cbreak mode)."""

    def __init__(self, enabled):
        self.state = dict(orbit=0.0, yaw=0.0, pitch=0.0, dz=0.0, dy=0.0, zoom=0.0)
        self.queue, self.quit, self.log = queue.Queue(), False, []
        if enabled:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        if sys.stdin.isatty():             # a terminal: single keystrokes, no Enter needed
            import atexit
            import termios
            import tty
            fd = sys.stdin.fileno()
            atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, termios.tcgetattr(fd))
            tty.setcbreak(fd)
            while True:
                self.queue.put(sys.stdin.read(1))
        for line in sys.stdin:             # a pipe: whitespace-separated keys
            for key in line.strip().split():
                self.queue.put(key)

    def apply(self, frame):
        """Take the commands that arrived so far; called before each chunk."""
        while not self.queue.empty():
            key = self.queue.get()
            if key == "q":
                self.quit = True
            elif key == "r":
                self.state = {k: 0.0 for k in self.state}
            elif key in KEYS:
                name, inc = KEYS[key]
                self.state[name] += inc
            else:
                continue
            self.log.append((frame, key))

    def pose(self):
        """Offset relative pose (4, 4) and focal scale from the current state."""
        s, deg = self.state, math.pi / 180
        rel, zoom = data.camera_path(yaw=s["yaw"] * deg, pitch=s["pitch"] * deg, orbit=s["orbit"] * deg,
                                     move=(0.0, s["dy"], s["dz"]), zoom=math.exp(s["zoom"]), n=1)
        return rel[0], zoom[0]


def synthetic_source(n, size, seed=2 ** 31 + 123):
    """A built-in video: a held-out synthetic scene seen by a slowly panning camera."""
    g = torch.Generator().manual_seed(seed)
    scene = data.make_scene(seed)
    c2w = data.source_path(n, g)
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    for i in range(n):
        rgb, _ = data.render(scene, c2w[i:i + 1], K[None], torch.tensor([i / data.FPS]), size, size, depth=False)
        yield rgb[0]


@torch.no_grad()
def stream_frames(model, frames, rel_path, zoom_path, steps, controls, seed=0, device="cpu"):
    """The streaming loop: gather a chunk of source frames as they arrive, take the camera
    commands, generate the chunk with the student's KV cache, hand the frames out.
    Yields (source (3, S, S), generated (3, S, S), relative pose (4, 4), seconds a frame)."""
    cfg, S = model.cfg, model.cfg.size
    cache, gen = KVCache(cfg), torch.Generator(device=device).manual_seed(seed)
    K, n, frames = torch.tensor([1.0, 1.0, 0.5, 0.5], device=device), 0, iter(frames)
    while not controls.quit:
        chunk = [f for _, f in zip(range(cfg.chunk), frames)]
        if not chunk:
            return
        t0 = time.perf_counter()
        controls.apply(n)
        m = len(chunk)
        src = torch.stack(chunk)[None].to(device)                            # (1, m, 3, S, S)
        idx = torch.arange(n, n + m).clamp(max=len(rel_path) - 1)
        off, zoff = controls.pose()
        rel = rel_path[idx] @ off                                              # the path, then the user's offset
        Kt = K.expand(m, 4).clone()
        Kt[:, :2] *= (zoom_path[idx] * zoff)[:, None].to(device)
        cam_src, cam_tgt = data.pair_rays(rel[None].to(device), K.expand(1, m, 4), Kt[None], S, S)
        noise = torch.randn((steps, 1, m, 3, S, S), generator=gen, device=device)   # as model.student_sample
        x0 = student_chunk(model, cache, src, cam_src, cam_tgt, torch.arange(n, n + m, device=device), steps, noise)
        out = decode_target(x0, src, cfg)[0].cpu()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / m
        for i in range(m):
            yield src[0, i].cpu(), out[i], rel[i], dt
        n += m


def main():
    p = argparse.ArgumentParser(description="Stream a video through the RealCam-min student with camera control.")
    p.add_argument("--video", type=str, default=None, help="input video (default: a built-in synthetic scene)")
    p.add_argument("--traj", type=str, default="orbit", help=f"preset ({', '.join(data.PRESETS)}) or a JSON file")
    p.add_argument("--traj_frames", type=int, default=48, help="frames a preset takes to play out (then it holds)")
    p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT,
                   help="student checkpoint (default: the shipped one; distill.py writes runs/student/ckpt.pt)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps a chunk (1..trained; default: trained)")
    p.add_argument("--window", type=int, default=None, help="chunks in the rolling KV cache (default: as trained)")
    p.add_argument("--max_frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--out", type=str, default="out.mp4", help="output video: source | generated")
    p.add_argument("--interactive", action="store_true", help="steer the camera from standard input")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    def fail(msg):
        raise SystemExit(f"error: {msg}")

    # model
    try:
        model, ckpt = load_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (make a student with: python distill.py)")
    if "student" not in ckpt:
        fail(f"{args.ckpt} is not a student checkpoint (it is a bidirectional teacher); use distill.py's output")
    trained = ckpt["student"]["steps"]
    steps = args.steps or trained
    if not 1 <= steps <= trained:
        fail(f"--steps must be between 1 and {trained} (the trained number of steps)")
    if args.window is not None:
        model.cfg = replace(model.cfg, window=args.window)
    cfg, S, dev = model.cfg, model.cfg.size, args.device
    # input and trajectory
    try:
        rel_path, zoom_path = data.trajectory(args.traj, args.traj_frames)
    except ValueError as e:
        fail(e)
    if args.video:
        try:
            fps = data.video_fps(args.video)
            frames = data.read_video(args.video, S, args.max_frames)
            first = next(frames)                     # fail early on an unreadable or empty video
        except data.VideoError as e:
            fail(e)
        frames = _chain(first, frames)
    else:
        fps, frames = data.FPS, synthetic_source(args.max_frames or 48, S)
    controls = Controls(args.interactive)
    print(f"streaming {args.video or 'a synthetic scene'} at {fps:.1f} fps through {args.ckpt} "
          f"({S}x{S}, chunk {cfg.chunk}, window {cfg.window or 'all'}, {steps} steps), trajectory {args.traj}"
          + (" + interactive" if args.interactive else ""))

    latencies, poses, n = [], [], 0
    writer = data.VideoWriter(args.out, fps, upscale=max(1, 128 // S))
    try:
        for src, out, rel, dt in stream_frames(model, frames, rel_path, zoom_path, steps, controls, args.seed, dev):
            writer.write(data.side_by_side(src[None], out[None])[0])
            latencies.append(dt)
            poses.append(rel.tolist())
            n += 1
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the frames done so far")
    except data.VideoError as e:
        writer.close()
        fail(e)
    writer.close()
    if n == 0:
        fail("no frames were generated")
    lat = torch.tensor(latencies) * 1000
    log_path = os.path.splitext(args.out)[0] + "_latency.json"
    with open(log_path, "w") as f:
        json.dump(dict(fps_input=fps, frames=n, steps=steps, latency_ms=lat.tolist(), commands=controls.log,
                       poses=poses), f)
    gen_fps = n / (lat.sum().item() / 1000)
    print(f"{n} frames | {gen_fps:.1f} frames/s | latency mean {lat.mean():.1f} ms, p95 {lat.quantile(0.95):.1f} ms | "
          f"real-time factor {gen_fps / fps:.2f}x ({'faster' if gen_fps >= fps else 'slower'} than the input's "
          f"{fps:.1f} fps) -> {args.out}, {log_path}")


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    main()
