"""
The prepared GPU run: one command that checks a bare single-GPU machine, trains the shipped
recipe at the shipped size with a GPU's compute, and runs the rest of the CUDA path, in under
9 minutes with no network.

    python gpu_run.py                    # -> runs/gpu/: gpu_run.log, summary.json, eval and bench JSON, release files
    python gpu_run.py --dry_run          # the same stages on the CPU with the tiny preset (about a minute)

Stages, each with a time limit inside the budget; the run goes on past a failed stage where it
can and reports every stage in summary.json:
  1. env           Python, torch, CUDA, the GPU and its memory, the packages, a timed bf16 matmul
  2. teacher       teacher.py --preset small --minutes M (the shipped recipe, warp head included; blocks compiled;
                   rerun eager if compiling fails),
                   evaluated every 500 steps: its learning curve goes into summary.json
  3. eval teacher  eval.py at 1 and 50 steps: the co-visible gain, to set beside the CPU-trained teacher's
  4. causal        distill.py --stage causal for a share of --student_minutes
  5. self-forcing  distill.py --stage selfforcing (reconstruction, LoopAug from --data when given) for the rest
  6. eval student  eval.py with the long orbit stream and the loops
  7. bench         bench.py on --bench_preset (random weights): student steps with CUDA graphs, teacher,
                   long stream, training step with MFU
  8. tests         the CUDA-capable tests (pytest --device cuda), in the time left
Into --out go at most 8 files (16 MiB each at most), each as soon as its stage ends: gpu_run.log,
summary.json, teacher.pt and student.pt (float16 release files), teacher_eval.json,
student_eval.json, student_eval.png, bench.json. Checkpoints and everything else stay in --work.
"""
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time

try:
    from common import ArgumentParser, check_out_dir, fail, hold_out_dir
except ImportError as e:                                  # torch missing: common.py needs it
    raise SystemExit(f"error: {e} (the GPU run needs torch: pip install torch)")

ROOT = os.path.dirname(os.path.abspath(__file__))

p = ArgumentParser(description="The prepared single-GPU run of RealCam-min.")
p.add_argument("--out", type=str, default="runs/gpu", help="output folder: the files to bring back (at most 8)")
p.add_argument("--work", type=str, default="runs/gpu_work", help="working folder: checkpoints, full logs")
p.add_argument("--budget", type=float, default=9.0, help="wall-clock budget of the whole run (minutes)")
p.add_argument("--device", type=str, default="cuda", help="cuda or cuda:N (cpu with --dry_run)")
p.add_argument("--preset", type=str, default="small",
               help="model preset of the teacher and the student (small: the shipped files' size, so their figures "
                    "compare with the CPU-trained ones)")
p.add_argument("--bench_preset", type=str, default="base", help="model preset of the speed benchmark (random weights)")
p.add_argument("--teacher_minutes", type=float, default=2.5, help="teacher training time (minutes)")
p.add_argument("--pairs", type=int, default=128, help="teacher: (source, target) pairs a batch")
p.add_argument("--student_minutes", type=float, default=2.0,
               help="distillation time (minutes): 30%% causal stage, 70%% Self-Forcing with reconstruction")
p.add_argument("--data", type=str, default="data/mv",
               help="multi-view dataset for the Self-Forcing stage, with LoopAug on half its rollouts (synthetic "
                    "stream if the folder is missing)")
p.add_argument("--dry_run", action="store_true",
               help="check the plumbing on the CPU: tiny preset, a few steps, one quick test (about a minute)")
args = p.parse_args()
if args.dry_run:
    args.device, args.preset, args.bench_preset, args.teacher_minutes, args.pairs, args.student_minutes = \
        "cpu", "tiny", "tiny", 0.05, 8, 0.1
if args.budget <= 0 or args.teacher_minutes <= 0 or args.student_minutes <= 0 or args.pairs < 1:
    fail("--budget, --teacher_minutes and --student_minutes must be positive, --pairs at least 1")
if not args.dry_run and not args.device.startswith("cuda"):
    fail(f"--device {args.device}: the GPU run needs cuda or cuda:N (the CPU check is --dry_run)")

check_out_dir(args.out)
check_out_dir(args.work, "--work")
if os.path.abspath(args.out) == os.path.abspath(args.work):
    fail(f"--out and --work are both {args.out}: --out gets at most 8 files, --work everything else")
t_start = time.time()
deadline = t_start + 60 * args.budget
hold_out_dir(args.out)                                   # refused if another live run writes there
hold_out_dir(args.work, "--work")
log_path = os.path.join(args.out, "gpu_run.log")
log = open(log_path, "w")
summary = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args), stages=[])


