"""
The interleaved DiT of RealCam (DESIGN.md section 3): its configuration and sizes, the
flow-matching helpers, RoPE and camera RoPE, the blocks, the network with its warp head, the
samplers, and checkpoints. Who attends to whom and the KV cache are in attention.py.

A clip of T synchronized pairs is one token sequence [s0, t0, s1, t1, ...] (source frame i,
target frame i); s_i and t_i share the RoPE time index i, so positions never depend on the
clip's length. The same weights run
- bidirectionally (the teacher): every token sees every pair, except that source tokens never
  look at target tokens, so the source stream is a clean encoder of the input video whatever
  the noise on the targets;
- block-causally (the student): chunks of cfg.chunk pairs see themselves and earlier chunks
  (optionally only the last cfg.window chunks plus cfg.sink first ones), which lets a KVCache
  stream the target chunk by chunk with exactly the outputs of the full masked forward.
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from attention import KVCache, apply_rope, attend, const, full_plan, ints, rope_angles
from camera import remembered, source_intrinsics, source_memory, stream_memory

# The warp head's planes, inverse depths: the synthetic scenes' inverse depths are 0 (sky) to
# about 2.3 (the subject at 1), some ground closer
WARP_PLANES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass
class Config:
    """The shipped recipe (docs/results.md: the ablations that chose it) at a size. The network
    predicts the clean x0 of a residual target, places target tokens by camera RoPE, sees the
    source's pixels beside each target's, and ends in the warp head."""
    size: int = 32              # frame height = width, pixels
    patch: int = 4              # patch size, pixels
    dim: int = 256              # transformer width
    depth: int = 6              # number of blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    cam_channels: int = 6       # Plucker rays concatenated to the RGB pixels
    src_concat: bool = True     # a target frame's input also carries its pair's source pixels (zeros
                                # for source frames), so the residual target - source is local
    residual: bool = True       # diffuse the target minus its source frame (anchors on the source)
    shift: float = 2.0          # timestep shift toward high noise, train and sample
    t_min: float = 0.05         # the flow loss divides by max(t, t_min)
    cam_rope: tuple = (1.6, 1.0, 0.6, 0.0)   # inverse depths of the planes that place tokens for RoPE,
                                # one a head (cycled; 0 = infinity); () = every token at its own patch
    chunk: int = 1              # student: pairs a chunk
    window: int = 0             # student: chunks attended, the current one included (0 = all)
    sink: int = 0               # student: first chunks always kept in the window
    ada_single: bool = True     # one adaLN projection shared by the blocks, plus a learned table
                                # a block (adaLN-single): a third fewer weights, so more width fits
    warp: tuple = WARP_PLANES   # the warp head's planes, inverse depths (() = no head): each target
                                # pixel picks a plane (softmax) and a gate, and the output adds gate *
                                # (the source where the pixel's ray meets the picked plane - the source)


PRESETS = {                     # sizes; everything else is Config's recipe
    "tiny": Config(size=16, patch=4, dim=64, depth=2, heads=2),        # tests: well under 1 s a step
    "small": Config(size=32, patch=4, dim=320, depth=6, heads=4),      # 2-core CPU, the shipped files
    "base": Config(size=64, patch=4, dim=768, depth=12, heads=12),     # one GPU
}

# A checkpoint's config holds the fields of its time. A field added since takes the value that
# rebuilds the old network (OLD_DEFAULTS); pred and src_sees_tgt, since removed, must hold the one
# value kept. pred came with cam_rope: a config with neither predates it (a v-prediction network).
OLD_DEFAULTS = dict(src_concat=False, residual=True, cam_rope=(), ada_single=False, warp=())


def config_from(d):
    """The Config of a checkpoint's config dict, whichever version of the code wrote it. ValueError
    for a network this code no longer runs (v-prediction, sources attending to targets) or fields
    it does not know."""
    d = dict(d)
    pred = d.pop("pred", "x" if "cam_rope" in d else "v")
    if pred != "x":
        raise ValueError(f"its network predicts the velocity (pred {pred!r}); this code runs x-prediction only")
    if d.pop("src_sees_tgt", False):
        raise ValueError("its source tokens attend to target tokens (src_sees_tgt); this code runs sources that never do")
    unknown = sorted(set(d) - {f.name for f in fields(Config)})
    if unknown:
        raise ValueError(f"its config has fields this code does not know: {', '.join(unknown)}")
    return Config(**{**OLD_DEFAULTS, **d})


# -----------------------------------------------------------------------------
# rectified flow: x_t = (1 - t) x0 + t e, v = e - x0  (t = 0 data, t = 1 noise); the network
# predicts x0 (its velocity follows: v = (x_t - x0) / t)

def shift_t(t, shift):
    """Warp t toward high noise: t' = shift t / (1 + (shift - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(shape, shift, generator=None, device="cpu"):
    """Training timesteps: logit-normal (mean 0, std 1) in 80% of draws, uniform in 20% (so the
    pure-noise end a one-step student starts from is trained too), then shifted."""
    u = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
    uni = torch.rand(shape, generator=generator, device=device)
    pick = torch.rand(shape, generator=generator, device=device) < 0.2
    return shift_t(torch.where(pick, uni, u), shift)


