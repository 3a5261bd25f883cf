"""
The interleaved DiT of RealCam (DESIGN.md section 3), flow-matching helpers, the samplers,
and checkpoints.

A clip of T synchronized pairs is one token sequence [s0, t0, s1, t1, ...] (source frame i,
target frame i); s_i and t_i share the RoPE time index i, so positions never depend on the
clip's length. The same weights run
- bidirectionally (the teacher): every token sees every pair, except that source tokens never
  look at target tokens (cfg.src_sees_tgt = False), so the source stream is a clean encoder of
  the input video whatever the noise on the targets;
- block-causally (the student): chunks of cfg.chunk pairs see themselves and earlier chunks
  (optionally only the last cfg.window chunks plus cfg.sink first ones), which lets a KVCache
  stream the target chunk by chunk with exactly the outputs of the full masked forward.
"""
import json
import math
import os
import signal
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class Config:
    size: int = 32              # frame height = width, pixels
    patch: int = 4              # patch size, pixels
    dim: int = 256              # transformer width
    depth: int = 6              # number of blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    cam_channels: int = 6       # Plucker rays concatenated to the RGB pixels
    src_concat: bool = False    # a target frame's input also carries its pair's source pixels (zeros
                                # for source frames), so the residual target - source is local
    residual: bool = True       # diffuse the target minus its source frame (anchors on the source)
    src_sees_tgt: bool = False  # may source tokens attend to target tokens?
    shift: float = 2.0          # timestep shift toward high noise, train and sample
    pred: str = "v"             # network output: "v" (velocity) or "x" (the clean x0, v derived from it)
    t_min: float = 0.05         # x-prediction: the flow loss divides by max(t, t_min)
    cam_rope: tuple = ()        # inverse depths of the planes that place tokens for RoPE, one a head
                                # (cycled); () = every token at its own patch grid position
    chunk: int = 1              # student: pairs a chunk
    window: int = 0             # student: chunks attended, the current one included (0 = all)
    sink: int = 0               # student: first chunks always kept in the window


PRESETS = {
    "tiny": Config(size=16, patch=4, dim=64, depth=2, heads=2),            # tests: well under 1 s a step
    "small": Config(size=32, patch=4, dim=256, depth=6, heads=4),          # 2-core CPU, ~2 hours
    "base": Config(size=64, patch=4, dim=768, depth=12, heads=12),         # one GPU
}

# -----------------------------------------------------------------------------
# rectified flow: x_t = (1 - t) x0 + t e, v = e - x0  (t = 0 data, t = 1 noise)

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


def v_to_x0(xt, v, t):
    return xt - _bc(t, xt) * v                               # x0 = x_t - t v


def to_x0(out, xt, t, cfg):
    """The network's output -> its estimate of the clean x0 (what samplers and DMD use)."""
    return out if cfg.pred == "x" else v_to_x0(xt, out, t)


def flow_loss(out, x0, e, t, cfg):
    """Rectified-flow loss per frame (B, T): || v_pred - v ||^2 with v = e - x0. For x-prediction
    v_pred = (x_t - x0_pred) / t, so the loss is || x0_pred - x0 ||^2 / t^2, with t floored at
    cfg.t_min so that nearly clean frames do not dominate ("Back to Basics", 2025)."""
    if cfg.pred == "x":
        err = (out - x0) / _bc(t, x0).clamp(min=cfg.t_min)
    else:
        err = out - (e - x0)
    return err.float().square().flatten(2).mean(-1)


def encode_target(tgt, src, cfg):
    """Pixels -> the variable the flow runs on (x0): the target, or its difference from the
    synchronized source frame when cfg.residual (a static camera then has x0 = 0)."""
    return tgt - src if cfg.residual else tgt


def decode_target(x0, src, cfg):
    return (x0 + src if cfg.residual else x0).clamp(-1, 1)

# -----------------------------------------------------------------------------
# attention masks: one rule, used by the full forward and by the KV-cached forward alike

