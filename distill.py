"""
Distill the bidirectional many-step teacher into a few-step block-causal student
(DESIGN.md section 4): causal adaptation, then Self-Forcing rollouts with DMD and a critic.

    python distill.py                                  # every stage, runs/teacher/ckpt.pt -> runs/student/ckpt.pt
    python distill.py --stage causal --teacher runs/tiny/ckpt.pt --out runs/tiny_student --causal_steps 50
    python distill.py --stage dmd --init runs/student/causal.pt      # one stage from a given start
    torchrun --standalone --nproc_per_node=8 distill.py               # several GPUs

Stage `causal`: the student starts from the teacher's weights with the block-causal mask and is
fine-tuned with the flow-matching loss on ground-truth pairs, every chunk at its own noise level
(some chunks clean, as the KV cache will hold them at inference).
Stage `dmd`: Self-Forcing. The student generates the target chunk by chunk from its own KV cache
(model.student_chunk) and one exit step per rollout keeps gradients; the DMD loss compares the
frozen teacher (real score) with a critic (fake score) trained online on the student's samples.
"""
import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from eval import format_quick, quick_eval, save_sample_video, save_strip
from loopaug import LoopSampler
from model import (KVCache, StopFlag, add_noise, encode_target, flow_loss, load_checkpoint, sample_t, save_checkpoint,
                   shift_t, student_chunk, to_x0, RealCamDiT, Config)

# -----------------------------------------------------------------------------
# the pieces of the method


def rollout(student, src, cam_src, cam_tgt, steps, exit_step, generator):
    """Self-Forcing rollout: the student generates all T target frames chunk by chunk from its
    own KV cache, stopping every chunk at the same exit step. Only the exit step's forward keeps
    gradients; the cache passes run without, so no gradient crosses chunks.
    Returns x (B, T, 3, H, W) in diffusion space (the target, or target - source)."""
    cfg, (B, T) = student.cfg, src.shape[:2]
    cache, out = KVCache(cfg), []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        noise = torch.randn((steps, B, sl.stop - sl.start) + src.shape[2:], generator=generator).to(src.device)
        time = torch.arange(sl.start, sl.stop, device=src.device)
        out.append(student_chunk(student, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl], time, steps, noise, exit_step))
    return torch.cat(out, 1)


def dmd_loss(x, x0_real, x0_fake):
    """Distribution matching: g = (x0_fake - x0_real) / mean|x - x0_real| per sample, and
    loss = 0.5 * mse(x, stopgrad(x - g)), whose gradient in x is g / numel: descending it moves
    the generated x toward the real score's denoising and away from the fake one's.
    Returns the loss and the per-sample norm of g."""
    dims = tuple(range(1, x.ndim))
    scale = (x - x0_real).abs().mean(dims, keepdim=True).clamp(min=1e-6)   # per-sample normalizer
    g = ((x0_fake - x0_real) / scale).detach()
    loss = 0.5 * F.mse_loss(x, (x - g).detach())
    return loss, g.flatten(1).norm(dim=1)


def chunk_timesteps(B, T, chunk, shift, generator, p_clean=0.3):
    """Causal stage noise levels (B, T): one t per chunk (diffusion forcing); a share p_clean of
    the chunks is clean (t = 0), the context the KV cache holds at inference."""
    n = math.ceil(T / chunk)
    t = sample_t((B, n), shift, generator)
    t = torch.where(torch.rand(B, n, generator=generator) < p_clean, torch.zeros_like(t), t)
    return t.repeat_interleave(chunk, 1)[:, :T]


