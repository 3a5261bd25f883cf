"""bench.py end to end on a tiny student, and its bad input."""
import json
import os
from dataclasses import asdict, replace

from model import PRESETS, save_checkpoint
from test_attention import random_model


def test_bench_end_to_end(script, tmp_path, device):
    """Every row, the long-stream, training and data figures, in OUT/bench.json (OUT created)."""
    cfg = replace(PRESETS["tiny"], window=3)
    ckpt = str(tmp_path / "student.pt")
    save_checkpoint(ckpt, model=random_model(cfg).state_dict(), config=asdict(cfg), step=0, student=dict(steps=4))
    out = str(tmp_path / "bench")
    r = script("bench.py", "--ckpt", ckpt, "--frames", 6, "--long", 60, "--teacher_steps", 3, "--out", out,
               "--device", device)
    assert "teacher / student" in r.stdout and "rolling cache" in r.stdout and "rendered on the device" in r.stdout
    res = json.load(open(os.path.join(out, "bench.json")))
    hires_row = set() if device.startswith("cuda") else {"student 1 step, 128 out"}     # not with CUDA graphs
    assert set(res["rows"]) == {"student 1 step", "student 2 step", "student 4 step", "teacher 3 steps"} | hires_row
    assert all(v["fps"] > 0 and v["steady_ms"] > 0 for v in res["rows"].values())
    assert res["t50_ms"] > 0 and res["tlong_ms"] > 0 and res["long"] == 60 and res["train_frames_per_s"] > 0
    assert res["train_data_ms"] > 0 and res["window"] == 3 and res["graphs"] == device.startswith("cuda")
    for flags, message in ((["--ckpt", str(tmp_path / "missing.pt")], "checkpoint not found"),
                           (["--frames", 0], "--frames must be at least 1")):
        r = script("bench.py", *flags, "--out", out, ok=False)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
