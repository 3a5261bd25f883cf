"""
Evaluate a checkpoint on a fixed held-out set of synthetic scenes (seeds disjoint from training:
training scenes use seeds below 2**31, held-out scenes start at EVAL_SEED), for every
trajectory family: PSNR against the rendered ground truth on all pixels, on the co-visible ones
(target pixels whose scene point the source frame also sees: where geometry decides the answer)
and on the rest (disoccluded: where the model must invent), next to copy-the-source and, on the
co-visible pixels, the depth-warp oracle (the source resampled with the true depth: what perfect
geometry gives at this resolution); SSIM; temporal flicker; detail (fine detail over the
truth's: blur shows below 1, where PSNR may still reward it), by family and by frame; time per generated frame; for
students, a 48-frame orbit streamed through the KV cache, by thirds. Prints a table, writes
runs/eval/eval.json and eval.png (--out).

    python eval.py                                     # the shipped student (checkpoints/)
    python eval.py --ckpt runs/teacher/ckpt.pt
    python eval.py --ckpt runs/teacher/ckpt.pt --clips 2 --frames 4 --steps 10   # quick look
"""
import json
import os
import time

import torch
import torch.nn.functional as F

import camera
import data
import render
from common import ArgumentParser, check_args, check_device, check_out_dir, default_device, fail, hold_out_dir
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
    return data.collate(clips, DEPTH_KEYS)


DEPTH_KEYS = ("src", "tgt", "rel", "K_src", "K_tgt", "depth_src", "depth_tgt")


def stream_batch(n_clips, T, size, traj="orbit"):
    """Held-out long streams: a moving source (as any video) and a T-frame preset path."""
    rel, zoom = camera.preset_path(traj, T)
    clips = []
    for j in range(n_clips):
        seed = EVAL_SEED + 900_000 + j
        clips.append(render.render_clip(seed, T, size, size, rel, zoom, gen=torch.Generator().manual_seed(seed)))
    return data.collate(clips, DEPTH_KEYS)


def out_and_back(rel, zoom):
    """A path and its reverse: frames 0..L-1 then L-2..0."""
    idx = list(range(len(rel))) + list(range(len(rel) - 2, -1, -1))
    return rel[idx], zoom[idx]


def loop_path(name, L):
    """Closed target paths for the loop benchmark: 'orbit' (out 30 deg left and back, then out
    right and back), 'pan' and 'dolly' (out and back). Returns rel, zoom and the (i, j) frame
    pairs that share a pose (identity excluded: there the target is the source)."""
    if name == "orbit":
        (rl, zl), (rr, zr) = out_and_back(*camera.preset_path("orbit_left", L)), out_and_back(*camera.preset_path("orbit_right", L))
        rel, zoom = torch.cat([rl, rr[1:]]), torch.cat([zl, zr[1:]])
    else:
        rel, zoom = out_and_back(*camera.preset_path({"pan": "pan_left", "dolly": "dolly_in"}[name], L))
    eye = torch.eye(4)
    pairs = [(i, j) for i in range(len(rel)) for j in range(i + 1, len(rel))
             if torch.allclose(rel[i], rel[j], atol=1e-6) and not torch.allclose(rel[i], eye, atol=1e-6)]
    return rel, zoom, pairs


def loop_batch(name, n_clips, L, size):
    """Held-out loops: frozen scenes and a still source camera, so the truth on the way back is
    exactly the truth on the way out."""
    rel, zoom, pairs = loop_path(name, L)
    clips = []
    for j in range(n_clips):
        seed = EVAL_SEED + 500_000 + 1000 * list(LOOPS).index(name) + j
        g = torch.Generator().manual_seed(seed)
        src_c2w = render.source_path(1, g).expand(len(rel), 4, 4)
        clips.append(render.render_clip(seed, len(rel), size, size, rel, zoom, src_c2w=src_c2w, gen=g, frozen=True))
    return data.collate(clips), pairs


LOOPS = ("orbit", "pan", "dolly")


def loop_metrics(x, y, pairs):
    """Loop closure: PSNR between the generated frames at the same pose on the way out (i) and
    back (j), and PSNR against the truth on the way back; both averaged over pairs and clips."""
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    return dict(closure=psnr(x[:, j], x[:, i]).mean().item(), return_psnr=psnr(x[:, j], y[:, j]).mean().item(),
                out_psnr=psnr(x[:, i], y[:, i]).mean().item())

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