def dmd_timestep(B, shift, generator, lo=0.02, hi=0.98):
    """One t a sample for the DMD loss: uniform, shifted toward noise, clamped away from 0 and 1."""
    return shift_t(torch.rand(B, generator=generator), shift).clamp(lo, hi)

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description="Distill the RealCam-min teacher into a causal few-step student.")
    p.add_argument("--stage", type=str, default="all", choices=["all", "causal", "dmd"], help="stage to run")
    p.add_argument("--teacher", type=str, default="runs/teacher/ckpt.pt", help="frozen teacher checkpoint")
    p.add_argument("--init", type=str, default=None, help="start of the stage (default: teacher for causal, OUT/causal.pt for dmd)")
    p.add_argument("--out", type=str, default="runs/student", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the stage from OUT/<stage>.pt")
    # student
    p.add_argument("--chunk", type=int, default=1, help="pairs a chunk (1: frame by frame)")
    p.add_argument("--window", type=int, default=4, help="chunks attended, current included (0: all); below "
                   "--max_pairs, so training rollouts run past the rolling window as streams do")
    p.add_argument("--sink", type=int, default=0, help="first chunks always attended")
    p.add_argument("--steps", type=int, default=4, help="student denoising steps a chunk")
    # data and optimization
    p.add_argument("--data", type=str, default=None, help="on-disk multi-view dataset (default: synthetic)")
    p.add_argument("--loopaug", type=float, default=0.0, help="share of DMD rollouts drawn from LoopAug loops (needs --data)")
    p.add_argument("--pairs", type=int, default=None, help="pairs a batch per process (default: 8 CPU, 32 CUDA)")
    p.add_argument("--max_pairs", type=int, default=6, help="rollout / clip lengths drawn from 1..max_pairs")
    p.add_argument("--causal_steps", type=int, default=None, help="causal-stage steps (default: per preset)")
    p.add_argument("--dmd_steps", type=int, default=None, help="DMD generator steps (default: per preset)")
    p.add_argument("--lr", type=float, default=5e-5, help="student learning rate (causal and DMD)")
    p.add_argument("--lr_critic", type=float, default=1e-4, help="critic learning rate")
    p.add_argument("--critic_steps", type=int, default=5, help="critic updates a generator update")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the student")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    # setup (DDP when launched by torchrun; gradients are all-reduced by hand, since the
    # rollout calls the model many times outside DistributedDataParallel's forward)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master, cuda, dev = rank == 0, args.device.startswith("cuda"), args.device
    args.pairs = args.pairs or (32 if cuda else 8)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    torch.manual_seed(args.seed + rank)
    try:
        tckpt = load_checkpoint(args.teacher)
        if "student" in tckpt:
            raise ValueError(f"{args.teacher} is a student checkpoint; --teacher needs the bidirectional teacher")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e} (train one with: python teacher.py)")
    tcfg = Config(**tckpt["config"])
    preset = next((k for k, v in {"tiny": 16, "small": 32, "base": 64}.items() if v == tcfg.size), "small")
    args.causal_steps = args.causal_steps if args.causal_steps is not None else {"tiny": 50, "small": 600, "base": 3000}[preset]
    args.dmd_steps = args.dmd_steps if args.dmd_steps is not None else {"tiny": 50, "small": 400, "base": 3000}[preset]
    teacher = RealCamDiT(tcfg).to(dev).requires_grad_(False).eval()
    tweights = tckpt.get("ema") or tckpt["model"]     # a training checkpoint or a release file
    teacher.load_state_dict(tweights)
    scfg = replace(tcfg, chunk=args.chunk, window=args.window, sink=args.sink)
    try:
        dataset = data.MultiViewDataset(args.data, scfg.size) if args.data else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.loopaug > 0 and dataset is None:
        raise SystemExit("error: --loopaug builds loops from a multi-view dataset: give --data DIR "
                         "(python data.py --out DIR writes one)")
    loops = LoopSampler(None, scfg.size, scenes=dataset.scenes) if args.loopaug > 0 else None
    os.makedirs(args.out, exist_ok=True)

    def get_batch(step, stage="causal"):
        u = torch.rand(1, generator=data.rng(args.seed, step, 3)).item()     # tag 3: loop or not
        if loops and stage == "dmd" and u < args.loopaug:
            b = loops.batch(step, args.pairs, args.max_pairs, args.seed, rank)
        elif dataset:
            b = dataset.batch(step, args.pairs, args.max_pairs, args.seed, rank)
        else:
            b = data.synthetic_batch(step, args.pairs, args.max_pairs, scfg.size, scfg.size, args.seed + 1, rank)
        cam_src, cam_tgt = data.pair_rays(b["rel"], b["K_src"], b["K_tgt"], scfg.size, scfg.size)
        return [x.to(dev) for x in (b["src"], b["tgt"], cam_src, cam_tgt)]

    def allreduce(model):
        if ddp:
            for q in model.parameters():
                if q.grad is not None:
                    dist.all_reduce(q.grad)
                    q.grad /= world

    def ema_update(ema, model, step):
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)

    interrupt = StopFlag()
    stages = ["causal", "dmd"] if args.stage == "all" else [args.stage]
    for stage in stages:
        path, max_steps = os.path.join(args.out, f"{stage}.pt"), getattr(args, f"{stage}_steps")
        init = args.init if (args.init and stage == stages[0]) else (args.teacher if stage == "causal" else os.path.join(args.out, "causal.pt"))
        resume = (args.resume or args.stage == "all") and os.path.exists(path)
        try:
            ck = load_checkpoint(path if resume else init)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if resume and ck["step"] >= max_steps:
            if master:
                print(f"{stage}: already done ({path}, step {ck['step']})")
            continue
        student = RealCamDiT(scfg).to(dev)
        student.load_state_dict(ck["model"] if resume else (ck.get("ema") or ck["model"]))   # start: the EMA
        ema = copy.deepcopy(student).requires_grad_(False).eval()
        if resume:
            ema.load_state_dict(ck["ema"])
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.0 if stage == "dmd" else 0.9, 0.99), weight_decay=0.0)
        critic = opt_c = None
        if stage == "dmd":       # the fake score: a bidirectional copy of the teacher, trained online
            critic = RealCamDiT(tcfg).to(dev)
            critic.load_state_dict(ck["critic"] if resume else tweights)
            opt_c = torch.optim.AdamW(critic.parameters(), lr=args.lr_critic, betas=(0.0, 0.99), weight_decay=0.0)
        tag, start = {"causal": 4, "dmd": 5}[stage], 0       # the stage's RNG tag
        if resume:
            opt.load_state_dict(ck["optim"])
            if critic is not None:
                opt_c.load_state_dict(ck["optim_critic"])
            start = ck["step"]
            torch.set_rng_state(ck["rng"]["cpu"])
            if cuda and "cuda" in ck["rng"]:
                torch.cuda.set_rng_state(ck["rng"]["cuda"])

        def save(step):
            if not master:
                return
            extra = dict(critic=critic.state_dict(), optim_critic=opt_c.state_dict()) if critic is not None else {}
            save_checkpoint(path, model=student.state_dict(), ema=ema.state_dict(), optim=opt.state_dict(), step=step,
                            config=asdict(scfg), student=dict(steps=args.steps, stage=stage), teacher=args.teacher,
                            args=vars(args), **extra,
                            rng={"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})})

        if master:
            print(f"{stage}: {start}..{max_steps} steps from {path if resume else init}, chunk {scfg.chunk}, "
                  f"window {scfg.window}, {args.steps} steps a chunk, {args.pairs} pairs x {world} a step")
        bar = tqdm(range(start, max_steps + 1), disable=not master, dynamic_ncols=True, mininterval=5)
        try:
            for step in bar:
                if interrupt.stop(ddp, dev):
                    if master:
                        print(f"interrupted after {step} steps of {stage}: saving {path} (continue with --resume)")
                        save(step)
                    raise SystemExit(130)
                last = step == max_steps
                if master and (step % args.eval_every == 0 or last) and step > start:
                    res, (s, x, y) = quick_eval(ema, args.steps, student=True, device=dev)
                    bar.write(f"eval {stage} {step} | {format_quick(res)}")
                    with open(os.path.join(args.out, "evals.jsonl"), "a") as f:
                        f.write(json.dumps(dict(stage=stage, step=step, sample=res)) + "\n")
                    save_sample_video(os.path.join(args.out, f"sample_{stage}.mp4"), s, x, y)
                    save_strip(os.path.join(args.out, f"sample_{stage}.png"), s, x, y)
                if (step % args.save_every == 0 or last) and step > start:
                    save(step)
                if last:
                    break
                t0 = time.time()
                g = data.rng(args.seed, tag, step, rank)
                gs = data.rng(args.seed, tag, step)                 # shared by ranks
                src, tgt, cam_src, cam_tgt = get_batch(step, stage)
                B, T = src.shape[:2]
                msg = f"{stage} {step}/{max_steps} | T {T}"
                if stage == "causal":
                    # flow matching with the block-causal mask, a noise level a chunk
                    x0 = encode_target(tgt, src, scfg)
                    e = torch.randn(x0.shape, generator=g).to(dev)
                    t = chunk_timesteps(B, T, scfg.chunk, scfg.shift, g).to(dev)
                    with autocast:
                        out = student(src, add_noise(x0, e, t), cam_src, cam_tgt, t, causal=True)
                    w = (t > 0).float()                                        # no loss on clean chunks
                    loss = (flow_loss(out, x0, e, t, scfg) * w).sum() / w.sum().clamp(min=1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    allreduce(student)
                    gn = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
                    opt.step()
                    msg += f" | loss {loss.item():.4f} | gnorm {gn.item():.2f}"
                else:
                    # critic: flow matching on fresh student samples (detached), critic_steps times, drawn
                    # as the generator's are (random exit step), so it scores the distribution DMD moves
                    loss_c = torch.zeros(())
                    for _ in range(args.critic_steps):
                        exit_c = int(torch.randint(args.steps, (1,), generator=gs))
                        with torch.no_grad(), autocast:
                            xf = rollout(student, src, cam_src, cam_tgt, args.steps, exit_c, g).float()
                        tc = sample_t((B, 1), scfg.shift, g).expand(B, T).to(dev)
                        e = torch.randn(xf.shape, generator=g).to(dev)
                        with autocast:
                            oc = critic(src, add_noise(xf, e, tc), cam_src, cam_tgt, tc)
                        loss_c = flow_loss(oc, xf, e, tc, tcfg).mean()
                        opt_c.zero_grad(set_to_none=True)
                        loss_c.backward()
                        allreduce(critic)
                        torch.nn.utils.clip_grad_norm_(critic.parameters(), args.clip)
                        opt_c.step()
                    # generator: Self-Forcing rollout, one exit step shared by every chunk and rank
                    exit_step = int(torch.randint(args.steps, (1,), generator=gs))
                    with autocast:
                        x = rollout(student, src, cam_src, cam_tgt, args.steps, exit_step, g).float()
                    t = dmd_timestep(B, scfg.shift, g)[:, None].expand(B, T).to(dev)
                    e = torch.randn(x.shape, generator=g).to(dev)
                    with torch.no_grad(), autocast:
                        xt = add_noise(x.detach(), e, t)
                        x0_real = to_x0(teacher(src, xt, cam_src, cam_tgt, t).float(), xt, t, tcfg)
                        x0_fake = to_x0(critic(src, xt, cam_src, cam_tgt, t).float(), xt, t, tcfg)
                    loss, gnorm_g = dmd_loss(x, x0_real, x0_fake)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    allreduce(student)
                    gn = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
                    opt.step()
                    msg += (f" | loss {loss.item():.3e} | critic {loss_c.item():.4f} | |g| {gnorm_g.mean().item():.2f}"
                            f" | gnorm {gn.item():.2f} | exit {exit_step}")
                ema_update(ema, student, step)
                if master:
                    msg += f" | {1000 * (time.time() - t0):.0f} ms"
                    with open(os.path.join(args.out, "log.txt"), "a") as f:
                        f.write(msg + "\n")
                    if step % 25 == 0 or step < start + 3:
                        bar.write(msg)
        except KeyboardInterrupt:     # a second Ctrl-C: the last periodic checkpoint stands
            raise SystemExit(130)
    if master:
        final = os.path.join(args.out, f"{stages[-1]}.pt")
        if os.path.exists(final):
            shutil.copyfile(final, os.path.join(args.out, "ckpt.pt"))
            print(f"student: {os.path.join(args.out, 'ckpt.pt')} (evaluate with: python eval.py --ckpt {os.path.join(args.out, 'ckpt.pt')})")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
