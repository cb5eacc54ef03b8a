"""Text as a condition: captions -> token ids -> :class:`~msar.Condition` ``sequence`` features.

Two encoders with one interface (``tokenizer``, ``feature_dim``, ``forward(ids, mask)``,
``encode(captions)``), nothing downloaded::

    ids, mask = tokenizer(captions)          # (B, T) long, (B, T) bool (True = real token)
    cond = encoder(ids, mask)                # Condition.sequence((B, T, feature_dim), mask)
    cond = encoder.encode(captions)          # both steps, on the encoder's device

* :class:`WordTokenizer` + :class:`TextEncoder`: a word-level vocabulary built from a corpus and a
  small transformer encoder, trained jointly with the generator (``TransformerTrainer(...,
  condition_encoder=encoder)``) or separately.  Saved with ``save_pretrained`` (the vocabulary
  lives in the config).
* :func:`load_hf_text_encoder`: a T5 encoder or CLIP text model from a local folder through HF
  ``transformers`` (``pip install 'msar[text]'``), frozen by default.

Training batches carry token ids and masks, never strings, so they collate with PyTorch's default
``DataLoader``: a dataset item is ``(x, *tokenizer.encode_one(caption))`` -> ``(x, ids (T,), mask (T,))``.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .conditioning import Condition
from .pretrained import CONFIG_NAME, PretrainedError, PretrainedMixin, _write_json, config_to_dict

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS = (PAD, UNK, EOS)
_WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------------- tokenizer
class WordTokenizer(PretrainedMixin):
    """Word-level tokenizer: lower-cased ``\\w+`` words, ids ``<pad>`` = 0, ``<unk>`` = 1 (any
    word not in the vocabulary), ``<eos>`` = 2 (ends every caption, so an empty caption is one
    real token), then the vocabulary.

    ``tokenizer(captions) -> (ids (B, max_length) long, mask (B, max_length) bool)``; a caption
    with more than ``max_length - 1`` words is a ValueError that names it, its length and the
    limit.  Saved with ``save_pretrained(dir)`` (a ``config.json`` holding the vocabulary).
    """

    config_class = None  # the constructor takes the config's entries as keyword arguments

    def __init__(self, vocab: Sequence[str], max_length: int = 32, lowercase: bool = True):
        vocab = list(vocab)
        if tuple(vocab[:3]) != SPECIALS:
            vocab = list(SPECIALS) + [w for w in vocab if w not in SPECIALS]
        if len(set(vocab)) != len(vocab):
            raise ValueError("WordTokenizer: the vocabulary has duplicate words")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"WordTokenizer: max_length must be an int >= 1, got {max_length!r}")
        self.vocab, self.max_length, self.lowercase = vocab, max_length, lowercase
        self.ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_corpus(cls, captions: Iterable[str], max_length: int = 32, min_count: int = 1,
                    lowercase: bool = True) -> "WordTokenizer":
        """The vocabulary of ``captions``: words seen at least ``min_count`` times, most frequent
        first (ties alphabetical, so the same corpus gives the same ids)."""
        counts = Counter(w for c in captions for w in cls._split(c, lowercase))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words, max_length, lowercase)

    @property
    def config(self) -> dict:
        return {"vocab": self.vocab, "max_length": self.max_length, "lowercase": self.lowercase}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def _split(caption: str, lowercase: bool) -> list[str]:
        if not isinstance(caption, str):
            raise ValueError(f"a caption must be a str, got {type(caption).__name__}")
        return _WORD.findall(caption.lower() if lowercase else caption)

    def words(self, caption: str) -> list[str]:
        """The words of ``caption`` as the tokenizer sees them."""
        return self._split(caption, self.lowercase)

    def encode_one(self, caption: str, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption -> ``(ids (max_length,) long, mask (max_length,) bool)``, padded with ``<pad>``."""
        words = self.words(caption)
        n = len(words) + 1  # + <eos>
        if n > self.max_length:
            which = "caption" if index is None else f"caption {index}"
            short = caption if len(caption) <= 80 else caption[:77] + "..."
            raise ValueError(f"{which} has {n} tokens ({n - 1} words + {EOS}), more than the tokenizer's "
                             f"max_length {self.max_length}: {short!r}")
        unk = self.ids[UNK]
        ids = torch.zeros(self.max_length, dtype=torch.long)
        ids[:n] = torch.tensor([self.ids.get(w, unk) for w in words] + [self.ids[EOS]])
        mask = torch.zeros(self.max_length, dtype=torch.bool)
        mask[:n] = True
        return ids, mask

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(ids (B, max_length) long, mask (B, max_length) bool)``."""
        if isinstance(captions, str):
            raise ValueError("pass a list of captions, not one string")
        pairs = [self.encode_one(c, i) for i, c in enumerate(captions)]
        if not pairs:
            raise ValueError("no captions")
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def decode(self, ids: torch.Tensor) -> list[str]:
        """``(B, T)`` ids -> captions (words up to ``<eos>``; unknown words as ``<unk>``)."""
        out = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.ids[EOS] or i == self.ids[PAD]:
                    break
                words.append(self.vocab[i])
            out.append(" ".join(words))
        return out


# ---------------------------------------------------------------------------- built-in encoder
@dataclass
class TextEncoderConfig:
    """Hyper-parameters of :class:`TextEncoder`; ``vocab`` and ``max_length`` are its
    :class:`WordTokenizer`'s (:meth:`for_tokenizer`)."""

    vocab: list = field(default_factory=lambda: list(SPECIALS))
    max_length: int = 32
    lowercase: bool = True
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    @classmethod
    def for_tokenizer(cls, tokenizer: WordTokenizer, **kw) -> "TextEncoderConfig":
        """A config with ``tokenizer``'s vocabulary, max length and case handling."""
        return cls(vocab=list(tokenizer.vocab), max_length=tokenizer.max_length, lowercase=tokenizer.lowercase, **kw)


