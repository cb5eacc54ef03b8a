"""Conformance kit for modality adapters: one call runs the protocol checks.

An adapter author writes::

    from msar.testing import check_adapter
    report = check_adapter(my_tokenizer, a_small_batch, model=tiny_transformer(my_tokenizer))

and gets, as ``AssertionError`` with a message naming the check, the scale and what broke:

* **pyramid**    (when the adapter has a latent pyramid: ``tokenizer.quantizer.pyramid`` of a
                 :class:`~msar.tokenizer.MultiScaleVQTokenizer`, or ``pyramid=``) the semantics
                 of restriction / prolongation, see :func:`check_pyramid`;
* **shapes**     ``encode(data)`` gives ``len(schedule)`` integer tensors ``(B, n_k)``
                 in ``[0, vocab_size)``; the batch size B is taken from it;
* **determinism** encoding twice gives the same tokens;
* **round trip** ``decode(encode(data))`` runs and keeps the batch size;
* **scales matter** changing the tokens of any one scale changes the decoded data (a scale
                 the decoder never sees is dead weight the transformer still has to predict);
* **teacher forcing** feeding the ground-truth indices to ``start()`` /
                 ``state.add_scale()`` scale by scale yields exactly
                 ``teacher_forcing_input(indices)`` (so training and sampling
                 see the same inputs), and ``finish(state)`` equals ``decode(indices)``;
* with a ``model``: **KV cache** -- scale-by-scale cached logits equal the full
                 block-causal forward; **sampling** -- a seeded :func:`msar.sample`
                 reproduces itself and teacher-forcing every token as *known*
                 returns exactly those tokens (the editing path).

The pieces are exported too (``check_pyramid``, ``assert_teacher_forcing_consistent``,
``assert_kv_cache_equivalent``, ``assert_block_causal``...), together with
hypothesis strategies (:func:`random_schedules`) for property tests.
Hypothesis is imported lazily: ``msar.testing`` itself needs only torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .conditioning import Condition
from .models.transformer import NextScaleTransformer, TransformerConfig
from .pyramid import LatentPyramid, OperatorPyramid
from .sampling import sample
from .schedule import ScaleSchedule
from .tokenizer import MultiScaleVQTokenizer, candidate_features

__all__ = [
    "check_adapter", "check_pyramid", "check_indices_contract", "assert_teacher_forcing_consistent",
    "assert_kv_cache_equivalent", "assert_sampling_reproducible", "assert_scales_matter", "assert_block_causal",
    "tiny_transformer", "random_schedules", "random_indices", "random_condition",
]

# Relative round-trip error allowed for pyramids that only approximately satisfy
# restrict(prolong(h)) == h: the result must be closer to h than zero is. Area pooling after
# (bi|tri)linear / bicubic upsampling of white noise loses much of it (measured: up to 0.71
# in 1-D, 0.78 in 2-D, 0.90 in 3-D for sides n -> n + 1), but keeps it in place; a zero
# prolongation gives exactly 1.0, a prolongation that puts values in the wrong cells (a
# flipped axis) 1.03 to 1.24, a restriction that sums instead of averaging >= 1.
APPROX_ROUND_TRIP_TOL = 1.0

# The coverage check builds the prolongation matrices explicitly; above this many
# full-resolution cells it is skipped (and reported as skipped).
COVERAGE_MAX_CELLS = 4096


# ---------------------------------------------------------------------------- small helpers
def _fail(check: str, msg: str, kit: str = "check_adapter") -> None:
    raise AssertionError(f"{kit}[{check}]: {msg}")


def _device_of(tokenizer: Any) -> torch.device:
    if isinstance(tokenizer, nn.Module):
        for p in tokenizer.parameters():
            return p.device
    return torch.device("cpu")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if a.numel() == 0 else float((a.float() - b.float()).abs().max())


class _EvalMode:
    """Put modules in eval mode for the checks and restore their flags afterwards."""

    def __init__(self, *modules: Any):
        self.modules = [m for m in modules if isinstance(m, nn.Module)]

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, f in zip(self.modules, self.flags):
            m.train(f)


# ---------------------------------------------------------------------------- pyramid semantics
def _first_bad(bad: torch.Tensor) -> str:
    """``bad``: (B, C, n) bool -> 'token i' (the first offending position)."""
    b, c, i = (int(v) for v in bad.nonzero()[0])
    return f"token {i}" + (f" of sample {b}" if bad.shape[0] > 1 and b > 0 else "")


def check_pyramid(pyramid: LatentPyramid, latent_dim: int = 4, *, batch_size: int = 2,
                  exact_round_trip: bool | None = None, nested: bool = False, atol: float = 1e-5,
                  seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Check the semantics of a :class:`~msar.pyramid.LatentPyramid`, scale by scale.

    The residual quantizer runs whatever ``restrict`` / ``prolong`` it is given; a pyramid
    that sums instead of averaging, has empty clusters or never prolongs a scale still
    trains and reconstructs (the finest scale absorbs the error) while the coarse scales
    explain far less. These checks catch that before any training:

    ==================  ========================================================================
    ``counts``          ``restrict(f, k)`` is ``(B, C, *schedule.shape(k))`` (its token count is
                        ``n_k``), ``prolong(h, k)`` is ``(B, C, *full)``, and the scales together can
                        represent any full latent: the last scale has one token per full cell (or,
                        for pyramids split in parts such as one per video frame, the prolongations
                        of all scales span the full latent)
    ``finite``          restriction and prolongation of finite latents are finite (NaN / inf operators)
    ``empty``           no token of scale k has an empty support (a restriction row of zeros: an
                        empty cluster, typically a schedule counting more tokens than the hierarchy)
    ``constants``       a constant field restricts to that constant (averaging, not summing), prolongs
                        to that constant wherever it lands (zero elsewhere, e.g. other frames) and
                        not to zero everywhere, and comes back unchanged: ``restrict(prolong(c)) == c``
    ``round_trip``      ``restrict(prolong(h, k), k) == h`` for random ``h``: exactly (``atol``, relative)
                        when ``exact_round_trip``, else within a relative error of
                        ``APPROX_ROUND_TRIP_TOL`` = 1 (closer to ``h`` than zero is: interpolating
                        pyramids lose up to 0.9 of white noise, but keep it in place)
    ``nested``          (only with ``nested=True``) every token of scale k is a union of tokens of
                        scale k+1: restricting through scale k+1 changes nothing,
                        ``restrict_k(prolong_{k+1}(restrict_{k+1}(f))) == restrict_k(f)``; catches
                        groupings of non-sibling cells in a tree hierarchy
    ==================  ========================================================================

    Args:
        pyramid: the pyramid; its declared ``full`` is the full latent shape.
        latent_dim: channels C of the test latents.
        batch_size: B of the test latents (must equal the batch of per-sample operators).
        exact_round_trip: True for averaging pyramids (hard clusters: the mean of copies is the
            value); False for interpolating ones such as :class:`~msar.pyramid.GridPyramid`
            (area down, bicubic up). Default: True for :class:`~msar.pyramid.OperatorPyramid`,
            False otherwise.
        nested: declare the scales a tree (each coarse cell the union of finer cells), as for a
            nested pixelisation or a graph coarsening; a non-nested intermediate level is
            legitimate otherwise.
        atol: tolerance of the exact comparisons, relative to the size of the values.
        seed: seed of the random test latents.
        device: where the test latents live.

    Returns:
        ``{"round_trip_error": [relative error per scale], "checks": [...]}``.

    Raises:
        AssertionError: ``check_pyramid[<check>]: scale k: <what is wrong>``.
    """
    def fail(check: str, msg: str) -> None:
        _fail(check, msg, kit="check_pyramid")

    sched = pyramid.schedule
    if not isinstance(sched, ScaleSchedule):
        fail("counts", f"pyramid.schedule must be a ScaleSchedule, got {type(sched).__name__}")
    full = tuple(int(d) for d in pyramid.full)
    if exact_round_trip is None:
        exact_round_trip = isinstance(pyramid, OperatorPyramid)
    K, B, C, N = len(sched), batch_size, latent_dim, math.prod(full)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def restrict(f: torch.Tensor, k: int) -> torch.Tensor:
        r = pyramid.restrict(f, k)
        want = (f.shape[0], f.shape[1], *sched.shape(k))
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != want:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            n = math.prod(r.shape[2:]) if isinstance(r, torch.Tensor) else "?"
            fail("counts", f"scale {k}: restrict(f, {k}) returned {got}, expected (B, C, *shape_{k}) = {want}: the "
                           f"schedule says n_{k} = {sched.token_counts[k]} tokens, the pyramid gives {n}")
        if not torch.isfinite(r).all():
            fail("finite", f"scale {k}: restrict of a finite latent contains NaN or inf (NaN / infinite operator entries?)")
        return r.reshape(f.shape[0], f.shape[1], -1)  # (B, C, n_k)

    def prolong(h: torch.Tensor, k: int) -> torch.Tensor:
        p = pyramid.prolong(h.reshape(h.shape[0], h.shape[1], *sched.shape(k)), k)
        want = (h.shape[0], h.shape[1], *full)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != want:
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            fail("counts", f"scale {k}: prolong(h, {k}) returned {got}, expected (B, C, *full) = {want}")
        if not torch.isfinite(p).all():
            fail("finite", f"scale {k}: prolong of a finite latent contains NaN or inf (NaN / infinite operator entries?)")
        return p

    c = 1.5
    tol = atol * max(1.0, c)
    errors: list[float] = []
    for k in range(K):
        n = sched.token_counts[k]
        # ---- counts and finiteness (inside restrict / prolong)
        f = rand(B, C, *full)
        restrict(f, k)
        # ---- empty supports: a row of zeros reads neither a constant nor a positive random field
        r_one = restrict(torch.ones(B, C, *full, device=device), k)
        r_pos = restrict(torch.rand(B, C, *full, generator=g).to(device) + 0.5, k)
        empty = (r_one.abs() <= tol) & (r_pos.abs() <= tol)
        if empty.any():
            fail("empty", f"scale {k}: {_first_bad(empty)} of {n} has an empty support (its restriction reads no fine "
                          f"cell: an empty cluster); {int(empty[:, 0].sum())} empty in all. Does the schedule's "
                          f"n_{k} = {n} exceed the number of cells of that level of the hierarchy?")
        # ---- constants
        r_c = restrict(torch.full((B, C, *full), c, device=device), k)
        bad = (r_c - c).abs() > tol
        if bad.any():
            v = float(r_c[bad][0])
            hint = " (the sum of its cells instead of their mean?)" if v > c else ""
            fail("constants", f"scale {k}: restricting the constant field {c} gives {v:.4g} at {_first_bad(bad)}"
                              f"{hint}: restriction must average (each row summing to 1)")
        p_c = prolong(torch.full((B, C, n), c, device=device), k)
        if not (p_c.abs() > tol).any():
            fail("constants", f"scale {k}: prolong maps the constant {c} to zero everywhere: scale {k}'s tokens never "
                              f"reach the latent (a zero prolongation)")
        odd = ((p_c - c).abs() > tol) & (p_c.abs() > tol)
        if odd.any():
            fail("constants", f"scale {k}: prolonging the constant {c} gives {float(p_c[odd][0]):.4g} at a fine cell: "
                              f"prolongation must copy or interpolate (a constant stays that constant where it lands)")
        rp_c = restrict(p_c, k)
        bad = (rp_c - c).abs() > tol
        if bad.any():
            fail("constants", f"scale {k}: restrict(prolong(constant {c})) gives {float(rp_c[bad][0]):.4g} at "
                              f"{_first_bad(bad)}: that token's value does not come back (its prolongation "
                              f"misses its own cells)")
        # ---- round trip
        h = rand(B, C, n)
        rp = restrict(prolong(h, k), k)
        err = float((rp - h).norm() / h.norm().clamp_min(1e-12))
        errors.append(err)
        if exact_round_trip:
            bad = (rp - h).abs() > atol * max(1.0, float(h.abs().max()))
            if bad.any():
                fail("round_trip", f"scale {k}: restrict(prolong(h)) differs from h at {_first_bad(bad)} (relative "
                                   f"error {err:.3g}): a coarse value does not come back; do restriction and "
                                   f"prolongation group the same cells? (pass exact_round_trip=False for an "
                                   f"interpolating pyramid)")
        elif not err < APPROX_ROUND_TRIP_TOL:
            fail("round_trip", f"scale {k}: restrict(prolong(h)) differs from h by a relative error of {err:.3g} "
                               f"(allowed {APPROX_ROUND_TRIP_TOL} for an approximate pyramid): a coarse value does "
                               f"not come back")
    checks = ["counts", "finite", "empty", "constants", "round_trip"]

    # ---- nested hierarchy
    if nested:
        f = rand(B, C, *full)
        for k in range(K - 1):
            direct = restrict(f, k)
            via = restrict(prolong(restrict(f, k + 1), k + 1), k)
            bad = (via - direct).abs() > atol * max(1.0, float(direct.abs().max()))
            if bad.any():
                fail("nested", f"scales {k} and {k + 1}: {_first_bad(bad)} of scale {k} is not a union of scale-{k + 1} "
                               f"cells (restricting through scale {k + 1} changes it by {_max_abs_diff(via, direct):.3g}): "
                               f"the hierarchy groups non-sibling cells")
        checks.append("nested")

    # ---- coverage: can the scales together represent any full latent?
    report: dict = {"round_trip_error": errors}
    if sched.token_counts[-1] != N:
        if N > COVERAGE_MAX_CELLS:
            report["coverage"] = f"skipped (full latent of {N} cells > {COVERAGE_MAX_CELLS})"
        else:
            # prolong the basis of every scale, the basis vectors laid along the channels
            cols = [prolong(torch.eye(n, device=device).unsqueeze(0).expand(B, n, n).contiguous(), k)[0].reshape(n, N)
                    for k, n in enumerate(sched.token_counts)]
            rank = int(torch.linalg.matrix_rank(torch.cat(cols).double()))
            if rank < N:
                fail("counts", f"scale {K - 1}: the last scale has {sched.token_counts[-1]} tokens but the full latent "
                               f"{full} has {N} cells, and all scales together span only {rank} of them: the residual "
                               f"can never be reduced to zero (does the schedule end at the full resolution?)")
            report["coverage"] = "ok"
    report["checks"] = checks
    return report


