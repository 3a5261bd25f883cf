"""
LoopAug: loop-closed training sequences from an on-disk multi-view dataset (DESIGN.md section 2).
A camera path that goes somewhere and comes back should show, on its return, what it showed on
the way out; these sequences are built so that the ground truth does exactly that.

    python data.py --out data/synth --scenes 16                       # a multi-view dataset
    python loopaug.py --data data/synth --out data/loops --loops 32   # a loop dataset + preview.mp4
    python distill.py --data data/synth --loopaug 0.5                 # half the rollouts are loops

- Palindromic loops: a clip of L synchronized (source, target) frames followed by its reverse,
  source, target and relative poses mirrored together (frames 0..L-1, L-2..0), `laps` times: the
  last frame equals the first, and frame i equals frame 2L-2-i.
- Camera-cycle loops: the source camera stays; the target moves through k other cameras of the
  scene and back to the first one (c1, c2, ..., ck, c1), `hold` frames at each, at frozen time
  (every source frame the same instant) or with time advancing `advance` frames a step.

A loop sequence is a dict like a training clip: src, tgt (N, 3, H, W), rel (N, 4, 4),
K_src, K_tgt (N, 4), plus `pairs`: (i, j) indices that show the same pose and instant.
"""
import argparse
import json
import os

import torch

import data


def palindrome(clip, laps=1):
    """Mirror a clip (dict of per-frame tensors) into an out-and-back loop, `laps` times."""
    L = clip["src"].shape[0]
    lap = list(range(L)) + list(range(L - 2, -1, -1))                 # 0..L-1, L-2..0
    idx = lap + [i for _ in range(laps - 1) for i in lap[1:]]
    out = {k: v[idx] for k, v in clip.items() if torch.is_tensor(v)}
    out["pairs"] = [(i, j) for i in range(len(idx)) for j in range(i + 1, len(idx)) if idx[i] == idx[j]]
    return out


def camera_cycle(scene, src_cam, cams, f0, hold=1, advance=0, laps=1):
    """Target visits cams[0], ..., cams[-1] and returns to cams[0]; the source camera src_cam
    stays. scene: load_scene() dict. Frame time: f0 + advance * step (advance 0: frozen)."""
    route = [c for _ in range(laps) for c in cams] + [cams[0]]
    tcam = torch.tensor([c for c in route for _ in range(hold)])
    T = scene["frames"].shape[1]
    f = (f0 + advance * torch.arange(len(tcam))).clamp(max=T - 1)
    c2w_s, c2w_t = scene["c2w"][src_cam, f], scene["c2w"][tcam, f]
    out = dict(src=scene["frames"][src_cam, f], tgt=scene["frames"][tcam, f],
               rel=data.relative_pose(c2w_s, c2w_t), K_src=scene["K"][src_cam].expand(len(f), 4),
               K_tgt=scene["K"][tcam])
    key = list(zip(tcam.tolist(), f.tolist()))
    out["pairs"] = [(i, j) for i in range(len(key)) for j in range(i + 1, len(key)) if key[i] == key[j]]
    return out


