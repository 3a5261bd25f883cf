"""
Evaluate a checkpoint on a fixed held-out set of synthetic scenes (seeds disjoint from training:
training scenes use seeds below 2**31, held-out scenes start at EVAL_SEED), for every
trajectory family: PSNR against the rendered ground truth on all pixels, on the co-visible ones
(target pixels whose scene point the source frame also sees: where geometry decides the answer)
and on the rest (disoccluded: where the model must invent), next to copy-the-source and, on the
co-visible pixels, the depth-warp oracle (the source resampled with the true depth: what perfect
geometry gives at this resolution); SSIM; temporal flicker; detail (fine detail over the
truth's: blur shows below 1, where PSNR may still reward it), by family and by frame; time per generated frame. For
students, beside the same student with window 1 (no memory, --baseline): an orbit streamed through
the KV cache (--stream_frames, by thirds, quarters and frame); with --loops, loops in which the
source moves on while the target comes back to where it was (agreement between the visits, PSNR
at both, on the pixels only memory can give back); with --memory, the source turning or sliding
away while the target stays (pixels only the KV cache still sees; also with the source's motion
given, which lets the warp head take them from earlier source frames). docs/loops.md has the
definitions. Prints tables, writes runs/eval/eval.json and eval.png (--out).

    python eval.py                                     # the shipped student (checkpoints/)
    python eval.py --ckpt runs/teacher/ckpt.pt
    python eval.py --ckpt runs/teacher/ckpt.pt --clips 2 --frames 4 --steps 10   # quick look
    python eval.py --families static --clips 1 --steps 4 --stream 2 --stream_frames 200 --loops 2 --memory 4
"""
import json
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import camera
import data
import render
from common import (ArgumentParser, check_args, check_device, check_finite, check_out_dir, default_device, fail,
                    hold_out_dir)
from model import SHIPPED_STUDENT, load_model, student_sample, teacher_sample

EVAL_SEED = 2 ** 31 + 7_000_000  # held-out scenes; training draws seeds in [0, 2**31 - 1)
VAL_SEED = 2 ** 31 + 3_000_000   # training-time evaluation (quick_eval), which selects recipes: its own scenes
FAMILIES = {
    "static": ["static"], "orbit": ["orbit_left", "orbit_right", "orbit"], "pan": ["pan_left", "pan_right"],
    "tilt": ["tilt_up", "tilt_down"], "dolly": ["dolly_in", "dolly_out"], "zoom": ["zoom_in", "zoom_out"],
    "truck": ["truck_left", "truck_right"], "pedestal": ["pedestal_up", "pedestal_down"],
}


def heldout_batch(family, n_clips, T, size, seed0=EVAL_SEED, fx=1.0):
    """n_clips held-out clips of T frames whose target follows the family's presets in turn
    (scenes from seed0: EVAL_SEED for eval.py, VAL_SEED for the evaluations during training),
    seen by cameras of focal length fx (in image widths; the training stream draws 0.8..1.2)."""
    fam = list(FAMILIES).index(family)
    clips = []
    for j in range(n_clips):
        rel, zoom = camera.preset_path(FAMILIES[family][j % len(FAMILIES[family])], T)
        seed = seed0 + 1000 * fam + j
        clips.append(render.render_clip(seed, T, size, size, rel, zoom, gen=torch.Generator().manual_seed(seed), fx=fx))
    return data.collate(clips, data.DEPTH_KEYS)


def stream_batch(n_clips, T, size, traj="orbit"):
    """Held-out long streams: a moving source (as any video) and a T-frame preset path."""
    rel, zoom = camera.preset_path(traj, T)
    clips = []
    for j in range(n_clips):
        seed = EVAL_SEED + 900_000 + j
        clips.append(render.render_clip(seed, T, size, size, rel, zoom, gen=torch.Generator().manual_seed(seed)))
    return data.collate(clips, data.DEPTH_KEYS)


# -----------------------------------------------------------------------------
# loops and memory (docs/loops.md). The student remembers only what is in its KV cache: its last
# cfg.window pairs (source and generated target frames, the current one included) and cfg.sink
# first ones. Held-out clips of a frozen world (no object moves, so the truth at a revisited pose
# is the truth of the first visit) in which the source camera moves away from where it started.

LOOPS = ("turn", "slide")       # how the source moves away: yaws right, or trucks right
AWAY_DEG, AWAY_MOVE = 20.0, 0.3   # ... this far in a loop (the probe: an eighth of it a frame)
VISIT_DEG = 10.0                # the target's pose at both visits: orbited this far left of the source's first pose
PROBE_FRAMES = 12               # frames of the memory probe


