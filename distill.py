"""
Distill the bidirectional many-step teacher into a few-step block-causal student
(DESIGN.md section 4): causal adaptation, then Self-Forcing rollouts regressed on the true target
(optionally DMD with a critic, --dmd).

    python distill.py                                  # every stage, runs/teacher/ckpt.pt -> runs/student/ckpt.pt
    python distill.py --stage causal --teacher runs/tiny/ckpt.pt --out runs/tiny_student --causal_steps 50
    python distill.py --stage dmd --init runs/student/causal.pt      # one stage from a given start
    python distill.py --minutes 60                     # time-boxed: causal 12 minutes, Self-Forcing the rest
    torchrun --standalone --nproc_per_node=8 distill.py               # several GPUs

Stage `causal`: the student starts from the teacher's weights with the block-causal mask and is
fine-tuned with the flow-matching loss on ground-truth pairs, every chunk at its own noise level
(some chunks clean, as the KV cache will hold them at inference).
Stage `dmd`: Self-Forcing. The student generates the target chunk by chunk from its own KV cache
(model.student_chunk) and one exit step per rollout keeps gradients. Two losses on the rollout:
a reconstruction term against the true target (--recon, on by default: multi-view data has it)
and DMD (--dmd, off by default), which compares the frozen teacher (real score) with a critic
(fake score) trained online on the student's samples. The stage keeps its name: --dmd 1 --recon 0
is the method's plain DMD; README, Results ("Distillation: what DMD does at this scale"), has the
measurements behind the defaults.
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
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm import tqdm

import data
from eval import format_quick, quick_eval, save_sample_video, save_strip
from loopaug import LoopSampler
from model import (KVCache, StopFlag, add_noise, encode_target, flow_loss, load_checkpoint, sample_t, save_checkpoint,
                   shift_t, student_chunk, to_x0, null_camera, RealCamDiT, Config, WARP_PLANES)

# -----------------------------------------------------------------------------
# the pieces of the method


def rollout(student, src, cam_src, cam_tgt, steps, exit_step, generator):
    """Self-Forcing rollout: the student generates all T target frames chunk by chunk from its
    own KV cache, stopping every chunk at the same exit step. Only the exit step's forward keeps
    gradients; the cache passes run without, so no
    gradient crosses chunks. Returns x (B, T, 3, H, W) in diffusion space (the target, or
    target - source)."""
    cfg, (B, T) = student.cfg, src.shape[:2]
    cache, out = KVCache(cfg), []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        noise = torch.randn((steps, B, sl.stop - sl.start) + src.shape[2:], generator=generator).to(src.device)
        out.append(student_chunk(student, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl], range(sl.start, sl.stop), steps,
                                 noise, exit_step))     # pair indices as a range: no host sync
    return torch.cat(out, 1)


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

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


BUCKET = 2 ** 24     # elements a flat communication buffer holds at most (64 MB in float32)


def buckets(tensors, cap=BUCKET):
    """Consecutive runs of tensors of one dtype and device, about `cap` elements each at most (a
    larger tensor is a bucket of its own): what one collective call carries."""
    out, n = [], 0
    for t in tensors:
        if out and n + t.numel() <= cap and (t.dtype, t.device) == (out[-1][0].dtype, out[-1][0].device):
            out[-1].append(t)
            n += t.numel()
        else:
            out.append([t])
            n = t.numel()
    return out


def allreduce(model, world, cap=BUCKET):
    """Average gradients over processes by hand (the rollout calls the model many times outside
    DistributedDataParallel's forward): flattened into buckets, one all-reduce a bucket. Every
    rank runs the same code path, so the same parameters have gradients everywhere."""
    if world <= 1:
        return
    for bucket in buckets([q.grad for q in model.parameters() if q.grad is not None], cap):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world
        for grad, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(avg)


@torch.no_grad()
def broadcast(modules, src=0, cap=BUCKET):
    """Every rank takes rank src's weights (parameters and buffers) of these modules, in flat
    buckets: at a stage's start all ranks hold the same student, EMA and critic, whatever file
    each of them read."""
    tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
    for bucket in buckets(tensors, cap):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src)
        for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(v)


def optimize(model, opt, loss, clip, world=1):
    """Backward, all-reduce, clip, step. Returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    allreduce(model, world)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return gn


def causal_step(student, opt, batch, g, clip, world=1, autocast=NO_AUTOCAST):
    """Causal adaptation: flow matching on ground-truth pairs under the block-causal mask, a noise
    level a chunk, no loss on the clean chunks."""
    src, tgt, cam_src, cam_tgt = batch
    (B, T), cfg, dev = src.shape[:2], student.cfg, src.device
    x0 = encode_target(tgt, src, cfg)
    e = torch.randn(x0.shape, generator=g).to(dev)
    t = chunk_timesteps(B, T, cfg.chunk, cfg.shift, g).to(dev)
    with autocast:
        out = student(src, add_noise(x0, e, t), cam_src, cam_tgt, t, causal=True)
    w = (t > 0).float()                                                  # no loss on clean chunks
    loss = (flow_loss(out, x0, e, t, cfg) * w).sum() / w.sum().clamp(min=1)
    gn = optimize(student, opt, loss, clip, world)
    return f" | loss {loss.item():.4f} | gnorm {gn.item():.2f}"


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
    loss = flow_loss(oc, xf, e, tc, critic.cfg).mean()
    optimize(critic, opt_c, loss, clip, world)
    return loss


def real_score(teacher, src, xt, cam_src, cam_tgt, t, guidance=1.0):
    """The frozen teacher's x0 at xt; guidance != 1: classifier-free guidance on the camera
    (model.teacher_sample's), which sharpens what DMD pulls the student toward."""
    x0 = to_x0(teacher(src, xt, cam_src, cam_tgt, t).float(), xt, t, teacher.cfg)
    if guidance == 1:
        return x0
    x0u = to_x0(teacher(src, xt, cam_src, null_camera(cam_tgt), t).float(), xt, t, teacher.cfg)
    return x0u + guidance * (x0 - x0u)


def recon_loss(x, y, kind="mse", eps=1e-4):
    """The reconstruction term of the rollout x against the truth y (B, T, 3, H, W). "mse": one
    mean square error over everything, so frames whose error is already small (small camera
    moves, where copying the source is nearly right) weigh little. "psnr": the mean over frames
    of log(mse + eps), minus PSNR up to constants: each frame's gradient is divided by its own
    error, so a frame counts by its relative error, as the per-frame PSNR that eval.py reports
    does (eps = 1e-4, about 46 dB on [-1, 1] pixels, keeps exact frames from dominating)."""
    if kind == "mse":
        return F.mse_loss(x, y)
    return torch.log((x - y).pow(2).mean(dim=(2, 3, 4)) + eps).mean()


def dmd_step(student, opt, teacher, critic, batch, steps, g, gs, clip, recon=0.0, world=1, autocast=NO_AUTOCAST,
             dmd=1.0, recon_kind="mse", opt_c=None, critic_steps=1, guidance=1.0):
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
            x0_fake = to_x0(critic(src, xt, cam_src, cam_tgt, t).float(), xt, t, critic.cfg)
        loss, gnorm_g = dmd_loss(x, x0_real, x0_fake)
        loss = dmd * loss
    if recon > 0:
        loss = loss + recon * recon_loss(x, encode_target(tgt, src, student.cfg), recon_kind)
    gn = optimize(student, opt, loss, clip, world)
    return loss, gnorm_g, gn, exit_step, loss_c


def ema_update(ema, model, step, decay):
    with torch.no_grad():
        d = min(decay, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)

# -----------------------------------------------------------------------------
# command line, checks, checkpoints


def parse_args():
    p = data.ArgumentParser(description="Distill the RealCam-min teacher into a causal few-step student.")
    p.add_argument("--stage", type=str, default="all", choices=["all", "causal", "dmd"],
                   help="stage to run (all: causal, then dmd)")
    p.add_argument("--teacher", type=str, default="runs/teacher/ckpt.pt",
                   help="frozen teacher checkpoint (the shipped one: checkpoints/teacher_small.pt)")
    p.add_argument("--init", type=str, default=None,
                   help="start of the first stage: a teacher for causal, a student for dmd "
                        "(default: --teacher for causal, OUT/causal.pt for dmd)")
    p.add_argument("--out", type=str, default="runs/student",
                   help="output folder (created if missing): causal.pt, dmd.pt, ckpt.pt, log, samples")
    p.add_argument("--resume", action="store_true", help="continue the stage from OUT/<stage>.pt")
    # student
    p.add_argument("--chunk", type=int, default=1, help="pairs a chunk (1: frame by frame)")
    p.add_argument("--window", type=int, default=4, help="chunks attended, current included (0: all); below "
                   "--max_pairs, so training rollouts run past the rolling window as streams do")
    p.add_argument("--sink", type=int, default=0, help="first chunks always attended")
    p.add_argument("--steps", type=int, default=4, help="student denoising steps a chunk")
    p.add_argument("--warp", action="store_true",
                   help="give the student the warp head (model.Config.warp: each pixel picks a depth plane and "
                        "takes the source's colour where its ray meets it; silent at the start, so a student or "
                        "teacher without it continues unchanged)")
    p.add_argument("--warp_lr", type=float, default=None, help="the warp head's learning rate (default: --lr)")
    # data and optimization
    p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset folder (default: the synthetic stream)")
    p.add_argument("--loopaug", type=float, default=0.0,
                   help="share of the Self-Forcing (dmd) stage's rollouts drawn from LoopAug loops, 0..1 (needs --data)")
    p.add_argument("--pairs", type=int, default=None, help="pairs a batch per process (default: 8 CPU, 32 CUDA)")
    p.add_argument("--max_pairs", type=int, default=None,
                   help="clip / rollout lengths drawn from 1..max_pairs (default: 6 causal, 12 dmd: rollouts three "
                        "times the window, where a stream's own frames fill the cache)")
    p.add_argument("--causal_steps", type=int, default=None,
                   help="causal-stage steps (default: per preset; with --minutes: no limit but the time)")
    p.add_argument("--dmd_steps", type=int, default=None,
                   help="Self-Forcing (dmd) stage steps (default: per preset; with --minutes: no limit but the time)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time-boxed run: the stages share this many minutes of wall-clock time (counted across "
                        "--resume); a stage whose time is up evaluates, saves and hands over to the next")
    p.add_argument("--causal_share", type=float, default=0.2,
                   help="with --minutes and both stages: the causal stage's share of the time (the dmd stage gets the rest)")
    p.add_argument("--lr", type=float, default=5e-5, help="student learning rate (both stages)")
    p.add_argument("--lr_critic", type=float, default=1e-4, help="critic learning rate")
    p.add_argument("--critic_steps", type=int, default=1, help="critic updates a generator update, on its rollout")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale of the teacher's real score (needs a teacher trained with --cond_drop)")
    p.add_argument("--recon", type=float, default=1.0,
                   help="weight of the reconstruction term: mse of the Self-Forcing rollout against the true target")
    p.add_argument("--recon_loss", type=str, default="mse", choices=["mse", "psnr"],
                   help="research: the reconstruction term as one mse (default) or as the mean over frames of log(mse), i.e. minus PSNR")
    p.add_argument("--dmd", type=float, default=0.0,
                   help="weight of the DMD term (default 0: no critic and no teacher calls; README, Distillation: why "
                        "the shipped student does without)")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the student")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--eval_every", type=int, default=100,
                   help="steps between held-out evaluations, and one at the end (0: none)")
    p.add_argument("--save_every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    data.check_args(args, positive=("chunk", "steps", "pairs", "max_pairs", "causal_steps", "dmd_steps", "critic_steps",
                                    "save_every"), nonneg=("window", "sink", "eval_every"))
    if args.dmd < 0 or args.recon < 0 or args.dmd == args.recon == 0:
        data.fail(f"--dmd and --recon are loss weights, >= 0 and not both 0, got {args.dmd} and {args.recon}")
    if not 0 <= args.loopaug <= 1:
        data.fail(f"--loopaug is a share of the rollouts, 0..1, got {args.loopaug}")
    if args.minutes is not None and not args.minutes > 0:
        data.fail(f"--minutes must be positive, got {args.minutes}")
    if not 0 < args.causal_share < 1:
        data.fail(f"--causal_share is a share of --minutes, between 0 and 1, got {args.causal_share}")
    if not (args.lr > 0 and args.lr_critic > 0 and (args.warp_lr is None or args.warp_lr > 0) and args.clip > 0 and 0 <= args.ema < 1 and args.recon >= 0):
        data.fail("--lr, --lr_critic, --warp_lr and --clip must be positive, --recon non-negative, --ema in [0, 1)")
    if args.loopaug > 0 and not args.data:
        data.fail("--loopaug builds loops from a multi-view dataset: give --data DIR (python data.py --out DIR writes one)")
    data.check_device(args.device)
    data.check_out_dir(args.out)
    return args


