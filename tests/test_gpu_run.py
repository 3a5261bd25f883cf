"""The prepared GPU run (gpu_run.py): its CPU dry run on `tiny`, end to end."""
import json
import os

import pytest


@pytest.mark.cpu_only
def test_gpu_run_dry_run(script, tmp_path):
    """Every stage runs (teacher, both evaluations, both distillation stages, bench, tests) and at
    most 8 small files come back in one folder, the release files loadable."""
    out, work, mv = tmp_path / "out", tmp_path / "work", tmp_path / "mv"
    script("data.py", "--out", mv, "--scenes", 2, "--cams", 3, "--frames", 12, "--size", 16)
    r = script("gpu_run.py", "--dry_run", "--out", out, "--work", work, "--data", mv, timeout=600)
    assert "7 of 7 stages ok" in r.stdout
    files = sorted(os.listdir(out))
    assert files == sorted(["gpu_run.log", "summary.json", "teacher.pt", "student.pt", "teacher_eval.json",
                            "student_eval.json", "student_eval.png", "bench.json"])
    assert all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in files)
    s = json.load(open(out / "summary.json"))
    assert [st["name"] for st in s["stages"]] == ["teacher", "eval teacher", "causal", "self-forcing", "eval student",
                                                  "bench", "tests"]
    assert all(st["status"] == "ok" for st in s["stages"]) and s["failed"] == [] and s["wall_s"] < 540
    assert s["env"]["torch"] and s["bench"]["rows"] and s["teacher"]["steps"] > 0
    assert [e["steps"] for e in s["eval"]["teacher"]["runs"]] == [1, 50]
    curve = s["teacher_curve"]                                           # every 5 steps in the dry run, and the end
    assert curve and curve[-1]["step"] == s["teacher"]["steps"] and all("gain_1step" in e for e in curve)
    assert [e["steps"] for e in s["eval"]["student"]["runs"]] == [1, 2, 4]
    assert s["eval"]["student"]["stream"]["third3"] and s["eval"]["student"]["loops"]
    assert s["student_data"] == str(mv) and "--loopaug 0.5" in s["stages"][3]["cmd"]
    from model import load_checkpoint
    for who in ("teacher", "student"):
        ck = load_checkpoint(str(out / f"{who}.pt"))
        assert all(v.dtype in (__import__("torch").float16,) for v in ck["model"].values() if v.is_floating_point())
        assert ck["config"]["warp"] and "warp_out.weight" in ck["model"]          # --warp, the default
    log = open(out / "gpu_run.log").read()
    assert "== teacher: ok" in log and "time is up" in log
    # the real run refuses the CPU, with one line
    r = script("gpu_run.py", "--device", "cpu", "--out", out, ok=False)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
