"""
Distill the bidirectional many-step teacher into a few-step block-causal student
(DESIGN.md section 4): causal adaptation, then Self-Forcing rollouts regressed on the true target
and DMD with a critic (--dmd).

    python distill.py                                  # both stages, runs/teacher/ckpt.pt -> runs/student/ckpt.pt
    python distill.py --stage causal --teacher runs/tiny/ckpt.pt --out runs/tiny_student --causal_steps 50
    python distill.py --stage selfforcing --init runs/student/causal.pt   # one stage from a given start
    python distill.py --minutes 60                     # time-boxed: causal 12 minutes, Self-Forcing the rest
    torchrun --standalone --nproc_per_node=8 distill.py               # several GPUs

Stage `causal` (OUT/causal.pt): the student starts from the teacher's weights with the
block-causal mask and is fine-tuned with the flow-matching loss on ground-truth pairs, every chunk
at its own noise level (some chunks clean, as the KV cache will hold them at inference), and
teacher.py's depth term where the data has depth (the synthetic stream, data.py's datasets).
Stage `selfforcing` (OUT/selfforcing.pt): the student generates the target chunk by chunk from its
own KV cache (model.student_chunk) and one exit step per rollout keeps gradients. Two losses on
the rollout: a reconstruction term against the true target (--recon, on by default: multi-view
data has it) and DMD (--dmd, weight 1), which compares the frozen teacher (real score) with
a critic (fake score) trained online on the student's samples, on every rollout but the
photographs' (--photos: the teacher saw none); --dmd 1 --recon 0 is the method's plain DMD.
docs/results.md ("Does DMD help?") has the measurements behind the defaults. OUT/ckpt.pt, what
stream.py reads, is the last stage's. The student's warp head is the start's, or one added silent.
"""
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import camera
import data
from common import (ArgumentParser, StepBar, StopFlag, agree, allreduce, autocast_for, broadcast, check_args, check_device,
                    check_finite, check_out_dir, default_device, diverged, ema_update, fail, hold_out_dir, nonfinite,
                    refuse_nonfinite_weights, setup_ddp)
from eval import format_quick, quick_eval, save_sample_video, save_strip
from loopaug import LoopSampler
from real import PhotoClips
from teacher import target_depth_loss
from model import (WARP_PLANES, KVCache, RealCamDiT, add_noise, config_from, encode_target, flow_loss, load_checkpoint,
                   null_camera, sample_t, save_checkpoint, shift_t, student_chunk)

STAGES = ("causal", "selfforcing")
STEPS = {"causal": {"tiny": 50, "small": 600, "base": 3000},          # a stage's steps per preset (no --minutes)
         "selfforcing": {"tiny": 50, "small": 1400, "base": 3000}}
MAX_PAIRS = {"causal": 6, "selfforcing": 12}     # rollouts three times the window: the stream's own frames fill it
TAG = {"causal": 4, "selfforcing": 5}            # each stage's RNG tag
CAUSAL_SHARE = 0.2      # with --minutes and both stages: the causal stage's share of the time
PHOTO_SHARE = 0.25      # with --photos: the selfforcing stage's share of rollouts drawn from them
SAVE_EVERY = 50         # steps between checkpoints
CLIP = 1.0              # gradient-norm clip (student and critic)
EMA = 0.99              # EMA decay of the student
CAUSAL_DEPTH = 0.05     # the causal stage's depth term weight (teacher.py's term; docs/results.md)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)

# -----------------------------------------------------------------------------
# the pieces of the method


def rollout(student, src, cam_src, cam_tgt, steps, exit_step, generator):
    """Self-Forcing rollout: the student generates all T target frames chunk by chunk from its
    own KV cache, stopping every chunk at the same exit step. Only the exit step's forward keeps
    gradients; the cache passes run without, so no gradient crosses chunks. Returns x
    (B, T, 3, H, W) in diffusion space (the target, or target - source)."""
    cfg, (B, T) = student.cfg, src.shape[:2]
    cache, out = KVCache(cfg), []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        noise = torch.randn((steps, B, sl.stop - sl.start) + src.shape[2:], generator=generator).to(src.device)
        out.append(student_chunk(student, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl], range(sl.start, sl.stop), steps,
                                 noise, exit_step))     # pair indices as a range: no host sync
    return torch.cat(out, 1)


