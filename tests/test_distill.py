"""Distillation: DMD on a toy with a closed-form score, gradient truncation in Self-Forcing
rollouts, the cached few-step sampler against full masked forwards, distill.py end to end."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

import model

from conftest import ROOT
from attention import KVCache
from distill import dmd_loss, dmd_timestep, real_score, recon_loss, rollout, selfforcing_step
from model import PRESETS, decode_target, save_checkpoint, student_chunk, student_sample, student_timesteps
from test_model import inputs, random_model

TINY = PRESETS["tiny"]

# -----------------------------------------------------------------------------
# DMD on a 2-D Gaussian: real score in closed form, critic learned with flow matching

MU = torch.tensor([2.0, -1.0])
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 0.6]])


def gaussian_x0(xt, t, mu, sigma):
    """E[x0 | x_t] for x0 ~ N(mu, sigma), x_t = (1 - t) x0 + t e: the exact denoiser."""
    a = (1 - t)[:, None, None]
    C = a ** 2 * sigma + (t ** 2)[:, None, None] * torch.eye(2)
    return mu + (a * sigma @ torch.linalg.solve(C, (xt - a[:, :, 0] * mu)[..., None]))[..., 0]


def run_toy_dmd(flip, steps=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(2, requires_grad=True)                       # generator x = A z + b, starts at N(0, I)
    b = torch.zeros(2, requires_grad=True)
    mu_f = torch.zeros(2, requires_grad=True)                  # critic: a Gaussian denoiser with
    L_f = torch.eye(2, requires_grad=True)                     # learned mean and covariance L L^T
    opt_g = torch.optim.Adam([A, b], lr=0.02)
    opt_c = torch.optim.Adam([mu_f, L_f], lr=0.05)
    for _ in range(steps):
        for _ in range(5):                                     # critic: flow matching on fresh samples
            x = (torch.randn(256, 2, generator=g) @ A.T + b).detach()
            t = torch.rand(256, generator=g).clamp(0.02, 0.98)
            e = torch.randn(256, 2, generator=g)
            xt = (1 - t[:, None]) * x + t[:, None] * e
            x0 = gaussian_x0(xt, t, mu_f, L_f @ L_f.T + 1e-4 * torch.eye(2))
            loss_c = ((xt - x0) / t[:, None] - (e - x)).square().mean()     # v = (x_t - x0) / t
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        x = torch.randn(256, 2, generator=g) @ A.T + b
        t = dmd_timestep(256, 1.0, g)
        xt = (1 - t[:, None]) * x.detach() + t[:, None] * torch.randn(256, 2, generator=g)
        with torch.no_grad():
            x0_real = gaussian_x0(xt, t, MU, SIGMA)
            x0_fake = gaussian_x0(xt, t, mu_f, L_f @ L_f.T + 1e-4 * torch.eye(2))
        if flip:                                               # the same loss with g -> -g
            x0_fake = 2 * x0_real - x0_fake
        loss, _ = dmd_loss(x, x0_real, x0_fake)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    with torch.no_grad():
        return b.clone(), A @ A.T


def test_dmd_moves_the_generator_to_the_target():
    mean, cov = run_toy_dmd(flip=False)
    assert (mean - MU).norm() < 0.15, mean
    assert (cov - SIGMA).norm() < 0.25, cov


def test_dmd_with_the_sign_flipped_diverges():
    mean, cov = run_toy_dmd(flip=True)
    start = MU.norm()                                          # distance of N(0, I)'s mean
    assert (mean - MU).norm() > start + 1.0, mean

# -----------------------------------------------------------------------------
# Self-Forcing rollouts


def test_gradients_only_through_the_exit_step_and_never_across_chunks():
    m = random_model(replace(TINY, window=0))
    src, _, cs, ct, _ = inputs(1, 2)
    calls = []
    inner = m.forward_frames
    def spy(*a, **k):
        out = inner(*a, **k)
        calls.append((out.requires_grad, a[7] if len(a) > 7 else k.get("write")))
        return out
    m.forward_frames = spy
    steps, exit_step = 4, 2
    noise = [torch.randn(steps, 1, 1, 3, 16, 16, requires_grad=True) for _ in range(2)]
    cache, outs = KVCache(m.cfg), []
    for c in range(2):
        outs.append(student_chunk(m, cache, src[:, c:c + 1], cs[:, c:c + 1], ct[:, c:c + 1], torch.tensor([c]),
                                  steps, noise[c], exit_step))
    # per chunk: source write, exit_step + 1 denoising passes, the clean write; one keeps gradients
    assert len(calls) == 2 * (exit_step + 3)
    assert [c[0] for c in calls] == ([False] * (exit_step + 1) + [True, False]) * 2
    assert not any(wr for grad, wr in calls if grad)                # passes that write have no gradient
    assert all(not k.requires_grad for k in cache.k + cache.v)
    outs[1].sum().backward()
    assert noise[0].grad is None                                   # nothing crosses chunks
    gn = noise[1].grad.flatten(1).norm(dim=1)
    assert gn[exit_step] > 0 and (gn[:exit_step] == 0).all()       # earlier steps carry no gradient
    m.forward_frames = inner
    # rollout(): same exit step for every chunk, the output keeps a graph to the weights
    x = rollout(m, src, cs, ct, steps, 1, torch.Generator().manual_seed(0))
    x.square().mean().backward()
    assert x.shape == src.shape and m.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk,window", [(1, 0), (2, 2), (1, 2)])
@pytest.mark.parametrize("steps", [1, 3])
def test_cached_few_step_sampler_equals_full_masked_forwards(chunk, window, steps):
    cfg = replace(TINY, chunk=chunk, window=window)
    m = random_model(cfg)
    B, T = 2, 5
    src, _, cs, ct, _ = inputs(B, T, cfg)
    got = student_sample(m, src, cs, ct, steps, generator=torch.Generator().manual_seed(3))
    # reference: the same noise, each step a full block-causal forward over every pair so far
    g, ts = torch.Generator().manual_seed(3), student_timesteps(steps, cfg.shift)
    done = torch.zeros(B, 0, 3, 16, 16)
    with torch.no_grad():
        for c0 in range(0, T, chunk):
            n = min(chunk, T - c0)
            noise = torch.randn((steps, B, n, 3, 16, 16), generator=g)
            x, end = noise[0], c0 + n
            for j in range(steps):
                t = torch.cat([torch.zeros(B, c0), torch.full((B, n), ts[j])], 1)
                x0 = m(src[:, :end], torch.cat([done, x], 1), cs[:, :end], ct[:, :end], t, causal=True)[:, c0:]
                x = (1 - ts[j + 1]) * x0 + ts[j + 1] * noise[j + 1] if j < steps - 1 else x
            done = torch.cat([done, x0], 1)
    ref = decode_target(done, src, cfg)
    assert (got - ref).norm() / ref.norm() < 1e-5

# -----------------------------------------------------------------------------


def test_distill_stages_end_to_end(script, tmp_path):
    teacher = random_model(TINY)
    tpath = str(tmp_path / "teacher.pt")
    save_checkpoint(tpath, model=teacher.state_dict(), ema=teacher.state_dict(), config=asdict(TINY), step=0)
    out = str(tmp_path / "student")
    common = ["--teacher", tpath, "--out", out, "--pairs", 2, "--max_pairs", 2, "--eval_every", 2]
    r = script("distill.py", "--stage", "causal", "--causal_steps", 2, *common)
    assert "eval causal 2" in r.stdout + r.stderr
    r = script("distill.py", "--stage", "selfforcing", "--init", os.path.join(out, "causal.pt"), "--selfforcing_steps", 2,
               "--critic_steps", 1, "--dmd", 1, *common)
    log = open(os.path.join(out, "log.txt")).read()
    assert "causal 1/2" in log and "selfforcing 1/2" in log and "|g|" in log and "critic" in log
    lines = log.splitlines()                   # the synthetic stream has depth: the causal stage's term
    assert all("| depth " in x for x in lines if x.startswith("causal "))
    assert not any("| depth " in x for x in lines if x.startswith("selfforcing "))
    r = script("eval.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--clips", 1, "--frames", 3, "--families", "orbit,pan",
               "--out", out)
    ev = json.load(open(os.path.join(out, "eval.json")))
    runs, stream = ev["runs"], ev["stream"]
    assert [r["steps"] for r in runs] == [1, 2, 4] and all(r["sampler"] == "student" for r in runs)
    # the long stream by thirds and frame by frame: 48 frames; the orbit starts and ends at the
    # source's pose, where copy is exact (marked "=" in the printed rows)
    assert {"third1", "third2", "third3", "by_frame"} <= set(stream)
    bf = stream["by_frame"]
    assert all(len(v) == 48 for v in bf.values()) and bf["covis_copy"][0] >= 50 and bf["covis_copy"][24] < 50
    row = next(line for line in r.stdout.splitlines() if "minus copy's, oracle, by 2 frames" in line)
    blocks = [float(v) for v in row.split(": ")[1].split()]                    # a figure every 2 frames
    assert len(blocks) == 24 and all(math.isnan(v) or v > 0 for v in blocks)  # the oracle beats copy
    # the teacher flag refuses a student checkpoint
    r = script("distill.py", "--teacher", os.path.join(out, "ckpt.pt"), "--out", out, ok=False)
    assert r.returncode != 0 and "student checkpoint" in r.stderr and "Traceback" not in r.stderr

# -----------------------------------------------------------------------------
# DMD's wiring through selfforcing_step and critic_step, with analytic scores


class ConstX(torch.nn.Module):
    """An analytic score for the wiring tests: predicts the clean x0 = c (a learnable scalar)
    everywhere, or c_null where the camera is withheld (model.null_camera)."""

    def __init__(self, c, c_null=None):
        super().__init__()
        self.cfg = TINY
        self.c = torch.nn.Parameter(torch.tensor(float(c)))
        self.c_null = c_null

    def forward(self, src, xt, cam_src, cam_tgt, t, causal=False):
        if self.c_null is not None and not cam_tgt.any():
            return torch.full_like(xt, self.c_null)
        return self.c.expand_as(xt)


def test_causal_step_adds_the_depth_term_of_the_noised_target_chunks():
    """distill.causal_step given a depth target: its loss is the flow loss on the noised chunks
    plus distill.CAUSAL_DEPTH x depth_loss on the TARGET frames' plane logits over the co-visible
    pixels of noised chunks (clean chunks are context: no loss), with the step's own draws of e
    and t; without a target it is the flow loss alone."""
    import copy
    from distill import CAUSAL_DEPTH, causal_step, chunk_timesteps
    from model import add_noise, encode_target, flow_loss
    from teacher import depth_loss
    import camera
    import data
    torch.manual_seed(0)
    cfg, S = replace(TINY, chunk=1, window=4), TINY.size
    b = data.synthetic_batch(2, 8, 4, S, S, depth=True)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    w, mask = camera.plane_target(b, cfg.warp)
    batch = (b["src"], b["tgt"], cs, ct)
    m = model.RealCamDiT(cfg)
    with torch.no_grad():
        m.warp_out.weight.normal_(0, 0.5)                                    # a head with opinions
    ref = copy.deepcopy(m)
    (B, T), K = b["src"].shape[:2], len(cfg.warp)
    g = torch.Generator().manual_seed(7)
    x0 = encode_target(b["tgt"], b["src"], cfg)
    e = torch.randn(x0.shape, generator=g)
    t = chunk_timesteps(B, T, cfg.chunk, cfg.shift, g)
    assert (t == 0).any() and (t > 0).any()
    with torch.no_grad():
        out = ref(b["src"], add_noise(x0, e, t), cs, ct, t, causal=True)
        o = ref.last_warp.view(B, 2 * T, K + 1, S, S)[:, T:, :K]
        want = depth_loss(o, w, mask & (t > 0)[..., None, None])
        n = (t > 0).float()
        flow = (flow_loss(out, x0, t, cfg) * n).sum() / n.sum()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    loss, _, dterm = causal_step(m, opt, batch, torch.Generator().manual_seed(7), 1.0, depth=(w, mask))
    assert torch.allclose(dterm, want, atol=1e-5) and torch.allclose(loss, flow + CAUSAL_DEPTH * want, atol=1e-5)
    assert not torch.allclose(want, depth_loss(o, w, mask), atol=1e-3)      # the clean chunks matter here
    assert m.last_warp is None                                              # no graph kept after the step
    loss, _, none = causal_step(ref, opt, batch, torch.Generator().manual_seed(7), 1.0)
    assert none is None and torch.allclose(loss, flow, atol=1e-5)


def zero_student():
    """A causal tiny student as built (output layers at 0): its rollouts are exactly 0."""
    return model.RealCamDiT(replace(TINY, window=2))


def test_dmd_step_moves_the_student_toward_the_real_score():
    """Teacher (real score) says x0 = +0.5, critic (fake) says -0.5: one generator step moves the
    student's rollout from 0 toward +0.5. Swapping the two scores (a sign flip) moves it away."""
    src, tgt, cs, ct, _ = inputs(2, 3)
    batch = (src, tgt, cs, ct)
    go = lambda student: rollout(student, src, cs, ct, 2, 1, torch.Generator().manual_seed(0)).detach()
    for real, fake in ((0.5, -0.5), (-0.5, 0.5)):
        student, teacher, critic = zero_student(), ConstX(real), ConstX(fake)
        assert go(student).abs().max() == 0
        opt, opt_c = torch.optim.SGD(student.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=0.0)
        g, gs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        selfforcing_step(student, opt, teacher, critic, batch, 2, g, gs, clip=1e9, dmd=1.0, recon=0.0, opt_c=opt_c)
        x = go(student)
        assert (x - real).abs().mean() < 0.5 and x.mean() * real > 0, f"real {real}: rollout mean {x.mean():.3f}"


