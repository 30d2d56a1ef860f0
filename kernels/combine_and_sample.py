"""One kernel from the two models' logits to the next token ids: vocab map + add + warp + sample.

Per tile of ROWS rows (one program), looping over the vocabulary in BLOCK columns:

  pass A   z = sum_k W[v,k] * z_base[idx[v,k]] + alpha * z_value[v] + sum_i w_i * z_i[v] (ELL map; identity
           without one; the M_TERMS extra same-vocabulary models of logit arithmetic: proxy tuning, DExperts); the
           non-finite flag of that combined z (no host sync: the caller checks the flag at its stop check); then,
           with HAS_PENALTY, the penalties in vLLM's order: repetition (seen = prompt_mask | count > 0:
           z * p if z < 0 else z / p, correctly rounded like torch), then z -= freq * count, then
           z -= pres * (count > 0). The penalized z is written to an fp32 workspace; per row: max, argmax (lowest
           index on ties) and sum exp (for logprobs), so greedy, logprobs and sampling all see the penalties.
  top_k    the k-th largest z, exactly: a 16-ary search over the order-preserving uint32 keys of the floats
           (8 passes; each counts the tokens at or above 16 pivots).
  top_p    the smallest z whose higher-ranked mass (within the top-k set, renormalised) is < top_p: the same
           search on masses (8 passes); if several tokens share that boundary value, as many of them are kept as
           a stable ascending sort would keep (the highest indices; 1 pass + a 6-pass index search). This is
           transformers' ascending-cumsum rule with ties ordered stably (its order on CUDA).
  min_p    keep exp((z - max) / T) >= min_p (a closed-form threshold).
  sample   Gumbel-max over the kept tokens: argmax(z / T - log(-log u)), u from Philox(seed; col, row,
           offset), so a captured graph draws fresh numbers when the offset tensor is advanced on device;
           with HAS_ROW_SEED, a row flagged in ``seeded`` draws from Philox(its seed; col, 0, its step) instead
           (:func:`ivl_fast.philox.row_uniforms` is the torch twin), whatever else shares the batch.

The logits are read a fixed number of times: 1 (greedy) or 1 + 8 [top_k] + 15 [top_p] + 1 (the first from the
inputs, the others from the workspace). With HAS_PENALTY, pass A also reads prompt_mask (1 byte per token) and
output_counts (4 bytes per token) once; later passes never touch them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# probability floor of a value token no base token maps to (its log, -69.1, is its mapped base log-probability):
# the same constant as ivl_fast.vocab.EMPTY_PROB (kernels/ imports nothing of the package)
EMPTY_PROB: tl.constexpr = tl.constexpr(1e-30)
NPIV: tl.constexpr = tl.constexpr(16)  # pivots per search pass (4 bits of the 32-bit key per pass)
NPASS: tl.constexpr = tl.constexpr(8)
NPASS_IDX: tl.constexpr = tl.constexpr(6)  # index searches: 16^6 covers vocabularies up to 16.7M
KEY_MAX: tl.constexpr = tl.constexpr(4294967295)


@triton.jit
def _keys(z):
    """fp32 -> int64 keys in [0, 2^32) with the order of the floats."""
    b = z.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(b >= 0x80000000, 0xFFFFFFFF - b, b + 0x80000000)


@triton.jit
def _block(work_ptr, rows, row_ok, stride_work, start, V, BLOCK: tl.constexpr):
    """One [R, BLOCK] tile of the workspace: (cols, in-bounds mask, z (-inf outside), keys (-1 outside))."""
    cols = start + tl.arange(0, BLOCK)
    ok = row_ok[:, None] & (cols < V)[None, :]
    z = tl.load(work_ptr + rows[:, None] * stride_work + cols[None, :], mask=ok, other=float("-inf"))
    return cols, ok, z, tl.where(ok, _keys(z), -1)


@triton.jit
def _pick(vals, sel, NPIV: tl.constexpr):
    """vals [R, NPIV], sel [R] (index) -> vals[r, sel[r]] (NPIV passed in: triton 3.1 reads no global in arange)."""
    cols = tl.arange(0, NPIV)[None, :]
    return tl.sum(tl.where(cols == sel[:, None], vals, 0), axis=1)


@triton.jit
def _combine_sample_kernel(
    base_ptr,
    value_ptr,
    map_idx_ptr,
    map_w_ptr,
    base_lse_ptr,
    workspace_ptr,
    ids_ptr,
    logprobs_ptr,
    bad_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    seed_ptr,
    offset_ptr,
    row_seed_ptr,
    row_step_ptr,
    seeded_ptr,
    terms_ptr,
    term_weights_ptr,
    prompt_mask_ptr,
    output_counts_ptr,
    repetition_penalty_ptr,
    presence_penalty_ptr,
    frequency_penalty_ptr,
    B,
    V,
    stride_base,
    stride_value,
    stride_workspace,
    stride_prompt_mask,
    stride_output_counts,
    stride_terms_m,
    stride_terms_b,
    alpha,
    HAS_BASE: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    K: tl.constexpr,
    DO_SAMPLE: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_TOPP: tl.constexpr,
    HAS_MINP: tl.constexpr,
    HAS_PENALTY: tl.constexpr,
    HAS_ROW_SEED: tl.constexpr,
    M_TERMS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # [R]
    row_ok = rows < B
    cols0 = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    # ---- pass A: combine, store, max / argmax / sumexp / finiteness
    m = tl.full([ROWS], neg_inf, tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    best = tl.full([ROWS, BLOCK], neg_inf, tl.float32)
    best_i = tl.zeros([ROWS, BLOCK], tl.int64)
    bad = tl.zeros([ROWS], tl.int32)
    if HAS_PENALTY:  # per-row penalties [R]; rows past B get the "off" values
        rep_p = tl.load(repetition_penalty_ptr + rows, mask=row_ok, other=1.0)[:, None]
        pres_p = tl.load(presence_penalty_ptr + rows, mask=row_ok, other=0.0)[:, None]
        freq_p = tl.load(frequency_penalty_ptr + rows, mask=row_ok, other=0.0)[:, None]
    for start in range(0, V, BLOCK):
        cols = start + cols0
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = tl.zeros([ROWS, BLOCK], tl.float32)
        if HAS_BASE:
            if HAS_MAP:
                # the base's distribution pushed through W: log(sum_k w * p_base[idx]), p_base = exp(z - lse)
                # (lse [R] from the launcher); a value token no base token maps to gets EMPTY_LOGPROB
                lse_b = tl.load(base_lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
                acc = tl.zeros([ROWS, BLOCK], tl.float32)
                for k in range(K):
                    idx = tl.load(map_idx_ptr + cols.to(tl.int64) * K + k, mask=cols < V, other=0).to(tl.int64)
                    w = tl.load(map_w_ptr + cols.to(tl.int64) * K + k, mask=cols < V, other=0.0)
                    zb = tl.load(base_ptr + rows[:, None] * stride_base + idx[None, :], mask=ok, other=0.0)
                    acc += w[None, :] * tl.exp(zb.to(tl.float32) - lse_b)
                z += tl.log(tl.maximum(acc, EMPTY_PROB))
            else:
                zb = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=ok, other=0.0)
                z += zb.to(tl.float32)
        if HAS_VALUE:
            zv = tl.load(value_ptr + rows[:, None] * stride_value + cols[None, :], mask=ok, other=0.0)
            z += alpha * zv.to(tl.float32)
        for m_i in tl.static_range(M_TERMS):  # logit arithmetic: + w_i * z_i of each extra model
            w_i = tl.load(term_weights_ptr + m_i)
            zt = tl.load(
                terms_ptr + m_i * stride_terms_m + rows[:, None] * stride_terms_b + cols[None, :], mask=ok, other=0.0
            )
            z += w_i * zt.to(tl.float32)
        finite = (z == z) & (tl.abs(z) < float("inf"))
        bad = tl.maximum(bad, tl.max(tl.where(ok & ~finite, 1, 0), axis=1))  # of the combined z, unpenalized
        if HAS_PENALTY:
            # [R, BLOCK] each
            pm = tl.load(prompt_mask_ptr + rows[:, None] * stride_prompt_mask + cols[None, :], mask=ok, other=0)
            cnt = tl.load(output_counts_ptr + rows[:, None] * stride_output_counts + cols[None, :], mask=ok, other=0)
            out = cnt > 0
            # div_rn: IEEE division, as torch does it (plain / on GPU is an approximate division)
            z_rep = tl.where(z < 0, z * rep_p, tl.math.div_rn(z, tl.broadcast_to(rep_p, [ROWS, BLOCK])))
            z = tl.where((pm != 0) | out, z_rep, z)
            # two subtractions, as the reference (and vLLM) does them
            z = z - freq_p * cnt.to(tl.float32)
            z = z - pres_p * out.to(tl.float32)
        z = tl.where(ok, z, neg_inf)
        tl.store(workspace_ptr + rows[:, None] * stride_workspace + cols[None, :], z, mask=ok)
        upd = z > best  # strict: keeps the earlier (lower) index on ties
        best_i = tl.where(upd, cols[None, :].to(tl.int64), best_i)
        best = tl.where(upd, z, best)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(bad_ptr + rows, bad, mask=row_ok)
    m = tl.where(row_ok, m, 0.0)  # rows past B: keep their (unused) arithmetic finite
    lse = m + tl.log(tl.where(row_ok, s, 1.0))
    greedy_i = tl.min(tl.where(best == m[:, None], best_i, 1 << 62), axis=1)
    out_i = greedy_i
    out_z = m

    if DO_SAMPLE:
        t = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
        sample_row = t > 0
        inv_t = tl.where(sample_row, 1.0 / tl.where(sample_row, t, 1.0), 1.0)
        lo = tl.zeros([ROWS], tl.int64)  # threshold key: keep keys >= lo
        zk = tl.zeros([ROWS], tl.float32)  # mass of the top-k set (masses are exp((z - m) / T))
        piv_i = tl.arange(0, NPIV).to(tl.int64)[None, :]
        if HAS_TOPK:
            k_req = tl.load(top_k_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            k_eff = tl.where(k_req > 0, tl.minimum(k_req, V), V)
            hi = tl.full([ROWS], KEY_MAX, tl.int64)
            for _pass in range(NPASS):
                piv = lo[:, None] + ((hi - lo + 1)[:, None] * piv_i) // NPIV  # [R, P], piv[:, 0] == lo
                cnt = tl.zeros([ROWS, NPIV], tl.int64)
                for start in range(0, V, BLOCK):
                    cols, ok, z, key = _block(workspace_ptr, rows, row_ok, stride_workspace, start, V, BLOCK)
                    cnt += tl.sum((key[:, :, None] >= piv[:, None, :]).to(tl.int64), axis=1)
                sel = tl.sum((cnt >= k_eff[:, None]).to(tl.int64), axis=1) - 1  # last pivot still holding k
                new_lo = _pick(piv, sel, NPIV)
                nxt = _pick(piv, tl.minimum(sel + 1, NPIV - 1), NPIV) - 1
                hi = tl.where(sel + 1 < NPIV, nxt, hi)
                lo = new_lo
        if HAS_TOPP:
            p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
            plo = lo
            phi = tl.full([ROWS], KEY_MAX, tl.int64)
            for it in range(NPASS):
                piv = plo[:, None] + ((phi - plo + 1)[:, None] * (piv_i + 1)) // NPIV - 1  # piv[:, -1] == phi
                mass_gt = tl.zeros([ROWS, NPIV], tl.float32)
                for start in range(0, V, BLOCK):
                    cols, ok, z, key = _block(workspace_ptr, rows, row_ok, stride_workspace, start, V, BLOCK)
                    w = tl.where(ok, tl.exp((z - m[:, None]) * inv_t[:, None]), 0.0)
                    mass_gt += tl.sum(tl.where(key[:, :, None] > piv[:, None, :], w[:, :, None], 0.0), axis=1)
                    if it == 0:
                        zk += tl.sum(tl.where(key >= lo[:, None], w, 0.0), axis=1)
                holds = mass_gt < (p * zk)[:, None]  # monotone in the pivot: false..false true..true
                sel = NPIV - tl.sum(holds.to(tl.int64), axis=1)  # first pivot where it holds
                new_hi = _pick(piv, sel, NPIV)
                prev = _pick(piv, tl.maximum(sel - 1, 0), NPIV) + 1
                plo = tl.where(sel > 0, prev, plo)
                phi = new_hi
            # the boundary value phi may be shared by several tokens: keep as many of them as a stable ascending
            # sort would (the highest indices), i.e. c = ceil((p * Z - mass above) / their mass each)
            m_gt = tl.zeros([ROWS], tl.float32)
            q_eq = tl.zeros([ROWS], tl.float32)
            n_eq = tl.zeros([ROWS], tl.int64)
            for start in range(0, V, BLOCK):
                cols, ok, z, key = _block(workspace_ptr, rows, row_ok, stride_workspace, start, V, BLOCK)
                w = tl.where(ok, tl.exp((z - m[:, None]) * inv_t[:, None]), 0.0)
                eq = key == phi[:, None]
                m_gt += tl.sum(tl.where(key > phi[:, None], w, 0.0), axis=1)
                q_eq = tl.maximum(q_eq, tl.max(tl.where(eq, w, 0.0), axis=1))
                n_eq += tl.sum(eq.to(tl.int64), axis=1)
            x = (p * zk - m_gt) / tl.where(q_eq > 0, q_eq, 1.0)
            need = x.to(tl.int64)
            need = need + (need.to(tl.float32) < x).to(tl.int64)  # ceil for x > 0
            need = tl.minimum(tl.maximum(need, 1), n_eq)
            # the need-th highest index among the tied tokens: 16-ary search over [0, V)
            ilo = tl.zeros([ROWS], tl.int64)
            ihi = tl.zeros([ROWS], tl.int64) + V - 1
            for _ip in range(NPASS_IDX):
                piv = ilo[:, None] + ((ihi - ilo + 1)[:, None] * piv_i) // NPIV
                cnt = tl.zeros([ROWS, NPIV], tl.int64)
                for start in range(0, V, BLOCK):
                    cols, ok, z, key = _block(workspace_ptr, rows, row_ok, stride_workspace, start, V, BLOCK)
                    eq = key == phi[:, None]
                    ge = cols[None, :, None].to(tl.int64) >= piv[:, None, :]
                    cnt += tl.sum((eq[:, :, None] & ge).to(tl.int64), axis=1)
                sel = tl.sum((cnt >= need[:, None]).to(tl.int64), axis=1) - 1
                new_lo = _pick(piv, sel, NPIV)
                nxt = _pick(piv, tl.minimum(sel + 1, NPIV - 1), NPIV) - 1
                ihi = tl.where(sel + 1 < NPIV, nxt, ihi)
                ilo = new_lo
            use_p = p < 1.0
            p_key = phi
            p_idx = ilo
        if HAS_MINP:
            minp = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
        # ---- final pass: Gumbel-max over the kept tokens
        # counters per row [R]: the batch's stream (key seed; row, offset), or with HAS_ROW_SEED, for the rows that
        # bring a seed, their own stream (key row seed; 0, the row's step): the same draws in any batch or slot
        rkey = tl.zeros([ROWS], tl.int64) + tl.load(seed_ptr).to(tl.int64)
        ctr = tl.zeros([ROWS], tl.int64) + tl.load(offset_ptr).to(tl.int64)
        c1r = rows
        if HAS_ROW_SEED:
            own = tl.load(seeded_ptr + rows, mask=row_ok, other=0) != 0
            rkey = tl.where(own, tl.load(row_seed_ptr + rows, mask=row_ok, other=0), rkey)
            ctr = tl.where(own, tl.load(row_step_ptr + rows, mask=row_ok, other=0), ctr)
            c1r = tl.where(own, 0, rows)
        c2 = (ctr & 0xFFFFFFFF).to(tl.uint32)
        c3 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
        sbest = tl.full([ROWS], neg_inf, tl.float32)
        sbest_i = greedy_i  # never emitted unless every kept score is -inf (then the argmax is kept anyway)
        sbest_z = m
        for start in range(0, V, BLOCK):
            cols, ok, z, key = _block(workspace_ptr, rows, row_ok, stride_workspace, start, V, BLOCK)
            keep = ok & (key >= lo[:, None])
            if HAS_TOPP:
                by_p = (key > p_key[:, None]) | ((key == p_key[:, None]) & (cols[None, :] >= p_idx[:, None]))
                keep = keep & (~use_p[:, None] | by_p)
            if HAS_MINP:
                keep = keep & (tl.exp((z - m[:, None]) * inv_t[:, None]) >= minp[:, None])
            c0 = tl.broadcast_to(cols[None, :], [ROWS, BLOCK]).to(tl.uint32)
            c1 = tl.broadcast_to(c1r[:, None], [ROWS, BLOCK]).to(tl.uint32)
            c2b, c3b = tl.broadcast_to(c2[:, None], [ROWS, BLOCK]), tl.broadcast_to(c3[:, None], [ROWS, BLOCK])
            keyb = tl.broadcast_to(rkey[:, None], [ROWS, BLOCK])
            r, _r1, _r2, _r3 = tl.philox(keyb, c0, c1, c2b, c3b)
            # u == 0 (probability 2^-31) would give a -inf score; clamp to the smallest positive draw's half
            u = tl.maximum(tl.uint_to_uniform_float(r), 2.3283064e-10)
            score = tl.where(keep, z * inv_t[:, None] - tl.log(-tl.log(u)), neg_inf)
            bm = tl.max(score, axis=1)
            bi = tl.min(tl.where(score == bm[:, None], cols[None, :].to(tl.int64), 1 << 62), axis=1)
            bz = tl.sum(tl.where(cols[None, :].to(tl.int64) == bi[:, None], z, 0.0), axis=1)
            upd = bm > sbest
            sbest_i = tl.where(upd, bi, sbest_i)
            sbest_z = tl.where(upd, bz, sbest_z)
            sbest = tl.where(upd, bm, sbest)
        out_i = tl.where(sample_row, sbest_i, greedy_i)
        out_z = tl.where(sample_row, sbest_z, m)
    tl.store(ids_ptr + rows, out_i, mask=row_ok)
    tl.store(logprobs_ptr + rows, out_z - lse, mask=row_ok)


# The kernel's runtime arguments in the order of its signature, with their types for the ahead-of-time build
# ("{dtype}": the logits' dtype). With the signature above, this is the only list of them: launch passes them by
# keyword, the op in ivl_fast.ops hands its inputs over by name (INPUTS) and the AOT specs are derived from here
# (tests/test_combine_and_sample.py checks the table against the signature).
ARGS = {
    "base_ptr": "*{dtype}",  # [B, V_base] (rows may be strided; unit-stride columns)
    "value_ptr": "*{dtype}",  # [B, V_out]
    "map_idx_ptr": "*i32",  # [V_out, K] the ELL vocabulary map: base ids per value token
    "map_w_ptr": "*fp32",  # [V_out, K] and their weights
    "base_lse_ptr": "*fp32",  # [B] (made by launch)
    "workspace_ptr": "*fp32",  # [B, V_out] the penalized combined logits
    "ids_ptr": "*i64",  # [B] out (made by launch)
    "logprobs_ptr": "*fp32",  # [B] out (made by launch)
    "bad_ptr": "*i32",  # [B] out (made by launch)
    "temperature_ptr": "*fp32",  # [B] (DO_SAMPLE)
    "top_k_ptr": "*i64",  # [B] (HAS_TOPK)
    "top_p_ptr": "*fp32",  # [B] (HAS_TOPP)
    "min_p_ptr": "*fp32",  # [B] (HAS_MINP)
    "seed_ptr": "*i64",  # [1] the batch's Philox key (DO_SAMPLE)
    "offset_ptr": "*i64",  # [1] its counter, advanced on device between graph replays (DO_SAMPLE)
    "row_seed_ptr": "*i64",  # [B] (HAS_ROW_SEED)
    "row_step_ptr": "*i64",  # [B] (HAS_ROW_SEED)
    "seeded_ptr": "*u8",  # [B] bool (HAS_ROW_SEED)
    "terms_ptr": "*{dtype}",  # [M, B, V_out] (M_TERMS)
    "term_weights_ptr": "*fp32",  # [M] (M_TERMS)
    "prompt_mask_ptr": "*u8",  # [B, V_out] bool (HAS_PENALTY)
    "output_counts_ptr": "*i32",  # [B, V_out] (HAS_PENALTY)
    "repetition_penalty_ptr": "*fp32",  # [B] (HAS_PENALTY)
    "presence_penalty_ptr": "*fp32",  # [B] (HAS_PENALTY)
    "frequency_penalty_ptr": "*fp32",  # [B] (HAS_PENALTY)
    "B": "i32",
    "V": "i32",
    "stride_base": "i32",
    "stride_value": "i32",
    "stride_workspace": "i32",
    "stride_prompt_mask": "i32",
    "stride_output_counts": "i32",
    "stride_terms_m": "i32",
    "stride_terms_b": "i32",
    "alpha": "fp32",
}
_MADE_HERE = ("base_lse", "workspace", "ids", "logprobs", "bad")
# The caller's inputs by name (the op's tensor list, in this order): a pointer argument without "_ptr". None means
# unused, and that is what switches its path off: no base -> HAS_BASE=False, no map_idx -> HAS_MAP=False, no
# temperature -> greedy, no top_k / top_p / min_p -> that filter off, no prompt_mask -> no penalties, no row_seed ->
# no per-row streams, no terms -> M_TERMS=0 (inputs of a path go together: map_idx with map_w, the penalties' five,
# the row seeds' three, terms with term_weights, temperature with seed and offset).
INPUTS = tuple(n[: -len("_ptr")] for n in ARGS if n.endswith("_ptr") and n[: -len("_ptr")] not in _MADE_HERE)


def launch(inputs: dict, v_out: int, alpha: float, workspace=None):
    """``inputs``: name (one of INPUTS) -> tensor or None; ``workspace``: [>= B, >= V_out] fp32 or None (allocated).
    Allocates the outputs and launches; returns (ids int64 [B], logprobs fp32 [B], bad bool [B])."""
    import os

    import torch

    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise TypeError(f"launch got unknown inputs {sorted(unknown)}; it takes {INPUTS}")
    x = {n: inputs.get(n) for n in INPUTS}
    base, value = x["base"], x["value"]
    ref = base if base is not None else value
    b, dev = ref.shape[0], ref.device
    if workspace is None or workspace.shape[0] < b or workspace.shape[1] < v_out:
        workspace = torch.empty(b, v_out, dtype=torch.float32, device=dev)
    ids = torch.empty(b, dtype=torch.int64, device=dev)
    lp = torch.empty(b, dtype=torch.float32, device=dev)
    bad = torch.empty(b, dtype=torch.int32, device=dev)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    # NOTE: on GPU one row per program streams its row; in the interpreter many rows per program keep the
    # (per-program, ~ms) launch overhead small. Untuned on hardware so far.
    block = min(512 if interp else 1024, triton.next_power_of_2(v_out))
    rows = max(1, min(256, triton.next_power_of_2(b), (1 << 20) // (block * NPIV.value))) if interp else 1
    has_map = x["map_idx"] is not None
    flags = dict(
        HAS_BASE=base is not None,
        HAS_VALUE=value is not None,
        HAS_MAP=has_map,
        K=int(x["map_idx"].shape[1]) if has_map else 1,
        DO_SAMPLE=x["temperature"] is not None,
        HAS_TOPK=x["top_k"] is not None,
        HAS_TOPP=x["top_p"] is not None,
        HAS_MINP=x["min_p"] is not None,
        HAS_PENALTY=x["prompt_mask"] is not None,
        HAS_ROW_SEED=x["row_seed"] is not None,
        M_TERMS=0 if x["terms"] is None else int(x["terms"].shape[0]),
    )
    # rows may be strided (the kernel reads them through stride(0)): a [B, V] view of [B, V_rows] padded logits
    # (ModelSet.trim) is read in place instead of copied each step; only columns must be unit-stride
    for n in ("base", "value", "terms"):
        t = x[n]
        x[n] = t if t is None or t.stride(-1) == 1 else t.contiguous()
    for n in ("prompt_mask", "seeded"):  # bool -> its bytes (same size; Triton has no bool pointer)
        x[n] = None if x[n] is None else x[n].contiguous().view(torch.uint8)
    # [B] fp32: the base rows' log-sum-exp, for the map's push-forward of probabilities. NOTE: one more read of the
    # [B, V_base] logits (and an fp32 copy of bf16 ones) before the kernel; a pre-pass over the base row inside the
    # kernel would save it (not done: the GPU path is not yet validated, nothing measured)
    x["base_lse"] = torch.logsumexp(base.float(), dim=-1).contiguous() if has_map else None
    x.update(workspace=workspace, ids=ids, logprobs=lp, bad=bad)
    # a path switched off gets a placeholder of its pointer's type (never read: its constexpr flag is False)
    spare = {"*i64": ids, "*fp32": lp, "*i32": bad, "*u8": bad, "*{dtype}": ref}
    args = {}
    for name, kind in ARGS.items():
        if name.endswith("_ptr"):
            t = x[name[: -len("_ptr")]]
            if t is None:
                t = spare[kind]
            elif name[: -len("_ptr")] not in _STRIDED:
                t = t.contiguous()
            args[name] = t
    terms = args["terms_ptr"] if x["terms"] is not None else lp.view(1, 1, -1)
    args.update(
        B=b,
        V=v_out,
        stride_base=args["base_ptr"].stride(0),
        stride_value=args["value_ptr"].stride(0),
        stride_workspace=workspace.stride(0),
        stride_prompt_mask=args["prompt_mask_ptr"].stride(0),
        stride_output_counts=args["output_counts_ptr"].stride(0),
        stride_terms_m=terms.stride(0),
        stride_terms_b=terms.stride(1),
        alpha=alpha,
    )
    grid = (triton.cdiv(b, rows),)
    _combine_sample_kernel[grid](**args, **flags, ROWS=rows, BLOCK=block, num_warps=4 if interp else 8)
    return ids, lp, bad.bool()


_STRIDED = ("base", "value", "terms", "workspace")  # read through their row strides (the rest must be contiguous)


def _aot_spec(dtype: str, **flags):
    sig = {name: kind.format(dtype=dtype) for name, kind in ARGS.items()}
    const = dict(HAS_BASE=True, HAS_VALUE=True, HAS_MAP=False, K=1, DO_SAMPLE=False, HAS_TOPK=False, HAS_TOPP=False)
    const.update(HAS_MINP=False, HAS_PENALTY=False, HAS_ROW_SEED=False, M_TERMS=0, ROWS=1, BLOCK=1024)
    const.update(flags)
    sig.update({k: "constexpr" for k in const})
    return (_combine_sample_kernel, sig, const, {"num_warps": 8})


# Ahead-of-time compile specs: the decode defaults (bf16 logits, greedy), the full sampling path with a map, the
# penalties (greedy, and with the full sampling path and a map), and a server's per-request batch (every warper,
# the penalties, per-request seeds).
AOT_SPECS = [
    _aot_spec("bf16"),
    _aot_spec("bf16", HAS_MAP=True, K=4, DO_SAMPLE=True, HAS_TOPK=True, HAS_TOPP=True, HAS_MINP=True),
    _aot_spec("fp32", DO_SAMPLE=True, HAS_TOPP=True),
    _aot_spec("bf16", HAS_PENALTY=True),
    _aot_spec("bf16", HAS_MAP=True, K=4, DO_SAMPLE=True, HAS_TOPK=True, HAS_TOPP=True, HAS_MINP=True, HAS_PENALTY=True),
    _aot_spec("bf16", DO_SAMPLE=True, HAS_TOPK=True, HAS_TOPP=True, HAS_MINP=True, HAS_PENALTY=True, HAS_ROW_SEED=True),
    _aot_spec("bf16", DO_SAMPLE=True, HAS_TOPP=True, M_TERMS=1),  # proxy tuning: large + (small tuned - small)
]
