"""The interleaved DiT: shapes, masks, KV-cached streaming against the full forward, samplers,
checkpoints."""
import json
from dataclasses import asdict, replace

import pytest
import torch

import model
from attention import KVCache, visible
from model import (PRESETS, RealCamDiT, add_noise, config_from, flops_per_forward, load_checkpoint, load_model,
                   num_params, sample_t, save_checkpoint, shift_t, teacher_sample)

TINY = PRESETS["tiny"]


def random_model(cfg=TINY, seed=0):
    """adaLN-Zero starts every block as the identity and the output at 0: randomize all
    weights so that equivalence tests compare real computations."""
    torch.manual_seed(seed)
    m = RealCamDiT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 1.0 / p.shape[-1] ** 0.5)
    return m.eval()


def inputs(B, T, cfg=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = cfg.size
    r = lambda c: torch.randn(B, T, c, S, S, generator=g)
    return r(3), r(3), r(6), r(6), torch.rand(B, T, generator=g)


@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_any_number_of_pairs(T, causal):
    m = random_model()
    src, xt, cs, ct, t = inputs(2, T)
    v = m(src, xt, cs, ct, t, causal=causal)
    assert v.shape == (2, T, 3, TINY.size, TINY.size) and torch.isfinite(v).all()


@pytest.mark.parametrize("ada_single", [False, True])
def test_fresh_model_starts_at_zero_and_backprops(ada_single):
    m = RealCamDiT(replace(TINY, ada_single=ada_single))
    src, xt, cs, ct, t = inputs(2, 2)
    v = m(src, xt, cs, ct, t)
    assert torch.equal(v, torch.zeros_like(v))                         # adaLN-Zero / zero output
    (v - 1).square().mean().backward()
    assert m.out.weight.grad.abs().sum() > 0


def test_ada_single_shares_one_projection():
    """adaLN-single: one (D -> 6D) projection for all blocks plus a 6D table a block, instead of
    a projection a block: depth - 1 projections fewer, depth tables more."""
    cfg = replace(TINY, depth=3, ada_single=False)
    n = lambda c: sum(p.numel() for p in RealCamDiT(c).parameters())
    D = cfg.dim
    assert n(cfg) - n(replace(cfg, ada_single=True)) == (cfg.depth - 1) * (D * 6 * D + 6 * D) - cfg.depth * 6 * D
    m = random_model(replace(cfg, ada_single=True))
    src, xt, cs, ct, t = inputs(2, 2)
    with torch.no_grad():                                                  # each block's table matters
        a = m(src, xt, cs, ct, t)
        m.blocks[1].ada_table.add_(0.5)
        assert not torch.allclose(a, m(src, xt, cs, ct, t))


def test_positions_are_relative_in_time():
    """Length-agnostic pairs: shifting every time index leaves the output unchanged (RoPE)."""
    m = random_model()
    src, xt, cs, ct, t = inputs(1, 4)
    a, b = m(src, xt, cs, ct, t), m(src, xt, cs, ct, t, time0=500)
    assert (a - b).norm() / a.norm() < 1e-4


def test_camera_rope_positions():
    """Camera RoPE places a source token at its grid position, and a target token where its
    patch's rays cut the plane z = 1 / rho in the source image: for a pure rotation that is the
    same point for every plane (the true correspondence whatever the depth); for a sideways move
    it shifts by rho * baseline * grid patches (fx = 1)."""
    import camera
    cfg = replace(PRESETS["small"], cam_rope=(2.0, 1.0, 0.5, 0.0))
    S, g = cfg.size, cfg.size // cfg.patch
    K = torch.tensor([[[1.0, 1.0, 0.5, 0.5]]])
    grid = torch.arange(g, dtype=torch.float32)
    cs, ct = camera.pair_rays(torch.eye(4)[None, None], K, K, S, S)
    row, col = model.plane_positions(cs, cfg)
    assert torch.allclose(col[0], grid.repeat(g).expand(4, -1), atol=1e-5)
    assert torch.allclose(row[0], grid.repeat_interleave(g).expand(4, -1), atol=1e-5)
    # pan: target pixel centre rays rotated; where they land in the source, computed directly
    rel, _ = camera.preset_path("pan_left", 2)
    cs, ct = camera.pair_rays(rel[None, 1:], K, K, S, S)
    row, col = model.plane_positions(ct, cfg)
    c = (grid + 0.5) / g - 0.5
    d = torch.stack([c.repeat(g), c.repeat_interleave(g), torch.ones(g * g)], -1) @ rel[1, :3, :3].T
    assert (col[0] - (g * (d[:, 0] / d[:, 2] + 0.5) - 0.5)).abs().max() < 0.02        # patch averaging
    assert (row[0] - (g * (d[:, 1] / d[:, 2] + 0.5) - 0.5)).abs().max() < 0.02
    # truck right by 0.25: the point at depth 1 / rho on a target ray lies rho * 0.25 further right in x / z
    rel = torch.eye(4)
    rel[0, 3] = 0.25
    _, ct = camera.pair_rays(rel[None, None], K, K, S, S)
    _, col = model.plane_positions(ct, cfg)
    rho = torch.tensor(cfg.cam_rope)[:, None]
    assert torch.allclose(col[0], grid.repeat(g) + rho * 0.25 * g, atol=1e-4)


def test_x_prediction_starts_as_copy_the_source():
    """With x-prediction of the residual (target - source) and a zero output layer (the warp
    head's gate at 0), a fresh model's samples are the source frames exactly, whatever the noise."""
    m = RealCamDiT(TINY)
    src, xt, cs, ct, t = inputs(2, 3)
    src = src.clamp(-1, 1)
    assert torch.equal(teacher_sample(m, src, cs, ct, steps=3, generator=torch.Generator().manual_seed(0)), src)


def test_warp_head_starts_as_the_network_without_it():
    """A network given the warp head (zero weights) computes what it computed without: the gate
    is 0, so the added term is 0, and distill.py continues a student without it."""
    plain = random_model(replace(TINY, warp=()))
    m = RealCamDiT(TINY).eval()
    assert TINY.warp == model.WARP_PLANES
    missing = m.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["warp_out.bias", "warp_out.weight"]
    src, xt, cs, ct, t = inputs(2, 3)
    assert torch.allclose(m(src, xt, cs, ct, t), plain(src, xt, cs, ct, t), atol=1e-6)


@pytest.mark.parametrize("k,K_src,K_tgt", [(0, (1.0, 1.0, 0.5, 0.5), (1.0, 1.0, 0.5, 0.5)),
                                         (4, (0.8, 0.8, 0.5, 0.5), (0.8, 0.8, 0.5, 0.5)),
                                         (7, (1.2, 1.1, 0.45, 0.55), (0.9, 0.95, 0.52, 0.48))])
def test_warp_head_moves_the_source_as_the_plane_says(k, K_src, K_tgt):
    """Known answer: a target camera moved and turned against the source, a scene that is the
    fronto-parallel plane z = 1 / rho_k. With the gate open (1) and every pixel's choice on plane
    k, the output is the source resampled where camera.reproject sends each target pixel: the
    depth-warp oracle of that scene, for any intrinsics of source and target (focal lengths other
    than 1, off-centre principal points: the source's are read from its rays)."""
    import camera
    cfg = replace(TINY, warp=model.WARP_PLANES)
    m, p, S, P = RealCamDiT(cfg), cfg.patch, cfg.size, len(cfg.warp)
    with torch.no_grad():
        b = m.warp_out.bias.view(P + 1, p, p)
        b[k], b[P] = 50.0, 1.0                                   # one-hot plane k, gate 1
    rel = camera.camera_path(yaw=0.1, pitch=-0.05, move=(0.15, 0.05, 0.1), n=1)[0]   # (1, 4, 4)
    Ks, Kt = torch.tensor([K_src]), torch.tensor([K_tgt])
    cs, ct = camera.pair_rays(rel[None], Ks[None], Kt[None], S, S)
    assert torch.allclose(model.source_intrinsics(cs), Ks[None], atol=1e-5)
    src = torch.randn(1, 1, 3, S, S)
    cam = model.frame_cond(cfg, src, ct)
    got = src + m.warp(torch.zeros(1, 1, (S // p) ** 2, cfg.dim), cam, model.source_intrinsics(cs))
    # the plane's z-depth seen from the target: its ray (x, y, 1) in the target frame, R (x, y, 1) in
    # the source's, meets z = 1 / rho after (1 / rho - c_z) / (R (x, y, 1))_z
    fx, fy, cx, cy = K_tgt
    px = ((torch.arange(S) + 0.5) / S - cx) / fx
    py = ((torch.arange(S) + 0.5) / S - cy) / fy
    ray = torch.stack([px.expand(S, S), py[:, None].expand(S, S), torch.ones(S, S)], -1)   # (H, W, 3)
    R, c = rel[0, :3, :3], rel[0, :3, 3]
    depth = ((1 / cfg.warp[k] - c[2]) / (ray @ R.T)[..., 2] if cfg.warp[k] else torch.full((S, S), float("inf")))[None, None]
    uv, _, _ = camera.reproject(depth, rel[None], Ks[None], Kt[None])
    want = camera.warp_source(src, uv * 2 - 1)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("motion,rho", [("turn", 0.0), ("slide", 2.0)])
def test_warp_head_remembers_what_the_source_turned_away_from(motion, rho):
    """Known answer: the source turns 9 degrees a frame (or slides 0.12 sideways), the target
    stays at the source's first pose, every pixel's choice is one plane (at infinity; at inverse
    depth 2 for the slide, where the plane's distance matters) and the gate is open. Given the
    source's motion, each target pixel comes from the newest of the last two source frames whose
    view holds the plane's point (camera.reproject decides, independently: the point's depth
    seen from the target, sent into each source), the current one first; a pixel none holds
    keeps the current source's border. Without the memory, only the current source."""
    import camera
    cfg = replace(TINY, warp=model.WARP_PLANES, window=3)
    m, p, S, P, T = RealCamDiT(cfg), cfg.patch, cfg.size, len(cfg.warp), 4
    with torch.no_grad():
        b = m.warp_out.bias.view(P + 1, p, p)
        b[cfg.warp.index(rho)], b[P] = 50.0, 1.0                  # one plane, gate 1
    a = torch.arange(T, dtype=torch.float32)
    move = dict(yaw=0.16 * a, pitch=0.03 * a) if motion == "turn" else dict(move=(0.12 * a, 0.02 * a, 0.0))
    pose = camera.camera_path(**move, n=T)[0][None]               # (1, T, 4, 4)
    rel = camera.invert_pose(pose) @ pose[:, :1]                 # the target stays where the source started
    K = torch.tensor([1.1, 1.0, 0.5, 0.48]).expand(1, T, 4)
    cs, ct = camera.pair_rays(rel, K, K, S, S)
    src = torch.randn(1, T, 3, S, S)
    h, k = torch.zeros(1, T, (S // p) ** 2, cfg.dim), model.source_intrinsics(cs)
    cam = model.frame_cond(cfg, src, ct)
    got = src + m.warp(h, cam, k, camera.source_memory(src, pose, 2))
    alone = src + m.warp(h, cam, k)
    px = ((torch.arange(S) + 0.5) / S - K[0, 0, 2]) / K[0, 0, 0]
    py = ((torch.arange(S) + 0.5) / S - K[0, 0, 3]) / K[0, 0, 1]
    ray = torch.stack([px.expand(S, S), py[:, None].expand(S, S), torch.ones(S, S)], -1)   # target rays (H, W, 3)
    for f in range(T):
        R, c = rel[0, f, :3, :3], rel[0, f, :3, 3]               # the target in source f's frame
        depth = ((1 / rho - c[2]) / (ray @ R.T)[..., 2] if rho else torch.full((S, S), float("inf")))[None, None]
        want, done = None, torch.zeros(S, S, dtype=torch.bool)
        for j in range(min(f, 2) + 1):                           # newest first: the current source, then f-1, f-2
            q = camera.invert_pose(pose[:, f - j]) @ pose[:, :1]  # the target in source f-j's frame
            uv, _, _ = camera.reproject(depth, q, K[:, :1], K[:, :1])
            col = camera.warp_source(src[:, f - j:f - j + 1], uv * 2 - 1)[0, 0]
            inside = ((uv[0, 0] > 0) & (uv[0, 0] < 1)).all(-1)
            want = col if j == 0 else torch.where((inside & ~done)[None], col, want)
            done |= inside
        assert torch.allclose(got[0, f], want, atol=1e-4), f"frame {f}"
    assert torch.allclose(got[0, 0], alone[0, 0])
    assert (got - alone).abs().amax((0, 2, 3, 4))[1:].min() > 0.5   # frames 1-3: memory brought pixels back


def test_warp_head_needs_the_source_intrinsics():
    """A target pass of a network with the warp head and no source intrinsics is an error, not a
    silent guess of them."""
    cfg = replace(TINY, warp=model.WARP_PLANES)
    m = RealCamDiT(cfg)
    src, xt, cs, ct, t = inputs(1, 2)
    with pytest.raises(ValueError, match="source intrinsics"):
        m.forward_frames(xt, model.frame_cond(cfg, src, ct), t, (0, 1), (1, 1), False)


def test_masks():
    cfg = replace(TINY, chunk=2, window=2, sink=1)
    time, role = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]), torch.tensor([0, 1] * 7)
    bi, ca = visible(time, role, time, role, cfg, False), visible(time, role, time, role, cfg, True)
    assert not bi[0, 1] and bi[1, 0] and bi[1, 13] and bi[0, 12]      # source never sees target
    assert ca[3, 1] and ca[0, 2] and not ca[0, 4]                       # chunk {0,1} sees itself only
    assert ca[9, 4] and ca[9, 10] and not ca[9, 12]                     # chunk 2 sees chunks 1-2, not 3
    assert not ca[12, 4] and ca[12, 8] and ca[12, 0]                    # window 2 + sink chunk 0


def stream(m, src, x0, xt, cs, ct, t, source_once):
    """Chunk-by-chunk with a KV cache: for chunk c, the noisy targets attend to the cache
    (clean earlier chunks), then a pass with the clean targets at t = 0 writes the chunk. The
    sources are encoded once before (source_once, as model.student_chunk does), or run in the
    same passes as the targets."""
    cfg, (B, T) = m.cfg, src.shape[:2]
    cache, outs = KVCache(cfg), []
    k = model.source_intrinsics(cs)                                              # the warp head's (B, T, 4)
    cs, ct = model.frame_cond(cfg, None, cs), model.frame_cond(cfg, src, ct)   # + source pixels if src_concat
    for c0 in range(0, T, cfg.chunk):
        sl = slice(c0, min(T, c0 + cfg.chunk))
        n = sl.stop - sl.start
        time = torch.arange(sl.start, sl.stop)
        if source_once:   # source tokens never see targets: encode them once, then the targets
            m.forward_frames(src[:, sl], cs[:, sl], torch.zeros(B, n), time, torch.zeros(n, dtype=torch.long), True, cache, True)
            outs.append(m.forward_frames(xt[:, sl], ct[:, sl], t[:, sl], time, torch.ones(n, dtype=torch.long), True, cache, False,
                                         k[:, sl]))
            m.forward_frames(x0[:, sl], ct[:, sl], torch.zeros(B, n), time, torch.ones(n, dtype=torch.long), True, cache, True, k[:, sl])
        else:
            pair = lambda a, b: torch.stack([a, b], 2).flatten(1, 2)
            tt, rr = time.repeat_interleave(2), torch.tensor([0, 1]).repeat(n)
            kk = pair(k[:, sl], k[:, sl])
            outs.append(m.forward_frames(pair(src[:, sl], xt[:, sl]), pair(cs[:, sl], ct[:, sl]),
                                         pair(torch.zeros(B, n), t[:, sl]), tt, rr, True, cache, False, kk)[:, 1::2])
            m.forward_frames(pair(src[:, sl], x0[:, sl]), pair(cs[:, sl], ct[:, sl]), torch.zeros(B, 2 * n), tt, rr, True, cache, True, kk)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("chunk,window,sink,source_once,cam_rope", [
    (1, 0, 0, True, ()), (1, 2, 0, True, ()), (1, 3, 1, True, ()), (2, 2, 0, True, ()), (1, 2, 0, False, ()),
    (2, 0, 0, False, ()), (1, 2, 0, True, (1.0, 0.0)), (3, 2, 1, True, (1.5, 0.5))])
@pytest.mark.parametrize("src_concat,ada_single,warp", [(False, False, ()), (True, False, ()), (True, True, ()),
                                                      (True, True, (0.0, 1.0))])
def test_kv_cache_equals_full_causal_forward(chunk, window, sink, source_once, cam_rope, src_concat, ada_single, warp):
    """KV-cached chunk-by-chunk inference equals the full block-causal forward (same rolling
    window as a mask) to 1e-5 relative error in float32, camera RoPE, source concat,
    adaLN-single and the warp head included, with the sources encoded once or beside the targets."""
    cfg = replace(TINY, chunk=chunk, window=window, sink=sink, cam_rope=cam_rope,
                  src_concat=src_concat, ada_single=ada_single, warp=warp)
    m = random_model(cfg)
    B, T = 2, 7
    src, xt, cs, ct, t = inputs(B, T, cfg)
    x0 = torch.randn_like(xt)
    got, cache = stream(m, src, x0, xt, cs, ct, t, source_once=source_once)
    # reference: for chunk c, a full masked forward with clean earlier chunks and noisy chunk c
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        tgt = torch.cat([x0[:, :c0], xt[:, sl]], 1)
        tt = torch.cat([torch.zeros(B, c0), t[:, sl]], 1)
        ref = m(src[:, :sl.stop], tgt, cs[:, :sl.stop], ct[:, :sl.stop], tt, causal=True)[:, sl]
        err = (got[:, sl] - ref).norm() / ref.norm()
        assert err < 1e-5, f"chunk at {c0}: relative error {err:.2e}"
    if window:   # the rolling cache holds a bounded number of chunks
        L = (cfg.size // cfg.patch) ** 2
        assert len(cache) <= (window + sink) * chunk * 2 * L


@pytest.mark.parametrize("chunk,window", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_kv_cache_with_memory_equals_full_causal_forward(chunk, window):
    """Streaming with the source's poses (the warp head's memory of the last window - 1 source
    frames, kept by the cache) equals the full block-causal forward given the same poses, one
    step a chunk, for a source that turns back and forth and slides; a reset cache streams it
    again the same; with window 1 there is nothing to remember and the poses change nothing."""
    import camera
    cfg = replace(TINY, warp=model.WARP_PLANES, window=window, chunk=chunk)
    m = random_model(cfg)
    B, T = 2, 6
    src = inputs(B, T, cfg)[0]
    K = torch.tensor([1.0, 1.0, 0.5, 0.5]).expand(B, T, 4)
    cs, ct = camera.pair_rays(camera.camera_path(orbit=0.3, n=T)[0].expand(B, T, 4, 4), K, K, cfg.size, cfg.size)
    a = torch.arange(T, dtype=torch.float32)
    pose = camera.camera_path(yaw=0.3 * torch.cos(2 * a), move=(0.05 * a, 0.0, 0.0), n=T)[0].expand(B, T, 4, 4)
    noise = torch.randn(T // chunk, 1, B, chunk, 3, cfg.size, cfg.size)
    cache = KVCache(cfg)
    def stream(p):
        cache.reset()
        xs = [model.student_chunk(m, cache, src[:, c:c + chunk], cs[:, c:c + chunk], ct[:, c:c + chunk],
                                  range(c, c + chunk), 1, noise[c // chunk], pose_src=None if p is None else p[:, c:c + chunk])
              for c in range(0, T, chunk)]
        return torch.cat(xs, 1)
    with torch.no_grad():
        got, again, plain = stream(pose), stream(pose), stream(None)
        for c in range(0, T, chunk):
            tt = torch.cat([torch.zeros(B, c), torch.ones(B, chunk)], 1)
            ref = m(src[:, :c + chunk], torch.cat([got[:, :c], noise[c // chunk, 0]], 1), cs[:, :c + chunk],
                    ct[:, :c + chunk], tt, causal=True, pose_src=pose[:, :c + chunk])[:, c:]
            assert (got[:, c:c + chunk] - ref).norm() / ref.norm() < 1e-5, f"chunk at {c}"
    assert torch.equal(got, again)
    assert torch.allclose(got, plain, atol=1e-6) == (window == 1)
    if window > 1:
        with pytest.raises(ValueError, match="source's poses"):
            model.student_sample(m, src, cs, ct, 1, pose_src=pose[:, :, :3])


def test_window_changes_the_output():
    """The rolling window really drops context (so the test above can fail)."""
    m = random_model(replace(TINY, window=2))
    src, xt, cs, ct, t = inputs(1, 5)
    a = m(src, xt, cs, ct, t, causal=True)[:, -1]
    m.cfg = replace(TINY, window=0)
    b = m(src, xt, cs, ct, t, causal=True)[:, -1]
    assert (a - b).norm() / b.norm() > 1e-3


def test_flow_helpers():
    g = torch.Generator().manual_seed(0)
    x0, e, t = torch.randn(2, 3, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 4, 4, generator=g), torch.rand(2, 3, generator=g)
    xt = add_noise(x0, e, t)
    assert torch.allclose(xt - t[..., None, None, None] * (e - x0), x0, atol=1e-5)   # x0 = x_t - t v, v = e - x0
    s = sample_t((10000,), 2.0, g)
    assert s.min() >= 0 and s.max() <= 1 and s.mean() > 0.55           # shifted toward noise
    u = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_t(u, 1.0), u) and (shift_t(u, 3.0) >= u).all()


class Oracle(torch.nn.Module):
    """Predicts the exact rectified-flow answer toward a known x0: x0 itself."""
    def __init__(self, cfg, x0):
        super().__init__()
        self.cfg, self.x0 = cfg, x0

    def forward(self, src, xt, cs, ct, t):
        return self.x0.expand_as(xt)


def test_euler_sampler_on_a_known_flow():
    """With the exact x0 (so the exact velocity (x_t - x0) / t) the Euler sampler lands on x0 from any noise."""
    g = torch.Generator().manual_seed(0)
    src, cs = torch.rand(2, 3, 3, 16, 16, generator=g) - 0.5, torch.zeros(2, 3, 6, 16, 16)
    tgt = torch.rand(2, 3, 3, 16, 16, generator=g) - 0.5
    out = teacher_sample(Oracle(TINY, tgt - src), src, cs, cs, steps=7, generator=g)   # residual x0
    assert torch.allclose(out, tgt, atol=1e-5)


@pytest.mark.parametrize("ada_single", [False, True])
def test_flop_count_matches_torch_counter(ada_single):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = replace(TINY, ada_single=ada_single, warp=())        # flops_per_forward leaves the warp head out
    m = random_model(cfg)
    src, xt, cs, ct, t = inputs(2, 3, cfg)
    with FlopCounterMode(display=False) as fc:
        m(src, xt, cs, ct, t)
    # the counter sees the matrix products (not the masked CPU attention): compare those
    est = 2 * flops_per_forward(cfg, 6, ctx_frames=0)                 # two clips of 3 pairs
    assert abs(est - fc.get_total_flops()) / fc.get_total_flops() < 0.02


def test_checkpoint_round_trip(tmp_path):
    m = random_model()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model=m.state_dict(), config=vars(m.cfg).copy(), step=3)
    m2, ckpt = load_model(path)                                        # torch.load(weights_only=True)
    src, xt, cs, ct, t = inputs(1, 2)
    assert torch.equal(m(src, xt, cs, ct, t), m2(src, xt, cs, ct, t)) and ckpt["step"] == 3
    assert num_params(m2) == num_params(m)
    # a float16 release file: same outputs to float16 precision, provenance next to it
    model.export(path, str(tmp_path / "release.pt"), commands=["python teacher.py"])
    m3, rel = load_model(str(tmp_path / "release.pt"))
    assert set(rel) == {"model", "config", "step"} and all(v.dtype == torch.float16 for v in rel["model"].values())
    v, v3 = m(src, xt, cs, ct, t), m3(src, xt, cs, ct, t)
    assert (v - v3).abs().max() < 1e-2 * v.abs().max()
    meta = json.load(open(tmp_path / "release.json"))
    assert meta["step"] == 3 and meta["commands"] == ["python teacher.py"]


def test_config_from_checkpoints_of_any_version(tmp_path):
    """config_from: a field a checkpoint predates takes the value that rebuilds its network (a
    teacher written before the warp head has none); the removed fields are accepted at the value
    kept, and a v-prediction network or sources that attend to targets are one clear ValueError."""
    assert config_from(asdict(TINY)) == TINY                               # written now
    teacher, student = (load_checkpoint(str(model.SHIPPED_STUDENT).replace("student_small", n))["config"]
                        for n in ("teacher_small", "student_small"))
    assert config_from(teacher).warp == config_from(student).warp == model.WARP_PLANES    # the shipped ones
    before_warp = {k: v for k, v in teacher.items() if k != "warp"}                     # the release before
    assert config_from(before_warp).warp == () and config_from(before_warp).ada_single
    assert config_from(dict(teacher, pred="x")) == config_from(teacher)         # a removed field at the value kept
    old = dict(size=16, patch=4, dim=64, depth=2, heads=2, residual=True, src_sees_tgt=False, pred="x", cam_rope=())
    assert config_from(old) == replace(TINY, src_concat=False, cam_rope=(), ada_single=False, warp=())
    for bad, why in ((dict(old, pred="v"), "velocity"), ({k: v for k, v in old.items() if k not in ("pred", "cam_rope")},
                                                          "velocity"),
                     (dict(old, src_sees_tgt=True), "attend to target"), (dict(old, colour=1), "colour")):
        with pytest.raises(ValueError, match=why):
            config_from(bad)
    m = random_model()
    path = str(tmp_path / "v.pt")
    save_checkpoint(path, model=m.state_dict(), config=dict(asdict(TINY), pred="v"), step=0)
    with pytest.raises(ValueError, match=f"{path}: its network predicts the velocity"):
        load_model(path)