class LoopSampler:
    """Draws loop sequences of exactly T pairs from a multi-view dataset (half palindromes, half
    camera cycles), for distill.py --loopaug."""

    def __init__(self, root, size, scenes=None):
        self.scenes = scenes if scenes is not None else data.MultiViewDataset(root, size).scenes

    def loop(self, g, T, kind=None):
        sc = self.scenes[int(torch.randint(len(self.scenes), (1,), generator=g))]
        C, N = sc["frames"].shape[:2]
        kind = kind or ("palindrome" if torch.rand(1, generator=g) < 0.5 or C < 3 else "cycle")
        a = int(torch.randint(C, (1,), generator=g))
        if kind == "palindrome":
            L = min((T + 1) // 2, N)                                       # 2L - 1 frames: T or T - 1
            b = int(torch.randint(C, (1,), generator=g))
            f0 = int(torch.randint(0, N - L + 1, (1,), generator=g))
            sl = slice(f0, f0 + L)
            clip = dict(src=sc["frames"][a, sl], tgt=sc["frames"][b, sl], rel=data.relative_pose(sc["c2w"][a, sl], sc["c2w"][b, sl]),
                        K_src=sc["K"][a].expand(L, 4), K_tgt=sc["K"][b].expand(L, 4))
            seq = palindrome(clip)
        else:
            others = [c for c in torch.randperm(C, generator=g).tolist() if c != a]
            k = min(len(others), max(2, T - 1))
            hold = max(1, T // (k + 1))
            advance = int(torch.randint(0, 2, (1,), generator=g))              # frozen or advancing
            f0 = int(torch.randint(0, N, (1,), generator=g))
            seq = camera_cycle(sc, a, others[:k], f0, hold=hold, advance=advance)
        n = seq["src"].shape[0]
        idx = torch.arange(T).clamp(max=n - 1)                             # pad by holding the last frame
        return {k: v[idx] for k, v in seq.items() if torch.is_tensor(v)}

    def batch(self, step, pairs, max_pairs, seed=0, rank=0):
        g = data.rng(seed, step, rank, 2)    # tag 2: loops
        T = int(torch.randint(3, max(3, max_pairs) + 1, (1,), generator=g))
        return data.collate([self.loop(g, T) for _ in range(max(1, pairs // T))])


def write_loop(dirpath, seq, fps=data.FPS):
    """One loop: src.mp4, tgt.mp4 and loop.json (relative poses, intrinsics, matched pairs)."""
    os.makedirs(dirpath, exist_ok=True)
    data.write_video(os.path.join(dirpath, "src.mp4"), seq["src"], fps)
    data.write_video(os.path.join(dirpath, "tgt.mp4"), seq["tgt"], fps)
    with open(os.path.join(dirpath, "loop.json"), "w") as f:
        json.dump(dict(fps=fps, frames=len(seq["src"]), rel=seq["rel"].tolist(), K_src=seq["K_src"].tolist(),
                       K_tgt=seq["K_tgt"].tolist(), pairs=seq["pairs"]), f)


def load_loop(dirpath, size=None):
    meta_path = os.path.join(dirpath, "loop.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"missing loop file: {meta_path}")
    with open(meta_path) as f:
        meta = json.load(f)
    seq = {k: torch.stack(list(data.read_video(os.path.join(dirpath, k + ".mp4"), size))) for k in ("src", "tgt")}
    for k in ("src", "tgt"):
        if len(seq[k]) != meta["frames"]:
            raise ValueError(f"frame count mismatch: {os.path.join(dirpath, k + '.mp4')} has {len(seq[k])} "
                             f"frames but {meta_path} lists {meta['frames']}")
    seq.update({k: torch.tensor(meta[k]) for k in ("rel", "K_src", "K_tgt")})
    seq["pairs"] = [tuple(p) for p in meta["pairs"]]
    return seq


if __name__ == "__main__":
    from tqdm import tqdm
    p = argparse.ArgumentParser(description="Write a LoopAug dataset from a multi-view dataset.")
    p.add_argument("--data", type=str, default="data/synth", help="on-disk multi-view dataset (data.py format)")
    p.add_argument("--out", type=str, default="data/loops", help="output folder")
    p.add_argument("--loops", type=int, default=16, help="number of loops")
    p.add_argument("--length", type=int, default=9, help="frames of a palindrome's outbound half")
    p.add_argument("--laps", type=int, default=1, help="laps of each loop")
    p.add_argument("--size", type=int, default=32, help="frame size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        scenes = data.MultiViewDataset(args.data, args.size).scenes
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    g = torch.Generator().manual_seed(args.seed)
    preview = []
    for i in tqdm(range(args.loops), desc="loops"):
        sc = scenes[i % len(scenes)]
        C, N = sc["frames"].shape[:2]
        if i % 2 == 0 or C < 3:
            L = min(args.length, N)
            f0 = int(torch.randint(0, N - L + 1, (1,), generator=g))
            a, b = 0, int(torch.randint(1, C, (1,), generator=g)) if C > 1 else 0
            sl = slice(f0, f0 + L)
            clip = dict(src=sc["frames"][a, sl], tgt=sc["frames"][b, sl], rel=data.relative_pose(sc["c2w"][a, sl], sc["c2w"][b, sl]),
                        K_src=sc["K"][a].expand(L, 4), K_tgt=sc["K"][b].expand(L, 4))
            seq = palindrome(clip, args.laps)
        else:
            seq = camera_cycle(sc, 0, list(range(1, C)), int(torch.randint(0, N, (1,), generator=g)), hold=2, laps=args.laps)
        write_loop(os.path.join(args.out, f"loop_{i:05d}"), seq)
        if len(preview) < 4:
            preview.append(data.side_by_side(seq["src"], seq["tgt"]))
    n = max(len(v) for v in preview)
    pad = lambda v: torch.cat([v, v[-1:].expand(n - len(v), -1, -1, -1)])
    data.write_video(os.path.join(args.out, "preview.mp4"), torch.cat([pad(v) for v in preview], -2), data.FPS, upscale=4)
    print(f"wrote {args.loops} loops to {args.out} (preview: {os.path.join(args.out, 'preview.mp4')}; "
          f"each: src.mp4 | tgt.mp4 | loop.json)")
