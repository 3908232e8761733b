"""Text corpora packed into fixed-length blocks, with optional memorization probes.

Any corpus that ``datasets`` loads works: a hub name, or local ``.txt`` (one document per line), ``.json`` /
``.jsonl`` (documents in ``text_field``) and ``.parquet`` files. Documents are tokenized with
``transformers.AutoTokenizer`` (a hub name or a local directory), joined with EOS after every document and
cut into blocks of ``block_size`` tokens. Held-out text comes from ``validation_files`` /
``validation_split`` or a seeded fraction of the documents.

Probes (duplicated passages, canaries) measure verbatim memorization as in Merullo et al., *From Memorization
to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256, 2025): each probe is a row of its own,
inserted ``probe_repeats`` times into training; at evaluation the model is prompted with its first
``prefix_len`` tokens (paper: 64) and greedily continues ``suffix_len`` tokens (paper: 48).

The pipeline is ``datasets`` end to end, and nothing holds the corpus in a Python list: blank documents are
filtered out, a seeded ``train_test_split`` holds documents out (then each split is sorted back into file
order), a batched ``map`` tokenizes and appends EOS, and a second batched ``map`` (:func:`group_texts`) packs
the token streams into blocks. Every step is cached by ``datasets``' own fingerprints under ``cache_dir``; the
packed blocks go to Arrow files named by the settings' digest. :meth:`TextDataModule.prepare_data` runs it and
writes a small JSON manifest (the shared cache of :class:`~lightning_curv.data.lm.LMRowsDataModule`, keyed by
the files' path, size and mtime, the tokenizer's content and the settings); :meth:`TextDataModule.setup` only
memory-maps those files (DDP-safe). Hand-written: :func:`group_texts` keeps a last short block (>= 2 tokens) of
each map batch instead of dropping it like the Hugging Face recipe, so no token of the corpus is lost; blocks
restart at each batch of ``GROUP_DOCUMENTS`` documents (``datasets`` cannot carry a remainder across batches).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_curv.data.base import EvalSet
from lightning_curv.data.collate import (
    RowDataset,
    generation_row,
    split_selection_test,
)
from lightning_curv.data.lm import BatchKind, LMRowsDataModule

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

#: Bump when the cached content changes for the same settings (invalidates old caches).
FORMAT_VERSION = 2

#: ``datasets`` builder for each local file extension.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

#: Documents tokenized per tokenizer call (``map`` batch size).
_TOKENIZE_CHUNK = 1000
#: Documents packed together by one :func:`group_texts` call: blocks restart at these boundaries.
GROUP_DOCUMENTS = 10_000
#: Column of the token ids in the tokenized and packed ``datasets``.
TOKENS = "input_ids"


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def resolve_files(files: str | Sequence[str] | None) -> list[str]:
    """Expand paths and glob patterns into a sorted list of existing files.

    Args:
        files: A path, a glob pattern, or a list of them.

    Returns:
        Absolute paths, each pattern's matches sorted, in the order given.

    Raises:
        FileNotFoundError: If a path does not exist or a pattern matches nothing.
    """
    out = []
    for pattern in _as_list(files):
        path = os.path.expanduser(pattern)
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"Data file {pattern!r} does not exist (resolved to {os.path.abspath(path)}).")
        out += [os.path.abspath(m) for m in matches]
    return out


def builder_for(files: Sequence[str]) -> str:
    """Return the ``datasets`` builder (``text``, ``json``, ``parquet``) for local files of one format.

    Args:
        files: Local file paths.

    Returns:
        The builder name.

    Raises:
        ValueError: If an extension is not supported or the files mix formats.
    """
    builders = set()
    for f in files:
        ext = Path(f).suffix.lower()
        if ext not in BUILDERS:
            raise ValueError(f"Unsupported data file {f!r}: expected one of {sorted(BUILDERS)}.")
        builders.add(BUILDERS[ext])
    if len(builders) > 1:
        raise ValueError(f"Data files mix formats ({sorted(builders)}); use one format per file list.")
    return builders.pop()


def _file_fingerprint(files: Sequence[str]) -> list[list[Any]]:
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what the tokenizer does (its serialized pipeline, or its vocabulary), not of its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id, type(tokenizer).__name__])
    return hashlib.sha256((blob + special).encode()).hexdigest()[:16]


def read_probes(path: str, text_field: str = "text") -> list[str]:
    """Read probe texts: ``.jsonl``/``.json`` (one object per line, text in ``text_field``) or text lines.

    Args:
        path: The probes file.
        text_field: Key of the text in JSON objects.

    Returns:
        The probes, in file order (blank text lines are skipped).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a JSON line has no ``text_field`` or the file holds no probe.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Probes file {path!r} does not exist (resolved to {os.path.abspath(path)}).")
    probes = []
    with open(path) as f:
        if Path(path).suffix.lower() in (".json", ".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_field!r} field.")
                probes.append(str(obj[text_field]))
        else:
            probes = [line.rstrip("\n") for line in f if line.strip()]
    if not probes:
        raise ValueError(f"Probes file {path!r} holds no probe.")
    return probes