# ---------------------------------------------------------------------------- the individual checks
def check_indices_contract(indices: Any, schedule: ScaleSchedule, vocab_size: int,
                           batch_size: int | None = None, what: str = "encode(data)") -> int:
    """Assert ``indices`` is a list of ``len(schedule)`` integer ``(B, n_k)`` tensors in
    ``[0, vocab_size)`` (and ``B == batch_size`` when given). Returns B."""
    if not isinstance(indices, (list, tuple)):
        _fail("shapes", f"{what} must return a list of per-scale (B, n_k) tensors, got {type(indices).__name__}")
    if len(indices) != len(schedule):
        _fail("shapes", f"{what} returned {len(indices)} scales, the schedule {schedule} has {len(schedule)}")
    try:
        B = schedule.check_indices(indices, vocab_size, batch_size=batch_size, name=what)
    except (ValueError, TypeError) as e:
        _fail("shapes", str(e))
    return B


def assert_teacher_forcing_consistent(tokenizer: Any, indices: Sequence[torch.Tensor], *,
                                      atol: float = 1e-5, context: Any = None,
                                      device: torch.device | str = "cpu") -> float:
    """Feed ground-truth ``indices`` to a fresh decode state ``tokenizer.start(B, device, context)``
    scale by scale and assert the returned next-scale inputs, concatenated, equal
    ``tokenizer.teacher_forcing_input(indices)`` ``(B, L - n_0, C)``. Returns the largest
    absolute difference."""
    sched: ScaleSchedule = tokenizer.schedule
    K, B, C = len(sched), indices[0].shape[0], tokenizer.latent_dim
    tf = tokenizer.teacher_forcing_input(indices)
    want = (B, sched.L - sched.first_len, C)
    if not isinstance(tf, torch.Tensor) or tuple(tf.shape) != want:
        got = tuple(tf.shape) if isinstance(tf, torch.Tensor) else type(tf).__name__
        _fail("teacher_forcing", f"teacher_forcing_input must be (B, L - n_0, C) = {want}, got {got}")
    state = tokenizer.start(B, torch.device(device), context)
    if not hasattr(state, "add_scale"):
        _fail("teacher_forcing", f"start() must return a decode state with add_scale(k, idx), got {type(state).__name__}")
    pieces = []
    for k in range(K):
        nxt = state.add_scale(k, indices[k])
        if k == K - 1:
            if nxt is not None:
                _fail("teacher_forcing", f"state.add_scale of the last scale ({k}) must return None, got {type(nxt).__name__}")
            break
        n = sched.token_counts[k + 1]
        if not isinstance(nxt, torch.Tensor) or tuple(nxt.shape) != (B, n, C):
            got = tuple(nxt.shape) if isinstance(nxt, torch.Tensor) else type(nxt).__name__
            _fail("teacher_forcing", f"state.add_scale({k}, idx) must return the (B, n_{k + 1}, C) = {(B, n, C)} "
                                     f"input of scale {k + 1}, got {got}")
        pieces.append(nxt.clone())  # clone: a state may hand out views of its own buffers
    inc = torch.cat(pieces, 1) if pieces else tf.new_zeros(B, 0, C)
    diff = _max_abs_diff(inc, tf)
    if not diff <= atol:  # also catches NaN
        # name the first scale where the two paths part ways: the usual bug is an off-by-one scale
        for k in range(1, K):
            sl = slice(sched.offsets[k] - sched.first_len, sched.offsets[k + 1] - sched.first_len)
            d = _max_abs_diff(inc[:, sl], tf[:, sl])
            if not d <= atol:
                _fail("teacher_forcing", f"the input of scale {k} built incrementally by start()/add_scale() differs "
                                         f"from teacher_forcing_input(indices) by {d:.3g} (atol {atol}); training and "
                                         f"sampling would see different inputs")
        _fail("teacher_forcing", f"incremental inputs differ from teacher_forcing_input by {diff:.3g} (atol {atol})")
    return diff


