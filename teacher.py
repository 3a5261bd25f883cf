"""
Train the bidirectional teacher with rectified flow on interleaved (source, target) pairs.

    python teacher.py                                   # small preset on CPU, base on CUDA -> runs/teacher
    python teacher.py --preset tiny --max_steps 50 --out runs/tiny   # a smoke test
    python teacher.py --resume                          # continue runs/teacher/ckpt.pt
    python teacher.py --data data/synth                 # train on an on-disk multi-view dataset
    torchrun --standalone --nproc_per_node=8 teacher.py --preset base   # several GPUs (DDP)

Loss (DESIGN section 3): x0 = target (minus source when cfg.residual), e ~ N(0, I), one t per
clip drawn logit-normal/uniform and shifted toward noise, x_t = (1 - t) x0 + t e, and
loss = || v_theta(x_t, t | source, cameras) - (e - x0) ||^2 over target tokens only.
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
import torch.nn.functional as F
from tqdm import tqdm

import data
from eval import format_quick, quick_eval, save_sample_video, save_strip
from model import (PRESETS, Config, RealCamDiT, StopFlag, add_noise, encode_target, flops_per_forward, flow_loss,
                   load_checkpoint, num_params, sample_t, save_checkpoint)

DEFAULT_STEPS = {"tiny": 300, "small": 8000, "base": 100_000}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, for MFU

p = data.ArgumentParser(description="Train the RealCam-min bidirectional teacher.")
# model and data
p.add_argument("--preset", type=str, default=None,
               help=f"model preset: {', '.join(PRESETS)} (default: small on CPU, base on CUDA)")
p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset (default: synthetic stream)")
p.add_argument("--pairs", type=int, default=None, help="(source, target) pairs a batch per process (default: 16 CPU, 64 CUDA)")
p.add_argument("--max_pairs", type=int, default=6, help="pairs a clip are drawn from 1..max_pairs")
p.add_argument("--static_share", type=float, default=data.P_STATIC, help="share of synthetic training clips with the identity camera, 0..1")
p.add_argument("--pred", type=str, default=None, choices=["v", "x"], help="network output: velocity or clean x0 (default: the preset's)")
p.add_argument("--cam_rope", type=str, default=None,
               help="camera RoPE: comma-separated inverse depths of the planes, one a head ('' = grid RoPE; default: the preset's)")
p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
               help="diffuse target - source instead of the target (default: the preset's)")
p.add_argument("--src_concat", action=argparse.BooleanOptionalAction, default=None,
               help="give each target frame its source frame's pixels as input channels (default: the preset's)")
# optimization
p.add_argument("--max_steps", type=int, default=None, help="training steps (default: per preset)")
p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
p.add_argument("--min_lr_frac", type=float, default=0.1, help="cosine decay to this fraction of lr")
p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
# io and runtime
p.add_argument("--out", type=str, default="runs/teacher", help="output folder (ckpt.pt, samples, log)")
p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
p.add_argument("--eval_every", type=int, default=500, help="steps between held-out evaluations, and one at the end (0: none)")
p.add_argument("--eval_steps", type=int, default=25, help="Euler steps for the periodic evaluation")
p.add_argument("--save_every", type=int, default=250, help="steps between checkpoints")
p.add_argument("--stop_at", type=int, default=None, help="save and stop after this many steps (time-boxed runs; continue with --resume)")
p.add_argument("--seed", type=int, default=0, help="data and noise seed")
p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")
args = p.parse_args()
data.check_args(args, positive=("pairs", "max_pairs", "max_steps", "eval_steps", "save_every"),
                nonneg=("warmup", "eval_every", "stop_at"))
if args.preset is not None and args.preset not in PRESETS:
    data.fail(f"unknown --preset '{args.preset}': choose from {', '.join(PRESETS)}")
if not (args.lr > 0 and args.clip > 0 and args.weight_decay >= 0 and 0 <= args.ema < 1 and 0 <= args.min_lr_frac <= 1):
    data.fail("--lr and --clip must be positive, --weight_decay non-negative, --ema in [0, 1), --min_lr_frac in [0, 1]")
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
args.max_steps = args.max_steps if args.max_steps is not None else DEFAULT_STEPS[args.preset]
args.pairs = args.pairs or (64 if cuda else 16)
args.compile = bool(cuda if args.compile is None else args.compile)
torch.manual_seed(args.seed + rank)
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
ckpt_path = os.path.join(args.out, "ckpt.pt")

# model, EMA, optimizer (restored on --resume)
try:
    ckpt = load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
except ValueError as e:
    data.fail(e)
if ckpt and "student" in ckpt:
    data.fail(f"{ckpt_path} is a student checkpoint; --resume continues a teacher (give another --out)")
cfg = Config(**ckpt["config"]) if ckpt else PRESETS[args.preset]
if not ckpt and args.pred is not None:
    cfg = replace(cfg, pred=args.pred)
if not ckpt and cam_rope is not None:
    cfg = replace(cfg, cam_rope=cam_rope)
for k in ("residual", "src_concat"):
    if not ckpt and getattr(args, k) is not None:
        cfg = replace(cfg, **{k: getattr(args, k)})
model = RealCamDiT(cfg).to(args.device)
ema = copy.deepcopy(model).requires_grad_(False).eval()
optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
start, best = 0, -math.inf
if ckpt:
    model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), optim.load_state_dict(ckpt["optim"])
    start, best = ckpt["step"], ckpt.get("best_gain", -math.inf)   # steps done so far
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if cuda and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
elif args.resume and master:
    print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
net = torch.compile(model) if args.compile else model
net = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
try:
    dataset = data.MultiViewDataset(args.data, cfg.size) if args.data else None
except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}")
L = (cfg.size // cfg.patch) ** 2
if master:
    os.makedirs(args.out, exist_ok=True)
    print(f"teacher: preset {args.preset}, {num_params(model) / 1e6:.2f}M params, {cfg.size}x{cfg.size}, "
          f"{args.pairs} pairs x {world} processes a step, device {args.device}, "
          f"data {args.data or 'synthetic'}, steps {start}..{args.max_steps}")
peak = next((v for k, v in PEAK_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)


def lr_at(step):
    """Linear warmup, then cosine decay to min_lr_frac * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    u = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * u)))


