"""The procedural renderer: determinism and multi-view geometric consistency."""
import torch

import camera
import data
import render


def test_deterministic_per_seed():
    a = data.sample_clip(5, 3, 16, 16)
    b = data.sample_clip(5, 3, 16, 16)
    c = data.sample_clip(6, 3, 16, 16)
    for k in ("src", "tgt", "rel", "K_tgt"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["src"], c["src"])
    assert a["src"].min() >= -1 and a["src"].max() <= 1


def test_batches_are_a_function_of_the_step():
    a, b = data.synthetic_batch(3, 8, 4, 16, 16), data.synthetic_batch(3, 8, 4, 16, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    B, T = a["src"].shape[:2]
    assert 1 <= T <= 4 and B == 8 // T


def test_geometric_consistency():
    """A pixel of a static scene, lifted with its depth from camera A and projected into
    camera B, lands on the same colour (Lambertian shading, solid textures)."""
    H = W = 64
    scene = render.make_scene(11)
    scene["amp"].zero_()                                               # freeze the motion
    A = camera.look_at(torch.tensor([0.0, 0.4, -1.0]), torch.tensor([0.0, 0.1, 0.0]))
    B = A @ camera.preset_path("orbit_left", 3)[0][1]                  # 15 degrees around the subject
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    rgb, depth = render.render(scene, torch.stack([A, B]), K.expand(2, 4), torch.zeros(2), H, W, ss=1)
    o, d = camera.pixel_rays(A, K, H, W)
    z_dir = (d * A[:3, 2]).sum(-1)
    pts = o + d * (depth[0] / z_dir)[..., None]                        # (H, W, 3) world points
    valid = torch.isfinite(depth[0])
    p_b = (camera.invert_pose(B) @ torch.cat([pts, torch.ones(H, W, 1)], -1)[..., None])[..., :3, 0]
    u = (p_b[..., 0] / p_b[..., 2] * K[0] + K[2]) * W - 0.5
    v = (p_b[..., 1] / p_b[..., 2] * K[1] + K[3]) * H - 0.5
    ui, vi = u.round().long(), v.round().long()
    inside = valid & (p_b[..., 2] > 0) & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
    ui, vi = ui.clamp(0, W - 1), vi.clamp(0, H - 1)
    # visible in B: B's depth at that pixel matches the projected depth (not occluded)
    seen = inside & ((depth[1][vi, ui] - p_b[..., 2]).abs() < 0.02 * p_b[..., 2])
    assert seen.float().mean() > 0.3
    err = (rgb[0].permute(1, 2, 0) - rgb[1][:, vi, ui].permute(1, 2, 0)).abs().amax(-1)[seen]
    # exact colour up to rounding to the nearest pixel on texture edges
    assert err.median() < 0.01 and (err < 0.1).float().mean() > 0.85
    # and a wrong pose does not line up: the test can fail
    wrong = rgb[1].roll(5, -1)[:, vi, ui].permute(1, 2, 0)
    assert (rgb[0].permute(1, 2, 0) - wrong).abs().amax(-1)[seen].mean() > 3 * err.mean()


def test_clip_length_is_shared_by_all_ranks():
    """Every rank of a step draws the same T (no rank waits for a longer clip); rank 0 keeps the
    stream a single process always had; ranks still see different scenes."""
    for step in range(12):
        bs = [data.synthetic_batch(step, 6, 4, 8, 8, seed=1, rank=r) for r in range(3)]
        assert len({b["src"].shape for b in bs}) == 1
        assert not torch.equal(bs[0]["src"], bs[1]["src"])
        g = data.rng(1, step, 0)                                           # the stream as it was for rank 0
        T = int(torch.randint(1, 5, (1,), generator=g))
        seeds = torch.randint(0, 2 ** 31 - 1, (max(1, 6 // T),), generator=g).tolist()
        assert torch.equal(bs[0]["src"], torch.stack([data.sample_clip(s, T, 8, 8)["src"] for s in seeds]))


def test_batches_render_on_the_training_device(device):
    a = data.synthetic_batch(3, 4, 2, 16, 16, device=device)
    b = data.synthetic_batch(3, 4, 2, 16, 16)
    assert all(v.device.type == torch.device(device).type for v in a.values())
    assert all(torch.allclose(a[k].cpu(), b[k]) for k in ("rel", "K_src", "K_tgt"))
    # the same images (on a GPU up to rounding, which can flip a pixel on an edge)
    assert (a["src"].cpu() - b["src"]).abs().mean() < 1e-3 and (a["tgt"].cpu() - b["tgt"]).abs().mean() < 1e-3


def test_batched_rendering_equals_one_clip_at_a_time(monkeypatch):
    """render_clips casts the rays of many clips in one pass (what keeps a GPU fed); the pixels
    and depths are those of rendering each clip alone, whatever the pass size."""
    specs = [data.sample_spec(seed, 3) for seed in (4, 8, 15, 16, 23)]
    alone = [render.render_clips([sp], 12, 12, ss=2)[0] for sp in specs]
    for rays in (2 ** 20, 3 * 2 * 3 * 12 * 12 * 4):                     # all in one pass; two clips a pass
        monkeypatch.setitem(render.RAYS_A_PASS, "cpu", rays)
        together = render.render_clips(specs, 12, 12, ss=2)
        for a, b in zip(alone, together):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(alone[0]["tgt"], alone[1]["tgt"])            # different scenes, different pixels
