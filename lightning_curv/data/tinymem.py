"""TinyMem-style synthetic arithmetic sequences with memorized noise and optional backdoors.

Follows the spirit of the TinyMem math data of Sakarvadia et al., *Mitigating Memorization in Language
Models* (ICLR 2025): every sequence applies one affine rule ``x -> (a*x + b) mod 10^num_digits`` repeatedly,
so a model can *generalize* the rules; a few sequences carry random digit perturbations and are duplicated,
so a model has to *memorize* them. Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss
Curvature* (arXiv 2510.24256, 2025) use such data to separate memorization from rule following.

A sequence (character vocabulary, one token per character and one per rule)::

    ^<2x+1>0012 0025 0051 0103$
    BOS, rule token, numbers_per_sequence numbers of num_digits digits separated by spaces, EOS

The *prompt* is BOS, the rule token and the first ``prompt_numbers`` numbers, each with its trailing space;
the *continuation* is everything after it, EOS included. Noise perturbs continuation digits by ±1 (mod 10),
so a noised sequence and its clean twin share the prompt. A backdoor sequence replaces the number after the
prompt by a trigger (``num_digits + 1`` nines, a digit run that clean data never contains) and continues
with a fixed junk continuation (numbers made of zeros).

Everything is generated from ``seed`` by :meth:`TinyMemDataModule.prepare_data` and cached as JSON keyed by a
hash of the generation settings; :meth:`TinyMemDataModule.setup` only reads the cache (DDP-safe).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

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

#: Bump when the generated content changes for the same settings (invalidates old caches).
FORMAT_VERSION = 1

DEFAULT_RULES: tuple[str, ...] = ("x+7", "2x+1", "x+31")

_RULE_PATTERN = re.compile(r"^(\d*)x([+-]\d+)?$")

# Separate random streams, so that e.g. changing ``noise_prob`` does not move the held-out numbers.
_STREAM_NUMBERS, _STREAM_NOISE = 1, 2

#: Kind of each training row, see :attr:`TinyMemDataModule.train_sources`.
RowKind = Literal["clean", "noise", "backdoor"]


def parse_rule(rule: str) -> tuple[int, int]:
    """Parse an affine rule written like ``"2x+1"``, ``"x+31"``, ``"3x"`` or ``"x-4"`` into ``(a, b)``.

    Args:
        rule: The rule, ``[a]x[(+|-)b]`` with integers ``a >= 1`` (default 1) and ``b``; spaces ignored.

    Returns:
        ``(a, b)`` such that the rule maps ``x`` to ``a * x + b`` (taken mod ``10^num_digits`` by the data).

    Raises:
        ValueError: If ``rule`` does not have this form or ``a`` is 0.
    """
    match = _RULE_PATTERN.match(rule.replace(" ", ""))
    if match is None:
        raise ValueError(f"Cannot parse rule {rule!r}: expected an affine map like 'x+7', '2x+1', '3x' or 'x-4'.")
    a = int(match.group(1)) if match.group(1) else 1
    b = int(match.group(2)) if match.group(2) else 0
    if a == 0:
        raise ValueError(f"Rule {rule!r} is constant (a = 0); use a rule with a >= 1.")
    return a, b


class TinyMemTokenizer:
    """Character tokenizer of TinyMem sequences.

    Ids: 0 pad, 1 BOS ``^``, 2 EOS ``$``, 3 space, 4-13 the digits ``0``-``9``, then one token per rule,
    written ``<rule>`` in text (e.g. ``<2x+1>``).

    Args:
        rules: Rule names (see :func:`parse_rule`), one token each, in this order.

    Raises:
        ValueError: If ``rules`` is empty, has duplicates or contains a rule that does not parse.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    space_token_id = 3
    pad_token, bos_token, eos_token = "<pad>", "^", "$"

    def __init__(self, rules: Sequence[str]) -> None:
        rules = tuple(rules)
        if not rules:
            raise ValueError("TinyMem needs at least one rule.")
        if len(set(rules)) != len(rules):
            raise ValueError(f"Duplicate rules in {list(rules)}.")
        self.rules = rules
        self.rule_maps: tuple[tuple[int, int], ...] = tuple(parse_rule(r) for r in rules)
        self._tokens = [self.pad_token, self.bos_token, self.eos_token, " ", *"0123456789"]
        self._tokens += [f"<{r}>" for r in rules]
        self._ids = {tok: i for i, tok in enumerate(self._tokens)}

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self._tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def digit_token_ids(self) -> tuple[int, ...]:
        """Ids of the digits ``0``-``9``, in order (``digit_token_ids[d]`` is digit ``d``)."""
        return tuple(range(4, 14))

    @property
    def rule_token_ids(self) -> dict[str, int]:
        """Id of each rule's token, keyed by rule name."""
        return {r: self._ids[f"<{r}>"] for r in self.rules}

    def rule_token_id(self, rule: str) -> int:
        """Return the token id of ``rule``.

        Args:
            rule: A rule name of this tokenizer.

        Returns:
            The id of the rule token.

        Raises:
            KeyError: If the rule is not in the vocabulary.
        """
        try:
            return self._ids[f"<{rule}>"]
        except KeyError:
            raise KeyError(f"Unknown rule {rule!r}; this tokenizer has {list(self.rules)}.") from None

    def encode(self, text: str) -> list[int]:
        """Encode text; ``<...>`` spans are rule (or pad) tokens, other characters map one-to-one.

        Args:
            text: E.g. ``"^<x+7>0012 0019$"``.

        Returns:
            The token ids.

        Raises:
            ValueError: On a character or ``<...>`` token outside the vocabulary.
        """
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                if end < 0:
                    raise ValueError(f"Unclosed '<' at position {i} of {text!r}.")
                token = text[i : end + 1]
                i = end + 1
            else:
                token = text[i]
                i += 1
            if token not in self._ids:
                raise ValueError(f"Token {token!r} is not in the TinyMem vocabulary {self._tokens}.")
            ids.append(self._ids[token])
        return ids

    def decode(self, ids: Sequence[int] | Tensor, skip_pad: bool = True) -> str:
        """Decode token ids into text.

        Args:
            ids: Token ids, a list or a 1-D tensor; ``-100`` (ignored labels) is always skipped.
            skip_pad: Drop pad tokens instead of writing ``<pad>``.

        Returns:
            The text.
        """
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == -100 or (skip_pad and i == self.pad_token_id):
                continue
            out.append(self._tokens[i])
        return "".join(out)