def visible(time_q, role_q, time_k, role_k, cfg, causal):
    """Bool (Nq, Nk): may query token q attend to key token k? time = pair index, role 0 source,
    1 target. Bidirectional: all, but source never sees target unless cfg.src_sees_tgt.
    Causal: key chunk <= query chunk, within the last cfg.window chunks or a sink chunk."""
    ok = torch.ones(len(time_q), len(time_k), dtype=torch.bool, device=time_q.device)
    if not cfg.src_sees_tgt:
        ok &= ~((role_q[:, None] == 0) & (role_k[None, :] == 1))
    if causal:
        cq, ck = time_q[:, None] // cfg.chunk, time_k[None, :] // cfg.chunk
        ok &= ck <= cq
        if cfg.window > 0:
            ok &= (cq - ck < cfg.window) | (ck < cfg.sink)
    return ok


class KVCache:
    """Per-layer keys/values (after RoPE, absolute time positions) of the chunks already
    generated, with their token metadata. Only passes with write=True append to it; a rolling
    window keeps the last cfg.window chunks (plus sink chunks), so memory and per-frame cost
    stay flat however long the stream."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.k, self.v = [None] * cfg.depth, [None] * cfg.depth
        self.time = self.role = None

    def __len__(self):
        return 0 if self.time is None else len(self.time)

    def extend(self, time, role):
        """Called once all layers appended the tokens of a written pass; then trim the window."""
        cat = lambda a, b: b if a is None else torch.cat([a, b])
        self.time, self.role = cat(self.time, time), cat(self.role, role)
        if self.cfg.window > 0:
            ck, cur = self.time // self.cfg.chunk, int(time.max()) // self.cfg.chunk
            keep = (ck > cur - self.cfg.window) | (ck < self.cfg.sink)  # visible() masks the rest
            if not keep.all():
                idx = keep.nonzero().squeeze(1)
                self.time, self.role = self.time[idx], self.role[idx]
                self.k = [k.index_select(2, idx) for k in self.k]
                self.v = [v.index_select(2, idx) for v in self.v]

# -----------------------------------------------------------------------------
# modules

def rope_angles(time, row, col, head_dim, base=10000.0):
    """3D RoPE angles (..., N, head_dim / 2): a quarter of the rotary pairs for time, the rest
    split between row and column. time (N,); row, col (N,) or per head (B, H, N), fractional
    positions allowed."""
    n_t = head_dim // 8                     # rotary pairs for time (a quarter of the channels)
    n_h = (head_dim // 2 - n_t) // 2
    n_w = head_dim // 2 - n_t - n_h
    f = lambda n: base ** (-torch.arange(n, device=time.device, dtype=torch.float32) / n)
    a_h, a_w = row[..., None].float() * f(n_h), col[..., None].float() * f(n_w)
    a_t = (time[:, None].float() * f(n_t)).expand(a_h.shape[:-1] + (n_t,))
    return torch.cat([a_t, a_h, a_w], -1)


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
    m, d = cam[:, :, :3], cam[:, :, 3:]                                          # (B, F, 3, H, W)
    o = torch.cross(d, m, dim=2)                                                 # ray point nearest the origin
    rho = torch.tensor(cfg.cam_rope, device=cam.device, dtype=cam.dtype).view(1, -1, 1, 1, 1)
    dz = d[:, None, :, 2].clamp(min=0.05)                                        # (B, 1, F, H, W)
    # the ray meets z = 1/rho at o + (1/rho - o_z) / d_z d, which projects to x/z = rho o_x + (1 - rho o_z) d_x / d_z
    ox, oy, oz = (o[:, None, :, i] for i in range(3))
    u = rho * ox + (1 - rho * oz) * d[:, None, :, 0] / dz                      # (B, P, F, H, W)
    v = rho * oy + (1 - rho * oz) * d[:, None, :, 1] / dz
    g, P = cfg.size // cfg.patch, len(cfg.cam_rope)
    pool = lambda z: F.avg_pool2d(z.flatten(0, 2), cfg.patch).view(z.shape[0], P, -1)   # (B, P, F * L)
    col, row = g * (pool(u) + 0.5) - 0.5, g * (pool(v) + 0.5) - 0.5
    head = torch.arange(cfg.heads, device=cam.device) % P
    return row[:, head], col[:, head]                                            # (B, heads, F * L)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, Dh) by the angles (N, Dh/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.dim // cfg.heads, eps=1e-6)  # qk-norm keeps logits tame
        self.k_norm = nn.RMSNorm(cfg.dim // cfg.heads, eps=1e-6)

    def forward(self, x, rope, mask, cache=None, layer=0, write=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if cache is not None:
            if cache.k[layer] is not None:                       # earlier chunks come first
                k, v = torch.cat([cache.k[layer], k], 2), torch.cat([cache.v[layer], v], 2)
            if write:
                cache.k[layer], cache.v[layer] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)            # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """DiT block with adaLN-Zero; the modulation is per frame (B, F, 1, 6D), i.e. per token."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x, c, rope, mask, cache=None, layer=0, write=False):
        B, Fr, L, D = x.shape                                                    # (B, F, L, D)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, :, None].chunk(6, -1)      # each (B, F, 1, D)
        h = (self.norm1(x) * (1 + sc1) + sh1).reshape(B, Fr * L, D)
        x = x + g1 * self.attn(h, rope, mask, cache, layer, write).view(B, Fr, L, D)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


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
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, 3 * p * p)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():                                                 # linears: Xavier, bias 0
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.role_embed, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        for b in self.blocks:                                                    # adaLN-Zero: blocks start
            nn.init.zeros_(b.ada[1].weight), nn.init.zeros_(b.ada[1].bias)     # as the identity
        for m in (self.ada_out[1], self.out):                                    # and the output at 0
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def patchify(self, x):  # (B, F, C, H, W) -> (B, F, L, C p p)
        return rearrange(x, "b f c (h p) (w q) -> b f (h w) (c p q)", p=self.cfg.patch, q=self.cfg.patch)

    def unpatchify(self, x):  # (B, F, L, 3 p p) -> (B, F, 3, H, W)
        return rearrange(x, "b f (h w) (c p q) -> b f c (h p) (w q)", h=self.grid, p=self.cfg.patch, q=self.cfg.patch)

    def forward_frames(self, x, cam, t, time, role, causal, cache=None, write=False):
        """Core forward over F frames with per-frame metadata.
        x (B, F, 3, H, W) pixels or noisy x_t; cam (B, F, C, H, W): the frame's conditioning
        channels (frame_cond: Plucker rays, after the pair's source pixels if cfg.src_concat); t (B, F) noise levels;
        time (F,) pair index (absolute); role (F,) 0 source / 1 target.
        With a cache, the frames attend to the cached tokens too; write=True appends them.
        Returns the network's prediction (B, F, 3, H, W): v, or x0 (cfg.pred); to_x0 converts."""
        B, Fr = x.shape[:2]
        L, g = self.grid ** 2, self.grid
        h = self.patch_embed(self.patchify(torch.cat([x, cam], 2)))             # (B, F, L, D)
        h = h + self.role_embed[role][None, :, None]
        c = self.t_embed(timestep_embedding(t, 256))                             # (B, F, D)
        # token metadata and RoPE: time = pair index; rows and columns on the patch grid, or
        # where the token's rays land in the source image (camera RoPE)
        tok_time, tok_role = time.repeat_interleave(L), role.repeat_interleave(L)  # (N,)
        if self.cfg.cam_rope:
            rows, cols = plane_positions(cam[:, :, -6:], self.cfg)               # (B, heads, N)
        else:
            rows = torch.arange(g, device=x.device).repeat_interleave(g).repeat(Fr)
            cols = torch.arange(g, device=x.device).repeat(g * Fr)
        ang = rope_angles(tok_time, rows, cols, self.cfg.dim // self.cfg.heads)  # (N or B, H, N, Dh / 2)
        rope = (ang.cos(), ang.sin())
        if cache is not None and len(cache):
            mask = visible(tok_time, tok_role, torch.cat([cache.time, tok_time]),
                           torch.cat([cache.role, tok_role]), self.cfg, causal)
        else:
            mask = visible(tok_time, tok_role, tok_time, tok_role, self.cfg, causal)
        mask = None if mask.all() else mask
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, rope, mask, cache, i, write)
        if cache is not None and write:
            cache.extend(tok_time, tok_role)
        sh, sc = self.ada_out(c)[:, :, None].chunk(2, -1)
        return self.unpatchify(self.out(self.norm_out(h) * (1 + sc) + sh))     # (B, F, 3, H, W)

    def forward(self, src, xt, cam_src, cam_tgt, t, causal=False, time0=0):
        """Full forward over T interleaved pairs [s0, t0, s1, t1, ...].
        src, xt (B, T, 3, H, W): clean source, noisy target; cam_* (B, T, 6, H, W);
        t (B, T) noise level of each target (sources are always clean, t = 0).
        Returns the prediction (v or x0, cfg.pred) for the targets (B, T, 3, H, W)."""
        B, T = src.shape[:2]
        assert not causal or time0 % self.cfg.chunk == 0, "a causal forward starts on a chunk boundary"
        x = torch.stack([src, xt], 2).flatten(1, 2)                               # (B, 2T, 3, H, W)
        cam = torch.stack([frame_cond(self.cfg, None, cam_src), frame_cond(self.cfg, src, cam_tgt)], 2).flatten(1, 2)
        tt = torch.stack([torch.zeros_like(t), t], 2).flatten(1, 2)               # (B, 2T)
        time = torch.arange(T, device=src.device).repeat_interleave(2) + time0
        role = torch.tensor([0, 1], device=src.device).repeat(T)
        return self.forward_frames(x, cam, tt, time, role, causal)[:, 1::2]

