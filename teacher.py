"""
Train the bidirectional teacher with rectified flow on interleaved (source, target) pairs.

    python teacher.py                                   # small preset on CPU, base on CUDA -> runs/teacher
    python teacher.py --preset tiny --max_steps 50 --out runs/tiny   # a smoke test
    python teacher.py --resume                          # continue runs/teacher/ckpt.pt
    python teacher.py --data data/synth                 # train on an on-disk multi-view dataset
    python teacher.py --preset base --minutes 30        # time-boxed: the schedule runs over 30 minutes
    torchrun --standalone --nproc_per_node=8 teacher.py --preset base   # several GPUs (DDP)

Loss (DESIGN section 3): x0 = target (minus source when cfg.residual), e ~ N(0, I), one t per
clip drawn logit-normal/uniform and shifted toward noise, x_t = (1 - t) x0 + t e, and
the velocity error over target tokens only: the network predicts x0 (cfg.pred = "x", the presets'
recipe; loss = || x0_theta - x0 ||^2 / max(t, t_min)^2, the velocity error with t floored) or the
velocity itself (cfg.pred = "v"; loss = || v_theta - (e - x0) ||^2).
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from eval import format_quick, quick_eval, save_sample_video, save_strip
from model import (PRESETS, WARP_PLANES, Config, RealCamDiT, StopFlag, add_noise, attention_pairs, autocast_for,
                   compile_blocks, default_device, encode_target, flops_per_forward, flow_loss, load_checkpoint, null_camera,
                   num_params, peak_flops, sample_t, save_checkpoint)

DEFAULT_STEPS = {"tiny": 300, "small": 8000, "base": 100_000}

p = data.ArgumentParser(description="Train the RealCam-min bidirectional teacher.")
# model and data
p.add_argument("--preset", type=str, default=None,
               help=f"model preset: {', '.join(PRESETS)} (default: small on CPU, base on CUDA)")
p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset folder (default: the synthetic stream)")
p.add_argument("--pairs", type=int, default=None, help="(source, target) pairs a batch per process (default: 16 CPU, 64 CUDA)")
p.add_argument("--max_pairs", type=int, default=6, help="pairs a clip are drawn from 1..max_pairs")
p.add_argument("--static_share", type=float, default=data.P_STATIC, help="share of synthetic training clips with the identity camera, 0..1")
p.add_argument("--pred", type=str, default=None, choices=["v", "x"], help="network output: velocity or clean x0 (default: the preset's)")
p.add_argument("--cam_rope", type=str, default=None,
               help="camera RoPE: comma-separated inverse depths of the planes (1/scene units), one a head ('' = grid RoPE; default: the preset's)")
p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
               help="diffuse target - source instead of the target (default: the preset's)")
p.add_argument("--src_concat", action=argparse.BooleanOptionalAction, default=None,
               help="give each target frame its source frame's pixels as input channels (default: the preset's)")
p.add_argument("--dim", type=int, default=None, help="capacity: transformer width, a multiple of 16 x heads (default: the preset's)")
p.add_argument("--depth", type=int, default=None, help="capacity: transformer blocks (default: the preset's)")
p.add_argument("--heads", type=int, default=None,
               help="attention heads (camera RoPE: head h uses plane h mod planes, so planes beyond the heads go unused; default: the preset's)")
p.add_argument("--ada_single", action=argparse.BooleanOptionalAction, default=None,
               help="one adaLN projection shared by the blocks plus a table a block: a third fewer weights (default: the preset's)")
p.add_argument("--patch", type=int, default=None, help="tokens: patch size in pixels, dividing the frame size (default: the preset's)")
p.add_argument("--warp", action=argparse.BooleanOptionalAction, default=None,
               help="the warp head (model.Config.warp): each pixel picks a depth plane and takes the source's colour "
                    "where its ray meets it; needs --pred x and --src_concat (default: the preset's)")
# optimization
p.add_argument("--max_steps", type=int, default=None,
               help="training steps (default: per preset; with --minutes: no limit but the time)")
p.add_argument("--minutes", type=float, default=None,
               help="time-boxed run: train for this many minutes of wall-clock time (the learning-rate schedule "
                    "runs over them), then save, evaluate and stop; counts on across --resume")
p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
p.add_argument("--warmup", type=int, default=200, help="linear warmup (steps)")
p.add_argument("--min_lr_frac", type=float, default=0.1, help="cosine decay to this fraction of lr")
p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (L2 norm)")
p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights (per step)")
p.add_argument("--cond_drop", type=float, default=0.0,
               help="share of clips trained without their camera (zero rays), for classifier-free guidance, 0..1")
# io and runtime
p.add_argument("--out", type=str, default="runs/teacher", help="output folder (ckpt.pt, log.txt, evals.jsonl, samples, summary.json)")
p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
p.add_argument("--eval_every", type=int, default=500,
               help="steps between held-out evaluations, and one at the end (also when --minutes runs out; 0: none)")
p.add_argument("--eval_steps", type=int, default=25, help="Euler steps of the periodic evaluation's sampler")
p.add_argument("--save_every", type=int, default=250, help="steps between checkpoints")
p.add_argument("--stop_at", type=int, default=None, help="save and stop after this many steps (continue with --resume)")
p.add_argument("--seed", type=int, default=0, help="data and noise seed")
p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
               help="torch.compile the transformer blocks (default: on for CUDA)")
args = p.parse_args()
data.check_args(args, positive=("pairs", "max_pairs", "max_steps", "eval_steps", "save_every", "dim", "depth", "heads", "patch"),
                nonneg=("warmup", "eval_every", "stop_at"))
if args.preset is not None and args.preset not in PRESETS:
    data.fail(f"unknown --preset '{args.preset}': choose from {', '.join(PRESETS)}")
if args.minutes is not None and not args.minutes > 0:
    data.fail(f"--minutes must be positive, got {args.minutes}")
if not (args.lr > 0 and args.clip > 0 and args.weight_decay >= 0 and 0 <= args.ema < 1 and 0 <= args.min_lr_frac <= 1):
    data.fail("--lr and --clip must be positive, --weight_decay non-negative, --ema in [0, 1), --min_lr_frac in [0, 1]")
if not 0 <= args.cond_drop < 1:
    data.fail(f"--cond_drop is a share of the clips, 0..1, got {args.cond_drop}")
if not 0 <= args.static_share <= 1:
    data.fail(f"--static_share is a share of the clips, 0..1, got {args.static_share}")
try:
    cam_rope = None if args.cam_rope is None else tuple(float(r) for r in args.cam_rope.split(",") if r.strip())
except ValueError:
    data.fail(f"--cam_rope takes comma-separated numbers (inverse depths), got '{args.cam_rope}'")
data.check_device(args.device)
data.check_out_dir(args.out)

# -----------------------------------------------------------------------------
# setup: one code path for one process and for torchrun (DDP only when RANK is set)
ddp = "RANK" in os.environ
if ddp:
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
else:
    rank, world = 0, 1
master = rank == 0
cuda = args.device.startswith("cuda")
args.preset = args.preset or ("base" if cuda else "small")
if args.max_steps is None:
    args.max_steps = 10 ** 9 if args.minutes else DEFAULT_STEPS[args.preset]
args.pairs = args.pairs or (64 if cuda else 16)
args.compile = bool(cuda if args.compile is None else args.compile)
torch.manual_seed(args.seed + rank)
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
autocast = autocast_for(args.device)
ckpt_path = os.path.join(args.out, "ckpt.pt")

# model, EMA, optimizer (restored on --resume)
try:
    ckpt = load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
except ValueError as e:
    data.fail(e)
if ckpt and "student" in ckpt:
    data.fail(f"{ckpt_path} is a student checkpoint; --resume continues a teacher (give another --out)")
cfg = Config(**ckpt["config"]) if ckpt else PRESETS[args.preset]
overrides = dict(pred=args.pred, cam_rope=cam_rope, residual=args.residual, src_concat=args.src_concat,
                 dim=args.dim, depth=args.depth, heads=args.heads, patch=args.patch,
                 ada_single=args.ada_single,     # flags over the preset; a resumed run keeps its own
                 warp=None if args.warp is None else WARP_PLANES if args.warp else ())
if not ckpt:
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
if cfg.size % cfg.patch:
    data.fail(f"--patch {cfg.patch} must divide the frame size {cfg.size} of preset {args.preset}")
if cfg.dim % (16 * cfg.heads):
    data.fail(f"--dim {cfg.dim} must be a multiple of 16 x heads = {16 * cfg.heads} (3D RoPE splits each head's channels)")
try:
    model = RealCamDiT(cfg).to(args.device)
except ValueError as e:                                                     # a combination the network refuses
    data.fail(e)
ema = copy.deepcopy(model).requires_grad_(False).eval()
optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
start, best, trained_s = 0, -math.inf, 0.0
if ckpt:
    model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), optim.load_state_dict(ckpt["optim"])
    start, best = ckpt["step"], ckpt.get("best_gain", -math.inf)   # steps done so far
    trained_s = ckpt.get("train_seconds", 0.0)                      # wall-clock time of the schedule so far
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if cuda and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
elif args.resume and master:
    print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
if args.compile:
    compile_blocks(model)                          # per block, before DDP wraps the model
net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
try:
    dataset = data.MultiViewDataset(args.data, cfg.size) if args.data else None
except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}")
if master:
    os.makedirs(args.out, exist_ok=True)
    print(f"teacher: preset {args.preset}, {num_params(model) / 1e6:.2f}M params, {cfg.size}x{cfg.size}, "
          f"{args.pairs} pairs x {world} processes a step, device {args.device}, compile {args.compile}, "
          f"data {args.data or 'synthetic'}, steps {start}.."
          + (f"{args.max_steps}" if args.max_steps < 10 ** 9 else "") + (f" for {args.minutes:g} min" if args.minutes else ""))
device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
peak = peak_flops(device_name)


def lr_at(step, progress):
    """Linear warmup over the first steps, then cosine decay to min_lr_frac * lr as progress
    (steps done, or wall-clock time used with --minutes, over the total) goes from 0 to 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    u = min(1.0, max(0.0, progress))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * u)))


