"""Text encoders (msar.text): the word tokenizer, the built-in encoder trained jointly with the
generator (and resumed exactly), the HF T5 / CLIP loader from a local folder, the pipeline.

Each test names the bug it catches."""
import json

import pytest
import torch
import torch.nn as nn

import msar
from msar import Condition, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, Pipeline, sample
from msar.testing import tiny_transformer
from msar.text import TextEncoder, TextEncoderConfig, WordTokenizer, load_hf_text_encoder
from msar.training import TransformerTrainConfig, TransformerTrainer, build_loader

SCHED = [(1, 1), (2, 2)]
V, C = 8, 4
CAPTIONS = ["a red circle", "a blue square above a red circle", "two green triangles", "a small blue circle"]


def text_setup(seed=0, dim=16):
    """Word tokenizer, text encoder and transformer (initialised from ``seed``), frozen VQ tokenizer (always seed 0)."""
    tok = WordTokenizer.from_corpus(CAPTIONS, max_length=8)
    torch.manual_seed(0)
    vq = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))
    torch.manual_seed(seed)
    enc = TextEncoder(TextEncoderConfig.for_tokenizer(tok, dim=dim, depth=1, num_heads=2))
    model = tiny_transformer(vq, depth=1, embed_dim=32, seed=seed, cond_kind="sequence", cond_dim=dim)
    return tok, enc, vq, model


def test_word_tokenizer_ids_masks_unknown_words_and_length_limit(tmp_path):
    """Bug: unknown words crash or map to a real word, the mask covers padding, a too-long
    caption is silently truncated (the condition would lose words)."""
    tok = WordTokenizer.from_corpus(CAPTIONS, max_length=6)
    ids, mask = tok(["A red CIRCLE.", "a purple circle", ""])
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 4, 1]  # words + <eos>; an empty caption is <eos> alone
    assert ids[1, 1] == tok.ids["<unk>"] and ids[0, 3] == tok.ids["<eos>"] and (ids[~mask] == 0).all()
    assert tok.decode(ids)[:2] == ["a red circle", "a <unk> circle"]
    with pytest.raises(ValueError, match=r"caption 1 has 7 tokens \(6 words \+ <eos>\), more than the tokenizer's "
                                         r"max_length 6"):
        tok(["a red circle", "a red circle and a blue"])
    tok.save_pretrained(tmp_path / "tok")
    again = msar.from_pretrained(tmp_path / "tok")
    assert isinstance(again, WordTokenizer) and torch.equal(again(["a blue square"])[0], tok(["a blue square"])[0])


def test_text_encoder_ignores_padding_and_saves():
    """Bug: padded ids leak into real tokens' features (a caption would depend on the batch's
    longest one), or a saved encoder loads with another vocabulary or weights."""
    tok, enc, _, _ = text_setup()
    enc.eval()
    ids, mask = tok(CAPTIONS[:2])
    cond = enc(ids, mask)
    assert isinstance(cond, Condition) and cond.features.shape == (2, 8, 16)
    junk = torch.where(mask, ids, torch.randint_like(ids, 3, tok.vocab_size))
    torch.testing.assert_close(enc(junk, mask).features[mask], cond.features[mask], atol=1e-6, rtol=1e-5)
    short = enc.encode(CAPTIONS[:2])  # trimmed to the longest caption
    torch.testing.assert_close(short.features[short.mask], cond.features[mask], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="token ids must lie in"):
        enc(ids + 100, mask)


