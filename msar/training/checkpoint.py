"""Atomic, verifiable training checkpoints.

Layout (one directory per saved step)::

    ckpt_dir/
      step_000100/
        model.<name>.safetensors   # weights of every model passed in ``models`` (no pickle)
        state.pt                   # optimizer / scheduler / scaler / RNG / extra (torch.save)
        manifest.json              # step, config, versions, sha256 + size of every file above
      step_000200/ ...

Writing is crash-safe: every file goes to a temporary directory next to the final
one (each file written, flushed and ``fsync``-ed), the manifest is written last,
and the directory is renamed into place with ``os.replace`` -- a reader never sees a
half-written ``step_*`` directory.  Reading verifies sizes and sha256 checksums;
:func:`load_latest` names any corrupt or truncated checkpoint it meets, warns, and
falls back to the newest good one.

``state.pt`` is read with ``torch.load(weights_only=True)``: everything stored in
it (RNG states included, see :func:`capture_rng_state`) is made of tensors, numbers,
strings, lists and dicts.  ``extra`` must follow the same rule.

Example::

    save_checkpoint("runs/x/ckpt", step=100, models={"model": model}, optimizer=opt,
                    scheduler=sched, extra={"data_position": 400}, config=cfg_dict, keep_last=3)
    ck = load_latest("runs/x/ckpt")          # None when the directory has no checkpoint
    if ck is not None:
        ck.restore(models={"model": model}, optimizer=opt, scheduler=sched, rng=True)
        start = ck.step
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)

FORMAT = "msar-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; ``path`` names the bad file."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------------------- RNG
def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """All random number generator states, as tensors / numbers (``weights_only``-loadable).

    Covers Python's ``random``, NumPy's global generator, torch CPU, every CUDA device
    (when CUDA is initialised) and any named ``torch.Generator`` passed in.
    """
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`. Generators named in ``generators`` but absent
    from ``state`` are left alone; CUDA states are restored only when the device count matches."""
    py = state["python"]
    # a checkpoint loaded with map_location="cuda" has these on the GPU; the RNGs take CPU values
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices but {torch.cuda.device_count()} "
                          "are visible; CUDA RNG not restored")
    for name, g in (generators or {}).items():
        saved = state.get("generators", {}).get(name)
        if saved is not None:
            g.set_state(saved.cpu())  # CPU and CUDA generators alike take their state as a CPU tensor


