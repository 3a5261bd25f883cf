"""The command line of eval.py, bench.py, teacher.py, distill.py, loopaug.py, data.py, gpu_run.py
and stream.py: bad input is one `error:` line (exit code != 0, no traceback), every flag has help
text that gives its default, the flag counts stay small, the scripts run from any directory, and a
run leaves the clone clean."""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import pytest
import torch

import data
from conftest import ROOT
from model import PRESETS, SHIPPED_STUDENT, save_checkpoint
from test_model import random_model

OWN = ("eval.py", "bench.py", "teacher.py", "distill.py", "loopaug.py", "data.py")
TINY = PRESETS["tiny"]
SHIPPED_TEACHER = os.path.join(ROOT, "checkpoints", "teacher_small.pt")


def run(script, *args, cwd, timeout=120):
    """A script of the repository, by its path, from another working directory."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A working directory with a tiny teacher, a tiny student, a random file, a plain file and an
    --out folder whose ckpt.pt is a student (teacher.py --resume must refuse it)."""
    d = tmp_path_factory.mktemp("cli")
    m = random_model(TINY)
    save_checkpoint(str(d / "teacher.pt"), model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0)
    save_checkpoint(str(d / "student.pt"), model=m.state_dict(), ema=m.state_dict(), config=asdict(replace(TINY, window=2)),
                    step=0, student=dict(steps=4, stage="causal"))
    shutil.copy(d / "student.pt", d / "ckpt.pt")
    (d / "random.pt").write_bytes(os.urandom(3000))
    (d / "text.pt").write_text("model: not a checkpoint\n")
    (d / "a_file").write_text("not a folder")
    (d / "busy").mkdir()                                          # held by a live run: this process
    (d / "busy" / ".lock").write_text(str(os.getpid()))
    frames, c2w, K = torch.rand(2, 3, 3, 16, 16) * 2 - 1, torch.eye(4).repeat(2, 3, 1, 1), torch.tensor([1.0, 1, 0.5, 0.5])
    data.write_scene(str(d / "one_cam" / "scene_00000"), frames[:1], c2w[:1], K[None])
    c2w[1, 2, 0, 3] = float("nan")                                # one NaN in camera 1's pose at frame 2
    data.write_scene(str(d / "nan_pose" / "scene_00000"), frames, c2w, K.repeat(2, 1))
    return d


