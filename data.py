"""
Data for RealCam-min: camera math, a procedural multi-view world, the training stream,
the on-disk multi-view format and video I/O.

Write a small multi-view dataset (one mp4 per camera + cameras.json per scene) and a preview:
    python data.py --out data/synth --scenes 8
Convert MultiCamVideo scenes into the same format:
    python data.py --multicam MultiCamVideo-Dataset/train/f24_aperture5 --out data/mcv --size 64 --fx 0.9

Conventions (DESIGN.md section 3):
- Cameras are OpenCV: x right, y down, z forward. Poses are camera-to-world 4x4 (c2w).
- Intrinsics are (fx, fy, cx, cy) normalized by image width/height, so they do not depend on
  resolution. fx = 1.0 is a 53 degree horizontal field of view.
- The world is y-up with the ground at y = 0. Scene scale: the source camera looks at its
  subject from SUBJECT_DIST = 1.0 unit, and every trajectory preset is defined in that unit.
- The target camera of pair i is given RELATIVE to the source camera of pair i:
  rel_i = inv(c2w_src_i) @ c2w_tgt_i (a virtual rig riding on the source camera).
- Pixels are float in [-1, 1], videos are (T, 3, H, W) or (B, T, 3, H, W).
"""
import argparse
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

SUBJECT_DIST = 1.0  # distance from the source camera to the point it looks at (scene unit)

# -----------------------------------------------------------------------------
# camera math

def look_at(eye, target, up=(0.0, 1.0, 0.0)):
    """OpenCV camera-to-world (..., 4, 4) for cameras at `eye` looking at `target` (..., 3)."""
    eye, target = torch.as_tensor(eye, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    up = torch.as_tensor(up, dtype=torch.float32).expand_as(eye)
    z = F.normalize(target - eye, dim=-1)                  # forward
    x = F.normalize(torch.cross(z, up, dim=-1), dim=-1)    # right
    y = torch.cross(z, x, dim=-1)                          # down
    c2w = torch.zeros(eye.shape[:-1] + (4, 4))
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def invert_pose(c2w):
    """Rigid inverse: camera-to-world -> world-to-camera (and back)."""
    R, t = c2w[..., :3, :3], c2w[..., :3, 3:]
    out = torch.zeros_like(c2w)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def relative_pose(c2w_a, c2w_b):
    """Pose of camera b expressed in camera a's frame: inv(c2w_a) @ c2w_b."""
    return invert_pose(c2w_a) @ c2w_b


def rot_x(a):
    a = torch.as_tensor(a, dtype=torch.float32)
    c, s, o, z = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(a.shape + (3, 3))


def rot_y(a):
    a = torch.as_tensor(a, dtype=torch.float32)
    c, s, o, z = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(a.shape + (3, 3))


def make_pose(R=None, t=None, n=None):
    """Stack rotations (n, 3, 3) and translations (n, 3) into (n, 4, 4)."""
    n = n if n is not None else (R if R is not None else t).shape[0]
    P = torch.eye(4).repeat(n, 1, 1)
    if R is not None:
        P[:, :3, :3] = R
    if t is not None:
        P[:, :3, 3] = t
    return P


def pixel_rays(c2w, K, H, W):
    """World-space ray origins and unit directions (..., H, W, 3) for pixel centres."""
    fx, fy, cx, cy = K.unbind(-1)
    v, u = torch.meshgrid((torch.arange(H, device=c2w.device) + 0.5) / H,
                          (torch.arange(W, device=c2w.device) + 0.5) / W, indexing="ij")
    x = (u - cx[..., None, None]) / fx[..., None, None]    # (..., H, W)
    y = (v - cy[..., None, None]) / fy[..., None, None]
    d_cam = torch.stack([x, y, torch.ones_like(x)], -1)    # (..., H, W, 3)
    d = F.normalize(torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam), dim=-1)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return o, d


def plucker(c2w, K, H, W):
    """Plucker ray map (..., 6, H, W): (o x d, d) for each pixel of a camera (c2w, K)."""
    o, d = pixel_rays(c2w, K, H, W)
    return torch.cat([torch.cross(o, d, dim=-1), d], -1).movedim(-1, -3)


def reproject(depth_tgt, rel, K_src, K_tgt):
    """Where each target pixel's scene point lands in the source camera.
    depth_tgt (..., H, W) z-depth (inf: sky, a point at infinity), rel (..., 4, 4) target pose in
    the source frame, K_* (..., 4). Returns the normalized source image position (..., H, W, 2)
    in [0, 1] when inside, the point's inverse z-depth in the source (..., H, W) (0 at infinity)
    and whether it lies in front of the source camera (..., H, W)."""
    H, W = depth_tgt.shape[-2:]
    fx, fy, cx, cy = (k[..., None, None] for k in K_tgt.unbind(-1))
    v, u = torch.meshgrid((torch.arange(H, device=depth_tgt.device) + 0.5) / H,
                          (torch.arange(W, device=depth_tgt.device) + 0.5) / W, indexing="ij")
    rho = 1 / depth_tgt                                                 # inverse depth, 0 for sky
    X = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(depth_tgt), rho], -1)   # homogeneous point
    Xs = torch.einsum("...ij,...hwj->...hwi", rel[..., :3, :], X)      # in the source frame, scaled by rho
    front = Xs[..., 2] > 1e-6
    z = Xs[..., 2].clamp(min=1e-6)
    fs, fys, cxs, cys = (k[..., None, None] for k in K_src.unbind(-1))
    uv = torch.stack([fs * Xs[..., 0] / z + cxs, fys * Xs[..., 1] / z + cys], -1)
    return uv, rho / z, front