def _bc(t, x):  # broadcast (B, T) timesteps over (B, T, C, H, W)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def add_noise(x0, e, t):
    return (1 - _bc(t, x0)) * x0 + _bc(t, x0) * e           # x_t = (1 - t) x0 + t e


def flow_loss(x0_pred, x0, t, cfg):
    """Rectified-flow loss per frame (B, T): || v_pred - v ||^2 with v = e - x0 and v_pred =
    (x_t - x0_pred) / t, i.e. || x0_pred - x0 ||^2 / t^2, with t floored at cfg.t_min so that
    nearly clean frames do not dominate ("Back to Basics", 2025)."""
    err = (x0_pred - x0) / _bc(t, x0).clamp(min=cfg.t_min)
    return err.float().square().flatten(2).mean(-1)


def encode_target(tgt, src, cfg):
    """Pixels -> the variable the flow runs on (x0): the target, or its difference from the
    synchronized source frame when cfg.residual (a static camera then has x0 = 0)."""
    return tgt - src if cfg.residual else tgt


def decode_target(x0, src, cfg):
    return (x0 + src if cfg.residual else x0).clamp(-1, 1)


def frame_cond(cfg, src, cam):
    """A frame's conditioning channels: its Plucker rays cam (B, F, 6, H, W), and with
    cfg.src_concat first the synchronized source pixels src (B, F, 3, H, W) for a target frame,
    zeros (src None) for a source frame."""
    if not cfg.src_concat:
        return cam
    return torch.cat([torch.zeros_like(cam[:, :, :3]) if src is None else src, cam], 2)


def null_camera(cam_tgt):
    """The withheld camera of classifier-free guidance: zero rays (no real ray has d = 0)."""
    return torch.zeros_like(cam_tgt)


# -----------------------------------------------------------------------------
# camera RoPE (the angles and rotations: attention.py)

def plane_rho(planes, dev, dtype):   # the planes' inverse depths (K,), made once per device and dtype
    return const(("rho", tuple(planes), str(dev), dtype), lambda: torch.tensor(planes, device=dev, dtype=dtype))


def plane_uv(cam, planes):
    """Where each pixel's ray meets the fronto-parallel planes z = 1 / rho of the source camera
    (rho in planes; 0 = infinity), as x / z and y / z in the source camera's frame: u, v
    (B, P, F, H, W). cam (B, F, 6, H, W) Plucker maps (o x d, d) in the source camera's frame.
    The source's intrinsics turn these into image positions (warp_grid); camera RoPE uses them
    as they are, which places source and target tokens by the same rule whatever the focal length."""
    m, d = cam[:, :, :3], cam[:, :, 3:]                                          # (B, F, 3, H, W)
    o = torch.cross(d, m, dim=2)                                                 # ray point nearest the origin
    dev = cam.device
    rho = plane_rho(planes, dev, cam.dtype).view(1, -1, 1, 1, 1)
    dz = d[:, None, :, 2].clamp(min=0.05)                                        # (B, 1, F, H, W)
    # the ray meets z = 1/rho at o + (1/rho - o_z) / d_z d, which projects to x/z = rho o_x + (1 - rho o_z) d_x / d_z
    ox, oy, oz = (o[:, None, :, i] for i in range(3))
    u = rho * ox + (1 - rho * oz) * d[:, None, :, 0] / dz                      # (B, P, F, H, W)
    v = rho * oy + (1 - rho * oz) * d[:, None, :, 1] / dz
    return u, v