def assert_kv_cache_equivalent(model: NextScaleTransformer, tokenizer: Any, indices: Sequence[torch.Tensor],
                               labels: "torch.Tensor | Condition", *, atol: float = 1e-5, context: Any = None) -> float:
    """Assert that running ``model`` one scale at a time against its KV cache (inputs from the
    tokenizer's decode state fed ground-truth ``indices``) gives the logits of the full
    block-causal teacher-forced forward ``model(labels, teacher_forcing_input(indices))``.
    ``labels``: class labels ``(B,)`` or a :class:`~msar.Condition` of the model's kind (with
    cross-attention, its keys / values are computed once, as :func:`msar.sample` does).
    The model must be in eval mode. Returns the largest absolute difference."""
    sched = model.schedule
    device = _model_device(model)
    F_ = model.cfg.candidate_dim  # a candidate-scoring model: the tokenizer's features at every scale
    with torch.no_grad():
        x = tokenizer.teacher_forcing_input(indices)
        full = model(labels, x, allow_null=True, candidates=candidate_features(tokenizer, F_, x))  # (B, L, V)
        condition = model.check_condition(labels, allow_null=True).to(device)
        cond, cond_blocks, cross = model.encode_condition(condition)
        B = cond.shape[0]
        caches = model.new_caches(B, device=device)
        lvl_pos = model.level_pos()
        state = tokenizer.start(B, device, context)
        h = model.embed_start(cond, lvl_pos)
        worst = 0.0
        cand = None
        for k in range(len(sched)):
            # cross / candidates only when the model has them: a step without those arguments still fits
            extra = {**({} if cross is None else {"cross": cross}), **({} if cand is None else {"candidates": cand})}
            step = model.step(h, cond, cond_blocks, caches, **extra)
            d = _max_abs_diff(step, full[:, sched.slice(k)])
            if not d <= atol:
                _fail("kv_cache", f"scale {k}: KV-cached logits differ from the full masked forward by {d:.3g} "
                                  f"(atol {atol}); sampling would not match training")
            worst = max(worst, d)
            nxt = state.add_scale(k, indices[k])
            if k < len(sched) - 1:
                h = model.embed_scale(nxt, k + 1, lvl_pos)
                cand = candidate_features(tokenizer, F_, nxt)
    return worst


