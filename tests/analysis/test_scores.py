"""Per-example scores: gradient mass against brute-force per-example gradients; AUROC on known cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lightning_curv.analysis import (
    BandFractions,
    GradientScores,
    band_names,
    gradient_scores,
    memorization_labels,
    memorization_scores,
    plot_score_histograms,
    score_auroc,
    score_aurocs,
)
from lightning_curv.curvature import curvature_mask, is_conv1d_like
from tests.analysis.helpers import PNG_MAGIC, capture_inputs, explicit_eigen, random_spd
from tests.cases import LM_CASES, lm_batch, split_batch

FP64 = {"rtol": 1e-10, "atol": 1e-12}
#: Batched vs one-row forwards of a float64 transformer differ by round-off only.
FORWARD64 = {"rtol": 1e-8, "atol": 1e-10}
RHOS = (0.3, 0.6, 0.9)


def _reference_mass(dW: torch.Tensor, eigen, rhos=RHOS) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖C‖²`` and ``‖C ⊙ ~M_ρ‖²`` of one example's weight gradient, by explicit rotation and masking."""
    C = eigen.eigenvectors_G.T @ dW @ eigen.eigenvectors_A
    dropped = torch.stack([C[~curvature_mask(eigen, rho)[0]].square().sum() for rho in rhos])
    return C.square().sum(), dropped


def _check_against(scores: GradientScores, expected: dict, names: list[str], tol: dict) -> None:
    assert scores.index.tolist() == sorted(expected)
    for row, idx in enumerate(scores.index.tolist()):
        loss, per_module = expected[idx]
        assert_close(scores.loss[row], loss, **tol)
        for name in names:
            total, dropped = per_module[name]
            assert_close(scores.grad_energy[name][row], total, **tol)
            assert_close(scores.dropped_energy[name][row], dropped, **tol)


def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    eigens = {
        "0": explicit_eigen(random_spd(5, 0), random_spd(6, 1, zero_dirs=1)),
        "2": explicit_eigen(random_spd(6, 2), random_spd(3, 3)),
    }
    g = torch.Generator().manual_seed(4)
    batch = {
        "x": torch.randn(7, 5, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (7,), generator=g),
        "index": torch.arange(7) + 10,
    }
    return model, eigens, batch


