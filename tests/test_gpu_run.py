"""The prepared GPU run (gpu_run.py): its CPU dry run on `tiny`, end to end."""
import json
import os

import pytest


@pytest.mark.cpu_only
def test_gpu_run_dry_run(script, tmp_path):
    """Every stage runs (tests, bench, teacher, student, both evals) and at most 8 small files
    come back in one folder."""
    out, work = tmp_path / "out", tmp_path / "work"
    r = script("gpu_run.py", "--dry_run", "--out", out, "--work", work, timeout=600)
    assert "6 of 6 stages ok" in r.stdout
    files = sorted(os.listdir(out))
    assert files == sorted(["gpu_run.log", "summary.json", "bench.json", "teacher_sample.png", "teacher_sample.mp4",
                            "teacher_eval.png", "student_eval.png"])
    assert all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in files)
    s = json.load(open(out / "summary.json"))
    assert [st["name"] for st in s["stages"]] == ["tests", "bench", "teacher", "student", "eval teacher", "eval student"]
    assert all(st["status"] == "ok" for st in s["stages"]) and s["failed"] == [] and s["wall_s"] < 540
    assert s["env"]["torch"] and s["bench"]["rows"] and s["teacher"]["steps"] > 0
    assert [e["steps"] for e in s["eval"]["student"]] == [1, 4] and s["eval"]["teacher"][0]["mean"]["psnr"] > 0
    log = open(out / "gpu_run.log").read()
    assert "== teacher: ok" in log and "time is up" in log
    # the real run refuses the CPU, with one line
    r = script("gpu_run.py", "--device", "cpu", "--out", out, ok=False)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