def assert_sampling_reproducible(model: NextScaleTransformer, tokenizer: Any, labels: "torch.Tensor | Condition", *,
                                 seed: int = 0, context: Any = None,
                                 known: Sequence[torch.Tensor] | None = None) -> None:
    """Assert two :func:`msar.sample` calls with the same seed give identical tokens (valid for the
    schedule and vocabulary), that a decoded tensor batch has the right size, and -- when
    ``known`` indices are given -- that forcing every token as known returns exactly ``known``.
    ``labels``: class labels ``(B,)`` or a :class:`~msar.Condition` (passed as ``condition=``)."""
    sched, B = model.schedule, len(labels)

    def run(**kw: Any):
        # an unconditional model takes a batch size, not (null) labels
        if isinstance(labels, Condition):
            who = {"condition": labels}
        else:
            who = {"labels": labels} if model.num_classes > 0 else {"batch_size": B}
        return sample(model, tokenizer, **who, cfg=1.5, top_k=0, top_p=0.9, seed=seed, context=context, **kw)

    a, b = run(), run()
    check_indices_contract(a.indices, sched, model.vocab_size, B, what="sample(...).indices")
    for k, (x, y) in enumerate(zip(a.indices, b.indices)):
        if not torch.equal(x, y):
            _fail("sampling", f"two sample() calls with seed={seed} differ at scale {k}: sampling is not reproducible "
                              f"(does the adapter draw random numbers outside the given generator?)")
    if isinstance(a.data, torch.Tensor) and a.data.shape[0] != B:
        _fail("sampling", f"tokenizer.finish() decoded a batch of {a.data.shape[0]}, expected {B}")
    if known is not None:
        masks = [torch.ones_like(t, dtype=torch.bool) for t in known]
        c = run(known=list(known), known_mask=masks)
        for k, (x, y) in enumerate(zip(c.indices, known)):
            if not torch.equal(x, y.to(x.device)):
                _fail("sampling", f"scale {k}: with every token known, sample() must return the known tokens")


