"""
LoopAug: loop-closed training sequences from an on-disk multi-view dataset (DESIGN.md section 2).
A camera path that goes somewhere and comes back should show, on its return, what it showed on
the way out; these sequences are built so that the ground truth does exactly that.

    python data.py --out data/synth --scenes 16                       # a multi-view dataset
    python loopaug.py --data data/synth --out data/loops --loops 32   # a loop dataset + preview.mp4
    python distill.py --data data/synth --loopaug 0.5                 # half the rollouts are loops

- Palindromic loops: a clip of L synchronized (source, target) frames followed by its reverse,
  source, target and relative poses mirrored together (frames 0..L-1, L-2..0), `laps` times: the
  last frame equals the first, and frame i equals frame 2L-2-i. The sampler walks a clip out and
  back in exactly T frames (closed_walk: one step of two frames on the way back when T is even).
- Camera-cycle loops: the source camera stays; the target moves through k other cameras of the
  scene and back to the first one (c1, c2, ..., ck, c1), `hold` frames at each (the sampler
  spreads T frames over the stops, one more at the first ones), at frozen time (every source
  frame the same instant) or with time advancing `advance` frames a step up to the middle of the
  route and running back, so that the last frame is the first one again.
The sampler's loops fill their T frames: no frame is appended by holding the last one (the
source would freeze at the end of the clip, and the loss would train on frozen frames).

A loop sequence is a dict like a training clip: src, tgt (N, 3, H, W), rel (N, 4, 4),
K_src, K_tgt (N, 4), key (N,) (equal keys: the same target camera and instant), plus `pairs`:
the (i, j) indices that share a key, i.e. show the same pose and instant.
"""
import json
import os

import torch

import camera
import data
import render
from common import ArgumentParser, check_args, check_out_dir, fail, hold_out_dir


def select(seq, idx):
    """Frames idx (a list) of a sequence; pairs recomputed: (i, j), i < j, whose frames share a
    key, i.e. show the same target camera, pose and instant."""
    out = {k: v[idx] for k, v in seq.items() if torch.is_tensor(v)}
    key = out["key"].tolist()
    out["pairs"] = [(i, j) for i in range(len(idx)) for j in range(i + 1, len(idx)) if key[i] == key[j]]
    return out


def palindrome(clip, laps=1):
    """Mirror a clip (dict of per-frame tensors) into an out-and-back loop, `laps` times."""
    L = clip["src"].shape[0]
    lap = list(range(L)) + list(range(L - 2, -1, -1))                 # 0..L-1, L-2..0
    idx = lap + [i for _ in range(laps - 1) for i in lap[1:]]
    return select(dict(clip, key=torch.arange(L)), idx)


