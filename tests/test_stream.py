"""stream.py: end to end on a generated video, from another directory, presets, command scripts,
live pacing, the field of view, every bad input through the real CLI, Ctrl-C, and equality with
the student's offline generation."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch

import camera
import data
import render
import stream
from conftest import ROOT
from model import PRESETS, load_model, save_checkpoint, student_sample
from test_model import random_model

TINY = replace(PRESETS["tiny"], window=3)
DEG = math.pi / 180


@pytest.fixture(scope="module", autouse=True)
def threads():
    """Honour OMP_NUM_THREADS in this process (conftest asks for 2 threads): on a CPU shared with other
    jobs, two spinning threads made the tiny model's streams here 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", n)))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("student")
    m = random_model(TINY)
    path = str(d / "student.pt")
    save_checkpoint(path, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0,
                    student=dict(steps=4, stage="selfforcing"))
    teacher = str(d / "teacher.pt")
    save_checkpoint(teacher, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0)
    video = str(d / "in.mp4")
    data.write_video(video, render.render_clip(9, 7, 40, 40)["src"], fps=12)
    return dict(ckpt=path, teacher=teacher, video=video, dir=d)


def read_log(out):
    return json.load(open(os.path.join(out, "stream_latency.json")))


def test_stream_end_to_end(script, student, tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(os.path.join(out, ".lock"), "w") as f:                # left by a run that was killed: taken over
        f.write(str(gone.pid))
    r = script("stream.py", "--ckpt", student["ckpt"], "--video", student["video"], "--traj", "pan_left", "--out", out)
    assert "7 frames" in r.stdout and "real-time factor" in r.stdout
    assert "read 7 frames" in r.stdout and "the end of the video" in r.stdout
    mp4 = os.path.join(out, "stream.mp4")
    assert abs(data.video_fps(mp4) - 12) < 1e-6
    frames = list(data.read_video(mp4))
    assert len(frames) == 7
    H, W = frames[0].shape[1:]
    assert W > 2 * H - 16 and W < 2 * H + 16                      # source | generated, side by side
    assert H == stream.VIDEO_SIZE                                  # a video comes out at 128 (hires.py)
    log = read_log(out)
    assert len(log["latency_ms"]) == 7 and log["steps"] == 4 and log["frames_read"] == 7
    assert sorted(os.listdir(out)) == ["stream.mp4", "stream_latency.json"]      # the lock went with the run
    # without --video: the built-in synthetic scene
    r = script("stream.py", "--ckpt", student["ckpt"], "--frames", 3, "--steps", 1, "--out", str(tmp_path / "s"))
    assert "3 frames" in r.stdout and "--frames 3 reached" in r.stdout
    assert read_log(str(tmp_path / "s"))["frames_read"] == 3
    # a video shorter than --frames: said so, exit 0 (the file is whole)
    r = script("stream.py", "--ckpt", student["ckpt"], "--video", student["video"], "--frames", 50, "--steps", 1,
               "--out", out)
    assert "read 7 frames" in r.stdout and "the end of the video" in r.stdout and "7 frames |" in r.stdout
    # another output size: 48 (written at twice that, as every output under 128)
    r = script("stream.py", "--ckpt", student["ckpt"], "--video", student["video"], "--size", 48, "--steps", 1,
               "--out", out)
    assert "output 48x48" in r.stdout and next(data.read_video(os.path.join(out, "stream.mp4"))).shape[1] == 96


def test_default_steps_are_the_checkpoints_stream_steps(script, student, tmp_path):
    """A release records the fewest steps that held its quality (student.stream_steps): stream.py
    uses them by default, --steps still goes up to the trained number, and a checkpoint without
    the field streams at its trained steps (test_stream_end_to_end)."""
    ck = torch.load(student["ckpt"], weights_only=True)
    ck["student"]["stream_steps"] = 2
    path = str(tmp_path / "released.pt")
    torch.save(ck, path)
    script("stream.py", "--ckpt", path, "--frames", 2, "--out", str(tmp_path / "a"))
    assert read_log(str(tmp_path / "a"))["steps"] == 2
    script("stream.py", "--ckpt", path, "--frames", 2, "--steps", 4, "--out", str(tmp_path / "b"))
    assert read_log(str(tmp_path / "b"))["steps"] == 4


def test_runs_from_another_directory(tmp_path):
    """The default (shipped) checkpoint is found from anywhere; outputs go to --out under the working directory."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "stream.py"), "--frames", "2", "--steps", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(data.read_video(str(tmp_path / "runs" / "stream" / "stream.mp4")))) == 2
    assert read_log(str(tmp_path / "runs" / "stream"))["frames"] == 2


def run_inprocess(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["stream.py", *map(str, argv)])
    stream.main()


@pytest.mark.parametrize("traj", camera.PRESETS)
def test_every_preset(monkeypatch, student, tmp_path, traj):
    out = str(tmp_path / "p")
    run_inprocess(monkeypatch, "--ckpt", student["ckpt"], "--traj", traj, "--frames", 3, "--steps", 1,
                  "--traj_frames", 3, "--out", out)
    log = read_log(out)
    want, zoom = camera.preset_path(traj, 3)
    assert torch.allclose(torch.tensor(log["poses"]), want, atol=1e-5)
    assert torch.allclose(torch.tensor(log["zoom"]), zoom, atol=1e-6)


def test_script_commands_apply_in_order_at_chunk_boundaries(script, student, tmp_path):
    """A piped script: a key a chunk boundary (chunk = 1 frame here), or at the frame a line names."""
    out = str(tmp_path / "i")
    script("stream.py", "--ckpt", student["ckpt"], "--traj", "static", "--frames", 6, "--steps", 1,
           "--interactive", "--out", out, stdin="a\na\nd\nq\n")
    log = read_log(out)
    assert log["commands"] == [[0, "a"], [1, "a"], [2, "d"], [3, "q"]] and log["frames"] == 3
    orbit = lambda deg: camera.camera_path(orbit=deg * DEG, n=1)[0][0]
    want = torch.stack([orbit(5), orbit(10), orbit(5)])
    assert torch.allclose(torch.tensor(log["poses"]), want, atol=1e-5)
    assert "the command q at frame 3" in log["stop"]
    # numbered lines: at the frame named (all keys of the line), unnumbered ones follow one a frame
    script("stream.py", "--ckpt", student["ckpt"], "--traj", "static", "--frames", 8, "--steps", 1,
           "--interactive", "--out", out, stdin="# a script\n2 a\n5 w z\nd\n")
    log = read_log(out)
    assert log["commands"] == [[2, "a"], [5, "w"], [5, "z"], [6, "d"]] and log["frames"] == 8
    poses, zoom = torch.tensor(log["poses"]), torch.tensor(log["zoom"])
    move = lambda deg, dz: camera.camera_path(orbit=deg * DEG, move=(0.0, 0.0, dz), n=1)[0][0]
    want = [torch.eye(4)] * 2 + [move(5, 0)] * 3 + [move(5, 0.1), move(0, 0.1), move(0, 0.1)]
    assert torch.allclose(poses, torch.stack(want), atol=1e-5)
    assert torch.allclose(zoom, torch.tensor([1.0] * 5 + [1.1] * 3))


def test_controls_commands_from_the_page():
    """The page's commands (JSON): a preset plays from the frame it is chosen, moves add up, reset."""
    rel, zoom = camera.preset_path("static", 4)
    c = stream.Controls(rel, zoom, "static", traj_frames=4)
    assert c.push_json({"move": {"orbit": 2.5, "pitch": -1}}) == 1
    c.push_json({"preset": "pan_left"})
    c.apply(5)
    assert c.offset["orbit"] == 2.5 and c.offset["pitch"] == -1 and c.applied == 2
    got, _ = c.camera(5, 6)
    off = camera.camera_path(orbit=2.5 * DEG, pitch=-DEG, n=1)[0][0]
    want = camera.preset_path("pan_left", 4)[0][torch.tensor([0, 1, 2, 3, 3, 3])] @ off
    assert torch.allclose(got, want, atol=1e-6)
    c.push_json({"key": "r"})
    c.apply(6)
    assert all(v == 0 for v in c.offset.values()) and c.log[-1] == (6, "r")
    for bad in [[], {"key": "p"}, {"key": "a", "preset": "orbit"}, {"move": {"orbit": float("nan")}},
                {"move": {"orbit": 90}}, {"move": {"roll": 1}}, {"move": {"dz": True}}, {"move": {}},
                {"preset": "../etc/passwd"}, {"jump": 1}]:
        with pytest.raises(ValueError):
            c.push_json(bad)
    assert c.live.empty()


def test_offsets_stay_bounded(script, student, tmp_path):
    """However many commands come, the camera stays where it means something: angles wrap (orbit,
    yaw) or stop (pitch), moves and zoom stop at their limits (7,500 z keys overflowed math.exp)."""
    rel, zoom = camera.preset_path("static", 4)
    c = stream.Controls(rel, zoom, "static", traj_frames=4)
    for _ in range(800):
        c.push_json({"move": {"zoom": 1.0, "orbit": 45, "pitch": 45, "dz": 1.0, "dy": -1.0}})
    c.apply(0)
    got, z = c.camera(0, 1)
    assert c.offset["zoom"] == math.log(camera.MAX_ZOOM) and z.item() == pytest.approx(camera.MAX_ZOOM)
    assert c.offset["orbit"] == 0 and c.offset["pitch"] == 90                   # 800 x 45 degrees: 100 turns
    assert c.offset["dz"] == 2 and c.offset["dy"] == -2 and torch.isfinite(got).all()
    for _ in range(9):
        c.push_json({"move": {"orbit": -45}})
    c.apply(1)
    assert c.offset["orbit"] == -45                                    # 0 - 405 wraps to -45
    out = str(tmp_path / "z")
    script("stream.py", "--ckpt", student["ckpt"], "--traj", "static", "--frames", 2, "--steps", 1,
           "--interactive", "--out", out, stdin="0 " + "z " * 7500 + "\n1 " + "x " * 7500 + "\n")
    log = read_log(out)
    assert log["zoom"] == pytest.approx([camera.MAX_ZOOM, 1 / camera.MAX_ZOOM]) and len(log["commands"]) == 15000


def test_fov_sets_the_rays(student):
    """--fov: fx = 0.5 / tan(fov / 2) for the source and target rays, as in the offline sampler."""
    model, _ = load_model(student["ckpt"])
    clip = render.render_clip(4, 5, 16, 16, *camera.preset_path("orbit_left", 5))
    fx = 0.5 / math.tan(70 * DEG / 2)
    controls = stream.Controls(clip["rel"], torch.ones(5))
    got = torch.stack([o for _, o, _, _, _ in stream.stream_frames(model, list(clip["src"]), controls, 2, 3, fx=fx)])
    K = torch.tensor([fx, fx, 0.5, 0.5]).expand(1, 5, 4)
    cs, ct = camera.pair_rays(clip["rel"][None], K, K, 16, 16)
    ref = student_sample(model, clip["src"][None], cs, ct, 2, generator=torch.Generator().manual_seed(3))[0]
    assert (got - ref).abs().max() < 1e-5
    controls = stream.Controls(clip["rel"], torch.ones(5))
    default = torch.stack([o for _, o, _, _, _ in stream.stream_frames(model, list(clip["src"]), controls, 2, 3)])
    assert (got - default).abs().max() > 1e-3                     # the field of view matters


def test_paced_input_drops_frames_of_a_busy_consumer():
    info = dict(dropped=0, arrivals=[])
    t0 = time.perf_counter()
    got = list(stream.paced(range(1, 11), 20.0, info))          # a fast consumer: nothing dropped, at 20 fps
    assert time.perf_counter() - t0 >= 9 / 20 and got == list(range(1, 11)) and info["dropped"] == 0
    info = dict(dropped=0, arrivals=[])
    got = []
    for f in stream.paced(range(1, 21), 100.0, info):           # busy 30 ms a frame at 100 fps
        got.append(f)
        time.sleep(0.03)
    assert len(got) + info["dropped"] == 20 and info["dropped"] >= 10
    assert got == sorted(got) and got[0] == 1 and len(info["arrivals"]) == len(got)


def test_realtime_reports_dropped_frames(script, student, tmp_path):
    video = str(tmp_path / "fast.mp4")
    data.write_video(video, render.render_clip(3, 24, 16, 16)["src"], fps=200)
    out = str(tmp_path / "rt")
    r = script("stream.py", "--ckpt", student["ckpt"], "--video", video, "--realtime", "--steps", 4, "--out", out)
    log = read_log(out)
    assert log["frames"] + log["dropped"] == 24 and log["dropped"] > 0 and len(log["delay_ms"]) == log["frames"]
    assert f"{log['dropped']} dropped" in r.stdout and "late" in r.stdout


def test_streaming_equals_offline_generation(student):
    model, _ = load_model(student["ckpt"])
    clip = render.render_clip(4, 5, 16, 16, *camera.preset_path("orbit_left", 5))
    controls = stream.Controls(clip["rel"], torch.ones(5))
    got = torch.stack([o for _, o, _, _, _ in stream.stream_frames(model, list(clip["src"]), controls, 3, seed=7)])
    K = torch.tensor([1.0, 1.0, 0.5, 0.5]).expand(1, 5, 4)
    cs, ct = camera.pair_rays(clip["rel"][None], K, K, 16, 16)
    ref = student_sample(model, clip["src"][None], cs, ct, 3, generator=torch.Generator().manual_seed(7))[0]
    assert (got - ref).abs().max() < 1e-5


def bad_files(d, student):
    """Damaged inputs for the bad-input table."""
    import av
    import imageio.v3 as iio
    clip = render.render_clip(9, 20, 40, 40)["src"]
    (d / "junk.mp4").write_bytes(os.urandom(3000))
    (d / "empty.mp4").write_bytes(b"")
    (d / "bad.json").write_text("[[1, 2]")
    (d / "random.pt").write_bytes(os.urandom(5000))
    (d / "afile").write_text("not a folder")
    iio.imwrite(str(d / "still.png"), data.to_uint8(clip[0]))
    for ext in ("avi", "mkv"):      # cut in half: an AVI's header says 20 frames; Matroska has a duration
        with av.open(str(d / f"whole.{ext}"), "w") as c:
            s = c.add_stream("mjpeg", rate=12)
            s.width, s.height, s.pix_fmt = 40, 40, "yuvj420p"
            for f in clip:
                for p in s.encode(av.VideoFrame.from_ndarray(data.to_uint8(f), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        b = (d / f"whole.{ext}").read_bytes()
        (d / f"cut.{ext}").write_bytes(b[:len(b) // 2])
    far = lambda t: [[[1, 0, 0, t], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]]
    (d / "far.json").write_text(json.dumps(far(1e6)))
    (d / "far300.json").write_text(json.dumps(far(1e300)))
    (d / "zoom.json").write_text(json.dumps({"poses": far(0), "zoom": [1e308]}))
    (d / "deep.json").write_text("[" * 3000 + "]" * 3000)
    (d / "busy").mkdir()                                          # held by a live run: this process
    (d / "busy" / ".lock").write_text(str(os.getpid()))


BAD = [  # (arguments, stdin, what the one error line says); {d}: a folder of damaged files, {ckpt}: a tiny student
    (["--steps", "0"], None, "--steps must be at least 1, got 0"),
    (["--steps", "9"], None, "--steps must be between 1 and 4"),
    (["--window", "-1"], None, "--window must be non-negative"),
    (["--frames", "0"], None, "--frames must be at least 1"),
    (["--traj_frames", "0"], None, "--traj_frames must be at least 1"),
    (["--fov", "180"], None, "--fov is the horizontal field of view"),
    (["--size", "49"], None, "--size is the output's side in pixels, even"),
    (["--size", "8"], None, "--size must be at least the model's size, 16"),
    (["--device", "gpu0"], None, "--device gpu0: use cpu, cuda or cuda:N"),
    (["--frames", "x"], None, "argument --frames: invalid int value"),
    (["--device", "cuda:99"], None, "--device cuda:99"),
    (["--out", "{d}/afile"], None, "is a file; --out names a folder"),
    (["--ckpt", "{d}/random.pt"], None, "cannot load checkpoint"),
    (["--ckpt", "{d}/missing.pt"], None, "checkpoint not found"),
    (["--ckpt", "{teacher}"], None, "not a student checkpoint"),
    (["--video", "{d}/missing.mp4"], None, "video not found"),
    (["--video", "{d}/junk.mp4"], None, "cannot read video"),
    (["--video", "{d}/empty.mp4"], None, "empty.mp4"),
    (["--video", "{d}/still.png"], None, "is an image (png), not a video"),
    (["--video", "{d}/cut.avi"], None, "ended after 5 of the 20 frames its header declares"),
    (["--video", "{d}/cut.mkv"], None, "of the about 20 frames its header's duration holds"),
    (["--video", "{d}"], None, "is a folder, not a video file"),
    (["--ckpt", "{d}"], None, "is a folder, not a checkpoint file"),
    (["--ckpt", "{d}/bad.json"], None, "not a file torch.load reads (a text file)"),
    (["--traj", "{d}/far.json"], None, "frame 0 moves the camera 1e+06 scene units from the source; at most 10"),
    (["--traj", "{d}/far300.json"], None, "frame 0 moves the camera 1e+300 scene units"),
    (["--traj", "{d}/zoom.json"], None, "frame 0 has zoom 1e+308: a zoom (focal length multiplier) is between 0.1 and 10"),
    (["--traj", "{d}/deep.json"], None, "cannot read trajectory"),
    (["--fov", "1e-9"], None, "between 5 and 150"),
    (["--fov", "nan"], None, "--fov must be a finite number"),
    (["--out", "{d}/x.mp4"], None, "x.mp4 names a file; --out names a folder"),
    (["--out", "{d}/busy"], None, "busy is in use by another run (process"),
    (["--traj", "spin"], None, "unknown trajectory 'spin'"),
    (["--traj", "{d}/bad.json"], None, "bad.json"),
    (["--port", "70000", "--serve"], None, "--port must be between 0 and 65535"),
    (["--serve", "--window", "0"], None, "memory would grow without bound"),
    (["--interactive"], "a\np\n", "line 2: unknown key 'p'"),
    (["--interactive"], "5 a\n2 d\n", "line 2: frame 2 comes before frame 5"),
]


@pytest.mark.parametrize("args,stdin,message", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input(student, tmp_path_factory, args, stdin, message):
    """Through the real entry point: exit code 1, one 'error:' line on stderr, no traceback."""
    d = student["dir"] / "bad"
    if not d.exists():
        d.mkdir()
        bad_files(d, student)
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a.format(d=d, teacher=student["teacher"]) for a in args]
    out = str(tmp_path_factory.mktemp("bad") / "o")
    argv = ["--ckpt", student["ckpt"], "--out", out, *args]
    r = subprocess.run([sys.executable, "stream.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       input=stdin or "", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    if "cut.avi" in args[-1]:                      # damaged mid-stream: the frames before it are kept and said
        assert "read 5 frames" in r.stdout and "kept in" in lines[0]
        assert len(list(data.read_video(os.path.join(out, "stream.mp4")))) == 5
    if "cut.mkv" in args[-1]:
        n = int(lines[0].split("ended after ")[1].split()[0])
        assert 0 < n < 15 and f"read {n} frames" in r.stdout and "kept in" in lines[0]
    assert (d / "busy" / ".lock").read_text() == str(os.getpid())        # a live run's lock stays


def test_port_in_use(student, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "stream.py", "--ckpt", student["ckpt"], "--serve", "--port",
                            str(s.getsockname()[1]), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in r.stderr


def test_ctrl_c_keeps_a_playable_video(student, tmp_path):
    out = str(tmp_path / "c")
    proc = subprocess.Popen([sys.executable, "stream.py", "--ckpt", student["ckpt"], "--frames", "100000",
                             "--out", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mp4 = os.path.join(out, "stream.mp4")
        deadline = time.time() + 120
        while time.time() < deadline:                       # wait until frames are being written
            time.sleep(1)
            if os.path.exists(mp4) and os.path.getsize(mp4) > 0:
                time.sleep(2)
                break
        second = subprocess.run([sys.executable, "stream.py", "--ckpt", student["ckpt"], "--frames", "2", "--out", out],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)     # the same --out, while it runs
        assert second.returncode == 1 and second.stderr.startswith("error: ") and "Traceback" not in second.stderr
        assert f"is in use by another run (process {proc.pid}" in second.stderr
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "interrupted" in stdout, stderr
    finally:                                            # a failed wait leaves no stream running
        if proc.poll() is None:
            proc.kill()
    n = read_log(out)["frames"]
    assert n > 0 and len(list(data.read_video(mp4))) == n and not os.path.exists(os.path.join(out, ".lock"))