def load_start(path, want, what, hint=""):
    """A checkpoint that must be a teacher (want='teacher') or a student; one error line otherwise."""
    try:
        ck = load_checkpoint(path)
    except FileNotFoundError as e:
        data.fail(f"{e}{hint}")
    except ValueError as e:
        data.fail(e)
    kind = "student" if "student" in ck else "teacher"
    if kind != want:
        data.fail(f"{path} is a {kind} checkpoint; {what} needs a {want}"
                  + (" (the bidirectional teacher: teacher.py)" if want == "teacher" else
                     " (the causal stage's: OUT/causal.pt)"))
    return ck


def stage_start(stage, stages, args):
    """Where a stage starts: OUT/<stage>.pt when resuming (--resume, or --stage all, which
    continues what it finds), else --init for the first stage, the teacher for causal and
    OUT/causal.pt for dmd. Returns (path, resume)."""
    path = os.path.join(args.out, f"{stage}.pt")
    if (args.resume or args.stage == "all") and os.path.exists(path):
        return path, True
    if args.init and stage == stages[0]:
        return args.init, False
    return (args.teacher if stage == "causal" else os.path.join(args.out, "causal.pt")), False


def same_network(a, b):
    """Do two configs describe the same network (the student's chunk, window, sink and warp head aside)?"""
    free = dict(chunk=1, window=0, sink=0, warp=())
    return replace(Config(**a), **free) == replace(Config(**b), **free)

