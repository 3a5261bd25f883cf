"""
Data for RealCam-min: the training stream (clips of the synthetic world, camera.py and
render.py), video I/O, the on-disk multi-view format and MultiCamVideo's conversion into it.
Pixels are float in [-1, 1], videos (T, 3, H, W) or (B, T, 3, H, W).

Write a small multi-view dataset (one mp4 per camera + cameras.json per scene) and a preview:
    python data.py --out data/synth --scenes 8
Convert MultiCamVideo scenes into the same format:
    python data.py --multicam MultiCamVideo-Dataset/train/f24_aperture5 --out data/mcv --size 64 --fx 0.9
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from camera import PRESETS, preset_path, random_path, relative_pose
from common import ArgumentParser, check_args, check_out_dir, fail, hold_out_dir
from render import FPS, clip_spec, render_clip, render_clips, source_path

# -----------------------------------------------------------------------------
# the training stream: (source clip, target clip, relative pose, intrinsics)

P_STATIC = 0.1   # share of training clips whose target camera is the source camera (an exact copy)


def sample_spec(seed, n, p_static=P_STATIC):
    """One training clip, before rendering (clip_spec): random scene, random source motion, and a
    target path: the identity (a share p_static of the clips: the model must return its input
    exactly), a preset family (random magnitude, random window of a longer path) or a random
    smooth path."""
    g = torch.Generator().manual_seed(int(seed))
    long = n + int(torch.randint(0, 16, (1,), generator=g))
    u = torch.rand(1, generator=g).item()
    if u < p_static:
        rel, zoom = preset_path("static", long)
    elif u < 0.5 + p_static / 2:
        name = PRESETS[int(torch.randint(len(PRESETS), (1,), generator=g))]
        rel, zoom = preset_path(name, long, scale=0.3 + 1.0 * torch.rand(1, generator=g).item())
    else:
        rel, zoom = random_path(long, g)
    start = int(torch.randint(0, long - n + 1, (1,), generator=g))
    fx = 0.8 + 0.4 * torch.rand(1, generator=g).item()
    return clip_spec(seed, n, rel[start:start + n], zoom[start:start + n], gen=g, t0=start / FPS, fx=fx)


def sample_clip(seed, n, H, W, ss=2, p_static=P_STATIC, device="cpu"):
    """One training clip (sample_spec), rendered on `device`."""
    return render_clips([sample_spec(seed, n, p_static)], H, W, ss, depth=False, device=device)[0]


def rng(*ints):
    """A torch.Generator seeded by a tuple of integers, the same in every process (Python salts
    the hash of strings per process, so tags are integers: resumed and DDP runs must agree)."""
    assert all(isinstance(i, int) for i in ints), f"rng() takes integers, got {ints}"
    return torch.Generator().manual_seed(hash(ints) % 2 ** 31)


KEYS = ("src", "tgt", "rel", "K_src", "K_tgt")          # a training clip
DEPTH_KEYS = KEYS + ("depth_src", "depth_tgt")         # and its depth, where the data has it


def collate(clips, keys=KEYS):
    return {k: torch.stack([c[k] for c in clips]) for k in keys}


def clip_length(step, max_pairs, seed=0):
    """Pairs a clip (1..max_pairs) at a training step, the same for every process: the draw of
    rank 0's generator, so the ranks of a DDP step carry equal work (none waits for a longer
    clip) and a single process keeps the stream it always had."""
    return int(torch.randint(1, max_pairs + 1, (1,), generator=rng(seed, step, 0)))


def synthetic_batch(step, pairs, max_pairs, H, W, seed=0, rank=0, p_static=P_STATIC, device="cpu", depth=False):
    """The batch of training step `step`: a pure function of (seed, step, rank), so resumed runs
    see exactly the data an uninterrupted run would. T pairs a clip (clip_length: shared by all
    ranks) and pairs // T clips, so every step carries about the same number of tokens.
    Rendered on `device` (the training device: rendering on the CPU would starve a GPU), all
    clips in one batched pass; with depth, also depth_src and depth_tgt (the same pixels)."""
    g = rng(seed, step, rank)
    T = int(torch.randint(1, max_pairs + 1, (1,), generator=g))   # rank 0's draw is every rank's T
    T = clip_length(step, max_pairs, seed) if rank else T
    B = max(1, pairs // T)
    seeds = torch.randint(0, 2 ** 31 - 1, (B,), generator=g).tolist()   # training scenes < 2**31
    clips = render_clips([sample_spec(s, T, p_static) for s in seeds], H, W, depth=depth, device=device)
    return collate(clips, DEPTH_KEYS if depth else KEYS)

# -----------------------------------------------------------------------------
# video I/O (PyAV through imageio): frame-by-frame, centre-crop + resize

class VideoError(ValueError):
    pass


def read_video(path, size=None, max_frames=None):
    """Yield frames of any video ffmpeg reads, one at a time, as (3, size, size) float in
    [-1, 1] (centre-cropped to square and resized; grayscale becomes RGB). Never holds the
    whole video in memory. Raises VideoError with the path on a missing or unreadable file."""
    import imageio.v3 as iio
    check_video_path(path)
    count = 0
    try:
        for frame in iio.imiter(path, plugin="pyav"):
            if max_frames is not None and count >= max_frames:
                break
            yield to_model_frame(frame, size)
            count += 1
    except VideoError:
        raise
    except Exception as e:  # PyAV raises many kinds of errors for damaged files
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if count == 0:
        raise VideoError(f"video has no frames: {path}")


def check_video_path(path):
    if os.path.isdir(path):
        raise VideoError(f"{path} is a folder, not a video file")
    if not os.path.isfile(path):
        raise VideoError(f"video not found: {path}")


def video_fps(path):
    import av
    check_video_path(path)
    try:
        with av.open(path) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else 8.0
    except Exception as e:
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None


def probe_video(path):
    """(frame rate, frames its header declares or 0, whether that count is exact) of a video file: a
    header with no frame count but a duration (Matroska) gives the frames that duration holds at that
    rate, about.
    VideoError for a missing or unreadable file, and for an image (one picture is not a video)."""
    import av
    fps = video_fps(path)
    try:
        with av.open(path) as c:
            fmt, declared = c.format.name, c.streams.video[0].frames
            exact = bool(declared)
            if not declared and c.duration and len(c.streams) == 1 and fmt != "image2" and not fmt.endswith("_pipe"):
                declared = round(c.duration / 1e6 * fps)   # the video's duration (Matroska, WebM; no audio track)
    except Exception as e:
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise VideoError(f"{path} is an image ({fmt.replace('_pipe', '')}), not a video: stream.py needs a "
                         "video (to stream a still scene, make a video of it, e.g. with ffmpeg -loop 1)")
    return fps, declared, exact


def video_source(path, size, info, loop=False):
    """The frames of a video, one at a time (from the start again at its end if loop). info['read']
    counts them; a file that ends before the frames its header declares (info['declared'], exact or
    from its duration) is damaged: VideoError, as for a file that breaks mid-stream."""
    while True:
        n = 0
        for frame in read_video(path, size):
            n += 1
            info["read"] += 1
            yield frame
        want = info["declared"]
        if info["exact"] and n < want:
            raise VideoError(f"{path} ended after {n} of the {want} frames its header declares: "
                             "the file is truncated or damaged")
        if not info["exact"] and n < want - max(2, want // 20):      # a duration: a few frames of slack
            raise VideoError(f"{path} ended after {n} of the about {want} frames its header's duration holds: "
                             "the file is truncated or damaged")
        if not loop:
            return
        info["loops"] += 1


def to_model_frame(frame, size=None):
    """uint8 (H, W), (H, W, 1|3|4) -> float (3, size, size) in [-1, 1], centre crop + area resize."""
    x = torch.as_tensor(np.asarray(frame))
    if x.ndim == 2:
        x = x[..., None]
    x = x[..., :3].permute(2, 0, 1).float() / 127.5 - 1
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if size is not None:
        h, w = x.shape[-2:]
        m = min(h, w)
        x = x[:, (h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
        x = F.interpolate(x[None], size=(size, size), mode="area" if m >= size else "bilinear")[0]
    return x


def to_uint8(x):
    """[-1, 1] float (..., 3, H, W) -> uint8 (..., H, W, 3) numpy."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


