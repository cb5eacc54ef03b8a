"""Packaging: the core installs and imports with its own dependencies only, each modality's
imports are declared in its extra, and CI runs the README's test command."""
import ast
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)

# distribution name -> the top-level module it provides
MODULE_OF = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm", "scipy": "scipy",
             "pillow": "PIL", "scikit-learn": "sklearn", "scikit-image": "skimage", "torch-geometric": "torch_geometric",
             "networkx": "networkx", "matplotlib": "matplotlib", "pytest": "pytest", "hypothesis": "hypothesis",
             "transformers": "transformers"}
# imports that need no declaration, each with its reason
UNDECLARED_OK = {
    # msar.testing.random_schedules: a hypothesis strategy for test authors (msar[test]);
    # msar.text.load_hf_text_encoder imports transformers lazily (the optional extra msar[text])
    "msar": {"hypothesis", "transformers"},
    "benchmarks": {"huggingface_hub", "models"},  # vs_reference: the reference VAR checkout; huggingface_hub is stubbed
}


def _modules(reqs: list[str]) -> set[str]:
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}
    unknown = names - set(MODULE_OF)
    assert not unknown, f"add {unknown} to MODULE_OF"
    out = {MODULE_OF[n] for n in names}
    return out | ({"mpl_toolkits"} if "matplotlib" in out else set())


CORE = _modules(PYPROJECT["project"]["dependencies"])
EXTRAS = {k: _modules(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}


def _third_party_imports(paths: list[str]) -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the files (inside functions too) that are neither
    stdlib nor this repository's own packages: ``{module: {file, ...}}``."""
    # this repository's packages, and test modules importing each other (pytest puts tests/ on sys.path)
    own = {"msar", "modalities", "benchmarks", "examples", "tests"}
    own |= {n[:-3] for n in os.listdir(os.path.join(REPO, "tests")) if n.endswith(".py")}
    found: dict[str, set[str]] = {}
    files = []
    for p in paths:
        p = os.path.join(REPO, p)
        if os.path.isfile(p):
            files.append(p)
        for root, _, names in os.walk(p):
            files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    found.setdefault(top, set()).add(os.path.relpath(path, REPO))
    return found


def _undeclared(paths: list[str], declared: set[str], ok: set[str] = frozenset()) -> dict:
    return {m: sorted(f) for m, f in _third_party_imports(paths).items() if m not in declared | set(ok)}


def test_core_imports_only_core_dependencies():
    """Catches a core module importing a package that ``pip install msar`` does not install
    (scanned statically, so imports inside functions count too)."""
    assert _undeclared(["msar"], CORE, UNDECLARED_OK["msar"]) == {}
    # einops was once declared and never imported: nothing is declared that the core does not use
    assert CORE <= set(_third_party_imports(["msar"])), CORE - set(_third_party_imports(["msar"]))


@pytest.mark.parametrize("modality", ["image", "video", "voxel", "graph"])
def test_each_modality_declares_its_imports_in_its_extra(modality):
    """Catches ``pip install msar[<modality>]`` missing a package the modality imports."""
    paths = [f"modalities/{modality}"] + {"video": ["examples/video_demo.py"], "voxel": ["examples/voxel_demo.py"],
                                          "graph": ["examples/graph_demo.py"]}.get(modality, [])
    assert _undeclared(paths, CORE | EXTRAS[modality]) == {}


def test_all_and_test_extras_cover_every_import():
    """Catches an example, benchmark or test importing a package that ``[all]`` / ``[test]`` do not install."""
    assert set().union(*(EXTRAS[m] for m in ("image", "video", "voxel", "graph"))) <= EXTRAS["all"]
    assert _undeclared(["modalities", "examples", "benchmarks"], CORE | EXTRAS["all"], UNDECLARED_OK["benchmarks"]) == {}
    assert EXTRAS["all"] <= EXTRAS["test"]
    assert _undeclared(["tests"], CORE | EXTRAS["test"]) == {}


def test_import_msar_with_modality_packages_missing():
    """Catches ``import msar`` (or ``msar.training`` / ``msar.testing`` / any core module) failing
    on a machine with only the core dependencies installed: every optional package is blocked."""
    blocked = sorted(set().union(*EXTRAS.values()) - CORE)
    code = _BLOCKER.format(blocked=blocked) + textwrap.dedent("""
        import pkgutil
        import msar, msar.training, msar.testing
        for m in pkgutil.walk_packages(msar.__path__, "msar."):
            importlib.import_module(m.name)
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok", msar.NextScaleTransformer.__name__, msar.training.TransformerTrainer.__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


# A name set to None in sys.modules imports as "not installed" (ModuleNotFoundError), and
# importlib.util.find_spec returns None for it, as for a missing package (torch._dynamo probes
# optional packages that way; a meta-path finder that raises would break that probe).
_BLOCKER = """
import importlib, sys

BLOCKED = {blocked!r}
for name in BLOCKED:
    sys.modules[name] = None
"""


def _import_with_blocked(modules: list[str], blocked: set[str]) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(blocked=sorted(blocked)) + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    return subprocess.run([sys.executable, "-c", code + "print('ok')"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("modality,modules", [
    ("image", ["modalities.cli", "modalities.image", "modalities.image.demo", "modalities.image.pipeline"]),
    ("video", ["modalities.video", "examples.video_demo"]),
    ("voxel", ["modalities.voxel", "examples.voxel_demo"]),
    ("graph", ["modalities.graph", "examples.graph_demo"]),
])
def test_each_modality_imports_with_only_its_extra(modality, modules):
    """Catches a modality that imports, through another modality or at import time, a package
    its extra does not install (``pip install -e ".[image]"`` then ``python -m modalities demo``)."""
    blocked = set().union(*EXTRAS.values()) - CORE - EXTRAS[modality]
    r = _import_with_blocked(modules, blocked)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _readme_commands() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_ci_runs_the_readme_test_command():
    """Catches CI testing something other than what the README tells users to run."""
    demo, tests = _readme_commands()
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [ln for ln in f.read().splitlines() if ln.strip() and not ln.startswith("#")]
    assert tests in ci, f"README test command {tests!r} not in .ci/run"
    assert "[test]" in tests or "test" in re.search(r'"\.\[(.*?)\]"', tests).group(1)
    assert "modalities demo" in demo and re.search(r'\.\[[^\]]*(image|all)', demo), demo


def test_readme_test_command_prints_a_pass_count():
    """Catches ``-q`` given twice (README and ``addopts``): pytest's ``-qq`` hides the
    ``N passed`` line the user checks."""
    _, tests = _readme_commands()
    addopts = PYPROJECT["tool"]["pytest"]["ini_options"].get("addopts", "")
    pytest_args = tests.split("pytest", 1)[1].split() + addopts.split()
    quiet = sum(a.count("q") for a in pytest_args if re.fullmatch(r"-q+", a)) + pytest_args.count("--quiet")
    assert quiet <= 1, pytest_args
