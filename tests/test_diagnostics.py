"""msar.diagnostics.scale_diagnostic names the scale that breaks the samples."""
from __future__ import annotations

import pytest
import torch

from msar.diagnostics import scale_diagnostic
from msar.testing import tiny_transformer
from test_conformance import grid_data, grid_tokenizer

SCHEDULE = [(1,), (2,), (4,), (8,)]  # distinct token counts: a head hook can tell the scale by n_k


@pytest.fixture(scope="module")
def memorized():
    """A tokenizer, 4 samples with labels 0..3, and a small model that has memorized their tokens."""
    torch.manual_seed(0)
    tok = grid_tokenizer(SCHEDULE, "identity")
    x = grid_data(tok, batch=4, encoder="identity")
    idx = tok.encode(x)
    labels = torch.arange(4)
    model = tiny_transformer(tok, num_classes=4, depth=1, embed_dim=32, cond_drop_rate=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inp, target = tok.teacher_forcing_input(idx), torch.cat(idx, 1)
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model(labels, inp).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    return tok, model, idx, labels


def break_scale(model, k_bad: int):
    """Bug injected: the head's logits of scale k_bad are shifted by one token (whatever came
    before, the model predicts the wrong token at scale k_bad), in training and in sampling."""
    sched = model.schedule
    L, n_bad = sched.L, sched.token_counts[k_bad]

    def hook(module, args, out):
        out = out.clone()
        if out.shape[1] == L:
            out[:, sched.slice(k_bad)] = out[:, sched.slice(k_bad)].roll(1, dims=-1)
        elif out.shape[1] == n_bad:
            out = out.roll(1, dims=-1)
        return out

    return model.head.register_forward_hook(hook)


def test_a_sound_model_is_right_at_every_scale(memorized):
    tok, model, idx, labels = memorized
    ref = tok.decode(idx)
    rep = scale_diagnostic(model, tok, idx, labels, metric=lambda d: float((d - ref).abs().max()), cfg=0, top_k=1)
    assert [r["k"] for r in rep] == [0, 1, 2, 3]
    assert all(r["sampled_acc"] == 1.0 and r["tf_acc"] == 1.0 for r in rep), str(rep)
    assert all(r["metric"] < 1e-5 for r in rep) and rep.reference_metric == 0.0
    assert "sampled_acc" in str(rep) and len(str(rep).splitlines()) == 2 + 4 + 1


@pytest.mark.parametrize("k_bad", [1, 2])
def test_the_broken_scale_shows_up_at_its_row(memorized, k_bad):
    """Bug caught: a diagnostic that knows the wrong scales (<= k instead of < k), reports
    another scale's accuracy, or samples without the known tokens."""
    tok, model, idx, labels = memorized
    ref = tok.decode(idx)
    handle = break_scale(model, k_bad)
    try:
        rep = scale_diagnostic(model, tok, idx, labels, metric=lambda d: float((d - ref).abs().max()),
                               cfg=0, top_k=1)
    finally:
        handle.remove()
    acc = [r["sampled_acc"] for r in rep]
    assert acc == [0.0 if k == k_bad else 1.0 for k in range(4)], str(rep)
    assert [r["tf_acc"] for r in rep] == acc
    worst = max(range(4), key=lambda k: rep[k]["tf_loss"])
    assert worst == k_bad
    # the decoded samples are wrong up to row k_bad and right once scale k_bad is known
    assert all(rep[k]["metric"] > 1e-3 for k in range(k_bad + 1))
    assert all(rep[k]["metric"] < 1e-5 for k in range(k_bad + 1, 4))