class VideoWriter:
    """Write frames one at a time to an mp4 (H.264). Frames: (3, H, W) in [-1, 1] or uint8 HWC.
    quality "high" or "low" (crf 10 or 20, YUV 4:2:0: for viewing) or "lossless" (RGB H.264 at
    qp 0: the pixels read back exactly, for datasets). Every frame written is in the file once
    close() runs (use as a context manager)."""

    def __init__(self, path, fps=8.0, quality="high", upscale=1):
        import av
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.fps, self.upscale = path, fps, upscale
        self.container, self.stream = av.open(path, "w"), None
        self.lossless = quality == "lossless"
        self.opts = {"qp": "0"} if self.lossless else {"crf": "10" if quality == "high" else "20"}

    def write(self, frame):
        import av
        if torch.is_tensor(frame):
            frame = to_uint8(frame)
        if self.upscale > 1:
            frame = frame.repeat(self.upscale, 0).repeat(self.upscale, 1)
        h, w = frame.shape[:2]
        frame = np.ascontiguousarray(frame[: h - h % 2, : w - w % 2])   # H.264 needs even sizes
        if self.stream is None:
            from fractions import Fraction
            codec = "libx264rgb" if self.lossless else "libx264"
            self.stream = self.container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1000))
            self.stream.width, self.stream.height = frame.shape[1], frame.shape[0]
            self.stream.pix_fmt, self.stream.options = "rgb24" if self.lossless else "yuv420p", self.opts
        for pkt in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(pkt)

    def close(self):
        if self.stream is not None:
            for pkt in self.stream.encode():
                self.container.mux(pkt)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path, frames, fps=8.0, upscale=1, quality="high"):
    """Write a sequence of frames (T, 3, H, W) in [-1, 1] to mp4 (quality: see VideoWriter)."""
    with VideoWriter(path, fps, quality, upscale) as w:
        for f in frames:
            w.write(f)


