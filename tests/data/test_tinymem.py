import json
from collections import Counter

import pytest
import torch

from lightning_curv.data import EvalSet, TinyMemDataModule, TinyMemTokenizer
from lightning_curv.data.collate import IGNORE_INDEX
from lightning_curv.data.tinymem import parse_rule

RULES = ("x+7", "2x+1", "x+31")
SMALL = dict(
    rules=RULES,
    num_digits=3,
    numbers_per_sequence=4,
    num_train_per_rule=40,
    num_heldout_per_rule=10,
    num_noise=12,
    noise_duplicates=3,
    noise_prob=0.2,
    num_backdoor=4,
    backdoor_duplicates=2,
    batch_size=8,
    eval_batch_size=16,
)


def make(tmp_path, **overrides) -> TinyMemDataModule:
    dm = TinyMemDataModule(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **overrides})
    dm.prepare_data()
    dm.setup()
    return dm


def parse_sequence(tok: TinyMemTokenizer, ids) -> tuple[str, list[str]]:
    """Split a decoded sequence into its rule name and its numbers, checking BOS/EOS framing."""
    text = tok.decode(ids)
    assert text.startswith("^<") and text.endswith("$"), text
    rule, body = text[2:-1].split(">", 1)
    return rule, body.split(" ")


@pytest.fixture
def dm(tmp_path):
    return make(tmp_path)


def test_parse_rule():
    assert parse_rule("x+7") == (1, 7)
    assert parse_rule("2x+1") == (2, 1)
    assert parse_rule(" 3x ") == (3, 0)
    assert parse_rule("x-4") == (1, -4)
    for bad in ["x*2", "2+x", "y+1", "0x+3", ""]:
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_tokenizer_roundtrip_and_ids():
    tok = TinyMemTokenizer(RULES)
    assert tok.vocab_size == 14 + len(RULES) == len(tok)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert sorted(tok.rule_token_ids.values()) == [14, 15, 16]
    text = "^<2x+1>012 025$"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1] == tok.rule_token_id("2x+1") and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 7 + 1
    assert tok.decode(ids) == text
    assert tok.decode([tok.pad_token_id, *ids, IGNORE_INDEX]) == text
    assert tok.decode(torch.tensor(ids)) == text
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("^a")
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("<x+8>")
    with pytest.raises(KeyError):
        tok.rule_token_id("x+8")
    with pytest.raises(ValueError, match="Duplicate"):
        TinyMemTokenizer(["x+7", "x+7"])


def test_sequences_follow_their_rules(dm):
    tok = dm.tokenizer
    clean = [dm.train_dataset[i]["input_ids"] for i, (kind, _) in enumerate(dm.train_sources) if kind == "clean"]
    heldout = [dm.heldout_dataset[i]["input_ids"] for i in range(len(dm.heldout_dataset))]
    clean_twins = [ex.clean_ids for ex in dm.noise_examples]
    assert len(clean) == 3 * 40 and len(heldout) == 3 * 10
    counts = Counter()
    for ids in clean + heldout + clean_twins:
        rule, numbers = parse_sequence(tok, ids)
        a, b = parse_rule(rule)
        counts[rule] += 1
        assert len(numbers) == 4 and all(len(n) == 3 and n.isdigit() for n in numbers)
        for x, y in zip(numbers, numbers[1:], strict=False):
            assert int(y) == (a * int(x) + b) % 1000, (rule, numbers)
    assert set(counts) == set(RULES)
    assert counts["x+7"] == 40 + 10 + 4  # round-robin noise: 12 noise sequences over 3 rules


def test_splits_do_not_overlap(dm):
    def key(ids):
        return tuple(ids[: 2 + 4])  # BOS, rule and the first number identify a clean sequence

    train_clean = {key(dm.train_dataset[i]["input_ids"]) for i, (k, _) in enumerate(dm.train_sources) if k == "clean"}
    heldout = {key(dm.heldout_dataset[i]["input_ids"]) for i in range(len(dm.heldout_dataset))}
    noise = {key(ex.clean_ids) for ex in dm.noise_examples}
    assert len(train_clean) == 120 and len(heldout) == 30 and len(noise) == 12
    assert not train_clean & heldout and not train_clean & noise and not heldout & noise