def plane_positions(cam, cfg):
    """Camera RoPE: where each token's patch lands in the SOURCE image when its rays are cut by
    fronto-parallel planes z = 1 / rho of the source camera (one plane a head, cfg.cam_rope).
    cam (B, F, 6, H, W) Plucker maps (o x d, d), all in the source camera's frame (the source
    itself at identity). Returns (row, col) (B, heads, F * L) in patch units of a canonical
    camera (fx = 1, centre 0.5): a source token sits at its own grid position whatever rho, a
    target token at the position of the source pixel it would copy if the scene lay on the
    plane. RoPE then turns "attend to the source where my ray lands" into "attend to the same
    position", for every plane at once; the network picks a plane (a depth) per pixel. Pure
    rotations land exactly, whatever the depth. Each token's position depends on its own camera
    only, so the KV cache stays exact."""
    dev, P = cam.device, len(cfg.cam_rope)
    u, v = plane_uv(cam, cfg.cam_rope)                                           # (B, P, F, H, W)
    g = cfg.size // cfg.patch
    pool = lambda z: F.avg_pool2d(z.flatten(0, 2), cfg.patch).view(z.shape[0], P, -1)   # (B, P, F * L)
    col, row = g * (pool(u) + 0.5) - 0.5, g * (pool(v) + 0.5) - 0.5
    head = const(("heads", cfg.heads, P, str(dev)), lambda: torch.arange(cfg.heads, device=dev) % P)
    return row[:, head], col[:, head]                                            # (B, heads, F * L)


def warp_term(o, cam, k_src, planes, memory=None):
    """The warp head's term (B, F, 3, H, W) from its outputs o (BF, K + 1, H, W), K plane logits
    and a gate a pixel, for targets of conditioning cam (B, F, 3 + 6, H, W), at any resolution
    (hires.py renders at the output's): gate * (sum_k w_k src(x_k) - src(x)), where x_k is
    where the pixel's ray meets plane k (inverse depth cfg.warp[k]) seen from the source, w =
    softmax of the pixel's plane logits, src the frame's source pixels (cam's first 3
    channels, zeros for source frames). x_k is projected with the source's intrinsics k_src
    (B, F, 4): (fx, fy, cx, cy), source_intrinsics; the target's own intrinsics are in its
    rays. The network only has to say which depth a pixel is at; the camera moves it there
    exactly, to a fraction of a pixel, which 4x4-pixel tokens cannot (DESIGN.md section 3).
    A choice between colours, not a flow field: a logit's gradient is the colour its plane
    would bring, however far away. The gate is linear and starts at 0, so the head starts
    silent and a network without it is continued unchanged (distill.py adds it so). Per pixel:
    no key or value changes, the KV cache stays exact. With memory (camera.source_memory), x_k out
    of the source's field of view takes the newest earlier source's colour there (no occlusion test)."""
    (B, Fr, _, H, W), K = cam.shape, len(planes)
    u, v = plane_uv(cam[:, :, -6:], planes)                                     # (B, K, F, H, W)
    fx, fy, cx, cy = (k[:, None, :, None, None] for k in k_src.to(u.dtype).unbind(-1))
    to_grid = lambda u, v: torch.stack([2 * (fx * u + cx) - 1, 2 * (fy * v + cy) - 1], -1).transpose(1, 2).flatten(0, 2)
    grid = to_grid(u, v)                                                         # (BFK, H, W, 2), grid_sample's [-1, 1]
    src = cam[:, :, :3].flatten(0, 1)                                            # (BF, 3, H, W)
    seen = F.grid_sample(src.repeat_interleave(K, 0), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).view(B * Fr, K, 3, H, W)
    if memory is not None:
        seen = remembered(seen, grid, u, v, plane_rho(planes, u.device, u.dtype), memory, to_grid)
    mix = (o[:, :K].softmax(1)[:, :, None] * seen).sum(1)
    return (o[:, K:] * (mix - src)).view(B, Fr, 3, H, W)