def side_by_side(*videos, gap=1):
    """Concatenate videos (T, 3, H, W) along width with a gap of white pixels."""
    T, _, H, _ = videos[0].shape
    bar = torch.ones(T, 3, H, gap)
    parts = []
    for v in videos:
        parts += [v.cpu(), bar]
    return torch.cat(parts[:-1], -1)

# -----------------------------------------------------------------------------
# on-disk multi-view format
#
#   DIR/scene_00000/cam00.mp4 ... camNN.mp4   one video per camera, same frame count
#   DIR/scene_00000/cameras.json              {"fps": 8.0, "width": W, "height": H, "frames": T,
#                                              "cameras": [{"name": "cam00", "file": "cam00.mp4",
#                                                           "K": [fx, fy, cx, cy] (normalized),
#                                                           "c2w": [T x 4x4 OpenCV cam-to-world]}],
#                                              "depth": "depth.npy"}   (optional)
#   DIR/scene_00000/depth.npy                 (optional) z-depth (C, T, H, W) float16, inf for sky:
#                                              the warp head's depth target (teacher.py, distill.py)

def write_scene(dirpath, frames, c2w, K, fps=FPS, depth=None):
    """frames (C, T, 3, H, W), c2w (C, T, 4, 4), K (C, 4) -> one lossless mp4 per camera (the
    pixels read back exactly, to 8 bits) + cameras.json; depth (C, T, H, W), if given, ->
    depth.npy (float16: 3 significant digits, what the plane weights need)."""
    os.makedirs(dirpath, exist_ok=True)
    C, T, _, H, W = frames.shape
    cams = []
    for c in range(C):
        name = f"cam{c:02d}"
        write_video(os.path.join(dirpath, name + ".mp4"), frames[c], fps, quality="lossless")   # training targets: exact
        cams.append(dict(name=name, file=name + ".mp4", K=K[c].tolist(), c2w=c2w[c].tolist()))
    meta = dict(fps=fps, width=W, height=H, frames=T, cameras=cams)
    if depth is not None:
        np.save(os.path.join(dirpath, "depth.npy"), depth.float().cpu().numpy().astype(np.float16))
        meta["depth"] = "depth.npy"
    with open(os.path.join(dirpath, "cameras.json"), "w") as f:
        json.dump(meta, f)


