"""LoopAug: loop sequences close, fill their length without held frames, round-trip through disk,
and run through the student, distill.py and eval.py's loop benchmark (tests/test_eval.py tests
the benchmark itself)."""
import itertools
import json
import os
from dataclasses import asdict

import pytest
import torch

import camera
import data
import render
from loopaug import LoopSampler, camera_cycle, closed_walk, load_loop, palindrome, spread, write_loop
from model import PRESETS, save_checkpoint, student_sample
from test_model import random_model

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("mv")
    for i in range(2):
        frames, c2w, K, _ = data.synth_multiview_scene(10 + i, n_cams=4, T=8, size=16)
        data.write_scene(str(d / f"scene_{i:05d}"), frames, c2w, K)
    return str(d)


def test_palindrome_closes_and_mirrors():
    clip = render.render_clip(3, 5, 16, 16, *camera.preset_path("orbit_left", 5))
    seq = palindrome(clip, laps=2)
    n = seq["src"].shape[0]
    assert n == 2 * (2 * 5 - 2) + 1
    for k in ("src", "tgt", "rel", "K_tgt"):
        assert torch.equal(seq[k][0], seq[k][-1])                           # ends where it starts
        assert torch.equal(seq[k][3], seq[k][2 * 5 - 2 - 3])                # frame i == frame 2L-2-i
    assert (0, n - 1) in seq["pairs"] and all(torch.equal(seq["tgt"][i], seq["tgt"][j]) for i, j in seq["pairs"])


def test_camera_cycle_returns_to_the_first_camera(dataset):
    scene = data.load_scene(os.path.join(dataset, "scene_00000"))
    seq = camera_cycle(scene, 0, [2, 1, 3], f0=4, hold=2)
    assert seq["src"].shape[0] == 8
    assert torch.equal(seq["tgt"][0], seq["tgt"][-1]) and torch.allclose(seq["rel"][0], seq["rel"][-1])
    assert torch.equal(seq["src"][0], seq["src"][5])                        # frozen time: one source instant
    assert not torch.allclose(seq["rel"][0], seq["rel"][2])                 # it does visit other cameras
    adv = camera_cycle(scene, 0, [2, 1], f0=0, advance=1, hold=2)           # cams 2 2 1 1 2 2, time 0 1 2 2 1 0
    assert torch.equal(adv["src"][2], scene["frames"][0, 2]) and torch.equal(adv["tgt"][2], scene["frames"][1, 2])
    assert torch.equal(adv["tgt"][-1], scene["frames"][2, 0])                # back in time too
    assert adv["pairs"] == [(0, 5), (1, 4), (2, 3)]


@pytest.mark.parametrize("kind", ["palindrome", "cycle"])
def test_sampler_loops_close(dataset, kind):
    s = LoopSampler(dataset, 16)
    for T in (3, 6, 7):
        seq = s.loop(torch.Generator().manual_seed(T), T, kind)
        assert seq["src"].shape == (T, 3, 16, 16)
        if kind == "palindrome":
            assert torch.equal(seq["tgt"][0], seq["tgt"][-1]) and torch.allclose(seq["rel"][0], seq["rel"][-1])
    b = s.batch(0, pairs=8, max_pairs=5)
    assert b["src"].shape[1] >= 3 and b["rel"].shape[-2:] == (4, 4)


def test_every_sampled_loop_closes_in_pose_and_time(dataset):
    """200 loops of 3..8 frames, both kinds, time frozen or advancing: each reports pairs (the
    first and the last frame at least), and every pair shows the same source frame, target frame,
    pose and intrinsics."""
    s, g = LoopSampler(dataset, 16), torch.Generator().manual_seed(0)
    kinds = {"palindrome": 0, "cycle": 0}
    for _ in range(200):
        T = int(torch.randint(3, 9, (1,), generator=g))
        seq = s.loop(g, T)
        assert seq["src"].shape[0] == T and (0, T - 1) in seq["pairs"]
        for i, j in seq["pairs"]:
            for k in ("src", "tgt", "rel", "K_src", "K_tgt"):
                assert torch.equal(seq[k][i], seq[k][j]), (k, i, j)
        kinds["palindrome" if torch.equal(seq["rel"], seq["rel"].flip(0)) else "cycle"] += 1
    assert min(kinds.values()) > 50, kinds                                     # both kinds were drawn


