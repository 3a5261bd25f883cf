"""The attention paths (issue 11 items 3-5 and 7, issue 12's KV-cache items): the teacher's two
unmasked calls and the block-causal forward against the old masked implementation, the static
KV cache (exact trimming, relative RoPE times, sinks in long streams, steady layout for CUDA
graphs), bf16, no host syncs, no graph breaks."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import attention
import model
from attention import KVCache, attention_pairs, visible
from common import peak_flops
from model import PRESETS, RealCamDiT, student_chunk

TINY = PRESETS["tiny"]


def random_model(cfg=TINY, seed=0, device="cpu"):
    """Random weights everywhere (adaLN-Zero would make every block the identity)."""
    torch.manual_seed(seed)
    m = RealCamDiT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 1.0 / p.shape[-1] ** 0.5)
    return m.eval().to(device)


def inputs(B, T, cfg=TINY, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda c: torch.randn(B, T, c, cfg.size, cfg.size, generator=g).to(device)
    return r(3), r(3), r(6), r(6), torch.rand(B, T, generator=g).to(device)


def reference_forward(m, src, xt, cs, ct, t, causal=False, time=None):
    """The forward as it was before this change, kept as the reference: interleaved pairs
    [s0, t0, s1, t1, ...], one attention call a layer with the dense visible() mask, absolute
    RoPE times (time: the pair index of each pair, default 0..T-1); adaLN-single and the warp
    head as the model has them."""
    cfg, (B, T) = m.cfg, src.shape[:2]
    L, g, Dh, dev = m.grid ** 2, m.grid, cfg.dim // cfg.heads, src.device
    x = torch.stack([src, xt], 2).flatten(1, 2)
    cam = torch.stack([model.frame_cond(cfg, None, cs), model.frame_cond(cfg, src, ct)], 2).flatten(1, 2)
    tt = torch.stack([torch.zeros_like(t), t], 2).flatten(1, 2)
    time = (torch.arange(T) if time is None else torch.tensor(time)).to(dev).repeat_interleave(2)
    role = torch.tensor([0, 1], device=dev).repeat(T)
    h = m.patch_embed(m.patchify(torch.cat([x, cam], 2))) + m.role_embed[role][None, :, None]
    c = m.t_embed(model.timestep_embedding(tt, 256))
    tok_time, tok_role = time.repeat_interleave(L), role.repeat_interleave(L)
    if cfg.cam_rope:
        rows, cols = model.plane_positions(cam[:, :, -6:], cfg)
    else:
        rows = torch.arange(g, device=dev).repeat_interleave(g).repeat(2 * T)
        cols = torch.arange(g, device=dev).repeat(g * 2 * T)
    ang = model.rope_angles(tok_time, rows, cols, Dh)
    cos, sin = ang.cos(), ang.sin()
    mask = visible(tok_time, tok_role, tok_time, tok_role, cfg, causal)
    mask = None if mask.all() else mask
    cb = m.ada_shared(c) if cfg.ada_single else c
    for blk in m.blocks:
        N, D = 2 * T * L, cfg.dim
        mod = cb + blk.ada_table if cfg.ada_single else blk.ada(c)
        sh1, sc1, g1, sh2, sc2, g2 = mod[:, :, None].chunk(6, -1)
        a, at = (blk.norm1(h) * (1 + sc1) + sh1).reshape(B, N, D), blk.attn
        q, k, v = at.qkv(a).view(B, N, 3, at.heads, Dh).permute(2, 0, 3, 1, 4)
        q, k = attention.apply_rope(at.q_norm(q), cos, sin), attention.apply_rope(at.k_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + g1 * at.proj(y.transpose(1, 2).reshape(B, N, D)).view(B, 2 * T, L, D)
        h = h + g2 * blk.mlp(blk.norm2(h) * (1 + sc2) + sh2)
    sh, sc = m.ada_out(c)[:, :, None].chunk(2, -1)
    h = m.norm_out(h) * (1 + sc) + sh
    out = m.unpatchify(m.out(h))[:, 1::2]
    return out + m.warp(h[:, 1::2], cam[:, 1::2], model.source_intrinsics(cs)) if cfg.warp else out


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class SDPASpy:
    """Records (query tokens, key tokens, mask given) of every attention call."""
    def __init__(self, monkeypatch):
        self.calls, inner = [], F.scaled_dot_product_attention
        def spy(q, k, v, attn_mask=None, **kw):
            self.calls.append((q.shape[2], k.shape[2], attn_mask is not None, q.dtype, k.dtype))
            return inner(q, k, v, attn_mask=attn_mask, **kw)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

# -----------------------------------------------------------------------------
# full forwards against the old masked implementation


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, ada_single=False, warp=()), replace(TINY, cam_rope=(1.5, 0.5)),
                                 replace(TINY, depth=3), replace(TINY, src_concat=False, cam_rope=(), warp=()),
                                 replace(TINY, cam_rope=(1.0, 0.0), residual=False)])
@pytest.mark.parametrize("T", [1, 4])
def test_teacher_forward_equals_the_masked_reference(cfg, T, device, monkeypatch):
    """The teacher's forward (sources first, two unmasked attention calls) equals the old
    interleaved forward with its dense mask to 1e-5 in float32."""
    m = random_model(cfg, device=device)
    src, xt, cs, ct, t = inputs(2, T, cfg, device=device)
    ref = reference_forward(m, src, xt, cs, ct, t)
    spy = SDPASpy(monkeypatch)
    got = m(src, xt, cs, ct, t)
    assert rel_err(got, ref) < 1e-5
    assert not any(masked for _, _, masked, *_ in spy.calls)                    # Flash-eligible
    L = m.grid ** 2
    pairs = sum(nq * nk for nq, nk, *_ in spy.calls) // cfg.depth
    assert pairs == attention_pairs(cfg, T) == 3 * (T * L) ** 2


CAM_CAT = dict(cam_rope=(1.5, 0.5), ada_single=False, warp=())    # other planes, a projection a block, no warp head


@pytest.mark.parametrize("chunk,window,sink", [(1, 0, 0), (2, 2, 0), (1, 3, 1), (1, 2, 2)])
@pytest.mark.parametrize("extra", [{}, CAM_CAT], ids=["tiny", "planes+ada+nowarp"])
def test_causal_forward_equals_the_masked_reference(chunk, window, sink, extra, device):
    """Block-causal full forward == the old masked one wherever the window has not left a sink
    behind (a gap: there the sink's RoPE time moves, see the sink tests below)."""
    cfg = replace(TINY, chunk=chunk, window=window, sink=sink, **extra)
    m = random_model(cfg, device=device)
    T = (window + sink) * chunk if sink else 5                  # with a sink: no gap up to here
    src, xt, cs, ct, t = inputs(2, T, cfg, device=device)
    assert max(attention.sink_shift(i // chunk, cfg) for i in range(T)) == 0
    assert rel_err(m(src, xt, cs, ct, t, causal=True), reference_forward(m, src, xt, cs, ct, t, causal=True)) < 1e-5


def test_flops_count_the_attention_really_scored():
    """A teacher forward scores 3/4 of the dense pairs (sources skip targets); bench and
    teacher.py count those (flops_per_forward with attention_pairs)."""
    cfg, T = PRESETS["base"], 6
    L = (cfg.size // cfg.patch) ** 2
    assert attention_pairs(cfg, T) == 3 * (T * L) ** 2
    dense = model.flops_per_forward(cfg, 2 * T)
    real = model.flops_per_forward(cfg, 2 * T, attn_pairs=attention_pairs(cfg, T))
    assert dense - real == cfg.depth * 4 * cfg.dim * (T * L) ** 2
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("Tesla T4") is None

# -----------------------------------------------------------------------------
# the KV cache


def stream(m, cache, src, x0, xt, cs, ct, t, first=0, keep=None):
    """Chunk by chunk through the cache (sources written once, noisy targets, clean targets
    written); returns the noisy targets' outputs of the chunks from pair `first` on (earlier
    chunks skip the noisy pass: it changes nothing in the cache)."""
    cfg, (B, T) = m.cfg, src.shape[:2]
    k = model.source_intrinsics(cs) if cfg.warp else None                      # the warp head's
    cs, ct = model.frame_cond(cfg, None, cs), model.frame_cond(cfg, src, ct)   # + source pixels if src_concat
    outs = []
    with torch.no_grad():
        for c0 in range(0, T, cfg.chunk):
            sl = slice(c0, min(T, c0 + cfg.chunk))
            n, time = sl.stop - sl.start, range(sl.start, sl.stop)
            z = torch.zeros(B, n, device=src.device)
            m.forward_frames(src[:, sl], cs[:, sl], z, time, (0,) * n, True, cache, True)
            ks = None if k is None else k[:, sl]
            if sl.stop > first:
                outs.append(m.forward_frames(xt[:, sl], ct[:, sl], t[:, sl], time, (1,) * n, True, cache, False, ks))
            m.forward_frames(x0[:, sl], ct[:, sl], z, time, (1,) * n, True, cache, True, ks)
            if keep is not None:
                keep(c0 // cfg.chunk, cache)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("chunk,window,sink", [(1, 3, 0), (2, 2, 1), (1, 2, 2), (1, 0, 0)])
def test_cache_trims_exactly(chunk, window, sink):
    """After each chunk the cache holds exactly the chunks the next chunk's queries see (issue 12:
    no extra chunk), in buffers of exactly (window + sink) chunks of sources and of targets."""
    cfg = replace(TINY, chunk=chunk, window=window, sink=sink)
    m = random_model(cfg)
    B, T, L = 1, 9 * chunk, m.grid ** 2
    src, xt, cs, ct, t = inputs(B, T, cfg)
    seen = []

    def check(c, cache):
        nxt = [k for k in range(c + 1) if attention.sees(c + 1, 1, k, 1, cfg)]
        seen.append(len(nxt))
        assert len(cache) == len(nxt) * 2 * chunk * L, f"after chunk {c}"
        if window:
            assert cache.k[0].shape[2] == 2 * (window + sink) * chunk * L
    stream(m, KVCache(cfg), src, xt.clone(), xt, cs, ct, t, keep=check)
    assert max(seen) == (window - 1 + sink if window else 9)


@pytest.mark.parametrize("extra", [{}, CAM_CAT], ids=["tiny", "planes+ada+nowarp"])
def test_cached_pass_with_gradients_equals_the_inference_pass(extra):
    """The grad path (keys copied, the pass's own keys carrying gradients) computes what the
    in-place inference path computes, and later writes do not break its backward. The sources
    are encoded once without gradient, so none reaches the source role's embedding."""
    cfg = replace(TINY, window=2, **extra)
    m = random_model(cfg)
    src, xt, cs, ct, t = inputs(1, 4, cfg)
    outs = {}
    for grad in (False, True):
        cache, noise = KVCache(cfg), torch.randn(3, 1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.set_grad_enabled(grad):
            outs[grad] = [student_chunk(m, cache, src[:, i:i + 1], cs[:, i:i + 1], ct[:, i:i + 1], range(i, i + 1), 3, noise, 2)
                          for i in range(4)]
    assert all(torch.equal(a, b.detach()) for a, b in zip(outs[False], outs[True]))
    sum(o.square().sum() for o in outs[True]).backward()
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.role_embed.grad[0].abs().sum() == 0


def test_long_stream_with_a_sink_matches_a_masked_forward_on_its_window():
    """Issue 12: 2,000 frames into a stream with a sink chunk (chunks of 4 pairs, window 2),
    the cache gives what a masked forward gives on the chunks it attends (sink + window) placed
    with the same relative positions. One layer: the reference is the old masked implementation
    itself, the sink right before the window (no gap). Two layers: the full forward over the
    sink and the chunks the last one depends on (depth x (window - 1) + 1), with the gap."""
    C, T = 4, 2004                                                     # chunks 0..500
    for depth in (1, 2):
        cfg = replace(TINY, depth=depth, chunk=C, window=2, sink=1, src_concat=False, warp=())   # conds built by hand below
        m = random_model(cfg, seed=depth)
        src, xt, cs, ct, t = inputs(1, T, cfg, seed=3)
        x0 = torch.randn_like(xt)
        got = stream(m, KVCache(cfg), src, x0, xt, cs, ct, t, first=T - C)
        chunks = [0] + list(range(501 - depth * (cfg.window - 1) - 1, 501))   # sink + the chunks needed
        keep = [c * C + f for c in chunks for f in range(C)]
        n = len(keep)
        src_k, tgt = src[:, keep], torch.cat([x0[:, keep[:-C]], xt[:, -C:]], 1)
        cam_k, tt = ct[:, keep], torch.cat([torch.zeros(1, n - C), t[:, -C:]], 1)
        if depth == 1:    # chunks at 0 (sink), 1, 2: the sink 2 chunks before the query, as in the stream
            ref = reference_forward(m, src_k, tgt, cs[:, keep], cam_k, tt, causal=True)[:, -C:]
            far = reference_forward(m, src_k, tgt, cs[:, keep], cam_k, tt, causal=True, time=keep)[:, -C:]
            assert rel_err(far, ref) > 1e-4                           # absolute times: 100x off
        else:             # chunks at 0 (sink), 2, 3, 4: windows and sink distances as in the stream
            times = tuple(range(C)) + tuple(range(2 * C, 5 * C))
            assert attention.sink_shift(3, cfg) > 0
            ref = m.forward_frames(torch.cat([src_k, tgt], 1), torch.cat([cs[:, keep], cam_k], 1),
                                   torch.cat([torch.zeros_like(tt), tt], 1), times * 2, (0,) * n + (1,) * n, True)[:, -C:]
        assert rel_err(got, ref) < 1e-5, f"depth {depth}"


def test_steady_state_passes_share_one_layout():
    """Once the window is full, every chunk's passes have the same layout (two: sources,
    targets), which is what lets CUDA graphs replay them."""
    for cfg, kinds in ((replace(TINY, window=3, sink=1), 2), (replace(TINY, window=2, chunk=2), 2)):
        m = random_model(cfg)
        cache, keys = KVCache(cfg), []
        begin = cache.begin
        def spy(*a):
            plan = begin(*a)
            keys.append(plan.key if plan.steady else None)
            return plan
        cache.begin = spy
        src, _, cs, ct, _ = inputs(1, 12 * cfg.chunk, cfg)
        noise = torch.randn(2, 1, cfg.chunk, 3, 16, 16)
        with torch.no_grad():
            for c in range(12):
                sl = slice(c * cfg.chunk, (c + 1) * cfg.chunk)
                student_chunk(m, cache, src[:, sl], cs[:, sl], ct[:, sl], range(sl.start, sl.stop), 2, noise)
        steady = [k for k in keys if k is not None]
        assert len(steady) > len(keys) // 2 and len(set(steady)) == kinds


class HostSyncs(TorchDispatchMode):
    """Counts what waits for the device: reading a value (item, bool, int, tolist), nonzero."""
    def __init__(self):
        super().__init__()
        self.n = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.n.append(str(func))
        return func(*args, **(kwargs or {}))


class HostTensors(TorchFunctionMode):
    """Counts tensors built from host data (torch.tensor) and values read back (tolist)."""
    def __init__(self):
        super().__init__()
        self.n = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.Tensor.tolist, torch.as_tensor):
            self.n.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [replace(TINY, window=3, sink=1), replace(TINY, window=2, cam_rope=(1.0, 0.0)),
                                 replace(TINY, window=2, sink=1, **CAM_CAT)])
def test_no_host_syncs_in_the_hot_path(cfg):
    """A streamed chunk in the steady state and a teacher forward (after the first, which
    builds the tables) read nothing back from the device and build nothing on the host."""
    m = random_model(cfg)
    src, xt, cs, ct, t = inputs(1, 8, cfg)
    cache, noise = KVCache(cfg), torch.randn(4, 1, 1, 3, 16, 16)
    chunk = lambda i: student_chunk(m, cache, src[:, i:i + 1], cs[:, i:i + 1], ct[:, i:i + 1], range(i, i + 1), 4, noise)
    with torch.no_grad():
        for i in range(6):
            chunk(i)
        m(src, xt, cs, ct, t)
        with HostSyncs() as syncs, HostTensors() as host:
            chunk(6)
            chunk(7)
            m(src, xt, cs, ct, t)
    assert syncs.n == [] and host.n == [], (syncs.n, host.n)


def test_bf16_autocast_keeps_queries_keys_and_cache_in_bf16(monkeypatch):
    """RoPE runs in float32 but hands bf16 back (issue 11 item 5): attention gets bf16 q, k, v,
    and the cache stores bf16 keys."""
    cfg = replace(TINY, window=2)
    m = random_model(cfg)
    src, xt, cs, ct, t = inputs(1, 3, cfg)
    spy = SDPASpy(monkeypatch)
    cache, noise = KVCache(cfg), torch.randn(2, 1, 1, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lo = m(src, xt, cs, ct, t)
        for i in range(3):
            student_chunk(m, cache, src[:, i:i + 1], cs[:, i:i + 1], ct[:, i:i + 1], range(i, i + 1), 2, noise)
    assert spy.calls and all(qd == kd == torch.bfloat16 for *_, qd, kd in spy.calls)
    assert all(b.dtype == torch.bfloat16 for b in cache.k + cache.v + cache.kt)
    assert rel_err(lo.float(), m(src, xt, cs, ct, t)) < 0.05


def test_blocks_compile_without_graph_breaks():
    """Every attention plan compiles into one graph a block (fullgraph=True raises on a break):
    teacher, block-causal with a mask, with shifted sink copies; compile_blocks equals eager."""
    torch._dynamo.reset()
    cfg = replace(TINY, window=2, sink=1)
    m = random_model(cfg)
    src, xt, cs, ct, t = inputs(2, 5, cfg)
    want = [m(src, xt, cs, ct, t), m(src, xt, cs, ct, t, causal=True)]
    model.compile_blocks(m, backend="eager", fullgraph=True)
    got = [m(src, xt, cs, ct, t), m(src, xt, cs, ct, t, causal=True)]
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, want))
    assert "blocks.0.attn.qkv.weight" in m.state_dict() and not any("compiled" in k for k in m.state_dict())
    torch._dynamo.reset()

# -----------------------------------------------------------------------------
# CUDA only (pytest --device cuda)


@pytest.mark.cuda_only
def test_cuda_graphs_stream_equals_eager(device):
    """The steady-state passes replayed from CUDA graphs equal the eager passes."""
    cfg = replace(TINY, window=3, sink=1)
    m = random_model(cfg, device=device)
    src, _, cs, ct, _ = inputs(1, 16, cfg, device=device)
    noise = torch.randn(4, 1, 1, 3, 16, 16, device=device)
    outs = []
    for graphs in (False, True):
        cache = KVCache(cfg, graphs=graphs)
        with torch.no_grad():
            outs.append(torch.cat([student_chunk(m, cache, src[:, i:i + 1], cs[:, i:i + 1], ct[:, i:i + 1],
                                                 range(i, i + 1), 4, noise) for i in range(16)], 1))
        if graphs:
            assert len(cache._graphs) == 2
    assert rel_err(outs[1], outs[0]) < 1e-5


@pytest.mark.cuda_only
def test_cuda_stream_has_no_host_syncs(device):
    cfg = replace(TINY, window=3)
    m = random_model(cfg, device=device)
    src, _, cs, ct, _ = inputs(1, 8, cfg, device=device)
    cache, noise = KVCache(cfg), torch.randn(4, 1, 1, 3, 16, 16, device=device)
    with torch.no_grad():
        for i in range(8):
            if i == 6:
                torch.cuda.set_sync_debug_mode("error")
            try:
                student_chunk(m, cache, src[:, i:i + 1], cs[:, i:i + 1], ct[:, i:i + 1], range(i, i + 1), 4, noise)
            finally:
                torch.cuda.set_sync_debug_mode(0)