def load_depth(path, shape, size):
    """A scene's depth.npy (C, T, H, W) -> float (C, T, size, size) (nearest: depth is not averaged
    across an edge), or an error naming the file if it does not match the scene's videos."""
    try:
        z = torch.from_numpy(np.load(path).astype(np.float32))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read depth file {path}: {e}") from None
    if z.ndim != 4 or z.shape[:2] != shape[:2] or z.shape[2] != z.shape[3]:
        raise ValueError(f"depth file {path} has shape {tuple(z.shape)}; the scene's videos ask for "
                         f"({shape[0]}, {shape[1]}, side, side)")
    return F.interpolate(z, size=(size, size), mode="nearest") if size and size != z.shape[-1] else z


def load_scene(dirpath, size=None):
    """Load one scene of the on-disk format -> dict(frames (C, T, 3, S, S), c2w (C, T, 4, 4),
    K (C, 4), fps, and depth (C, T, S, S) if the scene has it). Errors name the offending file."""
    meta_path = os.path.join(dirpath, "cameras.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"missing camera file: {meta_path}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cams = meta["cameras"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"malformed camera file {meta_path}: {e}") from None
    frames, c2ws, Ks = [], [], []
    for cam in cams:
        path = os.path.join(dirpath, cam["file"])
        video = list(read_video(path, size))
        c2w = torch.tensor(cam["c2w"], dtype=torch.float32)
        if len(video) != len(c2w):
            raise ValueError(f"frame count mismatch: {path} has {len(video)} frames but "
                             f"{meta_path} lists {len(c2w)} poses for {cam['name']}")
        frames.append(torch.stack(video)), c2ws.append(c2w), Ks.append(torch.tensor(cam["K"]))
    T = {len(f) for f in frames}
    if len(T) != 1:
        raise ValueError(f"cameras of {dirpath} have different frame counts: {sorted(T)}")
    check_cameras(meta_path, [c.get("name", c["file"]) for c in cams], c2ws, Ks)
    sc = dict(frames=torch.stack(frames), c2w=torch.stack(c2ws), K=torch.stack(Ks), fps=meta.get("fps", FPS))
    if meta.get("depth"):
        sc["depth"] = load_depth(os.path.join(dirpath, meta["depth"]), sc["frames"].shape, size)
    return sc


def check_cameras(meta_path, names, c2ws, Ks):
    """A scene that can train: two cameras at least (a pair is a camera and another view of the
    same instant), finite poses and intrinsics (one NaN turns the loss, then every weight, to NaN)."""
    if len(names) < 2:
        raise ValueError(f"{meta_path} lists {len(names)} camera{'s' * (len(names) != 1)}: a scene needs at least "
                         "two synchronized cameras (training pairs a camera with another view of the same moment)")
    for name, c2w, K in zip(names, c2ws, Ks):
        bad = ~torch.isfinite(c2w).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"{meta_path}: camera {name}, frame {int(bad.nonzero()[0])}: the pose has a NaN or "
                             "infinite entry")
        if not (torch.isfinite(K).all() and (K[:2] > 0).all()):
            raise ValueError(f"{meta_path}: camera {name}: the intrinsics {K.tolist()} must be finite, fx and fy positive")


def list_scenes(root):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    scenes = sorted(os.path.join(root, d) for d in os.listdir(root)
                    if os.path.isfile(os.path.join(root, d, "cameras.json")))
    if not scenes:
        raise FileNotFoundError(f"no scenes (subfolders with cameras.json) in {root}")
    return scenes