def test_critic_learns_the_students_samples_not_the_truth():
    """The student's rollouts are 0, the truth is 0.8 (residual target src + 0.8): a critic
    started at 0.4 and updated inside selfforcing_step goes to the rollouts' 0. Trained on the truth, it
    would go to 0.8."""
    src, _, cs, ct, _ = inputs(2, 3)
    batch = (src, src + 0.8, cs, ct)
    student, teacher, critic = zero_student(), ConstX(0.0), ConstX(0.4)
    opt, opt_c = torch.optim.SGD(student.parameters(), lr=0.0), torch.optim.Adam(critic.parameters(), lr=0.05)
    for step in range(20):
        g, gs = torch.Generator().manual_seed(step), torch.Generator().manual_seed(100 + step)
        *_, loss_c = selfforcing_step(student, opt, teacher, critic, batch, 2, g, gs, clip=1e9, dmd=1.0, recon=0.0,
                                      opt_c=opt_c, critic_steps=2)
    assert abs(critic.c.item()) < 0.15 and loss_c.item() < 0.5, f"critic x0 {critic.c.item():.3f}"


def test_real_score_guidance_known_answer():
    """Classifier-free guidance of the real score: x0(no camera) + s (x0(camera) - x0(no camera))."""
    src, xt, cs, ct, t = inputs(1, 2)
    teacher = ConstX(0.5, c_null=0.1)
    assert torch.allclose(real_score(teacher, src, xt, cs, ct, t), torch.tensor(0.5))
    assert torch.allclose(real_score(teacher, src, xt, cs, ct, t, guidance=2.0), torch.tensor(0.9))


