"""
Speed benchmark: one run, one table (and JSON), one machine, one model size.

    python bench.py                                  # the shipped student (checkpoints/student_small.pt)
    python bench.py --ckpt runs/student/ckpt.pt --long 2000
    python bench.py --ckpt '' --preset base --device cuda --compile   # random weights: speed does not depend on them

Measures: the student streaming frame by frame (KV cache, rolling window) at 1, 2 and 4 steps;
the bidirectional teacher producing the same frames with 50 Euler steps; per-frame time near
frame 50 and near frame --long of one stream; teacher.py's training step; peak memory.
Prints one table and writes runs/bench/bench.json (--out folder).
"""
import argparse
import json
import os
import resource
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import data
from model import (PRESETS, SHIPPED_STUDENT, KVCache, RealCamDiT, add_noise, flops_per_forward, load_model, sample_t,
                   student_chunk, teacher_sample)

p = data.ArgumentParser(description="RealCam-min speed benchmark.")
p.add_argument("--preset", type=str, default="small", help=f"model preset (random weights) when --ckpt '': {', '.join(PRESETS)}")
p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT,
               help="benchmark this checkpoint's model (default: the shipped student, checkpoints/student_small.pt; "
                    "'' for --preset)")
p.add_argument("--frames", type=int, default=16, help="frames for the student/teacher comparison")
p.add_argument("--long", type=int, default=2000, help="frame index for the long-stream measurement")
p.add_argument("--window", type=int, default=None,
               help="rolling window (chunks) of the student, 0: all (default: the checkpoint's, else 4)")
p.add_argument("--teacher_steps", type=int, default=50, help="the teacher's Euler sampling steps")
p.add_argument("--out", type=str, default="runs/bench", help="output folder (created if missing): bench.json")
p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model (CUDA)")
args = p.parse_args()
data.check_args(args, positive=("frames", "long", "teacher_steps"), nonneg=("window",))
if not args.ckpt and args.preset not in PRESETS:
    data.fail(f"unknown --preset '{args.preset}': choose from {', '.join(PRESETS)}")
data.check_device(args.device)
data.check_out_dir(args.out)

dev, cuda = args.device, args.device.startswith("cuda")
if args.ckpt:
    try:
        model, _ = load_model(args.ckpt, dev)
    except FileNotFoundError as e:
        hint = ("the shipped student is part of the repository: restore it with git checkout -- checkpoints/"
                if os.path.abspath(args.ckpt) == SHIPPED_STUDENT else
                "or benchmark random weights of a preset: --ckpt '' --preset small")
        data.fail(f"{e} ({hint})")
    except ValueError as e:
        data.fail(e)
else:
    torch.manual_seed(0)
    model = RealCamDiT(PRESETS[args.preset]).to(dev).eval()
model.cfg = replace(model.cfg, window=args.window if args.window is not None else (model.cfg.window if args.ckpt else 4))
cfg, S = model.cfg, model.cfg.size
dtype = torch.bfloat16 if cuda else torch.float32
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
if args.compile:
    model.forward_frames = torch.compile(model.forward_frames, dynamic=True)


def sync():
    if cuda:
        torch.cuda.synchronize()


def rays(rel, n):
    K = torch.tensor([1.0, 1.0, 0.5, 0.5], device=dev).expand(1, n, 4)
    return data.pair_rays(rel[None].to(dev), K, K, S, S)


@torch.no_grad()
def stream(n, steps, time_from=0):
    """Stream n frames chunk by chunk; returns per-frame seconds (only from frame time_from on)."""
    cache, times = KVCache(cfg), []
    src = torch.randn(1, cfg.chunk, 3, S, S, device=dev)
    rel, _ = data.preset_path("orbit_left", cfg.chunk)
    cs, ct = rays(rel, cfg.chunk)
    for c0 in range(0, n, cfg.chunk):
        k = 1 if c0 < time_from - 4 * cfg.chunk else steps      # fast-forward cheaply to the region of interest
        t0 = time.perf_counter()
        noise = torch.randn((k, 1, cfg.chunk, 3, S, S), device=dev)
        with autocast:
            student_chunk(model, cache, src, cs, ct, torch.arange(c0, c0 + cfg.chunk, device=dev), k, noise)
        sync()
        if c0 >= time_from:
            times += [(time.perf_counter() - t0) / cfg.chunk] * cfg.chunk
    return times


