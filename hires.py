"""
Output above the model's resolution. The student runs at cfg.size (32x32), but most of a new
view is the source seen from elsewhere, and its warp head says so per pixel: which plane (depth)
the pixel's ray meets, and how much of the source to take there (the gate g). The source itself
can be sampled anywhere, at any resolution. So a target frame at R x R (R > cfg.size) is

    y_R = up(y) + (g mix)_R - up((g mix)_S)

where y is the model's output at its size S, up is bilinear upsampling to R, and g mix is the
warp head's gate times the source sampled where each pixel's ray meets its planes (the plane
logits and gate of the step that made the frame, upsampled to R for (g mix)_R, the source at R).
The model decides the colours at its size; the fine detail it lacks comes from the source at
R, where and as much as its warp head takes the source. At R = S this is exactly the model's
output. Chosen on validation scenes (python hires.py) over two others: adding the source at R
unwarped where the gate is below 1 (ghosts), and the detail without the gate (wrong detail where
the network invents); docs/results.md, Real footage.

    python stream.py --video in.mp4 --traj pan_left --size 128    # the output at 128x128
    python eval.py --real data/real                               # measured at 32 and 128 (real.py)
    python hires.py                                               # validation scenes at 128
"""
import torch
import torch.nn.functional as F

import camera
from model import KVCache, decode_target, frame_cond, student_chunk, warp_term


def resize(x, size):
    """(..., 3, H, W) -> (..., 3, size, size): area-averaged down, bilinear up."""
    lead, (H, W) = x.shape[:-3], x.shape[-2:]
    if (H, W) == (size, size):
        return x
    mode = "area" if size <= min(H, W) else "bilinear"
    kw = {} if mode == "area" else dict(align_corners=False)
    return F.interpolate(x.flatten(0, -4), size=(size, size), mode=mode, **kw).view(lead + x.shape[-3:-2] + (size, size))


def check(model):
    cfg = model.cfg
    if not (cfg.warp and cfg.residual and cfg.src_concat):
        raise ValueError("output above the model's size needs a student with the warp head (and residual targets)")


def compose(model, y, heads, src, src_hr, cam_tgt, cam_tgt_hr, k_src):
    """Target pixels (B, n, 3, R, R) from one chunk's output y (B, n, 3, S, S) and the warp head's
    outputs of the step that made it (heads (B n, K + 1, S, S): student_chunk(heads=[...])).
    src (B, n, 3, S, S) is what the network saw, src_hr (B, n, 3, R, R) the same frames at R;
    cam_tgt, cam_tgt_hr the targets' rays at S and at R; k_src (B, n, 4) the sources' intrinsics."""
    cfg, (B, n), R, K = model.cfg, src.shape[:2], src_hr.shape[-1], len(model.cfg.warp)

    def taken(o, s, cam):                               # g mix: warp_term is g (mix - s)
        return warp_term(o, frame_cond(cfg, s, cam), k_src, cfg.warp) + o[:, K:].view(B, n, 1, *s.shape[-2:]) * s

    up_heads = F.interpolate(heads, size=(R, R), mode="bilinear", align_corners=False)
    detail = taken(up_heads, src_hr, cam_tgt_hr) - resize(taken(heads, src, cam_tgt), R)
    return (resize(y, R) + detail).clamp(-1, 1)


def chunk(model, cache, src_hr, rel, K_src, K_tgt, time, steps, noise):
    """model.student_chunk for frames at R >= cfg.size: src_hr (B, n, 3, R, R), rel (B, n, 4, 4),
    K_* (B, n, 4), time (n,), noise (steps, B, n, 3, S, S). The network sees the frames at its
    size S. Returns (targets at R, targets at S), pixels; the same tensor twice at R = S (any
    student; above it, one with the warp head)."""
    cfg, S, R = model.cfg, model.cfg.size, src_hr.shape[-1]
    if R > S and cache.graphs:       # the heads are read from model.last_warp, which a replayed graph never sets
        raise ValueError("output above the model's size is not made with CUDA graphs (KVCache(graphs=True))")
    src = resize(src_hr, S)
    cam_src, cam_tgt = camera.pair_rays(rel, K_src, K_tgt, S, S)
    heads = [] if R > S else None
    y = decode_target(student_chunk(model, cache, src, cam_src, cam_tgt, time, steps, noise, heads=heads), src, cfg)
    if R == S:
        return y, y
    return compose(model, y, heads[0], src, src_hr, cam_tgt, camera.plucker(rel, K_tgt, R, R), K_src), y


@torch.no_grad()
def sample(model, src_hr, rel, K_src, K_tgt, steps, generator=None, cache=None, time0=0):
    """model.student_sample at the size of src_hr (B, T, 3, R, R): the network sees it at
    cfg.size, the output comes at R. rel (B, T, 4, 4) target poses in the source frames, K_*
    (B, T, 4) intrinsics. Returns (targets at R, targets at cfg.size), each (B, T, 3, ., .)."""
    check(model)
    cfg, (B, T), S = model.cfg, src_hr.shape[:2], model.cfg.size
    cache = cache if cache is not None else KVCache(cfg)
    hi, lo = [], []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        noise = torch.randn((steps, B, sl.stop - sl.start, 3, S, S), generator=generator, device=src_hr.device)
        h, y = chunk(model, cache, src_hr[:, sl], rel[:, sl], K_src[:, sl], K_tgt[:, sl],
                     range(sl.start + time0, sl.stop + time0), steps, noise)
        hi.append(h)
        lo.append(y)
    return torch.cat(hi, 1), torch.cat(lo, 1)


def validate(model, size, n_clips, steps, families=("pan", "tilt", "zoom", "orbit", "dolly", "truck")):
    """The output at `size` on validation scenes (eval.VAL_SEED: never eval.py's), co-visible PSNR
    at that size against the truth rendered at it: this module's output, the model's output
    upsampled, copy, and the depth-warp oracle at that size. Returns {family: {row: dB}}."""
    import eval as ev
    res = {}
    for fam in families:
        b = ev.heldout_batch(fam, n_clips, 8, size, ev.VAL_SEED)
        hi, lo = sample(model, b["src"], b["rel"], b["K_src"], b["K_tgt"], steps, torch.Generator().manual_seed(0))
        covis, grid = camera.covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
        m = lambda x: ev.nanmean(ev.psnr(x, b["tgt"], covis))
        res[fam] = dict(hires=m(hi), upsampled=m(resize(lo, size)), copy=m(b["src"]),
                        oracle=m(camera.warp_source(b["src"], grid)))
        print(f"{fam:6s} " + " | ".join(f"{k} {v:.2f}" for k, v in res[fam].items()), flush=True)
    return res


if __name__ == "__main__":
    from common import ArgumentParser, check_args, fail
    from model import SHIPPED_STUDENT, load_model
    p = ArgumentParser(description="The output above the model's size on validation scenes (co-visible PSNR).")
    p.add_argument("--ckpt", type=str, default=SHIPPED_STUDENT, help="student checkpoint (default: the shipped one)")
    p.add_argument("--size", type=int, default=128, help="output side, pixels")
    p.add_argument("--clips", type=int, default=4, help="validation clips a family (8 frames each)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps")
    a = p.parse_args()
    check_args(a, positive=("size", "clips", "steps"))
    try:
        model = load_model(a.ckpt)[0]
        check(model)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    validate(model, a.size, a.clips, a.steps)
