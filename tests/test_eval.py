"""eval.py's loop benchmark and memory probe on constructed cases whose answer is known: a model
with exact geometry and perfect memory against the same without memory (the warp oracle), a toy
that repeats what it showed at the first visit against copy-the-source, and a tiny student whose
window 1 is really memoryless. Each would fail if the benchmark could not tell them apart."""
from dataclasses import replace

import pytest
import torch

import eval as E
from model import PRESETS, student_sample
from test_model import random_model

SIZE, L = 16, 48


@pytest.fixture(scope="module")
def loops():
    return {kind: E.loop_batch(kind, 1, L, SIZE) for kind in E.LOOPS}


@pytest.mark.parametrize("kind", E.LOOPS)
def test_a_loop_revisits_the_pose_with_other_inputs(loops, kind):
    """The truth at both visits is the same (frozen world, the same world pose rendered), the source
    is not (it moved on): a third of the revisit's pixels or so are seen only at the first visit."""
    b, pairs = loops[kind]
    assert len(pairs) == L // 8 and all(j - i == L - L // 8 for i, j in pairs)
    i, j = pairs[0]
    assert torch.equal(b["tgt"][:, i], b["tgt"][:, j]) and torch.equal(b["c2w_tgt"][:, i], b["c2w_tgt"][:, j])
    assert E.psnr(b["src"][:, j:j + 1], b["src"][:, i:i + 1]).item() < 25          # the inputs differ
    r = E.loop_metrics(b["tgt"], b, pairs)                                          # the truth itself
    assert r["agree"] == r["first"] == r["revisit"] == 100.0 and 0.15 < r["mem_share"] < 0.6


@pytest.mark.parametrize("kind", E.LOOPS)
def test_the_loop_benchmark_separates_memory_from_none(loops, kind):
    """The warp oracle (the source resampled with the true depth) with perfect memory brings the
    memory pixels back at the revisit nearly as well as at the first visit; without memory it
    cannot (mid-grey there): 8 dB and more apart, in agreement and in PSNR at the revisit."""
    b, pairs = loops[kind]
    full, none = (E.loop_metrics(E.warp_oracle(b, m), b, pairs) for m in (L, 1))
    assert full["first_mem"] == none["first_mem"]                     # the first visit: the source still sees them
    assert full["revisit_mem"] > none["revisit_mem"] + 8 and full["agree_mem"] > none["agree_mem"] + 8
    assert full["first_mem"] - full["revisit_mem"] < 5 < 10 < none["first_mem"] - none["revisit_mem"]
    copy = E.loop_metrics(b["src"], b, pairs)                           # copy: the source moved on
    assert copy["agree"] < 25 and copy["revisit"] < copy["first"] - 3


def test_a_toy_that_remembers_agrees_with_itself(loops):
    """A toy 'model' that shows at the revisit exactly what it showed at the first visit agrees to
    the cap and loses nothing at the revisit; copy-the-source, the same toy without memory, does not."""
    b, pairs = loops["turn"]
    x = b["src"].clone()
    for i, j in pairs:
        x[:, j] = x[:, i]
    mem, copy = E.loop_metrics(x, b, pairs), E.loop_metrics(b["src"], b, pairs)
    assert mem["agree"] == mem["agree_mem"] == 100.0 and mem["revisit"] == mem["first"]
    assert copy["agree"] < 25 and copy["revisit_mem"] < mem["revisit_mem"] - 3


@pytest.mark.parametrize("kind", E.LOOPS)
def test_the_memory_probe_separates_a_window_from_none(kind):
    """The source turns or slides away, the target stays: on pixels that only the last 3 source
    frames saw, the oracle with a memory of 4 frames beats the one without by 5 dB and more; on
    the pixels the current source sees they are the same."""
    b = E.probe_batch(kind, 1, SIZE)
    w4, w1 = (E.memory_metrics(E.warp_oracle(b, m), b, 4) for m in (4, 1))
    assert 0.03 < w4["recent_share"] < 0.3 and w4["now"] == w1["now"]
    assert w4["recent"] > w1["recent"] + 5


def test_window_1_is_memoryless_and_eval_restores_the_window():
    """The baseline is what it claims: with window 1 a frame's output does not depend on earlier
    source frames; with window 4 it does. memory() gives the student its window back."""
    m = random_model(replace(PRESETS["tiny"], window=4))
    b = E.probe_batch("turn", 1, 16, n=5)
    other = dict(b, src=b["src"].clone())
    other["src"][:, :3] = -other["src"][:, :3]                         # other earlier inputs
    def last(batch):
        cs, ct = E.rays(batch, 16, "cpu")
        return student_sample(m, batch["src"], cs, ct, 2, generator=torch.Generator().manual_seed(0))[:, -1]
    with E.memory(m, 1):
        assert torch.allclose(last(b), last(other), atol=1e-5)
    assert not torch.allclose(last(b), last(other), atol=1e-3) and m.cfg.window == 4
    rows = E.student_rows(m, b, 1, "cpu", baseline=1, sink=1)
    assert list(rows) == ["student, window 4", "student, window 1", "student, window 4 + 1 sinks"]
    assert m.cfg.window == 4 and m.cfg.sink == 0


def test_stream_report_by_quarter_and_frame():
    b = E.stream_batch(2, 8, 16)
    r = E.stream_report(b["src"], b)                                   # copy: no gain anywhere
    assert len(r["quarters"]) == 4 and all(abs(q["covis_gain"]) < 1e-9 for q in r["quarters"])
    x = b["src"].clone()
    x[1] = x[1] + 0.3                                                  # the second clip off by 0.3: it alone loses
    for q in E.stream_report(x, b)["quarters"]:
        assert abs(q["by_clip"][0]) < 1e-9 and q["by_clip"][1] < -3
        assert abs(sum(q["by_clip"]) / 2 - q["covis_gain"]) < 1e-4      # the clips' mean is the quarter's
    assert len(r["by_frame"]["detail"]) == 8 and {"third1", "third2", "third3"} <= set(r)