def assert_scales_matter(tokenizer: Any, indices: Sequence[torch.Tensor],
                         reference: torch.Tensor | None = None) -> list[float]:
    """Assert that changing the tokens of any one scale changes ``tokenizer.decode`` (for
    tokenizers whose ``decode`` returns a tensor).

    Every token of scale k is replaced by the next id (``(idx + 1) % V``) and the decoded
    tensor must move. A scale that does not move it is one the decoder never sees (a zero
    prolongation, a scale the adapter drops); the transformer would still spend a step
    predicting it. ``reference``: ``decode(indices)`` when already computed. Returns the
    largest change of the decoded data per scale."""
    V = tokenizer.vocab_size
    ref = tokenizer.decode(indices) if reference is None else reference
    moved = []
    for k in range(len(indices)):
        changed = list(indices)
        changed[k] = (indices[k] + 1) % V
        out = tokenizer.decode(changed)
        d = _max_abs_diff(out, ref) if out.shape == ref.shape else float("inf")
        if not d > 0:
            _fail("scales_matter", f"scale {k}: changing every token of scale {k} leaves decode() unchanged: the "
                                   f"decoded data never sees scale {k} (a zero prolongation, or a scale the adapter "
                                   f"drops)")
        moved.append(d)
    return moved


def assert_block_causal(schedule: ScaleSchedule | Sequence, mask: torch.Tensor | None = None) -> None:
    """Assert the attention mask of ``schedule`` (or the given bool ``(L, L)`` ``mask``) is
    block-causal: query i may attend to key j iff scale(i) >= scale(j). The reference is
    built from the token counts alone, independently of ``ScaleSchedule.level_ids``; the
    additive form is checked against the bool form too."""
    sched = ScaleSchedule(schedule)
    L = sum(sched.token_counts)
    level = torch.empty(L, dtype=torch.long)
    start = 0
    for k, n in enumerate(sched.token_counts):
        level[start:start + n] = k
        start += n
    want = level[:, None] >= level[None, :]
    got = sched.attn_mask("bool") if mask is None else mask
    if tuple(got.shape) != (L, L):
        raise AssertionError(f"block-causal mask must be (L, L) = ({L}, {L}) for {sched}, got {tuple(got.shape)}")
    if got.dtype != torch.bool:
        raise AssertionError(f"expected a bool mask (True = may attend), got dtype {got.dtype}")
    bad = (got.cpu() != want).nonzero()
    if bad.numel():
        i, j = (int(v) for v in bad[0])
        raise AssertionError(f"mask of {sched} is not block-causal: query {i} (scale {int(level[i])}) -> key {j} "
                             f"(scale {int(level[j])}) is {'allowed' if bool(got[i, j]) else 'blocked'}; "
                             f"{len(bad)} wrong entries in all")
    if mask is None:
        add = sched.attn_mask("additive")
        if not (torch.equal(add == 0, want) and torch.isneginf(add[~want]).all()):
            raise AssertionError(f"additive mask of {sched} must be 0 where allowed and -inf elsewhere")


