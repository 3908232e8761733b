import json
import os

import pytest
import torch

from lightning_curv.data import EvalSet, TextDataModule
from lightning_curv.data.collate import IGNORE_INDEX
from lightning_curv.data.text import pack_blocks

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


def test_pack_blocks_drops_only_a_single_trailing_token():
    stream = torch.arange(10)
    assert [b.tolist() for b in pack_blocks(stream, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in pack_blocks(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_heldout_fraction_splits_documents_by_seed(tmp_path, tokenizer_dir, hf_tokenizer):
    eos = hf_tokenizer.eos_token_id

    def split(dm):
        stream = lambda ds: torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()  # noqa: E731
        return stream(dm.train_dataset), stream(dm.heldout_dataset)

    a = make(tmp_path / "a", tokenizer_dir, heldout_fraction=0.1, seed=0, block_size=32)
    b = make(tmp_path / "b", tokenizer_dir, heldout_fraction=0.1, seed=0, block_size=32)
    c = make(tmp_path / "c", tokenizer_dir, heldout_fraction=0.1, seed=1, block_size=32)
    train, heldout = split(a)
    assert heldout.count(eos) == 12 and train.count(eos) == 108  # whole documents, EOS after each

    # Every document lands in exactly one split.
    def docs_of(stream):
        docs, current = [], []
        for t in stream:
            current.append(t)
            if t == eos:
                docs.append(tuple(current))
                current = []
        assert not current  # the stream ends with EOS
        return docs

    assert sorted(docs_of(train) + docs_of(heldout)) == sorted(docs_of(tokens_of(hf_tokenizer, DOCS)))
    assert split(a) == split(b)
    assert split(a)[1] != split(c)[1]


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
    with pytest.raises(ValueError, match="no column 'text'"):
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
    datasets_dir = tmp_path / "cache" / "datasets"
    files_after_first = {p: p.stat().st_mtime_ns for p in datasets_dir.rglob("*") if p.is_file()}

    real = TextDataModule.tokenize_corpus

    def fail(self):
        raise AssertionError("tokenize_corpus() must not run when the cache exists")

    monkeypatch.setattr(TextDataModule, "tokenize_corpus", fail)
    second = make(tmp_path, tokenizer_dir, data_files=str(corpus))
    assert second.cache_path == first_path
    stream = lambda dm: torch.cat([dm.train_dataset[i]["input_ids"] for i in range(len(dm.train_dataset))]).tolist()  # noqa: E731
    assert stream(second) == stream(first)
    # Another block size packs again, but the tokenized documents come from datasets' fingerprint cache.
    monkeypatch.setattr(TextDataModule, "tokenize_corpus", real)
    repacked = make(tmp_path, tokenizer_dir, data_files=str(corpus), block_size=64)
    assert repacked.cache_path != first_path and stream(repacked) == stream(first)
    assert len(repacked.train_dataset) > len(first.train_dataset)
    assert {p: p.stat().st_mtime_ns for p in datasets_dir.rglob("*") if p.is_file()} == files_after_first
    # Editing the corpus changes the key, so the stale cache is not used.
    monkeypatch.setattr(TextDataModule, "tokenize_corpus", fail)
    write_lines(corpus, DOCS[:50])
    os.utime(corpus, ns=(1, 1))
    third = TextDataModule(tokenizer=tokenizer_dir, data_files=str(corpus), cache_dir=str(tmp_path / "cache"))
    assert third.cache_path != first_path
    with pytest.raises(AssertionError, match="must not run"):
        third.prepare_data()
    monkeypatch.setattr(TextDataModule, "tokenize_corpus", real)
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
