"""Video I/O and the on-disk multi-view format, bad input included."""
import json
import os

import numpy as np
import pytest
import torch

import camera
import data
import render


def write_raw(path, frames, codec="libx264", pix_fmt="yuv420p", fps=10):
    """Write uint8 frames (T, H, W, 3) with a chosen codec (FFV1 in .mkv allows odd sizes)."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            fmt = "gray" if f.ndim == 2 else "rgb24"
            for p in s.encode(av.VideoFrame.from_ndarray(f, format=fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_round_trip(tmp_path):
    clip = render.render_clip(1, 6, 32, 32)["src"]
    path = str(tmp_path / "v.mp4")
    data.write_video(path, clip, fps=12)
    back = torch.stack(list(data.read_video(path)))
    assert back.shape == clip.shape and (back - clip).abs().mean() < 0.05    # lossy but close
    assert abs(data.video_fps(path) - 12) < 1e-6
    assert len(list(data.read_video(path, 16, max_frames=4))) == 4


def test_odd_size_grayscale_and_one_frame(tmp_path):
    rng = np.random.default_rng(0)
    odd = tmp_path / "odd.mkv"
    write_raw(odd, rng.integers(0, 255, (3, 37, 23, 3), dtype=np.uint8), codec="ffv1", pix_fmt="bgr0")
    frames = list(data.read_video(str(odd), 16))
    assert len(frames) == 3 and frames[0].shape == (3, 16, 16)
    gray = tmp_path / "gray.mkv"
    write_raw(gray, rng.integers(0, 255, (2, 20, 30), dtype=np.uint8), codec="ffv1", pix_fmt="gray")
    g = list(data.read_video(str(gray), 8))
    assert g[0].shape == (3, 8, 8) and torch.allclose(g[0][0], g[0][1])
    one = tmp_path / "one.mp4"
    data.write_video(str(one), torch.zeros(1, 3, 16, 16))
    assert len(list(data.read_video(str(one), 16))) == 1
    # 2-D (grayscale) and RGBA arrays convert too
    assert data.to_model_frame(np.zeros((5, 7), np.uint8), 4).shape == (3, 4, 4)
    assert data.to_model_frame(np.zeros((5, 7, 4), np.uint8), 4).shape == (3, 4, 4)


def test_bad_videos_raise_one_clear_error(tmp_path):
    with pytest.raises(data.VideoError, match="video not found: .*missing.mp4"):
        list(data.read_video(str(tmp_path / "missing.mp4")))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2000))
    with pytest.raises(data.VideoError, match="cannot read video .*corrupt.mp4"):
        list(data.read_video(str(corrupt)))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(data.VideoError, match="empty.mp4"):
        list(data.read_video(str(empty)))


def test_on_disk_format_round_trip_and_errors(tmp_path):
    frames, c2w, K, _ = data.synth_multiview_scene(3, n_cams=3, T=5, size=16)
    d = str(tmp_path / "scene")
    data.write_scene(d, frames, c2w, K)
    sc = data.load_scene(d)
    assert torch.allclose(sc["c2w"], c2w) and torch.allclose(sc["K"], K)
    q = lambda v: torch.as_tensor(data.to_uint8(v)).int()
    assert torch.equal(q(sc["frames"]), q(frames))           # lossless: the rendered pixels, to 8 bits
    # camera 0 is the base path; the others are relative to it frame by frame
    assert torch.allclose(camera.relative_pose(sc["c2w"][0], sc["c2w"][0]), torch.eye(4).expand(5, 4, 4), atol=1e-5)
    ds = data.MultiViewDataset(str(tmp_path), 16)
    b = ds.batch(0, pairs=6, max_pairs=3)
    assert b["src"].shape[2:] == (3, 16, 16) and b["rel"].shape[-2:] == (4, 4)
    # a frame-count mismatch names the file
    original = open(os.path.join(d, "cameras.json")).read()
    meta = json.loads(original)
    meta["cameras"][1]["c2w"] = meta["cameras"][1]["c2w"][:4]
    json.dump(meta, open(os.path.join(d, "cameras.json"), "w"))
    with pytest.raises(ValueError, match="frame count mismatch: .*cam01.mp4 has 5 frames"):
        data.load_scene(d)
    open(os.path.join(d, "cameras.json"), "w").write(original)
    os.remove(os.path.join(d, "cam02.mp4"))
    with pytest.raises(data.VideoError, match="video not found: .*cam02.mp4"):
        data.load_scene(d)
    open(os.path.join(d, "cameras.json"), "w").write("{broken")
    with pytest.raises(ValueError, match="malformed camera file .*cameras.json"):
        data.load_scene(d)
    with pytest.raises(FileNotFoundError, match="no scenes"):
        data.list_scenes(str(tmp_path / "scene"))


def test_on_disk_depth_warps_one_camera_into_another(tmp_path):
    """A scene written with its depth (data.py does) reads back with it, at the frames' size or
    resized, and a dataset clip's depth and poses agree: the source warped by the target's
    depth (the depth-warp oracle) renders the target on co-visible pixels, far better than copy.
    A depth file of the wrong shape is refused, naming it; a scene without one has no depth."""
    frames, c2w, K, depth = data.synth_multiview_scene(5, n_cams=3, T=4, size=32)
    root = tmp_path / "ds"
    data.write_scene(str(root / "scene_00000"), frames, c2w, K, depth=depth)
    sc = data.load_scene(str(root / "scene_00000"))
    assert torch.allclose(sc["depth"], depth, rtol=1e-3) and torch.isinf(depth).any()     # sky stays inf
    assert data.load_scene(str(root / "scene_00000"), 16)["depth"].shape == (3, 4, 16, 16)
    ds = data.MultiViewDataset(str(root), 32)
    warped = copied = 0
    for step in range(6):
        b = ds.batch(step, pairs=8, max_pairs=4)
        mask, grid = camera.covisibility(b["depth_src"], b["depth_tgt"], b["rel"], b["K_src"], b["K_tgt"])
        m = mask[:, :, None].expand_as(b["tgt"])
        warped += ((camera.warp_source(b["src"], grid) - b["tgt"]) / 2)[m].square().sum()
        copied += ((b["src"] - b["tgt"]) / 2)[m].square().sum()
    assert warped < copied / 4          # 7x here; the depth swapped, flipped or constant: 0.7-1.5x
    np.save(str(root / "scene_00000" / "depth.npy"), np.zeros((3, 5, 32, 32), np.float16))
    with pytest.raises(ValueError, match="depth file .*depth.npy has shape"):
        data.load_scene(str(root / "scene_00000"))
    data.write_scene(str(tmp_path / "plain" / "scene_00000"), frames, c2w, K)
    assert not data.MultiViewDataset(str(tmp_path / "plain"), 32).depth
    assert "depth_src" not in data.MultiViewDataset(str(tmp_path / "plain"), 32).batch(0, 4, 2)


def test_multicam_axes_known_answer():
    """An Unreal camera with identity rotation looks along +x with y right and z up; in OpenCV
    axes its right is world +y, its down world -z, its forward world +x; centimetres to metres."""
    ue = "[1 0 0 0] [0 1 0 0] [0 0 1 0] [250 -100 30 1]"        # row-vector convention: translation last row
    c2w = data.multicam_c2w(ue)
    assert torch.allclose(c2w[:3, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, -1.0]))
    assert torch.allclose(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(c2w[:3, 3], torch.tensor([2.5, -1.0, 0.3]))


def test_multicam_conversion_round_trip(script, tmp_path):
    """A MultiCamVideo-style scene made from the renderer converts back to its relative poses."""
    frames, c2w, K, _ = data.synth_multiview_scene(3, 3, 5, 24)
    src = tmp_path / "mc" / "f24" / "scene1"
    os.makedirs(src / "videos"), os.makedirs(src / "cameras")
    ext = {}
    for c in range(3):
        data.write_video(str(src / "videos" / f"cam{c + 1:02d}.mp4"), frames[c], 8)
        for i in range(5):
            C = c2w[c, i]
            M = torch.stack([C[:, 2], C[:, 0], -C[:, 1], torch.cat([C[:3, 3] * 100, C[3:, 3]])], 1).T  # OpenCV -> UE
            ext.setdefault(f"frame{i}", {})[f"cam{c + 1:02d}"] = " ".join(
                "[" + " ".join(f"{v:.6f}" for v in row) + "]" for row in M.tolist())
    json.dump(ext, open(src / "cameras" / "camera_extrinsics.json", "w"))
    out = tmp_path / "out"
    r = script("data.py", "--multicam", tmp_path / "mc", "--out", out, "--fx", K[0, 0].item(), "--size", 16)
    assert "converted 1 scenes" in r.stdout
    sc = data.load_scene(str(out / "scene_00000"))
    assert sc["frames"].shape == (3, 5, 3, 16, 16)
    rel = camera.relative_pose(sc["c2w"][0], sc["c2w"][2])
    assert torch.allclose(rel, camera.relative_pose(c2w[0], c2w[2]), atol=1e-4)
    r = script("data.py", "--multicam", tmp_path / "out", "--out", out, "--fx", 1.0, ok=False)
    assert "no cameras/camera_extrinsics.json" in r.stderr and "Traceback" not in r.stderr