def test_noise_differs_by_plus_minus_one_digits_after_prompt(dm):
    tok = dm.tokenizer
    digit0 = tok.digit_token_ids[0]
    assert len(dm.noise_examples) == 12
    assert dm.prompt_len == 2 + 4
    for ex in dm.noise_examples:
        assert len(ex.clean_ids) == len(ex.noised_ids)
        diff = [t for t, (c, n) in enumerate(zip(ex.clean_ids, ex.noised_ids, strict=False)) if c != n]
        assert diff, "every noised sequence carries at least one perturbation"
        assert diff == list(ex.perturbed_positions)
        assert min(diff) >= ex.prompt_len
        assert ex.prompt_ids == ex.noised_ids[: ex.prompt_len]
        for t in diff:
            c, n = ex.clean_ids[t] - digit0, ex.noised_ids[t] - digit0
            assert 0 <= c < 10 and 0 <= n < 10
            assert (n - c) % 10 in (1, 9)
        assert ex.rule == RULES[ex.rule_id] and ex.clean_ids[1] == tok.rule_token_id(ex.rule)


def test_noise_prob_one_perturbs_every_continuation_digit(tmp_path):
    dm = make(tmp_path, noise_prob=1.0, num_backdoor=0)
    for ex in dm.noise_examples:
        num_digits_after_prompt = 3 * (4 - 1)
        assert len(ex.perturbed_positions) == num_digits_after_prompt


def test_training_rows_duplicates_and_indices(dm):
    kinds = Counter(kind for kind, _ in dm.train_sources)
    assert kinds == {"clean": 120, "noise": 12 * 3, "backdoor": 4 * 2}
    assert len(dm.train_dataset) == 120 + 36 + 8
    per_noise = Counter(i for kind, i in dm.train_sources if kind == "noise")
    assert set(per_noise.values()) == {3} and len(per_noise) == 12
    for row, (kind, i) in enumerate(dm.train_sources):
        assert dm.train_dataset[row]["index"] == row
        if kind == "noise":
            assert tuple(dm.train_dataset[row]["input_ids"]) == dm.noise_examples[i].noised_ids
    # The clean twins themselves are never trained on.
    train_rows = {tuple(dm.train_dataset[i]["input_ids"]) for i in range(len(dm.train_dataset))}
    assert not train_rows & {ex.clean_ids for ex in dm.noise_examples}


def test_collect_loader_is_ordered_and_train_loader_shuffles(dm):
    collected = torch.cat([b["index"] for b in dm.collect_dataloader()])
    assert collected.tolist() == list(range(len(dm.train_dataset)))
    shuffled = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert sorted(shuffled.tolist()) == list(range(len(dm.train_dataset)))
    assert shuffled.tolist() != collected.tolist()


def test_lm_batches_mask_padding(dm):
    # Backdoor rows are one token longer than clean rows, so the last collect batch mixes lengths.
    batches = list(dm.collect_dataloader())
    padded = [b for b in batches if (b["attention_mask"] == 0).any()]
    assert padded, "expected a batch mixing noise and backdoor rows"
    for b in batches:
        assert torch.equal(b["labels"] == IGNORE_INDEX, b["attention_mask"] == 0)
        assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])
        assert (b["input_ids"][b["attention_mask"] == 0] == dm.tokenizer.pad_token_id).all()