# ---------------------------------------------------------------------------- the one call
def check_adapter(tokenizer: Any, data: Any, *, model: NextScaleTransformer | None = None,
                  pyramid: LatentPyramid | None = None, context: Any = None,
                  labels: torch.Tensor | None = None, atol: float = 1e-5, seed: int = 0,
                  exact_round_trip: bool | None = None, nested: bool = False) -> dict:
    """Run the protocol checks on a :class:`~msar.tokenizer.PyramidTokenizer` and a small data batch.

    Args:
        tokenizer: the adapter (any object with the protocol's attributes and methods).
        data: a small batch the adapter accepts (2-4 samples are plenty).
        model: optional :class:`NextScaleTransformer` with the tokenizer's schedule,
            vocabulary and latent dim (see :func:`tiny_transformer`); enables the
            KV-cache and sampling checks. Need not be trained.
        pyramid: the adapter's latent pyramid for :func:`check_pyramid`; default
            ``tokenizer.quantizer.pyramid`` for a :class:`~msar.tokenizer.MultiScaleVQTokenizer`,
            none (the pyramid checks are skipped) for other tokenizers.
        context: per-sample context passed to ``tokenizer.start(B, device, context)`` and
            :func:`msar.sample` (adapters whose decoding needs it, e.g. each sample's own
            hierarchy); None otherwise.
        labels: ``(B,)`` class labels for the model checks, or a :class:`~msar.Condition` of
            the model's ``cond_kind``; default ``arange(B) % num_classes`` (the null class for
            unconditional models), or :func:`random_condition` for a vector / sequence model.
        atol: tolerance of the float comparisons (teacher forcing, KV cache, finish vs decode).
        seed: seed of the sampling checks.
        exact_round_trip, nested: passed to :func:`check_pyramid`.

    Returns:
        a dict with the batch size (from ``encode(data)``), the schedule, the measured maximal
        differences and the list of checks that ran (``"checks"``).

    Raises:
        AssertionError: ``check_adapter[<check>]: <what broke>`` (``check_pyramid[<check>]: scale
        k: ...`` for the pyramid checks).
    """
    checks: list[str] = []
    # ---- protocol attributes
    for name in ("schedule", "vocab_size", "latent_dim", "encode", "decode", "teacher_forcing_input", "start", "finish"):
        if not hasattr(tokenizer, name):
            _fail("protocol", f"{type(tokenizer).__name__} has no `{name}`: a PyramidTokenizer needs schedule, "
                              f"vocab_size, latent_dim, encode, decode, teacher_forcing_input, start and finish")
    sched = tokenizer.schedule
    if not isinstance(sched, ScaleSchedule):
        _fail("protocol", f"tokenizer.schedule must be a ScaleSchedule, got {type(sched).__name__}")
    V, C = tokenizer.vocab_size, tokenizer.latent_dim
    if not (isinstance(V, int) and V > 0 and isinstance(C, int) and C > 0):
        _fail("protocol", f"vocab_size and latent_dim must be positive ints, got {V!r} and {C!r}")
    if pyramid is None and isinstance(tokenizer, MultiScaleVQTokenizer):
        pyramid = tokenizer.quantizer.pyramid
    if pyramid is not None and pyramid.schedule.token_counts != sched.token_counts:
        _fail("protocol", f"the pyramid's schedule {pyramid.schedule} differs from the tokenizer's {sched}")
    checks.append("protocol")
    device = _device_of(tokenizer)
    report: dict = {"schedule": sched.to_config(), "vocab_size": V, "latent_dim": C}

    with _EvalMode(tokenizer, model), torch.no_grad():
        # ---- shapes
        indices = tokenizer.encode(data)
        B = check_indices_contract(indices, sched, V)
        report["batch_size"] = B
        checks.append("shapes")

        # ---- pyramid semantics (needs B: per-sample operators have the data's batch)
        if pyramid is not None:
            report["pyramid"] = check_pyramid(pyramid, C, batch_size=B, exact_round_trip=exact_round_trip,
                                              nested=nested, atol=atol, seed=seed, device=device)
            checks.append("pyramid")

        # ---- determinism
        again = tokenizer.encode(data)
        for k, (x, y) in enumerate(zip(indices, again)):
            if not torch.equal(x, y):
                _fail("determinism", f"encoding the same batch twice gave different tokens at scale {k} "
                                     f"(dropout or randomness left on in eval mode?)")
        checks.append("determinism")

        # ---- round trip
        recon = tokenizer.decode(indices)
        if isinstance(recon, torch.Tensor):
            if recon.shape[0] != B:
                _fail("round_trip", f"decode(encode(data)) has batch size {recon.shape[0]}, the data has {B}")
            if isinstance(data, torch.Tensor) and recon.shape != data.shape:
                _fail("round_trip", f"decode(encode(data)) has shape {tuple(recon.shape)}, the data {tuple(data.shape)}")
            if not torch.isfinite(recon).all():
                _fail("round_trip", "decode(encode(data)) contains NaN or inf")
            if isinstance(data, torch.Tensor):
                report["reconstruction_mse"] = float((recon.float() - data.float()).square().mean())
        checks.append("round_trip")

        # ---- every scale reaches the decoded data
        if isinstance(recon, torch.Tensor) and V > 1:
            report["scale_change"] = assert_scales_matter(tokenizer, indices, recon)
            checks.append("scales_matter")

        # ---- teacher forcing (and finish == decode)
        report["teacher_forcing_max_abs_diff"] = assert_teacher_forcing_consistent(
            tokenizer, indices, atol=atol, context=context, device=device)
        state = tokenizer.start(B, device, context)
        for k in range(len(sched)):
            state.add_scale(k, indices[k])
        fin = tokenizer.finish(state)
        if isinstance(fin, torch.Tensor) and isinstance(recon, torch.Tensor):
            if fin.shape != recon.shape or not torch.allclose(fin.float(), recon.float(), atol=atol, rtol=1e-4):
                d = _max_abs_diff(fin, recon) if fin.shape == recon.shape else float("nan")
                _fail("teacher_forcing", f"finish(state fed the encoded tokens) differs from decode(tokens) "
                                         f"(max abs diff {d:.3g}, shapes {tuple(fin.shape)} vs {tuple(recon.shape)})")
        checks.append("teacher_forcing")

        # ---- model: KV cache and sampling
        if model is not None:
            if model.schedule.token_counts != sched.token_counts:
                _fail("model", f"model schedule {model.schedule} does not match the tokenizer's {sched}")
            if model.vocab_size != V or model.latent_dim != C:
                _fail("model", f"model has vocab {model.vocab_size} / latent dim {model.latent_dim}, "
                               f"tokenizer {V} / {C}")
            mdev = _model_device(model)
            if labels is None and model.cond_kind != "classes":
                labels = random_condition(model, B, seed=seed)
            if labels is None:
                labels = torch.arange(B) % model.num_classes if model.num_classes > 0 else torch.zeros(B)
            if isinstance(labels, Condition):
                labels = model.check_condition(labels, B).to(mdev)
            else:
                labels = torch.as_tensor(labels).long().to(mdev)
            idx_m = [t.to(mdev) for t in indices]
            report["kv_cache_max_abs_diff"] = assert_kv_cache_equivalent(
                model, tokenizer, idx_m, labels, atol=atol, context=context)
            checks.append("kv_cache")
            assert_sampling_reproducible(model, tokenizer, labels, seed=seed, context=context, known=idx_m)
            checks.append("sampling")
    report["checks"] = checks
    return report


