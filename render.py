"""
The synthetic multi-view world (DESIGN.md section 6): a procedural scene (ground, sky, spheres
and boxes with solid textures, half of them moving, hard shadows, haze), a ray caster in
PyTorch that renders any number of synchronized cameras with exact poses and depth, the source
camera's motion in it, and clips of (source, target) pairs rendered in batched passes on the
training device. Pixels are float in [-1, 1], videos (T, 3, H, W).
"""
import math

import torch
import torch.nn.functional as F

from camera import SUBJECT_DIST, camera_path, look_at, pixel_rays, preset_path

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
# clips: a source camera moving in a scene, a target camera relative to it, rendered in batches

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
