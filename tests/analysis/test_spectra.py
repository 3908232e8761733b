"""Spectrum summaries agree with the edit's mask; plots are written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.analysis import (
    band_mass,
    effective_rank,
    kept_pairs,
    participation_ratio,
    plot_pair_curvature,
    plot_spectra,
    spectrum_summary,
    summarize_spectra,
)
from lightning_curv.curvature import curvature_mask, pair_curvature
from tests.analysis.helpers import PNG_MAGIC, explicit_eigen, random_spd

FP64 = {"rtol": 1e-12, "atol": 1e-14}
RHOS = (0.01, 0.3, 0.6, 0.75, 0.9, 0.999, 1.0)


@pytest.mark.parametrize("zero_dirs", [0, 2])
def test_kept_fraction_equals_curvature_mask(zero_dirs):
    eigen = explicit_eigen(random_spd(7, 0), random_spd(5, 1, zero_dirs=zero_dirs))
    pi = pair_curvature(eigen)
    for row in kept_pairs(eigen, RHOS):
        mask, kept_mass = curvature_mask(eigen, row["rho"])
        assert row["kept_pairs"] == int(mask.sum())
        assert row["kept_pair_fraction"] == float(mask.double().mean())
        assert row["kept_mass"] == kept_mass
        if row["rho"] < 1:
            assert row["threshold"] == float(pi[mask].min())
            if (~mask).any():
                assert float(pi[~mask].max()) <= row["threshold"]


def test_smallest_rho_keeps_top_pair_and_one_keeps_all():
    eigen = explicit_eigen(random_spd(4, 2), random_spd(3, 3))
    low, full = kept_pairs(eigen, [1e-9, 1.0])
    assert low["kept_pairs"] == 1
    assert full["kept_pairs"] == 12 and full["kept_pair_fraction"] == 1.0 and full["kept_mass"] == 1.0


def test_effective_rank_and_participation_ratio_known_values():
    assert effective_rank(torch.ones(6)) == pytest.approx(6.0, rel=1e-12)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert participation_ratio(torch.ones(5)) == pytest.approx(5.0, rel=1e-12)
    # Two equal directions out of four: exp(log 2) = 2.
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx(2.0, rel=1e-12)


def test_band_mass_matches_manual_sums():
    values = torch.arange(20, 0, -1, dtype=torch.float64)  # descending 20..1, total 210
    mass = band_mass(values)
    assert list(mass) == ["0-10%", "10-25%", "25-50%", "50-100%"]
    # Bounds for d = 20: [0, 2, 5, 10, 20].
    expected = [20 + 19, 18 + 17 + 16, sum(range(11, 16)), sum(range(1, 11))]
    got = torch.tensor(list(mass.values()), dtype=torch.float64)
    assert_close(got, torch.tensor(expected, dtype=torch.float64) / 210, **FP64)


def test_spectrum_summary_is_consistent_and_json_serialisable():
    eigen = explicit_eigen(random_spd(6, 4), random_spd(4, 5, zero_dirs=1), num_samples=17)
    summary = spectrum_summary(eigen, rhos=(0.5, 0.9))
    json.dumps(summary)
    assert (summary["d_out"], summary["d_in"], summary["num_samples"]) == (4, 6, 17)
    assert summary["A"]["trace"] == pytest.approx(float(eigen.eigenvalues_A.sum()), rel=1e-12)
    assert summary["G"]["num_zero"] == 1
    assert summary["pairs"]["num_zero"] == 6  # one zero λ times six μ
    assert summary["pairs"]["num_pairs"] == 24
    # The entropy of an outer product is the sum of the entropies: erank(Π) = erank(λ) erank(μ).
    assert summary["pairs"]["effective_rank"] == pytest.approx(
        summary["A"]["effective_rank"] * summary["G"]["effective_rank"], rel=1e-10
    )
    assert math.fsum(summary["pairs"]["band_mass"].values()) == pytest.approx(1.0, rel=1e-12)
    masks = [curvature_mask(eigen, rho)[0] for rho in (0.5, 0.9)]
    assert [r["kept_pair_fraction"] for r in summary["rho"]] == [float(m.double().mean()) for m in masks]


def test_summarize_spectra_keys():
    eigens = {
        "b": explicit_eigen(random_spd(3, 0), random_spd(2, 1)),
        "a": explicit_eigen(random_spd(2, 2), random_spd(3, 3)),
    }
    assert list(summarize_spectra(eigens, rhos=(0.6,))) == ["b", "a"]


def test_kept_pairs_rejects_bad_rho():
    eigen = explicit_eigen(random_spd(3, 0), random_spd(2, 1))
    with pytest.raises(ValueError, match="rho"):
        kept_pairs(eigen, [0.0])


def test_plots_write_png(tmp_path):
    eigens = {
        "layer.0": explicit_eigen(random_spd(8, 0), random_spd(6, 1, zero_dirs=2)),
        "layer.1": explicit_eigen(random_spd(6, 2), random_spd(8, 3)),
    }
    for path in (
        plot_spectra(eigens, tmp_path / "spectra.png"),
        plot_pair_curvature(eigens, (0.6, 0.9), tmp_path / "sub" / "pairs.png"),
    ):
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["pairs.png", "spectra.png"]
