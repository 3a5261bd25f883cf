"""
Train the bidirectional teacher with rectified flow on interleaved (source, target) pairs.

    python teacher.py                                   # small preset on CPU, base on CUDA -> runs/teacher
    python teacher.py --preset tiny --max_steps 50 --out runs/tiny   # a smoke test
    python teacher.py --resume                          # continue runs/teacher/ckpt.pt
    python teacher.py --data data/synth                 # train on an on-disk multi-view dataset
    python teacher.py --preset base --minutes 30        # time-boxed: the schedule runs over 30 minutes
    torchrun --standalone --nproc_per_node=8 teacher.py --preset base   # several GPUs (DDP)

The network is model.Config's recipe at the preset's size (--dim, --depth, --heads, --patch
change the size). Loss (DESIGN section 3): x0 = target - source, e ~ N(0, I), one t per clip
drawn logit-normal/uniform and shifted toward noise, x_t = (1 - t) x0 + t e; the network
predicts x0 and the loss is the velocity error over target tokens only,
|| x0_theta - x0 ||^2 / max(t, t_min)^2. AdamW, linear warmup then cosine decay, gradient
clipping, an EMA of the weights; a held-out evaluation every --eval_every steps.
Where the data has depth (the synthetic stream renders it, data.py's datasets keep it), the warp
head is also told the depth: --depth_loss x the cross-entropy between its plane weights and the ones the true depth asks for
(camera.plane_weights), on co-visible target pixels of the clips that kept their camera
(docs/results.md, What limits wide moves).
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch

import camera
import data
from attention import attention_pairs
from common import (ArgumentParser, StepBar, StopFlag, agree, autocast_for, check_args, check_device, check_finite,
                    check_out_dir, default_device, diverged, ema_update, fail, hold_out_dir, nonfinite, peak_flops,
                    refuse_nonfinite_weights, setup_ddp)
from eval import format_quick, quick_eval, save_sample_video, save_strip
from model import (PRESETS, RealCamDiT, add_noise, compile_blocks, config_from, encode_target, flops_per_forward,
                   flow_loss, load_checkpoint, null_camera, num_params, sample_t, save_checkpoint)

DEFAULT_STEPS = {"tiny": 300, "small": 8000, "base": 100_000}
WEIGHT_DECAY = 0.0      # AdamW's
MIN_LR_FRAC = 0.1       # the cosine decays to this fraction of --lr


DEPTH_LOSS = 0.25   # the depth term's weight (0.05 before; docs/results.md, The depth term's weight)


def parse_args(argv=None):
    p = ArgumentParser(description="Train the RealCam-min bidirectional teacher.")
    # model and data
    p.add_argument("--preset", type=str, default=None,
                   help=f"model size: {', '.join(PRESETS)} (default: small on CPU, base on CUDA)")
    p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset folder (default: the synthetic stream)")
    p.add_argument("--pairs", type=int, default=None, help="(source, target) pairs a batch per process (default: 16 CPU, 64 CUDA)")
    p.add_argument("--max_pairs", type=int, default=6, help="pairs a clip are drawn from 1..max_pairs")
    p.add_argument("--static_share", type=float, default=data.P_STATIC,
                   help="share of synthetic training clips with the identity camera, 0..1")
    p.add_argument("--dim", type=int, default=None, help="capacity: transformer width, a multiple of 16 x heads (default: the preset's)")
    p.add_argument("--depth", type=int, default=None, help="capacity: transformer blocks (default: the preset's)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (camera RoPE: head h uses plane h mod planes, so planes beyond the heads go unused; default: the preset's)")
    p.add_argument("--patch", type=int, default=None, help="tokens: patch size in pixels, dividing the frame size (default: the preset's)")
    # optimization
    p.add_argument("--max_steps", type=int, default=None,
                   help="training steps (default: per preset; with --minutes: no limit but the time)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time-boxed run: train for this many minutes of wall-clock time (the learning-rate schedule "
                        "runs over them), then save, evaluate and stop; counts on across --resume")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup (steps)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (L2 norm)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights (per step)")
    p.add_argument("--depth_loss", type=float, default=DEPTH_LOSS,
                   help="weight of the warp head's depth term (cross-entropy of its plane weights against the true "
                        "depth's, co-visible target pixels), where the data has depth (the synthetic stream, data.py's datasets)")
    p.add_argument("--cond_drop", type=float, default=0.1,
                   help="share of clips trained without their camera (zero rays), for classifier-free guidance "
                        "(model.teacher_sample, distill.py --guidance), 0..1")
    # io and runtime
    p.add_argument("--out", type=str, default="runs/teacher", help="output folder (ckpt.pt, log.txt, evals.jsonl, samples, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (its network and steps)")
    p.add_argument("--eval_every", type=int, default=500,
                   help="steps between held-out evaluations, and one at the end (also when --minutes runs out; 0: none)")
    p.add_argument("--eval_steps", type=int, default=25, help="Euler steps of the periodic evaluation's sampler")
    p.add_argument("--save_every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--stop_at", type=int, default=None, help="save and stop after this many steps (continue with --resume)")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed")
    p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (default: on for CUDA)")
    args = p.parse_args(argv)
    check_args(args, positive=("pairs", "max_pairs", "max_steps", "eval_steps", "save_every", "dim", "depth", "heads", "patch"),
               nonneg=("warmup", "eval_every", "stop_at"))
    if args.preset is not None and args.preset not in PRESETS:
        fail(f"unknown --preset '{args.preset}': choose from {', '.join(PRESETS)}")
    if args.minutes is not None and not args.minutes > 0:
        fail(f"--minutes must be positive, got {args.minutes}")
    check_finite(args, ("lr", "clip", "minutes", "depth_loss"))
    if args.depth_loss < 0:
        fail(f"--depth_loss is a weight, 0 or more, got {args.depth_loss}")
    if not (args.lr > 0 and args.clip > 0 and 0 <= args.ema < 1):
        fail("--lr and --clip must be positive, --ema in [0, 1)")
    if not 0 <= args.cond_drop < 1:
        fail(f"--cond_drop is a share of the clips, 0..1, got {args.cond_drop}")
    if not 0 <= args.static_share <= 1:
        fail(f"--static_share is a share of the clips, 0..1, got {args.static_share}")
    check_device(args.device)
    check_out_dir(args.out)
    return args


def network(args, ckpt):
    """The Config: a resumed run's own, else the preset's with the capacity flags over it."""
    if ckpt:
        return config_from(ckpt["config"])
    sizes = dict(dim=args.dim, depth=args.depth, heads=args.heads, patch=args.patch)
    cfg = replace(PRESETS[args.preset], **{k: v for k, v in sizes.items() if v is not None})
    if cfg.size % cfg.patch:
        fail(f"--patch {cfg.patch} must divide the frame size {cfg.size} of preset {args.preset}")
    if cfg.dim % (16 * cfg.heads):
        fail(f"--dim {cfg.dim} must be a multiple of 16 x heads = {16 * cfg.heads} (3D RoPE splits each head's channels)")
    return cfg


def build(args, ckpt, cuda):
    """Model, EMA and AdamW, restored from a checkpoint if there is one. Returns them, the Config,
    the steps done, the best held-out gain and the wall-clock seconds of the schedule so far."""
    cfg = network(args, ckpt)
    model = RealCamDiT(cfg).to(args.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY)
    if not ckpt:
        return cfg, model, ema, optim, 0, -math.inf, 0.0
    model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), optim.load_state_dict(ckpt["optim"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if cuda and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return cfg, model, ema, optim, ckpt["step"], ckpt.get("best_gain", -math.inf), ckpt.get("train_seconds", 0.0)


def lr_at(step, progress, args):
    """Linear warmup over the first steps, then cosine decay to MIN_LR_FRAC * lr as progress
    (steps done, or wall-clock time used with --minutes, over the total) goes from 0 to 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    u = min(1.0, max(0.0, progress))
    return args.lr * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * u)))