def test_joint_training_updates_the_text_encoder_and_resumes_exactly(tmp_path):
    """Bug: the text encoder is not in the optimizer (its weights never move), or it is missing
    from checkpoints, so a resumed run diverges from an uninterrupted one."""
    def run(out, steps, seed=0):
        tok, enc, vq, model = text_setup(seed=seed)
        items = [(torch.randn(C, 2, 2, generator=torch.Generator().manual_seed(i)), *tok.encode_one(CAPTIONS[i % 4]))
                 for i in range(8)]
        loader = build_loader(items, batch_size=4, shuffle=True, seed=1)  # a plain DataLoader of (x, ids, mask)
        cfg = TransformerTrainConfig(lr=3e-3, total_steps=6, warmup_steps=0, ckpt_dir=str(out), ckpt_every=3,
                                     device="cpu")
        tr = TransformerTrainer(model, vq, cfg, condition_encoder=enc)
        before = [p.detach().clone() for p in enc.parameters()]
        return tr, tr.fit(loader, steps), before

    full, hist, before = run(tmp_path / "a", 6)
    assert any(not torch.equal(a, b) for a, b in zip(before, full.condition_encoder.parameters()))
    assert all("grad_norm_condition_encoder" in r for r in hist)
    run(tmp_path / "b", 3)
    torch.manual_seed(99)
    resumed, rest, _ = run(tmp_path / "b", 6, seed=5)  # fresh weights: everything must come from the checkpoint
    assert [r["loss"] for r in rest] == [r["loss"] for r in hist[3:]]
    for a, b in zip(full.condition_encoder.parameters(), resumed.condition_encoder.parameters()):
        assert torch.equal(a, b)


def test_ema_averages_the_jointly_trained_encoder_with_the_model(tmp_path):
    """Bug: with EMA on, evaluation pairs the averaged transformer with the live text encoder
    (weights from different points of training), or the encoder's average is not checkpointed,
    so a resumed run evaluates with a restarted average."""
    tok = WordTokenizer.from_corpus(CAPTIONS, max_length=8)
    items = [(torch.randn(C, 2, 2, generator=torch.Generator().manual_seed(i)), *tok.encode_one(CAPTIONS[i % 4]))
             for i in range(8)]

    def trainer(out, ema=0.5, seed=0):
        _, enc, vq, model = text_setup(seed=seed)
        cfg = TransformerTrainConfig(lr=3e-2, total_steps=4, warmup_steps=0, device="cpu", progress=False,
                                     ema_decay=ema, ckpt_dir=str(out), ckpt_every=2)
        return TransformerTrainer(model, vq, cfg, condition_encoder=enc)

    full = trainer(tmp_path / "a")
    full.fit(build_loader(items, batch_size=4, seed=1), 4)
    averaged = full.eval_module("condition_encoder")
    assert averaged is not full.condition_encoder
    assert any(not torch.equal(a, b) for a, b in zip(averaged.parameters(), full.condition_encoder.parameters()))
    # the same numbers as a trainer without EMA whose live weights are the two averages
    plain = trainer(tmp_path / "plain", ema=0.0)
    plain.model.load_state_dict(full.eval_model.state_dict())
    plain.condition_encoder.load_state_dict(averaged.state_dict())
    val = build_loader(items, batch_size=4, shuffle=False)
    assert full.evaluate(val, log=False) == pytest.approx(plain.evaluate(val, log=False), rel=1e-6)
    assert full.evaluate(val, log=False)["loss"] != pytest.approx(full.evaluate(val, use_ema=False, log=False)["loss"])

    half = trainer(tmp_path / "b")
    half.fit(build_loader(items, batch_size=4, seed=1), 2)
    resumed = trainer(tmp_path / "b", seed=7)
    resumed.fit(build_loader(items, batch_size=4, seed=1), 4)
    for a, b in zip(averaged.parameters(), resumed.eval_module("condition_encoder").parameters()):
        assert torch.equal(a, b)