# -----------------------------------------------------------------------------
# blocks

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.dim // cfg.heads, eps=1e-6)  # qk-norm keeps logits tame
        self.k_norm = nn.RMSNorm(cfg.dim // cfg.heads, eps=1e-6)

    def forward(self, x, rope, plan, cache=None, layer=0):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        kt = k[..., :2 * (k.shape[-1] // 8)]                                     # time channels, unrotated (cache)
        q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)   # RoPE in float32, back
        y = attend(q, k, v, plan) if cache is None else cache.attend(layer, q, k, kt, v, plan)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """DiT block with adaLN-Zero; the modulation is per frame (B, F, 1, 6D), i.e. per token.
    cfg.ada_single: the block gets the shared projection of the conditioning (B, F, 6D) and adds
    its own learned table (6D) instead of projecting the conditioning itself."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada_single = cfg.ada_single
        if cfg.ada_single:
            self.ada_table = nn.Parameter(torch.zeros(6 * cfg.dim))
        else:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x, c, rope, plan, cache=None, layer=0):
        B, Fr, L, D = x.shape                                                    # (B, F, L, D)
        mod = c + self.ada_table if self.ada_single else self.ada(c)             # (B, F, 6D)
        sh1, sc1, g1, sh2, sc2, g2 = mod[:, :, None].chunk(6, -1)               # each (B, F, 1, D)
        h = (self.norm1(x) * (1 + sc1) + sh1).reshape(B, Fr * L, D)
        x = x + g1 * self.attn(h, rope, plan, cache, layer).view(B, Fr, L, D)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), (...,) -> (..., dim)."""
    half, dev = dim // 2, t.device
    freqs = const(("temb", dim, max_period, str(dev)), lambda: torch.exp(
        -math.log(max_period) * torch.arange(half, device=dev, dtype=torch.float32) / half))
    args = 1000 * t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


# -----------------------------------------------------------------------------
# the network and its warp head

def grid_rope(time, g, head_dim, dev):
    """(cos, sin) of RoPE with every token at its own patch grid position (no camera RoPE)."""
    tok_time = torch.tensor(time, device=dev).repeat_interleave(g * g)
    rows = torch.arange(g, device=dev).repeat_interleave(g).repeat(len(time))
    cols = torch.arange(g, device=dev).repeat(g * len(time))
    ang = rope_angles(tok_time, rows, cols, head_dim)                               # (N, Dh / 2)
    return ang.cos(), ang.sin()


class RealCamDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch, cfg.dim
        assert cfg.size % p == 0 and cfg.dim % cfg.heads == 0
        self.grid = cfg.size // p
        self.patch_embed = nn.Linear((3 + 3 * cfg.src_concat + cfg.cam_channels) * p * p, D)  # RGB (+ source) + rays
        self.role_embed = nn.Parameter(torch.zeros(2, D))                      # 0 source, 1 target
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        if cfg.ada_single:                                                       # shared by the blocks
            self.ada_shared = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, 3 * p * p)
        if cfg.warp:                                                             # a logit a plane + a gate, a pixel
            if not cfg.src_concat:
                raise ValueError("the warp head reads the source pixels beside each target's: it needs src_concat")
            self.warp_out = nn.Linear(D, (len(cfg.warp) + 1) * p * p)
        self.compiled = None                                                     # see compile_blocks
        self.init_weights()

    def init_weights(self):
        for m in self.modules():                                                 # linears: Xavier, bias 0
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.role_embed, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        adas = [self.ada_shared[1]] if self.cfg.ada_single else [b.ada[1] for b in self.blocks]
        for m in adas:                                                           # adaLN-Zero: blocks start
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)                     # as the identity
        for m in (self.ada_out[1], self.out) + ((self.warp_out,) if self.cfg.warp else ()):  # and the output at 0
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)                     # (warp: gate 0, planes alike)

    def patchify(self, x):  # (B, F, C, H, W) -> (B, F, L, C p p)
        return rearrange(x, "b f c (h p) (w q) -> b f (h w) (c p q)", p=self.cfg.patch, q=self.cfg.patch)

    def unpatchify(self, x):  # (B, F, L, 3 p p) -> (B, F, 3, H, W)
        return rearrange(x, "b f (h w) (c p q) -> b f c (h p) (w q)", h=self.grid, p=self.cfg.patch, q=self.cfg.patch)

    def rope(self, time, cam):
        """RoPE (cos, sin) of every token: time = pair index; rows and columns on the patch grid
        (a table made once per layout), or where the token's rays land in the source image
        (camera RoPE, per token and head, from the Plucker channels: the last 6)."""
        cfg, g, dev = self.cfg, self.grid, cam.device
        Dh = cfg.dim // cfg.heads
        if not cfg.cam_rope:
            return const(("rope", time, g, Dh, str(dev)), lambda: grid_rope(time, g, Dh, dev))
        tok_time = const(("tok_time", time, g * g, str(dev)), lambda: torch.tensor(time, device=dev).repeat_interleave(g * g))
        ang = rope_angles(tok_time, *plane_positions(cam[:, :, -6:], cfg), Dh)       # (B, H, N, Dh / 2)
        return ang.cos(), ang.sin()

    def run(self, x, cam, t, time, role, plan, cache=None, k_src=None, memory=None):
        """The tensor work of a forward, given its metadata (Python tuples) and attention plan."""
        dev = x.device
        h = self.patch_embed(self.patchify(torch.cat([x, cam], 2)))             # (B, F, L, D)
        h = h + self.role_embed[const(("role", role, str(dev)), lambda: torch.tensor(role, device=dev))][None, :, None]
        c = self.t_embed(timestep_embedding(t, 256))                             # (B, F, D)
        rope = self.rope(time, cam)
        cb = self.ada_shared(c) if self.cfg.ada_single else c                    # what the blocks modulate from
        if cache is None and self.compiled:
            for blk in self.compiled:
                h = blk(h, cb, rope, plan)
        else:
            for i, blk in enumerate(self.blocks):
                h = blk(h, cb, rope, plan, cache, i)
        sh, sc = self.ada_out(c)[:, :, None].chunk(2, -1)
        h = self.norm_out(h) * (1 + sc) + sh
        out = self.unpatchify(self.out(h))                                       # (B, F, 3, H, W)
        if not (self.cfg.warp and 1 in role):                                    # source frames: exactly 0
            return out
        if k_src is None:
            raise ValueError("the warp head needs the source intrinsics k_src (model.source_intrinsics)")
        return out + self.warp(h, cam, k_src, memory)

    def warp(self, h, cam, k_src, memory=None):
        """The warp head's term (B, F, 3, H, W) for tokens h: its plane logits and gate, a pixel
        (the last kept as self.last_warp (BF, K + 1, H, W), with its gradient when there is one:
        hires.py, teacher.py's depth term), turned into pixels by warp_term."""
        o = self.unpatchify(self.warp_out(h)).flatten(0, 1)                      # (BF, K + 1, H, W)
        self.last_warp = o
        return warp_term(o, cam, k_src, self.cfg.warp, memory)

    def forward_frames(self, x, cam, t, time, role, causal, cache=None, write=False, k_src=None, memory=None):
        """Core forward over F frames with per-frame metadata.
        x (B, F, 3, H, W) pixels or noisy x_t; cam (B, F, C, H, W): the frame's conditioning
        channels (frame_cond: Plucker rays, after the pair's source pixels if cfg.src_concat);
        t (B, F) noise levels; time (F,) pair index (absolute), role (F,) 0 source / 1 target:
        Python ranges, lists or tuples (a CUDA tensor costs a host sync).
        With a cache (causal only), the frames (one chunk) attend to the cached tokens too;
        write=True makes them part of the cache. k_src (B, F, 4): each frame's source intrinsics
        (source_intrinsics), which the warp head needs for target frames; memory: its memory of
        these frames (warp_term), or None (with memory, no CUDA-graph replay).
        Returns the network's x0 prediction (B, F, 3, H, W)."""
        time, role = ints(time), ints(role)
        if cache is None:
            plan = full_plan(time, role, causal, self.cfg, self.grid ** 2, x.device)
            return self.run(x, cam, t, time, role, plan, k_src=k_src, memory=memory)
        assert causal, "a KV-cached pass is block-causal"
        plan = cache.begin(time, role, write)
        k = k_src if k_src is not None else x.new_zeros(x.shape[0], x.shape[1], 4)   # a graph's inputs are tensors
        run = lambda x, cam, t, k: self.run(x, cam, t, plan.rel_time, role, plan, cache, k if k_src is not None else None, memory)
        if cache.graphs and x.is_cuda and plan.steady and not torch.is_grad_enabled() and memory is None:
            out = cache.replay(run, plan, x, cam, t, k)
        else:
            out = run(x, cam, t, k)
        cache.end(plan, role, write)
        return out

    def forward(self, src, xt, cam_src, cam_tgt, t, causal=False, time0=0, pose_src=None):
        """Full forward over T synchronized pairs, laid out sources first [s0 .. s_T-1, t0 .. t_T-1]
        (attention depends on positions and roles, not on the order of the sequence).
        src, xt (B, T, 3, H, W): clean source, noisy target; cam_* (B, T, 6, H, W) Plucker rays
        (frame_cond adds the source pixels to the targets' if cfg.src_concat);
        t (B, T) noise level of each target (sources are always clean, t = 0). Causal, with the
        source's poses pose_src (B, T, 4, 4), the warp head remembers the last window - 1 sources.
        Returns the x0 prediction for the targets (B, T, 3, H, W)."""
        B, T = src.shape[:2]
        assert not causal or time0 % self.cfg.chunk == 0, "a causal forward starts on a chunk boundary"
        x = torch.cat([src, xt], 1)                                               # (B, 2T, 3, H, W)
        cam = torch.cat([frame_cond(self.cfg, None, cam_src), frame_cond(self.cfg, src, cam_tgt)], 1)
        tt = torch.cat([torch.zeros_like(t), t], 1)                               # (B, 2T)
        time, role = tuple(range(time0, time0 + T)) * 2, (0,) * T + (1,) * T
        k = torch.cat([source_intrinsics(cam_src)] * 2, 1) if self.cfg.warp else None
        mem = None if pose_src is None or not causal or not self.cfg.warp or self.cfg.window < 2 else \
            source_memory(src, pose_src, self.cfg.window - 1, pairs=True)
        return self.forward_frames(x, cam, tt, time, role, causal, k_src=k, memory=mem)[:, T:]