def progress(step, seconds, args):
    if args.minutes:
        return seconds / (60 * args.minutes)
    return (step - args.warmup) / max(1, args.max_steps - args.warmup)


def get_batch(step, args, cfg, dataset, rank):
    """The step's batch on the training device (the synthetic world is rendered there): src, tgt,
    cam_src, cam_tgt and, when the depth term is on and the data has depth (the synthetic stream,
    data.py's datasets), camera.plane_target's (weights, mask), else None."""
    if dataset:
        b = dataset.batch(step, args.pairs, args.max_pairs, args.seed, rank)
        b = {k: v.to(args.device) for k, v in b.items()}
    else:
        b = data.synthetic_batch(step, args.pairs, args.max_pairs, cfg.size, cfg.size, args.seed, rank, args.static_share,
                                 args.device, depth=bool(args.depth_loss and cfg.warp))
    cam_src, cam_tgt = camera.pair_rays(b["rel"], b["K_src"], b["K_tgt"], cfg.size, cfg.size)
    depth = "depth_tgt" in b and args.depth_loss and cfg.warp           # a dataset on disk may have it
    return b["src"], b["tgt"], cam_src, cam_tgt, camera.plane_target(b, cfg.warp) if depth else None


def depth_loss(logits, target, mask):
    """Cross-entropy of plane logits (B, T, K, H, W) against target weights, the mean over the
    mask's pixels (B, T, H, W) (0 when none); its least is the targets' own entropy."""
    ce = -(target * logits.float().log_softmax(2)).sum(2)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def target_depth_loss(model, target, mask):
    """depth_loss on the target frames of the model's last forward (model.last_warp: B clips of
    T sources then T targets), for target weights (B, T, K, H, W) and a mask (B, T, H, W)."""
    (B, T), K, o = mask.shape[:2], len(model.cfg.warp), model.last_warp
    return depth_loss(o.view(B, 2 * T, K + 1, *o.shape[-2:])[:, T:, :K], target, mask)


