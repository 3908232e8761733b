import builtins
import gzip
import importlib.util
import json
import os
import zlib

import pytest
import torch

from lightning_curv.data import EvalSet, TextDataModule
from lightning_curv.data.collate import IGNORE_INDEX
from lightning_curv.data.text import BlockWriter, is_heldout

WORDS = [f"w{i}" for i in range(60)]
DOCS = [f"doc{i} starts " + " ".join(WORDS[(7 * i + j) % 60] for j in range(3 + i % 17)) for i in range(120)]
VALIDATION = [" ".join(WORDS[(3 * i + j) % 60] for j in range(10)) for i in range(10)]


def probe_text(i: int, length: int = 130) -> str:
    return " ".join(WORDS[(5 * i + 3 * j) % 60] for j in range(length))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer trained offline on the test vocabulary, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS + WORDS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_probes(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def make(tmp_path, tokenizer_dir, **kwargs) -> TextDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if "data_files" not in kwargs:
        kwargs["data_files"] = write_lines(tmp_path / "corpus.txt", DOCS)
    dm = TextDataModule(tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def tokens_of(hf_tokenizer, docs) -> list[int]:
    out = []
    for d in docs:
        out += hf_tokenizer(d, add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]
    return out


def test_blocks_concatenate_to_the_tokenized_corpus(tmp_path, tokenizer_dir, hf_tokenizer):
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    dm = make(tmp_path, tokenizer_dir, validation_files=validation, block_size=16)
    train = [dm.train_dataset[i]["input_ids"] for i in range(len(dm.train_dataset))]
    assert all(len(b) == 16 for b in train[:-1]) and 2 <= len(train[-1]) <= 16
    assert torch.cat(train).tolist() == tokens_of(hf_tokenizer, DOCS)
    heldout = [dm.heldout_dataset[i]["input_ids"] for i in range(len(dm.heldout_dataset))]
    assert torch.cat(heldout).tolist() == tokens_of(hf_tokenizer, VALIDATION)
    assert [dm.train_dataset[i]["index"] for i in range(len(train))] == list(range(len(train)))


def written_blocks(tmp_path, block_size, budget, pieces) -> list[list[int]]:
    import datasets

    writer = BlockWriter(tmp_path / "blocks.arrow", block_size, budget)
    taken = [writer.add(piece) for piece in pieces]
    writer.close()
    writer.close()  # a second close does nothing
    rows = datasets.Dataset.from_file(str(tmp_path / "blocks.arrow"))["input_ids"]
    assert writer.num_blocks == len(rows) and writer.num_tokens == sum(taken)
    return rows


def test_block_writer_carries_across_documents_and_drops_only_a_single_trailing_token(tmp_path):
    assert written_blocks(tmp_path, 4, None, [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9]]) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert written_blocks(tmp_path, 4, None, [list(range(9))]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # The budget cuts the stream exactly, in the middle of a document.
    assert written_blocks(tmp_path, 4, 6, [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9]]) == [[0, 1, 2, 3], [4, 5]]
    assert written_blocks(tmp_path, 4, None, []) == []


def test_heldout_fraction_splits_documents_by_seed(tmp_path, tokenizer_dir, hf_tokenizer):

    def split(dm):
        stream = lambda ds: torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()  # noqa: E731
        return stream(dm.train_dataset), stream(dm.heldout_dataset)

    a = make(tmp_path / "a", tokenizer_dir, heldout_fraction=0.1, seed=0, block_size=32)
    b = make(tmp_path / "b", tokenizer_dir, heldout_fraction=0.1, seed=0, block_size=32)
    c = make(tmp_path / "c", tokenizer_dir, heldout_fraction=0.1, seed=1, block_size=32)
    train, heldout = split(a)
    # Row i is held out when is_heldout(i) says so (a seeded hash, no count needed); both keep file order.
    held = [is_heldout(i, 0.1, 0) for i in range(len(DOCS))]
    assert 3 <= sum(held) <= 25
    assert heldout == tokens_of(hf_tokenizer, [d for d, h in zip(DOCS, held, strict=True) if h])
    assert train == tokens_of(hf_tokenizer, [d for d, h in zip(DOCS, held, strict=True) if not h])
    assert json.loads(a.cache_path.read_text())["num_heldout_documents"] == sum(held)
    assert split(a) == split(b)
    assert split(a)[1] != split(c)[1]


def test_is_heldout_is_a_seeded_fraction():
    draws = [is_heldout(i, 0.05, 3) for i in range(20_000)]
    assert abs(sum(draws) / len(draws) - 0.05) < 0.01
    assert draws == [is_heldout(i, 0.05, 3) for i in range(20_000)]
    assert draws != [is_heldout(i, 0.05, 4) for i in range(20_000)]
    # A larger fraction holds out a superset: the draw of a row does not depend on the fraction.
    assert all(is_heldout(i, 0.2, 3) for i in range(20_000) if draws[i])


def test_jsonl_and_parquet_files_give_the_same_tokens(tmp_path, tokenizer_dir):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    a = make(tmp_path / "a", tokenizer_dir, data_files=str(jsonl), text_field="body", validation_files=validation)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "corpus.parquet")
    b = make(
        tmp_path / "b",
        tokenizer_dir,
        data_files=str(tmp_path / "corpus.parquet"),
        text_field="body",
        validation_files=validation,
    )
    c = make(tmp_path / "c", tokenizer_dir, validation_files=validation)  # .txt lines
    rows = lambda dm: [dm.train_dataset[i]["input_ids"].tolist() for i in range(len(dm.train_dataset))]  # noqa: E731
    assert rows(a) == rows(b) == rows(c)
    with pytest.raises(ValueError, match="corpus.jsonl.* have no column 'text'"):
        make(tmp_path / "d", tokenizer_dir, data_files=str(jsonl))