def progress(step, seconds):
    if args.minutes:
        return seconds / (60 * args.minutes)
    return (step - args.warmup) / max(1, args.max_steps - args.warmup)


def get_batch(step):
    """The step's batch on the training device (the synthetic world is rendered there)."""
    if dataset:
        b = dataset.batch(step, args.pairs, args.max_pairs, args.seed, rank)
        b = {k: v.to(args.device) for k, v in b.items()}
    else:
        b = data.synthetic_batch(step, args.pairs, args.max_pairs, cfg.size, cfg.size, args.seed, rank, args.static_share,
                                 args.device)
    cam_src, cam_tgt = data.pair_rays(b["rel"], b["K_src"], b["K_tgt"], cfg.size, cfg.size)
    return b["src"], b["tgt"], cam_src, cam_tgt


def save(step):
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
    save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), optim=optim.state_dict(),
                    step=step, config=asdict(cfg), args=vars(args), rng=rng, best_gain=best,
                    train_seconds=trained_s + (time.time() - t_start))


# -----------------------------------------------------------------------------

def agree(*flags):
    """Stop flags of this process -> the same on every process (one all-reduce, any True wins),
    so all ranks stop at the same step."""
    if not ddp:
        return flags
    f = torch.tensor([float(x) for x in flags], device=args.device)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return [bool(x) for x in f.tolist()]


