"""Heterogeneity tables: block_table (stand-in and real SpectrumResult), js0_table, format_table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from analysis.tables import block_table, format_table, js0_table


@dataclass
class StandInSpectrum:
    """Duck-typed SpectrumResult: the attributes and methods block_table reads."""

    names: list = field(default_factory=lambda: ["wte.weight", "h.0.attn.q[head 0]", "ln_f.weight"])
    params: list = field(default_factory=lambda: ["wte.weight", "h.0.attn.q.weight", "ln_f.weight"])
    shapes: list = field(default_factory=lambda: [(128, 512), (64, 512), (512,)])
    sizes: np.ndarray = field(default_factory=lambda: np.array([65536, 32768, 512]))
    settings: dict = field(default_factory=dict)

    def lambda_min(self):
        return np.array([-0.5, 0.01, 2.0])

    def lambda_max(self):
        return np.array([120.0, 3.5, 2.5])

    def trace_estimate(self):
        return np.array([1000.0, 40.0, 1100.0])


def test_block_table_columns_and_values():
    spec = StandInSpectrum()
    df = block_table(spec)
    assert list(df.columns) == [
        "block", "param", "shape", "numel", "lambda_min", "lambda_max", "trace"
    ]
    assert df["block"].tolist() == spec.names
    assert df["param"].tolist() == spec.params
    assert df["shape"].tolist() == ["128x512", "64x512", "512"]
    assert df["numel"].tolist() == [65536, 32768, 512]
    assert df["numel"].dtype == np.int64
    np.testing.assert_array_equal(df["lambda_min"], spec.lambda_min())
    np.testing.assert_array_equal(df["lambda_max"], spec.lambda_max())
    np.testing.assert_array_equal(df["trace"], spec.trace_estimate())


def test_block_table_mean_js():
    spec = StandInSpectrum()
    js = np.array([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]])
    df = block_table(spec, js)
    assert list(df.columns)[-1] == "mean_js"
    np.testing.assert_allclose(df["mean_js"], [0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match=r"js must be \[B, B\]"):
        block_table(spec, np.zeros((2, 2)))


def test_block_table_single_block_and_scalar_shape():
    spec = StandInSpectrum(names=["s"], params=["s"], shapes=[()], sizes=np.array([1]))
    spec.lambda_min = lambda: np.array([1.0])
    spec.lambda_max = lambda: np.array([1.0])
    spec.trace_estimate = lambda: np.array([1.0])
    df = block_table(spec, np.zeros((1, 1)))
    assert df["shape"].tolist() == ["scalar"]
    assert np.isnan(df["mean_js"].iloc[0])


def test_block_table_inconsistent_spectrum():
    spec = StandInSpectrum(params=["a", "b"])
    with pytest.raises(ValueError, match="params"):
        block_table(spec)
    spec = StandInSpectrum()
    spec.lambda_max = lambda: np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="lambda_max"):
        block_table(spec)


def test_block_table_real_spectrum_result():
    results = pytest.importorskip("hessian_blocks.results")
    lanczos = pytest.importorskip("hessian_blocks.lanczos")
    # Diagonal tridiagonals (beta = 0): Ritz values are the alphas; trace = size * mean_k alpha_k0.
    alpha = np.array([[[1.0, 3.0], [2.0, 5.0]], [[-1.0, 0.5], [0.0, 0.25]]])  # [B=2, K=2, m=2]
    lz = lanczos.LanczosResult(alpha=alpha, beta=np.zeros_like(alpha), steps=np.full((2, 2), 2))
    spec = results.SpectrumResult(
        names=["a.weight", "b.weight[rows 0:2]"], params=["a.weight", "b.weight"],
        shapes=[(2, 3), (2, 4)], sizes=np.array([6, 8]), lanczos=lz, settings={},
    )
    df = block_table(spec, np.array([[0.0, 0.7], [0.7, 0.0]]))
    assert df["shape"].tolist() == ["2x3", "2x4"]
    np.testing.assert_allclose(df["lambda_min"], spec.lambda_min())
    np.testing.assert_allclose(df["lambda_max"], spec.lambda_max())
    np.testing.assert_allclose(df["trace"], spec.trace_estimate())
    np.testing.assert_allclose(df["lambda_min"], [1.0, -1.0])
    np.testing.assert_allclose(df["lambda_max"], [5.0, 0.5])
    np.testing.assert_allclose(df["trace"], [6 * 1.5, 8 * -0.5])
    np.testing.assert_allclose(df["mean_js"], [0.7, 0.7])


def test_js0_table_sorted_with_ratio():
    res = {"vgg16": 0.002, "bert": 0.5, "resnet18": 0.004, "gpt2-nano": 0.3}
    df = js0_table(res, baseline="vgg16")
    assert df["model"].tolist() == ["bert", "gpt2-nano", "resnet18", "vgg16"]
    np.testing.assert_allclose(df["JS0"], [0.5, 0.3, 0.004, 0.002])
    np.testing.assert_allclose(df["ratio"], [250.0, 150.0, 2.0, 1.0])
    assert df.attrs["baseline"] == "vgg16"
    assert list(df.index) == [0, 1, 2, 3]


def test_js0_table_without_baseline_and_errors():
    df = js0_table({"a": 1.0, "b": 3.0})
    assert list(df.columns) == ["model", "JS0"]
    assert df["model"].tolist() == ["b", "a"]
    with pytest.raises(ValueError, match="baseline 'c' is not among"):
        js0_table({"a": 1.0}, baseline="c")
    with pytest.raises(ValueError, match="NaN"):
        js0_table({"a": float("nan")})
    zero = js0_table({"a": 0.0, "b": 1.0}, baseline="a")
    assert zero["ratio"].tolist()[0] == np.inf


def test_format_table():
    df = js0_table({"vgg16": 0.0123456, "bert": 1.23456e-5}, baseline="vgg16")
    text = format_table(df)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["model", "JS0", "ratio"]
    assert "0.0123" in text and "1.23e-05" in text and "0.0123456" not in text
    assert len({len(line) for line in lines}) == 1  # fixed width
    spec_text = format_table(block_table(StandInSpectrum()))
    assert "128x512" in spec_text and "65536" in spec_text
    assert "empty" in format_table(pd.DataFrame(columns=["a", "b"]))