# (script, arguments, what the one error line must say); {d}: the fixture's folder
CASES = [
    ("eval.py", "--steps 0", "--steps must be at least 1"),
    ("eval.py", "--frames 0", "--frames must be at least 1"),
    ("eval.py", "--clips 0", "--clips must be at least 1"),
    ("eval.py", "--guidance 1.5", "--guidance is the teacher sampler's"),
    ("eval.py", "--guidance nan", "--guidance must be a finite number, got nan"),
    ("eval.py", "--real {d}/no_videos_here", "is not a folder of videos (python real.py --fetch"),
    ("eval.py", "--real_size 0", "--real_size must be at least 1"),
    ("eval.py", "--frames x", "argument --frames: invalid int value"),
    ("eval.py", "--device gpu0", "--device gpu0: use cpu, cuda or cuda:N"),
    ("eval.py", "--device cuda", "CUDA is not available"),
    ("eval.py", "--ckpt {d}/random.pt", "not a file torch.load reads"),
    ("eval.py", "--ckpt {d}/teacher.pt --out {d}/a_file", "is a file; --out names a folder"),
    ("eval.py", "--ckpt {d}/teacher.pt --out {d}/x.mp4", "--out {d}/x.mp4 names a file; --out names a folder"),
    ("eval.py", "--ckpt {d}/teacher.pt --out {d}/busy", "is in use by another run (process {pid}"),
    ("eval.py", "--ckpt {d}/student.pt --steps 99", "--steps must be between 1 and 4 for this student"),
    ("eval.py", "--ckpt {d}/student.pt --steps 1,5", "--steps must be between 1 and 4 for this student"),
    ("eval.py", "--ckpt {d}/text.pt", "not a file torch.load reads (a text file)"),
    ("eval.py", "--ckpt {d}", "is a folder, not a checkpoint file; {d}/ckpt.pt is one"),
    ("bench.py", "--window -1", "--window must be non-negative"),
    ("bench.py", "--teacher_steps 0", "--teacher_steps must be at least 1"),
    ("bench.py", "--device cuda:0", "CUDA is not available"),
    ("bench.py", "--ckpt {d}/random.pt", "not a file torch.load reads"),
    ("bench.py", "--train_pairs 0", "--train_pairs must be at least 1"),
    ("bench.py", "--graphs --device gpu0", "--device gpu0: use cpu, cuda or cuda:N"),
    ("teacher.py", "--preset tiny --max_steps 0", "--max_steps must be at least 1"),
    ("teacher.py", "--preset tiny --pairs 0", "--pairs must be at least 1"),
    ("teacher.py", "--preset tiny --device gpu0", "use cpu, cuda or cuda:N"),
    ("teacher.py", "--preset tiny --out {d} --resume", "is a student checkpoint; --resume continues a teacher"),
    ("teacher.py", "--preset tiny --minutes 0", "--minutes must be positive"),
    ("teacher.py", "--preset tiny --lr inf", "--lr must be a finite number, got inf"),
    ("teacher.py", "--preset tiny --clip nan", "--clip must be a finite number, got nan"),
    ("teacher.py", "--preset tiny --data {d}/one_cam", "scene_00000/cameras.json lists 1 camera: a scene needs at least two"),
    ("teacher.py", "--preset tiny --data {d}/nan_pose", "camera cam01, frame 2: the pose has a NaN or infinite entry"),
    ("teacher.py", "--preset tiny --out {d}/busy", "--out {d}/busy is in use by another run (process {pid}"),
    ("teacher.py", "--preset tiny --compile --device cuda", "CUDA is not available"),
    ("distill.py", "--teacher {d}/teacher.pt --steps 0", "--steps must be at least 1"),
    ("distill.py", "--teacher {d}/teacher.pt --window -1", "--window must be non-negative"),
    ("distill.py", "--teacher {d}/teacher.pt --minutes -1", "--minutes must be positive"),
    ("distill.py", "--teacher {d}/teacher.pt --recon 0 --dmd 0", "--dmd and --recon are loss weights"),
    ("distill.py", "--teacher {d}/teacher.pt --recon -1", "--dmd and --recon are loss weights"),
    ("distill.py", "--teacher {d}/teacher.pt --warp_lr 0", "--lr, --lr_critic and --warp_lr must be positive"),
    ("distill.py", "--teacher {d}/teacher.pt --stage dmd", "argument --stage: invalid choice: 'dmd'"),
    ("distill.py", "--teacher {d}/teacher.pt --device cuda", "CUDA is not available"),
    ("distill.py", "--teacher {d}/random.pt", "not a file torch.load reads"),
    ("distill.py", "--teacher {d}/teacher.pt --lr inf", "--lr must be a finite number"),
    ("distill.py", "--teacher {d}/teacher.pt --data {d}/one_cam", "lists 1 camera: a scene needs at least two"),
    ("distill.py", "--teacher {d}/teacher.pt --data {d}/nan_pose", "the pose has a NaN or infinite entry"),
    ("distill.py", "--teacher {d}/teacher.pt --out {d}/busy", "is in use by another run (process {pid}"),
    ("distill.py", "--teacher {d}", "is a folder, not a checkpoint file"),
    ("distill.py", "--teacher {d}/student.pt", "is a student checkpoint; --teacher needs a teacher"),
    ("distill.py", "--teacher {d}/teacher.pt --stage selfforcing --init {d}/teacher.pt", "is a teacher checkpoint"),
    ("distill.py", "--teacher {d}/teacher.pt --stage causal --init {d}/student.pt", "is a student checkpoint"),
    ("distill.py", "--teacher {d}/teacher.pt --stage selfforcing --out {d}/none", "run --stage causal first, or give --init"),
    ("distill.py", "--teacher {shipped_teacher} --stage selfforcing --init {d}/student.pt", "another network"),
    ("loopaug.py", "--frames 2", "--frames must be at least 3"),
    ("loopaug.py", "--loops 0", "--loops must be at least 1"),
    ("loopaug.py", "--data {d}/one_cam --size 16", "lists 1 camera: a scene needs at least two"),
    ("loopaug.py", "--data {d}/nan_pose --size 16", "camera cam01, frame 2: the pose has a NaN or infinite entry"),
    ("data.py", "--scenes 0", "--scenes must be at least 1"),
    ("data.py", "--size 17", "--size must be even"),
    ("data.py", "--cams 1", "--cams must be at least 2"),
    ("data.py", "--out {d}/busy --scenes 1 --frames 2 --size 16", "is in use by another run"),
    ("gpu_run.py", "--device cpu --out {d}/gpu", "the GPU run needs cuda or cuda:N"),
    ("gpu_run.py", "--budget 0 --dry_run --out {d}/gpu", "--budget, --teacher_minutes and --student_minutes must be positive"),
    ("gpu_run.py", "--budget x", "argument --budget: invalid float value"),
    ("gpu_run.py", "--dry_run --out {d}/a_file", "--out {d}/a_file is a file; --out names a folder"),
    ("gpu_run.py", "--dry_run --work {d}/a_file", "--work {d}/a_file is a file; --work names a folder"),
    ("gpu_run.py", "--dry_run --out {d}/busy", "--out {d}/busy is in use by another run"),
]