def view_metrics(x, b):
    """PSNR of generated targets x against the truth on all, co-visible and other (disoccluded)
    pixels, for x, copy-the-source and (co-visible) the depth-warp oracle; clip means."""
    y, s = b["tgt"], b["src"]
    covis, grid = camera.covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
    oracle = camera.warp_source(s, grid)
    r = {}
    for name, v in (("", x), ("_copy", s)):
        r["psnr" + name] = psnr(v, y).mean().item()
        r["covis" + name] = nanmean(psnr(v, y, covis))
        r["rest" + name] = nanmean(psnr(v, y, ~covis))
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
def generate(model, batch, steps, student=False, device="cpu", seed=0):
    """Target pixels (B, T, 3, H, W) for a batch of clips: the teacher's bidirectional Euler
    sampler, or the student's chunk-by-chunk few-step sampler with its KV cache."""
    src = batch["src"].to(device)
    cam_src, cam_tgt = rays(batch, model.cfg.size, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = student_sample if student else teacher_sample
    return sampler(model, src, cam_src, cam_tgt, steps, generator=gen).cpu()


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
    p.add_argument("--fx", type=float, default=1.0,
                   help="focal length of the held-out cameras, in image widths (1 = 53.13 degrees; training draws 0.8..1.2)")
    p.add_argument("--out", type=str, default="runs/eval", help="output folder (created if missing): eval.json, eval.png")
    p.add_argument("--stream", type=int, default=4, help="students: clips of the long orbit stream (0: skip)")
    p.add_argument("--stream_frames", type=int, default=48,
                   help="frames of the long orbit stream (at least 3: reported by thirds)")
    p.add_argument("--loops", type=int, default=0, help="also run the loop benchmark: clips a loop (0: skip)")
    p.add_argument("--loop_length", type=int, default=13, help="frames of each outbound half of a loop (at least 3)")
    p.add_argument("--device", type=str, default=default_device(), help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args()
    check_args(args, positive=("clips", "frames"), nonneg=("stream", "loops"))
    if not 0.1 <= args.fx <= 10:
        fail(f"--fx is a focal length in image widths, 0.1..10, got {args.fx}")
    steps_list = parse_steps(args.steps) if args.steps is not None else None
    if args.stream and args.stream_frames < 3:
        fail(f"--stream_frames must be at least 3 (the stream is reported by thirds), got {args.stream_frames}")
    if args.loops and args.loop_length < 3:
        fail(f"--loop_length must be at least 3 (a shorter loop revisits no pose but the identity), got {args.loop_length}")
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
            x = generate(model, b, steps, student, args.device)
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
    long = {}
    if student and args.stream:
        steps = steps_list[-1]
        b = stream_batch(args.stream, args.stream_frames, S)
        x = generate(model, b, steps, student, args.device)
        frames = lambda sl: {key: (v[:, sl] if v.ndim > 2 and v.shape[1] == args.stream_frames else v) for key, v in b.items()}
        for k, sl in enumerate(torch.arange(args.stream_frames).chunk(3)):
            long[f"third{k + 1}"] = view_metrics(x[:, sl], frames(sl))
        print(f"\nlong stream: {args.stream_frames}-frame orbit through the KV cache ({steps} steps, {args.stream} clips), "
              f"by thirds: PSNR all (copy) | co-visible (copy)")
        print("  " + " | ".join(f"{k}: {r['psnr']:.2f} ({r['psnr_copy']:.2f}) | {r['covis']:.2f} ({r['covis_copy']:.2f})"
                               for k, r in long.items()))
        # frame by frame: where along the path the gain is made (the angle grows, then comes back)
        per = [view_metrics(x[:, i:i + 1], frames(slice(i, i + 1))) for i in range(args.stream_frames)]
        long["by_frame"] = {k: [r[k] for r in per] for k in ("psnr", "psnr_copy", "covis", "covis_copy", "covis_oracle")}
        for name, key in (("student", "covis"), ("oracle", "covis_oracle")):
            print(f"  co-visible PSNR minus copy's by frame, {name:7s}: "
                  + " ".join("=" if r["covis_copy"] >= 50 else f"{r[key] - r['covis_copy']:+.1f}" for r in per))
        print("  (=: a frame at the source's pose, where copy is exact)")
    loops = {}
    if args.loops:
        steps = steps_list[-1]
        print(f"\nloop benchmark ({steps} steps, {args.loops} clips a loop, frozen scenes, still source)\n"
              f"{'loop':8s} {'frames':>6s} {'closure':>8s} {'return':>7s} {'out':>7s} {'copy':>7s}")
        for name in LOOPS:
            b, pairs = loop_batch(name, args.loops, args.loop_length, S)
            x = generate(model, b, steps, student, args.device)
            r = loop_metrics(x, b["tgt"], pairs)
            r["return_copy"] = loop_metrics(b["src"], b["tgt"], pairs)["return_psnr"]
            loops[name] = dict(frames=b["src"].shape[1], steps=steps, **r)
            print(f"{name:8s} {loops[name]['frames']:6d} {r['closure']:8.2f} {r['return_psnr']:7.2f} "
                  f"{r['out_psnr']:7.2f} {r['return_copy']:7.2f}")
        print("closure: PSNR between generated frames at the same pose out and back; return/out: PSNR vs truth")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "eval.json")
    with open(out, "w") as f:
        json.dump(dict(ckpt=args.ckpt, step=ckpt.get("step"), clips=args.clips, frames=args.frames,
                       device=args.device, runs=runs, stream=long, loops=loops), f, indent=1)
    png = os.path.join(args.out, "eval.png")
    save_strip(png, *[torch.cat(v, 1) for v in zip(*strip)])
    print(f"* mean over the moving families (static: the target is the source, copy is exact)\n"
          f"wrote {out} and {png} (rows: source / generated / truth; families left to right)")