def frame_cond(cfg, src, cam):
    """A frame's conditioning channels: its Plucker rays cam (B, F, 6, H, W), and with
    cfg.src_concat first the synchronized source pixels src (B, F, 3, H, W) for a target frame,
    zeros (src None) for a source frame."""
    if not cfg.src_concat:
        return cam
    return torch.cat([torch.zeros_like(cam[:, :, :3]) if src is None else src, cam], 2)

# -----------------------------------------------------------------------------
# samplers

@torch.no_grad()
def teacher_sample(model, src, cam_src, cam_tgt, steps=50, generator=None, noise=None):
    """Bidirectional Euler ODE sampler from t = 1 to 0 over all T pairs at once.
    Returns target pixels (B, T, 3, H, W)."""
    cfg = model.cfg
    x = noise if noise is not None else torch.randn(src.shape, generator=generator, device=src.device)
    ts = shift_t(torch.linspace(1, 0, steps + 1, device=src.device), cfg.shift)
    for i in range(steps):
        t = ts[i].expand(src.shape[:2])
        x0 = to_x0(model(src, x, cam_src, cam_tgt, t), x, t, cfg)
        x = x0 + (ts[i + 1] / ts[i]) * (x - x0)        # Euler: x + (t' - t) v with v = (x - x0) / t
    return decode_target(x, src, cfg)


