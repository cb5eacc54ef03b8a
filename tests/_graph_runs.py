"""A graph demo run directory holding an untrained small grid pipeline, for end-to-end tests of the
demo's sampling options through ``--load`` (no training)."""
import json
from pathlib import Path

import networkx as nx

import msar
from modalities.graph import GraphPyramidTokenizer, make_dataset


def untrained_grid_run(root: Path) -> tuple[Path, list[nx.Graph], GraphPyramidTokenizer]:
    """``(run, train, tok)``: ``run/grid/`` holds the pipeline and a ``metrics.json`` as a trained run
    leaves them (pass ``--load run``); ``train`` are the grids (sides <= 11) ``tok`` was fitted on."""
    from examples.graph_demo import PRESETS, build_model
    cfg = dict(PRESETS["grid"], width=16, depth=1, heads=2, chunks=2)
    train = make_dataset("grid", seed=0, max_side=11)["train"]
    tok = GraphPyramidTokenizer.fit(train, edge_chunks=2)
    src = root / "run" / "grid"
    msar.Pipeline(tok, build_model(tok, cfg, 0.0).init_weights().eval()).save_pretrained(str(src / "pipeline"))
    (src / "metrics.json").write_text(json.dumps({"train_config": cfg, "data_kw": {"max_side": 11},
                                                  "loss_curve": [[1, 0.0]], "seconds": {}}))
    return root / "run", train, tok
