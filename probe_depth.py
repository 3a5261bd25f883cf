"""
What limits wide camera moves, measured: the warp head's depth. On validation scenes (eval.VAL_SEED,
never eval.py's) for orbit, dolly, truck and pan, the model makes each clip (a student streams it
at --steps with its KV cache; a teacher gives its one-step mean) and its warp head's outputs are
kept. Against the true depth, on co-visible target pixels:
- how far the head's expected inverse depth (sum_k w_k rho_k) is from the truth, and how sure
  its choice is (the median of its largest plane weight);
- the co-visible gain over copy as made, and with the head's plane weights replaced by the ones
  the true depth asks for (camera.plane_weights; the same gate, the rest of the frame as made):
  what a right depth would add to this very network. Pan turns the camera: every plane lands on
  the same source pixel there, so its depth is free and its two gains agree;
- by band of true inverse depth (far: under 0.15, sky and far background; near: over 2.25, the
  ground below the camera and the nearest objects; the middle between), the head's median there
  and the gain with the true depth on that band alone: which depths cost the most;
- the gain with the true weights averaged over each patch (one blend a patch token): whether the
  head's resolution or its depth is the limit.

    python probe_depth.py --ckpt checkpoints/student_small.pt
"""
import json

import torch
import torch.nn.functional as F

import camera
from common import ArgumentParser, fail
from eval import VAL_SEED, detail, heldout_batch, nanmean, psnr, rays
from model import (KVCache, decode_target, frame_cond, load_model, student_chunk, teacher_sample,
                   warp_term)

FAMILIES = ("orbit", "dolly", "truck", "pan")
BANDS = {"far": (0.0, 0.15), "middle": (0.15, 2.25), "near": (2.25, float("inf"))}   # true inverse depth


def parse_args():
    p = ArgumentParser(description="The warp head's depth against the truth, and what the true depth would add.")
    p.add_argument("--ckpt", type=str, default="checkpoints/student_small.pt", help="student or teacher checkpoint")
    p.add_argument("--clips", type=int, default=4, help="clips a family")
    p.add_argument("--frames", type=int, default=8, help="frames a clip")
    p.add_argument("--steps", type=int, default=1, help="student sampling steps")
    p.add_argument("--out", type=str, default=None, help="JSON file for the figures (default: print only)")
    return p.parse_args()


@torch.no_grad()
def made(model, src, cam_src, cam_tgt, steps, student):
    """The model's targets in diffusion space (B, T, 3, H, W) and its warp head's outputs
    (B, T, K + 1, H, W) for them."""
    (B, T), gen = src.shape[:2], torch.Generator().manual_seed(0)
    if not student:                                                     # the one-step mean: t = 1
        x0 = teacher_sample(model, src, cam_src, cam_tgt, 1, noise=torch.randn(src.shape, generator=gen))
        o = model.last_warp.view(B, 2 * T, -1, *src.shape[-2:])[:, T:]
        return x0 - src if model.cfg.residual else x0, o
    cache, xs, heads = KVCache(model.cfg), [], []
    for c0 in range(0, T, model.cfg.chunk):                             # chunk by chunk, as it streams
        sl = slice(c0, min(T, c0 + model.cfg.chunk))
        noise = torch.randn((steps, B, sl.stop - sl.start) + src.shape[2:], generator=gen)
        xs.append(student_chunk(model, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl], range(sl.start, sl.stop),
                                steps, noise, heads=heads))
    return torch.cat(xs, 1), torch.cat([o.view(B, -1, *o.shape[1:]) for o in heads], 1)


def probe(model, fam, args, student):
    cfg, planes = model.cfg, torch.tensor(model.cfg.warp)
    K = len(planes)
    b = heldout_batch(fam, args.clips, args.frames, cfg.size, VAL_SEED)
    src, y = b["src"], b["tgt"]
    cam_src, cam_tgt = rays(b, cfg.size, "cpu")
    x0, o = made(model, src, cam_src, cam_tgt, args.steps, student)
    w_true, covis = camera.plane_target(b, cfg.warp)
    w = o[:, :, :K].softmax(2)
    rho, rho_true = ((wk * planes.view(-1, 1, 1)).sum(2) for wk in (w, w_true))   # the true one: in the planes' range
    err = (rho - rho_true).abs()[covis]
    cond, k_src = frame_cond(cfg, src, cam_tgt), camera.source_intrinsics(cam_src)
    term = lambda wk: warp_term(torch.cat([wk.clamp(min=1e-12).log(), o[:, :, K:]], 2).flatten(0, 1), cond, k_src, cfg.warp)
    x = decode_target(x0, src, cfg)
    rest = x0 - term(w)                                                      # the frame without the head's blend
    with_weights = lambda wk: decode_target(rest + term(wk), src, cfg)
    x_true = with_weights(w_true)
    copy = nanmean(psnr(src, y, covis))
    gain = lambda xk: nanmean(psnr(xk, y, covis)) - copy
    bands, med = {}, lambda t: t.median().item() if t.numel() else float("nan")   # a band may be empty
    for name, (lo, hi) in BANDS.items():
        band = (rho_true >= lo) & (rho_true < hi)
        seen = band & covis
        bands[name] = dict(share=seen.sum().item() / covis.sum().item(), rho_true=med(rho_true[seen]), rho=med(rho[seen]),
                           gain_true_depth=gain(with_weights(torch.where(band[:, :, None], w_true, w))))
    p = cfg.patch
    w_patch = F.interpolate(F.avg_pool2d(w_true.flatten(0, 1), p), scale_factor=p, mode="nearest").view_as(w_true)
    return dict(rho_err=err.median().item(), within=(err < 0.125).float().mean().item(),
                top=w.max(2).values[covis].median().item(), gain=gain(x), gain_true_depth=gain(x_true),
                gain_patch_depth=gain(with_weights(w_patch)), bands=bands,
                detail=detail(x, y).mean().item(), detail_true_depth=detail(x_true, y).mean().item())


def main():
    args = parse_args()
    try:
        model, ckpt = load_model(args.ckpt)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load {args.ckpt}: {e}")
    if not model.cfg.warp:
        fail(f"{args.ckpt} has no warp head (its config's warp is empty)")
    student = "student" in ckpt
    print(f"{args.ckpt}: {'student, %d step(s)' % args.steps if student else 'teacher, one-step mean'}; "
          f"validation scenes, {args.clips} clips x {args.frames} frames a family; co-visible pixels")
    print("family | |rho - true| median | within 0.125 | top weight | gain over copy: as made / true depth / true "
          "depth a patch | detail: as made / true depth")
    res = {}
    for fam in FAMILIES:                                                # a row as each family is done
        r = res[fam] = probe(model, fam, args, student)
        print(f"{fam} | {r['rho_err']:.3f} | {r['within']:.2f} | {r['top']:.2f} | {r['gain']:+.2f} / {r['gain_true_depth']:+.2f}"
              f" / {r['gain_patch_depth']:+.2f} | {r['detail']:.2f} / {r['detail_true_depth']:.2f}", flush=True)
    print("by band of true inverse depth (" + ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in BANDS.items())
          + "): share of the co-visible pixels, the median inverse depth true / the head's, gain with the true depth there alone")
    for fam, r in res.items():
        print(f"{fam} | " + " | ".join(f"{k} {b['share']:.2f}, {b['rho_true']:.2f} / {b['rho']:.2f}, {b['gain_true_depth']:+.2f}"
                                       for k, b in r["bands"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
