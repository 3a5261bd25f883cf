"""The shipped reference student (checkpoints/): it loads, is a student, and beats copy-the-source
on held-out frames of the moving families."""
import json
import os

import torch

from conftest import ROOT
from eval import generate, heldout_batch, psnr
from model import SHIPPED_STUDENT, load_model

SHIPPED = os.path.join(ROOT, SHIPPED_STUDENT)


def test_shipped_student_beats_copying_the_source():
    model, ckpt = load_model(SHIPPED)
    assert "student" in ckpt and ckpt["config"]["size"] == 32
    steps = ckpt["student"]["steps"]
    gain = {}
    for fam in ("orbit", "pan"):
        b = heldout_batch(fam, 2, 4, model.cfg.size)
        x = generate(model, b, steps, student=True)
        gain[fam] = (psnr(x, b["tgt"]) - psnr(b["src"], b["tgt"])).mean().item()
    assert sum(gain.values()) / len(gain) > 0, gain


def test_shipped_files_have_provenance():
    total = 0
    for name in ("student_small", "teacher_small"):
        meta = json.load(open(os.path.join(ROOT, "checkpoints", name + ".json")))
        assert {"commands", "steps", "wall_time_min", "hardware", "eval"} <= set(meta), meta.keys()
        total += os.path.getsize(os.path.join(ROOT, "checkpoints", name + ".pt"))
        sd = torch.load(os.path.join(ROOT, "checkpoints", name + ".pt"), weights_only=True)["model"]
        assert all(v.dtype == torch.float16 for v in sd.values())
    assert total <= 40 * 2 ** 20