def closed_walk(T, N):
    """T >= 3 frame indices of a clip of N >= 2 frames that go out and back from 0 to 0 in as few
    laps as fit, consecutive indices one apart but for one step of two in a lap of an odd number
    of steps (single steps alone cannot close one), so that no frame repeats the one before.
    (N = 2 and T even: the last 0 is held, the only way there.)"""
    S, idx = T - 1, [0]
    laps = -(-S // (2 * (N - 1)))
    for k in range(laps):
        s = S // laps + (k < S % laps)                                  # steps of this lap
        up = (s + 1) // 2
        down = list(range(up - 1, -1, -1))
        if s == 1:                                                      # N = 2: no step of two fits
            idx.append(0)
            continue
        if s % 2:
            down.remove(up - 1)                                         # the step of two, at the top
        idx += list(range(1, up + 1)) + down
    return idx


def spread(T, stops):
    """Frames at each of `stops` stops so that they add up to T: T // stops, one more at the first
    T % stops."""
    return [T // stops + (i < T % stops) for i in range(stops)]


def camera_cycle(scene, src_cam, cams, f0, hold=1, advance=0, laps=1):
    """Target visits cams[0], ..., cams[-1] and returns to cams[0]; the source camera src_cam
    stays. scene: load_scene() dict. hold: frames at each stop (an int, or a list, one a stop). Frame time: frozen at f0 (advance 0), or advancing
    `advance` frames a step up to the middle of the route and running back, so the last frame
    shows cams[0] at the first frame's instant: the loop closes in pose and in time."""
    route = [c for _ in range(laps) for c in cams] + [cams[0]]
    holds = [hold] * len(route) if isinstance(hold, int) else hold    # a list: frames at each stop
    tcam = torch.tensor([c for c, h in zip(route, holds) for _ in range(h)])
    n, T = len(tcam), scene["frames"].shape[1]
    s = torch.arange(n)
    f = (f0 + advance * torch.minimum(s, n - 1 - s)).clamp(max=T - 1)   # time: up, then back
    c2w_s, c2w_t = scene["c2w"][src_cam, f], scene["c2w"][tcam, f]
    seq = dict(src=scene["frames"][src_cam, f], tgt=scene["frames"][tcam, f],
               rel=camera.relative_pose(c2w_s, c2w_t), K_src=scene["K"][src_cam].expand(n, 4),
               K_tgt=scene["K"][tcam], key=tcam * T + f)                 # same key: same camera, same instant
    return select(seq, list(range(n)))


class LoopSampler:
    """Draws loop sequences of exactly T >= 3 pairs from a multi-view dataset (half palindromes,
    half camera cycles), for distill.py --loopaug. Every loop closes: its `pairs` (at least the
    first and the last frame) show the same pose and the same instant."""

    def __init__(self, root, size, scenes=None):
        self.scenes = scenes if scenes is not None else data.MultiViewDataset(root, size).scenes

    def loop(self, g, T, kind=None):
        assert T >= 3, "a loop needs at least 3 frames (out, somewhere else, back)"
        sc = self.scenes[int(torch.randint(len(self.scenes), (1,), generator=g))]
        C, N = sc["frames"].shape[:2]
        kind = kind or ("palindrome" if torch.rand(1, generator=g) < 0.5 else "cycle")
        kind = kind if C >= 3 else "palindrome"                            # a cycle needs 2 other cameras
        a = int(torch.randint(C, (1,), generator=g))
        if kind == "palindrome":
            L = min(T // 2 + 1, N)                                         # one lap out and back if the clip is long enough
            b = int(torch.randint(C, (1,), generator=g))
            f0 = int(torch.randint(0, N - L + 1, (1,), generator=g))
            sl = slice(f0, f0 + L)
            clip = dict(src=sc["frames"][a, sl], tgt=sc["frames"][b, sl], rel=camera.relative_pose(sc["c2w"][a, sl], sc["c2w"][b, sl]),
                        K_src=sc["K"][a].expand(L, 4), K_tgt=sc["K"][b].expand(L, 4), key=torch.arange(L))
            return select(clip, closed_walk(T, L))                        # exactly T frames, none held
        others = [c for c in torch.randperm(C, generator=g).tolist() if c != a]
        k = min(len(others), T - 1)                                       # the route: k + 1 stops <= T
        advance = int(torch.randint(0, 2, (1,), generator=g))              # frozen or advancing
        peak = (T - 1) // 2                                                # frames time runs ahead
        advance = advance if peak < N else 0                               # a scene too short: never clamp time
        f0 = int(torch.randint(0, max(1, N - advance * peak), (1,), generator=g))
        return camera_cycle(sc, a, others[:k], f0, hold=spread(T, k + 1), advance=advance)   # exactly T frames

    def batch(self, step, pairs, max_pairs, seed=0, rank=0):
        g = data.rng(seed, step, rank, 2)    # tag 2: loops
        T = int(torch.randint(3, max(3, max_pairs) + 1, (1,), generator=g))
        return data.collate([self.loop(g, T) for _ in range(max(1, pairs // T))])


def repeat_laps(seq, laps):
    """A closed loop (last frame = first frame) run `laps` times: N + (laps - 1)(N - 1) frames."""
    n = seq["src"].shape[0]
    return select(seq, list(range(n)) + [i for _ in range(laps - 1) for i in range(1, n)])


def write_loop(dirpath, seq, fps=render.FPS):
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
    p = ArgumentParser(description="Write a LoopAug dataset from a multi-view dataset.")
    p.add_argument("--data", type=str, default="data/synth", help="on-disk multi-view dataset folder (data.py format)")
    p.add_argument("--out", type=str, default="data/loops", help="output folder (created if missing)")
    p.add_argument("--loops", type=int, default=16, help="number of loops (palindromes and camera cycles in turn)")
    p.add_argument("--frames", type=int, default=17, help="frames of one lap, out and back (at least 3)")
    p.add_argument("--laps", type=int, default=1, help="laps of each loop")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (square, even: H.264)")
    p.add_argument("--seed", type=int, default=0, help="seed of the loops drawn")
    args = p.parse_args()
    check_args(args, positive=("loops", "frames", "laps", "size"))
    if args.frames < 3:
        fail(f"--frames must be at least 3 (out, somewhere else, back), got {args.frames}")
    if args.size % 2:
        fail(f"--size must be even (H.264 frames have even sides), got {args.size}")
    check_out_dir(args.out)
    try:
        sampler = LoopSampler(args.data, args.size)
    except (OSError, ValueError) as e:
        fail(e)
    hold_out_dir(args.out)                                 # refused if another live run writes there
    g = torch.Generator().manual_seed(args.seed)
    preview = []
    for i in tqdm(range(args.loops), desc="loops"):
        seq = repeat_laps(sampler.loop(g, args.frames, "palindrome" if i % 2 == 0 else "cycle"), args.laps)
        write_loop(os.path.join(args.out, f"loop_{i:05d}"), seq)
        if len(preview) < 4:
            preview.append(data.side_by_side(seq["src"], seq["tgt"]))
    n = max(len(v) for v in preview)
    pad = lambda v: torch.cat([v, v[-1:].expand(n - len(v), -1, -1, -1)])
    data.write_video(os.path.join(args.out, "preview.mp4"), torch.cat([pad(v) for v in preview], -2), render.FPS, upscale=4)
    print(f"wrote {args.loops} loops of {seq['src'].shape[0]} frames to {args.out} "
          f"(preview: {os.path.join(args.out, 'preview.mp4')}; each: src.mp4 | tgt.mp4 | loop.json)")