# ---------------------------------------------------------------------------- builders for tests
def random_condition(model: NextScaleTransformer, batch_size: int, length: int = 4, seed: int = 0) -> Condition:
    """A random :class:`~msar.Condition` for ``model``: labels ``arange(B) % num_classes`` (the
    null class when unconditional), ``randn(B, cond_dim)``, or a ``randn(B, length, cond_dim)``
    sequence whose row i has ``length - i % length`` real tokens (every row a different padding)."""
    if model.cond_kind == "classes":
        return Condition.classes(torch.arange(batch_size) % max(model.num_classes, 1))
    g = torch.Generator().manual_seed(seed)
    if model.cond_kind == "vector":
        return Condition.vector(torch.randn(batch_size, model.cond_dim, generator=g))
    real = length - torch.arange(batch_size) % length
    mask = torch.arange(length).unsqueeze(0) < real.unsqueeze(1)
    return Condition.sequence(torch.randn(batch_size, length, model.cond_dim, generator=g), mask)


def tiny_transformer(tokenizer: Any, num_classes: int = 0, depth: int = 1, embed_dim: int = 32,
                     num_heads: int = 2, seed: int = 0, **kw: Any) -> NextScaleTransformer:
    """A small untrained :class:`NextScaleTransformer` matching ``tokenizer`` (schedule, vocab,
    latent dim), in eval mode. Its AdaLN gates and head start at full strength (``init_adaln =
    init_adaln_gamma = init_head = 1``, not VAR's near-identity blocks), so every block really
    mixes tokens and a KV-cache bug shows in the logits (cross-attention too); ``kw`` overrides any config
    field (e.g. ``cond_kind="sequence", cond_dim=8`` for a text-like condition)."""
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    kw = {"init_adaln": 1.0, "init_adaln_gamma": 1.0, "init_head": 1.0, "init_cross_attn": 1.0, **kw}
    try:
        cfg = TransformerConfig(schedule=tokenizer.schedule, vocab_size=tokenizer.vocab_size,
                                latent_dim=tokenizer.latent_dim, num_classes=num_classes, depth=depth,
                                embed_dim=embed_dim, num_heads=num_heads, **kw)
        model = NextScaleTransformer(cfg).eval()
    finally:
        torch.random.set_rng_state(g)
    return model


