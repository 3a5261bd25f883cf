"""Camera math and trajectories."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import camera
import render


def random_pose(g):
    eye = torch.randn(3, generator=g)
    return camera.look_at(eye, eye + torch.randn(3, generator=g))


def test_look_at_is_opencv_and_rigid():
    c2w = camera.look_at(torch.tensor([0.0, 0.5, -2.0]), torch.zeros(3))
    R = c2w[:3, :3]
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6) and abs(torch.det(R) - 1) < 1e-5
    assert torch.allclose(c2w[:3, 2], torch.nn.functional.normalize(torch.tensor([0.0, -0.5, 2.0]), dim=0), atol=1e-6)
    assert c2w[1, 1] < 0  # camera y (down) points down in the y-up world


def test_relative_pose_identities():
    g = torch.Generator().manual_seed(0)
    a, b = random_pose(g), random_pose(g)
    assert torch.allclose(camera.relative_pose(a, a), torch.eye(4), atol=1e-5)
    assert torch.allclose(camera.invert_pose(camera.invert_pose(a)), a, atol=1e-5)
    assert torch.allclose(a @ camera.relative_pose(a, b), b, atol=1e-5)


@pytest.mark.parametrize("name", camera.PRESETS)
@pytest.mark.parametrize("n", [1, 2, 9, 40])
def test_presets_start_at_identity_and_move_smoothly(name, n):
    rel, zoom = camera.preset_path(name, n)
    assert rel.shape == (n, 4, 4) and zoom.shape == (n,)
    assert torch.allclose(rel[0], torch.eye(4), atol=1e-6) and abs(zoom[0] - 1) < 1e-6
    if n >= 9:
        step = (rel[1:] - rel[:-1]).abs().amax((1, 2)) + (zoom[1:] - zoom[:-1]).abs()
        assert step.max() <= 3 * step.mean() + 1e-6 and step.max() < 0.5, f"{name} jumps between frames"
        R = rel[:, :3, :3]
        assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand_as(R), atol=1e-5)
        if name != "static":
            assert (rel - torch.eye(4)).abs().max() > 0.05 or (zoom - 1).abs().max() > 0.2


def test_orbit_returns_and_keeps_the_subject_in_view():
    rel, _ = camera.preset_path("orbit", 33)
    assert torch.allclose(rel[-1], torch.eye(4), atol=1e-5)
    assert (rel[8] - torch.eye(4)).abs().max() > 0.3                # it really went somewhere
    left, _ = camera.preset_path("orbit_left", 9)
    pivot = torch.tensor([0.0, 0.0, camera.ORBIT_PIVOT, 1.0])
    # the pivot stays on every orbiting camera's optical axis, at the same distance
    p_cam = camera.invert_pose(left) @ pivot
    assert torch.allclose(p_cam[:, :2], torch.zeros(9, 2), atol=1e-5)
    assert torch.allclose(p_cam[:, 2], torch.full((9,), camera.ORBIT_PIVOT), atol=1e-5)
    assert left[-1, 0, 3] < 0                                          # orbit_left moves left
    angle = math.degrees(math.acos(left[-1, 2, 2].item()))
    assert abs(angle - camera.ORBIT_DEG) < 1e-3


def test_pan_tilt_dolly_directions():
    fwd = lambda name: camera.preset_path(name, 5)[0][-1, :3, 2]
    assert fwd("pan_right")[0] > 0.3 and fwd("pan_left")[0] < -0.3
    assert fwd("tilt_up")[1] < -0.1 and fwd("tilt_down")[1] > 0.1    # y is down
    assert abs(camera.preset_path("dolly_in", 5)[0][-1, 2, 3] - camera.MOVE) < 1e-6
    assert camera.preset_path("zoom_in", 5)[1][-1] > 1.4


def test_plucker_rays():
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    cam = camera.plucker(torch.eye(4), K, 8, 8)
    assert cam.shape == (6, 8, 8)
    assert torch.allclose(cam[:3], torch.zeros(3, 8, 8))                # rays through the origin: moment 0
    assert torch.allclose(cam[3:].norm(dim=0), torch.ones(8, 8), atol=1e-6)
    # the moment o x d is the same for any point on the ray
    g = torch.Generator().manual_seed(1)
    c2w = random_pose(g)
    o, d = camera.pixel_rays(c2w, K, 4, 4)
    m = torch.cross(o + 2.5 * d, d, dim=-1).movedim(-1, 0)
    assert torch.allclose(camera.plucker(c2w, K, 4, 4)[:3], m, atol=1e-5)


def test_json_trajectory(tmp_path):
    rel, _ = camera.preset_path("orbit_left", 6)
    path = tmp_path / "traj.json"
    path.write_text(json.dumps(rel.tolist()))
    P, zoom = camera.load_trajectory(str(path), 10)
    assert torch.allclose(P[:6], rel) and torch.allclose(P[6:], rel[-1].expand(4, 4, 4))
    assert torch.equal(zoom, torch.ones(10))
    for bad in ["{not json", json.dumps([[1, 2], [3, 4]]), json.dumps([])]:
        path.write_text(bad)
        with pytest.raises(ValueError, match="traj.json"):
            camera.load_trajectory(str(path), 4)
    with pytest.raises(ValueError, match="unknown trajectory"):
        camera.trajectory("spin_around", 4)


def _bad_trajectories():
    """(name, JSON object, what the error must say) for trajectories that must be refused."""
    rel = camera.preset_path("orbit_left", 5)[0]
    def edit(frame, fn):
        P = rel.clone()
        fn(P[frame])
        return P.tolist()
    nan = edit(3, lambda p: p.__setitem__((0, 3), float("nan")))
    scaled = edit(2, lambda p: p[:3, :3].mul_(2))                               # scale 2: not a camera
    sheared = edit(1, lambda p: p.__setitem__((0, 1), 0.3))
    mirrored = edit(4, lambda p: p[:3, 0].neg_())                              # det -1
    last_row = edit(2, lambda p: p.__setitem__((3, 0), 0.5))
    far300 = rel.tolist()
    far300[1][2][3] = 1e300                                                     # finite, past float32
    return [("nan", nan, "frame 3 has a NaN or infinite entry"),
            ("inf", edit(1, lambda p: p.__setitem__((2, 3), float("inf"))), "frame 1 has a NaN or infinite entry"),
            ("scale", scaled, "frame 2 is not a rigid pose"), ("shear", sheared, "frame 1 is not a rigid pose"),
            ("reflection", mirrored, "frame 4 is not a rigid pose"), ("last_row", last_row, "frame 2 is not a rigid pose"),
            ("no_poses", {"pose": rel.tolist()}, 'needs a "poses" list'),
            ("zoom_zero", {"poses": rel.tolist(), "zoom": [1, 1, 0, 1, 1]}, "frame 2 has zoom 0.0"),
            ("zoom_negative", {"poses": rel.tolist(), "zoom": [1, -2, 1, 1, 1]}, "frame 1 has zoom -2.0"),
            ("zoom_nan", {"poses": rel.tolist(), "zoom": [1, 1, 1, float("nan"), 1]}, "frame 3 has zoom nan"),
            ("zoom_length", {"poses": rel.tolist(), "zoom": [1, 1]}, "one number a pose"),
            ("far", edit(2, lambda p: p.__setitem__((0, 3), 1e6)), "frame 2 moves the camera 1e+06 scene units"),
            ("far300", far300, "frame 1 moves the camera 1e+300 scene units"),            # not "infinite"
            ("zoom_huge", {"poses": rel.tolist(), "zoom": [1, 1, 1, 1, 1e308]}, "frame 4 has zoom 1e+308: a zoom"),
            ("zoom_tiny", {"poses": rel.tolist(), "zoom": [1, 0.01, 1, 1, 1]}, "frame 1 has zoom 0.01: a zoom"),
            ("nested", [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], "expected a list of 4x4 poses")]


@pytest.mark.parametrize("name,obj,msg", _bad_trajectories(), ids=[c[0] for c in _bad_trajectories()])
def test_bad_trajectory_is_one_error_naming_file_and_frame(tmp_path, name, obj, msg):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))                                             # NaN/Infinity: Python's JSON
    with pytest.raises(ValueError) as e:
        camera.load_trajectory(str(path), 8)
    assert str(path) in str(e.value) and msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_rigid_trajectory_within_tolerance_loads(tmp_path):
    """float32 round-off (poses written with 6 decimals) passes; zoom and padding as given."""
    rel, _ = camera.preset_path("orbit", 6)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"poses": [[[round(v, 6) for v in row] for row in P] for P in rel.tolist()],
                                "zoom": [1, 1.2, 1.5, 1.2, 1, 0.8]}))
    P, zoom = camera.load_trajectory(str(path), 8)
    assert torch.allclose(P[:6], rel, atol=1e-6) and zoom.tolist()[-3:] == pytest.approx([0.8, 0.8, 0.8])

# -----------------------------------------------------------------------------
# co-visibility and the depth-warp oracle (eval.py's geometry metric)

def test_pure_rotation_is_covisible_and_the_warp_renders_it():
    """A camera turning in place sees nothing new behind anything: every target pixel whose ray
    falls inside the source frame is co-visible, and resampling the source with the true depth
    reproduces the rendered target view. (Depth edges between pixel centres may cost a few
    pixels, under 2%.)"""
    seed, S, n = 2 ** 31 + 11, 64, 4
    for name in ("pan_left", "tilt_up"):
        rel, zoom = camera.preset_path(name, n)
        c = render.render_clip(seed, n, S, S, rel, zoom, gen=torch.Generator().manual_seed(seed))
        mask, grid = camera.covisibility(c["depth_src"], c["depth_tgt"], c["rel"], c["K_src"], c["K_tgt"])
        inside = ((grid > -1) & (grid < 1)).all(-1)
        assert not (mask & ~inside).any() and (inside & ~mask).sum() < 0.02 * inside.sum()
        assert mask[0].all() and 0.5 < mask[-1].float().mean() < 0.95     # frame 0 is the identity
        warped = camera.warp_source(c["src"], grid)
        m = mask[:, None].expand_as(warped)
        mse = ((warped - c["tgt"]) / 2)[m].square().mean()
        copy = ((c["src"] - c["tgt"]) / 2)[m].square().mean()
        assert -10 * math.log10(mse) > 30 and mse < copy / 10


def test_occluder_hides_what_it_should():
    """Known geometry: a wall at z = 2 and a square occluder at z = 1 (|x|, |y| < 0.25) in the
    source frame; the target camera is 0.3 to the right. Target rays that meet the wall at a
    point the source sees behind the occluder, or leave the source frame, are not co-visible."""
    S = 64
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    rel = torch.eye(4)
    rel[0, 3] = 0.3
    u = (torch.arange(S) + 0.5) / S - 0.5                              # x / z of pixel centres
    yy, xx = torch.meshgrid(u, u, indexing="ij")

    def depth_from(cx):    # z-depth seen by a camera at (cx, 0, 0) looking down +z
        occ_x, occ_y = cx + xx * 1.0, yy * 1.0                         # where rays cross z = 1
        hit = (occ_x.abs() < 0.25) & (occ_y.abs() < 0.25)
        return torch.where(hit, torch.ones(S, S), 2 * torch.ones(S, S))

    d_src, d_tgt = depth_from(0.0), depth_from(0.3)
    mask, grid = camera.covisibility(d_src, d_tgt, rel, K, K)
    # the truth: the target sees the point P; the source sees P if nothing nearer lies on its ray
    z = d_tgt
    Px, Py = 0.3 + xx * z, yy * z                                      # source-frame coordinates
    su, sv = Px / z, Py / z                                             # source image plane (x/z)
    in_frame = (su.abs() < 0.5) & (sv.abs() < 0.5)
    blocked = (z > 1.5) & ((su * 1.0).abs() < 0.25) & ((sv * 1.0).abs() < 0.25)   # wall behind the occluder
    truth = in_frame & ~blocked
    assert (truth != mask).float().mean() < 0.02                        # pixel-boundary rounding only
    inner = torch.nn.functional.max_pool2d((~blocked).float()[None, None], 3, 1, 1)[0, 0] == 0    # 1 px in
    assert inner.sum() > 50 and not mask[inner].any()
    assert mask[(z < 1.5)].all()                                        # the occluder itself is seen by both


def test_detail_ratio_sees_blur_and_grain():
    """eval.detail: 1 for the truth itself, well below 1 for a blurred copy (which PSNR can still
    prefer to a sharp wrong one), above 1 with added grain; by frame, it follows where the blur is."""
    from eval import detail, psnr
    y = render.render_clip(5, 4, 32, 32)["tgt"][None]                                # (1, 4, 3, 32, 32)
    blur = F.interpolate(F.avg_pool2d(y[0], 4), scale_factor=4, mode="bilinear")[None]
    grain = y + 0.2 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    assert detail(y, y).item() == pytest.approx(1.0)
    assert detail(blur, y).item() < 0.3 and detail(grain, y).item() > 1.5
    shifted = y.roll(3, -1)                                                       # sharp, in the wrong place
    assert psnr(blur, y) > psnr(shifted, y) and detail(shifted, y).item() > 0.8
    mixed = torch.cat([y[:, :2], blur[:, 2:]], 1)
    d = detail(mixed, y, by_frame=True)
    assert d.shape == (4,) and d[:2].min() > 0.99 and d[2:].max() < 0.3


def test_plane_weights_place_the_inverse_depth_exactly():
    """Linear between the two planes around rho: nonnegative, summing to 1, their mean plane is rho
    (clamped to the planes' range), one-hot on a plane."""
    planes = (0.0, 0.25, 0.5, 1.0, 3.0)
    rho = torch.cat([torch.rand(2, 3, 4, 4) * 4 - 0.5, torch.tensor(planes).view(1, 1, 1, 5).expand(2, 3, 4, 5)], -1)
    w = camera.plane_weights(rho, planes)
    assert w.shape == (2, 3, 5, 4, 9) and (w >= 0).all()
    assert torch.allclose(w.sum(2), torch.ones(2, 3, 4, 9))
    assert torch.allclose((w * torch.tensor(planes).view(5, 1, 1)).sum(2), rho.clamp(0, 3), atol=1e-6)
    assert ((w > 0).sum(2) <= 2).all()
    assert torch.equal(w[..., 4:].argmax(2), torch.arange(5).expand(2, 3, 4, 5)) and (w[..., 4:].max(2).values == 1).all()
