"""
Speed benchmark: one run, one table (and OUT/bench.json), one machine, one model size.

    python bench.py                                  # the shipped student (checkpoints/student_small.pt)
    python bench.py --ckpt runs/student/ckpt.pt --long 2000
    python bench.py --ckpt '' --preset base --device cuda --compile   # random weights: speed does not depend on them

Measures: the student streaming frame by frame (KV cache, rolling window; CUDA graphs on CUDA)
at 1, 2 and 4 steps, and at 1 step with the output at 128x128 (hires.py); the bidirectional teacher producing the same frames with 50 Euler steps;
per-frame time near frame 50 and near frame --long of one stream; teacher.py's training step
without its data (and MFU on a known GPU), the data of that step rendered on the same device
against it; peak memory. Every timed row runs once untimed first (compilation, CUDA graph
capture and memory allocation never land in a timed row).
Prints one table and writes runs/bench/bench.json (--out folder).
"""
import argparse
import copy
import json
import os
import resource
import time
from dataclasses import replace

import torch

import camera
import hires
import teacher
from attention import KVCache, attention_pairs
from common import (ArgumentParser, autocast_for, check_args, check_device, check_out_dir, default_device, fail,
                    hold_out_dir, peak_flops)
from model import (PRESETS, SHIPPED_STUDENT, RealCamDiT, compile_blocks, flops_per_forward, load_model, student_chunk,
                   teacher_sample)

p = ArgumentParser(description="RealCam-min speed benchmark.")
p.add_argument("--preset", type=str, default="small", help=f"model preset (random weights) when --ckpt '': {', '.join(PRESETS)}")
p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT,
               help="benchmark this checkpoint's model (default: the shipped student, checkpoints/student_small.pt; "
                    "'' for --preset)")
p.add_argument("--frames", type=int, default=16, help="frames streamed a student row, and given to the teacher at once")
p.add_argument("--long", type=int, default=2000, help="frame index of the long-stream measurement (against frame 50)")
p.add_argument("--window", type=int, default=None,
               help="rolling window (chunks) of the student, 0: all (default: the checkpoint's, else 4)")
p.add_argument("--teacher_steps", type=int, default=50, help="Euler steps of the teacher row")
p.add_argument("--train_pairs", type=int, default=None, help="pairs of the training step's batch (default: 16 CPU, 64 CUDA)")
p.add_argument("--out", type=str, default="runs/bench", help="output folder (created if missing): bench.json")
p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
               help="torch.compile the blocks of the teacher row and the training step")
p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
               help="replay the student's steady-state passes from CUDA graphs (default: on for CUDA)")
args = p.parse_args()
check_args(args, positive=("frames", "long", "teacher_steps", "train_pairs"), nonneg=("window",))
if not args.ckpt and args.preset not in PRESETS:
    fail(f"unknown --preset '{args.preset}': choose from {', '.join(PRESETS)}")
check_device(args.device)
check_out_dir(args.out)

dev, cuda = args.device, args.device.startswith("cuda")
if args.ckpt:
    try:
        model, _ = load_model(args.ckpt, dev)
    except FileNotFoundError as e:
        hint = ("the shipped student is part of the repository: restore it with git checkout -- checkpoints/"
                if os.path.abspath(args.ckpt) == SHIPPED_STUDENT else
                "or benchmark random weights of a preset: --ckpt '' --preset small")
        fail(f"{e} ({hint})")
    except ValueError as e:
        fail(e)
else:
    torch.manual_seed(0)
    model = RealCamDiT(PRESETS[args.preset]).to(dev).eval()
model.cfg = replace(model.cfg, window=args.window if args.window is not None else (model.cfg.window if args.ckpt else 4))
cfg, S = model.cfg, model.cfg.size
graphs = cuda if args.graphs is None else args.graphs and cuda
autocast = autocast_for(dev)
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
if args.compile:
    compile_blocks(model)                        # used by the teacher row (no KV cache)
hold_out_dir(args.out)                           # refused if another live run writes there


