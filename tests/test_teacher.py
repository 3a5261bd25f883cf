"""teacher.py's GPU-path items: a time-boxed run (--minutes) evaluated once when its time is up,
the data rendered on the training device, clear errors for bad flags."""
import json
import math
import os
import time

import pytest

from model import WARP_PLANES, load_checkpoint


def test_time_boxed_run_saves_evaluates_and_stops(script, tmp_path, device):
    """--minutes: the run stops when its time is up, evaluates (the end's evaluation; no periodic
    one before it with this --eval_every), saves, and writes its summary; the learning rate
    decays over the wall-clock time; --dim, --depth and --heads set the network's size, the rest of it is
    the recipe (model.Config: camera RoPE's planes, adaLN-single, the warp head)."""
    out = str(tmp_path / "run")
    t0 = time.time()
    r = script("teacher.py", "--preset", "tiny", "--out", out, "--pairs", 4, "--max_pairs", 3, "--minutes", 0.1,
               "--eval_every", 10 ** 6, "--eval_steps", 2, "--warmup", 2, "--device", device, "--no-compile",
               "--dim", 96, "--depth", 3, "--heads", 3)
    wall = time.time() - t0
    assert "time is up (0.1 min)" in r.stdout and wall > 6
    summary = json.load(open(os.path.join(out, "summary.json")))
    steps = summary["steps"]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert steps > 3 and ckpt["step"] == steps
    cfg = ckpt["config"]
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["patch"], tuple(cfg["cam_rope"])) == (96, 3, 3, 4, (1.6, 1, 0.6, 0))   # tiny: 64, 2, 2, 4
    assert cfg["ada_single"] and "ada_shared.1.weight" in ckpt["model"] and "blocks.0.ada.1.weight" not in ckpt["model"]
    assert tuple(cfg["warp"]) == WARP_PLANES and ckpt["model"]["warp_out.weight"].abs().sum() > 0   # trained
    assert 6 <= summary["train_seconds"] < 6 + wall
    evals = [json.loads(line) for line in open(os.path.join(out, "evals.jsonl"))]
    assert [e["step"] for e in evals] == [steps] and summary["last_eval"] == evals[0]["sample"]
    assert os.path.isfile(os.path.join(out, "sample.png")) and os.path.isfile(os.path.join(out, "sample.mp4"))
    log = [line.split(" | ") for line in open(os.path.join(out, "log.txt"))]
    lr = [float(f[3].split()[1]) for f in log]
    # cosine over the wall-clock time, 3e-4 -> 3e-5: non-increasing after the warmup, near its floor at
    # the end (a schedule over --max_steps would still be at 3e-4); no figure at a fixed step, which a
    # slow first step (CUDA start-up) moves
    assert len(lr) == steps and lr[-1] < 1e-4 and all(a >= b for a, b in zip(lr[2:], lr[3:]))
    assert all("data" in f[5] and "step" in f[6] for f in log)               # data timed apart from the step
    depth = [float(f[-1].split()[1]) for f in log]                           # the warp head's depth term (synthetic stream)
    assert all(f[-1].startswith("depth ") for f in log) and 0 < depth[0] <= math.log(len(WARP_PLANES)) + 1e-4


@pytest.mark.parametrize("flags,message", [
    (["--pairs", 0], "--pairs must be at least 1"), (["--minutes", 0], "--minutes must be positive"),
    (["--device", "gpu"], "--device gpu: use cpu, cuda or cuda:N"), (["--device", "cuda:7"], "--device cuda:7"),
    (["--patch", 5], "--patch 5 must divide the frame size 16"), (["--dim", 80], "--dim 80 must be a multiple of 16 x heads = 32"),
    (["--depth", 0], "--depth must be at least 1"), (["--heads", 8], "--dim 64 must be a multiple of 16 x heads = 128"),
    (["--lr", 0], "--lr and --clip must be positive"), (["--warp"], "unrecognized arguments: --warp"),
    (["--depth_loss", -1], "--depth_loss is a weight, 0 or more"), (["--depth_loss", "nan"], "--depth_loss")])
def test_bad_flags_fail_clearly(script, tmp_path, flags, message):
    r = script("teacher.py", "--preset", "tiny", "--out", str(tmp_path / "r"), *flags, ok=False, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr
    assert not os.path.exists(tmp_path / "r")                                # nothing started