def covisibility(depth_src, depth_tgt, rel, K_src, K_tgt, tol=0.03, far=100.0):
    """Co-visible target pixels: their scene point (target depth lifted to 3D) projects inside
    the source frame, in front of it, and is not occluded there (the source's depth at one of
    the 4 pixels around it agrees within a relative tol; sky, and anything beyond `far` where
    the haze has made it sky-coloured, matches sky). Also the grid that
    resamples the source at those points (the depth-warp oracle, F.grid_sample with
    align_corners=False). depth_* (..., H, W), rel (..., 4, 4), K_* (..., 4) ->
    mask (..., H, W) bool, grid (..., H, W, 2) in [-1, 1]."""
    H, W = depth_tgt.shape[-2:]
    uv, rho, front = reproject(depth_tgt, rel, K_src, K_tgt)
    inside = front & (uv[..., 0] >= 0) & (uv[..., 0] < 1) & (uv[..., 1] >= 0) & (uv[..., 1] < 1)
    flat = depth_src.flatten(-2)
    x0, y0 = (uv[..., 0] * W - 0.5).floor().long(), (uv[..., 1] * H - 0.5).floor().long()
    agree = torch.zeros_like(inside)
    for dy in (0, 1):                   # any of the 4 source pixels around the point agrees:
        for dx in (0, 1):               # depth edges fall between pixel centres
            i, j = (y0 + dy).clamp(0, H - 1), (x0 + dx).clamp(0, W - 1)
            rho_src = 1 / torch.gather(flat, -1, (i * W + j).flatten(-2)).view_as(rho)
            agree |= (rho - rho_src).abs() <= tol * torch.maximum(rho, rho_src) + 1 / far
    return inside & agree, uv * 2 - 1


