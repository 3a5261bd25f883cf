"""
Cameras (DESIGN.md sections 3 and 6): the camera math, the trajectory presets and JSON
trajectories.

Conventions:
- Cameras are OpenCV: x right, y down, z forward. Poses are camera-to-world 4x4 (c2w).
- Intrinsics are (fx, fy, cx, cy) normalized by image width/height, so they do not depend on
  resolution. fx = 1.0 is a 53 degree horizontal field of view.
- The world is y-up with the ground at y = 0. Scene scale: the source camera looks at its
  subject from SUBJECT_DIST = 1.0 unit, and every trajectory preset is defined in that unit.
- The target camera of pair i is given RELATIVE to the source camera of pair i:
  rel_i = inv(c2w_src_i) @ c2w_tgt_i (a virtual rig riding on the source camera). Each pixel
  gets its Plucker ray (o x d, d): the source at identity with its own intrinsics, the target at
  rel_i (pair_rays).
"""
import json
import math

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


def plane_weights(rho, planes):
    """Weights (..., K, H, W) over the fronto-parallel planes of inverse depth `planes` (sorted,
    K >= 2) that place inverse depths rho (..., H, W) exactly: linear between the two planes
    around rho (clamped to the planes' range), so sum_k w_k planes_k = rho. The warp head's plane
    choice a true depth asks for (probe_depth.py)."""
    P = torch.as_tensor(planes, dtype=rho.dtype, device=rho.device)
    r = rho.clamp(P[0], P[-1]).contiguous()
    j = torch.searchsorted(P, r, right=True).clamp(1, len(P) - 1)
    a = ((r - P[j - 1]) / (P[j] - P[j - 1])).unsqueeze(-3)
    d = r.dim() - 2                                                     # the planes' axis
    w = torch.zeros(r.shape[:d] + (len(P),) + r.shape[d:], dtype=rho.dtype, device=rho.device)
    return w.scatter(d, (j - 1).unsqueeze(d), 1 - a).scatter_add(d, j.unsqueeze(d), a)


