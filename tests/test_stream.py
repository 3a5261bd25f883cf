"""stream.py: end to end on a generated video, presets, interactive commands, bad input, and
equality with the student's offline generation."""
import json
import os
from dataclasses import asdict, replace

import pytest
import torch

import data
import stream
from model import PRESETS, load_model, save_checkpoint, student_sample
from test_model import random_model

TINY = replace(PRESETS["tiny"], window=3)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("student")
    m = random_model(TINY)
    path = str(d / "student.pt")
    save_checkpoint(path, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0,
                    student=dict(steps=4, stage="dmd"))
    teacher = str(d / "teacher.pt")
    save_checkpoint(teacher, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0)
    video = str(d / "in.mp4")
    data.write_video(video, data.render_clip(9, 7, 40, 40)["src"], fps=12)
    return dict(ckpt=path, teacher=teacher, video=video, dir=d)


def test_stream_end_to_end(script, student, tmp_path):
    out = str(tmp_path / "o.mp4")
    r = script("stream.py", "--ckpt", student["ckpt"], "--video", student["video"], "--traj", "pan_left", "--out", out)
    assert "7 frames" in r.stdout and "real-time factor" in r.stdout
    assert abs(data.video_fps(out) - 12) < 1e-6
    frames = list(data.read_video(out))
    assert len(frames) == 7
    H, W = frames[0].shape[1:]
    assert W > 2 * H - 16 and W < 2 * H + 16                      # source | generated, side by side
    log = json.load(open(str(tmp_path / "o_latency.json")))
    assert len(log["latency_ms"]) == 7 and log["steps"] == 4
    # without --video: the built-in synthetic scene
    r = script("stream.py", "--ckpt", student["ckpt"], "--max_frames", 3, "--steps", 1, "--out", str(tmp_path / "s.mp4"))
    assert "3 frames" in r.stdout


def run_inprocess(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["stream.py", *map(str, argv)])
    stream.main()


@pytest.mark.parametrize("traj", data.PRESETS)
def test_every_preset(monkeypatch, student, tmp_path, traj):
    out = str(tmp_path / "p.mp4")
    run_inprocess(monkeypatch, "--ckpt", student["ckpt"], "--traj", traj, "--max_frames", 3, "--steps", 1,
                  "--traj_frames", 3, "--out", out)
    poses = torch.tensor(json.load(open(str(tmp_path / "p_latency.json")))["poses"])
    want, _ = data.preset_path(traj, 3)
    assert torch.allclose(poses, want, atol=1e-5)


def test_piped_commands_change_the_pose_from_the_next_chunk(script, student, tmp_path):
    out = str(tmp_path / "i.mp4")
    script("stream.py", "--ckpt", student["ckpt"], "--traj", "static", "--max_frames", 6, "--steps", 1,
           "--interactive", "--out", out, stdin="a\na\nw\n")
    log = json.load(open(str(tmp_path / "i_latency.json")))
    assert [k for _, k in log["commands"]] == ["a", "a", "w"]
    start = log["commands"][-1][0]                                 # the chunk where they took effect
    poses = torch.tensor(log["poses"])
    want, _ = data.camera_path(orbit=10 * torch.pi / 180, move=(0.0, 0.0, 0.1), n=1)
    assert torch.allclose(poses[:start], torch.eye(4).expand(start, 4, 4), atol=1e-6)
    assert torch.allclose(poses[start:], want.expand(6 - start, 4, 4), atol=1e-5)
    # q stops the stream; the video of the frames so far is kept
    r = script("stream.py", "--ckpt", student["ckpt"], "--max_frames", 6, "--interactive", "--out", out, stdin="q\n")
    assert os.path.isfile(out)


def test_streaming_equals_offline_generation(student):
    model, _ = load_model(student["ckpt"])
    clip = data.render_clip(4, 5, 16, 16, *data.preset_path("orbit_left", 5))
    controls = stream.Controls(False)
    got = torch.stack([o for _, o, _, _ in stream.stream_frames(model, list(clip["src"]), clip["rel"],
                                                                torch.ones(5), 3, controls, seed=7)])
    K = torch.tensor([1.0, 1.0, 0.5, 0.5]).expand(1, 5, 4)
    cs, ct = data.pair_rays(clip["rel"][None], K, K, 16, 16)
    ref = student_sample(model, clip["src"][None], cs, ct, 3, generator=torch.Generator().manual_seed(7))[0]
    assert (got - ref).abs().max() < 1e-5


def test_bad_input(script, student, tmp_path):
    def err(*args):
        r = script("stream.py", "--ckpt", student["ckpt"], "--out", str(tmp_path / "e.mp4"), *args, ok=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        return r.stderr.strip().splitlines()[-1]
    assert "video not found" in err("--video", str(tmp_path / "missing.mp4"))
    (tmp_path / "junk.mp4").write_bytes(os.urandom(3000))
    assert "cannot read video" in err("--video", str(tmp_path / "junk.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty.mp4" in err("--video", str(tmp_path / "empty.mp4"))
    assert "unknown trajectory 'spin'" in err("--traj", "spin")
    (tmp_path / "bad.json").write_text("[[1, 2]")
    assert "bad.json" in err("--traj", str(tmp_path / "bad.json"))
    assert "--steps must be between 1 and 4" in err("--steps", "9")
    r = script("stream.py", "--ckpt", student["teacher"], ok=False)
    assert "not a student checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_keeps_a_playable_video(student, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = str(tmp_path / "c.mp4")
    proc = subprocess.Popen([sys.executable, "stream.py", "--ckpt", student["ckpt"], "--max_frames", "100000",
                             "--out", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = str(tmp_path / "c_latency.json")
    deadline = time.time() + 120
    while time.time() < deadline:                       # wait until frames are being written
        time.sleep(1)
        if os.path.exists(out) and os.path.getsize(out) > 0:
            time.sleep(2)
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "interrupted" in stdout, stderr
    n = json.load(open(log))["frames"]
    assert n > 0 and len(list(data.read_video(out))) == n


def test_bench_end_to_end(script, student, tmp_path):
    """bench.py on the tiny student: every row, the long-stream and training figures, in one JSON."""
    out = str(tmp_path)
    r = script("bench.py", "--ckpt", student["ckpt"], "--frames", 4, "--long", 40, "--teacher_steps", 3, "--out", out)
    assert "teacher / student" in r.stdout and "rolling cache" in r.stdout
    res = json.load(open(os.path.join(out, "bench.json")))
    assert set(res["rows"]) == {"student 1 step", "student 2 step", "student 4 step", "teacher 3 steps"}
    assert all(v["fps"] > 0 for v in res["rows"].values())
    assert res["t50_ms"] > 0 and res["tlong_ms"] > 0 and res["long"] == 40 and res["train_frames_per_s"] > 0
    r = script("bench.py", "--ckpt", str(tmp_path / "missing.pt"), ok=False)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