t_start = time.time()
times, last_eval = [], None                        # (data s, step s, T, B) of each step; the last eval
bar = tqdm(range(start, args.max_steps + 1), disable=not master, dynamic_ncols=True, mininterval=5)
interrupt = StopFlag()
try:
    for step in bar:
        used = trained_s + time.time() - t_start
        hit, time_up = agree(interrupt.hit, bool(args.minutes) and used >= 60 * args.minutes)
        if hit:
            if master:
                print(f"interrupted after {step} steps: saving {ckpt_path} (continue with --resume)")
                save(step)
            raise SystemExit(130)
        last = step == args.max_steps or time_up
        # held-out evaluation of the EMA weights (PSNR vs ground truth and copy-the-source)
        if master and args.eval_every and (step % args.eval_every == 0 or last) and step > start:
            res, (s, x, y) = quick_eval(ema, args.eval_steps, device=args.device)
            mean, _ = quick_eval(ema, 1, device=args.device)      # one step from noise: the posterior mean
            best, last_eval = max(best, res["gain"]), res
            bar.write(f"eval {step} | {args.eval_steps} steps: {format_quick(res)}\n"
                      f"eval {step} | 1 step (mean): {format_quick(mean)}")
            with open(os.path.join(args.out, "evals.jsonl"), "a") as f:
                f.write(json.dumps(dict(step=step, wall_min=(time.time() - t_start) / 60, sample=res, mean=mean)) + "\n")
            save_sample_video(os.path.join(args.out, "sample.mp4"), s, x, y)
            save_strip(os.path.join(args.out, "sample.png"), s, x, y)
        if master and (step % args.save_every == 0 or last) and step > start:
            save(step)
        if last or step == args.stop_at:
            if not last and master:
                save(step)
                print(f"stopped at step {step} as asked (--stop_at): continue with --resume")
            if time_up and master:
                print(f"time is up ({args.minutes:g} min) after {step} steps")
            break
        # one optimization step; the data (rendered on the device) is timed apart from the step
        t0 = time.time()
        src, tgt, cam_src, cam_tgt = get_batch(step)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.time()
        B, T = src.shape[:2]
        g = data.rng(args.seed, step, rank, 1)
        x0 = encode_target(tgt, src, cfg)
        e = torch.randn(x0.shape, generator=g).to(args.device)
        t = sample_t((B, 1), cfg.shift, g).expand(B, T).to(args.device)     # one t a clip
        if args.cond_drop:                                                   # drawn after e and t: the same
            drop = (torch.rand(B, generator=g) < args.cond_drop).to(args.device)   # batches and noise as without
            cam_tgt = torch.where(drop[:, None, None, None, None], null_camera(cam_tgt), cam_tgt)
        with autocast:
            out = net(src, add_noise(x0, e, t), cam_src, cam_tgt, t)
        loss = flow_loss(out, x0, e, t, cfg).mean()                           # target tokens only
        lr = lr_at(step, progress(step, used))
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optim.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))                   # short warm-up of the EMA
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if cuda:
            torch.cuda.synchronize()
        dt_data, dt = t1 - t0, time.time() - t1
        times.append((dt_data, dt, T, B))
        if master:
            fps = B * T * world / (dt_data + dt)
            msg = (f"step {step}/{args.max_steps if args.max_steps < 10 ** 9 else '-'} | loss {loss.item():.4f} | "
                   f"gnorm {gnorm.item():.2f} | lr {lr:.2e} | T {T} | data {1000 * dt_data:.0f} ms | "
                   f"step {1000 * dt:.0f} ms | {fps:.0f} frames/s")
            if peak:     # model FLOPs (attention as scored) of this step, over the step without data
                mfu = 3 * flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T)) * B / dt / peak
                msg += f" | mfu {100 * mfu:.1f}%"
            bar.set_description(f"loss {loss.item():.4f}", refresh=False)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")
            if step % 50 == 0 or step < start + 5:
                bar.write(msg)