def warp_source(src, grid):
    """The depth-warp oracle: src (..., 3, H, W) bilinearly resampled at grid (..., H, W, 2)."""
    lead = src.shape[:-3]
    out = F.grid_sample(src.flatten(0, -4), grid.flatten(0, -4), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(lead + out.shape[1:])


def pair_rays(rel, K_src, K_tgt, H, W):
    """Camera maps for interleaved pairs: source at identity (its intrinsics), target at rel.
    rel (B, T, 4, 4), K_* (B, T, 4) -> cam_src, cam_tgt, each (B, T, 6, H, W)."""
    eye = torch.eye(4, device=rel.device).expand_as(rel)
    return plucker(eye, K_src, H, W), plucker(rel, K_tgt, H, W)

# -----------------------------------------------------------------------------
# trajectory presets (DESIGN section 6), all relative to the live source camera

PRESETS = ["static", "orbit_left", "orbit_right", "orbit", "pan_left", "pan_right", "tilt_up",
           "tilt_down", "dolly_in", "dolly_out", "zoom_in", "zoom_out", "truck_left",
           "truck_right", "pedestal_up", "pedestal_down"]
# magnitudes, in degrees or subject distances (the project's choice: moderate moves, DESIGN section 6)
ORBIT_DEG, PAN_DEG, TILT_DEG, MOVE, ZOOM = 30.0, 20.0, 10.0, 0.5 * SUBJECT_DIST, 1.5
ORBIT_PIVOT = SUBJECT_DIST  # orbits turn around the point the source camera looks at


def ramp(n):
    """Smooth 0 -> 1 over n frames (zero slope at both ends); frame 0 is exactly 0."""
    u = torch.linspace(0, 1, n) if n > 1 else torch.zeros(1)
    return 0.5 - 0.5 * torch.cos(math.pi * u)


def camera_path(yaw=0.0, pitch=0.0, orbit=0.0, move=(0.0, 0.0, 0.0), zoom=1.0, n=None):
    """Relative pose (n, 4, 4) and focal scale (n,) from per-frame components (tensors of n):
    orbit (radians, around the pivot ORBIT_PIVOT ahead; positive moves the camera left),
    yaw/pitch (radians, rotation in place; positive yaw turns right, positive pitch tilts up),
    move (x right, y down, z forward, scene units), zoom (focal length multiplier)."""
    f = lambda a: torch.as_tensor(a, dtype=torch.float32).expand(n).clone()
    yaw, pitch, orbit, zoom = f(yaw), f(pitch), f(orbit), f(zoom)
    move = torch.stack([f(m) for m in move], -1)                     # (n, 3)
    pivot = torch.tensor([0.0, 0.0, ORBIT_PIVOT])
    Ro = rot_y(orbit)                                                 # orbit: p + Ro (x - p)
    t_orbit = pivot - Ro @ pivot
    R = Ro @ rot_y(yaw) @ rot_x(pitch)                                # then turn in place
    return make_pose(R, t_orbit + move), zoom


def preset_path(name, n, scale=1.0):
    """Relative poses (n, 4, 4) and focal scales (n,) for a named preset over n frames."""
    r, deg = ramp(n), math.pi / 180
    z = torch.zeros(n)
    r = r * scale if name != "orbit" else r
    table = {
        "static": {},
        "orbit_left": dict(orbit=ORBIT_DEG * deg * r), "orbit_right": dict(orbit=-ORBIT_DEG * deg * r),
        "orbit": dict(orbit=ORBIT_DEG * deg * torch.sin(2 * math.pi * r)),  # out left, across, back
        "pan_left": dict(yaw=-PAN_DEG * deg * r), "pan_right": dict(yaw=PAN_DEG * deg * r),
        "tilt_up": dict(pitch=TILT_DEG * deg * r), "tilt_down": dict(pitch=-TILT_DEG * deg * r),
        "dolly_in": dict(move=(z, z, MOVE * r)), "dolly_out": dict(move=(z, z, -MOVE * r)),
        "zoom_in": dict(zoom=ZOOM ** r), "zoom_out": dict(zoom=ZOOM ** -r),
        "truck_left": dict(move=(-MOVE * r, z, z)), "truck_right": dict(move=(MOVE * r, z, z)),
        "pedestal_up": dict(move=(z, -MOVE * r, z)), "pedestal_down": dict(move=(z, MOVE * r, z)),
    }
    if name not in table:
        raise ValueError(f"unknown trajectory '{name}': choose one of {', '.join(PRESETS)} or a .json file")
    return camera_path(n=n, **table[name])


def random_path(n, gen):
    """A random smooth relative path: every component ramps (or swings) within about the
    preset magnitudes, combined. Used for training diversity."""
    deg = math.pi / 180
    u = torch.linspace(0, 1, n) if n > 1 else torch.zeros(1)
    def comp(mag):
        a, b, w, ph = (torch.rand(4, generator=gen) * 2 - 1).tolist()
        # a ramp plus a slow swing, starting anywhere (training windows need not start at identity)
        return mag * (a * ramp(n) + 0.5 * b * torch.sin(math.pi * (1 + abs(w)) * u + math.pi * ph))
    on = (torch.rand(6, generator=gen) < 0.5).float().tolist()
    move = tuple(on[3] * comp(MOVE) * (torch.rand(1, generator=gen) < 0.5) for _ in range(3))
    return camera_path(n=n, orbit=on[0] * comp(ORBIT_DEG * deg), yaw=on[1] * comp(PAN_DEG * deg),
                       pitch=on[2] * comp(TILT_DEG * deg), move=move, zoom=ZOOM ** (on[4] * comp(1.0)))


def load_trajectory(path, n=None):
    """A JSON trajectory: a list of per-frame relative 4x4 poses (or {"poses": [...]}, optional
    "zoom": [...] focal multipliers). Shorter than n frames: the last pose holds; longer:
    truncated. Every pose must be finite and rigid (rotation orthonormal with det +1 within
    1e-3, last row 0 0 0 1) and every zoom finite and positive: anything else is a ValueError
    naming the file and the first bad frame (a NaN would poison the KV cache, a scaled matrix
    would be taken as some other camera)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read trajectory {path}: {e}") from None
    if isinstance(obj, dict) and "poses" not in obj:
        raise ValueError(f"trajectory {path}: a JSON object needs a \"poses\" list "
                         f"(keys found: {', '.join(obj) or 'none'})")
    poses = obj["poses"] if isinstance(obj, dict) else obj
    try:
        P = torch.tensor(poses, dtype=torch.float32)
        zoom = obj.get("zoom", [1.0] * len(P)) if isinstance(obj, dict) else [1.0] * len(P)
        zoom = torch.tensor(zoom, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"trajectory {path}: expected a list of 4x4 poses and a list of zoom numbers ({e})") from None
    if P.ndim != 3 or P.shape[1:] != (4, 4) or len(P) == 0:
        raise ValueError(f"trajectory {path}: expected a list of 4x4 poses, got shape {tuple(P.shape)}")
    if zoom.ndim != 1 or len(zoom) != len(P):
        raise ValueError(f"trajectory {path}: \"zoom\" needs one number a pose ({len(P)}), got shape {tuple(zoom.shape)}")
    bad = lambda mask, what: ValueError(f"trajectory {path}: frame {int(mask.nonzero()[0])} {what}")
    finite = torch.isfinite(P).flatten(1).all(1)
    if not finite.all():
        raise bad(~finite, "has a NaN or infinite entry")
    R = P[:, :3, :3]
    ortho = (R @ R.transpose(1, 2) - torch.eye(3)).abs().amax((1, 2)) <= 1e-3
    if not ortho.all():
        raise bad(~ortho, "is not a rigid pose: its rotation part is not orthonormal (scale or shear?)")
    det = torch.linalg.det(R) > 0
    if not det.all():
        raise bad(~det, "is not a rigid pose: its rotation part is a reflection (det -1)")
    last = (P[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0])).abs().amax(1) <= 1e-3
    if not last.all():
        raise bad(~last, "is not a rigid pose: its last row is not 0 0 0 1")
    zok = torch.isfinite(zoom) & (zoom > 0)
    if not zok.all():
        raise bad(~zok, f"has zoom {zoom[~zok][0].item()}: zoom must be finite and positive")
    if n is not None:
        idx = torch.arange(n).clamp(max=len(P) - 1)
        P, zoom = P[idx], zoom[idx]
    return P, zoom


def trajectory(name, n):
    """A preset name or a JSON path -> (rel (n, 4, 4), zoom (n,))."""
    return load_trajectory(name, n) if name.endswith(".json") else preset_path(name, n)

# -----------------------------------------------------------------------------
# procedural world: ground, sky, spheres and (yawed) boxes with solid textures, some moving

N_SPH, N_BOX = 3, 3


def make_scene(seed):
    """A random dynamic scene, deterministic per seed, as a dict of CPU tensors (render_clips moves
    them to the rendering device)."""
    g = torch.Generator().manual_seed(int(seed))
    rnd = lambda *s: torch.rand(*s, generator=g)
    n = N_SPH + N_BOX
    radius = 0.08 + 0.14 * rnd(n)                                      # size of each object
    ang, dist = rnd(n) * 2 * math.pi, 0.65 * rnd(n).sqrt()             # around the subject point
    center = torch.stack([dist * torch.cos(ang), radius, dist * torch.sin(ang)], -1)
    center[:, 1] += (rnd(n) < 0.3) * 0.15 * rnd(n)                     # some hover
    moving = rnd(n) < 0.5
    vel_dir = F.normalize(torch.randn(n, 3, generator=g) * torch.tensor([1.0, 0.2, 1.0]), dim=-1)
    amp = moving * (0.1 + 0.2 * rnd(n))                                # swing amplitude
    omega, phase = 1.0 + 2.0 * rnd(n), 2 * math.pi * rnd(n)
    half = radius[:, None] * (0.6 + 0.6 * rnd(n, 3))                   # box half sizes
    half[:, 1] = radius
    # materials: objects, then ground (index n); solid 3D textures of two colours
    colors = rnd(n + 1, 2, 3)
    colors[:n, 1] = colors[:n, 0] * 0.35 + 0.15 * rnd(n, 3)           # high contrast pattern
    colors[n] = torch.stack([0.35 + 0.4 * rnd(3), 0.15 + 0.3 * rnd(3)])
    freq = torch.cat([6 + 14 * rnd(n), 2 + 2 * rnd(1)])
    kind = torch.cat([(rnd(n) * 3).long(), torch.zeros(1, dtype=torch.long)])  # checker/stripes/rings
    sky = torch.stack([0.55 + 0.4 * rnd(3), 0.2 + 0.5 * rnd(3)])        # horizon, zenith
    light = F.normalize(torch.stack([rnd(1) - 0.5, 0.6 + 0.4 * rnd(1), rnd(1) - 0.5]).squeeze(-1), dim=0)
    return dict(center=center, vel_dir=vel_dir, amp=amp, omega=omega, phase=phase, radius=radius,
                half=half, yaw=rnd(n) * math.pi, colors=colors, freq=freq, kind=kind, sky=sky,
                light=light, wiggle=rnd(n + 1, 3) * 6)


def stack_scenes(scenes):
    """Scenes from make_scene -> one dict of tensors with a leading scene axis (S, ...)."""
    return {k: torch.stack([sc[k] for sc in scenes]) for k in scenes[0]}

# The ray caster works on S scenes at once: rays (S, R, 3) and times (S, R), scene tensors
# (S, ...). Every clip of a training batch is one scene with the same number of rays, so a batch
# is one pass of a few hundred tensor ops (a GPU renders it in milliseconds, where a loop over
# clips launches that many kernels per clip). Per-ray picks of per-object values: _take.


def _take(x, i):
    """x (S, R, k, ...) per-ray values of k objects, i (S, R) object ids -> (S, R, ...)."""
    idx = i.reshape(*i.shape, 1, *([1] * (x.ndim - 3))).expand(*i.shape, 1, *x.shape[3:])
    return x.gather(2, idx).squeeze(2)


def object_centers(scene, time):
    """(S, R, n, 3) centres of all objects of S scenes at per-ray times (S, R)."""
    swing = scene["amp"][:, None] * torch.sin(scene["omega"][:, None] * time[..., None] + scene["phase"][:, None])
    return scene["center"][:, None] + swing[..., None] * scene["vel_dir"][:, None]


def intersect(scene, o, d, time):
    """Nearest hit along rays o, d (S, R, 3) at times (S, R) in S scenes: distance (S, R),
    object id (S, R) (N_SPH + N_BOX = ground, -1 = sky), normal (S, R, 3), hit point in object
    coordinates (S, R, 3) and in the world (S, R, 3)."""
    S, R = o.shape[:2]
    inf = torch.full((), float("inf"), device=o.device)
    c = object_centers(scene, time)                                    # (S, R, n, 3)
    # spheres: |o + s d - c|^2 = r^2
    oc = o[:, :, None] - c[:, :, :N_SPH]
    b = (oc * d[:, :, None]).sum(-1)
    disc = b ** 2 - ((oc ** 2).sum(-1) - scene["radius"][:, None, :N_SPH] ** 2)
    s_sph = -b - disc.clamp(min=0).sqrt()
    s_sph = torch.where((disc > 0) & (s_sph > 1e-4), s_sph, inf)      # (S, R, N_SPH)
    # boxes: slab test in each box's frame (yawed about y)
    yaw = scene["yaw"][:, None, N_SPH:]                                # (S, 1, N_BOX)
    cy, sy = torch.cos(yaw).expand(S, R, N_BOX), torch.sin(yaw).expand(S, R, N_BOX)
    def to_box(v):  # rotate world vectors (S, R, nb, 3) into box frames
        return torch.stack([cy * v[..., 0] - sy * v[..., 2], v[..., 1], sy * v[..., 0] + cy * v[..., 2]], -1)
    ob = to_box(o[:, :, None] - c[:, :, N_SPH:])
    db = to_box(d[:, :, None].expand_as(ob))
    db = torch.where(db.abs() < 1e-8, torch.full_like(db, 1e-8), db)
    h = scene["half"][:, None, N_SPH:].expand(S, R, N_BOX, 3)
    t1, t2 = (-h - ob) / db, (h - ob) / db
    tnear, tfar = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
    s_box = torch.where((tnear < tfar) & (tnear > 1e-4), tnear, inf)  # (S, R, N_BOX)
    # ground plane y = 0
    s_gnd = torch.where(d[..., 1] < -1e-6, -o[..., 1] / d[..., 1].clamp(max=-1e-6), inf)[..., None]
    s_all = torch.cat([s_sph, s_box, s_gnd], -1)                       # (S, R, n + 1)
    s, idx = s_all.min(-1)
    hit = torch.isfinite(s)
    idx = torch.where(hit, idx, torch.full_like(idx, -1))
    # normals and object-space points
    s0 = s.where(hit, torch.zeros_like(s))[..., None]
    p = o + s0 * d
    si = idx.clamp(0, N_SPH - 1)
    n_sph = F.normalize(p - _take(c, si), dim=-1)
    bi = (idx - N_SPH).clamp(0, N_BOX - 1)
    pb = _take(ob, bi) + s0 * _take(db, bi)                            # box frame
    face = (pb / _take(h, bi)).abs().argmax(-1)
    nb_local = F.one_hot(face, 3).float() * torch.sign(pb.gather(-1, face[..., None]))
    cyb, syb = _take(cy, bi), _take(sy, bi)   # back to world: inverse yaw
    n_box = torch.stack([cyb * nb_local[..., 0] + syb * nb_local[..., 2], nb_local[..., 1],
                         -syb * nb_local[..., 0] + cyb * nb_local[..., 2]], -1)
    is_sph, is_box = (idx < N_SPH)[..., None], ((idx >= N_SPH) & (idx < N_SPH + N_BOX))[..., None]
    normal = torch.where(is_sph, n_sph, torch.where(is_box, n_box, n_box.new_tensor([0.0, 1.0, 0.0])))
    local = torch.where(is_sph, p - _take(c, si), torch.where(is_box, pb, p))
    return s, idx, normal, local, p


def shade(scene, d, idx, normal, local, p, time):
    """Lambertian colour in [0, 1] (S, R, 3) with solid textures, hard shadows and a sky gradient."""
    S = d.shape[0]
    m = idx.clamp(min=0)
    sc = torch.arange(S, device=d.device)[:, None]                     # (S, 1): each ray's scene
    freq = scene["freq"][sc, m]                                        # (S, R): the hit material's
    q = local * freq[..., None]
    kind = scene["kind"][sc, m]
    checker = (torch.floor(q).sum(-1) % 2)
    stripes = (torch.floor(q[..., 1] + 0.5 * q[..., 0]) % 2)
    rings = (torch.floor(local.norm(dim=-1) * freq * 1.5) % 2)
    pat = torch.where(kind == 0, checker, torch.where(kind == 1, stripes, rings))[..., None]
    colors = scene["colors"][sc, m]                                    # (S, R, 2, 3)
    col = colors[..., 0, :] * (1 - pat) + colors[..., 1, :] * pat
    col = col * (0.85 + 0.15 * torch.sin(local * scene["wiggle"][sc, m]).mean(-1, keepdim=True))
    L = scene["light"][:, None]                                        # (S, 1, 3)
    lam = (normal * L).sum(-1).clamp(min=0)
    s_sh, *_ = intersect(scene, p + 1e-3 * normal, L.expand_as(p), time)  # shadow ray
    lit = 0.35 + 0.65 * lam * (~torch.isfinite(s_sh)).float()
    col = col * lit[..., None]
    # sky: horizon -> zenith by elevation, plus a soft sun
    horizon, zenith = scene["sky"][:, None, 0], scene["sky"][:, None, 1]   # (S, 1, 3)
    el = d[..., 1].clamp(min=0)[..., None] ** 0.6
    sky = horizon * (1 - el) + zenith * el
    sky = sky + 0.4 * ((d * L).sum(-1).clamp(min=0) ** 64)[..., None]
    fog = 1 - torch.exp(-p.norm(dim=-1).clamp(max=1e3) / 4.0)[..., None]   # haze with distance from
    col = col * (1 - fog) + horizon * fog                              # the subject (view-independent)
    return torch.where((idx >= 0)[..., None], col, sky).clamp(0, 1)


@torch.no_grad()
def render_scenes(scene, c2w, K, time, H, W, ss=2, depth=True):
    """Render N views of each of S scenes (stack_scenes) in one pass: c2w (S, N, 4, 4), K (S, N, 4),
    time (S, N) in seconds -> rgb (S, N, 3, H, W) in [-1, 1] and z-depth (S, N, H, W) (inf for
    sky; None unless depth). ss x ss supersampling for anti-aliasing."""
    S, N = c2w.shape[:2]
    o, d = pixel_rays(c2w, K, H * ss, W * ss)                          # (S, N, Hs, Ws, 3)
    o, d = o.reshape(S, -1, 3), d.reshape(S, -1, 3)
    tr = time.repeat_interleave(H * ss * W * ss, dim=1)
    s, idx, normal, local, p = intersect(scene, o, d, tr)
    rgb = shade(scene, d, idx, normal, local, p, tr)
    rgb = rgb.reshape(S * N, H * ss, W * ss, 3).permute(0, 3, 1, 2)
    rgb = (F.avg_pool2d(rgb, ss) if ss > 1 else rgb).reshape(S, N, 3, H, W)
    # z-depth along the ray through each pixel's centre (between the supersamples when ss is even)
    if not depth:
        return rgb * 2 - 1, None
    if ss % 2 == 0:
        o, d = pixel_rays(c2w, K, H, W)
        o, d = o.reshape(S, -1, 3), d.reshape(S, -1, 3)
        s, *_ = intersect(scene, o, d, time.repeat_interleave(H * W, dim=1))
    else:
        d = d.view(S, N, H, ss, W, ss, 3)[:, :, :, ss // 2, :, ss // 2].reshape(S, -1, 3)
        s = s.view(S, N, H, ss, W, ss)[:, :, :, ss // 2, :, ss // 2].reshape(S, -1)
    fwd = c2w[:, :, None, :3, 2].expand(S, N, H * W, 3).reshape(S, -1, 3)
    return rgb * 2 - 1, (s * (d * fwd).sum(-1)).reshape(S, N, H, W)


def render(scene, c2w, K, time, H, W, ss=2, depth=True):
    """Render N views of one scene (make_scene): c2w (N, 4, 4), K (N, 4), time (N,) in seconds ->
    rgb (N, 3, H, W) in [-1, 1] and z-depth (N, H, W) (inf for sky; None unless depth)."""
    rgb, z = render_scenes(stack_scenes([scene]), c2w[None], K[None], time[None], H, W, ss, depth)
    return rgb[0], None if z is None else z[0]

# -----------------------------------------------------------------------------
# the training stream: (source clip, target clip, relative pose, intrinsics)

FPS = 8.0  # scene time between frames: 1 / FPS seconds


def source_path(n, gen):
    """Source camera c2w (n, 4, 4) in the world: looks at the subject from SUBJECT_DIST, and is
    static, panning, dollying or hand-held (smooth jitter)."""
    r = lambda: torch.rand(1, generator=gen).item()
    az, height = 2 * math.pi * r(), 0.15 + 0.45 * r()
    subject = torch.tensor([0.0, 0.1 + 0.1 * r(), 0.0])
    back = torch.tensor([math.cos(az), 0.0, math.sin(az)])
    eye = subject + back * math.sqrt(max(SUBJECT_DIST ** 2 - height ** 2, 0.1)) + torch.tensor([0, height, 0])
    base = look_at(eye, subject)
    motion = ["static", "pan", "dolly", "handheld"][int(r() * 4)]
    u = torch.arange(n, dtype=torch.float32) / FPS
    yaw, pitch, move = torch.zeros(n), torch.zeros(n), [torch.zeros(n) for _ in range(3)]
    if motion == "pan":
        yaw = (r() - 0.5) * 0.4 * u
    elif motion == "dolly":
        move[2] = (r() - 0.5) * 0.3 * u
    elif motion == "handheld":
        for a in (yaw, pitch, move[0], move[1]):
            f, ph = 2 + 3 * r(), 6.28 * r()
            a += 0.02 * torch.sin(f * u + ph)
    rel, _ = camera_path(yaw=yaw, pitch=pitch, move=tuple(move), n=n)
    return base @ rel


def clip_spec(seed, n, rel=None, zoom=None, src_c2w=None, t0=0.0, gen=None, fx=1.0, frozen=False):
    """What render_clip draws, before any ray is cast: the scene and both cameras of n frames."""
    gen = gen if gen is not None else torch.Generator().manual_seed(int(seed) + 1)
    scene = make_scene(seed)
    if frozen:
        scene["amp"].zero_()
    src_c2w = src_c2w if src_c2w is not None else source_path(n, gen)
    if rel is None:
        rel, zoom = preset_path("static", n)
    zoom = zoom if zoom is not None else torch.ones(n)
    K_src = torch.tensor([fx, fx, 0.5, 0.5]).repeat(n, 1)
    K_tgt = K_src.clone()
    K_tgt[:, :2] *= zoom[:, None]
    time = t0 + torch.arange(n, dtype=torch.float32) / FPS
    return dict(scene=scene, c2w=torch.cat([src_c2w, src_c2w @ rel]), K=torch.cat([K_src, K_tgt]),
                time=torch.cat([time, time]), rel=rel, K_src=K_src, K_tgt=K_tgt)


RAYS_A_PASS = {"cpu": 2 ** 17, "cuda": 2 ** 22}   # primary rays a batched pass (peak memory about 0.7 KB a ray)


def render_clips(specs, H, W, ss=2, depth=True, device="cpu"):
    """Render clips of one length (clip_spec) on `device`, as many a pass as RAYS_A_PASS allows
    (the same pixels as one at a time). Returns a list of dicts: src, tgt (n, 3, H, W), rel
    (n, 4, 4), K_src, K_tgt (n, 4), and (if depth) depth_src, depth_tgt (n, H, W)."""
    device = torch.device(device)
    per = max(1, RAYS_A_PASS.get(device.type, 2 ** 20) // (specs[0]["c2w"].shape[0] * H * W * ss * ss))
    out = []
    for i in range(0, len(specs), per):
        group = specs[i:i + per]
        cat = lambda k: torch.stack([sp[k] for sp in group]).to(device)
        scene = {k: v.to(device) for k, v in stack_scenes([sp["scene"] for sp in group]).items()}
        rgb, z = render_scenes(scene, cat("c2w"), cat("K"), cat("time"), H, W, ss, depth)
        for j, sp in enumerate(group):
            n = sp["rel"].shape[0]
            clip = dict(src=rgb[j, :n], tgt=rgb[j, n:], **{k: sp[k].to(device) for k in ("rel", "K_src", "K_tgt")})
            out.append(clip if z is None else dict(clip, depth_src=z[j, :n], depth_tgt=z[j, n:]))
    return out


def render_clip(seed, n, H, W, rel=None, zoom=None, src_c2w=None, t0=0.0, ss=2, gen=None, fx=1.0, frozen=False,
                depth=True, device="cpu"):
    """Render a synchronized (source, target) clip of n frames of scene `seed` (frozen: no
    object moves). Returns a dict: src, tgt (n, 3, H, W), rel (n, 4, 4), K_src, K_tgt (n, 4),
    and (if depth) depth_src, depth_tgt (n, H, W), all on `device` (the renderer runs there)."""
    spec = clip_spec(seed, n, rel, zoom, src_c2w, t0, gen, fx, frozen)
    return render_clips([spec], H, W, ss, depth, device)[0]


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


def collate(clips, keys=("src", "tgt", "rel", "K_src", "K_tgt")):
    return {k: torch.stack([c[k] for c in clips]) for k in keys}


def clip_length(step, max_pairs, seed=0):
    """Pairs a clip (1..max_pairs) at a training step, the same for every process: the draw of
    rank 0's generator, so the ranks of a DDP step carry equal work (none waits for a longer
    clip) and a single process keeps the stream it always had."""
    return int(torch.randint(1, max_pairs + 1, (1,), generator=rng(seed, step, 0)))


def synthetic_batch(step, pairs, max_pairs, H, W, seed=0, rank=0, p_static=P_STATIC, device="cpu"):
    """The batch of training step `step`: a pure function of (seed, step, rank), so resumed runs
    see exactly the data an uninterrupted run would. T pairs a clip (clip_length: shared by all
    ranks) and pairs // T clips, so every step carries about the same number of tokens.
    Rendered on `device` (the training device: rendering on the CPU would starve a GPU), all
    clips in one batched pass."""
    g = rng(seed, step, rank)
    T = int(torch.randint(1, max_pairs + 1, (1,), generator=g))   # rank 0's draw is every rank's T
    T = clip_length(step, max_pairs, seed) if rank else T
    B = max(1, pairs // T)
    seeds = torch.randint(0, 2 ** 31 - 1, (B,), generator=g).tolist()   # training scenes < 2**31
    return collate(render_clips([sample_spec(s, T, p_static) for s in seeds], H, W, depth=False, device=device))

# -----------------------------------------------------------------------------
# video I/O (PyAV through imageio): frame-by-frame, centre-crop + resize

class VideoError(ValueError):
    pass


def read_video(path, size=None, max_frames=None):
    """Yield frames of any video ffmpeg reads, one at a time, as (3, size, size) float in
    [-1, 1] (centre-cropped to square and resized; grayscale becomes RGB). Never holds the
    whole video in memory. Raises VideoError with the path on a missing or unreadable file."""
    import imageio.v3 as iio
    if not os.path.isfile(path):
        raise VideoError(f"video not found: {path}")
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


def video_fps(path):
    import av
    if not os.path.isfile(path):
        raise VideoError(f"video not found: {path}")
    try:
        with av.open(path) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else 8.0
    except Exception as e:
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None


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
#                                                           "c2w": [T x 4x4 OpenCV cam-to-world]}]}

def write_scene(dirpath, frames, c2w, K, fps=FPS):
    """frames (C, T, 3, H, W), c2w (C, T, 4, 4), K (C, 4) -> one lossless mp4 per camera (the
    pixels read back exactly, to 8 bits) + cameras.json."""
    os.makedirs(dirpath, exist_ok=True)
    C, T, _, H, W = frames.shape
    cams = []
    for c in range(C):
        name = f"cam{c:02d}"
        write_video(os.path.join(dirpath, name + ".mp4"), frames[c], fps, quality="lossless")   # training targets: exact
        cams.append(dict(name=name, file=name + ".mp4", K=K[c].tolist(), c2w=c2w[c].tolist()))
    meta = dict(fps=fps, width=W, height=H, frames=T, cameras=cams)
    with open(os.path.join(dirpath, "cameras.json"), "w") as f:
        json.dump(meta, f)


def load_scene(dirpath, size=None):
    """Load one scene of the on-disk format -> dict(frames (C, T, 3, S, S), c2w (C, T, 4, 4),
    K (C, 4), fps). Errors name the offending file."""
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
    return dict(frames=torch.stack(frames), c2w=torch.stack(c2ws), K=torch.stack(Ks), fps=meta.get("fps", FPS))


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
        self.scenes = [load_scene(d, size) for d in list_scenes(root)]

    def clip(self, g, T):
        sc = self.scenes[int(torch.randint(len(self.scenes), (1,), generator=g))]
        C, N = sc["frames"].shape[:2]
        if N < T:
            raise ValueError(f"scene has {N} frames, fewer than the {T} pairs asked for")
        a = int(torch.randint(C, (1,), generator=g))
        b = int(torch.randint(C, (1,), generator=g))
        f0 = int(torch.randint(0, N - T + 1, (1,), generator=g))
        sl = slice(f0, f0 + T)
        return dict(src=sc["frames"][a, sl], tgt=sc["frames"][b, sl],
                    rel=relative_pose(sc["c2w"][a, sl], sc["c2w"][b, sl]),
                    K_src=sc["K"][a].expand(T, 4), K_tgt=sc["K"][b].expand(T, 4))

    def batch(self, step, pairs, max_pairs, seed=0, rank=0):
        g = rng(seed, step, rank)
        T = int(torch.randint(1, max_pairs + 1, (1,), generator=g))
        T = clip_length(step, max_pairs, seed) if rank else T           # one T for all ranks
        return collate([self.clip(g, T) for _ in range(max(1, pairs // T))])


def synth_multiview_scene(seed, n_cams, T, size, ss=2):
    """A scene of the synthetic world seen by n_cams synchronized cameras: camera 0 is a source
    path, the others ride on it with random smooth relative paths."""
    g = torch.Generator().manual_seed(int(seed))
    base = source_path(T, g)
    frames, c2ws = [], []
    for c in range(n_cams):
        rel, _ = preset_path("static", T) if c == 0 else random_path(T, g)
        clip = render_clip(seed, T, size, size, rel=rel, src_c2w=base, ss=ss, gen=g)
        frames.append(clip["tgt"]), c2ws.append(base @ rel)
    return torch.stack(frames), torch.stack(c2ws), torch.tensor([1.0, 1.0, 0.5, 0.5]).repeat(n_cams, 1)

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
# command-line checks shared by the scripts: bad input ends in one `error:` line on stderr and
# a non-zero exit, before any expensive work

def fail(msg):
    raise SystemExit(f"error: {msg}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a bad number, an unknown flag) are one `error:` line too."""

    def error(self, message):
        fail(f"{message} (see --help)")


