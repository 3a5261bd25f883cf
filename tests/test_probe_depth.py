"""probe_depth.py on constructed heads whose answer is known: a network that copies the source and
whose warp head is open (gate 1) but has no opinion on depth (uniform plane weights). Given the true
depth's weights, its frames become the depth-warp oracle's on co-visible pixels; on a pan (a pure
turn) every plane lands on the same source pixel, so the true depth changes nothing, whatever band
of depth it is given on and at whatever resolution."""
import json
from argparse import Namespace
from dataclasses import asdict, replace

import pytest
import torch

import eval as E
import probe_depth
from model import PRESETS, RealCamDiT, save_checkpoint

CFG = replace(PRESETS["tiny"], window=4, chunk=1)


def open_head(cfg=CFG):
    """Copies the source (x0 of the residual target is 0) and adds gate 1 x (the uniform blend of
    the planes' source pixels - the source)."""
    torch.manual_seed(0)
    m = RealCamDiT(cfg).eval()
    K, p = len(cfg.warp), cfg.patch
    with torch.no_grad():
        m.out.weight.zero_(), m.out.bias.zero_(), m.warp_out.weight.zero_(), m.warp_out.bias.zero_()
        m.warp_out.bias.view(K + 1, p * p)[K] = 1.0                      # the gate channel (unpatchify's order)
    return m


@pytest.mark.parametrize("cfg,student", [(CFG, True), (replace(CFG, chunk=2, window=2), True), (replace(CFG, window=0), False)])
def test_the_true_depth_turns_an_open_head_into_the_depth_warp(cfg, student):
    """A student streamed a chunk at a time (of 1 or 2 pairs), a teacher's one-step mean."""
    args = Namespace(clips=2, frames=4, steps=1)
    m = open_head(cfg)
    r = probe_depth.probe(m, "orbit", args, student)
    b = E.heldout_batch("orbit", 2, 4, CFG.size, E.VAL_SEED)
    v = E.view_metrics(b["src"], b)
    oracle = v["covis_oracle"] - v["covis_copy"]
    assert abs(r["top"] - 1 / len(CFG.warp)) < 1e-5                      # no opinion
    assert r["within"] < 0.5 and r["rho_err"] > 0.2
    assert oracle > 3 and abs(r["gain_true_depth"] - oracle) < 1.0        # the oracle, up to the plane spacing
    assert r["gain_true_depth"] > r["gain"] + 2
    assert r["gain_true_depth"] > r["gain_patch_depth"] > r["gain"] + 1   # one blend a patch: between the two
    bands = r["bands"].values()
    assert abs(sum(b["share"] for b in bands) - 1) < 1e-6                 # the bands split the co-visible pixels
    no_opinion = sum(m.cfg.warp) / len(m.cfg.warp)                        # uniform weights: the planes' mean
    assert all(abs(b["rho"] - no_opinion) < 1e-5 for b in bands if b["share"] > 0)
    assert max(b["gain_true_depth"] for b in bands) > r["gain"] + 0.5
    pan = probe_depth.probe(m, "pan", args, student)
    assert abs(pan["gain_true_depth"] - pan["gain"]) < 1e-3
    assert all(abs(g - pan["gain"]) < 1e-3 for g in [pan["gain_patch_depth"]] + [b["gain_true_depth"] for b in pan["bands"].values()])


def test_probe_depth_end_to_end(script, tmp_path):
    m = open_head()
    path, js = tmp_path / "student.pt", tmp_path / "probe.json"
    save_checkpoint(str(path), model=m.state_dict(), config=asdict(CFG), step=1, student=dict(steps=1, stage="selfforcing"))
    r = script("probe_depth.py", "--ckpt", path, "--clips", 1, "--frames", 2, "--out", js)
    assert "student, 1 step" in r.stdout and "orbit |" in r.stdout and "by band of true inverse depth" in r.stdout
    res = json.load(open(js))
    assert set(res) == set(probe_depth.FAMILIES) and all(0 < f["top"] <= 1 for f in res.values())
    assert all(set(f["bands"]) == set(probe_depth.BANDS) for f in res.values())
    r = script("probe_depth.py", "--ckpt", tmp_path / "missing.pt", ok=False)
    assert "checkpoint not found" in r.stderr
