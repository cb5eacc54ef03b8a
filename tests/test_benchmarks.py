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

RUN_KEYS = {"command", "commit", "dirty", "date", "started", "wall_time_s", "machine"}
MACHINE_KEYS = {"platform", "cpu", "cpu_count", "torch", "torch_threads", "device", "loadavg_start", "loadavg_end"}


def load(res: dict, png: bool = True) -> dict:
    with open(res["path"]) as f:
        rec = json.load(f)
    assert {"config", "figures", "run"} <= set(rec)
    assert RUN_KEYS <= set(rec["run"]), RUN_KEYS - set(rec["run"])
    assert MACHINE_KEYS <= set(rec["run"]["machine"]), MACHINE_KEYS - set(rec["run"]["machine"])
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
    assert row["msar_sample"]["images_per_s"] > 0
    assert row["greedy_cached_vs_uncached"]["identical"]
    assert row["msar_sample"]["timing"]["process_cpu_s"]


def test_greedy_kv_cached_sampler_matches_uncached_with_guidance():
    """The benchmark's uncached greedy decoder (full teacher-forced forward per scale) agrees with
    msar.sample(top_k=1): the equivalence the throughput benchmark reports."""
    torch.manual_seed(1)
    sched = [(1, 1), (2, 2), (3, 3)]
    cfg = msar.TransformerConfig(schedule=sched, vocab_size=32, latent_dim=4, num_classes=5, depth=2, embed_dim=32,
                                 num_heads=2)
    model = msar.NextScaleTransformer(cfg).eval()
    q = msar.MultiScaleResidualQuantizer(32, 4, msar.GridPyramid(sched))
    tok = msar.MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), q).eval()
    labels = torch.tensor([0, 3, 4])
    ref = msar.sample(model, tok, labels, cfg=2.0, top_k=1, decode=False).indices
    unc = sampling_throughput.greedy_uncached(model, tok, labels, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, unc))


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


@pytest.mark.skipif(not os.environ.get("MSAR_VAR_DIR"), reason="needs a FoundationVision/VAR checkout in MSAR_VAR_DIR")
def test_reference_training_step_compares_the_same_model():
    """The training comparison times the same computation: from the same weights and dropout draws
    the reference and msar give the same loss, and one step of each changes the weights alike
    (catches a converter or a benchmark that feeds the two models different inputs or masks)."""
    from benchmarks import vs_reference, vs_reference_training as vt
    ref = vs_reference.import_reference(os.environ["MSAR_VAR_DIR"])
    _, var, _, model = vs_reference.build_pair("small", ref, seed=0)
    var.train()
    model.train()
    labels, x, target = vt.make_batch(model, 1, seed=0)
    losses = vt.first_losses(var, model, labels, x, target, seed=0)
    assert losses["reference"] == pytest.approx(losses["msar"], rel=1e-5)
    torch.manual_seed(1)
    vt.make_step(var, var.parameters(), labels, x, target)()
    torch.manual_seed(1)
    vt.make_step(model, model.parameters(), labels, x, target)()
    torch.testing.assert_close(model.head.weight, var.head.weight, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------- provenance
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
# Committed records written before the "run" block existed. They stay valid results, but a
# regenerated file must carry "run" (docs/results.md lists the command that regenerates each).
LEGACY_FLAT = {  # command, git_commit and date at the top level
    "next_scale_vs_raster/next_scale_vs_raster.json", "sampling_throughput/sampling_throughput.json",
    "training_throughput/training_throughput.json",
    "vs_reference/d16/vs_reference.json",
    "vs_reference/small_2threads/vs_reference.json",
}
LEGACY_NO_PROVENANCE = {
    *(f"video/{r}/metrics.json" for r in ("frame", "joint", "space", "space_short")),
    "video/space/sampling_sweep.json", "video/space_short/sampling_sweep.json",
}


def test_write_result_json_records_command_commit_date_machine(tmp_path):
    """Catches a result file that cannot be traced back: missing command, a commit that is not
    HEAD, a date that is not now, a wall time not measured from ``started_at``."""
    import datetime
    import subprocess
    import time

    started = time.time() - 5.0
    path = common.write_result_json(str(tmp_path / "sub" / "r.json"), {"x": float("nan"), "t": torch.ones(2)},
                                    started, command="python -m examples.thing --quick")
    with open(path) as f:
        rec = json.load(f)
    assert rec["x"] is None and rec["t"] == [1.0, 1.0]
    run = rec["run"]
    assert run["command"] == "python -m examples.thing --quick"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run["commit"] == head and isinstance(run["dirty"], bool)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - datetime.datetime.fromisoformat(run["date"])).total_seconds()) < 60
    assert 5.0 <= run["wall_time_s"] < 60
    m = run["machine"]
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    assert m["device"] == "cpu" and m["cpu_count"] == os.cpu_count() and m["platform"]
    with pytest.raises(ValueError, match="started_at"):  # a perf_counter() value is not a start time
        common.write_result_json(str(tmp_path / "bad.json"), {}, time.perf_counter())
    with pytest.raises(ValueError, match="run"):
        common.write_result_json(str(tmp_path / "bad.json"), {"run": 1}, started)