def test_probes_are_inserted_as_their_own_rows(tmp_path, tokenizer_dir, hf_tokenizer):
    probes = [probe_text(i, 100 + 10 * i) for i in range(5)]
    dm = make(
        tmp_path,
        tokenizer_dir,
        probes_file=write_probes(tmp_path / "probes.jsonl", probes),
        probe_repeats=3,
        block_size=128,
        prefix_len=16,
        suffix_len=8,
    )
    assert len(dm.train_dataset) == dm.num_train_blocks + 5 * 3
    for j, probe in enumerate(probes):
        expected = hf_tokenizer(probe, add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]
        assert len(dm.probe_row_indices[j]) == 3
        for row in dm.probe_row_indices[j]:
            assert dm.train_dataset[row]["input_ids"].tolist() == expected[:128]
            assert dm.train_dataset[row]["index"] == row
    # Probe rows differ in length: the collated batch pads them with labels -100.
    probe_rows = [dm.train_dataset[i] for i in range(dm.num_train_blocks, len(dm.train_dataset))]
    from lightning_curv.data.collate import pad_lm_batch

    batch = pad_lm_batch(probe_rows, dm.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    assert torch.equal(batch["labels"] == IGNORE_INDEX, batch["attention_mask"] == 0)


def test_probe_generation_batches(tmp_path, tokenizer_dir, hf_tokenizer):
    probes = [probe_text(i) for i in range(7)]
    dm = make(
        tmp_path,
        tokenizer_dir,
        probes_file=write_probes(tmp_path / "p.jsonl", probes),
        prefix_len=64,
        suffix_len=48,
    )
    assert dm.eval_sets == [
        EvalSet("heldout", "perplexity"),
        EvalSet("probes_selection", "text_memorization", split="selection"),
        EvalSet("probes_test", "text_memorization", split="test"),
    ]
    loaders = dm.val_dataloader()
    assert len(loaders) == 3 and len(dm.test_dataloader()) == 3
    assert "input_ids" in next(iter(loaders[0]))
    sel, test = next(iter(loaders[1])), next(iter(loaders[2]))
    seen = sel["index"].tolist() + test["index"].tolist()
    assert sorted(seen) == list(range(7)) and set(sel["index"].tolist()).isdisjoint(test["index"].tolist())
    for batch in (sel, test):
        assert batch["prompt_ids"].shape[1] == 64 and batch["target_ids"].shape[1] == 48
        for row, i in enumerate(batch["index"].tolist()):
            ids = hf_tokenizer(probes[i], add_special_tokens=False)["input_ids"]
            assert batch["prompt_ids"][row].tolist() == ids[:64]
            assert batch["target_ids"][row].tolist() == ids[64:112]


def test_short_probe_is_a_clear_error(tmp_path, tokenizer_dir):
    probes = [probe_text(0), "w1 w2 w3", probe_text(2)]
    with pytest.raises(ValueError, match=r"Probe 1 .* has 3 tokens.*prefix_len \+ suffix_len") as info:
        make(tmp_path, tokenizer_dir, probes_file=write_probes(tmp_path / "p.jsonl", probes))
    assert "lower prefix_len" in str(info.value)


def test_probes_from_text_lines(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "probes.txt", [probe_text(0), "", probe_text(1)])
    dm = make(tmp_path, tokenizer_dir, probes_file=path, probe_repeats=0)
    assert len(dm.train_dataset) == dm.num_train_blocks  # evaluated, never trained on
    assert len(dm.memorization_selection_dataset) + len(dm.memorization_test_dataset) == 2


def test_memorization_from_train_blocks(tmp_path, tokenizer_dir):
    dm = make(tmp_path, tokenizer_dir, memorization_from_train=6, block_size=32, prefix_len=20, suffix_len=10)
    assert [s.name for s in dm.eval_sets] == ["heldout", "train_selection", "train_test"]
    rows = [dm.memorization_selection_dataset[i] for i in range(3)] + [
        dm.memorization_test_dataset[i] for i in range(3)
    ]
    assert len({r["index"] for r in rows}) == 6
    for r in rows:
        block = dm.train_dataset[r["index"]]["input_ids"].tolist()
        assert r["prompt_ids"].tolist() == block[:20] and r["target_ids"].tolist() == block[20:30]
    with pytest.raises(ValueError, match="block_size"):
        TextDataModule(tokenizer=tokenizer_dir, data_files="x.txt", memorization_from_train=2, block_size=32)
    with pytest.raises(ValueError, match="0 or >= 2"):
        TextDataModule(tokenizer=tokenizer_dir, data_files="x.txt", memorization_from_train=1)
    with pytest.raises(ValueError, match="not both"):
        TextDataModule(tokenizer=tokenizer_dir, data_files="x.txt", memorization_from_train=2, probes_file="p.txt")


def test_missing_files_name_the_path(tmp_path, tokenizer_dir):
    missing = str(tmp_path / "nope" / "corpus.txt")
    dm = TextDataModule(tokenizer=tokenizer_dir, data_files=missing, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nope/corpus.txt"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="matches nothing|does not exist"):
        make(tmp_path, tokenizer_dir, data_files=str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing_probes.jsonl"):
        make(tmp_path, tokenizer_dir, probes_file=str(tmp_path / "missing_probes.jsonl"))


def test_empty_corpus_and_bad_settings(tmp_path, tokenizer_dir):
    empty = write_lines(tmp_path / "empty.txt", ["", "   ", ""])
    with pytest.raises(ValueError, match="empty"):
        make(tmp_path, tokenizer_dir, data_files=empty)
    single = write_lines(tmp_path / "single.txt", [DOCS[0]])
    with pytest.raises(ValueError, match="single document"):
        make(tmp_path, tokenizer_dir, data_files=single)
    with pytest.raises(ValueError, match="exactly one"):
        TextDataModule(tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="exactly one"):
        TextDataModule(tokenizer=tokenizer_dir, dataset="some/corpus", data_files="a.txt")
    with pytest.raises(ValueError, match="Unsupported data file"):
        make(tmp_path, tokenizer_dir, data_files=write_lines(tmp_path / "corpus.csv", DOCS))


def test_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer_dir, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    first = make(tmp_path, tokenizer_dir, data_files=write_lines(corpus, DOCS))
    first_path = first.cache_path
    assert first_path.exists() and first.blocks_path("train").exists()

    real = TextDataModule.pack_corpus

    def fail(self):
        raise AssertionError("pack_corpus() must not run when the cache exists")

    monkeypatch.setattr(TextDataModule, "pack_corpus", fail)
    second = make(tmp_path, tokenizer_dir, data_files=str(corpus))
    assert second.cache_path == first_path
    stream = lambda dm: torch.cat([dm.train_dataset[i]["input_ids"] for i in range(len(dm.train_dataset))]).tolist()  # noqa: E731
    assert stream(second) == stream(first)
    # Another block size packs again (the corpus is read and tokenized again: nothing of it is cached but blocks).
    monkeypatch.setattr(TextDataModule, "pack_corpus", real)
    repacked = make(tmp_path, tokenizer_dir, data_files=str(corpus), block_size=64)
    assert repacked.cache_path != first_path and stream(repacked) == stream(first)
    assert len(repacked.train_dataset) > len(first.train_dataset)
    # Editing the corpus changes the key, so the stale cache is not used.
    monkeypatch.setattr(TextDataModule, "pack_corpus", fail)
    write_lines(corpus, DOCS[:50])
    os.utime(corpus, ns=(1, 1))
    third = TextDataModule(tokenizer=tokenizer_dir, data_files=str(corpus), cache_dir=str(tmp_path / "cache"))
    assert third.cache_path != first_path
    with pytest.raises(AssertionError, match="must not run"):
        third.prepare_data()
    monkeypatch.setattr(TextDataModule, "pack_corpus", real)
    fresh = TextDataModule(tokenizer=tokenizer_dir, data_files=str(corpus), cache_dir=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        fresh.setup()


def test_loaders_carry_index_and_collect_is_ordered(tmp_path, tokenizer_dir):
    dm = make(tmp_path, tokenizer_dir, block_size=16, batch_size=4, eval_batch_size=5)
    collected = torch.cat([b["index"] for b in dm.collect_dataloader()]).tolist()
    assert collected == list(range(len(dm.train_dataset)))
    shuffled = torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()
    assert sorted(shuffled) == collected and shuffled != collected
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 16)
    assert dm.vocab_size == len(dm.tokenizer)


def test_init_is_a_cli_schema():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_args(["--data.tokenizer=some/tokenizer", "--data.data_files=[a.txt,b.jsonl]"])
    assert cfg.data.data_files == ["a.txt", "b.jsonl"]
    assert (cfg.data.prefix_len, cfg.data.suffix_len) == (64, 48)


# --- bounded corpora: budgets applied while reading, compressed shards, hub streaming


def write_jsonl_gz(path, docs) -> str:
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def write_corrupt_gzip(path) -> str:
    """A gzip header followed by bytes that are no deflate stream: reading it raises."""
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xffnot deflate data" * 64)
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(path.read_bytes())
    return str(path)


def blocks_by_hand(stream: list[int], block_size: int) -> list[list[int]]:
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return [b for b in blocks if len(b) >= 2]


def rows_of(dataset) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


def record_opened(monkeypatch, folder) -> list[str]:
    """Patch open() to record the files of ``folder`` that are opened (gzip, fsspec and datasets all use it)."""
    opened, real_open, folder = [], builtins.open, str(folder)

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(folder):
            opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    return opened


@pytest.fixture
def shards(tmp_path):
    """Six .jsonl.gz shards: the first holds DOCS[:60], the other five are corrupt."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl_gz(folder / "part-0.jsonl.gz", DOCS[:60])
    for k in range(1, 6):
        write_corrupt_gzip(folder / f"part-{k}.jsonl.gz")
    return folder


def test_budget_inside_the_first_shard_opens_only_that_shard(
    tmp_path, shards, tokenizer_dir, hf_tokenizer, monkeypatch
):
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    max_tokens = len(tokens_of(hf_tokenizer, DOCS[:30])) + 5  # cuts document 30
    opened = record_opened(monkeypatch, shards)
    dm = make(
        tmp_path / "a",
        tokenizer_dir,
        data_files=str(shards / "*.jsonl.gz"),
        validation_files=validation,
        max_tokens=max_tokens,
        block_size=16,
    )
    first = str(shards / "part-0.jsonl.gz")
    assert set(opened) == {first}
    manifest = json.loads(dm.cache_path.read_text())
    assert manifest["files_read"] == [first, os.path.abspath(validation)]
    assert manifest["num_train_tokens"] == max_tokens and manifest["num_train_documents"] == 31
    stream = tokens_of(hf_tokenizer, DOCS[:60])[:max_tokens]
    assert rows_of(dm.train_dataset) == blocks_by_hand(stream, 16)
    assert rows_of(dm.heldout_dataset) == blocks_by_hand(tokens_of(hf_tokenizer, VALIDATION), 16)
    # Without a budget the second shard is read, and its error names it.
    with pytest.raises(ValueError, match=r"part-1\.jsonl\.gz"):
        make(tmp_path / "b", tokenizer_dir, data_files=str(shards / "*.jsonl.gz"), validation_files=validation)


def test_budget_with_documents_held_out_of_the_stream(tmp_path, shards, tokenizer_dir, hf_tokenizer, monkeypatch):
    max_tokens, heldout_max_tokens = 200, 30
    opened = record_opened(monkeypatch, shards)
    dm = make(
        tmp_path,
        tokenizer_dir,
        data_files=[str(shards / f"part-{k}.jsonl.gz") for k in range(6)],
        heldout_fraction=0.2,
        max_tokens=max_tokens,
        heldout_max_tokens=heldout_max_tokens,
        block_size=16,
    )
    assert set(opened) == {str(shards / "part-0.jsonl.gz")}
    # By hand: row i is held out when is_heldout says so; reading stops once training holds max_tokens tokens.
    train, heldout = [], []
    for i, doc in enumerate(DOCS[:60]):
        if len(train) >= max_tokens:
            break
        (heldout if is_heldout(i, 0.2, 0) else train).extend(tokens_of(hf_tokenizer, [doc]))
    assert len(heldout) > heldout_max_tokens  # the held-out budget binds too
    assert rows_of(dm.train_dataset) == blocks_by_hand(train[:max_tokens], 16)
    assert rows_of(dm.heldout_dataset) == blocks_by_hand(heldout[:heldout_max_tokens], 16)


def test_separator_none_packs_documents_back_to_back(tmp_path, tokenizer_dir, hf_tokenizer):
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    dm = make(tmp_path, tokenizer_dir, validation_files=validation, separator="none", block_size=16)
    bare = lambda docs: [t for d in docs for t in hf_tokenizer(d, add_special_tokens=False)["input_ids"]]  # noqa: E731
    assert rows_of(dm.train_dataset) == blocks_by_hand(bare(DOCS), 16)
    assert rows_of(dm.heldout_dataset) == blocks_by_hand(bare(VALIDATION), 16)
    assert hf_tokenizer.eos_token_id not in torch.cat([dm.train_dataset[i]["input_ids"] for i in range(5)])
    with pytest.raises(ValueError, match="separator"):
        TextDataModule(tokenizer=tokenizer_dir, data_files="x.txt", separator="newline")


def test_heldout_max_tokens_caps_validation_files(tmp_path, tokenizer_dir, hf_tokenizer, monkeypatch):
    # Compressed text files too; the budget fits in the first validation file, so the corrupt second one is unread.
    val = tmp_path / "val"
    val.mkdir()
    with gzip.open(val / "a.txt.gz", "wt") as f:
        f.write("\n".join(VALIDATION) + "\n")
    write_corrupt_gzip(val / "b.txt.gz")
    opened = record_opened(monkeypatch, val)
    dm = make(tmp_path, tokenizer_dir, validation_files=str(val / "*.txt.gz"), heldout_max_tokens=25, block_size=8)
    assert set(opened) == {str(val / "a.txt.gz")}
    assert rows_of(dm.heldout_dataset) == blocks_by_hand(tokens_of(hf_tokenizer, VALIDATION)[:25], 8)
    assert rows_of(dm.train_dataset) == blocks_by_hand(tokens_of(hf_tokenizer, DOCS), 8)


def test_max_documents_counts_rows_read(tmp_path, tokenizer_dir, hf_tokenizer):
    lines = [line for d in DOCS[:10] for line in (d, "")]
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    dm = make(
        tmp_path,
        tokenizer_dir,
        data_files=write_lines(tmp_path / "c.txt", lines),
        validation_files=validation,
        max_documents=5,
        block_size=16,
    )
    assert rows_of(dm.train_dataset) == blocks_by_hand(tokens_of(hf_tokenizer, DOCS[:3]), 16)


def test_empty_data_file_is_named(tmp_path, tokenizer_dir):
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is empty"):
        make(tmp_path / "a", tokenizer_dir, data_files=str(empty), validation_files=validation)
    good = write_jsonl_gz(tmp_path / "good.jsonl.gz", DOCS[:5])
    hollow = write_jsonl_gz(tmp_path / "hollow.jsonl.gz", [])  # a valid gzip stream of nothing
    with pytest.raises(ValueError, match=r"hollow\.jsonl\.gz' is empty"):
        make(tmp_path / "b", tokenizer_dir, data_files=[good, hollow], validation_files=validation)
    with pytest.raises(ValueError, match=r"hollow\.jsonl\.gz' is empty"):
        make(tmp_path / "c", tokenizer_dir, data_files=good, validation_files=hollow)


def test_compressed_formats_give_the_same_blocks(tmp_path, tokenizer_dir):
    validation = write_lines(tmp_path / "val.txt", VALIDATION)
    plain = make(tmp_path / "a", tokenizer_dir, validation_files=validation, block_size=16)
    gz = make(
        tmp_path / "b",
        tokenizer_dir,
        data_files=write_jsonl_gz(tmp_path / "c.jsonl.gz", DOCS),
        validation_files=validation,
        block_size=16,
    )
    assert rows_of(gz.train_dataset) == rows_of(plain.train_dataset)
    from lightning_curv.data.text import builder_for

    with pytest.raises(ValueError, match="Unsupported data file"):
        builder_for(["corpus.parquet.gz"])
    assert builder_for(["a.json.gz", "b.jsonl.bz2", "c.jsonl.xz"]) == "json"
    if importlib.util.find_spec("zstandard") is None:
        with pytest.raises(ImportError, match="zstandard"):
            builder_for(["shard.json.zst"])
        pytest.skip("zstandard is not installed: .zst shards not read")
    import zstandard

    zst = tmp_path / "c.json.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()))
    zs = make(tmp_path / "c", tokenizer_dir, data_files=str(zst), validation_files=validation, block_size=16)
    assert rows_of(zs.train_dataset) == rows_of(plain.train_dataset)


def test_hub_corpus_is_streamed_and_read_only_up_to_the_budget(tmp_path, tokenizer_dir, hf_tokenizer, monkeypatch):
    import datasets

    calls = []

    def endless():
        for i in range(10**9):  # far more than any test could read
            yield {"text": DOCS[i % len(DOCS)], "id": i}

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs.get("streaming")))
        if split == "validation":
            return datasets.IterableDataset.from_generator(lambda: ({"text": v} for v in VALIDATION))
        return datasets.IterableDataset.from_generator(endless)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = make(
        tmp_path,
        tokenizer_dir,
        data_files=None,
        dataset="org/huge",
        dataset_config="web",
        validation_split="validation",
        max_tokens=3000,
        heldout_max_tokens=40,
        separator="none",
        block_size=32,
    )
    assert calls == [("org/huge", "web", "train", True), ("org/huge", "web", "validation", True)]
    bare = [t for d in DOCS * 10 for t in hf_tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert len(bare) > 3000
    assert rows_of(dm.train_dataset) == blocks_by_hand(bare[:3000], 32)
    assert sum(len(r) for r in rows_of(dm.heldout_dataset)) == 40