def _check_ids(ids: torch.Tensor, mask: torch.Tensor, max_length: int, vocab_size: int | None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = f"shape {tuple(ids.shape)} dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"text encoder: expected token ids (B, T) of an integer dtype, got {got}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        got = f"shape {tuple(mask.shape)} dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"text encoder: expected a bool mask of the ids' shape {tuple(ids.shape)}, got {got}")
    if ids.shape[1] > max_length:
        raise ValueError(f"text encoder: {ids.shape[1]} tokens, more than max_length {max_length}")
    if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"text encoder: token ids must lie in [0, {vocab_size - 1}], got min {int(ids.min())}, "
                         f"max {int(ids.max())}")


class TextEncoder(PretrainedMixin, nn.Module):
    """A small pre-norm transformer encoder over :class:`WordTokenizer` ids.

    ``forward(ids (B, T) long, mask (B, T) bool) -> Condition.sequence(features (B, T, dim), mask)``:
    token + learned position embedding, ``depth`` encoder layers under the padding mask (padded
    positions never reach a real one), a final LayerNorm.  ``feature_dim`` (= ``dim``) is the
    ``cond_dim`` of the transformer it conditions.
    """

    config_class = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocab, config.max_length, config.lowercase)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_length, config.dim))
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.num_heads, round(config.dim * config.mlp_ratio),
                                           config.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    @property
    def feature_dim(self) -> int:
        return self.config.dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Condition:
        """``ids (B, T)``, ``mask (B, T)`` bool (``T <= max_length``) -> ``Condition.sequence``."""
        _check_ids(ids, mask, self.config.max_length, self.tokenizer.vocab_size)
        h = self.embed(ids) + self.pos_embed[:, :ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        return Condition.sequence(self.norm(h), mask)

    def encode(self, captions: Sequence[str]) -> Condition:
        """Captions -> ``Condition.sequence`` on this encoder's device (trimmed to the longest caption)."""
        ids, mask = self.tokenizer(captions)
        T = int(mask.sum(1).max())
        device = self.pos_embed.device
        return self(ids[:, :T].to(device), mask[:, :T].to(device))


# ---------------------------------------------------------------------------- HF transformers
def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a T5 / CLIP text encoder needs HF transformers: pip install 'msar[text]' "
                          f"(or pip install transformers); {e}") from e
    return transformers


