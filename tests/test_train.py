"""Training: overfitting, exact resume, Ctrl-C, the scripts end to end on `tiny`, DDP on gloo."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import camera
import data
from conftest import ROOT
from model import PRESETS, RealCamDiT, add_noise, encode_target, flow_loss, load_checkpoint, load_model
from teacher import DEPTH_LOSS

TINY = PRESETS["tiny"]


def test_tiny_teacher_overfits_one_batch():
    torch.manual_seed(0)
    cfg, S = TINY, TINY.size
    m = RealCamDiT(cfg)
    b = data.synthetic_batch(0, 4, 2, S, S)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    x0 = encode_target(b["tgt"], b["src"], cfg)
    g = torch.Generator().manual_seed(0)
    e, t = torch.randn(x0.shape, generator=g), torch.rand(x0.shape[:2], generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = flow_loss(m(b["src"], add_noise(x0, e, t), cs, ct, t), x0, t, cfg).mean()   # as teacher.py trains
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_depth_term_known_answers():
    """teacher.depth_loss: the targets' own entropy at logits log(target) (its least), log K at
    uniform logits, masked pixels left out, 0 with no pixel."""
    from teacher import depth_loss
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 3, 5, 4, 4, generator=g).softmax(2)
    mask = torch.rand(2, 3, 4, 4, generator=g) > 0.3
    ent = -(w * w.log()).sum(2)
    assert torch.allclose(depth_loss(w.log(), w, mask), ent[mask].mean())
    assert torch.allclose(depth_loss(torch.zeros_like(w), w, mask), torch.tensor(5.0).log())
    assert depth_loss(torch.randn(w.shape, generator=g), w, mask) > ent[mask].mean()
    junk = w.log().clone()
    junk[:, :, :, ~mask[0, 0]] = 50.0                                        # masked pixels do not count
    assert torch.allclose(depth_loss(junk, w, mask.logical_and(mask[:1, :1])), depth_loss(w.log(), w, mask.logical_and(mask[:1, :1])))
    assert depth_loss(w.log(), w, torch.zeros_like(mask)) == 0


def test_depth_term_teaches_the_warp_head_the_depth():
    """On one synthetic batch rendered with depth, the depth term alone (teacher.train_step's: the
    warp head's plane logits kept with their gradient, model.last_warp) falls to near its least,
    the entropy of the true depth's weights; the head's mean inverse depth moves to the truth."""
    from teacher import depth_loss
    torch.manual_seed(0)
    cfg, S = TINY, TINY.size
    m = RealCamDiT(cfg)
    b = data.synthetic_batch(0, 4, 2, S, S, depth=True)
    w, mask = camera.plane_target(b, cfg.warp)
    B, T, K = *b["src"].shape[:2], len(cfg.warp)
    assert mask.float().mean() > 0.3 and torch.allclose(w.sum(2), torch.ones(B, T, S, S))
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    x0, t = encode_target(b["tgt"], b["src"], cfg), torch.full((B, T), 0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    least = depth_loss(w.clamp(min=1e-12).log(), w, mask).item()
    P = torch.tensor(cfg.warp).view(K, 1, 1)
    err = lambda o: ((o.softmax(2) * P).sum(2) - (w * P).sum(2)).abs()[mask].mean().item()
    losses, errs = [], []
    for _ in range(150):
        m(b["src"], add_noise(x0, torch.zeros_like(x0), t), cs, ct, t)
        o = m.last_warp.view(B, 2 * T, K + 1, S, S)[:, T:, :K]
        loss = depth_loss(o, w, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item()), errs.append(err(o.detach()))
    assert losses[0] > least + 0.5 and losses[-1] < least + 0.25, (least, losses[0], losses[-1])
    assert errs[-1] < errs[0] / 3, (errs[0], errs[-1])


def test_train_step_adds_the_weighted_depth_term_of_the_targets_that_kept_their_camera():
    """teacher.train_step with a depth target: its loss is the flow loss plus --depth_loss x the
    term, and the term is depth_loss on the TARGET frames' plane logits over co-visible pixels of
    the clips whose camera was not dropped (the same draws of e, t and the drop as the step's)."""
    import copy
    from argparse import Namespace
    import teacher
    from model import null_camera, sample_t
    torch.manual_seed(0)
    cfg, S = TINY, TINY.size
    b = data.synthetic_batch(3, 8, 3, S, S, depth=True)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    w, mask = camera.plane_target(b, cfg.warp)
    batch = (b["src"], b["tgt"], cs, ct, (w, mask))
    args = Namespace(seed=0, cond_drop=0.5, depth_loss=0.7, device="cpu", clip=1.0, ema=0.999)
    m = RealCamDiT(cfg)
    with torch.no_grad():
        m.warp_out.weight.normal_(0, 0.5)                                    # a head with opinions
    ref = copy.deepcopy(m)
    (B, T), K = b["src"].shape[:2], len(cfg.warp)
    g = data.rng(0, 5, 0, 1)                                                 # train_step's draws at step 5
    x0 = encode_target(b["tgt"], b["src"], cfg)
    e = torch.randn(x0.shape, generator=g)
    t = sample_t((B, 1), cfg.shift, g).expand(B, T)
    drop = torch.rand(B, generator=g) < args.cond_drop
    assert drop.any() and not drop.all()
    with torch.no_grad():
        out = ref(b["src"], add_noise(x0, e, t), cs, torch.where(drop[:, None, None, None, None], null_camera(ct), ct), t)
        o = ref.last_warp.view(B, 2 * T, K + 1, S, S)[:, T:, :K]
        want = teacher.depth_loss(o, w, mask & ~drop[:, None, None, None])
        flow = flow_loss(out, x0, t, cfg).mean()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    loss, _, dterm = teacher.train_step(m, m, copy.deepcopy(m), opt, batch, 5, 1e-4, args, 0)
    assert torch.allclose(dterm, want, atol=1e-5) and torch.allclose(loss, flow + 0.7 * want, atol=1e-5)
    assert not torch.allclose(want, teacher.depth_loss(o, w, mask), atol=1e-3)      # the drop matters here
    assert m.last_warp is None                                                  # no graph kept after the step
    _, _, none = teacher.train_step(m, m, copy.deepcopy(m), opt, batch[:4] + (None,), 6, 1e-4, args, 0)
    assert none is None


def teacher(script, out, *extra, device="cpu", ok=True):
    return script("teacher.py", "--preset", "tiny", "--out", out, "--pairs", 4, "--max_pairs", 3,
                  "--eval_every", 4, "--eval_steps", 2, "--save_every", 100, "--warmup", 2, "--device", device, *extra,
                  ok=ok)


@pytest.mark.cpu_only
def test_resume_continues_exactly(script, tmp_path):
    """Stop after 3 steps, resume to 6 == an uninterrupted run of 6 (model, EMA, optimizer)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    teacher(script, a, "--max_steps", 6)
    r = teacher(script, b, "--max_steps", 6, "--stop_at", 3)
    assert "stopped at step 3" in r.stdout
    assert load_checkpoint(os.path.join(b, "ckpt.pt"))["step"] == 3
    assert "trained with --depth_loss" not in teacher(script, b, "--max_steps", 6, "--resume").stdout
    ca, cb = load_checkpoint(os.path.join(a, "ckpt.pt")), load_checkpoint(os.path.join(b, "ckpt.pt"))
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), f"{key}.{k} differs"
    assert torch.equal(ca["optim"]["state"][0]["exp_avg"], cb["optim"]["state"][0]["exp_avg"])


def test_resume_says_when_the_depth_weight_changes(script, tmp_path):
    """A run resumed with another --depth_loss than it was trained with says so (a run saved before
    the term existed counts as 0)."""
    out = str(tmp_path / "r")
    teacher(script, out, "--max_steps", 1, "--depth_loss", 0)
    r = teacher(script, out, "--max_steps", 2, "--resume")
    assert f"--resume: the run was trained with --depth_loss 0; it goes on with {DEPTH_LOSS:g}" in r.stdout
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    del ckpt["args"]["depth_loss"]
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    assert "trained with --depth_loss 0;" in teacher(script, out, "--max_steps", 3, "--resume").stdout


@pytest.mark.cpu_only
def test_ctrl_c_saves_a_whole_step(script, tmp_path):
    """SIGINT mid-run: exit 130 and a checkpoint at a step boundary, equal to a run stopped there."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--preset", "tiny", "--pairs", 4, "--max_pairs", 3, "--eval_every", 10 ** 6, "--save_every", 10 ** 6,
            "--warmup", 2, "--max_steps", 10 ** 6, "--device", "cpu"]
    cmd = [sys.executable, "-u", "teacher.py", "--out", b, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:                       # steps 0..4 are logged: interrupt during the run
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted after" in out and "Traceback" not in out, out
    k = load_checkpoint(os.path.join(b, "ckpt.pt"))["step"]
    assert k >= 4
    script("teacher.py", "--out", a, *args, "--stop_at", k)
    ca, cb = load_checkpoint(os.path.join(a, "ckpt.pt")), load_checkpoint(os.path.join(b, "ckpt.pt"))
    for key in ("model", "ema"):
        for n in ca[key]:
            assert torch.equal(ca[key][n], cb[key][n]), f"{key}.{n} differs"


def test_teacher_eval_data_end_to_end(script, tmp_path, device):
    d, run = str(tmp_path / "ds"), str(tmp_path / "run")
    r = script("data.py", "--out", d, "--scenes", 2, "--cams", 3, "--frames", 5, "--size", 16)
    assert os.path.isfile(os.path.join(d, "preview.mp4")) and "wrote 2 scenes" in r.stdout
    scene = data.load_scene(os.path.join(d, "scene_00001"))
    assert scene["frames"].shape == (3, 5, 3, 16, 16) and scene["c2w"].shape == (3, 5, 4, 4)
    # teacher on the on-disk dataset, with a periodic evaluation and sample video
    r = teacher(script, run, "--max_steps", 5, "--data", d, device=device)
    log = open(os.path.join(run, "log.txt")).read()
    assert "eval 4" in r.stdout + r.stderr and "step 4/5" in log and "| depth" in log   # data.py writes the depth
    for f in ("ckpt.pt", "sample.mp4", "sample.png"):
        assert os.path.isfile(os.path.join(run, f)), f
    # eval.py on the result: a table and a JSON with every family
    r = script("eval.py", "--ckpt", os.path.join(run, "ckpt.pt"), "--clips", 2, "--frames", 3, "--steps", 2, "--out", run)
    assert "mean" in r.stdout
    res = json.load(open(os.path.join(run, "eval.json")))["runs"][0]
    assert res["steps"] == 2 and set(res["families"]) == {"static", "orbit", "pan", "tilt", "dolly", "zoom", "truck", "pedestal"}
    assert res["families"]["static"]["psnr_copy"] == 100.0                   # identity: copy is exact
    assert all(0 < v["psnr_copy"] < 40 for f, v in res["families"].items() if f != "static")
    model, ckpt = load_model(os.path.join(run, "ckpt.pt"))
    assert ckpt["step"] == 5 and ckpt["args"]["data"] == d


def test_scripts_fail_clearly(script, tmp_path):
    r = script("teacher.py", "--preset", "tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), ok=False)
    assert r.returncode != 0 and "error: dataset folder not found" in r.stderr and "Traceback" not in r.stderr
    r = script("eval.py", "--ckpt", str(tmp_path / "missing.pt"), ok=False)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = script("eval.py", "--ckpt", str(bad), ok=False)
    assert r.returncode != 0 and "cannot load checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_ddp_two_cpu_processes(tmp_path, device):
    """teacher.py under torchrun with two processes: gloo on the CPU, NCCL with two GPUs."""
    if device != "cpu" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    out = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "teacher.py", "--preset", "tiny", "--out", out, "--pairs", "2", "--max_pairs", "2",
                        "--max_steps", "3", "--eval_every", "100", "--save_every", "100", "--device", device],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes a step" in r.stdout and load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


def bar_end(stderr):
    """The last state of a tqdm bar in a script's stderr ('\r' between its updates)."""
    return [s for s in stderr.replace("\r", "\n").splitlines() if "%|" in s][-1]


@pytest.mark.cpu_only
def test_a_diverged_run_saves_nothing_and_resumes(script, tmp_path):
    """A NaN loss (a learning rate of 1e30) stops the run with one error line at the next step, the
    last good checkpoint stays (finite, its step) and --resume continues it; distill.py alike. The
    progress bars end full, over the steps or, with --minutes, over the time."""
    out = str(tmp_path / "t")
    args = ["--max_steps", 4, "--warmup", 0, "--eval_every", 0]
    r = teacher(script, out, *args, "--stop_at", 2)
    r = teacher(script, out, *args, "--resume", "--lr", "1e30", ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: training diverged at step 3: the loss is nan") and "%|" not in lines[-1]
    assert f"{out}/ckpt.pt (step 2) stands: continue it with --resume" in lines[-1]
    ck = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    r = teacher(script, out, *args, "--resume")
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 4 and "100%" in bar_end(r.stderr)
    assert "| 2/2 [" in bar_end(r.stderr)
    r = teacher(script, str(tmp_path / "m"), "--minutes", 0.03, "--eval_every", 0)
    assert "100%" in bar_end(r.stderr) and "s of the time" in bar_end(r.stderr)
    student, common = str(tmp_path / "s"), ["--teacher", os.path.join(out, "ckpt.pt"), "--pairs", 2, "--max_pairs", 3,
                                            "--eval_every", 0]
    r = script("distill.py", *common, "--out", student, "--stage", "causal", "--lr", "1e30", ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: causal diverged at step ") and "the loss is nan" in lines[-1]
    assert "no causal checkpoint was written by this run" in lines[-1] and not os.path.exists(student + "/causal.pt")
    r = script("distill.py", *common, "--out", student, "--causal_steps", 3, "--selfforcing_steps", 2)
    bars = [s for s in r.stderr.replace("\r", "\n").splitlines() if "%|" in s]
    assert any("100%" in b and "| 3/3 [" in b for b in bars) and "100%" in bars[-1] and "| 2/2 [" in bars[-1]
    r = script("distill.py", *common, "--out", str(tmp_path / "sm"), "--minutes", 0.05)
    assert "100%" in bar_end(r.stderr) and "s of the time" in bar_end(r.stderr)