def test_recon_loss_on_known_errors():
    """Two frames off by a uniform 0.1 and 0.01: the reconstruction term is the mean over frames of
    log(mse + 1e-4) and pulls the better frame harder, by (2 e / (e^2 + eps)) per pixel: 0.2 / 0.0101
    against 0.02 / 0.0002 (one mse over both would pull the worse frame 10x harder)."""
    y = torch.zeros(1, 2, 3, 4, 4)
    x = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])[None].requires_grad_(True)
    lp = recon_loss(x, y)
    assert torch.allclose(lp, (torch.log(torch.tensor(0.01 + 1e-4)) + torch.log(torch.tensor(1e-4 + 1e-4))) / 2)
    (gp,) = torch.autograd.grad(lp, x)
    n = 3 * 4 * 4
    assert torch.allclose(gp[0, 0], torch.tensor(0.2 / 0.0101 / n / 2)) and torch.allclose(gp[0, 1], torch.tensor(0.02 / 0.0002 / n / 2))


def sf_start(tmp_path, cfg=TINY):
    """A random tiny teacher and a causal student (window 2) saved as distill.py's selfforcing
    stage starts from them: (teacher, student, teacher path, student path)."""
    teacher, init = random_model(cfg, 1), random_model(replace(cfg, window=2), 0)
    tpath, spath = str(tmp_path / "teacher.pt"), str(tmp_path / "causal.pt")
    save_checkpoint(tpath, model=teacher.state_dict(), ema=teacher.state_dict(), config=asdict(cfg), step=0)
    save_checkpoint(spath, model=init.state_dict(), ema=init.state_dict(), config=asdict(replace(cfg, window=2)), step=1,
                    student=dict(steps=4, stage="causal"))
    return teacher, init, tpath, spath