def plane_target(b, planes):
    """What the warp head's plane weights should be for a batch with depth (depth_src, depth_tgt,
    rel, K_src, K_tgt): the weights (..., K, H, W) that place each target pixel's true inverse
    depth in the source camera (plane_weights), and the co-visible pixels (..., H, W), the only
    ones whose depth the source shows. teacher.py's depth term, probe_depth.py."""
    covis, _ = covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
    _, rho, _ = reproject(b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
    return plane_weights(rho, planes), covis


def warp_source(src, grid):
    """The depth-warp oracle: src (..., 3, H, W) bilinearly resampled at grid (..., H, W, 2)."""
    lead = src.shape[:-3]
    out = F.grid_sample(src.flatten(0, -4), grid.flatten(0, -4), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(lead + out.shape[1:])


def source_intrinsics(cam_src):
    """The intrinsics (fx, fy, cx, cy) (B, F, 4), in image widths and heights, of source frames,
    read from their own Plucker maps cam_src (B, F, 6, H, W): the source sits at the identity
    (camera.pair_rays), so a pixel's direction is K^-1 (its centre, 1) normalized, and d_x / d_z
    = (u - cx) / fx is a line in the pixel's column u = (j + 1/2) / W; its slope and offset give
    fx and cx (likewise rows). Exact for any pinhole camera, so every caller that builds the
    source's rays (a --fov, a dataset's K) hands the warp head its intrinsics."""
    d = cam_src[:, :, 3:]
    H, W = d.shape[-2:]
    rx, ry = (d[:, :, 0] / d[:, :, 2]).mean(-2), (d[:, :, 1] / d[:, :, 2]).mean(-1)   # (B, F, W), (B, F, H)
    fx = ((W - 1) / W) / (rx[..., -1] - rx[..., 0])
    fy = ((H - 1) / H) / (ry[..., -1] - ry[..., 0])
    return torch.stack([fx, fy, 0.5 / W - fx * rx[..., 0], 0.5 / H - fy * ry[..., 0]], -1)


def pair_rays(rel, K_src, K_tgt, H, W):
    """Camera maps for interleaved pairs: source at identity (its intrinsics), target at rel.
    rel (B, T, 4, 4), K_* (B, T, 4) -> cam_src, cam_tgt, each (B, T, 6, H, W)."""
    eye = torch.eye(4, device=rel.device).expand_as(rel)
    return plucker(eye, K_src, H, W), plucker(rel, K_tgt, H, W)

def source_memory(src, pose, J, pairs=False):
    """The warp head's memory of each of T frames (model.warp_term): its J earlier source frames,
    newest first, src (B, T, 3, H, W) -> (B, T, J, 3, H, W); where its source camera is in each
    of theirs, from the source's poses pose (B, T, 4, 4) in any fixed world frame (the source's
    own motion, which the pair's rays do not carry) -> (B, T, J, 4, 4), float32; and which exist
    (T, J). pairs: for the 2T frames of a forward over pairs (sources, then targets; sources have
    none)."""
    if pose.shape != src.shape[:2] + (4, 4):
        raise ValueError(f"the source's poses must be (B, T, 4, 4) = {tuple(src.shape[:2]) + (4, 4)}, got {tuple(pose.shape)}")
    T = src.shape[1]
    lag = torch.arange(T, device=src.device)[:, None] - torch.arange(1, J + 1, device=src.device)[None]   # frame f - j
    i = lag.clamp(min=0)
    with torch.autocast(src.device.type, enabled=False):                      # poses far from the origin: float32
        pose = pose.float()
        mem = src[:, i], invert_pose(pose[:, i]) @ pose[:, :, None], lag >= 0
    none = torch.zeros_like(mem[2])
    return (torch.cat([mem[0]] * 2, 1), torch.cat([mem[1]] * 2, 1), torch.cat([none, mem[2]])) if pairs else mem


def stream_memory(kept, src, pose, J):
    """source_memory for a chunk of a stream (src, pose: its frames), given what the last chunk
    kept: (frames, poses) of the J source frames before it, None at the start. Returns the
    chunk's memory and what to keep for the next chunk (model.student_chunk keeps it in its cache)."""
    hs, hp = kept if kept is not None else (src[:, :0], pose[:, :0])
    s, p = torch.cat([hs, src], 1), torch.cat([hp, pose.to(hp)], 1)
    (ms, mq, ok), h = source_memory(s, p, J), hs.shape[1]
    return (ms[:, h:], mq[:, h:], ok[h:]), (s[:, -J:], p[:, -J:])


def move_planes(u, v, rho, Q):
    """Points of fronto-parallel planes z = 1 / rho of one camera (rho (K,), 0 = infinity) at
    image positions (u, v) = (x/z, y/z) (B, K, F, H, W), seen from another camera; Q (B, F, 4, 4)
    = inv(c2w_other) @ c2w_this, the first camera's pose in the other's frame. Returns their (x/z,
    y/z) there and whether they lie in front of it. The point (u, v, 1) / rho is (u, v, 1, rho) in
    homogeneous form: infinity moves by rotation alone."""
    R, t = Q[..., :3, :3], Q[..., :3, 3]
    p = torch.stack([u, v, torch.ones_like(u)], -1)                              # (B, K, F, H, W, 3)
    q = torch.einsum("bfij,bkfhwj->bkfhwi", R, p) + rho.view(1, -1, 1, 1, 1, 1) * t[:, None, :, None, None]
    z = q[..., 2]
    return q[..., 0] / z.clamp(min=1e-6), q[..., 1] / z.clamp(min=1e-6), z > 1e-6


def remembered(seen, grid, u, v, rho, memory, to_grid):
    """The warp head's plane colours seen (B F, K, 3, H, W), sampled from the current source at grid
    (B F K, H, W, 2) for points (u, v) on planes rho (move_planes): where a point is outside the
    current source's field of view, the colour of the newest earlier source of memory
    (source_memory, selected for these frames) whose field of view holds it (occlusion is not
    checked: the plane is the head's guess of the depth). to_grid turns (u, v) into sampling
    grids. The checks of lag (ok) and of points behind a camera (front) are defensive: a missing
    lag points at frame 0 itself, and a point behind lands far outside."""
    srcs, Q, ok = memory
    B, Fr, J = srcs.shape[:3]
    K = rho.shape[0]
    inside = lambda g: (g.abs() <= 1).all(-1)
    have = inside(grid)
    for j in range(J):
        with torch.autocast(u.device.type, enabled=False):                    # the geometry in float32
            uj, vj, front = move_planes(u.float(), v.float(), rho.float(), Q[:, :, j].float())
            gj = to_grid(uj, vj).float()
            got = F.grid_sample(srcs[:, :, j].flatten(0, 1).float().repeat_interleave(K, 0), gj, mode="bilinear",
                                padding_mode="border", align_corners=False).to(seen.dtype)
        new = inside(gj) & front.transpose(1, 2).flatten(0, 2) & ~have
        new &= ok[..., j].expand(B, Fr).flatten()[:, None].repeat_interleave(K, 0)[..., None]
        seen = torch.where(new.view(B * Fr, K, 1, *new.shape[-2:]), got.view_as(seen), seen)
        have |= new
    return seen


# -----------------------------------------------------------------------------
# trajectory presets (DESIGN section 6), all relative to the live source camera

PRESETS = ["static", "orbit_left", "orbit_right", "orbit", "pan_left", "pan_right", "tilt_up",
           "tilt_down", "dolly_in", "dolly_out", "zoom_in", "zoom_out", "truck_left",
           "truck_right", "pedestal_up", "pedestal_down"]
# magnitudes, in degrees or subject distances (the project's choice: moderate moves, DESIGN section 6)
ORBIT_DEG, PAN_DEG, TILT_DEG, MOVE, ZOOM = 30.0, 20.0, 10.0, 0.5 * SUBJECT_DIST, 1.5
ORBIT_PIVOT = SUBJECT_DIST  # orbits turn around the point the source camera looks at
# how far a target camera may be from its source: translation (scene units) and zoom (either way);
# far past anything trained, short of where the rays stop meaning anything (a 1e6 translation
# turns the Plucker moments into a patch grid, a focal length of 1e9 into noise)
MAX_TRANSLATION, MAX_ZOOM = 10.0 * SUBJECT_DIST, 10.0


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
    truncated. Every pose must be finite, rigid (rotation orthonormal with det +1 within
    1e-3, last row 0 0 0 1) and within MAX_TRANSLATION of the source on each axis, and every zoom within
    1 / MAX_ZOOM .. MAX_ZOOM: anything else is a ValueError
    naming the file and the first bad frame (a NaN would poison the KV cache, a scaled matrix
    would be taken as some other camera)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"cannot read trajectory {path}: {e}") from None
    if isinstance(obj, dict) and "poses" not in obj:
        raise ValueError(f"trajectory {path}: a JSON object needs a \"poses\" list "
                         f"(keys found: {', '.join(obj) or 'none'})")
    poses = obj["poses"] if isinstance(obj, dict) else obj
    try:                                   # read in float64: a 1e300 is too far, not infinite
        P = torch.tensor(poses, dtype=torch.float64)
        zoom = obj.get("zoom", [1.0] * len(P)) if isinstance(obj, dict) else [1.0] * len(P)
        zoom = torch.tensor(zoom, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, RecursionError) as e:
        raise ValueError(f"trajectory {path}: expected a list of 4x4 poses and a list of zoom numbers ({e})") from None
    if P.ndim != 3 or P.shape[1:] != (4, 4) or len(P) == 0:
        raise ValueError(f"trajectory {path}: expected a list of 4x4 poses, got shape {tuple(P.shape)}")
    if zoom.ndim != 1 or len(zoom) != len(P):
        raise ValueError(f"trajectory {path}: \"zoom\" needs one number a pose ({len(P)}), got shape {tuple(zoom.shape)}")
    bad = lambda mask, what: ValueError(f"trajectory {path}: frame {int(mask.nonzero()[0])} {what}")
    finite = torch.isfinite(P).flatten(1).all(1)
    if not finite.all():
        raise bad(~finite, "has a NaN or infinite entry")
    dist = P[:, :3, 3].abs().amax(1)                                    # no overflow in a norm's squares
    near = dist <= MAX_TRANSLATION
    if not near.all():
        raise bad(~near, f"moves the camera {dist[~near][0].item():.3g} scene units from the source; at most "
                         f"{MAX_TRANSLATION:g} along each axis (the source stands {SUBJECT_DIST:g} from its subject, "
                         f"the presets move {MOVE:g}: rescale the path)")
    R = P[:, :3, :3]
    ortho = (R @ R.transpose(1, 2) - torch.eye(3, dtype=P.dtype)).abs().amax((1, 2)) <= 1e-3
    if not ortho.all():
        raise bad(~ortho, "is not a rigid pose: its rotation part is not orthonormal (scale or shear?)")
    det = torch.linalg.det(R) > 0
    if not det.all():
        raise bad(~det, "is not a rigid pose: its rotation part is a reflection (det -1)")
    last = (P[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=P.dtype)).abs().amax(1) <= 1e-3
    if not last.all():
        raise bad(~last, "is not a rigid pose: its last row is not 0 0 0 1")
    zok = torch.isfinite(zoom) & (zoom >= 1 / MAX_ZOOM) & (zoom <= MAX_ZOOM)
    if not zok.all():
        raise bad(~zok, f"has zoom {zoom[~zok][0].item()}: a zoom (focal length multiplier) is between "
                        f"{1 / MAX_ZOOM:g} and {MAX_ZOOM:g}")
    P, zoom = P.float(), zoom.float()
    if n is not None:
        idx = torch.arange(n).clamp(max=len(P) - 1)
        P, zoom = P[idx], zoom[idx]
    return P, zoom


def trajectory(name, n):
    """A preset name or a JSON path -> (rel (n, 4, 4), zoom (n,))."""
    return load_trajectory(name, n) if name.endswith(".json") else preset_path(name, n)