# ---------------------------------------------------------------------------- hypothesis strategies
def random_schedules(kinds: Sequence[str] = ("grid", "count"), ranks: Sequence[int] = (1, 2, 3),
                     max_scales: int = 5, max_side: int = 8, max_tokens: int = 64, min_scales: int = 1):
    """Hypothesis strategy of :class:`ScaleSchedule` s.

    ``"grid"`` schedules have a rank drawn from ``ranks``; every side grows (weakly) from
    scale to scale, up to ``max_side`` and at most ``max_tokens`` tokens at the finest
    scale. ``"count"`` schedules are weakly increasing token counts up to ``max_tokens``.
    Every schedule has between ``min_scales`` and ``max_scales`` scales.
    Example::

        @given(random_schedules(ranks=(2,)))
        def test_mask(s): assert_block_causal(s)
    """
    from hypothesis import strategies as st

    @st.composite
    def grid(draw):
        rank = draw(st.sampled_from(list(ranks)))
        K = draw(st.integers(min_scales, max_scales))
        cap = max(1, int(max_tokens ** (1 / rank)))
        full = [draw(st.integers(1, min(max_side, cap))) for _ in range(rank)]
        # sides per dim: a sorted draw in [1, full_d], ending at full_d
        per_dim = [sorted(draw(st.lists(st.integers(1, f), min_size=K - 1, max_size=K - 1))) + [f] for f in full]
        return ScaleSchedule([tuple(per_dim[d][k] for d in range(rank)) for k in range(K)])

    @st.composite
    def count(draw):
        K = draw(st.integers(min_scales, max_scales))
        return ScaleSchedule(sorted(draw(st.lists(st.integers(1, max_tokens), min_size=K, max_size=K))))

    options = {"grid": grid(), "count": count()}
    unknown = set(kinds) - set(options)
    if unknown:
        raise ValueError(f"kinds must be among {sorted(options)}, got {sorted(unknown)}")
    return st.one_of(*[options[k] for k in kinds])


def random_indices(schedule: ScaleSchedule, vocab_size: int, batch_size: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Uniformly random valid token indices ``[(B, n_k)]`` for ``schedule`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch_size, n), generator=g) for n in schedule.token_counts]