def test_loss_switches_through_distill(script, tmp_path):
    """One DMD step from the same start: --guidance 2 and --recon 0 (DMD alone) each take another
    generator step; the critic is trained on the step's rollout."""
    teacher, init, tpath, spath = sf_start(tmp_path)
    common = ["--stage", "selfforcing", "--teacher", tpath, "--init", spath, "--selfforcing_steps", 1, "--critic_steps", 1,
              "--dmd", 1, "--pairs", 2, "--max_pairs", 2, "--eval_every", 0]
    script("distill.py", *common, "--out", tmp_path / "a")
    script("distill.py", *common, "--out", tmp_path / "b", "--guidance", 2)
    script("distill.py", *common, "--out", tmp_path / "c", "--recon", 0)
    a, b, c = (torch.load(str(tmp_path / r / "selfforcing.pt"), weights_only=True) for r in "abc")
    assert (a["args"]["recon"], c["args"]["recon"], b["args"]["guidance"]) == (1.0, 0.0, 2.0)
    assert not torch.equal(a["model"]["out.weight"], c["model"]["out.weight"])      # another loss, another step
    assert not torch.equal(a["model"]["out.weight"], b["model"]["out.weight"])      # another real score
    assert not torch.equal(a["critic"]["out.weight"], teacher.state_dict()["out.weight"])   # the critic trained