def test_default_command_is_the_retypable_command_line(monkeypatch):
    """Catches a command recorded as ``python -c`` or as a bare script name for ``python -m`` runs."""
    import sys
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="benchmarks.vs_reference")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/benchmarks/vs_reference.py", "--quick", "--threads", "1"])
    assert common.command_line().split()[1:] == ["-m", "benchmarks.vs_reference", "--quick", "--threads", "1"]
    main.__spec__ = None
    monkeypatch.setattr(sys, "argv", ["examples/signal1d.py", "--quick"])
    assert common.command_line().split()[1:] == ["examples/signal1d.py", "--quick"]


def _committed_results() -> list[str]:
    out = []
    for root, _, files in os.walk(RESULTS):
        out += [os.path.relpath(os.path.join(root, f), RESULTS).replace(os.sep, "/") for f in files if f.endswith(".json")]
    return sorted(out)


def test_every_result_json_records_command_commit_and_date():
    """Catches a new result file written without ``write_result_json`` (untraceable figures)."""
    missing = []
    for rel in _committed_results():
        with open(os.path.join(RESULTS, rel)) as f:
            rec = json.load(f)
        run = rec.get("run") if isinstance(rec, dict) else None
        if isinstance(run, dict) and all(run.get(k) for k in ("command", "commit", "date")):
            continue
        if rel in LEGACY_FLAT and all(rec.get(k) for k in ("command", "git_commit", "date")):
            continue
        if rel not in LEGACY_NO_PROVENANCE:
            missing.append(rel)
    assert not missing, f"result JSONs without run.command / run.commit / run.date: {missing}"


def test_legacy_allowlist_names_only_files_still_without_run():
    """Catches a stale allowlist: a legacy file that was deleted, or regenerated with ``run``,
    must leave the list (else the list would excuse a future file of the same name)."""
    for rel in sorted(LEGACY_FLAT | LEGACY_NO_PROVENANCE):
        path = os.path.join(RESULTS, rel)
        assert os.path.isfile(path), f"{rel} is gone: remove it from the legacy allowlist"
        with open(path) as f:
            rec = json.load(f)
        assert not (isinstance(rec, dict) and "run" in rec), f"{rel} now records its run: remove it from the allowlist"


def test_video_tokenizer_benchmark_scores_reconstructions_not_the_real_videos(tmp_path):
    """A 3-step tokenizer reconstructs blobs: its identity scores must fall below the real videos'
    (catches scoring the real videos twice), and the JSON carries the run's provenance."""
    from benchmarks import video_tokenizer
    out = tmp_path / "tok.json"
    video_tokenizer.main(["--out", str(out), "--save", str(tmp_path / "tok"), "--", "--quick", "--threads", "1",
                          "--num-train", "32", "--tok-steps", "3", "--classifier-steps", "150"])
    rec = json.loads(out.read_text())
    real, recon = rec["identity"]["real_test"], rec["identity"]["reconstructed_test"]
    assert len(recon["frame_accuracy_per_frame"]) == 9
    assert real["frame_accuracy"] > recon["frame_accuracy"] + 0.2
    assert rec["reconstruction"]["psnr_db"] < 20 and rec["tokenizer"]["train_steps"] == 3
    assert rec["run"]["wall_time_s"] > 0 and "commit" in rec["run"]
    from modalities.video import VideoTokenizer
    assert VideoTokenizer.from_pretrained(tmp_path / "tok").config.frames == 9
