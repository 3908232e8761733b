"""Text corpora packed into fixed-length blocks, with optional memorization probes.

Any corpus that ``datasets`` streams works: a hub name, or local ``.txt`` (one document per line), ``.json`` /
``.jsonl`` (documents in ``text_field``) and ``.parquet`` files, the text formats also compressed (``.gz``,
``.bz2``, ``.xz``, ``.zst``, ``.lz4``: e.g. ``.jsonl.gz``, ``.json.zst``). Documents are tokenized with
``transformers.AutoTokenizer`` (a hub name or a local directory), joined with EOS after every document
(``separator="eos"``) or with nothing between them (``"none"``), and cut into blocks of ``block_size`` tokens.
Held-out text comes from ``validation_files`` / ``validation_split`` or a seeded fraction of the documents.

Probes (duplicated passages, canaries) measure verbatim memorization as in Merullo et al., *From Memorization
to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256, 2025): each probe is a row of its own,
inserted ``probe_repeats`` times into training; at evaluation the model is prompted with its first
``prefix_len`` tokens (paper: 64) and greedily continues ``suffix_len`` tokens (paper: 48).

Bounded reading: the corpus is never loaded whole. A hub data set is streamed (``load_dataset(...,
streaming=True)``) and local files are streamed one at a time, in the order given; a file is opened only when
every earlier one has been used up. Documents are tokenized as they are read and the budgets are applied while
reading: ``max_documents`` (rows read), ``max_tokens`` (training tokens) and ``heldout_max_tokens`` (held-out
tokens) cut the token streams exactly, and reading stops as soon as the training budget is met, so the rest of
the corpus (further shards, further hub files) is never opened. Tokenizer calls take a few documents at a time,
fewer as the budget nears, so only a handful of documents past the budget are ever read.

Held-out documents of a corpus without ``validation_files`` / ``validation_split`` are chosen by
:func:`is_heldout`, a seeded hash of the document's row index: the split needs no count of the documents, is
disjoint from training, and a document stays on its side whatever the budgets.

The packed blocks stream straight into Arrow files named by the settings' digest (a remainder is carried across
documents, so every block is full but the last, which is kept when it has at least 2 tokens).
:meth:`TextDataModule.prepare_data` writes them and a small JSON manifest (the shared cache of
:class:`~lightning_curv.data.lm.LMRowsDataModule`, keyed by the files' path, size and mtime, the tokenizer's
content and the settings); :meth:`TextDataModule.setup` only memory-maps those files (DDP-safe).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
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
from lightning_curv.utils import atomic_path, row_seed, stream_seed

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

#: Bump when the cached content changes for the same settings (invalidates old caches).
FORMAT_VERSION = 3

#: ``datasets`` builder for each local file format (the extension before any compression suffix).
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
#: Compression suffixes that ``datasets`` decompresses while streaming, and the package each one needs.
COMPRESSIONS = {
    ".gz": None,
    ".gzip": None,
    ".bz2": None,
    ".xz": None,
    ".zst": "zstandard",
    ".zstd": "zstandard",
    ".lz4": "lz4",
}
#: How documents are joined before packing: EOS after every document, or nothing between them.
SEPARATORS = ("eos", "none")

#: Most documents tokenized per tokenizer call.
_TOKENIZE_CHUNK = 1000
#: Blocks buffered before they are written to the Arrow file as one record batch.
_WRITE_ROWS = 1024
#: Purpose of the held-out draw in :func:`~lightning_curv.utils.stream_seed`.
_HELDOUT_STREAM = 0x4E1D
#: Column of the token ids in the packed blocks.
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


def _format_and_compression(path: str) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-1] if suffixes else ""), compression


def builder_for(files: Sequence[str]) -> str:
    """Return the ``datasets`` builder (``text``, ``json``, ``parquet``) for local files of one format.

    Args:
        files: Local file paths, optionally compressed (``corpus.jsonl.gz``, ``shard.json.zst``).

    Returns:
        The builder name.

    Raises:
        ValueError: If an extension is not supported, a parquet file is compressed or the files mix formats.
        ImportError: If a compression needs a package that is not installed (``zstandard`` for ``.zst``).
    """
    builders = set()
    for f in files:
        ext, compression = _format_and_compression(f)
        if ext not in BUILDERS or (ext == ".parquet" and compression is not None):
            raise ValueError(
                f"Unsupported data file {f!r}: expected one of {sorted(BUILDERS)}, the text formats optionally "
                f"compressed ({', '.join(COMPRESSIONS)})."
            )
        package = COMPRESSIONS.get(compression or "")
        if package is not None and importlib.util.find_spec(package) is None:
            raise ImportError(f"Reading {f!r} needs the `{package}` package: pip install {package}.")
        builders.add(BUILDERS[ext])
    if len(builders) > 1:
        raise ValueError(f"Data files mix formats ({sorted(builders)}); use one format per file list.")
    return builders.pop()


def is_heldout(index: int, fraction: float, seed: int) -> bool:
    """Whether row ``index`` of a corpus is held out (a seeded hash: no count of the rows is needed).

    Args:
        index: Position of the row in the corpus (blank rows count).
        fraction: Probability that a row is held out.
        seed: Seed of the draw.

    Returns:
        True for about ``fraction`` of the rows, always the same ones for a seed.
    """
    return row_seed(stream_seed(seed, _HELDOUT_STREAM), index) < fraction * 2**63


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


class BlockWriter:
    """Cut a token stream into blocks of ``block_size`` tokens and append them to an Arrow file as they fill.

    The stream is cut at ``budget`` tokens. :meth:`close` keeps a last short block when it has at least 2 tokens
    (one next-token target), so the blocks concatenate back to the stream up to a dropped single last token.
    The file is an Arrow stream with one column ``input_ids`` (``list<int64>``), as ``datasets`` writes it.

    Args:
        path: The Arrow file to write.
        block_size: Tokens per block.
        budget: Most tokens taken from the stream (None: all).
    """

    def __init__(self, path: str | os.PathLike, block_size: int, budget: int | None = None) -> None:
        import pyarrow as pa

        self.block_size = block_size
        self.budget = budget
        self.num_tokens = 0
        self.num_blocks = 0
        self._carry = np.zeros(0, dtype=np.int64)  # tokens not yet in a full block
        self._blocks: list[np.ndarray] = []  # full blocks not yet written
        self._schema = pa.schema([pa.field(TOKENS, pa.list_(pa.int64()))])
        self._writer = pa.ipc.new_stream(str(path), self._schema)
        self._closed = False

    @property
    def remaining(self) -> int | None:
        """Tokens the budget still takes (None: no budget)."""
        return None if self.budget is None else self.budget - self.num_tokens

    @property
    def full(self) -> bool:
        """Whether the budget is met."""
        return self.budget is not None and self.num_tokens >= self.budget

    def add(self, ids: Sequence[int]) -> int:
        """Append token ids to the stream (cut at the budget) and write the blocks they complete.

        Args:
            ids: Token ids of one document (separator included).

        Returns:
            The number of tokens taken.
        """
        if self.remaining is not None:
            ids = ids[: self.remaining]
        stream = np.concatenate([self._carry, np.asarray(ids, dtype=np.int64)])
        num_full = len(stream) // self.block_size
        self._blocks += list(stream[: num_full * self.block_size].reshape(num_full, self.block_size))
        self._carry = stream[num_full * self.block_size :]
        self.num_tokens += len(ids)
        if len(self._blocks) >= _WRITE_ROWS:
            self._flush()
        return len(ids)

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._blocks:
            return
        lengths = np.array([len(b) for b in self._blocks], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(self._blocks)))
        self._writer.write_batch(pa.record_batch([column], schema=self._schema))
        self.num_blocks += len(self._blocks)
        self._blocks = []

    def close(self, discard: bool = False) -> None:
        """Write the last short block (when it has at least 2 tokens) and close the file; later calls do nothing.

        Args:
            discard: Close without writing what is buffered (the file is being thrown away).
        """
        if self._closed:
            return
        self._closed = True
        if not discard:
            if len(self._carry) >= 2:
                self._blocks.append(self._carry)
            self._flush()
        self._writer.close()


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
        data_files: Local training files or glob patterns (``.txt``, ``.json``/``.jsonl``, ``.parquet``; the
            text formats also compressed, e.g. ``.jsonl.gz``, ``.json.zst``). They are read in the order given
            (each pattern's matches sorted), and a file is opened only when the budgets need it.
        validation_files: Local held-out files; without them (and without ``validation_split``) a seeded
            ``heldout_fraction`` of the documents is held out.
        split: Split of the hub data set used for training.
        validation_split: Split of the hub data set used as held-out text.
        text_field: Column holding the text (``.txt`` files always use ``text``).
        heldout_fraction: Fraction of documents held out when no held-out files or split are given.
        max_documents: Read at most this many rows of the training corpus (the first ones; blank rows and the
            documents held out by ``heldout_fraction`` count).
        max_tokens: Stop reading once the training blocks hold this many tokens (the last document is cut).
        heldout_max_tokens: Take at most this many held-out tokens (from ``validation_files`` /
            ``validation_split``, or from the documents held out of the training corpus).
        separator: ``"eos"`` appends EOS after every document before packing; ``"none"`` packs documents
            back to back (the paper's OLMo-2 setting).
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
        max_tokens: int | None = None,
        heldout_max_tokens: int | None = None,
        separator: Literal["eos", "none"] = "eos",
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
        self.max_tokens = max_tokens
        self.heldout_max_tokens = heldout_max_tokens
        self.separator = separator
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
            (self.max_tokens is None or self.max_tokens >= 2, "max_tokens must be >= 2 or None."),
            (
                self.heldout_max_tokens is None or self.heldout_max_tokens >= 2,
                "heldout_max_tokens must be >= 2 or None.",
            ),
            (self.separator in SEPARATORS, f"separator must be one of {SEPARATORS}, got {self.separator!r}."),
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
            "max_tokens": self.max_tokens,
            "heldout_max_tokens": self.heldout_max_tokens,
            "separator": self.separator,
            "block_size": self.block_size,
            "seed": self.seed,
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "probes_file": _file_fingerprint(resolve_files(self.probes_file)),
        }

    def blocks_path(self, split: Literal["train", "heldout"]) -> Path:
        """Arrow file of the packed blocks of ``split`` for the current settings (next to the manifest)."""
        return self.cache_path.with_name(f"{self.cache_path.stem}-{split}.arrow")

    # --- bounded reading

    def _read_rows(self, files: list[str], hub_split: str | None, opened: list[str]) -> Iterator[Any]:
        """Yield the text of every row, in order, of local files (one format) or of a streamed hub split.

        A local file is opened only when the rows of the earlier ones are used up; its path is then appended to
        ``opened``. Nothing is read ahead of what the caller asks for.

        Raises:
            ValueError: If a file is empty or unreadable, or the rows have no text column.
        """
        import datasets

        cache = os.path.join(self.cache_dir, "datasets")
        if not files:
            source = f"dataset {self.dataset!r} split {hub_split!r}"
            rows = datasets.load_dataset(
                self.dataset, self.dataset_config, split=hub_split, streaming=True, cache_dir=cache
            )
            yield from _texts(rows, self.text_field, source)
            return
        builder = builder_for(files)
        column = "text" if builder == "text" else self.text_field
        for path in files:
            opened.append(path)
            if os.path.getsize(path) == 0:
                raise ValueError(f"Data file {path!r} is empty.")
            count = 0
            try:
                rows = datasets.load_dataset(
                    builder, data_files={"data": [path]}, split="data", streaming=True, cache_dir=cache
                )
                for text in _texts(rows, column, f"data file {path!r}"):
                    count += 1
                    yield text
            except _MissingColumn:
                raise
            except StopIteration:  # datasets found no first row to infer the columns from: count stays 0
                pass
            except Exception as e:  # any reader error (bad gzip, bad JSON): say which file it was
                raise ValueError(f"Could not read data file {path!r}: {type(e).__name__}: {e}") from e
            if count == 0:
                raise ValueError(f"Data file {path!r} is empty: it holds no row.")

    def _pack_stream(self, texts: Iterator[Any], writers: dict[str, BlockWriter], max_rows: int | None) -> list[int]:
        """Tokenize documents as they are read and pack them, stopping as soon as the budgets are met.

        With two writers (``train`` then ``heldout``), row ``i`` goes to held-out when :func:`is_heldout` says so;
        with one, every document goes to it. Reading stops after ``max_rows`` rows or when the first writer is
        full; held-out documents past a full held-out writer are skipped untokenized. Documents are tokenized a
        chunk at a time, the chunk sized so that it is unlikely to run past the first writer's budget (about half
        the remaining budget at the mean document length so far), so hardly any row past the budget is read.

        Returns:
            The number of documents that gave tokens to each writer, in the writers' order.
        """
        names = list(writers)
        primary = writers[names[0]]
        eos = [self.tokenizer.eos_token_id] if self.separator == "eos" else []
        used = dict.fromkeys(names, 0)
        pending: list[tuple[str, str]] = []
        seen = {"documents": 0, "tokens": 0}

        def tokenize_pending() -> None:
            texts_ = [text for _, text in pending]
            ids = self.tokenizer(texts_, add_special_tokens=False, verbose=False)[TOKENS] if texts_ else []
            for (name, _), doc in zip(pending, ids, strict=True):
                if primary.full:  # what follows would not have been read: keep the result chunking-free
                    break
                seen["documents"] += 1
                seen["tokens"] += len(doc) + len(eos)
                if not writers[name].full and writers[name].add([*doc, *eos]) > 0:
                    used[name] += 1
            pending.clear()

        def chunk_size() -> int:
            if primary.remaining is None:
                return _TOKENIZE_CHUNK
            if seen["documents"] == 0:
                return 1
            mean = seen["tokens"] / seen["documents"]
            return int(min(_TOKENIZE_CHUNK, max(1, primary.remaining // (2 * mean))))

        rows = iter(texts)
        index = 0
        while not primary.full and (max_rows is None or index < max_rows):
            text = next(rows, _END)
            if text is _END:
                break
            name = names[0]
            if len(names) == 2 and is_heldout(index, self.heldout_fraction, self.seed):
                name = names[1]
            index += 1
            if _is_document(text) and not writers[name].full:
                pending.append((name, text))
                if len(pending) >= chunk_size():
                    tokenize_pending()
        tokenize_pending()
        return [used[name] for name in names]

    def pack_corpus(self) -> dict[str, Any]:
        """Read the corpus within the budgets, tokenize it and pack it into :meth:`blocks_path` of each split.

        Returns:
            The manifest entries: numbers of documents and tokens of each split, the local files opened.

        Raises:
            FileNotFoundError: If a data file is missing.
            ValueError: If a file is empty or unreadable, the corpus is empty, or no document is held out.
        """
        train_files, heldout_files = resolve_files(self.data_files), resolve_files(self.validation_files)
        separate = bool(heldout_files) or self.validation_split is not None
        source = f"data_files {train_files}" if train_files else f"dataset {self.dataset!r} split {self.split!r}"
        opened: list[str] = []
        with contextlib.ExitStack() as stack:
            paths = {s: stack.enter_context(atomic_path(self.blocks_path(s))) for s in ("train", "heldout")}
            train = BlockWriter(paths["train"], self.block_size, self.max_tokens)
            heldout = BlockWriter(paths["heldout"], self.block_size, self.heldout_max_tokens)
            stack.callback(train.close, discard=True)
            stack.callback(heldout.close, discard=True)
            writers = {"train": train} if separate else {"train": train, "heldout": heldout}
            # closing(): a file left half-read at the budget is closed now, not when garbage-collected.
            with contextlib.closing(self._read_rows(train_files, self.split, opened)) as rows:
                counts = self._pack_stream(rows, writers, self.max_documents)
            num_train, num_heldout = counts[0], (0 if separate else counts[1])
            if num_train + num_heldout == 0:
                raise ValueError(f"The corpus ({source}) is empty: it holds no non-blank document.")
            if separate:
                with contextlib.closing(self._read_rows(heldout_files, self.validation_split, opened)) as rows:
                    (num_heldout,) = self._pack_stream(rows, {"heldout": heldout}, None)
                if num_heldout == 0:
                    raise ValueError(f"The held-out corpus ({heldout_files or self.validation_split}) is empty.")
            elif num_train + num_heldout == 1:
                raise ValueError(
                    f"The corpus ({source}) has a single document, so none can be held out; "
                    "give `validation_files` or more documents."
                )
            elif num_heldout == 0 or num_train == 0:
                empty = "held-out" if num_heldout == 0 else "training"
                raise ValueError(
                    f"heldout_fraction={self.heldout_fraction} left the {empty} split of {source} empty "
                    f"({num_train + num_heldout} documents read); change it, read more "
                    "documents, or give `validation_files` / `validation_split`."
                )
            train.close()
            heldout.close()
        return {
            "num_train_documents": num_train,
            "num_heldout_documents": num_heldout,
            "num_train_tokens": train.num_tokens,
            "num_heldout_tokens": heldout.num_tokens,
            "files_read": opened,
        }

    def _probe_texts(self) -> list[str]:
        return read_probes(self.probes_file, self.text_field) if self.probes_file is not None else []

    @override
    def _create_cache(self) -> dict[str, Any]:
        """Read, tokenize and pack the corpus into :meth:`blocks_path` of each split; return the manifest."""
        stats = self.pack_corpus()
        probes = []
        if self.probes_file is not None:
            probes = self.tokenizer(self._probe_texts(), add_special_tokens=False, verbose=False)[TOKENS]
        return {"config": self.cache_config, **stats, "probes": probes}

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


#: End of a row iterator (``next(rows, _END)``).
_END = object()


class _MissingColumn(ValueError):
    """The rows have no text column (raised as is, not wrapped as an unreadable file)."""


def _texts(rows: Any, column: str, source: str) -> Iterator[Any]:
    """Yield ``row[column]`` of each row of an iterable ``datasets`` split, checking the column on the first."""
    for i, row in enumerate(rows):
        if i == 0 and column not in row:
            raise _MissingColumn(
                f"The rows of {source} have no column {column!r} (columns: {sorted(row)}); set `text_field`."
            )
        yield row[column]


def _is_document(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _list_lengths(column: Any) -> np.ndarray:
    """Lengths of the rows of an Arrow list column, as an int array (no Python list of the values)."""
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False)