def compile_blocks(model, **kw):
    """torch.compile each transformer block (nearly all the work) for forwards without a KV
    cache. Masks, RoPE tables and plans are made in Python outside the compiled code, so the
    blocks compile without graph breaks; parameter names and checkpoints do not change. Under
    DDP, call it before wrapping the model."""
    model.compiled = [torch.compile(b, **kw) for b in model.blocks]
    return model

# -----------------------------------------------------------------------------
# samplers

@torch.no_grad()
def teacher_sample(model, src, cam_src, cam_tgt, steps=50, generator=None, noise=None, guidance=1.0):
    """Bidirectional Euler ODE sampler from t = 1 to 0 over all T pairs at once. guidance != 1:
    classifier-free guidance on the camera, x0 = x0(no camera) + guidance (x0(camera) - x0(no
    camera)), the camera withheld as zero rays (null_camera: how teacher.py --cond_drop trains it).
    Returns target pixels (B, T, 3, H, W)."""
    cfg = model.cfg
    x = noise if noise is not None else torch.randn(src.shape, generator=generator, device=src.device)
    ts = shift_t(torch.linspace(1, 0, steps + 1, device=src.device), cfg.shift)
    for i in range(steps):
        t = ts[i].expand(src.shape[:2])
        x0 = model(src, x, cam_src, cam_tgt, t)
        if guidance != 1:
            x0u = model(src, x, cam_src, null_camera(cam_tgt), t)
            x0 = x0u + guidance * (x0 - x0u)
        x = x0 + (ts[i + 1] / ts[i]) * (x - x0)        # Euler: x + (t' - t) v with v = (x - x0) / t
    return decode_target(x, src, cfg)