def test_selection_and_test_halves(dm):
    sel, test = dm.selection_indices, dm.test_indices
    assert set(sel).isdisjoint(test) and sorted(sel + test) == list(range(12))
    assert len(sel) == 6
    assert all(dm.noise_examples[i].split == "selection" for i in sel)
    assert all(dm.noise_examples[i].split == "test" for i in test)
    loaders = dm.val_dataloader()
    names = [s.name for s in dm.eval_sets]
    sel_batch = next(iter(loaders[names.index("noise_selection")]))
    test_batch = next(iter(loaders[names.index("noise_test")]))
    assert sel_batch["index"].tolist() == sel and test_batch["index"].tolist() == test


def test_eval_sets_match_loaders(dm):
    assert dm.eval_sets == [
        EvalSet("heldout", "perplexity"),
        EvalSet("task", "task", groups=RULES),
        EvalSet("noise_selection", "noise_memorization", split="selection", groups=RULES),
        EvalSet("noise_test", "noise_memorization", split="test", groups=RULES),
        EvalSet("backdoor", "backdoor", groups=RULES),
    ]
    for loaders in (dm.val_dataloader(), dm.test_dataloader()):
        assert len(loaders) == len(dm.eval_sets)
        for eval_set, loader in zip(dm.eval_sets, loaders, strict=False):
            batch = next(iter(loader))
            key = "input_ids" if eval_set.kind == "perplexity" else "prompt_ids"
            assert key in batch, eval_set.name
            assert ("alt_target_ids" in batch) == (eval_set.kind == "noise_memorization")
    no_backdoor = TinyMemDataModule(**{**SMALL, "num_backdoor": 0})
    assert [s.name for s in no_backdoor.eval_sets] == ["heldout", "task", "noise_selection", "noise_test"]
    no_noise = TinyMemDataModule(**{**SMALL, "num_backdoor": 0, "num_noise": 0})
    assert [s.name for s in no_noise.eval_sets] == ["heldout", "task"]


def test_generation_batches(dm):
    loaders = dict(zip([s.name for s in dm.eval_sets], dm.val_dataloader(), strict=False))
    task = next(iter(loaders["task"]))
    p = dm.prompt_len
    assert task["prompt_ids"].shape == (16, p) and bool(task["prompt_mask"].all())
    for row in range(16):
        i = task["index"][row].item()
        full = dm.heldout_dataset[i]["input_ids"]
        assert task["prompt_ids"][row].tolist() + task["target_ids"][row].tolist() == full
        assert task["group"][row].item() == RULES.index(parse_sequence(dm.tokenizer, full)[0])
    # The prompt ends with the first number's trailing space; the target ends with EOS.
    assert (task["prompt_ids"][:, -1] == dm.tokenizer.space_token_id).all()
    assert (task["target_ids"][:, -1] == dm.tokenizer.eos_token_id).all()

    noise = next(iter(loaders["noise_test"]))
    for row, i in enumerate(noise["index"].tolist()):
        ex = dm.noise_examples[i]
        assert noise["prompt_ids"][row].tolist() == list(ex.prompt_ids)
        assert noise["target_ids"][row].tolist() == list(ex.noised_continuation)
        assert noise["alt_target_ids"][row].tolist() == list(ex.clean_continuation)
        assert noise["group"][row].item() == ex.rule_id

    backdoor = next(iter(loaders["backdoor"]))
    assert len(backdoor["index"]) == 4
    for row in range(4):
        prompt = dm.tokenizer.decode(backdoor["prompt_ids"][row])
        assert prompt.endswith(" 9999 ")  # the trigger: num_digits + 1 nines
        assert dm.tokenizer.decode(backdoor["target_ids"][row]) == "000 000$"


def test_prompt_numbers_lengthens_prompts(tmp_path):
    dm = make(tmp_path, prompt_numbers=2, num_backdoor=0)
    batch = next(iter(dm.val_dataloader()[1]))
    assert batch["prompt_ids"].shape[1] == 2 + 2 * 4
    assert dm.tokenizer.decode(batch["target_ids"][0]).count(" ") == 1  # two numbers left


