"""Band fractions: checks against dense float64 computations, and the memorized/non-memorized split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_curv.analysis import (
    BandFractions,
    activation_bands,
    band_bounds,
    band_energy,
    band_mass,
    band_names,
    compare_bands,
    mean_bands,
    plot_band_comparison,
)
from lightning_curv.curvature import collect_factors, eigendecompose, valid_positions
from tests.analysis.helpers import PNG_MAGIC, capture_inputs, explicit_eigen, random_spd
from tests.cases import LLAMA_MLP, lm_batch, split_batch, tiny_llama, tiny_vit

FP64 = {"rtol": 1e-10, "atol": 1e-12}
#: Batched vs one-row forwards of a float64 transformer differ by round-off only.
FORWARD64 = {"rtol": 1e-8, "atol": 1e-10}


def test_band_bounds_and_names():
    assert band_bounds(16) == [0, 2, 4, 8, 16]
    assert band_bounds(10) == [0, 1, 3, 5, 10]
    assert band_bounds(4) == [0, 1, 2, 3, 4]  # every band keeps one eigenvector
    assert band_bounds(100) == [0, 10, 25, 50, 100]
    assert band_bounds(13) == [0, 1, 3, 7, 13]  # round(1.3), round(3.25), round(6.5) with halves up
    for d in range(4, 40):
        bounds = band_bounds(d)
        assert all(lo < hi for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)), d
    assert band_names() == ("0-10%", "10-25%", "25-50%", "50-100%")
    assert band_names((0.5,)) == ("0-50%", "50-100%")
    for bad in [(), (0.5, 0.25), (0.0, 0.5), (0.5, 1.0)]:
        with pytest.raises(ValueError, match="Band edges"):
            band_bounds(8, bad)


def test_band_energy_partitions_the_norm():
    eigen = explicit_eigen(random_spd(9, 0), random_spd(2, 1))
    x = torch.randn(5, 9, dtype=torch.float64)
    bounds = band_bounds(9)
    energy = band_energy(x, eigen.eigenvectors_A, bounds)
    assert_close(energy.sum(dim=1), x.square().sum(dim=1), **FP64)
    U = eigen.eigenvectors_A
    manual = torch.stack(
        [(x @ U[:, lo:hi]).square().sum(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)], dim=1
    )
    assert_close(energy, manual, **FP64)


def _llama_case():
    model = tiny_llama().double()
    batch = lm_batch(batch_size=6, seq_len=9, seed=1)
    names = ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    return model, batch, names


def _dense_reference(model, batch, names, eigens):
    """Each row alone, unpadded; per valid position: the band fractions by explicit projections."""
    expected = {n: {} for n in names}
    valid = valid_positions(batch["attention_mask"], batch["labels"])
    for row in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][row].bool()
        positions = valid[row].nonzero().flatten().tolist()
        if not positions:
            continue
        store, handles = capture_inputs(model, names)
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"][row][keep][None])
        finally:
            for h in handles:
                h.remove()
        for name in names:
            U = eigens[name].eigenvectors_A
            bounds = band_bounds(U.shape[0])
            fractions, energies = [], []
            for t in positions:
                a = store[name]["a"][0, t]  # [d_in]
                z = U.T @ a
                per_band = torch.stack(
                    [z[lo:hi].square().sum() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
                )
                energies.append(per_band)
                fractions.append(per_band / a.square().sum())
            expected[name][int(batch["index"][row])] = (
                torch.stack(fractions).mean(dim=0),
                torch.stack(energies).sum(dim=0),
                len(positions),
            )
    return expected


def test_band_fractions_match_dense_computation_and_sum_to_one():
    model, batch, names = _llama_case()
    dims = {n: dict(model.named_modules())[n].in_features for n in names}
    eigens = {n: explicit_eigen(random_spd(dims[n], i), random_spd(3, 9)) for i, n in enumerate(names)}
    result = activation_bands(model, [batch], eigens)
    expected = _dense_reference(model, batch, names, eigens)
    for name in names:
        bands = result[name]
        assert bands.index.tolist() == sorted(expected[name])
        assert_close(bands.fractions.sum(dim=1), torch.ones(len(bands.index), dtype=torch.float64), **FP64)
        for row, idx in enumerate(bands.index.tolist()):
            fractions, energy, count = expected[name][idx]
            assert int(bands.num_samples[row]) == count
            assert_close(bands.fractions[row], fractions, **FORWARD64)
            assert_close(bands.energy[row], energy, **FORWARD64)


def test_rows_without_samples_are_left_out():
    model, batch, names = _llama_case()
    batch["attention_mask"][2, 2:] = 0  # two tokens, and the target of position 0 is masked (-100): no sample
    batch["labels"][2, 2:] = -100
    eigens = {names[0]: explicit_eigen(random_spd(16, 0), random_spd(24, 1))}
    bands = activation_bands(model, [batch], eigens)[names[0]]
    has_samples = valid_positions(batch["attention_mask"], batch["labels"]).any(dim=1)
    assert not has_samples[2]
    assert bands.index.tolist() == batch["index"][has_samples].tolist()


def test_aggregate_energy_equals_eigenvalue_band_mass_on_the_collection_data():
    # On the data A was collected on, Σ_examples energy in a band / Σ energy = Σ_band μ / Σ μ.
    model, batch, _ = _llama_case()
    factors = collect_factors(model, [batch], LLAMA_MLP, fisher="empirical", dtype=torch.float64)
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    result = activation_bands(model, split_batch(batch, 4), eigens)
    for name, bands in result.items():
        assert int(bands.num_samples.sum()) == factors[name].num_samples
        mass = torch.tensor(list(band_mass(eigens[name].eigenvalues_A).values()), dtype=torch.float64)
        assert_close(bands.aggregate(), mass, **FORWARD64)


def test_batching_does_not_change_the_result():
    model, batch, names = _llama_case()
    eigens = {names[0]: explicit_eigen(random_spd(16, 0), random_spd(24, 1))}
    whole = activation_bands(model, [batch], eigens)[names[0]]
    pieces = activation_bands(model, split_batch(batch, 2)[::-1], eigens)[names[0]]  # other order too
    assert torch.equal(whole.index, pieces.index)
    assert_close(pieces.fractions, whole.fractions, **FORWARD64)
    assert_close(pieces.energy, whole.energy, **FORWARD64)


def test_vit_cls_position_and_cleanup():
    model = tiny_vit().double()
    model.train()  # the pass switches to eval and back, module by module
    model.blocks[0].eval()
    name = "blocks.1.mlp.fc1"
    eigens = {name: explicit_eigen(random_spd(16, 0), random_spd(64, 1))}
    images = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    batch = {"pixel_values": images, "labels": torch.tensor([0, 1, 2]), "index": torch.tensor([7, 3, 5])}
    bands = activation_bands(model, [batch], eigens, task="classifier", position=0)[name]
    assert model.training and model.blocks[1].training and not model.blocks[0].training
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    store, handles = capture_inputs(model, [name])
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    cls = store[name]["a"][:, 0]  # [3, 16]
    energy = band_energy(cls, eigens[name].eigenvectors_A, band_bounds(16))
    order = torch.tensor([1, 2, 0])  # indices 3, 5, 7
    assert bands.index.tolist() == [3, 5, 7]
    assert bands.num_samples.tolist() == [1, 1, 1]
    assert_close(bands.fractions, (energy / energy.sum(dim=1, keepdim=True))[order], **FORWARD64)


def test_wrong_module_root_is_explained():
    eigens = {"model.layers.0.mlp.gate_proj": explicit_eigen(random_spd(16, 0), random_spd(24, 1))}
    wrapper = nn.Module()
    wrapper.model = tiny_llama()
    with pytest.raises(ValueError, match="backbone"):
        activation_bands(wrapper.model.model, [lm_batch()], eigens)


def _fractions(rows: list[list[float]], index: list[int] | None = None) -> BandFractions:
    f = torch.tensor(rows, dtype=torch.float64)
    return BandFractions(
        index=torch.tensor(index if index is not None else list(range(len(rows)))),
        fractions=f,
        energy=f * 2,
        num_samples=torch.ones(len(rows), dtype=torch.long),
        names=band_names(),
    )


def test_compare_bands_known_case():
    bands = _fractions(
        [
            [0.4, 0.2, 0.2, 0.2],  # memorized
            [0.2, 0.2, 0.2, 0.4],  # memorized
            [0.5, 0.2, 0.2, 0.1],
            [0.5, 0.3, 0.1, 0.1],
            [0.0, 0.0, 0.0, 1.0],  # left out (-1)
        ]
    )
    out = compare_bands(bands, torch.tensor([1, 1, 0, 0, -1]))
    assert out["bands"] == list(band_names())
    assert (out["num_memorized"], out["num_non_memorized"]) == (2, 3 - 1)
    assert out["memorized"]["50-100%"] == pytest.approx(0.3)
    assert out["non_memorized"]["50-100%"] == pytest.approx(0.1)
    assert out["ratio"]["50-100%"] == pytest.approx(3.0)
    assert out["ratio"]["0-10%"] == pytest.approx(0.3 / 0.5)
    assert out["memorized_std"]["0-10%"] == pytest.approx(math.sqrt(0.02))
    same = compare_bands(bands, torch.tensor([True, True, False, False, False]))
    assert same["num_non_memorized"] == 3
    with pytest.raises(ValueError, match="labels"):
        compare_bands(bands, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="memorized"):
        compare_bands(bands, torch.tensor([2, 0, 0, 0, 0]))


def test_mean_bands_and_plot(tmp_path):
    a = _fractions([[0.4, 0.2, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]])
    b = _fractions([[0.2, 0.2, 0.2, 0.4], [0.3, 0.2, 0.1, 0.4]])
    mean = mean_bands({"a": a, "b": b})
    assert_close(mean.fractions, (a.fractions + b.fractions) / 2, **FP64)
    with pytest.raises(ValueError, match="different examples"):
        mean_bands({"a": a, "c": _fractions([[1, 0, 0, 0], [1, 0, 0, 0]], index=[0, 5])})
    labels = torch.tensor([1, 0])
    path = plot_band_comparison({"a": compare_bands(a, labels), "b": compare_bands(b, labels)}, tmp_path / "b.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