def say(msg):
    print(msg, flush=True)
    log.write(msg + "\n")
    log.flush()


def write_summary():
    summary["wall_s"] = time.time() - t_start
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def stage(name, cmd, limit):
    """Run one command, its output into the log, within `limit` seconds and the budget."""
    left = deadline - time.time() - 15
    timeout = min(limit, left)
    rec = dict(name=name, cmd=" ".join(map(str, cmd)))
    summary["stages"].append(rec)
    if timeout < 10:
        say(f"== {name}: skipped, {left:.0f} s left of the budget")
        rec.update(status="skipped", seconds=0)
        return rec
    say(f"== {name} (limit {timeout:.0f} s): {rec['cmd']}")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                    # the stage's own process group
        rc = proc.wait()
        rec["timed_out"] = True
    rec.update(rc=rc, seconds=round(time.time() - t0, 1), status="ok" if rc == 0 else "failed")
    say(f"== {name}: {rec['status']} (exit {rc}) in {rec['seconds']} s")
    write_summary()
    return rec


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def eval_files(out):
    """eval.py's JSON and PNG in its --out folder."""
    return os.path.join(out, "eval.json"), os.path.join(out, "eval.png")

# -----------------------------------------------------------------------------
# 1. the environment


def environment():
    import torch
    env = dict(python=sys.version.split()[0], torch=torch.__version__, cuda_build=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), cpus=os.cpu_count(),
               disk_free_gib=round(shutil.disk_usage(ROOT).free / 2 ** 30, 1),
               compiler=shutil.which("gcc") or shutil.which("cc"), packages={})
    for pkg in ("numpy", "einops", "imageio", "av", "tqdm", "pytest", "triton"):
        try:
            env["packages"][pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][pkg] = None
    if env["cuda_available"]:
        dev = torch.device(args.device)
        prop = torch.cuda.get_device_properties(dev)
        env.update(gpu=prop.name, gpus=torch.cuda.device_count(), capability=f"{prop.major}.{prop.minor}",
                   memory_gib=round(prop.total_memory / 2 ** 30, 1), bf16=torch.cuda.is_bf16_supported())
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(dev)
        env["bf16_matmul_tflops"] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12, 1)
    return env


say(f"gpu_run: budget {args.budget:g} min, device {args.device}, preset {args.preset}, out {args.out}, work {args.work}")
try:
    summary["env"] = environment()
except Exception as e:                                      # report it, do not hide it in a traceback
    summary["env"] = dict(error=f"{type(e).__name__}: {e}")
say("env: " + json.dumps(summary["env"]))
missing = [k for k in ("numpy", "einops", "imageio", "av", "tqdm", "pytest") if not summary["env"].get("packages", {}).get(k)]
if missing or (not args.dry_run and not summary["env"].get("cuda_available")):
    why = f"missing packages: {', '.join(missing)}" if missing else "no CUDA GPU visible to torch"
    summary["error"] = why
    write_summary()
    fail(f"{why} (see {log_path})")

# -----------------------------------------------------------------------------
# 2-8. teacher, student, their evaluations, bench, tests

import model                                             # the environment check passed

dev, work = args.device, args.work
if args.dry_run:
    evals = ["--clips", 1, "--frames", 3, "--families", "orbit,static"]
    stream = ["--stream", 1, "--stream_frames", 6, "--loops", 1, "--loop_length", 3]
    bench = ["--frames", 4, "--long", 60, "--teacher_steps", 3, "--train_pairs", 4]
    tests = ["-m", "pytest", "-q", "tests/test_attention.py", "-k", "flops_count", "-p", "no:cacheprovider"]
else:
    evals, stream = [], ["--loops", 4]                    # eval.py's defaults: the figures the README quotes
    bench = ["--frames", 32, "--long", 1000, "--teacher_steps", 50]
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", "--device", dev,
             "tests/test_attention.py", "tests/test_render.py", "tests/test_teacher.py", "tests/test_bench.py",
             "tests/test_train.py"]
summary["eval"] = {}


def bring_back(name, src):
    """Copy one finished file into --out (at most 8 there, under 16 MiB each)."""
    if os.path.isfile(src) and os.path.getsize(src) < 16 * 2 ** 20:
        shutil.copyfile(src, os.path.join(args.out, name))