def recon_loss(x, y, eps=1e-4):
    """The reconstruction term of the rollout x against the truth y (B, T, 3, H, W): the mean over
    frames of log(mse + eps), minus PSNR up to constants. Each frame's gradient is divided by its
    own error, so a frame counts by its relative error, as the per-frame PSNR eval.py reports
    does, and small camera moves, where copying the source is nearly right, are not drowned by
    wide ones (one mse over everything, tried first, lost on them); eps = 1e-4, about 46 dB on
    [-1, 1] pixels, keeps exact frames from dominating."""
    return torch.log((x - y).pow(2).mean(dim=(2, 3, 4)) + eps).mean()


def dmd_loss(x, x0_real, x0_fake):
    """Distribution matching: g = (x0_fake - x0_real) / mean|x - x0_real| per sample, and
    loss = 0.5 * mse(x, stopgrad(x - g)), whose gradient in x is g / numel: descending it moves
    the generated x toward the real score's denoising and away from the fake one's.
    Returns the loss and the per-sample norm of g."""
    dims = tuple(range(1, x.ndim))
    scale = (x - x0_real).abs().mean(dims, keepdim=True).clamp(min=1e-6)   # per-sample normalizer
    g = ((x0_fake - x0_real) / scale).detach()
    loss = 0.5 * F.mse_loss(x, (x - g).detach())
    return loss, g.flatten(1).norm(dim=1)


def real_score(teacher, src, xt, cam_src, cam_tgt, t, guidance=1.0):
    """The frozen teacher's x0 at xt; guidance != 1: classifier-free guidance on the camera
    (model.teacher_sample's), which sharpens what DMD pulls the student toward."""
    x0 = teacher(src, xt, cam_src, cam_tgt, t).float()
    if guidance == 1:
        return x0
    x0u = teacher(src, xt, cam_src, null_camera(cam_tgt), t).float()
    return x0u + guidance * (x0 - x0u)


def chunk_timesteps(B, T, chunk, shift, generator, p_clean=0.3):
    """Causal stage noise levels (B, T): one t per chunk (diffusion forcing); a share p_clean of
    the chunks is clean (t = 0), the context the KV cache holds at inference."""
    n = math.ceil(T / chunk)
    t = sample_t((B, n), shift, generator)
    t = torch.where(torch.rand(B, n, generator=generator) < p_clean, torch.zeros_like(t), t)
    return t.repeat_interleave(chunk, 1)[:, :T]


def dmd_timestep(B, shift, generator, lo=0.02, hi=0.98):
    """One t a sample for the DMD loss: uniform, shifted toward noise, clamped away from 0 and 1."""
    return shift_t(torch.rand(B, generator=generator), shift).clamp(lo, hi)

# -----------------------------------------------------------------------------
# one training step of each part; batch = (src, tgt, cam_src, cam_tgt) on the device,
# g: this process's generator, gs: the generator shared by every rank (the exit steps)


