"""Conformance kit for modality adapters: one call runs the protocol checks.

An adapter author writes::

    from msar.testing import check_adapter
    report = check_adapter(my_tokenizer, a_small_batch, model=tiny_transformer(my_tokenizer))

and gets, as ``AssertionError`` with a message naming what broke:

* **shapes**     ``encode(data)`` gives ``len(schedule)`` integer tensors ``(B, n_k)``
                 in ``[0, vocab_size)``, with the data's batch size;
* **round trip** ``decode(encode(data))`` runs and keeps the batch size;
* **teacher forcing** feeding the ground-truth indices to ``start()`` /
                 ``state.add_scale()`` scale by scale yields exactly
                 ``teacher_forcing_input(indices)`` (so training and sampling
                 see the same inputs), and ``finish(state)`` equals ``decode(indices)``;
* **determinism** encoding twice gives the same tokens;
* with a ``model``: **KV cache** -- scale-by-scale cached logits equal the full
                 block-causal forward; **sampling** -- a seeded :func:`msar.sample`
                 reproduces itself and teacher-forcing every token as *known*
                 returns exactly those tokens (the editing path).

The pieces are exported too (``assert_teacher_forcing_consistent``,
``assert_kv_cache_equivalent``, ``assert_block_causal``...), together with
hypothesis strategies (:func:`random_schedules`) for property tests.
Hypothesis is imported lazily: ``msar.testing`` itself needs only torch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .models.transformer import NextScaleTransformer, TransformerConfig
from .sampling import sample
from .schedule import ScaleSchedule

__all__ = [
    "check_adapter", "check_indices_contract", "assert_teacher_forcing_consistent", "assert_kv_cache_equivalent",
    "assert_sampling_reproducible", "assert_block_causal", "tiny_transformer", "random_schedules",
    "random_indices", "batch_size_of",
]

StateFactory = Callable[[int, torch.device], Any]


# ---------------------------------------------------------------------------- small helpers
def _fail(check: str, msg: str) -> None:
    raise AssertionError(f"check_adapter[{check}]: {msg}")


def batch_size_of(data: Any) -> Optional[int]:
    """Best-effort batch size of a data batch: ``shape[0]`` of a tensor, ``num_graphs`` of
    a PyG batch, ``len`` of a list/tuple, ``None`` when it cannot be told."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0]) if data.dim() > 0 else None
    n = getattr(data, "num_graphs", None)
    if isinstance(n, int):
        return n
    if isinstance(data, dict):
        for v in data.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        return None
    if isinstance(data, (list, tuple)):
        return len(data)
    return None


def _device_of(tokenizer: Any, data: Any) -> torch.device:
    if isinstance(data, torch.Tensor):
        return data.device
    if isinstance(tokenizer, nn.Module):
        for p in tokenizer.parameters():
            return p.device
    return torch.device("cpu")


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


# ---------------------------------------------------------------------------- the individual checks
def check_indices_contract(indices: Any, schedule: ScaleSchedule, vocab_size: int,
                           batch_size: Optional[int] = None, what: str = "encode(data)") -> int:
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
                                      atol: float = 1e-5, state_factory: Optional[StateFactory] = None,
                                      device: torch.device | str = "cpu") -> float:
    """Feed ground-truth ``indices`` to a fresh decode state scale by scale and assert the
    returned next-scale inputs, concatenated, equal ``tokenizer.teacher_forcing_input(indices)``
    ``(B, L - n_0, C)``. Returns the largest absolute difference."""
    sched: ScaleSchedule = tokenizer.schedule
    K, B, C = len(sched), indices[0].shape[0], tokenizer.latent_dim
    tf = tokenizer.teacher_forcing_input(indices)
    want = (B, sched.L - sched.first_len, C)
    if not isinstance(tf, torch.Tensor) or tuple(tf.shape) != want:
        got = tuple(tf.shape) if isinstance(tf, torch.Tensor) else type(tf).__name__
        _fail("teacher_forcing", f"teacher_forcing_input must be (B, L - n_0, C) = {want}, got {got}")
    state = (state_factory or tokenizer.start)(B, torch.device(device))
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
                               labels: torch.Tensor, *, atol: float = 1e-5,
                               state_factory: Optional[StateFactory] = None) -> float:
    """Assert that running ``model`` one scale at a time against its KV cache (inputs from the
    tokenizer's decode state fed ground-truth ``indices``) gives the logits of the full
    block-causal teacher-forced forward ``model(labels, teacher_forcing_input(indices))``.
    The model must be in eval mode. Returns the largest absolute difference."""
    sched = model.schedule
    B = labels.shape[0]
    device = model.pos_1LC.device
    with torch.no_grad():
        full = model(labels, tokenizer.teacher_forcing_input(indices))  # (B, L, V)
        cond, cond_blocks = model.condition(labels)
        caches = model.new_caches(B, device=device)
        lvl_pos = model.level_pos()
        state = (state_factory or tokenizer.start)(B, device)
        h = model.embed_start(cond, lvl_pos)
        worst = 0.0
        for k in range(len(sched)):
            step = model.step(h, cond, cond_blocks, caches)
            d = _max_abs_diff(step, full[:, sched.slice(k)])
            if not d <= atol:
                _fail("kv_cache", f"scale {k}: KV-cached logits differ from the full masked forward by {d:.3g} "
                                  f"(atol {atol}); sampling would not match training")
            worst = max(worst, d)
            nxt = state.add_scale(k, indices[k])
            if k < len(sched) - 1:
                h = model.embed_scale(nxt, k + 1, lvl_pos)
    return worst