def test_critic_only_where_dmd_runs(script, tmp_path):
    """--dmd 0 builds no critic: the stage's checkpoint holds none. Resumed with
    --dmd 1 and more steps, the stage builds one from the teacher, trains it and saves it. The
    warp head (the teacher's) trains at its own rate, --warp_lr's default 2e-3."""
    teacher, init, tpath, spath = sf_start(tmp_path)
    out = tmp_path / "s"
    common = ["--stage", "selfforcing", "--teacher", tpath, "--init", spath, "--out", out, "--critic_steps", 1, "--pairs", 2,
              "--max_pairs", 2, "--eval_every", 0]
    script("distill.py", *common, "--selfforcing_steps", 1, "--dmd", 0)
    ck = torch.load(str(out / "selfforcing.pt"), weights_only=True)
    assert ck["step"] == 1 and "critic" not in ck and "optim_critic" not in ck
    assert [g["lr"] for g in ck["optim"]["param_groups"]] == [5e-5, 2e-3]
    script("distill.py", *common, "--selfforcing_steps", 2, "--dmd", 1, "--resume")
    ck = torch.load(str(out / "selfforcing.pt"), weights_only=True)
    assert ck["step"] == 2 and "optim_critic" in ck
    assert not torch.equal(ck["critic"]["out.weight"], teacher.state_dict()["out.weight"])     # trained from the teacher