except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
    raise SystemExit(130)
if master:
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    steady = times[5:] or times                    # after the first steps (compilation, warm-up)
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    step_s, data_s = med([s for _, s, _, _ in steady]), med([d for d, _, _, _ in steady])
    flops = [3 * flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T)) * B / s for _, s, T, B in steady]
    summary = dict(steps=step, steps_this_run=len(times), wall_min=(time.time() - t_start) / 60,
                   train_seconds=trained_s + time.time() - t_start, device=device_name, world=world,
                   compile=args.compile, step_ms=1000 * step_s, data_ms=1000 * data_s,
                   model_tflops=med(flops) / 1e12 if flops else None,
                   mfu=med(flops) / peak if peak and flops else None, peak_mem_gib=mem,
                   best_gain=best if best > -math.inf else None, last_eval=last_eval)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done: {step} steps, wall {(time.time() - t_start) / 60:.1f} min, median step {1000 * step_s:.0f} ms "
          f"+ data {1000 * data_s:.0f} ms" + (f", peak CUDA memory {mem:.2f} GiB" if cuda else "")
          + (f", best held-out co-visible gain over copy {best:+.2f} dB" if best > -math.inf else ", no evaluation")
          + f" -> {ckpt_path}")
if ddp:
    dist.barrier()                # every rank leaves together: rank 0 may still be evaluating and saving
    dist.destroy_process_group()
