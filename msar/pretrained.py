"""One save format for every component: ``save_pretrained(dir)`` / ``from_pretrained(dir)``.

A saved component (a tokenizer, a transformer) is a folder::

    config.json         {"class": "modalities.video.tokenizer.VideoTokenizer", "format": "msar",
                         "format_version": 1, "msar_version": "0.1.0", "config": {...}}
    model.safetensors   the state dict: parameters and persistent buffers (e.g. the quantizer's
                        codebook usage); written for ``nn.Module`` components only

A pipeline is a folder whose ``config.json`` names its components, each saved in its own
sub-folder (``tokenizer/``, ``transformer/``).  Nothing is pickled: JSON and safetensors only.

Loading, in pseudo-code::

    meta = json(dir / "config.json")
    cls = REGISTRY[meta["class"]]          # classes of msar / modalities are imported on demand
    obj = cls.from_config(meta["config"])  # the untrained component; the global RNG is left alone
    check keys and shapes of dir / "model.safetensors" against obj.state_dict()  (mismatches named)
    obj.load_state_dict(weights); obj.eval()

A class takes part by mixing in :class:`PretrainedMixin`: it declares ``config_class``
(the dataclass its constructor takes, or ``None`` when the constructor takes keyword
arguments) and keeps its config in ``self.config``.  A :class:`~msar.ScaleSchedule` inside a
config keeps its type (``{"__schedule__": schedule.to_dict()}``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .schedule import ScaleSchedule, type_name

FORMAT = "msar"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCHEDULE_KEY = "__schedule__"
#: top-level packages whose modules a saved folder may name (imported on demand)
AUTO_IMPORT = ("msar", "modalities")
#: PretrainedMixin subclasses by :func:`~msar.schedule.type_name` (filled as classes are defined)
REGISTRY: dict[str, type] = {}

# files the earlier per-modality formats wrote, and what they were
_OLD_FORMATS = {
    "pipeline.json": "an image pipeline saved by ImagePipeline.save",
    "var.json": "an ImageNet training output (var.json + var.safetensors)",
    "tokenizer.json": "a graph demo run (tokenizer.json + model.safetensors)",
    "transformer.pt": "a video demo output (tokenizer.safetensors + transformer.pt)",
    "tokenizer.safetensors.json": "a video demo output (tokenizer.safetensors + .json)",
    "vqvae.json": "an image tokenizer trained by train_vqvae (vqvae.json + vqvae.safetensors)",
}


class PretrainedError(ValueError):
    """A saved folder that cannot be loaded; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------- class lookup
def resolve_class(name: str, registry: Mapping[str, type], what: str = "class") -> type:
    """The class a saved config names (``module.QualName``); modules of ``msar`` and
    ``modalities`` are imported on demand, other classes must be imported by the caller."""
    if not isinstance(name, str):
        raise PretrainedError(f"{what}: expected a class name string, got {name!r}")
    if name not in registry and "." in name and name.split(".")[0] in AUTO_IMPORT:
        module = name.rsplit(".", 1)[0]
        while True:
            try:
                importlib.import_module(module)
                break
            except ModuleNotFoundError as e:
                if e.name == module and "." in module:  # QualName of a nested class: try the parent
                    module = module.rsplit(".", 1)[0]
                    continue
                raise PretrainedError(f"{what} {name!r}: cannot import its module: {e}") from e
            except ImportError as e:  # a dependency of the module is missing
                parts = module.split(".")
                hint = (f" (install the modality's dependencies: pip install 'msar[{parts[1]}]')"
                        if parts[0] == "modalities" and len(parts) > 1 else "")
                raise PretrainedError(f"{what} {name!r}: cannot import its module: {e}{hint}") from e
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise PretrainedError(f"unknown {what} {name!r}: import the module that defines it before loading "
                              f"(known: {known})")
    return registry[name]