def sync():
    if cuda:
        torch.cuda.synchronize()


def rays(rel, n):
    K = torch.tensor([1.0, 1.0, 0.5, 0.5], device=dev).expand(1, n, 4)
    return camera.pair_rays(rel[None].to(dev), K, K, S, S)


cache = KVCache(cfg, graphs=graphs)                # one cache: its buffers and CUDA graphs serve every stream
src = torch.randn(1, cfg.chunk, 3, S, S, device=dev)
cs, ct = rays(camera.preset_path("orbit_left", cfg.chunk)[0], cfg.chunk)


@torch.no_grad()
def stream(n, steps, time_from=0, hi=None):
    """Stream n frames chunk by chunk; returns per-frame seconds (only from frame time_from on).
    hi: (source, relative pose, intrinsics) at a size above the model's, for the output at that
    size (hires.chunk)."""
    cache.reset()
    times = []
    for c0 in range(0, n, cfg.chunk):
        k = 1 if c0 < time_from - 4 * cfg.chunk else steps      # fast-forward cheaply to the region of interest
        t0 = time.perf_counter()
        noise = torch.randn((k, 1, cfg.chunk, 3, S, S), device=dev)
        with autocast:
            if hi:                                                   # as stream.py: rays made a chunk
                hires.chunk(model, cache, *hi, range(c0, c0 + cfg.chunk), k, noise)
            else:
                student_chunk(model, cache, src, cs, ct, range(c0, c0 + cfg.chunk), k, noise)
        sync()
        if c0 >= time_from:
            times += [(time.perf_counter() - t0) / cfg.chunk] * cfg.chunk
    return times


rows = {}
full = (cfg.window + cfg.sink) * cfg.chunk if cfg.window else 0   # frames before the steady state
stream(full + 2 * cfg.chunk, 1)                                    # warm-up: allocations, CUDA graphs
for steps in (1, 2, 4):
    t = torch.tensor(stream(args.frames, steps))
    steady = t[full:] if len(t) > full else t
    rows[f"student {steps} step"] = dict(ms_per_frame=1000 * t.mean().item(), fps=1 / t.mean().item(),
                                         first_frame_ms=1000 * t[0].item(), p95_ms=1000 * t.quantile(0.95).item(),
                                         steady_ms=1000 * steady.median().item())
if cfg.warp and not graphs:                                        # the output at 128x128 (stream.py --size)
    K1 = torch.tensor([1.0, 1.0, 0.5, 0.5], device=dev).expand(1, cfg.chunk, 4)
    hi = (torch.randn(1, cfg.chunk, 3, 128, 128, device=dev),
          camera.preset_path("orbit_left", cfg.chunk)[0][None].to(dev), K1, K1)
    t = torch.tensor(stream(args.frames, 1, hi=hi))
    rows["student 1 step, 128 out"] = dict(ms_per_frame=1000 * t.mean().item(), fps=1 / t.mean().item(),
                                           first_frame_ms=1000 * t[0].item(), p95_ms=1000 * t.quantile(0.95).item(),
                                           steady_ms=1000 * t[full:].median().item() if len(t) > full else 1000 * t.median().item())
# teacher: all frames at once, bidirectional, 50 steps; nothing comes out before the end
srcT = torch.randn(1, args.frames, 3, S, S, device=dev)
csT, ctT = rays(camera.preset_path("orbit_left", args.frames)[0], args.frames)
with torch.no_grad(), autocast:
    teacher_sample(model, srcT, csT, ctT, 2)                        # warm-up with the timed shapes
    sync()
    t0 = time.perf_counter()
    teacher_sample(model, srcT, csT, ctT, args.teacher_steps)
    sync()
dt = time.perf_counter() - t0
rows[f"teacher {args.teacher_steps} steps"] = dict(ms_per_frame=1000 * dt / args.frames, fps=args.frames / dt,
                                                   first_frame_ms=1000 * dt, p95_ms=1000 * dt, steady_ms=1000 * dt / args.frames)
