"""Benchmarks of msar: next-scale vs raster order, sampling and training throughput, scaling laws.

Every benchmark is one command, ``python -m benchmarks.<name> [--quick] [--gpu]``, that writes a
JSON record (machine, torch version, git commit, command, config, figures) and a PNG plot under
``benchmarks/results/<name>/``. See ``benchmarks/README.md``.
"""