class MultiViewDataset:
    """Training pairs from an on-disk multi-view dataset: pick a scene, a source camera, a
    target camera (the source's own one time in C: the identity path) and a window of T frames;
    the pose of the target is expressed relative to the source camera frame by frame. Scenes are decoded once and kept in memory."""

    def __init__(self, root, size):
        from concurrent.futures import ThreadPoolExecutor
        from tqdm import tqdm
        dirs = list_scenes(root)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:   # PyAV decodes without the GIL
            self.scenes = list(tqdm(pool.map(lambda d: load_scene(d, size), dirs), total=len(dirs), unit="scene",
                                    desc=f"loading {root}", leave=False, disable=None))
        self.depth = all("depth" in sc for sc in self.scenes)

    def clip(self, g, T):
        sc = self.scenes[int(torch.randint(len(self.scenes), (1,), generator=g))]
        C, N = sc["frames"].shape[:2]
        if N < T:
            raise ValueError(f"scene has {N} frames, fewer than the {T} pairs asked for")
        a = int(torch.randint(C, (1,), generator=g))
        b = int(torch.randint(C, (1,), generator=g))
        f0 = int(torch.randint(0, N - T + 1, (1,), generator=g))
        sl = slice(f0, f0 + T)
        clip = dict(src=sc["frames"][a, sl], tgt=sc["frames"][b, sl],
                    rel=relative_pose(sc["c2w"][a, sl], sc["c2w"][b, sl]),
                    K_src=sc["K"][a].expand(T, 4), K_tgt=sc["K"][b].expand(T, 4))
        if self.depth:
            clip.update(depth_src=sc["depth"][a, sl], depth_tgt=sc["depth"][b, sl])
        return clip

    def batch(self, step, pairs, max_pairs, seed=0, rank=0):
        """src, tgt, rel, K_src, K_tgt and, when every scene has depth, depth_src and depth_tgt."""
        g = rng(seed, step, rank)
        T = int(torch.randint(1, max_pairs + 1, (1,), generator=g))
        T = clip_length(step, max_pairs, seed) if rank else T           # one T for all ranks
        return collate([self.clip(g, T) for _ in range(max(1, pairs // T))], DEPTH_KEYS if self.depth else KEYS)


def synth_multiview_scene(seed, n_cams, T, size, ss=2):
    """A scene of the synthetic world seen by n_cams synchronized cameras: camera 0 is a source
    path, the others ride on it with random smooth relative paths. Returns frames (C, T, 3, S, S),
    c2w (C, T, 4, 4), K (C, 4) and z-depth (C, T, S, S)."""
    g = torch.Generator().manual_seed(int(seed))
    base = source_path(T, g)
    frames, c2ws, depth = [], [], []
    for c in range(n_cams):
        rel, _ = preset_path("static", T) if c == 0 else random_path(T, g)
        clip = render_clip(seed, T, size, size, rel=rel, src_c2w=base, ss=ss, gen=g)
        frames.append(clip["tgt"]), c2ws.append(base @ rel), depth.append(clip["depth_tgt"])
    K = torch.tensor([1.0, 1.0, 0.5, 0.5]).repeat(n_cams, 1)
    return torch.stack(frames), torch.stack(c2ws), K, torch.stack(depth)

# -----------------------------------------------------------------------------
# MultiCamVideo (synchronized rendered cameras a scene) -> the on-disk format

def multicam_c2w(matrix):
    """One MultiCamVideo extrinsic ("[a b c d] [e f g h] ..." or nested lists; Unreal Engine:
    row-vector convention, x forward, y right, z up, centimetres) -> OpenCV camera-to-world 4x4
    (x right, y down, z forward) in metres."""
    if isinstance(matrix, str):
        matrix = [[float(v) for v in row.split()] for row in matrix.replace("[", " ").split("]") if row.strip()]
    m = torch.tensor(matrix, dtype=torch.float32).reshape(4, 4).T     # column-vector convention
    c2w = m[:, [1, 2, 0, 3]].clone()                                   # camera axes: right, up, forward
    c2w[:3, 1] *= -1                                                   # up -> down
    c2w[:3, 3] /= 100                                                  # cm -> m
    return c2w


def convert_multicam(scene_dir, out_dir, fx, size=64, every=1):
    """One MultiCamVideo scene (videos/camNN.mp4 and cameras/camera_extrinsics.json,
    {"frame0": {"cam01": matrix, ...}, ...}) into the on-disk format: centre-cropped square
    frames of `size`, every `every`-th frame, intrinsics (fx, fx, 0.5, 0.5) with fx the focal
    length over the side of the square crop."""
    meta_path = os.path.join(scene_dir, "cameras", "camera_extrinsics.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"missing camera file: {meta_path}")
    with open(meta_path) as f:
        ext = json.load(f)
    names = sorted(ext["frame0"])
    n = len([k for k in ext if k.startswith("frame")])
    idx = list(range(0, n, every))
    frames, c2ws = [], []
    for name in names:
        video = list(read_video(os.path.join(scene_dir, "videos", name + ".mp4"), size, max_frames=n))
        if len(video) != n:
            raise ValueError(f"frame count mismatch: {scene_dir}/videos/{name}.mp4 has {len(video)} frames, "
                             f"{meta_path} has {n}")
        frames.append(torch.stack([video[i] for i in idx]))
        c2ws.append(torch.stack([multicam_c2w(ext[f"frame{i}"][name]) for i in idx]))
    K = torch.tensor([fx, fx, 0.5, 0.5]).repeat(len(names), 1)
    write_scene(out_dir, torch.stack(frames), torch.stack(c2ws), K)


# -----------------------------------------------------------------------------
# the dataset writer (python data.py)

def main():
    from tqdm import tqdm
    p = ArgumentParser(description="Write a synthetic multi-view dataset in the on-disk format, "
                                   "or convert MultiCamVideo scenes (--multicam) into it.")
    p.add_argument("--out", type=str, default="data/synth", help="output folder (created if missing)")
    p.add_argument("--scenes", type=int, default=8, help="number of scenes")
    p.add_argument("--cams", type=int, default=4, help="synchronized cameras a scene")
    p.add_argument("--frames", type=int, default=24, help="frames a camera")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (square, even: H.264)")
    p.add_argument("--seed", type=int, default=0, help="first scene seed (scene i uses seed + i)")
    p.add_argument("--multicam", type=str, default=None, help="convert the MultiCamVideo scenes under this folder")
    p.add_argument("--fx", type=float, default=None, help="--multicam: focal length / side of the square crop (unitless)")
    p.add_argument("--every", type=int, default=1, help="--multicam: keep every n-th frame")
    args = p.parse_args()
    check_args(args, positive=("scenes", "cams", "frames", "size", "every"))
    if args.cams < 2:
        fail(f"--cams must be at least 2 (training pairs a camera with another view of the same scene), got {args.cams}")
    if args.size % 2:
        fail(f"--size must be even (H.264 frames have even sides), got {args.size}")
    check_out_dir(args.out)
    hold_out_dir(args.out)                                 # refused if another live run writes there
    if args.multicam:
        return convert_multicam_all(args)
    preview = []
    for i in tqdm(range(args.scenes), desc="scenes"):
        frames, c2w, K, depth = synth_multiview_scene(args.seed + i, args.cams, args.frames, args.size)
        write_scene(os.path.join(args.out, f"scene_{i:05d}"), frames, c2w, K, depth=depth)
        if i < 4:
            preview.append(torch.cat(list(frames), -1))                 # cameras side by side
    write_video(os.path.join(args.out, "preview.mp4"), torch.cat(preview, -2), FPS, upscale=4)
    print(f"wrote {args.scenes} scenes x {args.cams} cameras x {args.frames} frames to {args.out} "
          f"(preview: {os.path.join(args.out, 'preview.mp4')})")


def convert_multicam_all(args):
    """python data.py --multicam DIR --fx F: every MultiCamVideo scene under DIR."""
    from tqdm import tqdm
    if args.fx is None:
        fail("--multicam needs --fx (focal length over the side of the square crop)")
    if not (math.isfinite(args.fx) and args.fx > 0):
        fail(f"--fx must be a positive number, got {args.fx}")
    if not os.path.isdir(args.multicam):
        fail(f"--multicam folder not found: {args.multicam}")
    found = sorted(os.path.dirname(root) for root, _, files in os.walk(args.multicam)
                   if "camera_extrinsics.json" in files)
    if not found:
        fail(f"no cameras/camera_extrinsics.json under {args.multicam}")
    for i, sc in enumerate(tqdm(found, desc="scenes")):
        try:
            convert_multicam(sc, os.path.join(args.out, f"scene_{i:05d}"), args.fx, args.size, args.every)
        except (OSError, ValueError, KeyError) as e:
            fail(e)
    print(f"converted {len(found)} scenes to {args.out}")


if __name__ == "__main__":
    main()