def test_warp_head_added_to_a_student_through_distill(script, tmp_path):
    """A teacher and a student without the warp head: the student gets one, its weights load, the
    head starts at 0 and trains at --warp_lr (its own optimizer group); --resume keeps the head and
    both rates."""
    teacher, init, tpath, spath = sf_start(tmp_path, replace(TINY, warp=()))
    out = tmp_path / "s"
    common = ["--stage", "selfforcing", "--teacher", tpath, "--init", spath, "--out", out, "--pairs", 2, "--max_pairs", 2,
              "--eval_every", 0, "--warp_lr", 1e-3]
    script("distill.py", *common, "--selfforcing_steps", 2)
    ck = torch.load(str(out / "selfforcing.pt"), weights_only=True)
    assert "warp_out.weight" not in init.state_dict()
    assert tuple(ck["config"]["warp"]) == model.WARP_PLANES and ck["model"]["warp_out.weight"].abs().sum() > 0
    assert [g["lr"] for g in ck["optim"]["param_groups"]] == [5e-5, 1e-3]
    assert not torch.equal(ck["model"]["patch_embed.weight"], init.state_dict()["patch_embed.weight"])   # all of it trains
    script("distill.py", *common, "--selfforcing_steps", 3, "--resume")
    ck2 = torch.load(str(out / "selfforcing.pt"), weights_only=True)
    assert ck2["step"] == 3 and tuple(ck2["config"]["warp"]) == model.WARP_PLANES
    assert [g["lr"] for g in ck2["optim"]["param_groups"]] == [5e-5, 1e-3]
    assert not torch.equal(ck["model"]["warp_out.weight"], ck2["model"]["warp_out.weight"])


def test_distill_from_the_shipped_teacher(script, tmp_path):
    """README: `distill.py --teacher checkpoints/teacher_small.pt` (a float16 release file, no warp
    head) runs both stages; the student gets the warp head."""
    out = tmp_path / "s"
    script("distill.py", "--teacher", os.path.join(ROOT, "checkpoints", "teacher_small.pt"), "--out", out,
           "--causal_steps", 1, "--selfforcing_steps", 1, "--critic_steps", 1, "--pairs", 2, "--max_pairs", 2,
           "--eval_every", 0)
    ck = torch.load(str(out / "ckpt.pt"), weights_only=True)
    assert ck["step"] == 1 and ck["student"]["stage"] == "selfforcing" and ck["config"]["size"] == 32
    assert tuple(ck["config"]["warp"]) == model.WARP_PLANES
    assert all(v.dtype == torch.float32 for v in ck["model"].values())


def test_reconstruction_term_pulls_the_rollout_to_the_truth():
    """With the critic equal to the teacher (and not updated) the DMD gradient is exactly zero (x0_fake = x0_real):
    without --recon the student does not move; with it, the rollout's error against the true
    target falls step after step."""
    import camera
    import data
    cfg = replace(TINY, window=2)
    S = cfg.size
    b = data.synthetic_batch(0, 4, 2, S, S)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    batch = (b["src"], b["tgt"], cs, ct)
    teacher = random_model(TINY, 1).requires_grad_(False)

    def run(recon, n):
        student = random_model(cfg, 0)
        student.load_state_dict({k: 0.5 * v for k, v in student.state_dict().items()})
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        errs = []
        for i in range(n):
            g, gs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(100 + i)
            selfforcing_step(student, opt, teacher, teacher, batch, 2, g, gs, clip=10.0, recon=recon, dmd=1.0,
                             critic_steps=0)
            with torch.no_grad():
                x = rollout(student, b["src"], cs, ct, 2, 1, torch.Generator().manual_seed(7))
            errs.append((decode_target(x, b["src"], cfg) - b["tgt"]).square().mean().item())
        moved = any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        return errs, moved

    _, moved = run(0.0, 2)
    assert not moved
    errs, moved = run(1.0, 15)
    assert moved and errs[-1] < 0.7 * errs[0], errs


