"""Smoke runs of every benchmark (tiny sizes) and checks of the figures they must produce.

No timing assertions: only structure, counted quantities and exact equivalences.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

import msar
from benchmarks import common, next_scale_vs_raster, sampling_throughput, scaling_laws, training_throughput
from benchmarks.fast_sampling import draw, sample_fast

MACHINE_KEYS = {"machine", "cpu", "torch", "git_commit", "date", "command", "config", "figures",
                "loadavg_start", "loadavg_end", "torch_threads"}


def load(res: dict, png: bool = True) -> dict:
    with open(res["path"]) as f:
        rec = json.load(f)
    assert MACHINE_KEYS <= set(rec), MACHINE_KEYS - set(rec)
    assert os.path.exists(res["path"][:-5] + ".png") == png
    return rec


def test_next_scale_vs_raster_smoke(tmp_path):
    rec = load(next_scale_vs_raster.main(["--smoke", "--threads", "1", "--no-plot", "--out", str(tmp_path)]), png=False)
    rows = rec["figures"]["rows"]
    assert [r["N"] for r in rows] == [2, 4]
    for r in rows:
        N = r["N"]
        assert r["raster"]["steps"] == N * N
        assert r["next_scale"]["steps"] == len(next_scale_vs_raster.NEXT_SCALE_SIDES[N])
        for order in ("next_scale", "raster"):
            assert r[order]["flops"] > 0 and r[order]["flops_attention"] > 0
            assert r[order]["flops"] >= r[order]["flops_attention"] + r[order]["flops_linear"] > 0
            assert r[order]["time_per_sample_b1_s"] > 0 and "peak_mb" in r[order]["peak_memory_batch"]
        # no cache re-runs the prefix at every step: strictly more work than with the cache
        assert r["raster_uncached"]["flops"] > r["raster"]["flops"]
        assert r["raster_uncached"]["flops_fit"]["check_rel_error_at_last_step"] < 1e-6
    assert rec["figures"]["exponents_in_N"]["raster"]["steps"]["exponent"] == pytest.approx(2.0)


def test_raster_state_and_uncached_decoding_agree():
    """Greedy raster decoding with the KV cache equals re-running the whole prefix every step."""
    p = next_scale_vs_raster.PRESETS["smoke"]
    pair = next_scale_vs_raster.build_pair(p, 2, torch.device("cpu"), seed=0)
    cached = torch.cat(next_scale_vs_raster.generate(pair, "raster", 3, 0, top_k=1, top_p=0).indices, 1)
    uncached = next_scale_vs_raster.generate_uncached(pair["raster"], pair["codebook"], 3, 0, top_k=1, top_p=0)
    assert torch.equal(cached, uncached)


def test_sampling_throughput_smoke(tmp_path):
    rec = load(sampling_throughput.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]))
    (row,) = rec["figures"]["rows"]
    assert row["msar_sample"]["images_per_s"] > 0 and row["sample_fast"]["images_per_s"] > 0
    assert row["greedy_cached_vs_uncached"]["identical"]
    assert row["greedy_fast_vs_msar"]["identical"]
    assert row["msar_sample"]["timing"]["process_cpu_s"]


def test_fast_sampler_greedy_matches_msar_with_guidance():
    torch.manual_seed(1)
    sched = [(1, 1), (2, 2), (3, 3)]
    cfg = msar.TransformerConfig(schedule=sched, vocab_size=32, latent_dim=4, num_classes=5, depth=2, embed_dim=32,
                                 num_heads=2)
    model = msar.NextScaleTransformer(cfg).eval()  # default init: not near-identity, logits well spread
    q = msar.MultiScaleResidualQuantizer(32, 4, msar.GridPyramid(sched))
    tok = msar.MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), q).eval()
    labels = torch.tensor([0, 3, 4])
    ref = msar.sample(model, tok, labels, cfg=2.0, top_k=1, decode=False).indices
    for fused in (False, True):
        fast = sample_fast(model, tok, labels, cfg=2.0, top_k=1, fused_mlp=fused)
        assert all(torch.equal(a, b) for a, b in zip(ref, fast))
    unc = sampling_throughput.greedy_uncached(model, tok, labels, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, unc))


def test_fast_draw_respects_top_k_top_p():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).repeat(1, 2000, 1)
    g = torch.Generator().manual_seed(0)
    idx = draw(logits, top_k=3, top_p=0.7, generator=g)
    # nucleus of 0.7 keeps {0, 1} (mass above token 1 is 0.5 < 0.7, above token 2 is 0.8 >= 0.7)
    assert set(idx.unique().tolist()) == {0, 1}
    frac0 = (idx == 0).float().mean().item()
    assert abs(frac0 - 0.5 / 0.8) < 0.05
    assert torch.equal(draw(logits, 1, 0.0, None), torch.zeros(1, 2000, dtype=torch.long))


def test_training_throughput_smoke(tmp_path):
    rec = load(training_throughput.main(["--smoke", "--threads", "1", "--no-plot", "--out", str(tmp_path)]), png=False)
    rows = rec["figures"]["rows"]
    ok = {r["mask"]: r for r in rows if "error" not in r}
    assert {"bool", "additive"} <= set(ok)
    for r in ok.values():
        assert r["tokens_per_s"] > 0 and r["L"] == 21 and r["batch"] * r["L"] > 0
    # the same weights and inputs give the same first loss whatever the mask form
    assert ok["bool"]["loss_first_step"] == pytest.approx(ok["additive"]["loss_first_step"], rel=1e-5)
    assert rec["figures"]["fastest"]["mask"] in ok


def test_mask_variants_give_same_logits():
    torch.manual_seed(0)
    cfg = msar.TransformerConfig(schedule=[(1, 1), (2, 2), (4, 4)], vocab_size=16, latent_dim=4, num_classes=3,
                                 depth=1, embed_dim=32, num_heads=2)
    model = msar.NextScaleTransformer(cfg).eval()
    x, y = torch.randn(2, 20, 4), torch.tensor([0, 2])
    outs = {}
    kinds = ["bool", "additive"] + (["flex"] if training_throughput.have_flex() else [])
    for kind in kinds:
        training_throughput.set_mask(model, kind)
        with torch.no_grad():
            outs[kind] = model(y, x)
    for kind in kinds[1:]:
        torch.testing.assert_close(outs[kind], outs["bool"], atol=1e-5, rtol=1e-5)


def test_scaling_laws_smoke(tmp_path):
    rec = load(scaling_laws.main(["--smoke", "--threads", "1", "--no-plot", "--out", str(tmp_path),
                                  "--cache", str(tmp_path)]), png=False)
    f = rec["figures"]
    assert len(f["rows"]) == 3 and f["param_span"] > 10
    for k in ("fit_last_scale", "fit_all_scales"):
        assert -1.0 <= f[k]["pearson_r"] <= 1.0 and f[k]["exponent"] == f[k]["exponent"]
    for r in f["rows"]:
        assert 0 < r["test_loss_last"] < 10 and 0 < r["test_loss_all"] < 10


def test_power_law_fit_recovers_exponent():
    N = [1e3, 1e4, 1e5, 1e6]
    f = common.fit_power_law(N, [(2e-3 * n) ** -0.1 for n in N])
    assert f["exponent"] == pytest.approx(-0.1) and f["pearson_r"] == pytest.approx(-1.0)


def test_peak_memory_sees_a_large_allocation():
    m = common.peak_memory(lambda: torch.ones(40_000_000).sum(), torch.device("cpu"))  # 160 MB
    assert m["peak_mb"] > 100, m


@pytest.mark.skipif(not os.environ.get("MSAR_VAR_DIR"), reason="needs a FoundationVision/VAR checkout in MSAR_VAR_DIR")
def test_reference_greedy_parity(tmp_path):
    """Same weights in the reference VAR code and in msar give the same greedy tokens."""
    from benchmarks import vs_reference
    ref = vs_reference.import_reference(os.environ["MSAR_VAR_DIR"])
    _, var, tok, model = vs_reference.build_pair("small", ref, seed=0)
    labels = torch.tensor([3])
    want = vs_reference.reference_sample(ref, var, labels, 0, 1, 0.0, record=True)
    got = msar.sample(model, tok, labels, cfg=1.5, top_k=1, decode=False).indices
    assert all(torch.equal(a, b) for a, b in zip(want, got))