def optimize(model, opt, loss, clip, world=1):
    """Backward, all-reduce, clip, step. Returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    allreduce(model, world)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return gn


def causal_step(student, opt, batch, g, clip, world=1, autocast=NO_AUTOCAST, depth=None):
    """Causal adaptation: flow matching on ground-truth pairs under the block-causal mask, a noise
    level a chunk, no loss on clean chunks; given depth (camera.plane_target), teacher.py's depth
    term beside it, at CAUSAL_DEPTH, on the noised chunks. Returns the loss, gradient norm and
    depth term (or None)."""
    src, tgt, cam_src, cam_tgt = batch
    (B, T), cfg, dev = src.shape[:2], student.cfg, src.device
    x0 = encode_target(tgt, src, cfg)
    e = torch.randn(x0.shape, generator=g).to(dev)
    t = chunk_timesteps(B, T, cfg.chunk, cfg.shift, g).to(dev)
    with autocast:
        out = student(src, add_noise(x0, e, t), cam_src, cam_tgt, t, causal=True)
    w = (t > 0).float()                                                  # no loss on clean chunks
    loss, dterm = (flow_loss(out, x0, t, cfg) * w).sum() / w.sum().clamp(min=1), None
    if depth is not None:
        dterm = target_depth_loss(student, depth[0], depth[1] & (t > 0)[..., None, None])
        loss = loss + CAUSAL_DEPTH * dterm
    gn = optimize(student, opt, loss, clip, world)
    student.last_warp = None                                # no graph kept between steps
    return loss, gn, dterm


def critic_step(critic, opt_c, xf, batch, g, clip, world=1, autocast=NO_AUTOCAST):
    """The fake score: one flow-matching update of the critic on the student's own samples xf
    (B, T, 3, H, W, diffusion space, detached: the generator step's rollout), so it scores the
    distribution DMD moves, never the truth. Returns the loss."""
    src, _, cam_src, cam_tgt = batch
    (B, T), dev = src.shape[:2], src.device
    tc = sample_t((B, 1), critic.cfg.shift, g).expand(B, T).to(dev)
    e = torch.randn(xf.shape, generator=g).to(dev)
    with autocast:
        oc = critic(src, add_noise(xf, e, tc), cam_src, cam_tgt, tc)
    loss = flow_loss(oc, xf, tc, critic.cfg).mean()
    optimize(critic, opt_c, loss, clip, world)
    return loss


def selfforcing_step(student, opt, teacher, critic, batch, steps, g, gs, clip, recon=1.0, world=1, autocast=NO_AUTOCAST,
                     dmd=0.0, opt_c=None, critic_steps=1, guidance=1.0):
    """One Self-Forcing step: a rollout of the student from its own KV cache (one exit step shared
    by every chunk and rank keeps gradients), then
    - with dmd > 0, critic_steps updates of the critic (the fake score) on that rollout, detached
      (critic_step: one rollout serves both, the step's main cost on a CPU), and the DMD term:
      the rollout noised to one t a sample and denoised by the frozen teacher (the real score,
      with classifier-free guidance) and by the critic; dmd_loss moves it toward the real one;
    - with recon > 0, recon * recon_loss(rollout, the true target): multi-view data has it
      (DESIGN section 4), and regressing the student's own rollouts teaches it to make the right
      frame from the context it really has when streaming.
    Returns (loss, per-sample |g| of DMD, gradient norm, exit step, the critic's last loss)."""
    src, tgt, cam_src, cam_tgt = batch
    (B, T), dev = src.shape[:2], src.device
    exit_step = int(torch.randint(steps, (1,), generator=gs))
    with autocast:
        x = rollout(student, src, cam_src, cam_tgt, steps, exit_step, g).float()
    loss, gnorm_g, loss_c = x.new_zeros(()), x.new_zeros(B), x.new_zeros(())
    if dmd > 0:
        for _ in range(critic_steps):
            loss_c = critic_step(critic, opt_c, x.detach(), batch, g, clip, world, autocast)
        t = dmd_timestep(B, student.cfg.shift, g)[:, None].expand(B, T).to(dev)
        e = torch.randn(x.shape, generator=g).to(dev)
        with torch.no_grad(), autocast:
            xt = add_noise(x.detach(), e, t)
            x0_real = real_score(teacher, src, xt, cam_src, cam_tgt, t, guidance)
            x0_fake = critic(src, xt, cam_src, cam_tgt, t).float()
        loss, gnorm_g = dmd_loss(x, x0_real, x0_fake)
        loss = dmd * loss
    if recon > 0:
        loss = loss + recon * recon_loss(x, encode_target(tgt, src, student.cfg))
    gn = optimize(student, opt, loss, clip, world)
    return loss, gnorm_g, gn, exit_step, loss_c

# -----------------------------------------------------------------------------
# command line


def parse_args():
    p = ArgumentParser(description="Distill the RealCam-min teacher into a causal few-step student.")
    p.add_argument("--stage", type=str, default="all", choices=["all", *STAGES],
                   help="stage to run (all: causal, then selfforcing)")
    p.add_argument("--teacher", type=str, default="runs/teacher/ckpt.pt",
                   help="frozen teacher checkpoint (the shipped one: checkpoints/teacher_small.pt)")
    p.add_argument("--init", type=str, default=None,
                   help="start of the first stage: a teacher for causal, a student for selfforcing "
                        "(default: --teacher for causal, OUT/causal.pt for selfforcing)")
    p.add_argument("--out", type=str, default="runs/student",
                   help="output folder (created if missing): causal.pt, selfforcing.pt, ckpt.pt, log, samples")
    p.add_argument("--resume", action="store_true", help="continue the stage from OUT/<stage>.pt")
    # student
    p.add_argument("--chunk", type=int, default=1, help="pairs a chunk (1: frame by frame)")
    p.add_argument("--window", type=int, default=4, help="chunks attended, current included (0: all); below "
                   "the rollouts' length, so training rollouts run past the rolling window as streams do")
    p.add_argument("--steps", type=int, default=4, help="student denoising steps a chunk")
    p.add_argument("--warp_lr", type=float, default=2e-3, help="the warp head's learning rate (its own optimizer group)")
    # data and optimization
    p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset folder (default: the synthetic stream)")
    p.add_argument("--loopaug", type=float, default=None,
                   help="share of the selfforcing stage's rollouts drawn from LoopAug loops, 0..1, which needs --data "
                        "(default: 0.5 with --data, the shipped student's; 0 without)")
    p.add_argument("--photos", type=str, default=None, help="folder of photographs (real.py --fetch_photos DIR) whose "
                   f"turns and zooms make {PHOTO_SHARE:g} of the selfforcing stage's rollouts (real.PhotoClips)")
    p.add_argument("--pairs", type=int, default=None, help="pairs a batch per process (default: 8 CPU, 32 CUDA)")
    p.add_argument("--max_pairs", type=int, default=None,
                   help="clip / rollout lengths drawn from 1..max_pairs (default: 6 causal, 12 selfforcing: rollouts "
                        "three times the window, where a stream's own frames fill the cache)")
    p.add_argument("--causal_steps", type=int, default=None,
                   help="causal stage steps (default: per preset; with --minutes: no limit but the time)")
    p.add_argument("--selfforcing_steps", type=int, default=None,
                   help="selfforcing stage steps (default: per preset; with --minutes: no limit but the time)")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"time-boxed run: the stages share this many minutes of wall-clock time (counted across "
                        f"--resume; with both, causal {CAUSAL_SHARE:g} of them); a stage whose time is up evaluates, "
                        f"saves and hands over to the next")
    p.add_argument("--lr", type=float, default=5e-5, help="student learning rate (both stages)")
    p.add_argument("--lr_critic", type=float, default=1e-4, help="critic learning rate")
    p.add_argument("--critic_steps", type=int, default=1, help="critic updates a generator update, on its rollout")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale of the teacher's real score (needs a teacher trained with --cond_drop)")
    p.add_argument("--recon", type=float, default=1.0,
                   help="weight of the reconstruction term: the Self-Forcing rollout against the true target, "
                        "the mean over frames of log(mse) (minus PSNR)")
    p.add_argument("--dmd", type=float, default=1.0,
                   help="weight of the DMD term beside the reconstruction, not on photo rollouts (0: no critic and no "
                        "teacher calls, 2x faster a step; docs/results.md, Does DMD help?: the weights measured)")
    p.add_argument("--eval_every", type=int, default=100,
                   help="steps between held-out evaluations, and one at the end (0: none)")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed")
    p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args()
    check_args(args, positive=("chunk", "steps", "pairs", "max_pairs", "causal_steps", "selfforcing_steps", "critic_steps"),
               nonneg=("window", "eval_every"))
    check_finite(args, ("dmd", "recon", "guidance", "lr", "lr_critic", "warp_lr", "minutes", "loopaug"))
    if args.dmd < 0 or args.recon < 0 or args.dmd == args.recon == 0:
        fail(f"--dmd and --recon are loss weights, >= 0 and not both 0, got {args.dmd} and {args.recon}")
    if args.loopaug is None:
        args.loopaug = 0.5 if args.data else 0.0
    if not 0 <= args.loopaug <= 1:
        fail(f"--loopaug is a share of the rollouts, 0..1, got {args.loopaug}")
    if args.photos and args.loopaug + PHOTO_SHARE > 1:
        fail(f"--photos takes {PHOTO_SHARE:g} of the rollouts: --loopaug can be at most {1 - PHOTO_SHARE:g} beside it")
    if args.minutes is not None and not args.minutes > 0:
        fail(f"--minutes must be positive, got {args.minutes}")
    if not (args.lr > 0 and args.lr_critic > 0 and args.warp_lr > 0):
        fail("--lr, --lr_critic and --warp_lr must be positive")
    if args.loopaug > 0 and not args.data:
        fail("--loopaug builds loops from a multi-view dataset: give --data DIR (python data.py --out DIR writes one)")
    check_device(args.device)
    check_out_dir(args.out)
    return args

# -----------------------------------------------------------------------------
# checkpoints: where a stage starts, what it builds, what it saves


def load_start(path, want, what, hint=""):
    """A checkpoint that must be a teacher (want='teacher') or a student; one error line otherwise."""
    try:
        ck = load_checkpoint(path)
    except FileNotFoundError as e:
        fail(f"{e}{hint}")
    except ValueError as e:
        fail(e)
    kind = "student" if "student" in ck else "teacher"
    if kind != want:
        fail(f"{path} is a {kind} checkpoint; {what} needs a {want}"
             + (" (the bidirectional teacher: teacher.py)" if want == "teacher" else " (the causal stage's: OUT/causal.pt)"))
    return ck


def stage_start(stage, stages, args):
    """Where a stage starts: OUT/<stage>.pt when resuming (--resume, or --stage all, which
    continues what it finds), else --init for the first stage, the teacher for causal and
    OUT/causal.pt for selfforcing. Returns (path, resume)."""
    path = os.path.join(args.out, f"{stage}.pt")
    if (args.resume or args.stage == "all") and os.path.exists(path):
        return path, True
    if args.init and stage == stages[0]:
        return args.init, False
    return (args.teacher if stage == "causal" else os.path.join(args.out, "causal.pt")), False


def same_network(a, b):
    """Do two configs describe the same network (the student's chunk, window, sink and warp head aside)?"""
    free = dict(chunk=1, window=0, sink=0, warp=())
    return replace(config_from(a), **free) == replace(config_from(b), **free)


def build_stage(stage, ck, resume, run):
    """The stage's student (the start checkpoint's EMA weights, or resumed; a start without the
    warp head gets one at gate 0), its EMA and AdamW (the warp head in a group of its own, at
    --warp_lr); with --dmd > 0 in the selfforcing stage, the critic, the fake score: a
    bidirectional copy of the teacher trained online (None otherwise: nothing built, broadcast or
    saved). On resume, optimizers, step and RNG state are restored; a critic the checkpoint lacks
    (a run resumed with --dmd after one without) starts from the teacher. Returns (student, ema,
    opt, critic, opt_c, start step)."""
    args, dev = run.args, run.args.device
    student = RealCamDiT(run.scfg).to(dev)
    weights = ck["model"] if resume else (ck.get("ema") or ck["model"])
    added = [k for k in student.state_dict() if k not in weights]
    if not set(k.split(".")[0] for k in added) <= {"warp_out"}:
        fail(f"the start checkpoint lacks {added[:3]}")
    student.load_state_dict(weights, strict=not added)   # a start without the warp head: it begins at 0
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    head = [p for n, p in student.named_parameters() if n.startswith("warp_out.")]
    rest = [p for n, p in student.named_parameters() if not n.startswith("warp_out.")]
    groups = [dict(params=rest)] + ([dict(params=head, lr=args.warp_lr)] if head else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.0 if stage == "selfforcing" else 0.9, 0.99), weight_decay=0.0)
    critic = opt_c = None
    critic_saved = resume and "critic" in ck
    if stage == "selfforcing" and args.dmd > 0:
        critic = RealCamDiT(run.teacher.cfg).to(dev)
        critic.load_state_dict(ck["critic"] if critic_saved else run.tweights)
        opt_c = torch.optim.AdamW(critic.parameters(), lr=args.lr_critic, betas=(0.0, 0.99), weight_decay=0.0)
    if not resume:
        return student, ema, opt, critic, opt_c, 0
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["optim"])
    if critic is not None and critic_saved:
        opt_c.load_state_dict(ck["optim_critic"])
    torch.set_rng_state(ck["rng"]["cpu"])
    if dev.startswith("cuda") and "cuda" in ck["rng"]:
        torch.cuda.set_rng_state(ck["rng"]["cuda"])
    return student, ema, opt, critic, opt_c, ck["step"]


