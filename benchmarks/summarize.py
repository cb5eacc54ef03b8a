"""Print the markdown results table of ``benchmarks/README.md`` from the committed JSON files.

    python -m benchmarks.summarize
"""
from __future__ import annotations

import json
import os

from .common import RESULTS, fit_power_law


def _load(name: str):
    path = os.path.join(RESULTS, name, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _env(rec: dict) -> str:
    if "run" in rec:
        run, m = rec["run"], rec["run"]["machine"]
        # provenance() records "loadavg" at start; some benchmarks add the load at start and end
        start, end = m.get("loadavg_start", m.get("loadavg")), m.get("loadavg_end", m.get("loadavg"))
        threads, load, torch_v = m["torch_threads"], (start[0], end[0]), m["torch"]
        date, commit = run["date"], run["commit"][:8] + ("+dirty" if run["dirty"] else "")
    else:  # records written before the "run" block
        threads, load, torch_v = rec["torch_threads"], (rec["loadavg_start"][0], rec["loadavg_end"][0]), rec["torch"]
        date, commit = rec["date"], rec["git_commit"][:8]
    return f"threads {threads}, load {load[0]:.1f}-{load[1]:.1f}, torch {torch_v}, {date[:16]}, commit {commit}"


def next_scale_vs_raster(rec: dict) -> list[str]:
    f = rec["figures"]
    out = [f"### next-scale vs raster ({rec['config']['preset']}: depth {rec['config']['depth']}, width "
           f"{rec['config']['width']}, vocab {rec['config']['vocab']}; {_env(rec)})", "",
           "| N | steps next-scale / raster | GFLOPs next-scale / raster (KV cache) / raster (no cache) | "
           "CPU s per sample b=1, next-scale / raster | raster / next-scale CPU time, b=1 | same, batch "
           f"{rec['config']['batch']} | peak MB (batch) next-scale / raster |",
           "|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        ns, ra, q = r["next_scale"], r["raster"], r["ratios_raster_over_next_scale"]
        cpu = lambda o: o["time_b1"].get("median_process_cpu_s", float("nan"))  # noqa: E731
        cpub = lambda o: o["time_batch"].get("median_process_cpu_s", float("nan"))  # noqa: E731
        out.append(f"| {r['N']} | {ns['steps']} / {ra['steps']} | {ns['flops'] / 1e9:.2f} / {ra['flops'] / 1e9:.2f} / "
                   f"{r['raster_uncached']['flops'] / 1e9:.1f} | {cpu(ns):.3f} / {cpu(ra):.3f} | "
                   f"**{cpu(ra) / cpu(ns):.1f}x** (wall {q['time_b1']:.1f}x) | {cpub(ra) / cpub(ns):.1f}x "
                   f"(wall {q['time_batch']:.1f}x) | "
                   f"{ns['peak_memory_batch']['peak_mb']:.0f} / {ra['peak_memory_batch']['peak_mb']:.0f} |")
    e = f["exponents_in_N"]
    Ns = [r["N"] for r in f["rows"]]
    cpu_fit = {o: fit_power_law(Ns, [r[o]["time_b1"].get("median_process_cpu_s", float("nan")) for r in f["rows"]])["exponent"]
               for o in ("next_scale", "raster")}
    out += ["", "Growth exponents in N (log-log least squares): "
            f"FLOPs next-scale **{e['next_scale']['flops']['exponent']:.2f}**, raster with KV cache "
            f"**{e['raster']['flops']['exponent']:.2f}**, raster without cache **{e['raster_uncached']['flops']['exponent']:.2f}**; "
            f"attention FLOPs only: next-scale {e['next_scale']['flops_attention']['exponent']:.2f}, raster "
            f"{e['raster']['flops_attention']['exponent']:.2f}; wall time b=1: next-scale "
            f"{e['next_scale']['time_b1']['exponent']:.2f}, raster {e['raster']['time_b1']['exponent']:.2f}; "
            f"CPU time b=1: next-scale {cpu_fit['next_scale']:.2f}, raster {cpu_fit['raster']:.2f}.", ""]
    return out


def sampling(rec: dict) -> list[str]:
    out = [f"### sampling throughput ({_env(rec)})", "",
           "| config | batch | msar.sample s/batch wall (CPU s) | images/s wall | x recorded reference time (wall) | "
           "+ decoder: s/image wall (CPU) | peak MB | greedy cached == uncached |", "|---|---|---|---|---|---|---|---|"]
    for r in rec["figures"]["rows"]:
        m = r["msar_sample"]
        sp = r.get("speedup_vs_reference", {}).get("msar_sample")
        dec = r.get("decoder_included")
        out.append(f"| {r['config']} | {r['batch']} | {m['s_per_batch']:.1f} ({m['timing'].get('median_process_cpu_s', float('nan')):.1f}) | "
                   f"{m['images_per_s']:.3f} | {'%.2fx' % sp if sp else '-'} | {'%.2f (%.2f)' % (1 / dec['images_per_s'], 1 / dec['images_per_cpu_s']) if dec else '-'} | "
                   f"{m['peak_memory']['peak_mb']:.0f} | {r['greedy_cached_vs_uncached']['identical']} "
                   f"({r['greedy_cached_vs_uncached']['tokens']} tokens) |")
    return out + [""]


def vs_reference(rec: dict) -> list[str]:
    out = [f"### against the reference VAR code, interleaved runs ({_env(rec)}; VAR {rec['config']['reference_commit'][:8]})", "",
           "| config | batch | threads | reference CPU s (wall s) | msar.sample CPU s | speed-up CPU (wall) | goal | "
           "greedy tokens identical to reference |", "|---|---|---|---|---|---|---|---|"]
    for r in rec["figures"]["rows"]:
        t, s = r["timing"], r["speedup_vs_reference"]
        g = r["greedy_msar_vs_reference"]
        goal = f"{r['goal']:.1f}x" if r.get("goal") else "-"  # older files have neither threads nor goal
        out.append(f"| {r['config']} | {r['batch']} | {r.get('threads', '-')} | "
                   f"{t['reference']['median_cpu_s']:.2f} ({t['reference']['median_wall_s']:.1f}) | "
                   f"{t['msar_sample']['median_cpu_s']:.2f} | **{s['msar_sample']['cpu']:.2f}x** ({s['msar_sample']['wall']:.2f}x) | "
                   f"{goal} | {g['identical']} ({g['tokens']} tokens) |")
    return out + [""]


def vs_reference_training(rec: dict) -> list[str]:
    f = rec["figures"]
    loss = f["first_step_loss"]
    out = [f"### training step against the reference VAR code (forward + backward + AdamW, interleaved; {_env(rec)}; "
           f"first-step loss {loss['reference']:.4f} reference / {loss['msar']:.4f} msar)", "",
           "| config | batch | threads | reference tokens/s wall | msar tokens/s wall | speed-up CPU (wall) | goal |",
           "|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        t, s = r["timing"], r["speedup_vs_reference"]
        out.append(f"| {r['config']} | {r['batch']} | {r['threads']} | {t['reference']['tokens_per_s_wall']:.0f} | "
                   f"{t['msar']['tokens_per_s_wall']:.0f} | **{s['cpu']:.2f}x** ({s['wall']:.2f}x) | {r['goal']:.1f}x |")
    return out + [""]


def training(rec: dict) -> list[str]:
    out = [f"### training step ({rec['config']['preset']}, batch {rec['config']['batch']}; {_env(rec)})", "",
           "| mask | compiled | tokens/s wall | tokens per CPU-s | s/step wall | peak MB |", "|---|---|---|---|---|---|"]
    for r in rec["figures"]["rows"]:
        if "error" in r:
            out.append(f"| {r['mask']} | {r['compiled']} | not run: {r['error'][:90]} | | | |")
            continue
        cpu = r.get("tokens_per_cpu_s") or r["batch"] * r["L"] / r["timing"]["median_process_cpu_s"]
        out.append(f"| {r['mask']} | {r['compiled']} | {r['tokens_per_s']:.0f} | {cpu:.0f} | {r['s_per_step']:.1f} | "
                   f"{r['peak_memory']['peak_mb']:.0f} |")
    return out + [""]


def scaling(rec: dict) -> list[str]:
    f = rec["figures"]
    out = [f"### scaling laws ({rec['config']['preset']}: {len(f['rows'])} sizes, {f['param_span']:.0f}x span, "
           f"{rec['config']['steps']} steps; {_env(rec)})", "",
           "| depth | width | params | test CE last scale | test CE all scales |", "|---|---|---|---|---|"]
    for r in f["rows"]:
        out.append(f"| {r['depth']} | {r['width']} | {r['params']} | {r['test_loss_last']:.4f} | {r['test_loss_all']:.4f} |")
    a, b = f["fit_last_scale"], f["fit_all_scales"]
    out += ["", f"Fit L = (aN)^b: last scale b = **{a['exponent']:.3f}**, Pearson r = **{a['pearson_r']:.4f}**; "
            f"all scales b = **{b['exponent']:.3f}**, r = **{b['pearson_r']:.4f}** (VAR paper: r about -0.998). "
            f"Tokenizer: reconstruction MSE {f['tokenizer']['recon_mse']:.3f}, codebook usage per scale "
            f"{', '.join('%.0f%%' % u for u in f['tokenizer']['usage_percent'])}.", ""]
    return out


def main() -> None:
    parts = []
    for name, fn in (("next_scale_vs_raster", next_scale_vs_raster), ("sampling_throughput", sampling),
                     ("vs_reference", vs_reference), ("training_throughput", training), ("scaling_laws", scaling)):
        rec = _load(name)
        if rec is not None:
            parts += fn(rec)
        if name == "vs_reference":  # extra runs kept in sub-folders (other configs / thread counts)
            base = os.path.join(RESULTS, name)
            for sub in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                path = os.path.join(base, sub, f"{name}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        parts += [f"(`{name}/{sub}`)", ""] + fn(json.load(f))
            path = os.path.join(base, "vs_reference_training.json")
            if os.path.exists(path):
                with open(path) as f:
                    parts += vs_reference_training(json.load(f))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