def student_timesteps(steps, shift):
    """The student's few-step schedule: t_j = shift(1 - j / steps), e.g. 4 steps: 1, .75, .5, .25
    warped toward noise (1, .86, .67, .4 with shift 2)."""
    return [shift_t(1 - j / steps, shift) for j in range(steps)]


def chunk_pass(model, cache, src, x, cam_src, cam_tgt, t, time, write, with_src=False):
    """One KV-cached pass of a chunk's targets x (B, n, 3, H, W) at noise level t (B, n).
    If source tokens never see targets, the chunk's source frames were written to the cache
    already (once, see student_chunk) and only the targets run; otherwise, or with_src, both
    run as pairs (the sources then encoded in this pass)."""
    B, n = x.shape[:2]
    ones = torch.ones(n, dtype=torch.long, device=x.device)
    cfg = model.cfg
    if not cfg.src_sees_tgt and not with_src:
        return model.forward_frames(x, frame_cond(cfg, src, cam_tgt), t, time, ones, True, cache, write)
    pair = lambda a, b: torch.stack([a, b], 2).flatten(1, 2)
    out = model.forward_frames(pair(src, x), pair(frame_cond(cfg, None, cam_src), frame_cond(cfg, src, cam_tgt)), pair(torch.zeros_like(t), t),
                               time.repeat_interleave(2), torch.stack([0 * ones, ones], 1).flatten(), True, cache, write)
    return out[:, 1::2]