def check_device(name):
    """--device: cpu, cuda or cuda:N, on a machine that has it (model.check_device)."""
    from model import check_device
    try:
        return check_device(name)
    except ValueError as e:
        fail(f"--{e}")


def check_args(args, positive=(), nonneg=()):
    """Counts given on the command line: `positive` must be >= 1, `nonneg` >= 0 (None: the default
    is decided later). Names are argparse destinations (--max_steps -> max_steps)."""
    for names, lo in ((positive, 1), (nonneg, 0)):
        for k in names:
            v = getattr(args, k)
            if v is not None and not v >= lo:
                fail(f"--{k} must be {'at least 1' if lo else 'non-negative'}, got {v}")


def check_out_dir(path):
    """--out is a folder (created if missing), not an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--out {path} is a file; --out names a folder")
    return path


if __name__ == "__main__":
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
    if args.size % 2:
        fail(f"--size must be even (H.264 frames have even sides), got {args.size}")
    check_out_dir(args.out)
    if args.multicam:
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
    else:
        preview = []
        for i in tqdm(range(args.scenes), desc="scenes"):
            frames, c2w, K = synth_multiview_scene(args.seed + i, args.cams, args.frames, args.size)
            write_scene(os.path.join(args.out, f"scene_{i:05d}"), frames, c2w, K)
            if i < 4:
                preview.append(torch.cat(list(frames), -1))                 # cameras side by side
        write_video(os.path.join(args.out, "preview.mp4"), torch.cat(preview, -2), FPS, upscale=4)
        print(f"wrote {args.scenes} scenes x {args.cams} cameras x {args.frames} frames to {args.out} "
              f"(preview: {os.path.join(args.out, 'preview.mp4')})")