def get_batch(step):
    if dataset:
        b = dataset.batch(step, args.pairs, args.max_pairs, args.seed, rank)
    else:
        b = data.synthetic_batch(step, args.pairs, args.max_pairs, cfg.size, cfg.size, args.seed, rank, args.static_share)
    cam_src, cam_tgt = data.pair_rays(b["rel"], b["K_src"], b["K_tgt"], cfg.size, cfg.size)
    return [x.to(args.device) for x in (b["src"], b["tgt"], cam_src, cam_tgt)]


def save(step):
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
    save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), optim=optim.state_dict(),
                    step=step, config=asdict(cfg), args=vars(args), rng=rng, best_gain=best)


# -----------------------------------------------------------------------------
t_start = time.time()
bar = tqdm(range(start, args.max_steps + 1), disable=not master, dynamic_ncols=True, mininterval=5)
interrupt = StopFlag()
try:
    for step in bar:
        if interrupt.stop(ddp, args.device):
            if master:
                print(f"interrupted after {step} steps: saving {ckpt_path} (continue with --resume)")
                save(step)
            raise SystemExit(130)
        last = step == args.max_steps
        # periodic held-out evaluation of the EMA weights (PSNR vs ground truth and copy-the-source)
        if master and args.eval_every and (step % args.eval_every == 0 or last) and step > start:
            res, (s, x, y) = quick_eval(ema, args.eval_steps, device=args.device)
            mean, _ = quick_eval(ema, 1, device=args.device)      # one step from noise: the posterior mean
            best = max(best, res["gain"])
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
            break
        # one optimization step
        t0 = time.time()
        src, tgt, cam_src, cam_tgt = get_batch(step)
        B, T = src.shape[:2]
        g = data.rng(args.seed, step, rank, 1)
        x0 = encode_target(tgt, src, cfg)
        e = torch.randn(x0.shape, generator=g).to(args.device)
        t = sample_t((B, 1), cfg.shift, g).expand(B, T).to(args.device)     # one t a clip
        with autocast:
            out = net(src, add_noise(x0, e, t), cam_src, cam_tgt, t)
        loss = flow_loss(out, x0, e, t, cfg).mean()                           # target tokens only
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
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
        dt = time.time() - t0
        if master:
            fps = B * T * world / dt
            msg = (f"step {step}/{args.max_steps} | loss {loss.item():.4f} | gnorm {gnorm.item():.2f} | "
                   f"lr {lr_at(step):.2e} | T {T} | {1000 * dt:.0f} ms | {fps:.0f} frames/s")
            if peak:
                mfu = 3 * flops_per_forward(cfg, 2 * T) * B * world / dt / (peak * world)
                msg += f" | mfu {100 * mfu:.1f}%"
            bar.set_description(f"loss {loss.item():.4f}", refresh=False)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")
            if step % 50 == 0 or step < start + 5:
                bar.write(msg)
except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
    raise SystemExit(130)
if master:
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    print(f"done: {args.max_steps} steps, wall {(time.time() - t_start) / 60:.1f} min, peak CUDA memory "
          f"{mem:.2f} GiB, best held-out co-visible gain over copy {best:+.2f} dB -> {ckpt_path}")
if ddp:
    dist.destroy_process_group()