def student_chunk(model, cache, src, cam_src, cam_tgt, time, steps, noise, exit_step=None, src_grad=False):
    """Generate one chunk of n target frames with the student's KV cache, in diffusion space.
    src (B, n, 3, H, W), cam_* (B, n, 6, H, W), time (n,) absolute pair indices,
    noise (steps, B, n, 3, H, W): the starting noise and the fresh noise of each re-noising.
    Runs steps 0..exit_step (default: all); only the last of them keeps gradients (when grad
    is enabled), then a t = 0 pass without gradient writes the chunk's clean keys and values.
    src_grad (training): the chunk's sources are not cached once but encoded inside every pass,
    so the exit step's gradient also reaches the source path (the same outputs, more compute)."""
    B, n = src.shape[:2]
    ts = student_timesteps(steps, model.cfg.shift)
    last = steps - 1 if exit_step is None else exit_step
    grad = torch.is_grad_enabled()
    zeros = torch.zeros(B, n, device=src.device)
    with torch.no_grad():
        if not model.cfg.src_sees_tgt and not src_grad:                      # encode the source once
            model.forward_frames(src, frame_cond(model.cfg, None, cam_src), zeros, time, 0 * time, True, cache, True)
    x = noise[0]
    for j in range(last + 1):
        with torch.set_grad_enabled(grad and j == last):
            out = chunk_pass(model, cache, src, x, cam_src, cam_tgt, zeros + ts[j], time, False, src_grad)
            x0 = to_x0(out, x, zeros + ts[j], model.cfg)                      # x0 = x_t - t v (or predicted)
        if j < last:
            x = (1 - ts[j + 1]) * x0 + ts[j + 1] * noise[j + 1]             # re-noise to t_{j+1}
    with torch.no_grad():
        chunk_pass(model, cache, src, x0.detach(), cam_src, cam_tgt, zeros, time, True, src_grad)   # clean KV
    return x0


@torch.no_grad()
def student_sample(model, src, cam_src, cam_tgt, steps=4, generator=None, cache=None, time0=0):
    """Few-step block-causal generation of T target frames, chunk by chunk with a KV cache.
    Returns target pixels (B, T, 3, H, W)."""
    cfg, (B, T) = model.cfg, src.shape[:2]
    cache = cache if cache is not None else KVCache(cfg)
    out = []
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        n = sl.stop - sl.start
        noise = torch.randn((steps, B, n) + src.shape[2:], generator=generator, device=src.device)
        time = torch.arange(sl.start, sl.stop, device=src.device) + time0
        x0 = student_chunk(model, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl], time, steps, noise)
        out.append(decode_target(x0, src[:, sl], cfg))
    return torch.cat(out, 1)

# -----------------------------------------------------------------------------
# sizes, FLOPs, checkpoints

def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_forward(cfg, frames, ctx_frames=None):
    """Forward FLOPs for `frames` frames attending to `ctx_frames` frames (default: the same):
    2 x (weight multiply-adds) per token, plus attention scores and values."""
    N = frames * (cfg.size // cfg.patch) ** 2
    Nk = (frames if ctx_frames is None else ctx_frames) * (cfg.size // cfg.patch) ** 2
    D, Hd = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    per_token = cfg.depth * (4 * D * D + 2 * D * Hd) + D * (3 + 3 * cfg.src_concat + cfg.cam_channels) * cfg.patch ** 2 + D * 3 * cfg.patch ** 2
    per_frame = cfg.depth * 6 * D * D + 2 * D * D + 256 * D + D * D             # adaLN, t embedding
    return 2 * (N * per_token + frames * per_frame) + cfg.depth * 4 * N * Nk * D


def save_checkpoint(path, **state):
    """Atomic save (write then rename), so an interrupted save never leaves a broken file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class StopFlag:
    """Ctrl-C (SIGINT) during training only raises a flag, which the loop reads between steps,
    so the checkpoint it then saves never holds a half-applied step. A second Ctrl-C stops at once.
    Under DDP, `stop()` all-reduces the flag so every rank stops at the same step."""
    def __init__(self):
        self.hit = False
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def stop(self, ddp=False, device="cpu"):
        if not ddp:
            return self.hit
        import torch.distributed as dist
        f = torch.tensor([float(self.hit)], device=device)
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        return bool(f.item())


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict (config, model, ...). Errors are one line naming the file: missing
    (FileNotFoundError), not a file torch.load reads, or not a RealCam-min checkpoint (ValueError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # torch's own message runs to 8 lines and suggests weights_only=False
        raise ValueError(f"cannot load checkpoint {path}: not a file torch.load reads ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a RealCam-min checkpoint (no config/model)")
    return ckpt


# the reference student in the repository, found from any working directory
SHIPPED_STUDENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "student_small.pt")


def load_model(path, device="cpu", weights="ema"):
    """Rebuild a model from a checkpoint (config inside); weights 'ema' (if present) or 'model'."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a RealCam-min checkpoint (no config/model)")
    model = RealCamDiT(Config(**ckpt["config"]))
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