def assert_sampling_reproducible(model: NextScaleTransformer, tokenizer: Any, labels: torch.Tensor, *,
                                 seed: int = 0, state_factory: Optional[StateFactory] = None,
                                 known: Optional[Sequence[torch.Tensor]] = None) -> None:
    """Assert two :func:`msar.sample` calls with the same seed give identical tokens (valid for the
    schedule and vocabulary), that the decoded batch has the right size, and -- when ``known``
    indices are given -- that forcing every token as known returns exactly ``known``."""
    sched, B = model.schedule, labels.shape[0]
    device = model.pos_1LC.device

    def run(**kw: Any):
        st = state_factory(B, device) if state_factory is not None else None
        return sample(model, tokenizer, labels, cfg=1.5, top_k=0, top_p=0.9, seed=seed, state=st, **kw)

    a, b = run(), run()
    check_indices_contract(a.indices, sched, model.V, B, what="sample(...).indices")
    for k, (x, y) in enumerate(zip(a.indices, b.indices)):
        if not torch.equal(x, y):
            _fail("sampling", f"two sample() calls with seed={seed} differ at scale {k}: sampling is not reproducible "
                              f"(does the adapter draw random numbers outside the given generator?)")
    n = batch_size_of(a.data)
    if n is not None and n != B:
        _fail("sampling", f"tokenizer.finish() decoded a batch of {n}, expected {B}")
    if known is not None:
        masks = [torch.ones_like(t, dtype=torch.bool) for t in known]
        c = run(known=list(known), known_mask=masks)
        for k, (x, y) in enumerate(zip(c.indices, known)):
            if not torch.equal(x, y.to(x.device)):
                _fail("sampling", f"scale {k}: with every token known, sample() must return the known tokens")


