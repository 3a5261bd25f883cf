"""Camera math and trajectories."""
import json
import math

import pytest
import torch

import data


def random_pose(g):
    eye = torch.randn(3, generator=g)
    return data.look_at(eye, eye + torch.randn(3, generator=g))


def test_look_at_is_opencv_and_rigid():
    c2w = data.look_at(torch.tensor([0.0, 0.5, -2.0]), torch.zeros(3))
    R = c2w[:3, :3]
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6) and abs(torch.det(R) - 1) < 1e-5
    assert torch.allclose(c2w[:3, 2], torch.nn.functional.normalize(torch.tensor([0.0, -0.5, 2.0]), dim=0), atol=1e-6)
    assert c2w[1, 1] < 0  # camera y (down) points down in the y-up world


def test_relative_pose_identities():
    g = torch.Generator().manual_seed(0)
    a, b = random_pose(g), random_pose(g)
    assert torch.allclose(data.relative_pose(a, a), torch.eye(4), atol=1e-5)
    assert torch.allclose(data.invert_pose(data.invert_pose(a)), a, atol=1e-5)
    assert torch.allclose(a @ data.relative_pose(a, b), b, atol=1e-5)


@pytest.mark.parametrize("name", data.PRESETS)
@pytest.mark.parametrize("n", [1, 2, 9, 40])
def test_presets_start_at_identity_and_move_smoothly(name, n):
    rel, zoom = data.preset_path(name, n)
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
    rel, _ = data.preset_path("orbit", 33)
    assert torch.allclose(rel[-1], torch.eye(4), atol=1e-5)
    assert (rel[8] - torch.eye(4)).abs().max() > 0.3                # it really went somewhere
    left, _ = data.preset_path("orbit_left", 9)
    pivot = torch.tensor([0.0, 0.0, data.ORBIT_PIVOT, 1.0])
    # the pivot stays on every orbiting camera's optical axis, at the same distance
    p_cam = data.invert_pose(left) @ pivot
    assert torch.allclose(p_cam[:, :2], torch.zeros(9, 2), atol=1e-5)
    assert torch.allclose(p_cam[:, 2], torch.full((9,), data.ORBIT_PIVOT), atol=1e-5)
    assert left[-1, 0, 3] < 0                                          # orbit_left moves left
    angle = math.degrees(math.acos(left[-1, 2, 2].item()))
    assert abs(angle - data.ORBIT_DEG) < 1e-3


def test_pan_tilt_dolly_directions():
    fwd = lambda name: data.preset_path(name, 5)[0][-1, :3, 2]
    assert fwd("pan_right")[0] > 0.3 and fwd("pan_left")[0] < -0.3
    assert fwd("tilt_up")[1] < -0.1 and fwd("tilt_down")[1] > 0.1    # y is down
    assert abs(data.preset_path("dolly_in", 5)[0][-1, 2, 3] - data.MOVE) < 1e-6
    assert data.preset_path("zoom_in", 5)[1][-1] > 1.4


def test_plucker_rays():
    K = torch.tensor([1.0, 1.0, 0.5, 0.5])
    cam = data.plucker(torch.eye(4), K, 8, 8)
    assert cam.shape == (6, 8, 8)
    assert torch.allclose(cam[:3], torch.zeros(3, 8, 8))                # rays through the origin: moment 0
    assert torch.allclose(cam[3:].norm(dim=0), torch.ones(8, 8), atol=1e-6)
    # the moment o x d is the same for any point on the ray
    g = torch.Generator().manual_seed(1)
    c2w = random_pose(g)
    o, d = data.pixel_rays(c2w, K, 4, 4)
    m = torch.cross(o + 2.5 * d, d, dim=-1).movedim(-1, 0)
    assert torch.allclose(data.plucker(c2w, K, 4, 4)[:3], m, atol=1e-5)


def test_json_trajectory(tmp_path):
    rel, _ = data.preset_path("orbit_left", 6)
    path = tmp_path / "traj.json"
    path.write_text(json.dumps(rel.tolist()))
    P, zoom = data.load_trajectory(str(path), 10)
    assert torch.allclose(P[:6], rel) and torch.allclose(P[6:], rel[-1].expand(4, 4, 4))
    assert torch.equal(zoom, torch.ones(10))
    for bad in ["{not json", json.dumps([[1, 2], [3, 4]]), json.dumps([])]:
        path.write_text(bad)
        with pytest.raises(ValueError, match="traj.json"):
            data.load_trajectory(str(path), 4)
    with pytest.raises(ValueError, match="unknown trajectory"):
        data.trajectory("spin_around", 4)
