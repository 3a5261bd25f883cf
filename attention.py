"""
Who attends to whom, and the KV cache (DESIGN.md sections 3 and 5).

Which keys each query sees is decided from Python metadata (the pair index and role of every
frame), never by looking at tensors, so the hot path has no host syncs; masks, index and RoPE
tables are built once per layout and kept on the device (const). The rule (visible, and sees on
Python ints): a source token never attends to target tokens, so the source stream is a clean
encoding of the video whatever the noise on the targets; targets see every pair (the teacher) or
their chunk and earlier ones (the student: block-causal, optionally only the last cfg.window
chunks plus cfg.sink first ones).
- A forward without cache attends as a Plan says (full_plan, attend): the teacher's sources-first
  layout in two unmasked calls, the student's in one masked call.
- KVCache streams the student chunk by chunk with exactly the outputs of the full block-causal
  forward, in static buffers (memory and time a frame stay flat).
The RoPE rotations are here too: keys are rotated when written and their time channels re-rotated
as the cache moves on (the angles themselves: rope_angles).
"""
from collections import namedtuple

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# RoPE rotations

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


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, Dh) by the angles (N, Dh/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def rotate_time(x, cos, sin):
    """Rotate the time channels of x (..., Dh) (the first 2 n_t, see rope_angles) further by
    the angles (cos, sin) (..., n_t)."""
    n = 2 * cos.shape[-1]
    return torch.cat([apply_rope(x[..., :n], cos, sin).to(x.dtype), x[..., n:]], -1)


# -----------------------------------------------------------------------------
# tables made once per layout, and the rule

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
    1 target. A source never sees a target. Bidirectional: everything else. Causal: key chunk
    <= query chunk, within the last cfg.window chunks or a sink chunk.
    The reference rule; sees() is the same rule on Python ints."""
    ok = ~((role_q[:, None] == 0) & (role_k[None, :] == 1))
    if causal:
        cq, ck = time_q[:, None] // cfg.chunk, time_k[None, :] // cfg.chunk
        ok &= ck <= cq
        if cfg.window > 0:
            ok &= (cq - ck < cfg.window) | (ck < cfg.sink)
    return ok


def sees(cq, rq, ck, rk, cfg, causal=True):
    """visible() for one query (chunk, role) and one key (chunk, role), in Python."""
    if rq == 0 and rk == 1:
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


# -----------------------------------------------------------------------------
# a forward without cache

# A forward without cache attends by groups of queries: groups ((query slice, key slice), ...),
# an optional mask (one group only), extra keys (shifted copies of the sinks: (key slice,
# cos, sin) appended to the keys), and the number of (query, key) token pairs it scores.
Plan = namedtuple("Plan", "groups mask extra pairs")


def full_plan(time, role, causal, cfg, L, device):
    """The Plan of a forward over frames (time, role) of L tokens each, made once per layout."""
    key = ("plan", time, role, causal, cfg.chunk, cfg.window, cfg.sink, L, cfg.dim // cfg.heads, str(device))
    return const(key, lambda: _full_plan(time, role, causal, cfg, L, device))


def _full_plan(time, role, causal, cfg, L, device):
    Fr, N, ns = len(time), len(time) * L, role.count(0)
    everything = (slice(None), slice(None))
    if not causal and ns in (0, Fr):
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


# -----------------------------------------------------------------------------
# the KV cache

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
        self.sources = None        # model.student_chunk's last source frames and poses (the warp head's memory)

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
        qruns = [[0, len(time)]] if len(set(role)) == 1 else []
        for i, r in enumerate(role if not qruns else ()):
            if qruns and role[qruns[-1][0]] == r:
                qruns[-1][1] = i + 1
            else:
                qruns.append([i, i + 1])
        groups, pairs, key = [], 0, [tuple((w.start, w.stop, d.start, d.stop) for w, d in writes)]
        held = [(c, r) for c, r in self.written if c != cq or r not in role]
        for i0, i1 in qruns:
            rq = role[i0]
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