def assert_block_causal(schedule: ScaleSchedule | Sequence, mask: Optional[torch.Tensor] = None) -> None:
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
def check_adapter(tokenizer: Any, data: Any, *, model: Optional[NextScaleTransformer] = None,
                  labels: Optional[torch.Tensor] = None, atol: float = 1e-5, seed: int = 0,
                  state_factory: Optional[StateFactory] = None) -> dict:
    """Run the protocol checks on a :class:`~msar.tokenizer.PyramidTokenizer` and a small data batch.

    Args:
        tokenizer: the adapter (any object with the protocol's attributes and methods).
        data: a small batch the adapter accepts (2-4 samples are plenty).
        model: optional :class:`NextScaleTransformer` with the tokenizer's schedule,
            vocabulary and latent dim (see :func:`tiny_transformer`); enables the
            KV-cache and sampling checks. Need not be trained.
        labels: ``(B,)`` class labels for the model checks; default ``arange(B) % num_classes``
            (the null class for unconditional models).
        atol: tolerance of the float comparisons (teacher forcing, KV cache, finish vs decode).
        seed: seed of the sampling checks.
        state_factory: ``(batch_size, device) -> decode state`` for adapters whose state
            needs per-batch context (e.g. the graphs of the batch); default ``tokenizer.start``.

    Returns:
        a dict with the batch size, the schedule, the measured maximal differences and
        the list of checks that ran (``"checks"``).

    Raises:
        AssertionError: ``check_adapter[<check>]: <what broke>``.
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
    checks.append("protocol")
    device = _device_of(tokenizer, data)
    data_B = batch_size_of(data)
    report: dict = {"schedule": sched.to_config(), "vocab_size": V, "latent_dim": C}

    with _EvalMode(tokenizer, model), torch.no_grad():
        # ---- shapes
        indices = tokenizer.encode(data)
        B = check_indices_contract(indices, sched, V, data_B)
        report["batch_size"] = B
        checks.append("shapes")

        # ---- determinism
        again = tokenizer.encode(data)
        for k, (x, y) in enumerate(zip(indices, again)):
            if not torch.equal(x, y):
                _fail("determinism", f"encoding the same batch twice gave different tokens at scale {k} "
                                     f"(dropout or randomness left on in eval mode?)")
        checks.append("determinism")

        # ---- round trip
        recon = tokenizer.decode(indices)
        n = batch_size_of(recon)
        if n is not None and n != B:
            _fail("round_trip", f"decode(encode(data)) has batch size {n}, the data has {B}")
        if isinstance(recon, torch.Tensor) and isinstance(data, torch.Tensor):
            if recon.shape != data.shape:
                _fail("round_trip", f"decode(encode(data)) has shape {tuple(recon.shape)}, the data {tuple(data.shape)}")
            if not torch.isfinite(recon).all():
                _fail("round_trip", "decode(encode(data)) contains NaN or inf")
            report["reconstruction_mse"] = float((recon.float() - data.float()).square().mean())
        checks.append("round_trip")

        # ---- teacher forcing (and finish == decode)
        report["teacher_forcing_max_abs_diff"] = assert_teacher_forcing_consistent(
            tokenizer, indices, atol=atol, state_factory=state_factory, device=device)
        state = (state_factory or tokenizer.start)(B, device)
        for k in range(len(sched)):
            state.add_scale(k, indices[k])
        fin = tokenizer.finish(state)
        if isinstance(fin, torch.Tensor) and isinstance(recon, torch.Tensor):
            if fin.shape != recon.shape or not torch.allclose(fin.float(), recon.float(), atol=atol, rtol=1e-4):
                d = _max_abs_diff(fin, recon) if fin.shape == recon.shape else float("nan")
                _fail("teacher_forcing", f"finish(state fed the encoded tokens) differs from decode(tokens) "
                                         f"(max abs diff {d:.3g}, shapes {tuple(fin.shape)} vs {tuple(recon.shape)})")
        elif batch_size_of(fin) not in (None, B):
            _fail("teacher_forcing", f"finish(state) decoded a batch of {batch_size_of(fin)}, expected {B}")
        checks.append("teacher_forcing")

        # ---- model: KV cache and sampling
        if model is not None:
            if model.schedule.token_counts != sched.token_counts:
                _fail("model", f"model schedule {model.schedule} does not match the tokenizer's {sched}")
            if model.V != V or model.Cvae != C:
                _fail("model", f"model has vocab {model.V} / latent dim {model.Cvae}, tokenizer {V} / {C}")
            if labels is None:
                if model.num_classes > 0:
                    labels = torch.arange(B) % model.num_classes
                else:
                    labels = torch.full((B,), model.num_classes)
            labels = torch.as_tensor(labels).long().to(model.pos_1LC.device)
            idx_m = [t.to(model.pos_1LC.device) for t in indices]
            report["kv_cache_max_abs_diff"] = assert_kv_cache_equivalent(
                model, tokenizer, idx_m, labels, atol=atol, state_factory=state_factory)
            checks.append("kv_cache")
            assert_sampling_reproducible(model, tokenizer, labels, seed=seed, state_factory=state_factory,
                                         known=idx_m)
            checks.append("sampling")
    report["checks"] = checks
    return report


# ---------------------------------------------------------------------------- builders for tests
def tiny_transformer(tokenizer: Any, num_classes: int = 0, depth: int = 1, embed_dim: int = 32,
                     num_heads: int = 2, seed: int = 0, **kw: Any) -> NextScaleTransformer:
    """A small untrained :class:`NextScaleTransformer` matching ``tokenizer`` (schedule, vocab,
    latent dim), in eval mode. Its weights keep PyTorch's default init (not VAR's near-identity
    init), so every block really mixes tokens and a KV-cache bug shows in the logits."""
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        cfg = TransformerConfig(schedule=tokenizer.schedule.to_config(), vocab_size=tokenizer.vocab_size,
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