# ---------------------------------------------------------------------------- configs <-> JSON
def config_to_dict(config: Any) -> dict:
    """A config (dataclass instance or mapping) as JSON-ready data; tuples become lists, a
    :class:`~msar.ScaleSchedule` becomes ``{"__schedule__": schedule.to_dict()}``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        items = dict(config)
    else:
        raise TypeError(f"a config must be a dataclass instance or a dict, got {type(config).__name__}")
    return {str(k): _encode(v, str(k)) for k, v in items.items()}


def _encode(v: Any, where: str) -> Any:
    if isinstance(v, ScaleSchedule):
        d = v.to_dict()
        try:  # checked now: a schedule that cannot be rebuilt must not be found out at loading time
            ok = type(ScaleSchedule.from_dict(d)) is type(v)
        except (PretrainedError, ValueError) as e:
            raise TypeError(f"config field {where}: {e}") from e
        if not ok:
            raise TypeError(f"config field {where}: a {type(v).__name__} is rebuilt as another type from {d}")
        return {SCHEDULE_KEY: d}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_encode(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"config field {where}: dict keys must be strings, got {list(v)}")
        return {k: _encode(x, f"{where}.{k}") for k, x in v.items()}
    raise TypeError(f"config field {where}: a {type(v).__name__} is not JSON-serialisable (use numbers, strings, "
                    "lists, dicts or a ScaleSchedule)")


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {SCHEDULE_KEY}:
            return ScaleSchedule.from_dict(v[SCHEDULE_KEY])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _to_tuple(v: Any) -> Any:
    return tuple(_to_tuple(x) for x in v) if isinstance(v, list) else v


def _wants_tuple(field: dataclasses.Field, hint: Any) -> bool:
    if isinstance(field.default, tuple):
        return True
    for t in (hint, *typing.get_args(hint)):  # tuple, tuple[int, ...], Optional[tuple[...]]
        if t is tuple or typing.get_origin(t) is tuple:
            return True
    return False


def config_from_dict(config_class: type | None, data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`: an instance of ``config_class`` (a dataclass), or the
    decoded dict when ``config_class`` is None.  Lists go back to tuples where the field is a tuple."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a saved config must be a JSON object, got {type(data).__name__}")
    d = {k: _decode(v) for k, v in data.items()}
    if config_class is None:
        return d
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no field(s) {unknown} (fields: {sorted(fields)})")
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that does not evaluate: fall back to the defaults' types
        hints = {}
    for name, v in d.items():
        if isinstance(v, list) and _wants_tuple(fields[name], hints.get(name)):
            d[name] = _to_tuple(v)
    return config_class(**d)


# ---------------------------------------------------------------------------- files
def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _write_weights(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    out, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach()
        ptr = (v.device, v.untyped_storage().data_ptr()) if v.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses tensors that share memory (tied weights)
            v = v.clone()
        seen.add(ptr)
        out[k] = v.contiguous()
    tmp = path + ".tmp"
    save_file(out, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a saved folder, checked; a clear error for a missing folder,
    an earlier format (with the command that converts it), bad JSON or a newer format."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        if os.path.isfile(directory) and os.path.isfile(directory + ".json"):
            raise PretrainedError(f"{directory}: a video tokenizer saved by VideoTokenizer.save (weights + "
                                  f"{os.path.basename(directory)}.json), an earlier format; convert it once with "
                                  f"`python -m modalities.convert {directory} NEW_DIR`")
        raise PretrainedError(f"{directory}: not a directory (save_pretrained writes a folder with {CONFIG_NAME})")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        for old, what in _OLD_FORMATS.items():
            if os.path.isfile(os.path.join(directory, old)):
                raise PretrainedError(f"{directory}: no {CONFIG_NAME}, but {old}: {what}, an earlier format; "
                                      f"convert it once with `python -m modalities.convert {directory} NEW_DIR`")
        files = sorted(os.listdir(directory))[:10]
        raise PretrainedError(f"{directory}: no {CONFIG_NAME}; not a folder written by save_pretrained "
                              f"(or the save was interrupted). Files: {files}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PretrainedError(f"{path}: format {got!r}, expected {FORMAT!r} (not written by save_pretrained)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PretrainedError(f"{path}: format_version {version!r}; this msar reads versions <= {FORMAT_VERSION} "
                              "(saved by a newer msar?)")
    for key in ("class", "config"):
        if key not in meta:
            raise PretrainedError(f"{path}: no {key!r} entry")
    return meta


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`PretrainedError` naming the missing, unexpected and mis-shaped keys of
    ``state_dict`` against ``model.state_dict()``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: saved {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def some(xs: list) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = [f"missing keys: {some(missing)}" if missing else "",
                 f"unexpected keys: {some(unexpected)}" if unexpected else "",
                 f"shape mismatch: {some(shapes)}" if shapes else ""]
        raise PretrainedError(f"{what}: " + "; ".join(p for p in parts if p))


# ---------------------------------------------------------------------------- the mixin
class PretrainedMixin:
    """``save_pretrained(dir)`` / ``Class.from_pretrained(dir)`` for a component built from one config.

    A subclass sets ``config_class`` (the dataclass its constructor takes as its only
    argument, or ``None`` when the constructor takes the config's entries as keyword
    arguments) and keeps that config in ``self.config``.  ``nn.Module`` components also
    save their state dict (parameters and persistent buffers).
    """

    config_class: ClassVar[type | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[type_name(cls)] = cls

    @classmethod
    def from_config(cls, config: Any):
        """An untrained instance from a config: a ``config_class`` instance or its dict form."""
        if cls.config_class is None:
            return cls(**config_from_dict(None, config))
        if not isinstance(config, cls.config_class):
            config = config_from_dict(cls.config_class, config)
        return cls(config)

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write ``directory/config.json`` and, for modules, ``directory/model.safetensors``
        (``state_dict`` overrides the module's own, e.g. EMA weights)."""
        directory = os.fspath(directory)
        config = config_to_dict(self.config)  # a config JSON cannot hold fails before anything is written
        if state_dict is not None:  # e.g. EMA weights: they must load into this module later
            if not isinstance(self, nn.Module):
                raise TypeError(f"{type(self).__name__} has no weights; state_dict must be None")
            check_state_dict(self, state_dict, f"save_pretrained({directory!r}): state_dict does not fit the "
                                               f"{type(self).__name__}")
        os.makedirs(directory, exist_ok=True)
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if os.path.exists(cfg_path):  # an interrupted save must not look complete with stale weights
            os.remove(cfg_path)
        if isinstance(self, nn.Module):
            _write_weights(self.state_dict() if state_dict is None else state_dict,
                           os.path.join(directory, WEIGHTS_NAME))
        _write_json(cfg_path, self._meta(config))

    def _meta(self, config: dict) -> dict:
        from . import __version__

        return {"class": type_name(type(self)), "format": FORMAT, "format_version": FORMAT_VERSION,
                "msar_version": __version__, "config": config}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "cpu"):
        """Load what :meth:`save_pretrained` wrote, in eval mode on ``device``; the folder must
        hold this class or a subclass (``msar.from_pretrained`` loads any class)."""
        directory = os.fspath(directory)
        meta = read_config(directory)
        try:
            found = resolve_class(meta["class"], REGISTRY)
        except PretrainedError as e:  # name the file whose "class" entry is wrong
            raise PretrainedError(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from e
        if not issubclass(found, cls):
            raise PretrainedError(f"{directory} holds {found.__name__} ({meta['class']}), not {cls.__name__} or a "
                                  f"subclass; load it with {found.__name__}.from_pretrained or msar.from_pretrained")
        return found._load(directory, meta, device)

    @classmethod
    def _load(cls, directory: str, meta: dict, device: torch.device | str):
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with torch.random.fork_rng(devices=[]):  # construction draws random init we then overwrite
                obj = cls.from_config(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise PretrainedError(f"{path}: cannot build a {cls.__name__} from its config: "
                                  f"{type(e).__name__}: {e}") from e
        if isinstance(obj, nn.Module):
            from safetensors.torch import load_file

            wpath = os.path.join(directory, WEIGHTS_NAME)
            if not os.path.isfile(wpath):
                raise PretrainedError(f"{directory}: weights missing: {wpath} ({cls.__name__} has parameters)")
            try:
                sd = load_file(wpath)
            except Exception as e:  # SafetensorError: truncated, or not a safetensors file
                raise PretrainedError(f"{wpath}: cannot read (truncated or not a safetensors file?): {e}") from e
            check_state_dict(obj, sd, f"{wpath} does not match the {cls.__name__} of {CONFIG_NAME}")
            obj.load_state_dict(sd)
            obj.to(device).eval()
        return obj


def from_pretrained(directory: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """Load any component or pipeline saved by ``save_pretrained``: the class named in its
    ``config.json``."""
    return PretrainedMixin.from_pretrained(directory, device)


# ---------------------------------------------------------------------------- pipelines
class Pipeline(PretrainedMixin):
    """A tokenizer and a transformer that generate together, optionally with a text encoder.

    Saved as a folder holding ``config.json`` and one sub-folder per component
    (``tokenizer/``, ``transformer/``, and ``text_encoder/`` when there is one), each a saved
    component.  ``pipe.sample(labels)`` is :func:`msar.sample` with these two;
    ``pipe.sample(captions=[...])`` conditions on ``text_encoder.encode(captions)`` (a
    :class:`msar.text.TextEncoder`, or :func:`msar.text.load_hf_text_encoder`'s; both carry
    their tokenizers).
    """

    components: ClassVar[tuple[str, ...]] = ("tokenizer", "transformer")
    optional_components: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, tokenizer: Any, transformer: nn.Module, text_encoder: nn.Module | None = None):
        ts, ms = tokenizer.schedule, transformer.schedule
        if ts.token_counts != ms.token_counts:
            raise ValueError(f"tokenizer schedule {ts} does not match the transformer's {ms}")
        if (tokenizer.vocab_size, tokenizer.latent_dim) != (transformer.cfg.vocab_size, transformer.cfg.latent_dim):
            raise ValueError(f"tokenizer vocab_size / latent_dim {tokenizer.vocab_size} / {tokenizer.latent_dim} do not "
                             f"match the transformer's {transformer.cfg.vocab_size} / {transformer.cfg.latent_dim}")
        if text_encoder is not None:
            cfg = transformer.cfg
            if cfg.cond_kind != "sequence" or cfg.cond_dim != text_encoder.feature_dim:
                raise ValueError(f"a text encoder with {text_encoder.feature_dim} features needs a transformer with "
                                 f"cond_kind='sequence' and cond_dim={text_encoder.feature_dim}, got cond_kind="
                                 f"{cfg.cond_kind!r}, cond_dim={cfg.cond_dim}")
        self.tokenizer, self.transformer, self.text_encoder = tokenizer, transformer, text_encoder
        for part in (tokenizer, transformer, text_encoder):
            if isinstance(part, nn.Module):
                part.eval()

    @property
    def config(self) -> dict:
        """Arguments of the constructor besides the components (none here)."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def present_components(self) -> tuple[str, ...]:
        """The components this pipeline holds: ``components`` and the optional ones that are set."""
        return self.components + tuple(n for n in self.optional_components if getattr(self, n) is not None)

    def to(self, device: torch.device | str) -> "Pipeline":
        for name in self.present_components():
            part = getattr(self, name)
            if isinstance(part, nn.Module):
                part.to(device)
        return self

    @torch.no_grad()
    def sample(self, labels: Any = None, batch_size: int | None = None, *,
               captions: list[str] | None = None, **kwargs) -> Any:
        """``msar.sample(self.transformer, self.tokenizer, labels, batch_size, **kwargs)``; with
        ``captions``, ``condition=self.text_encoder.encode(captions)``."""
        from .sampling import sample

        if captions is not None:
            if self.text_encoder is None:
                raise ValueError("captions need a pipeline with a text_encoder")
            if "condition" in kwargs:
                raise ValueError("pass captions or condition, not both")
            kwargs["condition"] = self.text_encoder.encode(captions)
        return sample(self.transformer, self.tokenizer, labels, batch_size, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dicts: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        """Each component into ``directory/<name>/``, then ``directory/config.json``;
        ``state_dicts`` maps a component name to weights that override its own."""
        directory = os.fspath(directory)
        config = config_to_dict(self.config)
        for name in self.present_components():
            part = getattr(self, name)
            if not isinstance(part, PretrainedMixin):
                raise TypeError(f"pipeline component {name!r} ({type(part).__name__}) cannot be saved: "
                                "its class does not mix in msar.PretrainedMixin")
        os.makedirs(directory, exist_ok=True)
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if os.path.exists(cfg_path):
            os.remove(cfg_path)
        for name in self.present_components():
            getattr(self, name).save_pretrained(os.path.join(directory, name), (state_dicts or {}).get(name))
        meta = self._meta(config)
        meta["components"] = {name: name for name in self.present_components()}
        _write_json(cfg_path, meta)

    @classmethod
    def _load(cls, directory: str, meta: dict, device: torch.device | str) -> "Pipeline":
        path = os.path.join(directory, CONFIG_NAME)
        subs = meta.get("components")
        if (not isinstance(subs, dict) or not set(cls.components) <= set(subs)
                or not set(subs) <= set(cls.components) | set(cls.optional_components)):
            raise PretrainedError(f"{path}: 'components' must name the sub-folders of {list(cls.components)} "
                                  f"(optionally {list(cls.optional_components)}), got {subs!r}")
        parts = {}
        for name, sub in subs.items():
            if not isinstance(sub, str) or os.path.isabs(sub) or ".." in sub.replace("\\", "/").split("/"):
                raise PretrainedError(f"{path}: component {name!r} must be a sub-folder name, got {sub!r}")
            parts[name] = from_pretrained(os.path.join(directory, sub), device)
        try:
            return cls(**parts, **config_from_dict(None, meta["config"]))
        except (TypeError, ValueError) as e:
            raise PretrainedError(f"{directory}: the saved components do not form a {cls.__name__}: {e}") from e