def test_a_frozen_condition_encoder_trains_the_model_only(tmp_path):
    """Bug: a frozen encoder (load_hf_text_encoder's default) as condition_encoder fails with "no
    trainable parameters", is switched to training mode (its dropout makes the condition noisy),
    or lands in the checkpoints."""
    tok = WordTokenizer.from_corpus(CAPTIONS, max_length=8)
    enc = TextEncoder(TextEncoderConfig.for_tokenizer(tok, dim=16, depth=1, num_heads=2, dropout=0.5))
    enc.requires_grad_(False)
    before = [p.clone() for p in enc.parameters()]
    _, _, vq, model = text_setup()
    items = [(torch.randn(C, 2, 2, generator=torch.Generator().manual_seed(i)), *tok.encode_one(CAPTIONS[i % 4]))
             for i in range(8)]
    cfg = TransformerTrainConfig(lr=3e-3, total_steps=2, warmup_steps=0, device="cpu", progress=False,
                                 ckpt_dir=str(tmp_path), ckpt_every=2)
    tr = TransformerTrainer(model, vq, cfg, condition_encoder=enc)
    start = [p.detach().clone() for p in model.parameters()]
    tr.fit(build_loader(items, batch_size=4), 2)
    assert not enc.training and all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    ids, mask = tok(CAPTIONS[:2])
    assert torch.equal(enc(ids, mask).features, enc(ids, mask).features)  # dropout off
    assert "condition_encoder" not in tr.checkpoint_models()


def _ddp_worker(rank, world, out_dir):
    import os
    import warnings

    import torch.distributed as dist
    tok, enc, vq, model = text_setup()
    model.cond_drop_rate = 0.0  # no row dropped: the null parameters must still be in the graph
    items = [(torch.randn(C, 2, 2, generator=torch.Generator().manual_seed(i)), *tok.encode_one(CAPTIONS[i % 4]))
             for i in range(8)]
    cfg = TransformerTrainConfig(lr=3e-3, total_steps=2, warmup_steps=0, device="cpu", progress=False)
    tr = TransformerTrainer(model, vq, cfg, condition_encoder=enc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(build_loader(items, batch_size=2, seed=3), 2)
    flat = torch.cat([p.detach().flatten() for m in (tr.model, tr.condition_encoder) for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    torch.save({"same": all(torch.equal(gathered[0], g) for g in gathered), "step": tr.step},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_joint_training_under_ddp_keeps_ranks_in_sync(tmp_path):
    """Bug: the text encoder's gradients are not averaged over ranks (its weights drift apart), or
    DDP fails on parameters left out of the graph (the null condition when no row is dropped)."""
    from _distributed import run_ranks
    run_ranks(_ddp_worker, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["same"] and res["step"] == 2


def test_pipeline_saves_the_text_encoder_and_samples_from_captions(tmp_path):
    """Bug: the text encoder (or its vocabulary) is not saved with the pipeline, so a reloaded
    pipeline conditions on other features."""
    from modalities.voxel.tokenizer import build_voxel_tokenizer

    tok, enc, _, _ = text_setup()
    torch.manual_seed(0)
    vox = build_voxel_tokenizer(resolution=8, latent_side=4, vocab_size=16, latent_dim=4, width=4, max_width=8)
    model = tiny_transformer(vox, cond_kind="sequence", cond_dim=enc.feature_dim)
    pipe = Pipeline(vox, model, text_encoder=enc)
    a = pipe.sample(captions=CAPTIONS[:2], cfg=2.0, seed=0, decode=False)
    b = sample(model, vox, condition=enc.encode(CAPTIONS[:2]), cfg=2.0, seed=0, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    pipe.save_pretrained(tmp_path / "p")
    again = msar.from_pretrained(tmp_path / "p")
    c = again.sample(captions=CAPTIONS[:2], cfg=2.0, seed=0, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, c.indices))
    with pytest.raises(ValueError, match="cond_dim=16"):
        Pipeline(vox, tiny_transformer(vox, cond_kind="sequence", cond_dim=5), text_encoder=enc)


# ---------------------------------------------------------------------------- HF transformers
def _hf_tokenizer(transformers, path):
    """A tiny word-level fast tokenizer, built offline from a tokenizer.json written here."""
    words = ["[PAD]", "[UNK]", "</s>"] + sorted({w for c in CAPTIONS for w in c.split()})
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "[UNK]"}}
    (path / "spec.json").write_text(json.dumps(spec))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "spec.json"), pad_token="[PAD]",
                                                unk_token="[UNK]", model_max_length=8)
    fast.save_pretrained(path)
    return len(words)


@pytest.mark.parametrize("arch", ["t5", "clip"])
def test_hf_text_encoder_loads_from_a_local_folder(tmp_path, arch):
    """Bug: the loader downloads, picks the wrong model class, ignores the attention mask, or
    accepts a caption the model cannot hold."""
    transformers = pytest.importorskip("transformers")
    n = _hf_tokenizer(transformers, tmp_path)
    torch.manual_seed(0)
    if arch == "t5":
        m = transformers.T5EncoderModel(transformers.T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                              num_heads=2, pad_token_id=0))
    else:
        m = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8, pad_token_id=0, eos_token_id=2, bos_token_id=2))
    m.save_pretrained(tmp_path)
    enc = load_hf_text_encoder(tmp_path)
    assert enc.feature_dim == 16 and enc.max_length == 8 and not any(p.requires_grad for p in enc.parameters())
    cond = enc.encode(CAPTIONS[:2])
    ids, mask = enc.tokenizer(CAPTIONS[:2])
    assert cond.kind == "sequence" and cond.features.shape == (2, int(mask.sum(1).max()), 16)
    with torch.no_grad():
        direct = m.eval()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(cond.features[cond.mask], direct[:, :cond.length][cond.mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="caption 1 has 9 tokens, more than the text encoder's max_length 8"):
        enc.encode(["a red circle", "a red circle a red circle a red circle"])
    assert all(p.requires_grad for p in load_hf_text_encoder(tmp_path, trainable=True).parameters())  # fine-tuning
    if arch == "clip":  # more tokens than position embeddings: refused at load, not an index error later
        with pytest.raises(ValueError, match="max_length 9 is more than the CLIP text model's 8 positions"):
            load_hf_text_encoder(tmp_path, max_length=9)
    enc.save_pretrained(tmp_path / "saved")  # and it travels in a pipeline folder
    again = msar.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again.encode(CAPTIONS[:2]).features, cond.features)