def save_stage(path, stage, step, nets, run, train_seconds):
    """Rank 0 writes the stage's checkpoint; under DDP every rank waits for it (the next stage,
    on any rank, starts from this file)."""
    student, ema, opt, critic, opt_c = nets
    refuse_nonfinite_weights(stage, step, path, student, ema, critic)
    if run.rank == 0:
        extra = dict(critic=critic.state_dict(), optim_critic=opt_c.state_dict()) if critic is not None else {}
        cuda = run.args.device.startswith("cuda")
        save_checkpoint(path, model=student.state_dict(), ema=ema.state_dict(), optim=opt.state_dict(), step=step,
                        config=asdict(run.scfg), student=dict(steps=run.args.steps, stage=stage), teacher=run.args.teacher,
                        args=vars(run.args), train_seconds=train_seconds, **extra,
                        rng={"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})})
    if run.ddp:
        dist.barrier()


def evaluate(ema, stage, step, steps, out, dev):
    """Held-out figures of the student's EMA at `steps` steps (evals.jsonl) and a sample video
    and strip. Returns the log line and the figures."""
    res, (s, x, y) = quick_eval(ema, steps, student=True, device=dev)
    with open(os.path.join(out, "evals.jsonl"), "a") as f:
        f.write(json.dumps(dict(stage=stage, step=step, sample=res)) + "\n")
    save_sample_video(os.path.join(out, f"sample_{stage}.mp4"), s, x, y)
    save_strip(os.path.join(out, f"sample_{stage}.png"), s, x, y)
    return f"eval {stage} {step} | {format_quick(res)}", res

# -----------------------------------------------------------------------------
# a run: its stages, each a loop of steps


class Run:
    """What the stages of one distill.py run share: the flags, the processes, the frozen teacher
    (its weights: the critic's start), the student's Config, the data, Ctrl-C, and the time each
    stage used (--minutes)."""

    def __init__(self, args, ddp, rank, world, teacher, tweights, scfg, stages):
        self.args, self.ddp, self.rank, self.world, self.stages = args, ddp, rank, world, stages
        self.teacher, self.tweights, self.scfg = teacher, tweights, scfg
        self.autocast = autocast_for(args.device)
        try:
            self.dataset = data.MultiViewDataset(args.data, scfg.size) if args.data else None
            self.photos = PhotoClips(args.photos, scfg.size) if args.photos else None
        except (OSError, ValueError) as e:
            fail(e)
        self.loops = LoopSampler(None, scfg.size, scenes=self.dataset.scenes) if args.loopaug > 0 else None
        if rank == 0:
            hold_out_dir(args.out)
        else:
            os.makedirs(args.out, exist_ok=True)
        self.interrupt, self.seconds = StopFlag(), {}

    def batch(self, step, stage):
        """The step's batch on the device (src, tgt, cam_src, cam_tgt), the causal stage's depth target
        (or None) and whether it is of photographs (selfforcing: --loopaug loops, PHOTO_SHARE photos)."""
        args, S, mp = self.args, self.scfg.size, self.args.max_pairs or MAX_PAIRS[stage]
        u = torch.rand(1, generator=data.rng(args.seed, step, 3)).item()     # tag 3: loop or not
        loop = bool(self.loops) and stage == "selfforcing" and u < args.loopaug
        photo = bool(self.photos) and stage == "selfforcing" and not loop and u < args.loopaug + PHOTO_SHARE
        if loop:
            b = self.loops.batch(step, args.pairs, mp, args.seed, self.rank)
        elif photo:
            b = self.photos.batch(step, args.pairs, mp, args.seed, self.rank)
        elif self.dataset:
            b = self.dataset.batch(step, args.pairs, mp, args.seed, self.rank)
        else:
            b = data.synthetic_batch(step, args.pairs, mp, S, S, args.seed + 1, self.rank, device=args.device,
                                     depth=stage == "causal")
        cam_src, cam_tgt = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)
        depth = stage == "causal" and "depth_tgt" in b
        depth = [x.to(args.device) for x in camera.plane_target(b, self.scfg.warp)] if depth else None
        return [x.to(args.device) for x in (b["src"], b["tgt"], cam_src, cam_tgt)], depth, photo

    def budget(self, stage):
        """Seconds of wall-clock time this stage may use (--minutes): all of them for one stage;
        with both, the causal stage its share and the selfforcing stage the rest, what causal did
        not use included."""
        total = 60 * self.args.minutes
        if len(self.stages) == 1:
            return total
        return CAUSAL_SHARE * total if stage == "causal" else total - self.seconds.get("causal", 0.0)


def stage_step(run, stage, step, nets, max_steps):
    """One training step of the stage (causal_step, or selfforcing_step). Returns its log line and,
    if the loss or the gradient norm is NaN or infinite, (step, loss, gradient norm)."""
    args, (student, _, opt, critic, opt_c) = run.args, nets
    g = data.rng(args.seed, TAG[stage], step, run.rank)
    gs = data.rng(args.seed, TAG[stage], step)                 # shared by ranks
    batch, depth, photo = run.batch(step, stage)
    msg = f"{stage} {step}/{max_steps if max_steps < 10 ** 9 else '-'} | T {batch[0].shape[1]}"
    if stage == "causal":
        loss, gn, dterm = causal_step(student, opt, batch, g, CLIP, run.world, run.autocast, depth)
        msg += f" | loss {loss.item():.4f} | gnorm {gn.item():.2f}" + (f" | depth {dterm.item():.3f}" if depth else "")
    else:
        loss, gnorm_g, gn, exit_step, loss_c = selfforcing_step(
            student, opt, run.teacher, critic, batch, args.steps, g, gs, CLIP, args.recon, run.world, run.autocast,
            0.0 if photo else args.dmd, opt_c, args.critic_steps, args.guidance)   # the teacher saw no photograph
        msg += (f" | loss {loss.item():.3e} | critic {loss_c.item():.4f} | |g| {gnorm_g.mean().item():.2f}"
                f" | gnorm {gn.item():.2f} | exit {exit_step}" + (" | photos: no DMD" if photo else ""))
    return msg, ((step, loss.item(), gn.item()) if nonfinite(loss, gn) else None)


def stage_loop(run, stage, nets, start, max_steps, spent):
    """The stage's steps from `start`: at each, stop on Ctrl-C or when its time is up (every rank at
    the same step), evaluate and save on schedule, then one step and the EMA. Returns (last step,
    the steps' seconds, the stage's time, whether it ran out, the last evaluation)."""
    args, master = run.args, run.rank == 0
    path, t_stage = os.path.join(args.out, f"{stage}.pt"), time.time()
    seconds = lambda: spent + time.time() - t_stage                 # this stage's time, across --resume
    bar = StepBar(start, max_steps, run.budget(stage) if args.minutes else None, disable=not master)
    times, last_eval, bad, complete = [], None, None, False
    saved = start if start else None                                # resumed: the file we started from
    for step in range(start, max_steps + 1):
        used = seconds()
        bar.update(step, used)
        hit, time_up, nan = agree(run.ddp, args.device, run.interrupt.hit,
                                  bool(args.minutes) and used >= run.budget(stage), bad is not None)
        if nan or hit:
            bar.finish(False)
        if nan:
            diverged(stage, bad, saved, path, master)
        if hit:
            if master:
                print(f"interrupted after {step} steps of {stage}: saving {path} (continue with --resume)")
            save_stage(path, stage, step, nets, run, seconds())
            raise SystemExit(130)
        last = step == max_steps or time_up
        if master and args.eval_every and (step % args.eval_every == 0 or last) and step > start:
            line, last_eval = evaluate(nets[1], stage, step, args.steps, args.out, args.device)
            bar.write(line)
        if (step % SAVE_EVERY == 0 or last) and step > start:
            save_stage(path, stage, step, nets, run, seconds())
            saved = step
        if last:
            complete = True
            if time_up and master:
                print(f"{stage}: time is up ({used / 60:.2f} min) after {step} steps")
            break
        t0 = time.time()
        msg, bad = stage_step(run, stage, step, nets, max_steps)
        ema_update(nets[1], nets[0], step, EMA)
        times.append(time.time() - t0)
        if master:
            msg += f" | {1000 * times[-1]:.0f} ms"
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")
            if step % 25 == 0 or step < start + 3:
                bar.write(msg)
    bar.finish(complete)
    return step, times, used, time_up, last_eval


def run_stage(run, stage):
    """One stage, from its start (stage_start) to its last step or the end of its time: build,
    train, evaluate and save. Returns the stage's summary."""
    args, master = run.args, run.rank == 0
    path, max_steps = os.path.join(args.out, f"{stage}.pt"), getattr(args, f"{stage}_steps")
    start_path, resume = stage_start(stage, run.stages, args)
    ck = load_start(start_path, "student" if resume or stage == "selfforcing" else "teacher", f"the {stage} stage's start")
    spent = ck.get("train_seconds", 0.0) if resume else 0.0          # this stage's time before this run
    if resume and ck["step"] >= max_steps:
        run.seconds[stage] = spent
        if master:
            print(f"{stage}: already done ({path}, step {ck['step']})")
        return dict(steps=ck["step"], steps_this_run=0, train_seconds=spent, already_done=True)
    try:
        *nets, start = build_stage(stage, ck, resume, run)
    except ValueError as e:                                             # a network the config refuses
        fail(e)
    if run.ddp:
        broadcast([nets[0], nets[1], nets[3]])               # every rank starts from rank 0's student, EMA, critic
    if master:
        print(f"{stage}: {start}.." + (f"{max_steps}" if max_steps < 10 ** 9 else "") + f" steps from {start_path}"
              + (f", {run.budget(stage) / 60:.2f} of {args.minutes:g} min" if args.minutes else "")
              + f", chunk {run.scfg.chunk}, window {run.scfg.window}, {args.steps} steps a chunk, "
              f"{args.pairs} pairs x {run.world} a step")
    try:
        step, times, used, time_up, last_eval = stage_loop(run, stage, nets, start, max_steps, spent)
    except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
        raise SystemExit(130)
    run.seconds[stage] = used
    return dict(steps=step, steps_this_run=len(times), train_seconds=used, time_up=time_up,
                budget_seconds=run.budget(stage) if args.minutes else None,
                step_ms=1000 * sorted(times)[len(times) // 2] if times else None, last_eval=last_eval)


def networks(args, stages):
    """The frozen teacher, its weights and the student's Config (the teacher's, block-causal over
    --chunk with a --window, with the warp head), checked against the first stage's start before
    any work. Sets the stages' default steps from the teacher's size."""
    hint = (" (train one with: python teacher.py, or distill the shipped one: --teacher checkpoints/teacher_small.pt)"
            if args.teacher == "runs/teacher/ckpt.pt" else " (train one with: python teacher.py)")
    tckpt = load_start(args.teacher, "teacher", "--teacher", hint)
    first, resume = stage_start(stages[0], stages, args)
    ick = load_start(first, "student" if resume or stages[0] == "selfforcing" else "teacher",
                     f"the {stages[0]} stage's start",
                     "" if args.init or resume or stages[0] == "causal" else " (run --stage causal first, or give --init)")
    if not same_network(ick["config"], tckpt["config"]):
        fail(f"{first} is another network than the teacher {args.teacher} (its config differs)")
    tcfg = config_from(tckpt["config"])
    preset = next((k for k, v in {"tiny": 16, "small": 32, "base": 64}.items() if v == tcfg.size), "small")
    for stage in STAGES:                                    # with --minutes: no limit but the time
        if getattr(args, f"{stage}_steps") is None:
            setattr(args, f"{stage}_steps", 10 ** 9 if args.minutes else STEPS[stage][preset])
    teacher = RealCamDiT(tcfg).to(args.device).requires_grad_(False).eval()
    tweights = tckpt.get("ema") or tckpt["model"]          # a training checkpoint or a release file
    teacher.load_state_dict(tweights)
    warp = config_from(ick["config"]).warp or tcfg.warp or WARP_PLANES
    return teacher, tweights, replace(tcfg, chunk=args.chunk, window=args.window, sink=0, warp=warp)


def main():
    args = parse_args()
    ddp, rank, world, args.device = setup_ddp(args.device)
    args.pairs = args.pairs or (32 if args.device.startswith("cuda") else 8)
    torch.manual_seed(args.seed + rank)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    run = Run(args, ddp, rank, world, *networks(args, stages), stages)
    summary = dict(world=world, device=args.device, minutes=args.minutes, stages={})
    for stage in stages:
        summary["stages"][stage] = run_stage(run, stage)
    if rank == 0:
        final, ckpt = os.path.join(args.out, f"{stages[-1]}.pt"), os.path.join(args.out, "ckpt.pt")
        if os.path.exists(final):
            shutil.copyfile(final, ckpt)
            print(f"student: {ckpt} (evaluate with: python eval.py --ckpt {ckpt})")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if ddp:
        dist.barrier()            # every rank leaves together: rank 0 may still be copying the checkpoint
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