def train_step(net, model, ema, optim, batch, step, lr, args, rank):
    """One optimization step of the flow loss on target tokens (and the depth term with a depth
    target), then the EMA. Returns the loss, the gradient norm before clipping and the depth
    term (None without)."""
    src, tgt, cam_src, cam_tgt, depth = batch
    B, T = src.shape[:2]
    cfg = model.cfg
    g = data.rng(args.seed, step, rank, 1)
    x0 = encode_target(tgt, src, cfg)
    e = torch.randn(x0.shape, generator=g).to(args.device)
    t = sample_t((B, 1), cfg.shift, g).expand(B, T).to(args.device)     # one t a clip
    if args.cond_drop:                                                   # drawn after e and t: the same
        drop = (torch.rand(B, generator=g) < args.cond_drop).to(args.device)   # batches and noise as without
        cam_tgt = torch.where(drop[:, None, None, None, None], null_camera(cam_tgt), cam_tgt)
    with autocast_for(args.device):
        out = net(src, add_noise(x0, e, t), cam_src, cam_tgt, t)
    loss, dterm = flow_loss(out, x0, t, cfg).mean(), None
    if depth is not None:
        w, mask = depth
        if args.cond_drop:                                               # no camera, no depth to tell
            mask = mask & ~drop[:, None, None, None]
        dterm = target_depth_loss(model, w, mask)
        loss = loss + args.depth_loss * dterm
    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optim.step()
    model.last_warp = None                  # no graph kept between steps (and the model stays deep-copyable)
    ema_update(ema, model, step, args.ema)
    return loss, gnorm, dterm


def evaluate(ema, step, args, t_start):
    """Held-out evaluation of the EMA weights (PSNR against the truth and copy-the-source) at
    --eval_steps and at one step (the posterior mean): evals.jsonl, sample.mp4 and .png.
    Returns the log lines and the figures."""
    res, (s, x, y) = quick_eval(ema, args.eval_steps, device=args.device)
    mean, _ = quick_eval(ema, 1, device=args.device)
    with open(os.path.join(args.out, "evals.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=step, wall_min=(time.time() - t_start) / 60, sample=res, mean=mean)) + "\n")
    save_sample_video(os.path.join(args.out, "sample.mp4"), s, x, y)
    save_strip(os.path.join(args.out, "sample.png"), s, x, y)
    return (f"eval {step} | {args.eval_steps} steps: {format_quick(res)}\n"
            f"eval {step} | 1 step (mean): {format_quick(mean)}"), res


def step_line(step, loss, gnorm, lr, T, B, dt_data, dt, world, cfg, peak, args):
    fps = B * T * world / (dt_data + dt)
    msg = (f"step {step}/{args.max_steps if args.max_steps < 10 ** 9 else '-'} | loss {loss.item():.4f} | "
           f"gnorm {gnorm.item():.2f} | lr {lr:.2e} | T {T} | data {1000 * dt_data:.0f} ms | "
           f"step {1000 * dt:.0f} ms | {fps:.0f} frames/s")
    if peak:     # model FLOPs (attention as scored) of this step, over the step without data
        mfu = 3 * flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T)) * B / dt / peak
        msg += f" | mfu {100 * mfu:.1f}%"
    return msg