def test_image_pipeline_edits_and_samples_from_captions():
    """Bug: ImagePipeline.edit drops the captions (the edit is unconditional or class-conditional),
    forgets the known tokens under a caption, or takes captions without a text encoder."""
    from modalities.image.pipeline import ImagePipeline
    from modalities.image.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                           share_quant_resi=2, using_sa=False, using_mid_sa=False))
    tok = WordTokenizer.from_corpus(CAPTIONS, max_length=8)
    enc = TextEncoder(TextEncoderConfig.for_tokenizer(tok, dim=16, depth=1, num_heads=2)).eval()
    pipe = ImagePipeline(vq, tiny_transformer(vq, depth=1, embed_dim=32, cond_kind="sequence", cond_dim=16),
                         text_encoder=enc)
    side = vq.cfg.image_size
    images = torch.rand(2, 3, side, side) * 2 - 1
    mask = torch.zeros(2, side, side, dtype=torch.bool)
    mask[:, side // 2:] = True  # regenerate the bottom half
    kw = dict(cfg=2.0, top_k=0, top_p=1.0, seed=3, threshold=1.0, return_indices=True)
    out, idx, ref, known = pipe.edit(images, mask, captions=CAPTIONS[:2], **kw)
    same = pipe.edit(images, mask, condition=enc.encode(CAPTIONS[:2]), **kw)
    assert torch.equal(out, same[0])
    assert all(torch.equal(i[m], r[m]) for i, r, m in zip(idx, ref, known)) and known[-1].any() and not known[-1].all()
    other = pipe.edit(images, mask, captions=CAPTIONS[2:], **kw)
    assert not torch.equal(out, other[0])  # the caption decides the regenerated half
    assert torch.equal(pipe.sample(captions=CAPTIONS[:2], seed=1), pipe.sample(condition=enc.encode(CAPTIONS[:2]), seed=1))
    with pytest.raises(ValueError, match="need a pipeline with a text_encoder"):
        ImagePipeline(vq, tiny_transformer(vq, depth=1, embed_dim=32)).edit(images, mask, captions=CAPTIONS[:2])