def test_dmd_weight_zero_is_self_forcing_on_the_truth_alone():
    """--dmd 0: the generator step never calls the teacher or the critic (both None here) and
    the reconstruction term alone pulls the student's own rollout to the true target."""
    import camera
    import data
    cfg = replace(TINY, window=2)
    S = cfg.size
    b = data.synthetic_batch(0, 4, 4, S, S)
    cs, ct = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
    batch = (b["src"], b["tgt"], cs, ct)
    student = random_model(cfg, 0)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    errs = []
    for i in range(15):
        g, gs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(100 + i)
        loss, gnorm_g, *_ = selfforcing_step(student, opt, None, None, batch, 2, g, gs, clip=10.0, recon=1.0, dmd=0.0)
        assert gnorm_g.abs().sum() == 0
        with torch.no_grad():
            x = rollout(student, b["src"], cs, ct, 2, 1, torch.Generator().manual_seed(7))
        errs.append((decode_target(x, b["src"], cfg) - b["tgt"]).square().mean().item())
    assert errs[-1] < 0.7 * errs[0], errs


# -----------------------------------------------------------------------------
# DDP (two CPU processes on gloo) and time-boxed runs


def _ddp_worker(rank, world, init, out):
    """One rank: different weights and gradients on each; broadcast, then the bucketed all-reduce
    (all_reduce calls counted); what it holds after each is saved for the test."""
    import torch.distributed as dist
    import common
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls, inner = [], dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), inner(t, *a, **k))[1]
    m = random_model(TINY, seed=rank)
    common.broadcast([m])
    g = torch.Generator().manual_seed(10 + rank)
    for q in m.parameters():
        q.grad = torch.randn(q.shape, generator=g)
    own = {k: q.grad.clone() for k, q in m.named_parameters()}
    common.allreduce(m, world)                                  # one bucket: `tiny` is small
    one = list(calls)
    common.allreduce(m, world, cap=20_000)                      # small buckets: the mean stays the mean
    torch.save(dict(weights=m.state_dict(), own=own, avg={k: q.grad for k, q in m.named_parameters()}, one=one,
                    calls=calls[len(one):]),
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_broadcast_and_bucketed_allreduce_on_two_processes(tmp_path):
    """Two gloo processes: after broadcast both hold rank 0's weights; the gradient all-reduce
    averages every gradient in a few flat buckets (not one call a tensor)."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    r = [torch.load(str(tmp_path / f"rank{i}.pt"), weights_only=True) for i in range(2)]
    ref = random_model(TINY, seed=0).state_dict()
    assert all(torch.equal(r[i]["weights"][k], v) for i in range(2) for k, v in ref.items())
    assert all(torch.allclose(r[i]["avg"][k], (r[0]["own"][k] + r[1]["own"][k]) / 2, atol=1e-6) for i in range(2) for k in ref
               if k in r[0]["own"])
    n_params, numel = len(r[0]["own"]), sum(v.numel() for v in r[0]["own"].values())
    assert r[0]["one"] == [numel]
    calls = r[0]["calls"]
    sizes = {v.numel() for v in r[0]["own"].values()}                          # a larger tensor: a bucket alone
    assert sum(calls) == numel and all(n <= 20_000 or n in sizes for n in calls) and 1 < len(calls) < n_params / 2


def test_ddp_stage_all_hands_over(tmp_path, device):
    """distill.py --stage all under torchrun with two processes (gloo on the CPU): the DMD stage
    starts from the causal checkpoint rank 0 saved (every rank waits for it, then takes rank 0's
    weights), and the run ends with the final student."""
    if device != "cpu" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    t = random_model(TINY, 1)
    tpath, out = str(tmp_path / "teacher.pt"), str(tmp_path / "s")
    save_checkpoint(tpath, model=t.state_dict(), ema=t.state_dict(), config=asdict(TINY), step=0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "distill.py",
                        "--teacher", tpath, "--out", out, "--causal_steps", "3", "--selfforcing_steps", "2", "--critic_steps", "1",
                        "--dmd", "1", "--pairs", "2", "--max_pairs", "2", "--eval_every", "0", "--device", device],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 pairs x 2 a step" in r.stdout and "selfforcing: 0..2 steps from " + os.path.join(out, "causal.pt") in r.stdout
    causal, final = (torch.load(os.path.join(out, f), weights_only=True) for f in ("causal.pt", "ckpt.pt"))
    assert causal["step"] == 3 and final["step"] == 2 and final["student"]["stage"] == "selfforcing"


def test_time_boxed_distillation(script, tmp_path):
    """--minutes: the causal stage runs for its share of the time, DMD for the rest; each stage
    whose time is up evaluates, saves and hands over; the final student and summary.json are
    written. A second run finds the time used and trains no further."""
    t = random_model(TINY, 1)
    tpath, out = str(tmp_path / "teacher.pt"), str(tmp_path / "s")
    save_checkpoint(tpath, model=t.state_dict(), ema=t.state_dict(), config=asdict(TINY), step=0)
    args = ["distill.py", "--teacher", tpath, "--out", out, "--minutes", 0.15, "--critic_steps", 1,
            "--pairs", 2, "--max_pairs", 2, "--eval_every", 10 ** 6]
    r = script(*args)
    assert "causal: time is up" in r.stdout and "selfforcing: time is up" in r.stdout, r.stdout
    s = json.load(open(os.path.join(out, "summary.json")))["stages"]
    c, d = s["causal"], s["selfforcing"]
    assert c["budget_seconds"] == pytest.approx(1.8) and 1.8 <= c["train_seconds"] < 1.8 + 30     # distill.CAUSAL_SHARE
    assert d["budget_seconds"] == pytest.approx(9 - c["train_seconds"]) and d["train_seconds"] >= d["budget_seconds"]
    assert c["steps"] >= 1 and d["steps"] >= 1 and c["last_eval"] and d["last_eval"]
    causal, final = (torch.load(os.path.join(out, f), weights_only=True) for f in ("causal.pt", "ckpt.pt"))
    assert causal["step"] == c["steps"] and final["step"] == d["steps"] and final["student"]["stage"] == "selfforcing"
    assert causal["train_seconds"] >= c["train_seconds"]
    evals = [json.loads(line) for line in open(os.path.join(out, "evals.jsonl"))]
    assert [(e["stage"], e["step"]) for e in evals] == [("causal", c["steps"]), ("selfforcing", d["steps"])]
    r = script(*args)                                                       # --stage all continues: nothing left
    s2 = json.load(open(os.path.join(out, "summary.json")))["stages"]
    assert s2["causal"]["steps_this_run"] == 0 and s2["selfforcing"]["steps_this_run"] == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == d["steps"]


def test_probe_dmd_end_to_end(script, tmp_path):
    """probe_dmd.py on a tiny student with a critic (one DMD step of distill.py): a row a family,
    timestep and guidance; the student's sample is the same at every t (noised afterwards), the
    teacher's and the critic's x0 differ with t; the critic (trained one step off the teacher)
    gives a DMD direction."""
    teacher, init, tpath, spath = sf_start(tmp_path)
    out = tmp_path / "s"
    script("distill.py", "--stage", "selfforcing", "--teacher", tpath, "--init", spath, "--out", out, "--selfforcing_steps", 1,
           "--critic_steps", 1, "--dmd", 1, "--pairs", 2, "--max_pairs", 2, "--eval_every", 0)
    js = tmp_path / "probe.json"
    script("probe_dmd.py", "--student", out / "selfforcing.pt", "--teacher", tpath, "--clips", 1, "--frames", 2,
           "--t", "0.2,0.8", "--guidance", "1,2", "--out", js)
    rows = json.load(open(js))
    assert len(rows) == 4 * 2 * 2 and {"real", "fake", "dmd_cos", "real_vs_truth_cos"} <= set(rows[0])
    for fam in {r["family"] for r in rows}:
        mine = [r for r in rows if r["family"] == fam]
        assert len({round(r["student"], 6) for r in mine}) == 1
        assert len({round(r["real"], 6) for r in mine}) == 4          # t and guidance each change the teacher's x0
    assert all(math.isfinite(r["dmd_cos"]) and -1 <= r["dmd_cos"] <= 1 for r in rows)
