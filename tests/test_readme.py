"""The README's library example runs as written."""
import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_library_example_runs():
    src = open(README).read()
    code = re.search(r"## The library in 20 lines\n\n```python\n(.*?)```", src, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].data.shape == (2, 1, 32, 32)
    assert torch.isfinite(ns["loss"])
    assert [tuple(i.shape) for i in ns["edit"].indices] == [(2, 1), (2, 4), (2, 16), (2, 64)]