def summarize(times, step, wall_s, train_s, best, last_eval, cfg, device_name, peak, world, args):
    """summary.json and the last line: steps, times, throughput, MFU, memory, the best gain."""
    cuda = args.device.startswith("cuda")
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    steady = times[5:] or times                    # after the first steps (compilation, warm-up)
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    step_s, data_s = med([s for _, s, _, _ in steady]), med([d for d, _, _, _ in steady])
    flops = [3 * flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T)) * B / s for _, s, T, B in steady]
    summary = dict(steps=step, steps_this_run=len(times), wall_min=wall_s / 60, train_seconds=train_s,
                   device=device_name, world=world, compile=args.compile, step_ms=1000 * step_s, data_ms=1000 * data_s,
                   model_tflops=med(flops) / 1e12 if flops else None,
                   mfu=med(flops) / peak if peak and flops else None, peak_mem_gib=mem,
                   best_gain=best if best > -math.inf else None, last_eval=last_eval)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"done: {step} steps, wall {wall_s / 60:.1f} min, median step {1000 * step_s:.0f} ms "
          f"+ data {1000 * data_s:.0f} ms" + (f", peak CUDA memory {mem:.2f} GiB" if cuda else "")
          + (f", best held-out co-visible gain over copy {best:+.2f} dB" if best > -math.inf else ", no evaluation")
          + f" -> {os.path.join(args.out, 'ckpt.pt')}")


def save(path, model, ema, optim, step, args, best, train_seconds):
    """The checkpoint, only of finite weights: a run that diverged keeps its last good one."""
    refuse_nonfinite_weights("training", step, path, model, ema)
    cuda = args.device.startswith("cuda")
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
    save_checkpoint(path, model=model.state_dict(), ema=ema.state_dict(), optim=optim.state_dict(), step=step,
                    config=asdict(model.cfg), args=vars(args), rng=rng, best_gain=best, train_seconds=train_seconds)
    return step