class TextDataModule(LMRowsDataModule):
    """A text corpus packed into blocks, a held-out split and optional memorization probes.

    Training rows (in :meth:`collect_dataloader` order): the training blocks, then every probe
    ``probe_repeats`` times (each a row of its own, never packed with other text). Evaluation sets, in loader
    order (see :attr:`eval_sets`): ``heldout`` (perplexity, held-out blocks); with probes,
    ``probes_selection`` and ``probes_test`` (a seeded half each; ``index`` is the probe's position in the
    file); with ``memorization_from_train > 0``, ``train_selection`` and ``train_test`` (prefixes of training
    blocks; ``index`` is the block's training-row index).

    Args:
        tokenizer: Hub name or local directory for ``AutoTokenizer.from_pretrained``.
        dataset: Hub data set name (exclusive with ``data_files``).
        dataset_config: Hub data set configuration name.
        data_files: Local training files or glob patterns (``.txt``, ``.json``/``.jsonl``, ``.parquet``).
        validation_files: Local held-out files; without them (and without ``validation_split``) a seeded
            ``heldout_fraction`` of the documents is held out.
        split: Split of the hub data set used for training.
        validation_split: Split of the hub data set used as held-out text.
        text_field: Column holding the text (``.txt`` files always use ``text``).
        heldout_fraction: Fraction of documents held out when no held-out files or split are given.
        max_documents: Use at most this many training documents (the first ones), e.g. of a large hub set.
        block_size: Tokens per training / held-out block.
        probes_file: Probe texts (``.jsonl`` with ``text_field``, or ``.txt`` lines).
        probe_repeats: Copies of each probe in training (0: evaluate probes that were never trained on).
        prefix_len: Prompt tokens of a memorization probe.
        suffix_len: Continuation tokens compared with the probe.
        memorization_from_train: Number of training blocks whose continuation is also probed (0: none;
            exclusive with ``probes_file``).
        seed: Seed of the held-out split, the probe halves, the training-block choice and the shuffle.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation loaders and of :meth:`collect_dataloader`.
        num_workers: DataLoader workers.
        cache_dir: Folder of the tokenization cache (and of ``datasets``' own cache).

    Raises:
        ValueError: On inconsistent settings.
        FileNotFoundError: If a data, validation or probes file is missing.
    """

    cache_name = "text"

    def __init__(
        self,
        tokenizer: str,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | list[str] | None = None,
        validation_files: str | list[str] | None = None,
        split: str = "train",
        validation_split: str | None = None,
        text_field: str = "text",
        heldout_fraction: float = 0.05,
        max_documents: int | None = None,
        block_size: int = 128,
        probes_file: str | None = None,
        probe_repeats: int = 10,
        prefix_len: int = 64,
        suffix_len: int = 48,
        memorization_from_train: int = 0,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = ".cache/lightning_curv/text",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.data_files = data_files
        self.validation_files = validation_files
        self.split = split
        self.validation_split = validation_split
        self.text_field = text_field
        self.heldout_fraction = heldout_fraction
        self.max_documents = max_documents
        self.block_size = block_size
        self.probes_file = probes_file
        self.probe_repeats = probe_repeats
        self.prefix_len = prefix_len
        self.suffix_len = suffix_len
        self.memorization_from_train = memorization_from_train
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self._validate()
        self._tokenizer: Any = None
        self._data: dict[str, Any] | None = None

    def _validate(self) -> None:
        if (self.dataset is None) == (self.data_files is None):
            raise ValueError("Give exactly one of `dataset` (a hub name) and `data_files` (local files).")
        if self.validation_files is not None and self.validation_split is not None:
            raise ValueError("Give at most one of `validation_files` and `validation_split`.")
        if self.validation_split is not None and self.dataset is None:
            raise ValueError("`validation_split` applies to hub data sets; use `validation_files` for local files.")
        checks = [
            (
                0.0 < self.heldout_fraction < 1.0,
                f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}.",
            ),
            (self.max_documents is None or self.max_documents >= 1, "max_documents must be >= 1 or None."),
            (self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}."),
            (self.probe_repeats >= 0, f"probe_repeats must be >= 0, got {self.probe_repeats}."),
            (self.prefix_len >= 1 and self.suffix_len >= 1, "prefix_len and suffix_len must be >= 1."),
            (
                self.memorization_from_train == 0 or self.memorization_from_train >= 2,
                "memorization_from_train must be 0 or >= 2 (it is split into selection and test halves).",
            ),
            (
                self.probes_file is None or self.memorization_from_train == 0,
                "Give either `probes_file` or `memorization_from_train` > 0, not both: both would feed the "
                "same memorization metrics.",
            ),
            (
                self.memorization_from_train == 0 or self.prefix_len + self.suffix_len <= self.block_size,
                f"memorization_from_train probes training blocks, so prefix_len + suffix_len "
                f"({self.prefix_len + self.suffix_len}) must be <= block_size ({self.block_size}).",
            ),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1."),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # --- tokenization

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            if self._tokenizer.eos_token_id is None:
                raise ValueError(
                    f"Tokenizer {self.tokenizer_name!r} has no EOS token, which separates packed documents; "
                    "set `eos_token` in its tokenizer_config.json."
                )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer (added tokens included)."""
        return len(self.tokenizer)

    @property
    @override
    def pad_token_id(self) -> int:
        """Padding id: the tokenizer's pad token, or EOS when it has none (padding is masked anyway)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    @override
    def cache_config(self) -> dict[str, Any]:
        """What determines the cached blocks and probes (the cache key); probe rows are cut at load."""
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "validation_split": self.validation_split,
            "data_files": _file_fingerprint(resolve_files(self.data_files)),
            "validation_files": _file_fingerprint(resolve_files(self.validation_files)),
            "text_field": self.text_field,
            "heldout_fraction": self.heldout_fraction,
            "max_documents": self.max_documents,
            "block_size": self.block_size,
            "seed": self.seed,
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "probes_file": _file_fingerprint(resolve_files(self.probes_file)),
        }

    def blocks_path(self, split: Literal["train", "heldout"]) -> Path:
        """Arrow file of the packed blocks of ``split`` for the current settings (next to the manifest)."""
        return self.cache_path.with_name(f"{self.cache_path.stem}-{split}.arrow")

    def _load_documents(self, files: list[str], hub_split: str | None, limit: int | None = None) -> Any:
        """Non-blank documents of local files (one format) or of a hub split, at most ``limit`` of them.

        Returns:
            A ``datasets.Dataset`` with one column ``text`` (and no other).
        """
        import datasets

        cache = os.path.join(self.cache_dir, "datasets")
        if files:
            source, builder = f"data files {files}", builder_for(files)
            ds = datasets.load_dataset(builder, data_files={"data": files}, split="data", cache_dir=cache)
        else:
            source, builder = f"dataset {self.dataset!r} split {hub_split!r}", None
            ds = datasets.load_dataset(self.dataset, self.dataset_config, split=hub_split, cache_dir=cache)
        column = "text" if builder == "text" else self.text_field
        if column not in ds.column_names:
            raise ValueError(f"The {source} have no column {column!r} (columns: {ds.column_names}); set `text_field`.")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
        return ds.filter(_is_document, batched=True, input_columns="text", desc="Dropping blank documents")

    def _tokenize(self, documents: Any) -> Any:
        """Token ids of each document followed by EOS: a ``datasets.Dataset`` with one column ``input_ids``."""
        return documents.map(
            _tokenize_batch,
            batched=True,
            batch_size=_TOKENIZE_CHUNK,
            input_columns="text",
            remove_columns=documents.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "eos": self.tokenizer.eos_token_id},
            desc="Tokenizing",
        )

    def tokenize_corpus(self) -> dict[str, Any]:
        """Load, split and tokenize the corpus and the probes (each ``datasets`` step cached by fingerprint).

        Returns:
            ``train`` and ``heldout`` (``datasets.Dataset`` objects with column ``input_ids``: one document
            with EOS appended per row, in file order), ``num_train_documents``, ``num_heldout_documents`` and
            ``probes`` (token ids of each probe, without EOS).

        Raises:
            FileNotFoundError: If a data file is missing.
            ValueError: If the corpus is empty or too small to hold out documents.
        """
        train_files = resolve_files(self.data_files)
        source = f"data_files {train_files}" if train_files else f"dataset {self.dataset!r} split {self.split!r}"
        docs = self._load_documents(train_files, self.split, self.max_documents)
        if len(docs) == 0:
            raise ValueError(f"The corpus ({source}) is empty: it holds no non-blank document.")
        heldout_files = resolve_files(self.validation_files)
        if heldout_files or self.validation_split is not None:
            heldout = self._load_documents(heldout_files, self.validation_split)
            if len(heldout) == 0:
                raise ValueError(f"The held-out corpus ({heldout_files or self.validation_split}) is empty.")
            train = docs
        else:
            if len(docs) < 2:
                raise ValueError(
                    f"The corpus ({source}) has a single document, so none can be held out; "
                    "give `validation_files` or more documents."
                )
            num_heldout = min(len(docs) - 1, max(1, round(self.heldout_fraction * len(docs))))
            # The permutation is numpy's default_rng(seed), as before; sorting restores file order.
            numbered = docs.map(_number, batched=True, with_indices=True, desc="Numbering documents")
            parts = numbered.train_test_split(test_size=num_heldout, shuffle=True, seed=self.seed)
            train = parts["train"].sort("position").remove_columns("position")
            heldout = parts["test"].sort("position").remove_columns("position")
        probes = []
        if self.probes_file is not None:
            probes = self.tokenizer(self._probe_texts(), add_special_tokens=False, verbose=False)[TOKENS]
        return {
            "train": self._tokenize(train),
            "heldout": self._tokenize(heldout),
            "num_train_documents": len(train),
            "num_heldout_documents": len(heldout),
            "probes": probes,
        }

    def _probe_texts(self) -> list[str]:
        return read_probes(self.probes_file, self.text_field) if self.probes_file is not None else []

    @override
    def _create_cache(self) -> dict[str, Any]:
        """Tokenize, pack each split into :meth:`blocks_path`, and return the manifest."""
        corpus = self.tokenize_corpus()
        for split in ("train", "heldout"):
            path = self.blocks_path(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            corpus[split].map(
                group_texts,
                batched=True,
                batch_size=GROUP_DOCUMENTS,
                input_columns=TOKENS,
                fn_kwargs={"block_size": self.block_size},
                cache_file_name=str(path),
                desc=f"Packing {split} blocks",
            )
        return {
            "config": self.cache_config,
            "num_train_documents": corpus["num_train_documents"],
            "num_heldout_documents": corpus["num_heldout_documents"],
            "probes": corpus["probes"],
        }

    def _read_blocks(self, split: Literal["train", "heldout"]) -> Any:
        import datasets

        path = self.blocks_path(split)
        if not path.exists():
            raise FileNotFoundError(
                f"Packed {split} blocks {path} are missing (cache folder cleaned?); delete {self.cache_path} and "
                "call prepare_data() again."
            )
        return datasets.Dataset.from_file(str(path)).with_format("torch")

    def _check_probes(self, probes: Sequence[Tensor]) -> None:
        if len(probes) < 2:
            raise ValueError(
                f"Probes file {self.probes_file!r} holds {len(probes)} probe; at least 2 are needed to split "
                "them into selection and test halves."
            )
        need = self.prefix_len + self.suffix_len
        texts = None
        for i, probe in enumerate(probes):
            if len(probe) < need:
                texts = texts or self._probe_texts()
                preview = texts[i][:60] if i < len(texts) else ""
                raise ValueError(
                    f"Probe {i} of {self.probes_file!r} ({preview!r}...) has {len(probe)} tokens, fewer than "
                    f"prefix_len + suffix_len = {self.prefix_len} + {self.suffix_len} = {need}. Lengthen or "
                    "remove the probe, or lower prefix_len / suffix_len."
                )

    @override
    def _build(self, data: dict[str, Any]) -> None:
        train_blocks, heldout_blocks = self._read_blocks("train"), self._read_blocks("heldout")
        if len(train_blocks) == 0 or len(heldout_blocks) == 0:
            raise ValueError("The training or held-out split has fewer than 2 tokens; use a larger corpus.")
        probes = [torch.tensor(ids, dtype=torch.int64) for ids in data["probes"]]
        if self.probes_file is not None:
            self._check_probes(probes)
        eos = torch.tensor([self.tokenizer.eos_token_id], dtype=torch.int64)
        # Only the first prefix_len + suffix_len tokens are evaluated; longer probes are cut at a block.
        cap = max(self.block_size, self.prefix_len + self.suffix_len)
        probe_rows = [torch.cat([p, eos])[:cap] for p in probes]

        self.num_train_blocks = len(train_blocks)
        extra: list[Tensor] = []
        self.probe_row_indices: list[list[int]] = [[] for _ in probes]
        for _ in range(self.probe_repeats):
            for j, row in enumerate(probe_rows):
                self.probe_row_indices[j].append(self.num_train_blocks + len(extra))
                extra.append(row)
        self.train_dataset = PackedRows(train_blocks, extra)
        self.heldout_dataset = PackedRows(heldout_blocks)

        self.memorization_selection_dataset = self.memorization_test_dataset = None
        prompt, target = self.prefix_len, self.suffix_len
        if probes:
            selection, test = split_selection_test(len(probes), self.seed)
            self.probe_selection_indices, self.probe_test_indices = selection, test
            rows_of = [generation_row(p, prompt, index=i, target_len=target) for i, p in enumerate(probes)]
        elif self.memorization_from_train > 0:
            lengths = train_blocks.with_format("arrow")[TOKENS]
            full = np.flatnonzero(_list_lengths(lengths) == self.block_size).tolist()
            if len(full) < 2:
                raise ValueError("memorization_from_train needs at least 2 full training blocks.")
            rng = np.random.default_rng([self.seed, 0x7E57])
            chosen = sorted(rng.choice(full, size=min(self.memorization_from_train, len(full)), replace=False))
            selection, test = split_selection_test(len(chosen), self.seed)
            rows_of = [
                generation_row(self.train_dataset[int(i)][TOKENS], prompt, index=int(i), target_len=target)
                for i in chosen
            ]
        else:
            return
        self.memorization_selection_dataset = RowDataset([rows_of[i] for i in selection])
        self.memorization_test_dataset = RowDataset([rows_of[i] for i in test])

    @property
    def eval_sets(self) -> list[EvalSet]:
        """Evaluation sets, in the order of the loaders that :meth:`val_dataloader` returns."""
        sets = [EvalSet("heldout", "perplexity")]
        if self.probes_file is not None:
            sets += [
                EvalSet("probes_selection", "text_memorization", split="selection"),
                EvalSet("probes_test", "text_memorization", split="test"),
            ]
        elif self.memorization_from_train > 0:
            sets += [
                EvalSet("train_selection", "text_memorization", split="selection"),
                EvalSet("train_test", "text_memorization", split="test"),
            ]
        return sets

    def _eval_datasets(self) -> list[tuple[Dataset, BatchKind]]:
        datasets: list[tuple[Dataset, BatchKind]] = [(self.heldout_dataset, "lm")]
        if self.memorization_selection_dataset is not None:
            datasets += [
                (self.memorization_selection_dataset, "generation"),
                (self.memorization_test_dataset, "generation"),
            ]
        return datasets

    def _memorized_dataset(self, split: Literal["selection", "test"]) -> RowDataset | None:
        return self.memorization_selection_dataset if split == "selection" else self.memorization_test_dataset

    def _retain_dataset(self) -> Dataset:
        return Subset(self.train_dataset, range(self.num_train_blocks))


class PackedRows(Dataset):
    """Rows of packed blocks (a ``datasets.Dataset`` in torch format), then extra rows; ``index`` is the position.

    Args:
        blocks: Packed blocks with column ``input_ids``.
        extra: Further rows' token ids (probe copies), after the blocks.
    """

    def __init__(self, blocks: Any, extra: Sequence[Tensor] = ()) -> None:
        self.blocks = blocks
        self.extra = list(extra)

    def __len__(self) -> int:
        return len(self.blocks) + len(self.extra)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.blocks)
        ids = self.blocks[i][TOKENS] if i < n else self.extra[i - n]
        return {TOKENS: ids, "index": i}