rows = {}
stream(4, 4)                                                        # warm-up
for steps in (1, 2, 4):
    t = torch.tensor(stream(args.frames, steps))
    rows[f"student {steps} step"] = dict(ms_per_frame=1000 * t.mean().item(), fps=1 / t.mean().item(),
                                         first_frame_ms=1000 * t[0].item(), p95_ms=1000 * t.quantile(0.95).item())
# teacher: all frames at once, bidirectional, 50 steps; nothing comes out before the end
src = torch.randn(1, args.frames, 3, S, S, device=dev)
cs, ct = rays(data.preset_path("orbit_left", args.frames)[0], args.frames)
with torch.no_grad(), autocast:
    teacher_sample(model, src[:, :2], cs[:, :2], ct[:, :2], 2)
    sync()
    t0 = time.perf_counter()
    teacher_sample(model, src, cs, ct, args.teacher_steps)
    sync()
dt = time.perf_counter() - t0
rows[f"teacher {args.teacher_steps} steps"] = dict(ms_per_frame=1000 * dt / args.frames, fps=args.frames / dt,
                                                   first_frame_ms=1000 * dt, p95_ms=1000 * dt)
# flat cost with the rolling cache: near frame 50 vs near frame --long of one stream
near = lambda f: torch.tensor(stream(f + 10, 4, time_from=f)).median().item()
t50, tlong = near(50), near(args.long)
# training throughput: teacher.py's step (16 pairs on CPU, 64 on CUDA)
train = RealCamDiT(cfg).to(dev).train()
opt = torch.optim.AdamW(train.parameters(), lr=1e-4)
pairs = 64 if cuda else 16
b = data.synthetic_batch(1, pairs, 4, S, S)                         # T drawn from 1..4
B, T = b["src"].shape[:2]
cs_b, ct_b = [c.to(dev) for c in data.pair_rays(b["rel"], b["K_src"], b["K_tgt"], S, S)]
x0, srcb = (b["tgt"] - b["src"]).to(dev), b["src"].to(dev)
times = []
for i in range(6):
    t0 = time.perf_counter()
    t = sample_t((B, 1), cfg.shift).expand(B, T).to(dev)
    e = torch.randn_like(x0)
    with autocast:
        loss = F.mse_loss(train(srcb, add_noise(x0, e, t), cs_b, ct_b, t).float(), e - x0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sync()
    if i >= 2:
        times.append(time.perf_counter() - t0)
step_s = sum(times) / len(times)
flops = 3 * flops_per_forward(cfg, 2 * T) * B
mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

# -----------------------------------------------------------------------------
s4, tt = rows["student 4 step"], rows[f"teacher {args.teacher_steps} steps"]
device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
print(f"RealCam-min bench | {device_name} | {S}x{S}, dim {cfg.dim} x {cfg.depth}, chunk {cfg.chunk}, "
      f"window {cfg.window} | {dtype}")
print(f"{'':22s} {'ms/frame':>9s} {'frames/s':>9s} {'1st frame ms':>13s} {'p95 ms':>8s}")
for k, r in rows.items():
    print(f"{k:22s} {r['ms_per_frame']:9.1f} {r['fps']:9.1f} {r['first_frame_ms']:13.1f} {r['p95_ms']:8.1f}")
print(f"teacher / student (4 steps): {tt['ms_per_frame'] / s4['ms_per_frame']:.1f}x per frame, "
      f"{tt['first_frame_ms'] / s4['first_frame_ms']:.0f}x latency to the first frame")
print(f"rolling cache: {1000 * t50:.1f} ms/frame near frame 50, {1000 * tlong:.1f} near frame {args.long} "
      f"(ratio {tlong / t50:.2f})")
print(f"training step ({B} clips x {T} pairs): {1000 * step_s:.0f} ms, {B * T / step_s:.0f} frames/s, "
      f"{flops / step_s / 1e9:.0f} GFLOP/s | peak memory {mem:.2f} GiB")
os.makedirs(args.out, exist_ok=True)
out = os.path.join(args.out, "bench.json")
with open(out, "w") as f:
    json.dump(dict(device=device_name, size=S, dim=cfg.dim, depth=cfg.depth, rows=rows, t50_ms=1000 * t50,
                   tlong_ms=1000 * tlong, long=args.long, train_step_ms=1000 * step_s,
                   train_frames_per_s=B * T / step_s, train_gflops=flops / step_s / 1e9, peak_mem_gib=mem), f, indent=1)
print(f"wrote {out}")