def train(args, net, model, ema, optim, dataset, start, best, trained_s, ddp, rank, world):
    """The training loop from step `start`: at each step, stop on Ctrl-C or when the time is up
    (every rank at the same step), evaluate and save on schedule, then one optimization step.
    Returns the last step, the steps' times (data s, step s, T, B), the best gain and the last
    evaluation."""
    master, cuda, cfg = rank == 0, args.device.startswith("cuda"), model.cfg
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    peak = peak_flops(torch.cuda.get_device_name(args.device) if cuda else "cpu")
    t_start = time.time()
    seconds = lambda: trained_s + time.time() - t_start            # the schedule's wall-clock time so far
    times, last_eval, bad, saved = [], None, None, (start if args.resume and start else None)
    bar = StepBar(start, args.max_steps, 60 * args.minutes if args.minutes else None, disable=not master)
    interrupt, complete = StopFlag(), False
    for step in range(start, args.max_steps + 1):
        used = seconds()
        bar.update(step, used)
        hit, time_up, nan = agree(ddp, args.device, interrupt.hit, bool(args.minutes) and used >= 60 * args.minutes,
                                  bad is not None)
        if nan:
            bar.finish(False)
            diverged("training", bad, saved, ckpt_path, master)
        if hit:
            bar.finish(False)
            if master:
                print(f"interrupted after {step} steps: saving {ckpt_path} (continue with --resume)")
                save(ckpt_path, model, ema, optim, step, args, best, seconds())
            raise SystemExit(130)
        last = step == args.max_steps or time_up
        if master and args.eval_every and (step % args.eval_every == 0 or last) and step > start:
            lines, last_eval = evaluate(ema, step, args, t_start)
            best = max(best, last_eval["gain"])
            bar.write(lines)
        if master and (step % args.save_every == 0 or last) and step > start:
            saved = save(ckpt_path, model, ema, optim, step, args, best, seconds())
        if last or step == args.stop_at:
            complete = last
            if not last and master:
                save(ckpt_path, model, ema, optim, step, args, best, seconds())
                print(f"stopped at step {step} as asked (--stop_at): continue with --resume")
            if time_up and master:
                print(f"time is up ({args.minutes:g} min) after {step} steps")
            break
        t0 = time.time()                             # the data (rendered on the device) timed apart from the step
        batch = get_batch(step, args, cfg, dataset, rank)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.time()
        lr = lr_at(step, progress(step, used, args), args)
        loss, gnorm, dterm = train_step(net, model, ema, optim, batch, step, lr, args, rank)
        if nonfinite(loss, gnorm):
            bad = (step, loss.item(), gnorm.item())
        if cuda:
            torch.cuda.synchronize()
        (B, T), dt_data, dt = batch[0].shape[:2], t1 - t0, time.time() - t1
        times.append((dt_data, dt, T, B))
        if master:
            msg = step_line(step, loss, gnorm, lr, T, B, dt_data, dt, world, cfg, peak, args)
            msg += f" | depth {dterm.item():.3f}" if dterm is not None else ""
            bar.describe(f"loss {loss.item():.4f}")
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(msg + "\n")
            if step % 50 == 0 or step < start + 5:
                bar.write(msg)
    bar.finish(complete)
    return step, times, best, last_eval, t_start


def main():
    args = parse_args()
    ddp, rank, world, args.device = setup_ddp(args.device)   # one code path for one process and torchrun
    master, cuda = rank == 0, args.device.startswith("cuda")
    args.preset = args.preset or ("base" if cuda else "small")
    if args.max_steps is None:
        args.max_steps = 10 ** 9 if args.minutes else DEFAULT_STEPS[args.preset]
    args.pairs = args.pairs or (64 if cuda else 16)
    args.compile = bool(cuda if args.compile is None else args.compile)
    torch.manual_seed(args.seed + rank)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    try:
        ckpt = load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
    except ValueError as e:
        fail(e)
    if ckpt and "student" in ckpt:
        fail(f"{ckpt_path} is a student checkpoint; --resume continues a teacher (give another --out)")
    try:
        cfg, model, ema, optim, start, best, trained_s = build(args, ckpt, cuda)
    except ValueError as e:                                                 # a combination the network refuses
        fail(e)
    if args.resume and not ckpt and master:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    was = ckpt and ckpt.get("args", {}).get("depth_loss", 0.0)        # runs saved before the term had none
    if ckpt and was != args.depth_loss and master:
        print(f"--resume: the run was trained with --depth_loss {was:g}; it goes on with {args.depth_loss:g}")
    if args.compile:
        compile_blocks(model)                          # per block, before DDP wraps the model
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    try:
        dataset = data.MultiViewDataset(args.data, cfg.size) if args.data else None
    except (OSError, ValueError) as e:
        fail(e)
    if master:
        hold_out_dir(args.out)
        print(f"teacher: preset {args.preset}, {num_params(model) / 1e6:.2f}M params, {cfg.size}x{cfg.size}, "
              f"{args.pairs} pairs x {world} processes a step, device {args.device}, compile {args.compile}, "
              f"data {args.data or 'synthetic'}, steps {start}.."
              + (f"{args.max_steps}" if args.max_steps < 10 ** 9 else "") + (f" for {args.minutes:g} min" if args.minutes else ""))
    try:
        step, times, best, last_eval, t_start = train(args, net, model, ema, optim, dataset, start, best, trained_s,
                                                      ddp, rank, world)
    except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
        raise SystemExit(130)
    if master:
        device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
        summarize(times, step, time.time() - t_start, trained_s + time.time() - t_start, best, last_eval, cfg,
                  device_name, peak_flops(device_name), world, args)
    if ddp:
        torch.distributed.barrier()     # every rank leaves together: rank 0 may still be evaluating and saving
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