def student_timesteps(steps, shift):
    """The student's few-step schedule: t_j = shift(1 - j / steps), e.g. 4 steps: 1, .75, .5, .25
    warped toward noise (1, .86, .67, .4 with shift 2)."""
    return [shift_t(1 - j / steps, shift) for j in range(steps)]


def student_chunk(model, cache, src, cam_src, cam_tgt, time, steps, noise, exit_step=None, heads=None, pose_src=None):
    """Generate one chunk of n target frames with the student's KV cache, in diffusion space.
    src (B, n, 3, H, W), cam_* (B, n, 6, H, W), time (n,) absolute pair indices (a range or a
    list; a CUDA tensor costs one host sync), noise (steps, B, n, 3, H, W): the starting noise
    and the fresh noise of each re-noising.
    The chunk's source frames are encoded once (sources never see targets); then steps
    0..exit_step (default: all) on the targets, of which only the last keeps gradients (when grad
    is enabled); then a t = 0 pass without gradient writes the chunk's clean keys and values.
    heads: a list that gets the warp head's outputs of the last step (hires.py). pose_src (B, n,
    4, 4): the sources' poses (the source's own motion), which let the warp head take what the
    current source does not see from the last cfg.window - 1 source frames (kept in the cache;
    a rolling window, cfg.window >= 2, is needed)."""
    cfg, (B, n) = model.cfg, src.shape[:2]
    time, ts = ints(time), student_timesteps(steps, model.cfg.shift)
    last = steps - 1 if exit_step is None else exit_step
    grad = torch.is_grad_enabled()
    zeros = torch.zeros(B, n, device=src.device)
    k = source_intrinsics(cam_src) if cfg.warp else None                      # the warp head's
    cond, use = frame_cond(cfg, src, cam_tgt), pose_src is not None and cfg.warp and cfg.window > 1
    # the last window - 1 source frames and poses, kept in the cache; a chunk without poses ends the memory
    mem, cache.sources = stream_memory(cache.sources, src, pose_src, cfg.window - 1) if use else (None, None)
    targets = lambda x, t, write: model.forward_frames(x, cond, t, time, (1,) * n, True, cache, write, k, mem)
    with torch.no_grad():
        model.forward_frames(src, frame_cond(cfg, None, cam_src), zeros, time, (0,) * n, True, cache, True)
    x = noise[0]
    for j in range(last + 1):
        with torch.set_grad_enabled(grad and j == last):
            x0 = targets(x, zeros + ts[j], False)
        if heads is not None and j == last:
            heads.append(model.last_warp)
        if j < last:
            x = (1 - ts[j + 1]) * x0 + ts[j + 1] * noise[j + 1]             # re-noise to t_{j+1}
    with torch.no_grad():                       # the clean keys and values (its output unused: no memory)
        model.forward_frames(x0.detach(), cond, zeros, time, (1,) * n, True, cache, True, k)
    return x0