def _is_document(texts: list[Any]) -> list[bool]:
    return [isinstance(t, str) and bool(t.strip()) for t in texts]


def _number(batch: dict[str, list], indices: list[int]) -> dict[str, list[int]]:
    return {"position": indices}


def _tokenize_batch(texts: list[str], tokenizer: Any, eos: int) -> dict[str, list[list[int]]]:
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)[TOKENS]
    return {TOKENS: [[*doc, eos] for doc in ids]}


def _list_lengths(column: Any) -> np.ndarray:
    """Lengths of the rows of an Arrow list column, as an int array (no Python list of the values)."""
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


def group_texts(input_ids: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Pack one ``map`` batch of token sequences into consecutive blocks (see :func:`pack_blocks`).

    Args:
        input_ids: Token ids of consecutive documents (EOS included).
        block_size: Tokens per block.

    Returns:
        ``{"input_ids": blocks}``; the blocks concatenate back to the batch's tokens (but a dropped single
        last token).
    """
    lengths = [len(ids) for ids in input_ids]
    stream = torch.from_numpy(np.fromiter((t for ids in input_ids for t in ids), dtype=np.int64, count=sum(lengths)))
    return {TOKENS: [block.tolist() for block in pack_blocks(stream, block_size)]}


def pack_blocks(stream: Tensor, block_size: int) -> list[Tensor]:
    """Cut a token stream into consecutive blocks of ``block_size`` tokens.

    The last block is shorter when the stream length is not a multiple of ``block_size``; it is kept when it
    has at least 2 tokens (one next-token target), so the blocks concatenate back to the stream (up to a
    dropped single last token).

    Args:
        stream: Token ids of shape ``[N]``.
        block_size: Tokens per block.

    Returns:
        Views of ``stream``, each of shape ``[block_size]`` except possibly the last.
    """
    blocks = list(torch.split(stream, block_size))
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    return blocks
