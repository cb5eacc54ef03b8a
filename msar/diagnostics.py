"""Which scale breaks the samples? Per-scale diagnostics of a trained model and tokenizer.

A model can have a low teacher-forced loss and still sample badly: sampling feeds it its
own coarse scales, and one scale it cannot predict (too large a jump in token count, a
level whose clusters the transformer cannot place) spoils everything after it.
:func:`scale_diagnostic` finds that scale by sampling with the *true* tokens of the scales
before it known::

    for k in 0..K-1:
        out_k = sample(model, tokenizer, known = true tokens, known_mask = scales < k)
        token accuracy of out_k at scale k      # can the model continue from true scales < k?
        metric(out_k.data)                      # are those samples good?
    teacher-forced cross-entropy and accuracy per scale

Reading the table: the samples are good from some row ``k + 1`` on and bad up to row ``k``:
scale k is where sampling breaks (with it given, the rest follows). A scale with a high
teacher-forced loss and a low sampled accuracy is hard to predict even from the truth; add
an intermediate scale before it (see the adapter guide on choosing scales).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .bitwise import bit_cross_entropy, bit_predictions
from .models.transformer import NextScaleTransformer
from .sampling import sample
from .tokenizer import candidate_features

__all__ = ["scale_diagnostic", "ScaleDiagnostic"]


class ScaleDiagnostic(list):
    """The rows of :func:`scale_diagnostic` (one dict per scale k); ``print`` shows a table.

    Row keys: ``k``, ``tokens`` (n_k), ``sampled_acc`` (accuracy at scale k of tokens sampled
    with the true scales < k known), ``tf_loss`` and ``tf_acc`` (teacher-forced cross-entropy
    and argmax accuracy at scale k), and ``metric`` (the metric of the decoded samples of row
    k) when a metric was given. ``reference_metric``: the metric of the decoded true tokens.
    """

    reference_metric: float | None = None

    def __str__(self) -> str:
        has_metric = bool(self) and "metric" in self[0]
        head = f"{'k':>3} {'tokens':>7} {'sampled_acc':>12} {'tf_loss':>8} {'tf_acc':>7}" + (
            f" {'metric':>9}" if has_metric else "")
        lines = ["known: scales < k (true tokens); sampled_acc: accuracy at scale k", head]
        for r in self:
            line = f"{r['k']:>3} {r['tokens']:>7} {r['sampled_acc']:>12.3f} {r['tf_loss']:>8.3f} {r['tf_acc']:>7.3f}"
            lines.append(line + (f" {r['metric']:>9.4g}" if has_metric else ""))
        if self.reference_metric is not None:
            lines.append(f"metric of the true tokens (decoded): {self.reference_metric:.4g}")
        return "\n".join(lines)


@torch.no_grad()
def scale_diagnostic(model: NextScaleTransformer, tokenizer: Any, indices: Sequence[torch.Tensor],
                     labels: torch.Tensor | None = None, *, metric: Callable[[Any], float] | None = None,
                     context: Any = None, seed: int = 0, **sample_kwargs: Any) -> ScaleDiagnostic:
    """Per-scale diagnostic of a model on true tokens (see the module docstring).

    Args:
        model: the trained transformer.
        tokenizer: its tokenizer.
        indices: true tokens ``[(B, n_k)]`` of held-out data (``tokenizer.encode(data)``).
        labels: ``(B,)`` class labels of that data (None for an unconditional model).
        metric: ``metric(decoded samples) -> float``, e.g. the accuracy of a classifier on the
            samples, or their distance to the references; called once per scale.
        context: per-sample context for ``tokenizer.start`` (adapters that need it).
        seed: seed of every sampling run (the same for all k).
        **sample_kwargs: sampling settings for :func:`msar.sample` (``cfg``, ``top_k``,
            ``top_p``, ``temperature``...); its defaults otherwise.

    Returns:
        a :class:`ScaleDiagnostic`: one row per scale, printable as a table.
    """
    sched = model.schedule
    K = len(sched)
    device = next(model.parameters()).device
    indices = [t.to(device) for t in indices]
    sched.check_indices(indices, model.vocab_size, name="indices")
    B = indices[0].shape[0]
    conditional = model.num_classes > 0
    if conditional and labels is None:
        raise ValueError("a class-conditional model needs the labels of the data")
    labels = torch.as_tensor(labels, device=device).long() if conditional else torch.zeros(B, dtype=torch.long,
                                                                                              device=device)
    was_training = model.training
    model.eval()
    try:
        x = tokenizer.teacher_forcing_input(indices).to(device)
        logits = model(labels, x, candidates=candidate_features(tokenizer, model.cfg.candidate_dim, x))  # (B, L, V)
        report = ScaleDiagnostic()
        bitwise = model.cfg.head == "bitwise"  # logits (B, L, bits): loss and accuracy per token from its bits
        if metric is not None:
            report.reference_metric = float(metric(tokenizer.decode(indices)))
        who = {"labels": labels} if conditional else {"batch_size": B}
        for k in range(K):
            masks = [torch.full_like(t, j < k, dtype=torch.bool) for j, t in enumerate(indices)]
            out = sample(model, tokenizer, **who, known=indices, known_mask=masks, seed=seed, context=context,
                         decode=metric is not None, **sample_kwargs)
            lk = logits[:, sched.slice(k)]  # (B, n_k, V)
            row = {"k": k, "tokens": sched.token_counts[k],
                   "sampled_acc": float((out.indices[k] == indices[k]).float().mean()),
                   "tf_loss": float(F.cross_entropy(lk.flatten(0, 1).float(), indices[k].flatten())
                                    if not bitwise else bit_cross_entropy(lk.float(), indices[k]).mean()),
                   "tf_acc": float(((bit_predictions(lk) if bitwise else lk.argmax(-1)) == indices[k]).float().mean())}
            if metric is not None:
                row["metric"] = float(metric(out.data))
            report.append(row)
    finally:
        model.train(was_training)
    return report
