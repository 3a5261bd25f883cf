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
import re
import signal
from collections import namedtuple
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
    ada_single: bool = False    # one adaLN projection shared by the blocks, plus a learned table
                                # a block (adaLN-single): a third fewer weights, so more width fits
    warp: tuple = ()            # the warp head's planes, inverse depths (() = no head): each target
                                # pixel picks a plane (softmax) and a gate, and the output adds gate *
                                # (the source where the pixel's ray meets the picked plane - the source)


# The recipe that learns the geometry (README, Results: the ablation): x-prediction, camera RoPE
# (planes at inverse depths 1.6, 1.0, 0.6 and 0 = infinity, one a head), the source's pixels
# beside each target's, residual targets. Config's own defaults are the plain baseline, which
# checkpoints written before these fields existed also describe.
RECIPE = dict(pred="x", cam_rope=(1.6, 1.0, 0.6, 0.0), src_concat=True, residual=True)
# The warp head's planes (distill.py --warp): the synthetic scenes' inverse depths are 0 (sky) to
# about 2.3 (the subject at 1), some ground closer
WARP_PLANES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)

PRESETS = {
    "tiny": Config(size=16, patch=4, dim=64, depth=2, heads=2, **RECIPE),      # tests: well under 1 s a step
    "small": Config(size=32, patch=4, dim=320, depth=6, heads=4, ada_single=True, **RECIPE),  # 2-core CPU, ~1.7 hours
    "base": Config(size=64, patch=4, dim=768, depth=12, heads=12, **RECIPE),   # one GPU
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
# attention layouts: which keys each query sees is decided from Python metadata (the pair
# index and role of every frame), never by looking at tensors, so the hot path has no host
# syncs; masks, index and RoPE tables are built once per layout and kept on the device

_CONST = {}


def const(key, make):
    """A tensor (or tuple of them) that depends on Python metadata only, made once per key (the
    key names the device) and kept: masks, index and RoPE tables."""
    val = _CONST.get(key)
    if val is None:
        if len(_CONST) > 1024:
            _CONST.clear()
        val = _CONST[key] = make()
    return val


def ints(x):
    """Per-frame metadata as a tuple of Python ints. A CUDA tensor costs a host sync here: pass
    a range, a list or a tuple."""
    return tuple(x.tolist()) if torch.is_tensor(x) else tuple(int(i) for i in x)


def visible(time_q, role_q, time_k, role_k, cfg, causal):
    """Bool (Nq, Nk): may query token q attend to key token k? time = pair index, role 0 source,
    1 target. Bidirectional: all, but source never sees target unless cfg.src_sees_tgt.
    Causal: key chunk <= query chunk, within the last cfg.window chunks or a sink chunk.
    The reference rule; sees() is the same rule on Python ints."""
    ok = torch.ones(len(time_q), len(time_k), dtype=torch.bool, device=time_q.device)
    if not cfg.src_sees_tgt:
        ok &= ~((role_q[:, None] == 0) & (role_k[None, :] == 1))
    if causal:
        cq, ck = time_q[:, None] // cfg.chunk, time_k[None, :] // cfg.chunk
        ok &= ck <= cq
        if cfg.window > 0:
            ok &= (cq - ck < cfg.window) | (ck < cfg.sink)
    return ok


def sees(cq, rq, ck, rk, cfg, causal=True):
    """visible() for one query (chunk, role) and one key (chunk, role), in Python."""
    if rq == 0 and rk == 1 and not cfg.src_sees_tgt:
        return False
    return not causal or ck <= cq and (cfg.window <= 0 or cq - ck < cfg.window or ck < cfg.sink)


def sink_shift(cq, cfg):
    """RoPE time shift (in pairs) of the sink chunks as seen from chunk cq. Once the window has
    moved past them, the sinks sit right before its first chunk: the distance from a query to
    the sink stays below (window + sink) chunks however long the stream, as in training, where
    clips are short. 0 while there is no gap, i.e. always in clips of window + sink chunks."""
    if cfg.window <= 0 or cfg.sink <= 0:
        return 0
    return cfg.chunk * max(0, cq - cfg.window + 1 - cfg.sink)


def runs(pairs):
    """[(a, b)] with both members counting up by one -> [(a0, a1, b0, b1)] maximal runs."""
    out = []
    for a, b in pairs:
        if out and out[-1][1] == a and out[-1][3] == b:
            out[-1][1], out[-1][3] = a + 1, b + 1
        else:
            out.append([a, a + 1, b, b + 1])
    return [tuple(r) for r in out]


# A forward without cache attends by groups of queries: groups ((query slice, key slice), ...),
# an optional mask (one group only), extra keys (shifted copies of the sinks: (key slice,
# cos, sin) appended to the keys), and the number of (query, key) token pairs it scores.
Plan = namedtuple("Plan", "groups mask extra pairs")


def full_plan(time, role, causal, cfg, L, device):
    key = ("plan", time, role, causal, cfg.src_sees_tgt, cfg.chunk, cfg.window, cfg.sink, L,
           cfg.dim // cfg.heads, str(device))
    return const(key, lambda: _full_plan(time, role, causal, cfg, L, device))


def _full_plan(time, role, causal, cfg, L, device):
    Fr, N, ns = len(time), len(time) * L, role.count(0)
    everything = (slice(None), slice(None))
    if not causal and (cfg.src_sees_tgt or ns in (0, Fr)):
        return Plan((everything,), None, (), N * N)
    if not causal and role == (0,) * ns + (1,) * (Fr - ns):
        # sources first: sources attend to sources, targets to everything; two unmasked calls
        a = ns * L
        return Plan(((slice(0, a), slice(0, a)), (slice(a, N), slice(None))), None, (), a * a + (N - a) * N)
    # a dense mask from the same rule (block-causal, or unsorted roles), plus, for queries whose
    # window has moved past the sinks, a copy of the sink keys at the shifted RoPE time
    C = cfg.chunk
    shift = [sink_shift(t // C, cfg) if causal else 0 for t in time]
    sinks = [j for j in range(Fr) if time[j] // C < cfg.sink]
    copies = [(j, s) for s in sorted(set(shift) - {0}) for j in sinks]
    keys = [(j, 0) for j in range(Fr)] + copies

    def ok(i, j, s):
        if not sees(time[i] // C, role[i], time[j] // C, role[j], cfg, causal):
            return False
        return s == shift[i] or s == 0 and time[j] // C >= cfg.sink
    m = torch.tensor([[ok(i, j, s) for j, s in keys] for i in range(Fr)])
    mask = None if m.all() else m.repeat_interleave(L, 0).repeat_interleave(L, 1).to(device)
    n_t = cfg.dim // cfg.heads // 8
    extra, prev = [], None
    for j, s in copies:
        if prev and prev[1] == s and prev[0].stop == j * L:
            prev = (slice(prev[0].start, (j + 1) * L), s)
            extra[-1] = prev
        else:
            prev = (slice(j * L, (j + 1) * L), s)
            extra.append(prev)
    extra = tuple((sl, *time_rotation(s, n_t, device)) for sl, s in extra)
    return Plan((everything,), mask, extra, N * (N + len(copies) * L))


def attend(q, k, v, plan):
    """Attention of q (B, H, N, Dh) on k, v as a Plan says; unmasked groups are Flash-eligible."""
    if plan.extra:
        k = torch.cat([k] + [rotate_time(k[:, :, sl], c, s) for sl, c, s in plan.extra], 2)
        v = torch.cat([v] + [v[:, :, sl] for sl, _, _ in plan.extra], 2)
    ys = [F.scaled_dot_product_attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], attn_mask=plan.mask)
          for qs, ks in plan.groups]
    return ys[0] if len(ys) == 1 else torch.cat(ys, 2)


def attention_pairs(cfg, T, causal=False):
    """(query, key) token pairs the attention of one forward over T pairs scores (for FLOPs)."""
    time, role = tuple(range(T)) * 2, (0,) * T + (1,) * T
    return full_plan(time, role, causal, cfg, (cfg.size // cfg.patch) ** 2, "cpu").pairs


# A KV-cached pass: writes (pass tokens -> buffer slots), query groups (query slice, key
# selection: a slice of the buffers or an index tensor, and where this pass's own tokens sit
# among those keys), the RoPE times of the pass relative to its chunk, whether the cache is in
# its steady state (fixed layout: a CUDA graph can replay the pass), a key naming the layout.
CachePlan = namedtuple("CachePlan", "chunk writes groups rel_time steady pairs key")


class KVCache:
    """Static per-layer key/value buffers of the chunks that a later query can still see: the
    sink chunks and the last cfg.window chunks, so memory and per-frame cost stay flat however
    long the stream. Only passes with write=True make their frames part of the cache.

    Layout of each buffer (B, H, slots, Dh), in frame slots of L tokens: target frames to the
    left and source frames to the right of a centre M, chunks in time order outward from it
    (sinks innermost). When the window moves on, the oldest window chunk is dropped and the
    rest move inward by one chunk, so the newest chunk always sits at the outer edges: every
    query attends to one contiguous slice (targets: all; sources: the right half) with no mask,
    and in the steady state every pass has the same layout (CUDA graphs, graphs=True).

    RoPE: keys are stored rotated in space (a per-token rotation, camera RoPE included, applied
    once when written) and in time relative to the current chunk; their raw time channels are
    kept too, so when a new chunk starts the time rotation is redone for the new positions.
    Relative positions keep angles small in long streams, and sink chunks that the window left
    behind sit right before it (sink_shift), so the distance to a sink is bounded as in training.
    """

    def __init__(self, cfg, graphs=False):
        self.cfg, self.graphs = cfg, graphs
        self.L = (cfg.size // cfg.patch) ** 2
        self.k, self.v, self.kt = [None] * cfg.depth, [None] * cfg.depth, [None] * cfg.depth
        self.reset()                # chunks: held, in time order, the last one current; written: (chunk,
                                    # role) written; cur, n: the current chunk and its frames
        self.M = cfg.chunk * (cfg.window + cfg.sink if cfg.window > 0 else 4)   # centre (frame slots)
        self._graphs, self._pool = {}, None

    def reset(self):
        """Start a new stream; the buffers and captured CUDA graphs stay (same batch size)."""
        self.chunks, self.written, self.cur, self.n = [], set(), None, 0

    def __len__(self):
        """Tokens written and still visible to a later query."""
        return self.L * sum(self.n if c == self.cur else self.cfg.chunk for c, _ in self.written)

    def slot(self, c, r, f):
        """Frame slot of frame f of chunk c (held), role r."""
        j, n = self.chunks.index(c), self.n if c == self.cur else self.cfg.chunk
        return self.M - j * self.cfg.chunk - n + f if r == 1 else self.M + j * self.cfg.chunk + f

    def begin(self, time, role, write):
        """Python bookkeeping of a pass over frames (time, role) of one chunk -> CachePlan. On the
        first pass of a new chunk the buffers move (drop chunks no query sees any more) and the
        cached keys are rotated to their new relative times."""
        cfg, C, L = self.cfg, self.cfg.chunk, self.L
        cq = time[0] // C
        if any(t // C != cq for t in time):
            raise ValueError(f"a cached pass holds frames of one chunk, got pairs {time}")
        n = max(time) - cq * C + 1
        if cq != self.cur:
            self._advance(cq, n)
        elif n > self.n:
            raise ValueError(f"chunk {cq} has {self.n} frames, got frame {max(time)}")
        if not write and any((cq, r) in self.written for r in role):
            raise ValueError(f"a pass without write on chunk {cq} after it was written")
        slots = [self.slot(cq, r, t - cq * C) for t, r in zip(time, role)]
        writes = tuple((slice(a0 * L, a1 * L), slice(s0 * L, s1 * L)) for a0, a1, s0, s1 in runs(zip(range(len(time)), slots)))
        # query groups: runs of one role (one group if all see the same keys)
        qruns = [[0, len(time)]] if cfg.src_sees_tgt or len(set(role)) == 1 else []
        for i, r in enumerate(role if not qruns else ()):
            if qruns and role[qruns[-1][0]] == r:
                qruns[-1][1] = i + 1
            else:
                qruns.append([i, i + 1])
        groups, pairs, key = [], 0, [tuple((w.start, w.stop, d.start, d.stop) for w, d in writes)]
        held = [(c, r) for c, r in self.written if c != cq or r not in role]
        for i0, i1 in qruns:
            rq = role[i0]                                                 # (with src_sees_tgt, any role)
            ks = {self.slot(c, r, f) for c, r in held if sees(cq, rq, c, r, cfg)
                  for f in range(self.n if c == cq else C)}
            ks |= {s for s, r in zip(slots, role) if sees(cq, rq, cq, r, cfg)}
            ks = sorted(ks)
            if ks[-1] - ks[0] + 1 == len(ks):
                sel = slice(ks[0] * L, (ks[-1] + 1) * L)
            else:
                dev = self.v[0].device if self.v[0] is not None else "cpu"
                sel = const(("slots", tuple(ks), L, str(dev)),
                            lambda: (torch.tensor(ks, device=dev)[:, None] * L + torch.arange(L, device=dev)).flatten())
            pos = {s: p for p, s in enumerate(ks)}
            cur = tuple((slice(a0 * L, a1 * L), slice(p0 * L, p1 * L))
                        for a0, a1, p0, p1 in runs((i, pos[s]) for i, (s, r) in enumerate(zip(slots, role))
                                                   if sees(cq, rq, cq, r, cfg)))
            groups.append((slice(i0 * L, i1 * L), sel, cur))
            pairs += (i1 - i0) * L * len(ks) * L
            key.append((i0, i1, tuple(ks)))
        rel = tuple(t - cq * C for t in time)
        steady = cfg.window > 0 and len(self.chunks) == cfg.window + cfg.sink and self.n == C
        return CachePlan(cq, writes, tuple(groups), rel, steady, pairs, (tuple(key), rel, role))

    def end(self, plan, role, write):
        """After the pass: its frames become part of the cache if written; once both roles of a
        chunk are written, chunks that no later query sees are dropped (exact trimming)."""
        if write:
            self.written |= {(plan.chunk, r) for r in role}
            if {(plan.chunk, 0), (plan.chunk, 1)} <= self.written:
                self.written = {(c, r) for c, r in self.written if sees(plan.chunk + 1, 1, c, r, self.cfg)}

    def _advance(self, cq, n):
        cfg, C, L = self.cfg, self.cfg.chunk, self.L
        if self.cur is not None and cq <= self.cur:
            raise ValueError(f"chunk {cq} after chunk {self.cur}: a KV cache runs forward in time")
        if self.cur is not None and self.n < C:
            raise ValueError(f"chunk {cq} after the partial chunk {self.cur} ({self.n} of {C} frames)")
        keep = [c for c in self.chunks if sees(cq, 1, c, 1, cfg) and any((c, r) in self.written for r in (0, 1))]
        self.written = {(c, r) for c, r in self.written if c in keep}
        if (len(keep) + 1) * C > self.M:                                  # no window: grow
            self._grow(max(2 * self.M, (len(keep) + 1) * C))
        M, old = self.M, {c: j for j, c in enumerate(self.chunks)}
        moves = runs((old[c], j) for j, c in enumerate(keep))             # runs of chunks moving together
        self.chunks, self.cur, self.n = keep + [cq], cq, n
        if self.v[0] is None:
            return
        spans = []
        for jo0, jo1, jn0, jn1 in moves:
            if jo0 != jn0:                                                # target side, then source side
                spans.append((slice((M - jo1 * C) * L, (M - jo0 * C) * L), slice((M - jn1 * C) * L, (M - jn0 * C) * L)))
                spans.append((slice((M + jo0 * C) * L, (M + jo1 * C) * L), slice((M + jn0 * C) * L, (M + jn1 * C) * L)))
        for bufs in (self.k, self.kt, self.v):
            for b in bufs:
                for src, dst in spans:
                    b[:, :, dst] = b[:, :, src].clone()
        # new relative RoPE times of the held keys: time channels re-rotated from the raw ones
        j = len(keep)
        if j:
            shift = sink_shift(cq, cfg)
            times = [0] * (2 * j * C)
            for i, c in enumerate(keep):
                for f in range(C):
                    t = c * C + f + (shift if c < cfg.sink else 0) - cq * C
                    times[j * C - i * C - C + f], times[j * C + i * C + f] = t, t
            dev, n_t = self.v[0].device, self.kt[0].shape[-1] // 2
            cos, sin = const(("krot", tuple(times), L, n_t, str(dev)), lambda: time_rotation(
                torch.tensor(times, device=dev).repeat_interleave(L), n_t, dev))
            span = slice((M - j * C) * L, (M + j * C) * L)
            for k, kt in zip(self.k, self.kt):
                k[:, :, span, :2 * n_t] = apply_rope(kt[:, :, span], cos, sin).to(k.dtype)

    def _grow(self, M):
        off = (M - self.M) * self.L
        for bufs in (self.k, self.kt, self.v):
            for i, b in enumerate(bufs):
                if b is not None:
                    new = b.new_zeros(b.shape[:2] + (2 * M * self.L, b.shape[3]))
                    new[:, :, off:off + b.shape[2]] = b
                    bufs[i] = new
        self.M = M

    def attend(self, layer, q, k, kt, v, plan):
        """Write this pass's keys and values (k rotated, kt its raw time channels) into their
        slots, then attend to the keys of each query group: slices of the buffers, no mask.
        With gradients, the keys are a copy whose own-pass part carries them."""
        if self.v[layer] is None:
            shape = (v.shape[0], v.shape[1], 2 * self.M * self.L)
            self.k[layer], self.v[layer] = v.new_zeros(shape + (k.shape[3],)), v.new_zeros(shape + (v.shape[3],))
            self.kt[layer] = v.new_zeros(shape + (kt.shape[3],))
        K, KT, V = self.k[layer], self.kt[layer], self.v[layer]
        for ps, ss in plan.writes:
            K[:, :, ss], KT[:, :, ss], V[:, :, ss] = k[:, :, ps].detach(), kt[:, :, ps].detach(), v[:, :, ps].detach()
        ys = []
        for qs, sel, cur in plan.groups:
            kk, vv = K[:, :, sel], V[:, :, sel]
            if q.requires_grad:
                kk, vv = kk.clone(), vv.clone()
                for ps, ks in cur:
                    kk[:, :, ks], vv[:, :, ks] = k[:, :, ps], v[:, :, ps]
            ys.append(F.scaled_dot_product_attention(q[:, :, qs], kk, vv))
        return ys[0] if len(ys) == 1 else torch.cat(ys, 2)

    def replay(self, run, plan, *args):
        """run(*args) through a CUDA graph captured for this layout (steady state, no grad): the
        pass's tensor work is the same for every chunk, only the inputs change. Captured on first
        use after one warm-up run (a pass is idempotent: it rewrites its own slots)."""
        key = (plan.key, tuple(a.shape for a in args), args[0].dtype,
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in self._graphs:
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            static = [a.clone() for a in args]
            ac = dict(device_type="cuda", dtype=key[4], enabled=key[3], cache_enabled=False)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.autocast(**ac):
                run(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.autocast(**ac):
                out = run(*static)
            self._graphs[key] = (graph, static, out, list(_CONST.values()))   # keep the tables it reads alive
        graph, static, out, _ = self._graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out.clone()

# -----------------------------------------------------------------------------
# RoPE and modules

def rope_freqs(n, device, base=10000.0):
    return base ** (-torch.arange(n, device=device, dtype=torch.float32) / n)


def rope_angles(time, row, col, head_dim, base=10000.0):
    """3D RoPE angles (..., N, head_dim / 2): a quarter of the rotary pairs (the first ones) for
    time, the rest split between row and column. time (N,); row, col (N,) or per head (B, H, N),
    fractional positions allowed."""
    n_t = head_dim // 8                     # rotary pairs for time (a quarter of the channels)
    n_h = (head_dim // 2 - n_t) // 2
    n_w = head_dim // 2 - n_t - n_h
    f = lambda n: rope_freqs(n, time.device, base)
    a_h, a_w = row[..., None].float() * f(n_h), col[..., None].float() * f(n_w)
    a_t = (time[:, None].float() * f(n_t)).expand(a_h.shape[:-1] + (n_t,))
    return torch.cat([a_t, a_h, a_w], -1)


def time_rotation(time, n_t, device):
    """(cos, sin) of the time angles of RoPE for times (N,) (or one int) -> (N, n_t) (or (n_t,))."""
    t = torch.as_tensor(time, device=device, dtype=torch.float32)
    a = t[..., None] * rope_freqs(n_t, device)
    return a.cos(), a.sin()


def plane_uv(cam, planes):
    """Where each pixel's ray meets the fronto-parallel planes z = 1 / rho of the source camera
    (rho in planes; 0 = infinity), as x / z and y / z in the source camera's frame: u, v
    (B, P, F, H, W). cam (B, F, 6, H, W) Plucker maps (o x d, d) in the source camera's frame.
    The source's intrinsics turn these into image positions (warp_grid); camera RoPE uses them
    as they are, which places source and target tokens by the same rule whatever the focal length."""
    m, d = cam[:, :, :3], cam[:, :, 3:]                                          # (B, F, 3, H, W)
    o = torch.cross(d, m, dim=2)                                                 # ray point nearest the origin
    dev = cam.device
    rho = const(("rho", tuple(planes), str(dev), cam.dtype),
                lambda: torch.tensor(planes, device=dev, dtype=cam.dtype).view(1, -1, 1, 1, 1))
    dz = d[:, None, :, 2].clamp(min=0.05)                                        # (B, 1, F, H, W)
    # the ray meets z = 1/rho at o + (1/rho - o_z) / d_z d, which projects to x/z = rho o_x + (1 - rho o_z) d_x / d_z
    ox, oy, oz = (o[:, None, :, i] for i in range(3))
    u = rho * ox + (1 - rho * oz) * d[:, None, :, 0] / dz                      # (B, P, F, H, W)
    v = rho * oy + (1 - rho * oz) * d[:, None, :, 1] / dz
    return u, v


def source_intrinsics(cam_src):
    """The intrinsics (fx, fy, cx, cy) (B, F, 4), in image widths and heights, of source frames,
    read from their own Plucker maps cam_src (B, F, 6, H, W): the source sits at the identity
    (data.pair_rays), so a pixel's direction is K^-1 (its centre, 1) normalized, and d_x / d_z
    = (u - cx) / fx is a line in the pixel's column u = (j + 1/2) / W; its slope and offset give
    fx and cx (likewise rows). Exact for any pinhole camera, so every caller that builds the
    source's rays (a --fov, a dataset's K) hands the warp head its intrinsics."""
    d = cam_src[:, :, 3:]
    H, W = d.shape[-2:]
    rx, ry = (d[:, :, 0] / d[:, :, 2]).mean(-2), (d[:, :, 1] / d[:, :, 2]).mean(-1)   # (B, F, W), (B, F, H)
    fx = ((W - 1) / W) / (rx[..., -1] - rx[..., 0])
    fy = ((H - 1) / H) / (ry[..., -1] - ry[..., 0])
    return torch.stack([fx, fy, 0.5 / W - fx * rx[..., 0], 0.5 / H - fy * ry[..., 0]], -1)


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


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, Dh) by the angles (N, Dh/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def rotate_time(x, cos, sin):
    """Rotate the time channels of x (..., Dh) (the first 2 n_t, see rope_angles) further by
    the angles (cos, sin) (..., n_t)."""
    n = 2 * cos.shape[-1]
    return torch.cat([apply_rope(x[..., :n], cos, sin).to(x.dtype), x[..., n:]], -1)


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
            if not (cfg.src_concat and cfg.pred == "x"):
                raise ValueError("the warp head (--warp) reads the source pixels and adds to the clean-frame "
                                 "prediction: it needs --src_concat and --pred x")
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
        L, Dh = g * g, cfg.dim // cfg.heads
        tok_time = const(("tok_time", time, L, str(dev)), lambda: torch.tensor(time, device=dev).repeat_interleave(L))
        if cfg.cam_rope:
            ang = rope_angles(tok_time, *plane_positions(cam[:, :, -6:], cfg), Dh)    # (B, H, N, Dh / 2)
            return ang.cos(), ang.sin()

        def grid_rope():
            rows = torch.arange(g, device=dev).repeat_interleave(g).repeat(len(time))
            cols = torch.arange(g, device=dev).repeat(g * len(time))
            ang = rope_angles(tok_time, rows, cols, Dh)                                 # (N, Dh / 2)
            return ang.cos(), ang.sin()
        return const(("rope", time, g, Dh, str(dev)), grid_rope)

    def run(self, x, cam, t, time, role, plan, cache=None, k_src=None):
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
        return out + self.warp(h, cam, k_src)

    def warp(self, h, cam, k_src):
        """The warp head's term (B, F, 3, H, W): gate * (sum_k w_k src(x_k) - src(x)), where x_k is
        where the pixel's ray meets plane k (inverse depth cfg.warp[k]) seen from the source, w =
        softmax of the pixel's plane logits, src the frame's source pixels (cam's first 3
        channels, zeros for source frames). x_k is projected with the source's intrinsics k_src
        (B, F, 4): (fx, fy, cx, cy), source_intrinsics; the target's own intrinsics are in its
        rays. The network only has to say which depth a pixel is at; the camera moves it there
        exactly, to a fraction of a pixel, which 4x4-pixel tokens cannot (DESIGN.md section 3).
        A choice between colours, not a flow field: a logit's gradient is the colour its plane
        would bring, however far away. The gate is linear and starts at 0, so the head starts
        silent and a network without it is continued unchanged (distill.py --warp). Per pixel:
        no key or value changes, the KV cache stays exact."""
        cfg, (B, Fr, _, H, W) = self.cfg, cam.shape
        K = len(cfg.warp)
        o = self.unpatchify(self.warp_out(h)).flatten(0, 1)                      # (BF, K + 1, H, W)
        u, v = plane_uv(cam[:, :, -6:], cfg.warp)                               # (B, K, F, H, W)
        fx, fy, cx, cy = (k[:, None, :, None, None] for k in k_src.to(u.dtype).unbind(-1))
        grid = torch.stack([2 * (fx * u + cx) - 1, 2 * (fy * v + cy) - 1], -1)  # grid_sample's [-1, 1]
        grid = grid.transpose(1, 2).flatten(0, 2)                               # (BFK, H, W, 2)
        src = cam[:, :, :3].flatten(0, 1)                                        # (BF, 3, H, W)
        seen = F.grid_sample(src.repeat_interleave(K, 0), grid, mode="bilinear", padding_mode="border",
                             align_corners=False).view(B * Fr, K, 3, H, W)
        mix = (o[:, :K].softmax(1)[:, :, None] * seen).sum(1)
        return (o[:, K:] * (mix - src)).view(B, Fr, 3, H, W)

    def forward_frames(self, x, cam, t, time, role, causal, cache=None, write=False, k_src=None):
        """Core forward over F frames with per-frame metadata.
        x (B, F, 3, H, W) pixels or noisy x_t; cam (B, F, C, H, W): the frame's conditioning
        channels (frame_cond: Plucker rays, after the pair's source pixels if cfg.src_concat);
        t (B, F) noise levels; time (F,) pair index (absolute), role (F,) 0 source / 1 target:
        Python ranges, lists or tuples (a CUDA tensor costs a host sync).
        With a cache (causal only), the frames (one chunk) attend to the cached tokens too;
        write=True makes them part of the cache. k_src (B, F, 4): each frame's source intrinsics
        (source_intrinsics), which the warp head needs for target frames.
        Returns the network's prediction (B, F, 3, H, W): v, or x0 (cfg.pred); to_x0 converts."""
        time, role = ints(time), ints(role)
        if cache is None:
            plan = full_plan(time, role, causal, self.cfg, self.grid ** 2, x.device)
            return self.run(x, cam, t, time, role, plan, k_src=k_src)
        assert causal, "a KV-cached pass is block-causal"
        plan = cache.begin(time, role, write)
        k = k_src if k_src is not None else x.new_zeros(x.shape[0], x.shape[1], 4)   # a graph's inputs are tensors
        run = lambda x, cam, t, k: self.run(x, cam, t, plan.rel_time, role, plan, cache, k if k_src is not None else None)
        if cache.graphs and x.is_cuda and plan.steady and not torch.is_grad_enabled():
            out = cache.replay(run, plan, x, cam, t, k)
        else:
            out = run(x, cam, t, k)
        cache.end(plan, role, write)
        return out

    def forward(self, src, xt, cam_src, cam_tgt, t, causal=False, time0=0):
        """Full forward over T synchronized pairs, laid out sources first [s0 .. s_T-1, t0 .. t_T-1]
        (attention depends on positions and roles, not on the order of the sequence).
        src, xt (B, T, 3, H, W): clean source, noisy target; cam_* (B, T, 6, H, W) Plucker rays
        (frame_cond adds the source pixels to the targets' if cfg.src_concat);
        t (B, T) noise level of each target (sources are always clean, t = 0).
        Returns the prediction (v or x0, cfg.pred) for the targets (B, T, 3, H, W)."""
        B, T = src.shape[:2]
        assert not causal or time0 % self.cfg.chunk == 0, "a causal forward starts on a chunk boundary"
        x = torch.cat([src, xt], 1)                                               # (B, 2T, 3, H, W)
        cam = torch.cat([frame_cond(self.cfg, None, cam_src), frame_cond(self.cfg, src, cam_tgt)], 1)
        tt = torch.cat([torch.zeros_like(t), t], 1)                               # (B, 2T)
        time, role = tuple(range(time0, time0 + T)) * 2, (0,) * T + (1,) * T
        k = torch.cat([source_intrinsics(cam_src)] * 2, 1) if self.cfg.warp else None
        return self.forward_frames(x, cam, tt, time, role, causal, k_src=k)[:, T:]


def compile_blocks(model, **kw):
    """torch.compile each transformer block (nearly all the work) for forwards without a KV
    cache. Masks, RoPE tables and plans are made in Python outside the compiled code, so the
    blocks compile without graph breaks; parameter names and checkpoints do not change. Under
    DDP, call it before wrapping the model."""
    model.compiled = [torch.compile(b, **kw) for b in model.blocks]
    return model


def autocast_for(device, dtype=torch.bfloat16):
    """Mixed precision for a device: bf16 autocast on CUDA; float32 on the CPU (bf16 matrix
    products are about 100x slower on the project's CPUs). `with autocast_for(dev): ...`"""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, enabled=kind == "cuda")


def check_device(name):
    """'cpu', 'cuda' or 'cuda:N' usable here -> name; else ValueError with one line saying why
    (data.check_device: the same for a --device flag)."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not m:
        raise ValueError(f"device {name}: use cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if m.group(1) and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_flops(device_name):
    """Peak dense bf16 FLOP/s of a known GPU, for MFU (None if unknown): H100 SXM 989e12, H100
    PCIe 756e12, H100 NVL 835e12, H200 and GH200 989e12, A100 312e12."""
    n = device_name.upper()
    if "H100" in n:
        return 756e12 if "PCIE" in n else 835e12 if "NVL" in n else 989e12
    if "H200" in n:
        return 989e12
    if "A100" in n:
        return 312e12
    return None

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
def teacher_sample(model, src, cam_src, cam_tgt, steps=50, generator=None, noise=None, guidance=1.0):
    """Bidirectional Euler ODE sampler from t = 1 to 0 over all T pairs at once. guidance != 1:
    classifier-free guidance on the camera, x0 = x0(no camera) + guidance (x0(camera) - x0(no
    camera)), the camera withheld as zero rays (NULL_CAMERA: how teacher.py --cond_drop trains it).
    Returns target pixels (B, T, 3, H, W)."""
    cfg = model.cfg
    x = noise if noise is not None else torch.randn(src.shape, generator=generator, device=src.device)
    ts = shift_t(torch.linspace(1, 0, steps + 1, device=src.device), cfg.shift)
    for i in range(steps):
        t = ts[i].expand(src.shape[:2])
        x0 = to_x0(model(src, x, cam_src, cam_tgt, t), x, t, cfg)
        if guidance != 1:
            x0u = to_x0(model(src, x, cam_src, null_camera(cam_tgt), t), x, t, cfg)
            x0 = x0u + guidance * (x0 - x0u)
        x = x0 + (ts[i + 1] / ts[i]) * (x - x0)        # Euler: x + (t' - t) v with v = (x - x0) / t
    return decode_target(x, src, cfg)


def null_camera(cam_tgt):
    """The withheld camera of classifier-free guidance: zero rays (no real ray has d = 0)."""
    return torch.zeros_like(cam_tgt)


def student_timesteps(steps, shift):
    """The student's few-step schedule: t_j = shift(1 - j / steps), e.g. 4 steps: 1, .75, .5, .25
    warped toward noise (1, .86, .67, .4 with shift 2)."""
    return [shift_t(1 - j / steps, shift) for j in range(steps)]


def chunk_pass(model, cache, src, x, cam_src, cam_tgt, t, time, write, with_src=False):
    """One KV-cached pass of a chunk's targets x (B, n, 3, H, W) at noise level t (B, n), time
    the chunk's pair indices (a range or a list; a CUDA tensor costs one host sync). If source
    tokens never see targets, the chunk's source frames were written to the cache already
    (once, see student_chunk) and only the targets run; otherwise, or with_src, sources and
    targets run together (the sources then encoded in this pass)."""
    n, cfg, time = x.shape[1], model.cfg, ints(time)
    k = source_intrinsics(cam_src) if cfg.warp else None                      # the warp head's
    if not cfg.src_sees_tgt and not with_src:
        return model.forward_frames(x, frame_cond(cfg, src, cam_tgt), t, time, (1,) * n, True, cache, write, k)
    out = model.forward_frames(torch.cat([src, x], 1), torch.cat([frame_cond(cfg, None, cam_src), frame_cond(cfg, src, cam_tgt)], 1),
                               torch.cat([torch.zeros_like(t), t], 1), time * 2, (0,) * n + (1,) * n, True, cache, write,
                               None if k is None else torch.cat([k, k], 1))
    return out[:, n:]


def student_chunk(model, cache, src, cam_src, cam_tgt, time, steps, noise, exit_step=None):
    """Generate one chunk of n target frames with the student's KV cache, in diffusion space.
    src (B, n, 3, H, W), cam_* (B, n, 6, H, W), time (n,) absolute pair indices (a range or a
    list; a CUDA tensor costs one host sync), noise (steps, B, n, 3, H, W): the starting noise
    and the fresh noise of each re-noising.
    Runs steps 0..exit_step (default: all); only the last of them keeps gradients (when grad
    is enabled), then a t = 0 pass without gradient writes the chunk's clean keys and values."""
    B, n = src.shape[:2]
    time = ints(time)
    ts = student_timesteps(steps, model.cfg.shift)
    last = steps - 1 if exit_step is None else exit_step
    grad = torch.is_grad_enabled()
    zeros = torch.zeros(B, n, device=src.device)
    with torch.no_grad():
        if not model.cfg.src_sees_tgt:                                        # encode the source once
            model.forward_frames(src, frame_cond(model.cfg, None, cam_src), zeros, time, (0,) * n, True, cache, True)
    x = noise[0]
    for j in range(last + 1):
        with torch.set_grad_enabled(grad and j == last):
            out = chunk_pass(model, cache, src, x, cam_src, cam_tgt, zeros + ts[j], time, False)
            x0 = to_x0(out, x, zeros + ts[j], model.cfg)                      # x0 = x_t - t v (or predicted)
        if j < last:
            x = (1 - ts[j + 1]) * x0 + ts[j + 1] * noise[j + 1]             # re-noise to t_{j+1}
    with torch.no_grad():
        chunk_pass(model, cache, src, x0.detach(), cam_src, cam_tgt, zeros, time, True)   # clean KV
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
        x0 = student_chunk(model, cache, src[:, sl], cam_src[:, sl], cam_tgt[:, sl],
                           range(sl.start + time0, sl.stop + time0), steps, noise)
        out.append(decode_target(x0, src[:, sl], cfg))
    return torch.cat(out, 1)

# -----------------------------------------------------------------------------
# sizes, FLOPs, checkpoints

def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_forward(cfg, frames, ctx_frames=None, attn_pairs=None):
    """Forward FLOPs for `frames` frames: 2 x (weight multiply-adds) per token, plus 4 D FLOPs
    (q.k and the weighted sum of v) per scored (query, key) token pair and layer: attn_pairs of
    them (attention_pairs: what the model's attention really scores), by default every token
    against every token of `ctx_frames` frames (default: the same frames)."""
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
