"""
Output above the model's resolution. The student runs at cfg.size (32x32), but most of a new
view is the source seen from elsewhere, and its warp head says so per pixel: which plane (depth)
the pixel's ray meets, and how much of the source to take there (the gate). The source itself
can be sampled anywhere, at any resolution. So a target frame at R x R (R > cfg.size) is

    y_R = src_R + up(own) + warp_term(up(heads), target rays at R, src_R)

where heads are the warp head's plane logits and gate of the step that made the frame, up is
bilinear upsampling from cfg.size to R, and own = x0 - warp_term(heads, rays at cfg.size, src)
is what the network adds of its own (x0 is the residual over the source, model.encode_target).
Where the source sees the pixel, the detail is the source's at R; where the network invents,
its colours are upsampled. At R = cfg.size this is exactly the model's output.

    python stream.py --video in.mp4 --traj pan_left --size 128    # the output at 128x128
    python eval.py --real data/real                               # measured at 32 and 128 (real.py)
"""
import torch
import torch.nn.functional as F

import camera
from model import KVCache, decode_target, frame_cond, source_intrinsics, student_chunk, warp_term


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


def compose(model, x0, heads, src, src_hr, cam_tgt, cam_tgt_hr, k_src):
    """Target pixels (B, n, 3, R, R) from one chunk's x0 (B, n, 3, S, S) and the warp head's
    outputs of the step that made it (heads (B n, K + 1, S, S): student_chunk(heads=[...])).
    src (B, n, 3, S, S) is what the network saw, src_hr (B, n, 3, R, R) the same frames at R;
    cam_tgt, cam_tgt_hr the targets' rays at S and at R; k_src the sources' intrinsics."""
    cfg, R = model.cfg, src_hr.shape[-1]
    own = x0 - warp_term(heads, frame_cond(cfg, src, cam_tgt), k_src, cfg.warp)
    up_heads = F.interpolate(heads, size=(R, R), mode="bilinear", align_corners=False)
    sharp = warp_term(up_heads, frame_cond(cfg, src_hr, cam_tgt_hr), k_src, cfg.warp)
    return decode_target(resize(own, R) + sharp, src_hr, cfg)


@torch.no_grad()
def sample(model, src_hr, rel, K_src, K_tgt, steps, generator=None, cache=None, time0=0):
    """model.student_sample at the size of src_hr (B, T, 3, R, R): the network sees it at
    cfg.size, the output comes at R. rel (B, T, 4, 4) target poses in the source frames, K_*
    (B, T, 4) intrinsics. Returns (targets at R, targets at cfg.size), each (B, T, 3, ., .)."""
    check(model)
    cfg, (B, T), R, S = model.cfg, src_hr.shape[:2], src_hr.shape[-1], model.cfg.size
    cache = cache if cache is not None else KVCache(cfg)
    src = resize(src_hr, S)
    hi, lo = [], []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        n = sl.stop - sl.start
        cam_src, cam_tgt = camera.pair_rays(rel[:, sl], K_src[:, sl], K_tgt[:, sl], S, S)
        cam_tgt_hr = camera.pair_rays(rel[:, sl], K_src[:, sl], K_tgt[:, sl], R, R)[1]
        noise = torch.randn((steps, B, n, 3, S, S), generator=generator, device=src.device)
        heads = []
        x0 = student_chunk(model, cache, src[:, sl], cam_src, cam_tgt, range(sl.start + time0, sl.stop + time0), steps,
                           noise, heads=heads)
        hi.append(compose(model, x0, heads[0], src[:, sl], src_hr[:, sl], cam_tgt, cam_tgt_hr, source_intrinsics(cam_src)))
        lo.append(decode_target(x0, src[:, sl], cfg))
    return torch.cat(hi, 1), torch.cat(lo, 1)