def evaluate(who, ckpt, extra):
    out = os.path.join(work, f"eval_{who}")
    stage(f"eval {who}", ["eval.py", "--ckpt", ckpt, "--out", out, "--device", dev, *evals, *extra], 120)
    js, png = eval_files(out)
    res = load_json(js)
    keep = ("mean", "covis_gain", "static", "detail_by_frame")
    summary["eval"][who] = res and dict(runs=[dict(steps=r.get("steps"), **{k: v for k, v in r.items() if k in keep})
                                              for r in res.get("runs", [])], stream=res.get("stream"), loops=res.get("loops"))
    bring_back(f"{who}_eval.json", js)
    if who == "student":
        bring_back("student_eval.png", png)
    write_summary()


def release(who, ckpt):
    """The float16 release file of a checkpoint (model.export), brought back."""
    if os.path.isfile(ckpt):
        path = os.path.join(work, f"{who}.pt")
        model.export(ckpt, path)
        bring_back(f"{who}.pt", path)


tdir = os.path.join(work, "teacher")
shutil.rmtree(tdir, ignore_errors=True)
teacher = ["teacher.py", "--preset", args.preset, "--pairs", args.pairs, "--out", tdir, "--minutes", args.teacher_minutes,
           "--eval_every", 5 if args.dry_run else 500, "--eval_steps", 10, "--save_every", 10 ** 6, "--device", dev]
rec = stage("teacher", teacher, 60 * args.teacher_minutes + 150)
if rec["status"] == "failed" and args.device.startswith("cuda"):           # e.g. no compiler for torch.compile
    shutil.rmtree(tdir, ignore_errors=True)
    rec = stage("teacher (eager)", teacher + ["--no-compile"], 60 * args.teacher_minutes + 90)
summary["teacher"] = load_json(os.path.join(tdir, "summary.json"))
try:                                     # the learning curve, to set beside the CPU teacher's (docs/results.md)
    with open(os.path.join(tdir, "evals.jsonl")) as f:
        summary["teacher_curve"] = [dict(step=e["step"], wall_min=round(e["wall_min"], 2), gain_1step=e["mean"]["gain"],
                                         gain_10steps=e["sample"]["gain"], static_1step=e["mean"]["static"])
                                    for e in map(json.loads, f)]
except (OSError, ValueError, KeyError):
    summary["teacher_curve"] = None
tckpt = os.path.join(tdir, "ckpt.pt")
release("teacher", tckpt)
if os.path.isfile(tckpt):
    evaluate("teacher", tckpt, ["--steps", "1,50"])
sdir = os.path.join(work, "student")
shutil.rmtree(sdir, ignore_errors=True)
data_dir = os.path.join(ROOT, args.data)
sf_data = ["--data", data_dir, "--loopaug", 0.5] if os.path.isdir(data_dir) else []
summary["student_data"] = data_dir if sf_data else "synthetic stream (no --data folder)"
if os.path.isfile(tckpt):
    shared = ["--teacher", tckpt, "--out", sdir, "--eval_every", 10 ** 6, "--device", dev]
    stage("causal", ["distill.py", "--stage", "causal", "--minutes", round(0.3 * args.student_minutes, 3), *shared],
          18 * args.student_minutes + 90)
    if os.path.isfile(os.path.join(sdir, "causal.pt")):
        stage("self-forcing", ["distill.py", "--stage", "selfforcing", "--minutes", round(0.7 * args.student_minutes, 3), *sf_data, *shared],
              42 * args.student_minutes + 90)
summary["student"] = load_json(os.path.join(sdir, "summary.json"))
sckpt = os.path.join(sdir, "ckpt.pt")
release("student", sckpt)
if os.path.isfile(sckpt):
    evaluate("student", sckpt, stream)
stage("bench", ["bench.py", "--ckpt", "", "--preset", args.bench_preset, "--device", dev, "--out", os.path.join(work, "bench"),
                "--no-compile", *bench], 120)
summary["bench"] = load_json(os.path.join(work, "bench", "bench.json"))
bring_back("bench.json", os.path.join(work, "bench", "bench.json"))
stage("tests", tests, 300)

# -----------------------------------------------------------------------------
# the end: the summary and the log (at most 16 MiB)

failed = [s["name"] for s in summary["stages"] if s["status"] != "ok"]
summary["failed"] = failed
write_summary()
say(f"gpu_run: {len(summary['stages']) - len(failed)} of {len(summary['stages'])} stages ok"
    + (f", not ok: {', '.join(failed)}" if failed else "") + f", {(time.time() - t_start) / 60:.1f} min -> {args.out}")
log.close()
if os.path.getsize(log_path) > 15 * 2 ** 20:                                # keep the log under 16 MiB: its end
    with open(log_path, "rb") as f:
        f.seek(-15 * 2 ** 20, 2)
        tail = f.read()
    with open(log_path, "wb") as f:
        f.write(tail)
sys.exit(1 if failed else 0)
