"""
What DMD pulls the student toward, measured: at the student's own samples, noised to a timestep
t, the frozen teacher's x0 (the real score, with guidance) and the critic's (the fake score), by
t. Per t bucket: the co-visible PSNR of the student's sample, of the teacher's x0 and of the
critic's x0 against the truth, their detail (fine-detail energy over the truth's), and the
cosine between the DMD step -(x0_fake - x0_real) and the step to the truth (truth - sample):
positive when DMD moves the student toward the right frame. Held-out VAL scenes (quick_eval's).

    python probe_dmd.py --student runs/student/selfforcing.pt --teacher checkpoints/teacher_small.pt
"""
import json

import torch

import camera
from common import ArgumentParser
from distill import real_score
from eval import GEOMETRY, VAL_SEED, detail, heldout_batch, nanmean, psnr, rays
from model import RealCamDiT, add_noise, decode_target, encode_target, load_model, student_sample


def parse_args():
    p = ArgumentParser(description="DMD's real and fake scores at the student's samples, by timestep.")
    p.add_argument("--student", type=str, required=True, help="student checkpoint (its critic, if it has one, is probed too)")
    p.add_argument("--teacher", type=str, required=True, help="frozen teacher (the real score)")
    p.add_argument("--guidance", type=str, default="1,1.5", help="real-score guidance scales, comma-separated")
    p.add_argument("--t", type=str, default="0.1,0.3,0.5,0.7,0.9", help="timesteps, comma-separated")
    p.add_argument("--clips", type=int, default=4, help="clips a family")
    p.add_argument("--frames", type=int, default=4, help="frames a clip")
    p.add_argument("--steps", type=int, default=4, help="student steps")
    p.add_argument("--out", type=str, default=None, help="JSON file for the figures (default: print only)")
    return p.parse_args()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


@torch.no_grad()
def probe(student, teacher, critic, fam, args, gen):
    b = heldout_batch(fam, args.clips, args.frames, student.cfg.size, VAL_SEED)
    src, y = b["src"], b["tgt"]
    cam_src, cam_tgt = rays(b, student.cfg.size, "cpu")
    covis, _ = camera.covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
    xs = student_sample(student, src, cam_src, cam_tgt, args.steps, generator=gen)
    x, x_true = encode_target(xs, src, teacher.cfg), encode_target(y, src, teacher.cfg)
    cov = lambda v: nanmean(psnr(decode_target(v, src, teacher.cfg), y, covis))
    rows = []
    for t in map(float, args.t.split(",")):
        tt = torch.full(src.shape[:2], t)
        xt = add_noise(x, torch.randn(x.shape, generator=gen), tt)
        fake = critic(src, xt, cam_src, cam_tgt, tt).float() if critic is not None else None
        for gs in map(float, args.guidance.split(",")):
            real = real_score(teacher, src, xt, cam_src, cam_tgt, tt, gs)
            r = dict(family=fam, t=t, guidance=gs, student=cov(x), real=cov(real),
                     real_detail=detail(decode_target(real, src, teacher.cfg), y).mean().item(),
                     student_detail=detail(xs, y).mean().item(), real_vs_truth_cos=cosine(real - x, x_true - x))
            if fake is not None:
                r.update(fake=cov(fake), fake_detail=detail(decode_target(fake, src, teacher.cfg), y).mean().item(),
                         dmd_cos=cosine(real - fake, x_true - x))
            rows.append(r)
    return rows


def main():
    args = parse_args()
    torch.set_grad_enabled(False)
    student, ck = load_model(args.student)
    teacher, _ = load_model(args.teacher)
    critic = None
    if "critic" in ck:
        critic = RealCamDiT(teacher.cfg).eval()                       # the critic is a copy of the teacher
        critic.load_state_dict({k: v.float() for k, v in ck["critic"].items()})
    gen = torch.Generator().manual_seed(0)
    rows = [r for fam in GEOMETRY for r in probe(student, teacher, critic, fam, args, gen)]
    keys = [k for k in rows[0] if k not in ("family", "t", "guidance")]
    print("t     guid  " + "  ".join(f"{k:>10.10}" for k in keys))
    for t in map(float, args.t.split(",")):
        for gs in map(float, args.guidance.split(",")):
            sel = [r for r in rows if r["t"] == t and r["guidance"] == gs]
            print(f"{t:<5} {gs:<5} " + "  ".join(f"{sum(r[k] for r in sel) / len(sel):10.3f}" for k in keys))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