@torch.no_grad()
def student_sample(model, src, cam_src, cam_tgt, steps=4, generator=None, cache=None, time0=0, pose_src=None):
    """Few-step block-causal generation of T target frames, chunk by chunk with a KV cache (with
    the sources' poses pose_src (B, T, 4, 4): the warp head's memory). Returns target pixels
    (B, T, 3, H, W)."""
    cfg, (B, T) = model.cfg, src.shape[:2]
    cache = cache if cache is not None else KVCache(cfg)
    out = []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        n = sl.stop - sl.start
        noise = torch.randn((steps, B, n) + src.shape[2:], generator=generator, device=src.device)
        x0 = student_chunk(model, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl],
                           range(sl.start + time0, sl.stop + time0), steps, noise,
                           pose_src=None if pose_src is None else pose_src[:, sl])
        out.append(decode_target(x0, src[:, sl], cfg))
    return torch.cat(out, 1)

# -----------------------------------------------------------------------------
# sizes, FLOPs, checkpoints

def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_forward(cfg, frames, ctx_frames=None, attn_pairs=None):
    """Forward FLOPs for `frames` frames: 2 x (weight multiply-adds) per token, plus 4 D FLOPs
    (q.k and the weighted sum of v) per scored (query, key) token pair and layer: attn_pairs of
    them (attention.attention_pairs: what the model's attention really scores), by default every
    token against every token of `ctx_frames` frames (default: the same frames)."""
    L = (cfg.size // cfg.patch) ** 2
    N = frames * L
    pairs = attn_pairs if attn_pairs is not None else N * (frames if ctx_frames is None else ctx_frames) * L
    D, Hd = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    per_token = cfg.depth * (4 * D * D + 2 * D * Hd) + D * (3 + 3 * cfg.src_concat + cfg.cam_channels) * cfg.patch ** 2 + D * 3 * cfg.patch ** 2
    per_frame = (1 if cfg.ada_single else cfg.depth) * 6 * D * D + 2 * D * D + 256 * D + D * D   # adaLN, t embedding
    return 2 * (N * per_token + frames * per_frame) + cfg.depth * 4 * pairs * D


def save_checkpoint(path, **state):
    """Atomic save (write then rename), so an interrupted save never leaves a broken file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def file_kind(path):
    """What a file that is not a checkpoint looks like, for the error line."""
    with open(path, "rb") as f:
        head = f.read(4096)
    text = head and all(32 <= b < 127 or b in b"\t\r\n" for b in head)
    return "an empty file" if not head else "a text file" if text else "not the zip or pickle that torch.save writes"


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict (config, model, ...). Errors are one line naming the file: missing
    (FileNotFoundError), not a file torch.load reads, not a RealCam-min checkpoint, or a network
    this code no longer runs (config_from) (ValueError)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        raise ValueError(f"{path} is a folder, not a checkpoint file" + (f"; {inside} is one" * os.path.isfile(inside)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:   # torch's own message runs to 8 lines and suggests weights_only=False
        raise ValueError(f"cannot load checkpoint {path}: not a file torch.load reads ({file_kind(path)})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a RealCam-min checkpoint (no config/model)")
    try:
        config_from(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return ckpt


# the reference student in the repository, found from any working directory
SHIPPED_STUDENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "student_small.pt")


def load_model(path, device="cpu", weights="ema"):
    """Rebuild a model from a checkpoint (config inside); weights 'ema' (if present) or 'model'."""
    ckpt = load_checkpoint(path)
    model = RealCamDiT(config_from(ckpt["config"]))
    sd = ckpt.get(weights) or ckpt["model"]
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), ckpt


def export(ckpt_path, out_path, **provenance):
    """A release file: the EMA weights in float16 with the config and step (no optimizer), and
    next to it out_path's .json with the provenance given (commands, wall time, hardware, eval)."""
    ckpt = load_checkpoint(ckpt_path)
    sd = ckpt.get("ema") or ckpt["model"]
    keep = {k: ckpt[k] for k in ("config", "step", "student", "args") if k in ckpt}
    save_checkpoint(out_path, model={k: v.half() for k, v in sd.items()}, **keep)
    if provenance:
        meta = dict(file=os.path.basename(out_path), source=ckpt_path, step=ckpt.get("step"), config=ckpt["config"],
                    **({"student": ckpt["student"]} if "student" in ckpt else {}), **provenance)
        with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
            json.dump(meta, f, indent=1)
