"""``python -m benchmarks.gpu_check``: the smoke run goes through every phase of the GPU check on
tiny models, and its guards (budget, per-phase timeout, errors, out-of-memory, flushing) hold."""
import json
import os
import time

import pytest
import torch

from benchmarks import gpu_check

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                       "fixtures", "var_parity", "tiny_a.safetensors")
PHASES = ["parity", "sampling/smoke-a", "sampling/smoke-b", "training/smoke-a", "training/smoke-b",
          "compile/smoke-a", "compile/smoke-b"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    argv = ["--smoke", "--out", str(out)]
    t0 = time.time()
    path = gpu_check.main(argv)
    with open(path) as f:
        return {"json": json.load(f), "path": path, "argv": argv, "wall_s": time.time() - t0}


def test_smoke_runs_every_phase_and_records_how(smoke):
    """Catches: a phase that errors, or is skipped, on the code paths the GPU run takes; a JSON that
    cannot say what produced it (command, commit, date, device) or lacks the published anchors."""
    d = smoke["json"]
    assert list(d["phases"]) == PHASES
    for name, rec in d["phases"].items():
        if name == "parity" and not os.path.isfile(FIXTURE):
            assert rec["status"] == "skipped" and "fixture not found" in rec["reason"]
            continue
        assert rec["status"] == "ok", (name, rec)
    run = d["run"]
    assert run["command"] == "python -m benchmarks.gpu_check " + " ".join(smoke["argv"])
    assert run["commit"] and run["date"] and run["machine"]["device"] == "cpu"
    assert d["device"] == "cpu" and d["smoke"] is True
    assert os.path.basename(smoke["path"]) == "gpu_check_smoke.json"
    assert d["anchors"]["var-d16"]["images_per_s"] == 123.0 and d["anchors"]["var-d30"]["images_per_s"] == 17.0
    assert smoke["wall_s"] < 60


def test_sampling_figures_are_measured_per_variant(smoke):
    """Catches: ``decode`` not reaching the sampler (decoding 64 x 64 images costs far more than
    the tokens of a tiny model), images/s not ``batch / s_per_call``, a fastest-variant summary
    that is not the maximum, CUDA-only variants silently missing instead of marked skipped."""
    d = smoke["json"]
    for m in ("smoke-a", "smoke-b"):
        rec = d["phases"][f"sampling/{m}"]
        tok, dec = rec["eager_tokens"], rec["eager_decoded"]
        assert tok["images_per_s"] == pytest.approx(rec["batch"] / tok["s_per_call"])
        assert dec["s_per_call"] > tok["s_per_call"]
        assert rec["cuda_graph_tokens"] == {"status": "skipped", "reason": "needs CUDA"}
        assert ("anchor_setting" in rec) == (m == "smoke-b")
        comp = d["phases"][f"compile/{m}"]
        assert comp["compiled_tokens"]["status"] == "ok" and comp["compiled_tokens"]["first_call_s"] > 0
        tokens = [r["images_per_s"] for r in (tok, comp["compiled_tokens"])]
        assert d["fastest_sampling"][m]["tokens"]["images_per_s"] == max(tokens)
    a = d["phases"]["sampling/smoke-b"]["anchor_setting"]
    assert a["status"] == "ok" and a["batch"] == 6 and a["images_per_s"] == pytest.approx(6 / a["s_per_call"])


def test_training_through_the_trainer_with_fsdp(smoke):
    """Catches: the FSDP model trained unsharded (or the group never created), tokens/s that is
    not batch x L per step, a loss that is not the untrained model's ~log V."""
    d = smoke["json"]
    a, b = d["phases"]["training/smoke-a"], d["phases"]["training/smoke-b"]
    assert "fsdp" not in a and a["sharded"] is False
    assert b["fsdp"]["used"] is True and b["fsdp"]["why_not"] is None and b["sharded"] is True
    for rec in (a, b):
        assert rec["tokens_per_s"] == pytest.approx(rec["batch"] * rec["L"] / rec["s_per_call"])
        assert rec["loss_first_step"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.3)
        assert "peak_mb" in rec["peak_memory"]
    assert not torch.distributed.is_initialized()  # the one-process group is torn down


@pytest.mark.skipif(not os.path.isfile(FIXTURE), reason="shared/fixtures/var_parity not present")
def test_parity_fp32_identical_and_bf16_really_bf16(smoke):
    """Catches: the fp32 parity not recomputing the reference tokens; the bf16 check running in
    fp32 (the logits would then be exact, not within bf16's rounding)."""
    p = smoke["json"]["phases"]["parity"]
    assert p["fp32"]["passed"] and p["fp32"]["tokens_differing"] == 0 and p["fp32"]["tokens_compared"] == 360
    assert p["bf16"]["passed"]
    assert 0 < p["bf16"]["logits_max_rel_error"] <= gpu_check.BF16_TOLERANCE["logits_max_rel_error"]
    assert set(p["bf16"]["greedy_token_agreement"]) == {"cfg0.0", "cfg1.5", "cfg4.0"}


def _check(tmp_path, *extra):
    return gpu_check.Check(gpu_check.parse(["--smoke", "--out", str(tmp_path), *extra]))


def test_budget_spent_skips_the_remaining_phases(tmp_path):
    """Catches: a guard that starts phases without the time to finish them (the full run must
    stay within its budget) or skips them without saying why."""
    path = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"])
    with open(path) as f:
        d = json.load(f)
    assert list(d["phases"]) == PHASES
    for rec in d["phases"].values():
        assert rec["status"] == "skipped" and "budget" in rec["reason"]


def test_timeout_oom_and_errors_end_only_their_phase_and_results_are_flushed(tmp_path):
    """Catches: a phase overrunning its budget (not interrupted), an out-of-memory or other error
    ending the whole check, results kept in memory until the end (lost if the run is killed)."""
    c = _check(tmp_path)
    on_disk = {}

    def slow(rec):
        rec["started"] = True
        time.sleep(60)

    def oom(rec):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def broken(rec):
        raise ValueError("bad shape")

    def partial(rec):
        gpu_check.attempt(rec, "fine", lambda: {"x": 1}, c.device)
        gpu_check.attempt(rec, "too_big", lambda: oom(rec), c.device)

    def reads_disk(rec):
        with open(c.path) as f:
            on_disk.update(json.load(f)["phases"])

    P = gpu_check.Phase
    c.plan = lambda: [P("slow", slow, 0.5, 0), P("oom", oom, 5, 0), P("broken", broken, 5, 0),
                      P("partial", partial, 5, 0), P("last", reads_disk, 5, 0)]
    t0 = time.perf_counter()
    c.run()
    assert time.perf_counter() - t0 < 30  # each flush runs git: seconds on a loaded machine
    with open(c.path) as f:
        ph = json.load(f)["phases"]
    assert ph["slow"]["status"] == "timeout" and ph["slow"]["started"] is True
    assert ph["oom"]["status"] == "oom" and "80 GiB" in ph["oom"]["error"]
    assert ph["broken"]["status"] == "error" and "bad shape" in ph["broken"]["error"]
    assert ph["partial"]["status"] == "partial"
    assert ph["partial"]["fine"] == {"status": "ok", "x": 1} and ph["partial"]["too_big"]["status"] == "oom"
    assert ph["last"]["status"] == "ok"
    assert [on_disk[k]["status"] for k in ("slow", "oom", "broken", "partial")] == ["timeout", "oom", "error", "partial"]


def test_training_halves_the_batch_on_out_of_memory(tmp_path, monkeypatch):
    """Catches: one out-of-memory at the planned batch losing the whole training figure."""
    c = _check(tmp_path)
    seen = []

    def fake_train(ctx, m, B, fsdp):
        seen.append(B)
        if B > 1:
            raise torch.cuda.OutOfMemoryError(f"no room for batch {B}")
        return {"batch": B, "tokens_per_s": 1.0}

    monkeypatch.setattr(gpu_check, "_train", fake_train)
    rec = {}
    gpu_check.phase_training(c, rec, c.models[0])
    assert seen == [4, 2, 1] and rec["batch"] == 1
    assert [t["batch"] for t in rec["out_of_memory_at"]] == [4, 2]


@pytest.mark.cuda
def test_smoke_on_cuda(tmp_path):
    """On a GPU machine: the CUDA-only paths (CUDA-graph replay of a whole sample, NCCL FSDP,
    bf16 autocast, TF32 off for fp32 parity) on tiny models."""
    with open(gpu_check.main(["--smoke", "--device", "cuda", "--out", str(tmp_path)])) as f:
        d = json.load(f)
    for name, rec in d["phases"].items():
        assert rec["status"] == "ok", (name, rec)
    s = d["phases"]["sampling/smoke-a"]
    assert s["cuda_graph_tokens"]["status"] == "ok" and s["cuda_graph_tokens"]["tokens_in_range"]
    assert d["phases"]["training/smoke-b"]["fsdp"]["used"] is True
    if os.path.isfile(FIXTURE):
        assert d["phases"]["parity"]["fp32"]["tokens_differing"] == 0


def test_fsdp_failure_falls_back_to_unsharded_training(tmp_path, monkeypatch):
    """Catches: an FSDP error (e.g. an optimizer without DTensor support) costing the d30 training
    figure, or the fallback not saying that the figure is unsharded and why."""
    c = _check(tmp_path)
    calls = []

    def fake_train(ctx, m, B, fsdp):
        calls.append(fsdp)
        if fsdp:
            raise RuntimeError("fused AdamW does not support DTensor")
        return {"batch": B, "sharded": False}

    monkeypatch.setattr(gpu_check, "_train", fake_train)
    rec = {}
    gpu_check.phase_training(c, rec, c.models[1])
    assert calls == [True, False] and rec["sharded"] is False
    assert rec["fsdp"]["used"] is False and "DTensor" in rec["fsdp"]["why_not"]
    assert not torch.distributed.is_initialized()


def test_fastest_variant_and_the_figure_beside_each_anchor(tmp_path):
    """Catches: an anchor set beside a figure of another setting (d30's anchor is fp32, batch 128,
    decoded: only the run in that setting may stand beside it), a fastest variant that is not the
    fastest, a speed-up over eager computed the wrong way round."""
    c = _check(tmp_path)
    c.models, c.bf16 = gpu_check._models(smoke=False), True
    ok = {"status": "ok"}
    c.phases = {
        "sampling/var-d16": {"batch": 64, "eager_tokens": {**ok, "images_per_s": 100.0},
                             "eager_decoded": {**ok, "images_per_s": 80.0},
                             "cuda_graph_tokens": {**ok, "images_per_s": 150.0},
                             "cuda_graph_decoded": {"status": "error", "images_per_s": 999.0}},
        "compile/var-d16": {"compiled_decoded": {**ok, "images_per_s": 90.0}},
        "sampling/var-d30": {"batch": 64, "eager_tokens": {**ok, "images_per_s": 30.0},
                             "anchor_setting": {**ok, "images_per_s": 20.0}},
    }
    f = c.fastest()
    assert f["var-d16"]["tokens"] == {"variant": "cuda_graph_tokens", "images_per_s": 150.0, "vs_eager": 1.5}
    assert f["var-d16"]["decoded"]["variant"] == "compiled_decoded"
    assert f["var-d30"]["tokens"]["variant"] == "eager_tokens"  # the anchor's own setting is not a variant
    a = c.beside_anchors(f)
    assert a["var-d16"]["measured_here"] == {"images_per_s": 150.0, "variant": "cuda_graph_tokens"}
    assert a["var-d30"]["measured_here"]["images_per_s"] == 20.0
    assert a["var-d30"]["anchor_images_per_s"] == 17.0


def test_a_timeout_swallowed_by_library_code_is_raised_again(tmp_path):
    """Catches: a one-shot alarm whose exception a library turns into another error (then caught
    per measurement), after which the phase would run unbounded."""
    c = _check(tmp_path)

    def swallows(rec):
        try:
            time.sleep(60)
        except gpu_check.PhaseTimeout:
            pass  # as a capture's __exit__ replacing the exception would
        gpu_check.attempt(rec, "after", lambda: time.sleep(60) or {}, c.device)
        time.sleep(60)

    c.plan = lambda: [gpu_check.Phase("swallows", swallows, 0.3, 0)]
    t0 = time.perf_counter()
    c.run()
    assert time.perf_counter() - t0 < 20
    with open(c.path) as f:
        assert json.load(f)["phases"]["swallows"]["status"] == "timeout"