def test_closed_walk_fills_any_length():
    """Out and back from frame 0 to frame 0 in exactly T frames, never a frame twice in a row, steps
    of one (one of two in a lap of an odd number of steps), never past the clip's end."""
    assert closed_walk(7, 24) == [0, 1, 2, 3, 2, 1, 0] and closed_walk(6, 24) == [0, 1, 2, 3, 1, 0]
    assert closed_walk(9, 3) == [0, 1, 2, 1, 0, 1, 2, 1, 0]                   # laps when the clip is short
    for N in range(3, 12):
        for T in range(3, 40):
            w = closed_walk(T, N)
            steps = [abs(a - b) for a, b in zip(w, w[1:])]
            assert len(w) == T and w[0] == w[-1] == 0 and max(w) < N and set(steps) <= {1, 2}, (T, N, w)
    assert spread(11, 4) == [3, 3, 3, 2] and spread(12, 6) == [2] * 6


def test_sampled_loops_hold_no_frame_to_fill_their_length(dataset):
    """The sampler used to pad a loop by holding its last frame (about 7% of palindrome frames and
    19% of camera-cycle frames at 3..12 pairs): the source froze at the end of the clip. Now a
    palindrome never repeats a frame, and a camera cycle spreads its T frames over its stops (their
    frame counts differ by one at most), so nothing is appended; the loops still close."""
    s, g = LoopSampler(dataset, 16), torch.Generator().manual_seed(1)
    N = s.scenes[0]["frames"].shape[1]
    for _ in range(100):
        T = int(torch.randint(3, 13, (1,), generator=g))
        pal, cyc = s.loop(g, T, "palindrome"), s.loop(g, T, "cycle")
        for seq in (pal, cyc):
            assert seq["src"].shape[0] == T and (0, T - 1) in seq["pairs"]
        assert (pal["key"][1:] != pal["key"][:-1]).all()                   # a frame of the clip never twice in a row
        cams = (cyc["key"] // N).tolist()
        runs = [sum(1 for _ in grp) for _, grp in itertools.groupby(cams)]
        assert max(runs) - min(runs) <= 1 and runs[0] >= runs[-1], (T, cams)


def test_loop_dataset_round_trip_and_cli(script, dataset, tmp_path):
    clip = render.render_clip(3, 4, 16, 16, *camera.preset_path("pan_left", 4))
    seq = palindrome(clip)
    write_loop(str(tmp_path / "l"), seq)
    back = load_loop(str(tmp_path / "l"))
    assert torch.allclose(back["rel"], seq["rel"]) and back["pairs"] == seq["pairs"]
    assert (back["tgt"] - seq["tgt"]).abs().mean() < 0.06
    out = str(tmp_path / "loops")
    r = script("loopaug.py", "--data", dataset, "--out", out, "--loops", 3, "--frames", 7, "--size", 16)
    assert "wrote 3 loops" in r.stdout and os.path.isfile(os.path.join(out, "preview.mp4"))
    for i in range(3):
        lp = load_loop(os.path.join(out, f"loop_{i:05d}"))
        assert torch.allclose(lp["rel"][0], lp["rel"][-1], atol=1e-5)


def test_loops_through_the_student_and_distill(script, dataset, tmp_path):
    m = random_model(TINY)
    b = LoopSampler(dataset, 16).batch(1, pairs=6, max_pairs=5)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], 16, 16)
    x = student_sample(m, b["src"], cs, ct, 2)
    assert x.shape == b["tgt"].shape and torch.isfinite(x).all()
    tpath = str(tmp_path / "teacher.pt")
    save_checkpoint(tpath, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0)
    out = str(tmp_path / "s")
    r = script("distill.py", "--teacher", tpath, "--out", out, "--data", dataset, "--loopaug", 1.0,
               "--causal_steps", 1, "--selfforcing_steps", 2, "--critic_steps", 1, "--pairs", 3, "--max_pairs", 3,
               "--eval_every", 100)
    log = open(os.path.join(out, "log.txt")).read()
    assert "selfforcing 1/2" in log and "causal 0/1" in log and "| depth" not in log   # no depth on disk here
    r = script("distill.py", "--teacher", tpath, "--out", out, "--loopaug", 0.5, ok=False)
    assert "--loopaug builds loops from a multi-view dataset" in r.stderr
    # the loop benchmark on the student
    r = script("eval.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--clips", 1, "--frames", 2, "--families", "pan",
               "--steps", 1, "--loops", 1, "--loop_length", 4, "--stream", 0, "--out", out)
    res = json.load(open(os.path.join(out, "eval.json")))
    assert set(res["loops"]) == {"turn", "slide"} and res["loops"]["turn"]["frames"] == 4
    assert "student, window 1" in res["loops"]["slide"]["rows"] and res["stream"] == {}