def build_stage(stage, ck, resume, scfg, tcfg, tweights, args, dev):
    """The stage's student (the start checkpoint's EMA weights, or resumed), its EMA and AdamW;
    with --dmd > 0 in the dmd stage, the critic, the fake score: a bidirectional copy of the
    teacher trained online (None otherwise: nothing built, broadcast or saved). On resume,
    optimizers, step and RNG state are restored; a critic the checkpoint lacks (a run resumed
    with --dmd after one without) starts from the teacher. Returns (student, ema, opt, critic,
    opt_c, start step)."""
    student = RealCamDiT(scfg).to(dev)
    weights = ck["model"] if resume else (ck.get("ema") or ck["model"])
    added = [k for k in student.state_dict() if k not in weights]
    if not set(k.split(".")[0] for k in added) <= {"warp_out"}:
        data.fail(f"the start checkpoint lacks {added[:3]}")
    student.load_state_dict(weights, strict=not added)   # a start without the warp head: it begins at 0
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    head = [p for n, p in student.named_parameters() if n.startswith("warp_out.")]     # --warp_lr's
    rest = [p for n, p in student.named_parameters() if not n.startswith("warp_out.")]
    groups = [dict(params=rest)] + ([dict(params=head, lr=args.warp_lr or args.lr)] if head else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.0 if stage == "dmd" else 0.9, 0.99), weight_decay=0.0)
    critic = opt_c = None
    critic_saved = resume and "critic" in ck
    if stage == "dmd" and args.dmd > 0:
        critic = RealCamDiT(tcfg).to(dev)
        critic.load_state_dict(ck["critic"] if critic_saved else tweights)
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