def test_gradient_mass_matches_brute_force_per_example_gradients():
    model, eigens, batch = _mlp_case()
    model.train()
    model[2].eval()
    scores = gradient_scores(
        model,
        [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}],
        eigens,
        RHOS,
        task="classifier",
        position=None,
        input_key="x",
        label_key="y",
    )
    weights = {"0": model[0].weight, "2": model[2].weight}
    expected = {}
    for b in range(7):
        loss = F.cross_entropy(model(batch["x"][b : b + 1]), batch["y"][b : b + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(weights.values()))
        per_module = {n: _reference_mass(dW, eigens[n]) for n, dW in zip(weights, grads, strict=True)}
        expected[int(batch["index"][b])] = (loss.detach(), per_module)
    _check_against(scores, expected, list(weights), FP64)
    # The pooled score is Σ dropped / Σ total over modules.
    pooled = sum(scores.dropped_energy.values()) / sum(scores.grad_energy.values())[:, None]
    assert_close(scores.low_curvature_fraction(), pooled, **FP64)
    assert_close(scores.low_curvature_fraction("0"), scores.dropped_energy["0"] / scores.grad_energy["0"][:, None])
    # The pass leaves no parameter gradients and restores requires_grad.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and model[0].training and not model[2].training


def test_rho_one_drops_nothing_and_chunking_is_invisible():
    model, eigens, batch = _mlp_case()
    kwargs = dict(task="classifier", position=None, input_key="x", label_key="y")
    full = gradient_scores(model, [batch], eigens, (0.6, 1.0), **kwargs)
    tiny = gradient_scores(model, [batch], eigens, (0.6, 1.0), max_chunk_elements=1, **kwargs)
    for name in eigens:
        assert torch.all(full.dropped_energy[name][:, 1] == 0)
        assert_close(tiny.dropped_energy[name], full.dropped_energy[name], **FP64)
        assert_close(tiny.grad_energy[name], full.grad_energy[name], **FP64)


class _TokenModel(nn.Module):
    """Per-token MLP, mean-pooled, then a head: every token's term enters the weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 4] -> [B, 3]
        return self.head(self.fc2(torch.tanh(self.fc1(x))).mean(dim=1))


@pytest.mark.parametrize("position", [None, 0])
def test_token_positions_sum_all_terms_or_keep_one(position):
    torch.manual_seed(1)
    model = _TokenModel().double()
    names = ["fc1", "fc2"]
    eigens = {
        "fc1": explicit_eigen(random_spd(4, 5), random_spd(6, 6)),
        "fc2": explicit_eigen(random_spd(6, 7), random_spd(4, 8)),
    }
    batch = {
        "pixel_values": torch.randn(5, 3, 4, dtype=torch.float64),
        "labels": torch.tensor([0, 2, 1, 1, 0]),
    }
    batch["index"] = torch.tensor([4, 0, 3, 1, 2])
    scores = gradient_scores(model, [batch], eigens, RHOS, task="classifier", position=position)
    expected = {}
    for b in range(5):
        store, handles = capture_inputs(model, names)
        logits = model(batch["pixel_values"][b : b + 1])
        for h in handles:
            h.remove()
        loss = F.cross_entropy(logits, batch["labels"][b : b + 1], reduction="sum")
        if position is None:
            grads = torch.autograd.grad(loss, [model.fc1.weight, model.fc2.weight])
        else:
            outputs = torch.autograd.grad(loss, [store[n]["s"] for n in names])
            grads = [
                torch.outer(g[0, position], store[n]["a"][0, position]) for n, g in zip(names, outputs, strict=True)
            ]
        expected[int(batch["index"][b])] = (
            loss.detach(),
            {n: _reference_mass(dW, eigens[n]) for n, dW in zip(names, grads, strict=True)},
        )
    _check_against(scores, expected, names, FP64)


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_causal_lm_gradient_mass_matches_per_row_autograd(case):
    build, _ = LM_CASES[case]
    model = build().double()
    modules = dict(model.named_modules())
    names = [n for n in modules if n.endswith(("mlp.up_proj", "mlp.c_proj")) and ".0." in n]
    assert len(names) == 1
    (name,) = names
    weight = modules[name].weight
    d_out, d_in = (weight.shape[1], weight.shape[0]) if is_conv1d_like(modules[name]) else weight.shape
    eigens = {name: explicit_eigen(random_spd(d_in, 0), random_spd(d_out, 1, zero_dirs=2))}
    batch = lm_batch(batch_size=5, seq_len=8, seed=2)
    scores = gradient_scores(model, split_batch(batch, 2), eigens, RHOS)
    expected = {}
    for row in range(5):
        keep = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row][keep], batch["labels"][row][keep]
        positions = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
        if not positions:
            continue
        logits = model(input_ids=ids[None]).logits[0]
        pos = torch.tensor(positions)
        losses = F.cross_entropy(logits[pos], labels[pos + 1], reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), [weight])
        dW = grad.T if is_conv1d_like(modules[name]) else grad  # [d_out, d_in]
        expected[int(batch["index"][row])] = (
            losses.mean().detach(),
            {name: _reference_mass(dW, eigens[name])},
        )
    assert len(expected) >= 3
    _check_against(scores, expected, [name], FORWARD64)


# ---------------------------------------------------------------------------- AUROC
def test_auroc_known_answers():
    labels = torch.tensor([0, 0, 1, 1])
    assert score_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert score_auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    # Hand count over the 4 (positive, negative) pairs: 0.35 beats 0.1 only, 0.8 beats both -> 3/4.
    assert score_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75, abs=1e-12)
    # A tie counts one half: positives {2, 3}, negatives {1, 2} -> (1 + 0.5 + 1 + 1) / 4.
    assert score_auroc(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.875)
    # Scores far outside [0, 1] are ranked, not squashed by a sigmoid into ties.
    assert score_auroc(torch.tensor([100.0, 200.0, 300.0, 400.0]), labels) == 1.0
    assert score_auroc(torch.tensor([-400.0, -300.0, -200.0, -100.0]), labels) == 1.0


def test_auroc_label_forms_and_errors():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    # -1 rows are left out: the 0.5 row (which would be a mistake) does not count.
    assert score_auroc(scores, torch.tensor([0, 1, -1, 1, 0])) == 1.0
    assert score_auroc(scores, torch.tensor([False, True, False, True, False])) == pytest.approx(1.0)
    assert score_aurocs({"a": scores, "b": -scores}, torch.tensor([0, 1, -1, 1, 0])) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError, match="memorized and non-memorized"):
        score_auroc(scores, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        score_auroc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="labels"):
        score_auroc(scores, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- labels, combined scores, plot
def test_memorization_labels_tinymem(tmp_path):
    from lightning_curv.data import TinyMemDataModule

    dm = TinyMemDataModule(
        num_train_per_rule=2,
        num_heldout_per_rule=1,
        num_noise=2,
        noise_duplicates=3,
        num_backdoor=1,
        backdoor_duplicates=2,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    dm.setup()
    labels = memorization_labels(dm)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [-1] * 2
    assert len(labels) == len(dm.train_dataset)


def test_memorization_labels_images_and_unknown():
    dm = SimpleNamespace(noisy_indices=torch.tensor([1, 4]), noisy_train_labels=torch.zeros(6, dtype=torch.long))
    assert memorization_labels(dm).tolist() == [0, 1, 0, 0, 1, 0]
    with pytest.raises(TypeError, match="memorized"):
        memorization_labels(object())


def _bands(index, bottom):
    bottom = torch.tensor(bottom, dtype=torch.float64)
    fractions = torch.stack([1 - bottom, torch.zeros_like(bottom), torch.zeros_like(bottom), bottom], dim=1)
    return BandFractions(torch.tensor(index), fractions, fractions, torch.ones(len(index)), band_names())


def test_memorization_scores_names_and_alignment(tmp_path):
    grads = GradientScores(
        index=torch.tensor([0, 1, 2]),
        loss=torch.tensor([0.5, 1.0, 2.0]),
        num_samples=torch.ones(3),
        rhos=(0.6, 0.9),
        grad_energy={"m": torch.tensor([1.0, 2.0, 4.0])},
        dropped_energy={"m": torch.tensor([[0.5, 0.1], [1.0, 0.2], [1.0, 0.0]])},
    )
    bands = {"m": _bands([0, 1, 2], [0.1, 0.3, 0.2]), "n": _bands([0, 1, 2], [0.3, 0.5, 0.2])}
    index, scores = memorization_scores(bands, grads)
    assert index.tolist() == [0, 1, 2]
    assert list(scores) == [
        "loss",
        "low_curvature_gradient/rho=0.6",
        "low_curvature_gradient/rho=0.9",
        "low_curvature_energy",
    ]
    assert_close(scores["low_curvature_gradient/rho=0.6"], torch.tensor([0.5, 0.5, 0.25]))
    assert_close(scores["low_curvature_energy"], torch.tensor([0.2, 0.4, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="different examples"):
        memorization_scores({"m": _bands([0, 1, 5], [0.1, 0.1, 0.1])}, grads)
    path = plot_score_histograms(scores, torch.tensor([1, 0, -1]), tmp_path / "scores.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