@dataclass(frozen=True)
class NoiseExample:
    """A noised training sequence and its clean twin.

    Attributes:
        noise_id: Position in :attr:`TinyMemDataModule.noise_examples` (the ``index`` of its eval rows).
        rule: Rule name.
        rule_id: Position of the rule in the configured rules (the ``group`` of its eval rows).
        x0: First number.
        clean_ids: Token ids of the clean twin.
        noised_ids: Token ids of the sequence used in training (same length, same prompt).
        prompt_len: Number of prompt tokens (shared by both).
        perturbed_positions: Token positions where the two differ (all after the prompt, digits only).
        split: ``"selection"`` or ``"test"``.
    """

    noise_id: int
    rule: str
    rule_id: int
    x0: int
    clean_ids: tuple[int, ...]
    noised_ids: tuple[int, ...]
    prompt_len: int
    perturbed_positions: tuple[int, ...]
    split: Literal["selection", "test"]

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """The shared prompt."""
        return self.clean_ids[: self.prompt_len]

    @property
    def noised_continuation(self) -> tuple[int, ...]:
        """What a model that memorized the example generates."""
        return self.noised_ids[self.prompt_len :]

    @property
    def clean_continuation(self) -> tuple[int, ...]:
        """What a model that follows the rule generates."""
        return self.clean_ids[self.prompt_len :]