# ---------------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, flush,
    fsync, ``os.replace``); returns the sha256 hex digest of ``data``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def describe_load_error(e: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line -- without torch's
    advice to retry with ``weights_only=False``, which would run whatever code the file holds."""
    msg = str(e)
    if "Weights only load failed" in msg:
        lines = [ln.strip() for ln in msg.splitlines()]
        why = next((ln for ln in lines if ln.startswith(("Trying to load unsupported", "Unsupported"))), "")
        return ("refused: the file holds pickled objects other than tensors and plain containers (possibly "
                "code), which are never unpickled" + (f" -- {why}" if why else ""))
    first = msg.splitlines()[0] if msg else ""
    return f"truncated or corrupt ({type(e).__name__}{': ' + first if first else ''})"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        else:
            return model


def _weights_bytes(model: nn.Module) -> tuple[bytes, str]:
    """Serialize a state dict: safetensors when it is all tensors, else torch.save.
    Tensors are cloned so tied weights (shared storage) serialize without complaint."""
    sd = unwrap_model(model).state_dict()
    if all(isinstance(v, torch.Tensor) for v in sd.values()):
        from safetensors.torch import save as st_save
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}
        return st_save(tensors, metadata={"format": "pt"}), "safetensors"
    buf = io.BytesIO()
    torch.save({k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}, buf)
    return buf.getvalue(), "pt"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _json_safe(obj: Any) -> Any:
    """Best-effort JSON form of a config (dataclasses, tuples, paths, dtypes become plain values)."""
    from dataclasses import asdict, is_dataclass
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the ``step_*`` directories in ``ckpt_dir``, oldest first
    (unverified; temp directories of interrupted writes are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


# ---------------------------------------------------------------------------- save
def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, models: Mapping[str, nn.Module],
                    optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
                    extra: Mapping[str, Any] | None = None, config: Any = None,
                    rng: bool = True, generators: Mapping[str, torch.Generator] | None = None,
                    keep_last: int = 0) -> Path:
    """Save one checkpoint atomically; returns its directory ``ckpt_dir/step_XXXXXX``.

    Args:
        models: ``{name: module}``; each becomes ``model.<name>.safetensors``.
        optimizer, scheduler, scaler: anything with ``state_dict()``; ``optimizer`` and
            ``scheduler`` may also be ``{name: obj}`` dicts (e.g. generator + discriminator).
        extra: user state (tensors, numbers, strings, lists, dicts only).
        config: stored in the JSON manifest (dataclass or dict).
        rng: capture RNG states (:func:`capture_rng_state`) including ``generators``.
        keep_last: after saving, delete all but the newest ``keep_last`` checkpoints (0 keeps all).
    An existing checkpoint of the same step is replaced.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not models:
        raise ValueError("save_checkpoint needs at least one model in `models`")
    for name in models:
        if not _NAME_RE.match(name):
            raise ValueError(f"model name {name!r} must match [A-Za-z0-9_.-]+ (it becomes a file name)")
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        files: dict[str, dict] = {}
        model_files: dict[str, str] = {}
        for name, model in models.items():
            data, fmt = _weights_bytes(model)
            fname = f"model.{name}.{fmt}"
            files[fname] = {"sha256": atomic_write_bytes(tmp / fname, data), "bytes": len(data)}
            model_files[name] = fname

        def sd(obj):
            if obj is None:
                return None
            if isinstance(obj, Mapping):
                return {k: (v.state_dict() if v is not None else None) for k, v in obj.items()}
            return obj.state_dict()

        state = {"step": int(step), "optimizer": _to_cpu(sd(optimizer)), "scheduler": _to_cpu(sd(scheduler)),
                 "scaler": _to_cpu(sd(scaler)), "rng": capture_rng_state(generators) if rng else None,
                 "extra": _to_cpu(dict(extra or {}))}
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        files[STATE_FILE] = {"sha256": atomic_write_bytes(tmp / STATE_FILE, data), "bytes": len(data)}

        from .. import __version__ as msar_version
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step), "time": time.time(),
            "torch_version": torch.__version__, "msar_version": msar_version,
            "models": model_files, "files": files, "config": _json_safe(config),
        }
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists():  # same step saved again: move the old one aside first (rename is atomic)
            trash = root / f".old-{final.name}-{os.getpid()}-{time.time_ns()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last and keep_last > 0:
        prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step directories; returns the deleted paths."""
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [p for _, p in ckpts[:-keep_last]] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------- load
@dataclass
class Checkpoint:
    """A verified checkpoint read into memory (tensors on ``map_location``).

    ``model_states[name]`` is a state dict; ``state`` holds ``optimizer``, ``scheduler``,
    ``scaler``, ``rng``, ``extra``; ``skipped`` lists ``(path, reason)`` of newer
    checkpoints :func:`load_latest` rejected before settling on this one.
    """

    path: Path
    step: int
    manifest: dict
    model_states: dict[str, dict]
    state: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def extra(self) -> dict:
        return self.state.get("extra") or {}

    @property
    def config(self) -> Any:
        return self.manifest.get("config")

    def restore(self, models: Mapping[str, nn.Module] | None = None, optimizer: Any = None,
                scheduler: Any = None, scaler: Any = None, rng: bool = False,
                generators: Mapping[str, torch.Generator] | None = None, strict: bool = True) -> None:
        """Load the saved states into live objects. Missing pieces raise :class:`CheckpointError`."""
        for name, model in (models or {}).items():
            if name not in self.model_states:
                raise CheckpointError(f"{self.path}: no weights for model {name!r} (has {sorted(self.model_states)})",
                                      self.path)
            try:
                unwrap_model(model).load_state_dict(self.model_states[name], strict=strict)
            except RuntimeError as e:  # missing / unexpected / mis-shaped keys
                raise CheckpointError(f"{self.path}: the weights of {name!r} do not fit the model (saved with another "
                                      f"config or scale schedule? the manifest has its config): {e}", self.path) from e

        def load(obj, key):
            if obj is None:
                return
            saved = self.state.get(key)
            if saved is None:
                raise CheckpointError(f"{self.path}: checkpoint has no {key} state", self.path)
            if isinstance(obj, Mapping):
                for k, v in obj.items():
                    if v is not None:
                        if k not in saved or saved[k] is None:
                            raise CheckpointError(f"{self.path}: checkpoint has no {key} state {k!r}", self.path)
                        v.load_state_dict(saved[k])
            else:
                obj.load_state_dict(saved)

        load(optimizer, "optimizer")
        load(scheduler, "scheduler")
        load(scaler, "scaler")
        if rng:
            if self.state.get("rng") is None:
                raise CheckpointError(f"{self.path}: checkpoint was saved without RNG state", self.path)
            restore_rng_state(self.state["rng"], generators)


def _check_manifest_fields(manifest: dict, mpath: Path) -> None:
    """Types of the fields the loader relies on; every file it reads must be listed (hence
    checksummed) and named plainly inside the checkpoint directory."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{mpath}: corrupt manifest: {what}", mpath)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(manifest.get("format_version", 0)) or not is_int(manifest.get("step")) or manifest["step"] < 0:
        raise bad(f"format_version / step must be non-negative ints, got {manifest.get('format_version')!r} / "
                  f"{manifest.get('step')!r}")
    files, models = manifest["files"], manifest.get("models")
    if not isinstance(files, dict) or not isinstance(models, dict):
        raise bad("'files' and 'models' must be objects")
    for fname, info in files.items():
        if not _NAME_RE.match(fname) or fname in (".", ".."):
            raise bad(f"file name {fname!r} is not a plain file name")
        if not (isinstance(info, dict) and is_int(info.get("bytes")) and isinstance(info.get("sha256"), str)):
            raise bad(f"entry of {fname!r} needs an int 'bytes' and a str 'sha256', got {info!r}")
    for name, fname in models.items():
        if not isinstance(fname, str) or fname not in files:
            raise bad(f"weights of model {name!r} ({fname!r}) are not among the checksummed files")
    if STATE_FILE not in files:
        raise bad(f"{STATE_FILE} is not among the checksummed files")


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint directory: manifest readable, every file present with the
    recorded size and sha256.  Returns the manifest; raises :class:`CheckpointError`
    naming the offending file otherwise."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: manifest missing (incomplete checkpoint)", mpath)
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: manifest is not valid JSON (truncated or corrupt): {e}", mpath) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{mpath}: not an msar checkpoint manifest", mpath)
    _check_manifest_fields(manifest, mpath)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format version {manifest['format_version']} is newer than this msar "
                              f"understands ({FORMAT_VERSION})", mpath)
    for fname, info in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: file listed in the manifest is missing", fpath)
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{fpath}: size {size} bytes, manifest says {info['bytes']} (truncated?)", fpath)
        digest = sha256_file(fpath)
        if digest != info["sha256"]:
            raise CheckpointError(f"{fpath}: sha256 mismatch (corrupt file): {digest[:12]}... != "
                                  f"{info['sha256'][:12]}...", fpath)
    return manifest


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> Checkpoint:
    """Read one checkpoint directory (verified first unless ``verify=False``)."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    model_states = {}
    for name, fname in manifest["models"].items():
        fpath = path / fname
        try:
            if fname.endswith(".safetensors"):
                from safetensors.torch import load_file
                device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
                model_states[name] = load_file(str(fpath), device=device)
            else:
                model_states[name] = torch.load(fpath, map_location=map_location, weights_only=True)
        except Exception as e:  # a file that passes the checksum but does not parse
            raise CheckpointError(f"{fpath}: cannot read weights: {describe_load_error(e)}", fpath) from e
    spath = path / STATE_FILE
    try:
        state = torch.load(spath, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{spath}: cannot read training state: {describe_load_error(e)}", spath) from e
    return Checkpoint(path=path, step=int(manifest["step"]), manifest=manifest, model_states=model_states, state=state)


def load_latest(ckpt_dir: str | os.PathLike, map_location: Any = "cpu",
                models: Mapping[str, nn.Module] | None = None, optimizer: Any = None, scheduler: Any = None,
                scaler: Any = None, rng: bool = False, generators: Mapping[str, torch.Generator] | None = None,
                strict: bool = True) -> Checkpoint | None:
    """Newest checkpoint of ``ckpt_dir`` that verifies, or ``None`` when there is none.

    Corrupt / truncated checkpoints are skipped with a warning naming the bad file
    (recorded in ``Checkpoint.skipped``); when checkpoints exist but none verifies,
    :class:`CheckpointError` lists them all.  Objects passed in (``models``,
    ``optimizer``, ...) are restored in place (see :meth:`Checkpoint.restore`).
    """
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return None
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(ckpts):
        try:
            ck = load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            msg = f"skipping corrupt checkpoint {path}: {e}"
            warnings.warn(msg)
            log.warning(msg)
            skipped.append((path, str(e)))
            continue
        ck.skipped = skipped
        if skipped:
            log.warning("resuming from %s (step %d) after skipping %d corrupt checkpoint(s)", path, step, len(skipped))
        ck.restore(models, optimizer, scheduler, scaler, rng=rng, generators=generators, strict=strict)
        return ck
    raise CheckpointError(f"no valid checkpoint in {ckpt_dir}; all {len(ckpts)} are corrupt: "
                          + "; ".join(r for _, r in skipped), skipped[0][0] if skipped else None)
