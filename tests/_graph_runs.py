"""A graph demo run directory holding an untrained small pipeline, for end-to-end tests of the
demo's sampling options through ``--load`` (no training)."""
import json
from pathlib import Path
from typing import Any

import networkx as nx

import msar
from modalities.graph import GraphPyramidTokenizer, make_dataset


def untrained_grid_run(root: Path) -> tuple[Path, list[nx.Graph], GraphPyramidTokenizer]:
    """``(run, train, tok)``: ``run/grid/`` holds the pipeline and a ``metrics.json`` as a trained run
    leaves them (pass ``--load run``); ``train`` are the grids (sides <= 11) ``tok`` was fitted on."""
    return untrained_run(root, "grid", max_side=11)


def untrained_run(root: Path, dataset: str, fit=None, **data_kw) -> tuple[Path, list[nx.Graph], Any]:
    """The same for any dataset (``data_kw`` as the demo passes them to ``make_dataset``): an untrained
    small pipeline in ``run/<dataset>/``; ``fit(train)`` builds its tokenizer (default: a
    :class:`GraphPyramidTokenizer` with two edge chunks)."""
    import torch
    from examples.graph_demo import PRESETS, build_model
    torch.manual_seed(0)  # the same weights whatever ran before (init_weights draws from the global stream)
    cfg = dict(PRESETS[dataset], width=16, depth=1, heads=2, chunks=2)
    train = make_dataset(dataset, seed=0, **data_kw)["train"]
    tok = fit(train) if fit is not None else GraphPyramidTokenizer.fit(train, edge_chunks=2)
    src = root / "run" / dataset
    msar.Pipeline(tok, build_model(tok, cfg, 0.0).init_weights().eval()).save_pretrained(str(src / "pipeline"))
    (src / "metrics.json").write_text(json.dumps({"train_config": cfg, "data_kw": data_kw,
                                                  "loss_curve": [[1, 0.0]], "seconds": {}}))
    return root / "run", train, tok