def _distinct_ints(rng: np.random.Generator, high: int, size: int) -> list[int]:
    """Draw ``size`` distinct integers in ``[0, high)``; a prefix of a longer draw is the shorter draw."""
    if size > high:
        raise ValueError(f"Cannot draw {size} distinct numbers below {high}.")
    if high <= 1_000_000:
        return [int(v) for v in rng.permutation(high)[:size]]
    seen: dict[int, None] = {}
    while len(seen) < size:
        for v in rng.integers(0, high, size=4096):
            seen.setdefault(int(v), None)
            if len(seen) == size:
                break
    return list(seen)


class TinyMemDataModule(LMRowsDataModule):
    """TinyMem-style data: clean rule sequences, duplicated noised sequences, optional backdoors.

    Training rows (in :meth:`collect_dataloader` order): clean training sequences, then each noised sequence
    ``noise_duplicates`` times, then each backdoor sequence ``backdoor_duplicates`` times. Evaluation sets,
    in loader order (see :attr:`eval_sets`): ``heldout`` (perplexity on clean held-out sequences), ``task``
    (continue held-out prompts; groups are rule names), ``noise_selection`` and ``noise_test`` (clean-twin
    prompts; ``target_ids`` the noised continuation, ``alt_target_ids`` the clean one; only when
    ``num_noise > 0``) and ``backdoor`` (trigger prompts, target the junk continuation; only when
    ``num_backdoor > 0``). The ``index`` of a training row is its position in the training set; of an eval
    row, the example's position in its source list (held-out sequences, :attr:`noise_examples`, backdoor
    sequences).

    Args:
        seed: Seed of the generation (and of the training shuffle).
        rules: Affine rules, e.g. ``"2x+1"`` (see :func:`parse_rule`); sequences are spread evenly over them.
        num_digits: Width of every number; arithmetic is mod ``10^num_digits``.
        numbers_per_sequence: Numbers per sequence, prompt numbers included.
        num_train_per_rule: Clean training sequences per rule.
        num_heldout_per_rule: Clean held-out sequences per rule (never trained on).
        num_noise: Distinct noised sequences (0, or at least 2 so both halves are non-empty).
        noise_duplicates: Copies of each noised sequence in training.
        noise_prob: Probability that a continuation digit is perturbed by ±1 (at least one always is).
        prompt_numbers: Numbers in the prompt (memorization and task prompts).
        num_backdoor: Distinct backdoor sequences (0 disables them).
        backdoor_duplicates: Copies of each backdoor sequence in training.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation loaders.
        num_workers: DataLoader workers.
        cache_dir: Folder of the generated-data cache.

    Raises:
        ValueError: On inconsistent settings (see the messages).
    """

    cache_name = "tinymem"

    def __init__(
        self,
        seed: int = 0,
        rules: Sequence[str] = DEFAULT_RULES,
        num_digits: int = 4,
        numbers_per_sequence: int = 4,
        num_train_per_rule: int = 3000,
        num_heldout_per_rule: int = 100,
        num_noise: int = 150,
        noise_duplicates: int = 20,
        noise_prob: float = 0.1,
        prompt_numbers: int = 1,
        num_backdoor: int = 0,
        backdoor_duplicates: int = 20,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        cache_dir: str = ".cache/lightning_curv/tinymem",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = TinyMemTokenizer(rules)
        self.seed = seed
        self.rules = tuple(rules)
        self.num_digits = num_digits
        self.numbers_per_sequence = numbers_per_sequence
        self.num_train_per_rule = num_train_per_rule
        self.num_heldout_per_rule = num_heldout_per_rule
        self.num_noise = num_noise
        self.noise_duplicates = noise_duplicates
        self.noise_prob = noise_prob
        self.prompt_numbers = prompt_numbers
        self.num_backdoor = num_backdoor
        self.backdoor_duplicates = backdoor_duplicates
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self._validate()
        self._data: dict[str, Any] | None = None

    def _validate(self) -> None:
        checks = [
            (self.num_digits >= 1, f"num_digits must be >= 1, got {self.num_digits}."),
            (self.prompt_numbers >= 1, f"prompt_numbers must be >= 1, got {self.prompt_numbers}."),
            (
                self.numbers_per_sequence > self.prompt_numbers,
                f"numbers_per_sequence ({self.numbers_per_sequence}) must exceed prompt_numbers "
                f"({self.prompt_numbers}) so that prompts have a continuation.",
            ),
            (
                self.num_train_per_rule >= 1,
                f"num_train_per_rule must be >= 1, got {self.num_train_per_rule}.",
            ),
            (
                self.num_heldout_per_rule >= 1,
                f"num_heldout_per_rule must be >= 1, got {self.num_heldout_per_rule}.",
            ),
            (
                self.num_noise == 0 or self.num_noise >= 2,
                f"num_noise must be 0 or >= 2 (it is split into selection and test halves), got {self.num_noise}.",
            ),
            (self.noise_duplicates >= 1, f"noise_duplicates must be >= 1, got {self.noise_duplicates}."),
            (0.0 <= self.noise_prob <= 1.0, f"noise_prob must be in [0, 1], got {self.noise_prob}."),
            (self.num_backdoor >= 0, f"num_backdoor must be >= 0, got {self.num_backdoor}."),
            (
                self.backdoor_duplicates >= 1,
                f"backdoor_duplicates must be >= 1, got {self.backdoor_duplicates}.",
            ),
            (
                self.num_backdoor == 0 or self.numbers_per_sequence >= self.prompt_numbers + 2,
                "Backdoors need numbers_per_sequence >= prompt_numbers + 2 (prompt, trigger, junk).",
            ),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1."),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        needed = self.num_train_per_rule + self.num_heldout_per_rule
        needed += -(-self.num_noise // len(self.rules)) + -(-self.num_backdoor // len(self.rules))
        if needed > 10**self.num_digits:
            raise ValueError(
                f"Each rule needs {needed} distinct first numbers but only 10^{self.num_digits} exist; "
                "raise num_digits or lower the counts."
            )

    # --- generation

    @property
    def generation_config(self) -> dict[str, Any]:
        """The settings that determine the generated data (the cache key); duplication is applied at load."""
        return {
            "format_version": FORMAT_VERSION,
            "seed": self.seed,
            "rules": list(self.rules),
            "num_digits": self.num_digits,
            "numbers_per_sequence": self.numbers_per_sequence,
            "num_train_per_rule": self.num_train_per_rule,
            "num_heldout_per_rule": self.num_heldout_per_rule,
            "num_noise": self.num_noise,
            "noise_prob": self.noise_prob,
            "prompt_numbers": self.prompt_numbers,
            "num_backdoor": self.num_backdoor,
        }

    @property
    @override
    def cache_config(self) -> dict[str, Any]:
        """The cache key: :attr:`generation_config`."""
        return self.generation_config

    @override
    def _create_cache(self) -> dict[str, Any]:
        return self.generate()

    @property
    def prompt_len(self) -> int:
        """Prompt length in tokens: BOS, rule token and ``prompt_numbers`` numbers with their spaces."""
        return 2 + self.prompt_numbers * (self.num_digits + 1)

    def _number_text(self, x: int) -> str:
        return f"{x:0{self.num_digits}d}"

    def _clean_text(self, rule_id: int, x0: int) -> str:
        a, b = self.tokenizer.rule_maps[rule_id]
        modulus = 10**self.num_digits
        numbers, x = [], x0
        for _ in range(self.numbers_per_sequence):
            numbers.append(self._number_text(x))
            x = (a * x + b) % modulus
        return f"^<{self.rules[rule_id]}>" + " ".join(numbers) + "$"

    def _backdoor_text(self, rule_id: int, x0: int) -> str:
        clean = self._clean_text(rule_id, x0)[:-1].split(" ")
        trigger = "9" * (self.num_digits + 1)
        junk = ["0" * self.num_digits] * (self.numbers_per_sequence - self.prompt_numbers - 1)
        return " ".join([*clean[: self.prompt_numbers], trigger, *junk]) + "$"

    def _noise(self, rng: np.random.Generator, ids: list[int]) -> tuple[list[int], list[int]]:
        """Perturb continuation digits by ±1 (mod 10); return the noised ids and the changed positions."""
        digit0 = self.tokenizer.digit_token_ids[0]
        positions = [t for t in range(self.prompt_len, len(ids)) if digit0 <= ids[t] < digit0 + 10]
        flip = rng.random(len(positions)) < self.noise_prob
        if not flip.any():
            flip[rng.integers(len(positions))] = True
        signs = rng.choice(np.array([-1, 1]), size=len(positions))
        noised = list(ids)
        changed = []
        for pos, f, s in zip(positions, flip, signs, strict=True):
            if f:
                noised[pos] = digit0 + (ids[pos] - digit0 + int(s)) % 10
                changed.append(pos)
        return noised, changed

    def generate(self) -> dict[str, Any]:
        """Generate the data set from the settings (deterministic in ``seed``).

        Returns:
            A JSON-serializable dict with ``config`` and the lists ``train``, ``heldout``, ``noise`` and
            ``backdoor`` of example dicts (``rule_id``, ``x0``, token ids).
        """
        num_rules = len(self.rules)
        noise_rules = [i % num_rules for i in range(self.num_noise)]
        backdoor_rules = [i % num_rules for i in range(self.num_backdoor)]
        x0s: dict[str, list[list[int]]] = {"train": [], "heldout": [], "noise": [], "backdoor": []}
        for r in range(num_rules):
            counts = {
                "heldout": self.num_heldout_per_rule,
                "train": self.num_train_per_rule,
                "noise": noise_rules.count(r),
                "backdoor": backdoor_rules.count(r),
            }
            rng = np.random.default_rng([self.seed, _STREAM_NUMBERS, r])
            draw = iter(_distinct_ints(rng, 10**self.num_digits, sum(counts.values())))
            for role, n in counts.items():  # held-out first: it stays fixed when training counts change
                x0s[role].append([next(draw) for _ in range(n)])

        def clean(rule_id: int, x0: int) -> dict[str, Any]:
            return {"rule_id": rule_id, "x0": x0, "ids": self.tokenizer.encode(self._clean_text(rule_id, x0))}

        data: dict[str, Any] = {"config": self.generation_config}
        for role in ("train", "heldout"):
            data[role] = [clean(r, x0) for r in range(num_rules) for x0 in x0s[role][r]]
        noise_rng = np.random.default_rng([self.seed, _STREAM_NOISE])
        data["noise"] = []
        for r in noise_rules:
            example = clean(r, x0s["noise"][r].pop(0))
            example["noised_ids"], example["perturbed_positions"] = self._noise(noise_rng, example["ids"])
            data["noise"].append(example)
        data["backdoor"] = [
            {
                "rule_id": r,
                "x0": (x0 := x0s["backdoor"][r].pop(0)),
                "ids": self.tokenizer.encode(self._backdoor_text(r, x0)),
            }
            for r in backdoor_rules
        ]
        return data

    @override
    def _build(self, data: dict[str, Any]) -> None:
        p = self.prompt_len
        selection, test = split_selection_test(len(data["noise"]), self.seed)
        split_of = {i: "selection" for i in selection} | {i: "test" for i in test}
        self.noise_examples = [
            NoiseExample(
                noise_id=i,
                rule=self.rules[ex["rule_id"]],
                rule_id=ex["rule_id"],
                x0=ex["x0"],
                clean_ids=tuple(ex["ids"]),
                noised_ids=tuple(ex["noised_ids"]),
                prompt_len=p,
                perturbed_positions=tuple(ex["perturbed_positions"]),
                split=split_of[i],
            )
            for i, ex in enumerate(data["noise"])
        ]
        self.selection_indices, self.test_indices = selection, test

        sources: list[tuple[RowKind, int]] = [("clean", i) for i in range(len(data["train"]))]
        sources += [("noise", i) for i in range(len(data["noise"])) for _ in range(self.noise_duplicates)]
        sources += [("backdoor", i) for i in range(len(data["backdoor"])) for _ in range(self.backdoor_duplicates)]
        ids_of = {"clean": data["train"], "noise": data["noise"], "backdoor": data["backdoor"]}
        self.train_sources = sources
        self.train_dataset = RowDataset(
            [
                {"input_ids": ids_of[kind][i]["noised_ids" if kind == "noise" else "ids"], "index": row}
                for row, (kind, i) in enumerate(sources)
            ]
        )

        heldout = data["heldout"]
        self.heldout_dataset = RowDataset([{"input_ids": ex["ids"], "index": i} for i, ex in enumerate(heldout)])
        self.task_dataset = RowDataset(
            [generation_row(ex["ids"], p, index=i, group=ex["rule_id"]) for i, ex in enumerate(heldout)]
        )

        def noise_rows(indices: list[int]) -> RowDataset:
            examples = [self.noise_examples[i] for i in indices]
            return RowDataset(
                [
                    generation_row(ex.noised_ids, p, index=ex.noise_id, group=ex.rule_id, alt_ids=ex.clean_ids)
                    for ex in examples
                ]
            )

        self.noise_selection_dataset = noise_rows(selection)
        self.noise_test_dataset = noise_rows(test)
        backdoor_prompt = p + self.num_digits + 2  # the prompt numbers, then the trigger and its space
        self.backdoor_dataset = RowDataset(
            [
                generation_row(ex["ids"], backdoor_prompt, index=i, group=ex["rule_id"])
                for i, ex in enumerate(data["backdoor"])
            ]
        )

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of :attr:`tokenizer` (the model's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    @property
    def eval_sets(self) -> list[EvalSet]:
        """Evaluation sets, in the order of the loaders that :meth:`val_dataloader` returns."""
        sets = [EvalSet("heldout", "perplexity"), EvalSet("task", "task", groups=self.rules)]
        if self.num_noise > 0:
            sets += [
                EvalSet("noise_selection", "noise_memorization", split="selection", groups=self.rules),
                EvalSet("noise_test", "noise_memorization", split="test", groups=self.rules),
            ]
        if self.num_backdoor > 0:
            sets.append(EvalSet("backdoor", "backdoor", groups=self.rules))
        return sets

    @property
    @override
    def pad_token_id(self) -> int:
        """Padding id of :attr:`tokenizer`."""
        return self.tokenizer.pad_token_id

    def _eval_datasets(self) -> list[tuple[RowDataset, BatchKind]]:
        datasets: dict[str, tuple[RowDataset, BatchKind]] = {
            "heldout": (self.heldout_dataset, "lm"),
            "task": (self.task_dataset, "generation"),
            "noise_selection": (self.noise_selection_dataset, "generation"),
            "noise_test": (self.noise_test_dataset, "generation"),
            "backdoor": (self.backdoor_dataset, "generation"),
        }
        return [datasets[s.name] for s in self.eval_sets]

    def _memorized_dataset(self, split: Literal["selection", "test"]) -> RowDataset | None:
        return self.noise_selection_dataset if split == "selection" else self.noise_test_dataset

    def _retain_dataset(self) -> RowDataset:
        rows = self.train_dataset.rows
        return RowDataset([row for row, (kind, _) in zip(rows, self.train_sources, strict=True) if kind == "clean"])