def setup_ddp(args):
    """DDP when launched by torchrun (RANK set): one process a device; gradients are all-reduced
    by hand (allreduce). Returns (ddp, rank, world)."""
    if "RANK" not in os.environ:
        return False, 0, 1
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    return True, dist.get_rank(), dist.get_world_size()


def agree(ddp, dev, *flags):
    """Flags of this process -> the same on every process (one all-reduce, any True wins), so all
    ranks stop at the same step."""
    if not ddp:
        return list(flags)
    f = torch.tensor([float(x) for x in flags], device=dev)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return [bool(x) for x in f.tolist()]


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


def main():
    args = parse_args()
    ddp, rank, world = setup_ddp(args)
    master, cuda, dev = rank == 0, args.device.startswith("cuda"), args.device
    args.pairs = args.pairs or (32 if cuda else 8)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else NO_AUTOCAST
    torch.manual_seed(args.seed + rank)
    hint = (" (train one with: python teacher.py, or distill the shipped one: --teacher checkpoints/teacher_small.pt)"
            if args.teacher == "runs/teacher/ckpt.pt" else " (train one with: python teacher.py)")
    tckpt = load_start(args.teacher, "teacher", "--teacher", hint)
    stages = ["causal", "dmd"] if args.stage == "all" else [args.stage]
    first, resume = stage_start(stages[0], stages, args)    # checked before any work
    ick = load_start(first, "student" if resume or stages[0] == "dmd" else "teacher", f"the {stages[0]} stage's start",
                     "" if args.init or resume or stages[0] == "causal" else " (run --stage causal first, or give --init)")
    if not same_network(ick["config"], tckpt["config"]):
        data.fail(f"{first} is another network than the teacher {args.teacher} (its config differs)")
    tcfg = Config(**tckpt["config"])
    preset = next((k for k, v in {"tiny": 16, "small": 32, "base": 64}.items() if v == tcfg.size), "small")
    defaults = dict(causal_steps={"tiny": 50, "small": 600, "base": 3000}, dmd_steps={"tiny": 50, "small": 1400, "base": 3000})
    for k, per_preset in defaults.items():                  # with --minutes: no limit but the time
        if getattr(args, k) is None:
            setattr(args, k, 10 ** 9 if args.minutes else per_preset[preset])
    teacher = RealCamDiT(tcfg).to(dev).requires_grad_(False).eval()
    tweights = tckpt.get("ema") or tckpt["model"]     # a training checkpoint or a release file
    teacher.load_state_dict(tweights)
    scfg = replace(tcfg, chunk=args.chunk, window=args.window, sink=args.sink,
                   warp=WARP_PLANES if args.warp else Config(**ick["config"]).warp)
    try:
        dataset = data.MultiViewDataset(args.data, scfg.size) if args.data else None
    except (OSError, ValueError) as e:
        data.fail(e)
    loops = LoopSampler(None, scfg.size, scenes=dataset.scenes) if args.loopaug > 0 else None
    os.makedirs(args.out, exist_ok=True)

    def get_batch(step, stage):
        u = torch.rand(1, generator=data.rng(args.seed, step, 3)).item()     # tag 3: loop or not
        mp = args.max_pairs or {"causal": 6, "dmd": 12}[stage]
        if loops and stage == "dmd" and u < args.loopaug:
            b = loops.batch(step, args.pairs, mp, args.seed, rank)
        elif dataset:
            b = dataset.batch(step, args.pairs, mp, args.seed, rank)
        else:
            b = data.synthetic_batch(step, args.pairs, mp, scfg.size, scfg.size, args.seed + 1, rank, device=dev)
        cam_src, cam_tgt = data.pair_rays(b["rel"], b["K_src"], b["K_tgt"], scfg.size, scfg.size)
        return [x.to(dev) for x in (b["src"], b["tgt"], cam_src, cam_tgt)]

    interrupt = StopFlag()
    seconds, summary = {}, dict(world=world, device=dev, minutes=args.minutes, stages={})   # seconds: each stage's time

    def budget(stage):
        """Seconds of wall-clock time this stage may use (--minutes): all of them for one stage;
        with both, the causal stage its share and the dmd stage the rest, what causal did not use included."""
        total = 60 * args.minutes
        if len(stages) == 1:
            return total
        return args.causal_share * total if stage == "causal" else total - seconds.get("causal", 0.0)

    for stage in stages:
        path, max_steps = os.path.join(args.out, f"{stage}.pt"), getattr(args, f"{stage}_steps")
        start_path, resume = stage_start(stage, stages, args)
        ck = load_start(start_path, "student" if resume or stage == "dmd" else "teacher", f"the {stage} stage's start")
        spent = ck.get("train_seconds", 0.0) if resume else 0.0          # this stage's time before this run
        if resume and ck["step"] >= max_steps:
            seconds[stage] = spent
            summary["stages"][stage] = dict(steps=ck["step"], steps_this_run=0, train_seconds=spent, already_done=True)
            if master:
                print(f"{stage}: already done ({path}, step {ck['step']})")
            continue
        try:
            student, ema, opt, critic, opt_c, start = build_stage(stage, ck, resume, scfg, tcfg, tweights, args, dev)
        except ValueError as e:                                             # a network the config refuses (--warp)
            data.fail(e)
        if ddp:
            broadcast([student, ema, critic])                # every rank starts from rank 0's weights
        tag = {"causal": 4, "dmd": 5}[stage]                 # the stage's RNG tag
        t_stage, used = time.time(), spent

        def save(step):
            """Rank 0 writes the stage's checkpoint; under DDP every rank waits for it (the next
            stage, on any rank, starts from this file)."""
            if master:
                extra = dict(critic=critic.state_dict(), optim_critic=opt_c.state_dict()) if critic is not None else {}
                save_checkpoint(path, model=student.state_dict(), ema=ema.state_dict(), optim=opt.state_dict(), step=step,
                                config=asdict(scfg), student=dict(steps=args.steps, stage=stage), teacher=args.teacher,
                                args=vars(args), train_seconds=spent + time.time() - t_stage, **extra,
                                rng={"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})})
            if ddp:
                dist.barrier()

        if master:
            print(f"{stage}: {start}.." + (f"{max_steps}" if max_steps < 10 ** 9 else "") + f" steps from {start_path}"
                  + (f", {budget(stage) / 60:.2f} of {args.minutes:g} min" if args.minutes else "")
                  + f", chunk {scfg.chunk}, window {scfg.window}, {args.steps} steps a chunk, {args.pairs} pairs x {world} a step")
        bar = tqdm(range(start, max_steps + 1), disable=not master, dynamic_ncols=True, mininterval=5)
        times, last_eval = [], None
        try:
            for step in bar:
                used = spent + time.time() - t_stage
                hit, time_up = agree(ddp, dev, interrupt.hit, bool(args.minutes) and used >= budget(stage))
                if hit:
                    if master:
                        print(f"interrupted after {step} steps of {stage}: saving {path} (continue with --resume)")
                    save(step)
                    raise SystemExit(130)
                last = step == max_steps or time_up
                if master and args.eval_every and (step % args.eval_every == 0 or last) and step > start:
                    line, last_eval = evaluate(ema, stage, step, args.steps, args.out, dev)
                    bar.write(line)
                if (step % args.save_every == 0 or last) and step > start:
                    save(step)
                if last:
                    if time_up and master:
                        print(f"{stage}: time is up ({used / 60:.2f} min) after {step} steps")
                    break
                t0 = time.time()
                g = data.rng(args.seed, tag, step, rank)
                gs = data.rng(args.seed, tag, step)                 # shared by ranks
                batch = get_batch(step, stage)
                msg = f"{stage} {step}/{max_steps if max_steps < 10 ** 9 else '-'} | T {batch[0].shape[1]}"
                if stage == "causal":
                    msg += causal_step(student, opt, batch, g, args.clip, world, autocast)
                else:
                    loss, gnorm_g, gn, exit_step, loss_c = dmd_step(
                        student, opt, teacher, critic, batch, args.steps, g, gs, args.clip, args.recon, world, autocast,
                        args.dmd, args.recon_loss, opt_c, args.critic_steps, args.guidance)
                    msg += (f" | loss {loss.item():.3e} | critic {loss_c.item():.4f} | |g| {gnorm_g.mean().item():.2f}"
                            f" | gnorm {gn.item():.2f} | exit {exit_step}")
                ema_update(ema, student, step, args.ema)
                times.append(time.time() - t0)
                if master:
                    msg += f" | {1000 * times[-1]:.0f} ms"
                    with open(os.path.join(args.out, "log.txt"), "a") as f:
                        f.write(msg + "\n")
                    if step % 25 == 0 or step < start + 3:
                        bar.write(msg)
        except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
            raise SystemExit(130)
        seconds[stage] = used
        summary["stages"][stage] = dict(steps=step, steps_this_run=len(times), train_seconds=used, time_up=time_up,
                                        budget_seconds=budget(stage) if args.minutes else None,
                                        step_ms=1000 * sorted(times)[len(times) // 2] if times else None,
                                        last_eval=last_eval)
    if master:
        final = os.path.join(args.out, f"{stages[-1]}.pt")
        if os.path.exists(final):
            shutil.copyfile(final, os.path.join(args.out, "ckpt.pt"))
            print(f"student: {os.path.join(args.out, 'ckpt.pt')} (evaluate with: python eval.py --ckpt {os.path.join(args.out, 'ckpt.pt')})")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if ddp:
        dist.barrier()            # every rank leaves together: rank 0 may still be copying the checkpoint
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