def away(kind, a):
    """The source's motion from its first pose, (n, 4, 4) for amounts a (n,): 'turn' yaws right
    a x AWAY_DEG, 'slide' trucks right a x AWAY_MOVE."""
    if kind == "turn":
        return camera.camera_path(yaw=AWAY_DEG * math.pi / 180 * a, n=len(a))[0]
    if kind == "slide":
        return camera.camera_path(move=(AWAY_MOVE * a, 0.0, 0.0), n=len(a))[0]
    raise ValueError(f"unknown loop '{kind}': choose from {', '.join(LOOPS)}")


def visit_pose():
    return camera.camera_path(orbit=VISIT_DEG * math.pi / 180, n=1)[0][0]


def loop_path(kind, L):
    """A loop of L >= 3 frames in the world frame of the source's first pose: h = max(1, L // 8)
    frames at the visit pose (the source at its first pose, the target VISIT_DEG orbited left),
    then the source moves away (away(kind, 0 -> 1)) while the target goes with it, then the
    target comes back alone, h frames at the visit pose again with the source away. Returns the
    source's and the target's poses (L, 4, 4) and the pairs (i, L - h + i) of frames at the same
    target pose: the same truth, other inputs (the source now sees less of it)."""
    h = max(1, L // 8)
    m = h + (L - 2 * h) // 2                                          # the peak: the source is away
    t = torch.arange(L, dtype=torch.float32)
    smooth = lambda u: 0.5 - 0.5 * torch.cos(math.pi * u.clamp(0, 1))
    a = smooth((t - (h - 1)) / (m - (h - 1)))                         # 0 during visit 1, 1 from m on
    b = torch.where(t <= m, a, 1 - smooth((t - m) / (L - h - m)))     # the target: out with it, then back
    src, tgt = away(kind, a), visit_pose() @ away(kind, b)
    return src, tgt, [(i, L - h + i) for i in range(h)]


def probe_path(kind, n):
    """The memory probe: the source moves away an eighth of a loop's distance a frame (2.5
    degrees or 0.0375 units) while the target stays at the visit pose."""
    return away(kind, torch.arange(n, dtype=torch.float32) / 8), visit_pose().expand(n, 4, 4)


def world_batch(src, tgt, n_clips, size, seed0):
    """Held-out clips of frozen scenes seed0 + j along source and target paths given in the frame
    of the source's first pose (a random held-out start), with the world poses kept (c2w_src,
    c2w_tgt) for seen_from."""
    clips = []
    for j in range(n_clips):
        g = torch.Generator().manual_seed(seed0 + j)
        base = render.source_path(1, g)[0]
        spec = render.clip_spec(seed0 + j, len(src), camera.invert_pose(src) @ tgt, src_c2w=base @ src, gen=g, frozen=True)
        spec["c2w"] = torch.cat([base @ src, base @ tgt])             # the world poses exactly: a revisit renders the same
        clips.append(dict(render.render_clips([spec], size, size)[0], c2w_src=base @ src, c2w_tgt=base @ tgt))
    return data.collate(clips, data.DEPTH_KEYS + ("c2w_src", "c2w_tgt"))


def loop_batch(kind, n_clips, L, size):
    src, tgt, pairs = loop_path(kind, L)
    return world_batch(src, tgt, n_clips, size, EVAL_SEED + 500_000 + 1000 * LOOPS.index(kind)), pairs


def probe_batch(kind, n_clips, size, n=PROBE_FRAMES):
    return world_batch(*probe_path(kind, n), n_clips, size, EVAL_SEED + 600_000 + 1000 * LOOPS.index(kind))


def seen_from(b, lag):
    """Target pixels of frame t that the source frame t - lag sees (co-visible, B, T, H, W; none
    for t < lag), and that source frame warped there with the true depth (the oracle)."""
    B, T, H, W = b["depth_tgt"].shape
    mask, warp = torch.zeros(B, T, H, W, dtype=torch.bool), torch.zeros_like(b["tgt"])
    if lag < T:
        s, t = slice(0, T - lag), slice(lag, T)
        rel = camera.invert_pose(b["c2w_src"][:, s]) @ b["c2w_tgt"][:, t]
        mask[:, t], grid = camera.covisibility(b["depth_src"][:, s], b["depth_tgt"][:, t], rel, b["K_src"][:, s],
                                               b["K_tgt"][:, t])
        warp[:, t] = camera.warp_source(b["src"][:, s], grid)
    return mask, warp


def warp_oracle(b, memory):
    """A model with exact geometry and a memory of `memory` source frames (the current one
    included): each target pixel is the newest remembered source frame that sees it, warped with
    the true depth; mid-grey where none does. memory 1: no memory; len(clip): perfect memory."""
    out = torch.zeros_like(b["tgt"])
    for lag in reversed(range(min(memory, b["tgt"].shape[1]))):     # the newest wins
        m, w = seen_from(b, lag)
        out = torch.where(m[:, :, None], w, out)
    return out


def loop_metrics(x, b, pairs):
    """A loop's figures for generated targets x: PSNR between the two visits (agree) and against
    the truth at the first visit and at the revisit, on all pixels and on the memory pixels (seen
    by the source at the first visit, not at the revisit: only memory brings them back), clip
    means; mem_share: their share of the revisit's pixels."""
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    now = seen_from(b, 0)[0]
    mem = now[:, i] & ~now[:, j]
    y, r = b["tgt"], dict(mem_share=mem.float().mean().item())
    for k, (u, v) in dict(agree=(x[:, j], x[:, i]), first=(x[:, i], y[:, i]), revisit=(x[:, j], y[:, j])).items():
        r[k], r[k + "_mem"] = psnr(u, v).mean().item(), nanmean(psnr(u, v, mem))
    return r


def memory_metrics(x, b, window):
    """The memory probe's figures: PSNR against the truth on target pixels that the current
    source does not see but one of the last window - 1 source frames did (recent: only the KV
    cache has them), and on those the current source sees (now); recent_share: their share."""
    now = seen_from(b, 0)[0]
    recent = torch.zeros_like(now)
    for lag in range(1, window):
        recent |= seen_from(b, lag)[0]
    recent &= ~now
    y = b["tgt"]
    return dict(recent=nanmean(psnr(x, y, recent)), now=nanmean(psnr(x, y, now)),
                recent_share=recent.float().mean().item())

# -----------------------------------------------------------------------------
# metrics on (B, T, 3, H, W) videos in [-1, 1]

def psnr(x, y, mask=None):
    """Per-clip PSNR in dB (B,), from the clip's mean squared error on the [0, 1] scale; with a
    mask (B, T, H, W), over the masked pixels only (NaN for a clip with none)."""
    se = ((x - y) / 2).square()
    if mask is None:
        mse = se.flatten(1).mean(1)
    else:
        m = mask[:, :, None].expand_as(se).float()
        mse = (se * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def nanmean(x):
    return x[~x.isnan()].mean().item() if (~x.isnan()).any() else float("nan")


def view_metrics(x, b, by_clip=False):
    """PSNR of generated targets x against the truth on all, co-visible and other (disoccluded)
    pixels, for x, copy-the-source and (co-visible) the depth-warp oracle; clip means (by_clip:
    also the co-visible gain over copy of each clip, a list)."""
    y, s = b["tgt"], b["src"]
    covis, grid = camera.covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
    oracle = camera.warp_source(s, grid)
    r, per = {}, {}
    for name, v in (("", x), ("_copy", s)):
        per[name] = psnr(v, y, covis)
        r["psnr" + name] = psnr(v, y).mean().item()
        r["covis" + name] = nanmean(per[name])
        r["rest" + name] = nanmean(psnr(v, y, ~covis))
    if by_clip:
        r["covis_gain_by_clip"] = (per[""] - per["_copy"]).tolist()
    r["covis_oracle"] = nanmean(psnr(oracle, y, covis))
    r["covis_frac"] = covis.float().mean().item()
    return r


def ssim(x, y, win=7, sigma=1.5):
    """Per-clip mean SSIM (B,) with a Gaussian window (7 px: the frames are small)."""
    B, T, C, H, W = x.shape
    x, y = ((x + 1) / 2).reshape(B * T * C, 1, H, W), ((y + 1) / 2).reshape(B * T * C, 1, H, W)
    g = torch.exp(-(torch.arange(win, dtype=torch.float32) - win // 2) ** 2 / (2 * sigma ** 2))
    g = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].to(x)
    f = lambda z: F.conv2d(z, g)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)


def flicker(x, y):
    """Temporal flicker (B,): mean |frame-to-frame change of x - that of the ground truth y|, on
    the [0, 1] scale (x 100). 0 when the video changes exactly as the truth does."""
    if x.shape[1] < 2:
        return torch.zeros(x.shape[0])
    dx, dy = x[:, 1:] - x[:, :-1], y[:, 1:] - y[:, :-1]
    return 100 * ((dx - dy) / 2).abs().flatten(1).mean(1)


def _fine_energy(x):
    """(B, T) high-frequency energy: the squared 3x3 Laplacian summed over each frame's channels
    and pixels."""
    B, T, C, H, W = x.shape
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None].to(x)
    return F.conv2d(x.reshape(B * T * C, 1, H, W), k).square().reshape(B, T, -1).sum(-1)


def detail(x, y, by_frame=False):
    """Detail ratio: the fine-detail energy (_fine_energy) of x over that of the truth y, per clip
    (B,), or with by_frame per frame index pooled over clips (T,): how the detail holds as a path
    moves away. 1: as much fine detail as the truth (a copy of the source is near 1); below 1:
    blur; above 1: grain. PSNR rewards a blurred average where the model is unsure; this shows it."""
    ex, ey = _fine_energy(x), _fine_energy(y)
    dim = 0 if by_frame else 1
    return ex.sum(dim) / ey.sum(dim).clamp(min=1e-12)


def rays(batch, size, device):
    return [c.to(device) for c in camera.pair_rays(batch["rel"], batch["K_src"], batch["K_tgt"], size, size)]


@torch.no_grad()
def generate(model, batch, steps, student=False, device="cpu", seed=0, guidance=1.0, motion=False):
    """Target pixels (B, T, 3, H, W) for a batch of clips: the teacher's bidirectional Euler
    sampler (classifier-free guidance on the camera at scale guidance), or the student's
    chunk-by-chunk few-step sampler with its KV cache (motion: given the source's poses c2w_src,
    its warp head's memory)."""
    src = batch["src"].to(device)
    cam_src, cam_tgt = rays(batch, model.cfg.size, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if student:
        pose = batch["c2w_src"].to(device) if motion else None
        return student_sample(model, src, cam_src, cam_tgt, steps, generator=gen, pose_src=pose).cpu()
    return teacher_sample(model, src, cam_src, cam_tgt, steps, generator=gen, guidance=guidance).cpu()


@contextmanager
def memory(model, window, sink=0):
    """The student with another window and sinks (chunks) for a while: window 1 remembers nothing
    but the current pair (the memoryless baseline)."""
    old = model.cfg.window, model.cfg.sink
    model.cfg.window, model.cfg.sink = window, sink
    try:
        yield model
    finally:
        model.cfg.window, model.cfg.sink = old


def student_rows(model, b, steps, device, baseline=1, sink=0, motion=False):
    """{label: generated targets}: the student with its own window, with window `baseline` (the
    memoryless baseline; 0: not run), with its window plus `sink` sink chunks (0: not run) and
    given the source's motion (motion: the warp head's memory; the batch's c2w_src)."""
    w = model.cfg.window
    rows = {f"student, window {w or 'all'}": generate(model, b, steps, True, device)}
    if baseline:
        with memory(model, baseline):
            rows[f"student, window {baseline}"] = generate(model, b, steps, True, device)
    if sink:
        with memory(model, w, sink):
            rows[f"student, window {w} + {sink} sinks"] = generate(model, b, steps, True, device)
    if motion:
        rows[f"student, window {w or 'all'} + source motion"] = generate(model, b, steps, True, device, motion=True)
    return rows


GEOMETRY = ("orbit", "pan", "dolly", "truck")   # the families whose co-visible gain is the headline figure


def quick_eval(model, steps=25, student=False, n_clips=4, T=4, families=GEOMETRY, device="cpu"):
    """Held-out figures during training, per family: co-visible PSNR of samples and of copy,
    and static PSNR (the identity camera: the answer is the input), on scenes of its own
    (VAL_SEED), never eval.py's: what selects recipes during training must not see the test set.
    Returns ({name: figure}, a (source, generated, truth) sample of the first family for a video)."""
    out, sample = {}, None
    for fam in families + ("static",):
        b = heldout_batch(fam, n_clips, T, model.cfg.size, VAL_SEED)
        x = generate(model, b, steps, student, device)
        if fam == "static":
            out["static"] = psnr(x, b["tgt"]).mean().item()
            continue
        r = view_metrics(x, b)
        out[fam], out[fam + "_copy"] = r["covis"], r["covis_copy"]
        sample = sample or (b["src"], x, b["tgt"])
    out["gain"] = sum(out[f] - out[f + "_copy"] for f in families) / len(families)
    return out, sample


def format_quick(res):
    return (" | ".join(f"{k} {res[k]:.2f} ({res[k + '_copy']:.2f})" for k in GEOMETRY if k in res)
            + f" | static {res['static']:.2f} | co-visible gain {res['gain']:+.2f} dB")


def save_strip(path, src, gen, tgt, upscale=4):
    """PNG strip: rows source / generated / truth, frames left to right (first clip)."""
    import imageio.v3 as iio
    rows = [torch.cat(list(v[0]), -1) for v in (src, gen, tgt)]
    img = data.to_uint8(torch.cat(rows, -2))
    iio.imwrite(path, img.repeat(upscale, 0).repeat(upscale, 1))


def save_sample_video(path, src, gen, tgt, fps=4.0):
    """mp4 of source | generated | truth side by side, clips one after the other."""
    frames = torch.cat([data.side_by_side(s, g, t) for s, g, t in zip(src, gen, tgt)])
    data.write_video(path, frames, fps, upscale=4)

# -----------------------------------------------------------------------------
# the student's long stream, loops and memory probe, with the memoryless baseline beside it


def stream_report(x, b):
    """A long stream's figures: by thirds (view_metrics), by quarters (co-visible and all-pixel
    gain over copy, detail; the co-visible gain clip by clip: one bad clip can hold a quarter down)
    and by frame (PSNR, co-visible PSNR of x, copy and the oracle, detail)."""
    T = x.shape[1]
    frames = lambda sl: {k: (v[:, sl] if v.ndim > 2 and v.shape[1] == T else v) for k, v in b.items()}
    r = {f"third{k + 1}": view_metrics(x[:, sl], frames(sl)) for k, sl in enumerate(torch.arange(T).chunk(3))}
    r["quarters"] = []
    for sl in torch.arange(T).chunk(4):
        v = view_metrics(x[:, sl], frames(sl), by_clip=True)
        r["quarters"].append(dict(covis_gain=v["covis"] - v["covis_copy"], gain=v["psnr"] - v["psnr_copy"],
                                  detail=detail(x[:, sl], b["tgt"][:, sl]).mean().item(), frames=[int(sl[0]), int(sl[-1])],
                                  by_clip=v["covis_gain_by_clip"]))
    per = [view_metrics(x[:, i:i + 1], frames(slice(i, i + 1))) for i in range(T)]
    r["by_frame"] = {k: [v[k] for v in per] for k in ("psnr", "psnr_copy", "covis", "covis_copy", "covis_oracle")}
    r["by_frame"]["detail"] = detail(x, b["tgt"], by_frame=True).tolist()
    return r


def run_stream(model, steps, n_clips, T, device, baseline):
    """The held-out orbit stream of T frames through the KV cache, with the memoryless baseline."""
    b = stream_batch(n_clips, T, model.cfg.size)
    rows = {k: stream_report(x, b) for k, x in student_rows(model, b, steps, device, baseline).items()}
    own, *base = rows.values()
    print(f"\nlong stream: {T}-frame orbit through the KV cache ({steps} steps, {n_clips} clips), by thirds: "
          f"PSNR all (copy) | co-visible (copy)")
    print("  " + " | ".join(f"third{k}: {own[f'third{k}']['psnr']:.2f} ({own[f'third{k}']['psnr_copy']:.2f}) | "
                           f"{own[f'third{k}']['covis']:.2f} ({own[f'third{k}']['covis_copy']:.2f})" for k in (1, 2, 3)))
    for name, r in rows.items():
        print(f"  {name:24s} by quarter, co-visible gain over copy / all-pixel gain / detail: "
              + " | ".join(f"{q['covis_gain']:+.2f} / {q['gain']:+.2f} / {q['detail']:.2f}" for q in r["quarters"]))
    print("  co-visible gain over copy by quarter, clip by clip: "
          + " | ".join(" ".join(f"{v:+.1f}" for v in q["by_clip"]) for q in own["quarters"]))
    step = max(1, T // 24)                                          # a figure a block of frames
    bf = own["by_frame"]
    blocks = lambda v, fmt: " ".join(format(nanmean(torch.tensor(v[i:i + step])), fmt) for i in range(0, T, step))
    for name, key in (("student", "covis"), ("oracle", "covis_oracle")):
        gains = [v - c if c < 50 else math.nan for v, c in zip(bf[key], bf["covis_copy"])]   # nan: copy exact
        print(f"  co-visible PSNR minus copy's, {name}, by {step} frame{'s' * (step > 1)}: {blocks(gains, '+.1f')}")
    print(f"  detail by {step} frame{'s' * (step > 1)}: {blocks(bf['detail'], '.2f')}")
    return dict(own, window=model.cfg.window, **({"baseline": dict(base[0], window=baseline)} if base else {}))


def run_loops(model, steps, n_clips, L, device, baseline, sink):
    """The loop benchmark (loop_path, loop_metrics): the student, the memoryless baseline, copy
    and the oracle with and without memory, a loop kind a table."""
    out = {}
    for kind in LOOPS:
        b, pairs = loop_batch(kind, n_clips, L, model.cfg.size)
        rows = student_rows(model, b, steps, device, baseline, sink)
        rows.update({"copy the source": b["src"], "oracle, no memory": warp_oracle(b, 1),
                     "oracle, perfect memory": warp_oracle(b, L)})
        res = {k: loop_metrics(x, b, pairs) for k, x in rows.items()}
        share = next(iter(res.values()))["mem_share"]
        print(f"\nloop '{kind}' ({L} frames, {steps} steps, {n_clips} clips): the source {'turns' if kind == 'turn' else 'slides'}"
              f" away, the target goes with it and comes back alone; {len(pairs)} revisited frames, memory pixels "
              f"{100 * share:.0f}%\n{'':29s} {'agree':>6s} {'first':>6s} {'revisit':>7s} | memory pixels: "
              f"{'agree':>6s} {'first':>6s} {'revisit':>7s} {'lost':>6s}")
        for k, r in res.items():
            print(f"{k:29s} {r['agree']:6.2f} {r['first']:6.2f} {r['revisit']:7.2f} |                {r['agree_mem']:6.2f} "
                  f"{r['first_mem']:6.2f} {r['revisit_mem']:7.2f} {r['first_mem'] - r['revisit_mem']:+6.2f}")
        out[kind] = dict(frames=L, steps=steps, clips=n_clips, rows=res)
    print("agree: PSNR between the frames at the same pose on both visits; first / revisit: against the truth "
          "(the same at both); memory pixels: seen by the source at the first visit, not at the revisit; "
          "lost = first - revisit there (0 with perfect memory)")
    return out


def run_memory(model, steps, n_clips, device, baseline):
    """The memory probe (probe_path, memory_metrics): the source turns or slides away, the target
    stays; the student with its window against the memoryless baseline."""
    w, out = model.cfg.window, {}
    print(f"\nmemory probe ({PROBE_FRAMES} frames, {steps} steps, {n_clips} clips): the source turns 2.5 degrees or slides "
          f"{AWAY_MOVE / 8:.4f} a frame, the target stays; PSNR on target pixels the current source no longer sees "
          f"but one of the last {w - 1} source frames did (recent), and on those it sees (now)")
    for kind in LOOPS:
        b = probe_batch(kind, n_clips, model.cfg.size)
        rows = student_rows(model, b, steps, device, baseline, motion=True)
        rows.update({"copy the source": b["src"], "oracle, no memory": warp_oracle(b, 1),
                     f"oracle, memory {w}": warp_oracle(b, w)})
        res = {k: memory_metrics(x, b, w) for k, x in rows.items()}
        out[kind] = dict(frames=PROBE_FRAMES, steps=steps, clips=n_clips, window=w, rows=res)
        print(f"  {kind} (recent pixels {100 * next(iter(res.values()))['recent_share']:.1f}%): "
              + " | ".join(f"{k} {r['recent']:.2f} / {r['now']:.2f}" for k, r in res.items()))
        if baseline:
            (own, base), mo = list(res.values())[:2], res[f"student, window {w or 'all'} + source motion"]
            print(f"  {kind}: own window over window {baseline} on the recent pixels: {own['recent'] - base['recent']:+.2f} dB"
                  f" (given the source's motion: {mo['recent'] - base['recent']:+.2f} dB)")
    return out


# -----------------------------------------------------------------------------

def parse_steps(text):
    """--steps: a comma-separated list of positive integers."""
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        fail(f"--steps takes comma-separated whole numbers (e.g. 1,2,4), got '{text}'")
    if any(v < 1 for v in steps):
        fail(f"--steps must be at least 1, got {text}")
    return steps


if __name__ == "__main__":
    p = ArgumentParser(description="Evaluate a RealCam-min checkpoint on held-out scenes.")
    p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT,
                   help="checkpoint, teacher or student (default: the shipped student, checkpoints/student_small.pt)")
    p.add_argument("--clips", type=int, default=6, help="held-out clips a family")
    p.add_argument("--frames", type=int, default=8, help="frames (pairs) a clip")
    p.add_argument("--steps", type=str, default=None,
                   help="comma-separated sampling steps (default: 50 for a teacher, 1,2,4 for a student)")
    p.add_argument("--families", type=str, default=",".join(FAMILIES), help="comma-separated trajectory families")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="teachers: classifier-free guidance scale on the camera (a teacher trained with --cond_drop)")
    p.add_argument("--fx", type=float, default=1.0,
                   help="focal length of the held-out cameras, in image widths (1 = 53.13 degrees; training draws 0.8..1.2)")
    p.add_argument("--out", type=str, default="runs/eval", help="output folder (created if missing): eval.json, eval.png")
    p.add_argument("--stream", type=int, default=4, help="students: clips of the long orbit stream (0: skip)")
    p.add_argument("--stream_frames", type=int, default=48,
                   help="frames of the long orbit stream (at least 3: reported by thirds)")
    p.add_argument("--loops", type=int, default=0,
                   help="students: also run the loop benchmark (the source moves on, the target comes back): clips a loop (0: skip)")
    p.add_argument("--loop_length", type=int, default=48, help="frames of a loop (at least 3)")
    p.add_argument("--memory", type=int, default=0,
                   help="students: also run the memory probe (the source turns or slides away, the target stays): clips (0: skip)")
    p.add_argument("--baseline", type=int, default=1,
                   help="students: beside the stream, loops and probe, the student with this window (1: no memory; 0: skip)")
    p.add_argument("--sink", type=int, default=0,
                   help="students: the loops also with this many sink chunks kept (untrained unless the student was; 0: skip)")
    p.add_argument("--real", type=str, default=None,
                   help="students: also the real-footage benchmark on the videos of this folder (real.py --fetch DIR)")
    p.add_argument("--real_size", type=int, default=128, help="--real: the output's side above the model's (hires.py)")
    p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args()
    check_args(args, positive=("clips", "frames", "real_size"), nonneg=("stream", "loops", "memory", "baseline", "sink"))
    check_finite(args, ("guidance",))
    if not 0.1 <= args.fx <= 10:
        fail(f"--fx is a focal length in image widths, 0.1..10, got {args.fx}")
    steps_list = parse_steps(args.steps) if args.steps is not None else None
    if args.stream and args.stream_frames < 3:
        fail(f"--stream_frames must be at least 3 (the stream is reported by thirds), got {args.stream_frames}")
    if args.loops and args.loop_length < 3:
        fail(f"--loop_length must be at least 3 (out, away, back), got {args.loop_length}")
    if args.real and not (os.path.isdir(args.real) and os.listdir(args.real)):
        fail(f"--real {args.real} is not a folder of videos (python real.py --fetch {args.real} gets the benchmark's)")
    families = args.families.split(",")
    for f in families:
        if f not in FAMILIES:
            fail(f"unknown family '{f}': choose from {', '.join(FAMILIES)}")
    check_device(args.device)
    check_out_dir(args.out)
    try:
        model, ckpt = load_model(args.ckpt, args.device)
    except FileNotFoundError as e:
        hint = ("the shipped student is part of the repository: restore it with git checkout -- checkpoints/"
                if os.path.abspath(args.ckpt) == SHIPPED_STUDENT else
                "train a teacher with teacher.py and a student with distill.py, or leave --ckpt out for the shipped student")
        fail(f"{e} ({hint})")
    except ValueError as e:
        fail(e)
    student = "student" in ckpt
    if student and args.guidance != 1:
        fail(f"--guidance is the teacher sampler's; {args.ckpt} is a student (its few steps take no guidance)")
    S = model.cfg.size
    steps_list = steps_list or ([1, 2, 4] if student else [50])
    trained = ckpt["student"].get("steps") if student else None
    if trained and max(steps_list) > trained:
        fail(f"--steps must be between 1 and {trained} for this student (the trained number of steps), "
             f"got {args.steps}")
    hold_out_dir(args.out)                                # refused if another live run writes there
    kind = "student (block-causal, KV cache)" if student else "teacher (bidirectional, Euler)"
    print(f"{args.ckpt}: {kind}, step {ckpt.get('step')}, {S}x{S}, {args.clips} clips x {args.frames} frames a family")
    batches = {fam: heldout_batch(fam, args.clips, args.frames, S, fx=args.fx) for fam in families}
    runs, strip = [], []
    for steps in steps_list:
        rows, by_frame = {}, []
        for fam, b in batches.items():
            t0 = time.time()
            x = generate(model, b, steps, student, args.device, guidance=args.guidance)
            dt = time.time() - t0
            y, s = b["tgt"], b["src"]
            rows[fam] = dict(**view_metrics(x, b), ssim=ssim(x, y).mean().item(), ssim_copy=ssim(s, y).mean().item(),
                             flicker=flicker(x, y).mean().item(), flicker_copy=flicker(s, y).mean().item(),
                             detail=detail(x, y).mean().item(), detail_copy=detail(s, y).mean().item(),
                             ms_per_frame=1000 * dt / x.shape[0] / x.shape[1])
            if fam != "static":
                by_frame.append(detail(x, y, by_frame=True))
            if steps == steps_list[-1]:
                strip.append((s[:1], x[:1], y[:1]))
        moving = [r for f, r in rows.items() if f != "static"] or list(rows.values())  # static: copy is exact
        mean = {k: sum(r[k] for r in moving) / len(moving) for k in moving[0]}
        geo = [rows[f] for f in GEOMETRY if f in rows]
        gain = sum(r["covis"] - r["covis_copy"] for r in geo) / len(geo) if geo else float("nan")
        frames = torch.stack(by_frame).mean(0).tolist() if by_frame else []
        runs.append(dict(sampler="student" if student else "teacher", steps=steps, families=rows, mean=mean,
                         **({} if student else dict(guidance=args.guidance)),
                         covis_gain=gain, static=rows["static"]["psnr"] if "static" in rows else None,
                         detail_by_frame=frames))
        print(f"\n{steps} steps: PSNR (dB) on all / co-visible / other pixels; copy = copy-the-source; "
              f"oracle = source warped with the true depth")
        print(f"{'family':9s} {'all':>6s} {'copy':>6s} | {'covis':>6s} {'copy':>6s} {'oracle':>6s} {'share':>5s} | "
              f"{'other':>6s} {'copy':>6s} | {'SSIM':>5s} {'copy':>5s} | {'flicker':>7s} {'copy':>5s} | "
              f"{'detail':>6s} {'copy':>5s} | {'ms/fr':>6s}")
        for name, r in list(rows.items()) + [("mean*", mean)]:
            print(f"{name:9s} {r['psnr']:6.2f} {r['psnr_copy']:6.2f} | {r['covis']:6.2f} {r['covis_copy']:6.2f} "
                  f"{r['covis_oracle']:6.2f} {r['covis_frac']:5.2f} | {r['rest']:6.2f} {r['rest_copy']:6.2f} | "
                  f"{r['ssim']:5.3f} {r['ssim_copy']:5.3f} | {r['flicker']:7.2f} {r['flicker_copy']:5.2f} | "
                  f"{r['detail']:6.2f} {r['detail_copy']:5.2f} | {r['ms_per_frame']:6.1f}")
        print(f"co-visible gain over copy, mean of {', '.join(GEOMETRY)}: {gain:+.2f} dB"
              + (f" | static (identity camera) {rows['static']['psnr']:.2f} dB" if "static" in rows else ""))
        if frames:
            print("detail (fine detail over the truth's; 1 = as sharp, < 1 blur, > 1 grain) by frame, moving families: "
                  + " ".join(f"{v:.2f}" for v in frames))
    steps, long, loops, mem, footage = steps_list[-1], {}, {}, {}, {}
    if student and args.stream:
        long = run_stream(model, steps, args.stream, args.stream_frames, args.device, args.baseline)
    if student and args.loops:
        loops = run_loops(model, steps, args.loops, args.loop_length, args.device, args.baseline, args.sink)
    if student and args.memory:
        mem = run_memory(model, steps, args.memory, args.device, args.baseline)
    if student and args.real:
        import real                                        # real.py uses eval.py's metrics
        footage = real.run(model, steps, args.real, args.real_size, args.out, args.device)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "eval.json")
    with open(out, "w") as f:
        json.dump(dict(ckpt=args.ckpt, step=ckpt.get("step"), clips=args.clips, frames=args.frames,
                       device=args.device, runs=runs, stream=long, loops=loops, memory=mem, real=footage), f, indent=1)
    png = os.path.join(args.out, "eval.png")
    save_strip(png, *[torch.cat(v, 1) for v in zip(*strip)])
    print(f"* mean over the moving families (static: the target is the source, copy is exact)\n"
          f"wrote {out} and {png} (rows: source / generated / truth; families left to right)")