class HFTextEncoder(PretrainedMixin, nn.Module):
    """A T5 encoder or CLIP text model from HF ``transformers`` with its tokenizer, behind the
    :class:`TextEncoder` interface (``tokenizer``, ``feature_dim``, ``forward(ids, mask)``,
    ``encode(captions)``); build it with :func:`load_hf_text_encoder`.  Frozen unless
    ``trainable``.  ``save_pretrained(dir)`` writes the HF folder to ``dir/hf/``."""

    config_class = None

    def __init__(self, model: nn.Module, tokenizer, max_length: int, trainable: bool = False):
        super().__init__()
        self.model, self.hf_tokenizer, self.max_length, self.trainable = model, tokenizer, max_length, trainable
        self.model.requires_grad_(trainable)

    @property
    def config(self) -> dict:
        return {"max_length": self.max_length, "trainable": self.trainable}

    @property
    def feature_dim(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)  # T5's d_model, CLIP's hidden_size

    @property
    def tokenizer(self) -> "_HFTokenize":
        """``tokenizer(captions) -> (ids, mask)``, as :class:`WordTokenizer`."""
        return _HFTokenize(self)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(ids (B, max_length) long, mask (B, max_length) bool)``; a caption longer
        than ``max_length`` tokens is a ValueError that names it."""
        if isinstance(captions, str) or not captions:
            raise ValueError("pass a non-empty list of captions")
        lengths = [len(x) for x in self.hf_tokenizer(list(captions))["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.max_length:
                raise ValueError(f"caption {i} has {n} tokens, more than the text encoder's max_length "
                                 f"{self.max_length}: {captions[i]!r}")
        enc = self.hf_tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                                return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Condition:
        """``ids (B, T)``, ``mask (B, T)`` bool -> ``Condition.sequence(last hidden state, mask)``."""
        _check_ids(ids, mask, self.max_length, None)
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return Condition.sequence(out.float(), mask)

    def encode(self, captions: Sequence[str]) -> Condition:
        """Captions -> ``Condition.sequence`` on the model's device (trimmed to the longest caption)."""
        ids, mask = self.tokenize(captions)
        T = int(mask.sum(1).max())
        device = next(self.model.parameters()).device
        return self(ids[:, :T].to(device), mask[:, :T].to(device))

    def save_pretrained(self, directory: str | os.PathLike, state_dict=None) -> None:
        if state_dict is not None:
            raise TypeError("HFTextEncoder.save_pretrained writes the HF model's own weights; state_dict must be None")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if os.path.exists(cfg_path):
            os.remove(cfg_path)
        self.model.save_pretrained(os.path.join(directory, "hf"))
        self.hf_tokenizer.save_pretrained(os.path.join(directory, "hf"))
        _write_json(cfg_path, self._meta(config_to_dict(self.config)))

    @classmethod
    def _load(cls, directory: str, meta: dict, device) -> "HFTextEncoder":
        cfg = meta["config"]
        if not isinstance(cfg, dict):
            raise PretrainedError(f"{directory}: config must be a JSON object")
        return load_hf_text_encoder(os.path.join(directory, "hf"), max_length=cfg.get("max_length"),
                                    trainable=bool(cfg.get("trainable", False)), device=device)


class _HFTokenize:
    """The tokenizer view of an :class:`HFTextEncoder` (``max_length``, ``__call__``, ``encode_one``)."""

    def __init__(self, encoder: HFTextEncoder):
        self.encoder, self.max_length = encoder, encoder.max_length

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.tokenize(captions)

    def encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.encoder.tokenize([caption])
        return ids[0], mask[0]


def load_hf_text_encoder(path: str | os.PathLike, max_length: int | None = None, trainable: bool = False,
                         device: torch.device | str = "cpu") -> HFTextEncoder:
    """A T5 encoder (``T5EncoderModel``, from a T5 or T5-encoder checkpoint) or a CLIP text model
    (``CLIPTextModel``, from a CLIP or CLIP-text checkpoint) and its tokenizer from the local
    folder ``path`` (``local_files_only``: nothing is downloaded).

    ``max_length``: longest caption in tokens (default: the tokenizer's ``model_max_length`` when
    set, else the model's position limit -- CLIP's ``max_position_embeddings``; T5 has relative
    positions and none --, else 512); more than CLIP's position limit is a ValueError.  Needs
    ``transformers`` (``msar[text]``)."""
    tf = _transformers()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder (load_hf_text_encoder reads a local HF save)")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = config.model_type
    if kind in ("t5", "mt5", "umt5"):
        model = tf.T5EncoderModel.from_pretrained(path, local_files_only=True)
        limit = None
    elif kind in ("clip", "clip_text_model"):
        model = tf.CLIPTextModel.from_pretrained(path, local_files_only=True)
        limit = int(model.config.max_position_embeddings)
    else:
        raise ValueError(f"{path}: a {kind!r} model; load_hf_text_encoder reads T5 encoders and CLIP text models")
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if max_length is None:  # HF tokenizers without a known limit report a huge model_max_length
        tm = tokenizer.model_max_length
        max_length = int(tm) if isinstance(tm, int) and tm < 100_000 else (limit or 512)
    if limit is not None and max_length > limit:
        raise ValueError(f"{path}: max_length {max_length} is more than the CLIP text model's {limit} positions")
    return HFTextEncoder(model.to(device).eval(), tokenizer, int(max_length), trainable)