@pytest.mark.parametrize("script,args,msg", CASES, ids=[f"{c[0]} {c[1].replace('{d}/', '')}" for c in CASES])
def test_bad_input_is_one_error_line(files, script, args, msg):
    argv = [a.format(d=files, shipped_teacher=SHIPPED_TEACHER) for a in args.split()]
    r = run(script, *argv, cwd=files, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    msg = msg.format(d=files, pid=os.getpid())
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
    assert (files / "busy" / ".lock").read_text() == str(os.getpid())        # a live run's lock stays

# -----------------------------------------------------------------------------
# --help: every flag explained, with its default


def help_entries(text):
    """{flag: help text} from a script's --help output (argparse's layout: the flags at two
    spaces, the text after them or on the following, deeper-indented lines)."""
    entries, cur = {}, None
    for line in text.split("options:")[1].splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            cur = re.findall(r"--[\w-]+", m.group(1))
            for flag in cur:
                entries[flag] = m.group(2) or ""
        elif line.strip() and cur:
            for flag in cur:
                entries[flag] = (entries[flag] + " " + line.strip()).strip()
    entries.pop("--help")
    return entries


# the script's parser, caught where it parses: its --help text and which flags have a default
DUMP = """
import argparse, json, runpy, sys
def dump(self, *a, **k):
    defaults = {s: act.default is not None for act in self._actions for s in act.option_strings}
    print(json.dumps(dict(help=self.format_help(), defaults=defaults)))
    sys.exit(0)
argparse.ArgumentParser.parse_args = dump
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SCRIPTS = OWN + ("gpu_run.py", "stream.py", "probe_dmd.py", "probe_depth.py", "loadtest.py", "real.py",
                  "hires.py")
MOST_FLAGS = {"teacher.py": 26, "distill.py": 26}   # 25 each, and the switch its ablation kept: --depth_loss, --photos


def test_every_flag_has_help_text_that_gives_its_default():
    """Each script's --help: every flag says what it does, and every flag with a default (not
    None) shows it ("(default: X)", added by common.ArgumentParser where the text does not say
    it already). teacher.py and distill.py keep to their budgets (MOST_FLAGS)."""
    def parsed(script):
        r = subprocess.run([sys.executable, "-c", DUMP, os.path.join(ROOT, script)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, (script, r.stderr[-2000:])
        return json.loads(r.stdout.strip().splitlines()[-1])
    with ThreadPoolExecutor() as pool:                                             # eight interpreters
        dumps = list(pool.map(parsed, SCRIPTS))
    for script, d in zip(SCRIPTS, dumps):
        flags = help_entries(d["help"])
        assert len(flags) >= {"real.py": 2, "hires.py": 4, "probe_depth.py": 5}.get(script, 7), (script, flags)   # the help was read
        assert len([f for f in flags if not f.startswith("--no-")]) <= MOST_FLAGS.get(script, 99), (script, sorted(flags))
        for flag, text in flags.items():
            assert len(text) > 5, f"{script} {flag} has no help text"
            if d["defaults"][flag]:
                assert "default" in text, f"{script} {flag}: the help does not give its default: {text}"
    r = run("teacher.py", "--help", cwd=ROOT)                                     # the real --help shows them too
    assert r.returncode == 0 and "(default: 0.0003)" in help_entries(r.stdout)["--lr"]

# -----------------------------------------------------------------------------
# running from anywhere, leaving the clone clean


def test_eval_and_bench_from_another_directory(tmp_path):
    """The default checkpoint (the shipped student, model.SHIPPED_STUDENT: eval.py's and bench.py's
    default) is found from any working directory, and the outputs land under that directory's
    runs/. (bench.py runs on a tiny student here: on the shipped one it takes 20 s of CPU.)"""
    r = run("eval.py", "--clips", 1, "--frames", 2, "--families", "orbit", "--steps", 1, "--stream", 0, cwd=tmp_path,
            timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "student_small.pt: student" in r.stdout
    assert {"eval.json", "eval.png"} <= set(os.listdir(tmp_path / "runs" / "eval"))
    assert os.path.isabs(SHIPPED_STUDENT) and os.path.isfile(SHIPPED_STUDENT)
    m = random_model(TINY)
    save_checkpoint(str(tmp_path / "s.pt"), model=m.state_dict(), config=asdict(TINY), step=0, student=dict(steps=4))
    r = run("bench.py", "--ckpt", "s.pt", "--frames", 2, "--long", 6, "--teacher_steps", 1, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["runs", "s.pt"] and os.path.isfile(tmp_path / "runs" / "bench" / "bench.json")


def test_a_run_leaves_the_clone_clean(tmp_path):
    """A copy of the repository as a fresh clone; teacher, distill, bench, data and loopaug on
    `tiny` and eval on the shipped student, with their default outputs: `git status --porcelain`
    stays empty (runs/ and data/ are ignored; eval.py used to write next to the checkpoint, in
    checkpoints/, and bench.py into the working directory) and the outputs are where the README
    says."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(clone / os.path.dirname(f), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), clone / f)
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=clone,
                                    capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "clone")
    steps = [["teacher.py", "--preset", "tiny", "--max_steps", 2, "--pairs", 2, "--max_pairs", 2, "--eval_every", 0],
             ["distill.py", "--causal_steps", 1, "--selfforcing_steps", 1, "--critic_steps", 1, "--pairs", 2,
              "--max_pairs", 2, "--eval_every", 0],
             ["eval.py", "--clips", 1, "--frames", 2, "--families", "pan", "--steps", 1, "--stream", 0],   # shipped student
             ["bench.py", "--ckpt", "runs/student/ckpt.pt", "--frames", 2, "--long", 6, "--teacher_steps", 1],
             ["data.py", "--scenes", 1, "--cams", 3, "--frames", 4, "--size", 16],
             ["loopaug.py", "--loops", 2, "--frames", 3, "--size", 16]]
    for cmd in steps:
        r = subprocess.run([sys.executable, *map(str, cmd)], cwd=clone, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    for f in ("runs/teacher/ckpt.pt", "runs/student/ckpt.pt", "runs/eval/eval.json", "runs/eval/eval.png",
              "runs/bench/bench.json", "data/synth/scene_00000/cameras.json", "data/loops/loop_00001/loop.json"):
        assert os.path.isfile(clone / f), f