def test_same_seed_same_data_different_seed_different(tmp_path):
    a = make(tmp_path / "a", seed=1)
    b = make(tmp_path / "b", seed=1)
    c = make(tmp_path / "c", seed=2)
    assert a.cache_path.read_text() == b.cache_path.read_text()
    assert a.cache_path.name == b.cache_path.name != c.cache_path.name
    rows = lambda m: [tuple(m.train_dataset[i]["input_ids"]) for i in range(len(m.train_dataset))]  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert [ex.noised_ids for ex in a.noise_examples] != [ex.noised_ids for ex in c.noise_examples]


def test_heldout_stable_when_training_counts_change(tmp_path):
    a = make(tmp_path / "a")
    b = make(tmp_path / "b", num_train_per_rule=60)
    heldout = lambda m: [m.heldout_dataset[i]["input_ids"] for i in range(len(m.heldout_dataset))]  # noqa: E731
    assert heldout(a) == heldout(b)


def test_cache_is_reused_and_setup_only_reads(tmp_path, monkeypatch):
    first = make(tmp_path)
    content = json.loads(first.cache_path.read_text())
    assert content["config"] == first.generation_config

    def fail(self):
        raise AssertionError("generate() must not run when the cache exists")

    monkeypatch.setattr(TinyMemDataModule, "generate", fail)
    second = make(tmp_path)  # prepare_data finds the cache, setup reads it
    assert [second.train_dataset[i] for i in range(5)] == [first.train_dataset[i] for i in range(5)]
    # Batch sizes and duplication are applied at load time and do not change the cache key.
    third = make(tmp_path, batch_size=3, noise_duplicates=5)
    assert third.cache_path == first.cache_path and len(third.train_dataset) == 120 + 60 + 8

    fresh = TinyMemDataModule(**{**SMALL, "cache_dir": str(tmp_path / "cache"), "seed": 5})
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        fresh.setup()
    with pytest.raises(RuntimeError, match="setup"):
        fresh.train_dataloader()


def test_invalid_settings(tmp_path):
    with pytest.raises(ValueError, match="distinct first numbers"):
        TinyMemDataModule(num_digits=1, num_train_per_rule=10, num_heldout_per_rule=1)
    with pytest.raises(ValueError, match="numbers_per_sequence"):
        TinyMemDataModule(numbers_per_sequence=1)
    with pytest.raises(ValueError, match="num_noise"):
        TinyMemDataModule(num_noise=1)
    with pytest.raises(ValueError, match="noise_prob"):
        TinyMemDataModule(noise_prob=1.5)
    with pytest.raises(ValueError, match="Cannot parse rule"):
        TinyMemDataModule(rules=["x^2"])
    with pytest.raises(ValueError, match="Backdoors"):
        TinyMemDataModule(numbers_per_sequence=2, num_backdoor=1)


def test_vocab_size_and_tokenizer_exposed():
    dm = TinyMemDataModule(rules=["x+1", "3x+2"])
    assert dm.vocab_size == dm.tokenizer.vocab_size == 16
    assert dm.hparams["rules"] == ["x+1", "3x+2"]


def test_distinct_ints_is_prefix_stable_for_small_and_large_ranges():
    import numpy as np

    from lightning_curv.data.tinymem import _distinct_ints

    for high in (1000, 10**9):
        short = _distinct_ints(np.random.default_rng(0), high, 50)
        long = _distinct_ints(np.random.default_rng(0), high, 200)
        assert len(set(long)) == 200 and all(0 <= v < high for v in long)
        assert long[:50] == short
    with pytest.raises(ValueError):
        _distinct_ints(np.random.default_rng(0), 10, 11)


def test_init_is_a_cli_schema():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TinyMemDataModule, "data")
    cfg = parser.parse_args(["--data.rules=[x+1,3x+2]", "--data.num_noise=10"])
    assert cfg.data.rules == ["x+1", "3x+2"] and cfg.data.num_noise == 10
    assert cfg.data.noise_duplicates == TinyMemDataModule().noise_duplicates
