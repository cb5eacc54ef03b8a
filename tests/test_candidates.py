"""Candidate scoring (``TransformerConfig.candidate_dim`` with a tokenizer implementing
``msar.tokenizer.CandidateFeatures``): the sampler scores every scale with the features of that
scale's own input, as teacher forcing does, guided or not; the setting survives save / load; a
tokenizer without the features is refused before any work."""
import pytest
import torch
import torch.nn as nn

from msar import (CandidateFeatures, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer,
                  guidance_strength, sample)
from msar.acceleration import Acceleration
from msar.testing import assert_kv_cache_equivalent, random_indices, tiny_transformer
from msar.training import TransformerTrainConfig, TransformerTrainer

V, C, F = 16, 4, 3
SCHED = [(1, 1), (2, 2), (3, 3)]


class FeaturedTokenizer(MultiScaleVQTokenizer):
    """The identity VQ tokenizer with ``F`` features per token that depend on the token and the input."""

    candidate_dim = F

    def candidate_features(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.arange(1, V + 1, dtype=x.dtype).view(1, 1, V, 1)
        return torch.sin(v * x[..., None, :F])  # (B, n, V, F)


def featured(seed=0, query_scale=3.0):
    tok = FeaturedTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))
    torch.manual_seed(seed)
    tok.quantizer.embedding.weight.data.normal_()
    model = tiny_transformer(tok, num_classes=3, depth=2, candidate_dim=F, seed=seed)
    with torch.no_grad():  # features strong enough to decide the argmax somewhere
        model.candidate_query.weight.mul_(query_scale)
    return model, tok


def test_the_tokenizer_declares_the_extension():
    assert isinstance(featured()[1], CandidateFeatures)
    plain = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))
    assert not isinstance(plain, CandidateFeatures)


def test_kv_cache_with_candidates_equals_the_teacher_forced_forward():
    model, tok = featured()
    idx = random_indices(model.schedule, V, batch_size=3, seed=1)
    assert assert_kv_cache_equivalent(model, tok, idx, torch.tensor([0, 1, 2])) < 1e-5


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_greedy_sampling_follows_the_candidate_scores_of_each_scale(cfg):
    """Greedy tokens equal the argmax of the teacher-forced forward given the same features (guided:
    VAR's formula on both passes) and differ from the same model with the features left out: catches
    features not passed while sampling, taken from another scale's input, or lost in the null half."""
    model, tok = featured()
    labels = torch.tensor([0, 2, 1, 1])
    out = sample(model, tok, labels, cfg=cfg, top_k=1)
    x = tok.teacher_forcing_input(out.indices)
    cand = tok.candidate_features(x)
    logits = model(labels, x, candidates=cand)
    if cfg:
        null = model(torch.full_like(labels, model.null_label), x, candidates=cand, allow_null=True)
        sl = [model.schedule.slice(k) for k in range(len(SCHED))]
        t = [guidance_strength(cfg, model.schedule.progress(k)) for k in range(len(SCHED))]
        logits = torch.cat([(1 + t[k]) * logits[:, s] - t[k] * null[:, s] for k, s in enumerate(sl)], 1)
    assert torch.equal(torch.cat(out.indices, 1), logits.argmax(-1))
    with torch.no_grad():
        model.candidate_query.weight.zero_()
    plain = sample(model, tok, labels, cfg=cfg, top_k=1)
    assert any(not torch.equal(a, b) for a, b in zip(out.indices, plain.indices))


def test_candidate_model_round_trips_through_save_and_load(tmp_path):
    model, tok = featured()
    model.save_pretrained(tmp_path)
    back = NextScaleTransformer.from_pretrained(tmp_path).eval()
    assert back.cfg.candidate_dim == F
    idx = random_indices(model.schedule, V, batch_size=2, seed=2)
    x = tok.teacher_forcing_input(idx)
    labels = torch.tensor([1, 2])
    cand = tok.candidate_features(x)
    assert torch.equal(model(labels, x, candidates=cand), back(labels, x, candidates=cand))


def test_missing_or_mismatched_features_are_refused_up_front():
    model, tok = featured()
    plain = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))
    with pytest.raises(TypeError, match="does not implement msar.tokenizer.CandidateFeatures"):
        sample(model, plain, torch.tensor([0]))
    with pytest.raises(TypeError, match="CandidateFeatures"):
        TransformerTrainer(model, plain, TransformerTrainConfig(total_steps=1))
    with pytest.raises(ValueError, match="without accel"):  # the approximate modes have no features to pass
        sample(model, tok, torch.tensor([0]), accel=Acceleration())
    other = tiny_transformer(tok, num_classes=3, candidate_dim=F + 1)
    with pytest.raises(ValueError, match="candidate_dim 3 differs from the model's 4"):
        sample(other, tok, torch.tensor([0]))
    x = tok.teacher_forcing_input(random_indices(model.schedule, V, batch_size=1))
    with pytest.raises(ValueError, match="pass candidates="):
        model(torch.tensor([0]), x)
    cond, cond_blocks = model.condition(torch.tensor([0]))
    caches = model.new_caches(1)
    model.step(model.embed_start(cond), cond, cond_blocks, caches)  # the start scale has no features
    with pytest.raises(ValueError, match="pass candidates="):  # a hand-written loop that forgets them later
        model.step(model.embed_scale(x[:, :4], 1), cond, cond_blocks, caches)
    with pytest.raises(ValueError, match=r"expected \(B, n, V, candidate_dim\)"):
        model(torch.tensor([0]), x, candidates=tok.candidate_features(x)[..., :2])
    with pytest.raises(ValueError, match="softmax head"):
        tiny_transformer(tok, candidate_dim=F, head="bitwise", bits=4)


def test_training_moves_the_candidate_query():
    """A training step reaches the candidate query through the trainer's features (a trainer that
    dropped them would fail in the forward; one that passed zeros would leave the query alone)."""
    model, tok = featured()
    trainer = TransformerTrainer(model.train(), tok, TransformerTrainConfig(total_steps=2, lr=1e-2, warmup_steps=1))
    before = model.candidate_query.weight.detach().clone()
    idx = random_indices(model.schedule, V, batch_size=4, seed=3)
    trainer.train_step(idx, torch.tensor([0, 1, 2, 0]))
    assert not torch.equal(before, model.candidate_query.weight)


def test_scale_diagnostic_scores_a_candidate_model_with_its_features():
    """The diagnostic's teacher-forced pass gives a candidate-scoring model its features (without them
    the forward refuses), so its per-scale losses are those of the logits the sampler draws from."""
    from msar.diagnostics import scale_diagnostic
    model, tok = featured()
    idx = random_indices(model.schedule, V, batch_size=2, seed=4)
    labels = torch.tensor([0, 1])
    rep = scale_diagnostic(model, tok, idx, labels, cfg=0, top_k=1)
    x = tok.teacher_forcing_input(idx)
    logits = model(labels, x, candidates=tok.candidate_features(x))
    ce = torch.nn.functional.cross_entropy(logits[:, -9:].reshape(-1, V), idx[-1].reshape(-1))
    assert rep[-1]["tf_loss"] == pytest.approx(float(ce), rel=1e-5)