# flat cost with the rolling cache: near frame 50 vs near frame --long of one stream
near = lambda f: torch.tensor(stream(f + 10, 4, time_from=f)).median().item()
t50, tlong = near(50), near(args.long)
# training throughput: teacher.py's own step (its recipe: flow loss, the depth term, condition
# dropout, clipping, EMA) on a batch rendered on the device, timed without it
train = RealCamDiT(cfg).to(dev).train()
ema = copy.deepcopy(train).requires_grad_(False)
if args.compile:
    compile_blocks(train)
opt = torch.optim.AdamW(train.parameters(), lr=1e-4)
targs = teacher.parse_args(["--out", args.out, "--device", args.device, "--max_pairs", "4",
                            "--pairs", str(args.train_pairs or (64 if cuda else 16))])
render_s = []
for i in range(3):
    sync()
    t0 = time.perf_counter()
    batch = teacher.get_batch(1, targs, cfg, None, 0)               # T drawn from 1..4
    sync()
    render_s.append(time.perf_counter() - t0)
B, T = batch[0].shape[:2]
times = []
for i in range(6):                                                 # 2 untimed (compilation), 4 timed
    sync()
    t0 = time.perf_counter()
    teacher.train_step(train, train, ema, opt, batch, i, 1e-4, targs, 0)
    sync()
    if i >= 2:
        times.append(time.perf_counter() - t0)
step_s, data_s = sum(times) / len(times), min(render_s[1:])
flops = 3 * flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T)) * B
mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
device_name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
peak = peak_flops(device_name)
mfu = flops / step_s / peak if peak else None

# -----------------------------------------------------------------------------
s4, tt = rows["student 4 step"], rows[f"teacher {args.teacher_steps} steps"]
print(f"RealCam-min bench | {device_name} | {S}x{S}, dim {cfg.dim} x {cfg.depth}, chunk {cfg.chunk}, "
      f"window {cfg.window} | {'bf16 autocast' if cuda else 'float32'} | compile {args.compile} | CUDA graphs {graphs}")
print(f"{'':22s} {'ms/frame':>9s} {'frames/s':>9s} {'1st frame ms':>13s} {'p95 ms':>8s} {'steady ms':>10s}")
for k, r in rows.items():
    print(f"{k:22s} {r['ms_per_frame']:9.1f} {r['fps']:9.1f} {r['first_frame_ms']:13.1f} {r['p95_ms']:8.1f} {r['steady_ms']:10.1f}")
print(f"teacher / student (4 steps): {tt['ms_per_frame'] / s4['ms_per_frame']:.1f}x per frame, "
      f"{tt['first_frame_ms'] / s4['first_frame_ms']:.0f}x latency to the first frame")
print(f"rolling cache: {1000 * t50:.1f} ms/frame near frame 50, {1000 * tlong:.1f} near frame {args.long} "
      f"(ratio {tlong / t50:.2f})")
print(f"training step ({B} clips x {T} pairs): {1000 * step_s:.0f} ms without data, {B * T / step_s:.0f} frames/s, "
      f"{flops / step_s / 1e9:.0f} GFLOP/s" + (f", MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "")
      + f" | its data rendered on the device: {1000 * data_s:.0f} ms ({data_s / step_s:.2f}x the step) "
      f"| peak memory {mem:.2f} GiB")
path = os.path.join(args.out, "bench.json")
with open(path, "w") as f:
    json.dump(dict(device=device_name, size=S, dim=cfg.dim, depth=cfg.depth, chunk=cfg.chunk, window=cfg.window,
                   compile=args.compile, graphs=graphs, rows=rows, t50_ms=1000 * t50, tlong_ms=1000 * tlong, long=args.long,
                   train_clips=B, train_pairs=T, train_step_ms=1000 * step_s, train_frames_per_s=B * T / step_s,
                   train_gflops=flops / step_s / 1e9, mfu=mfu, peak_flops=peak, train_data_ms=1000 * data_s,
                   peak_mem_gib=mem), f, indent=1)
print(f"wrote {path}")
