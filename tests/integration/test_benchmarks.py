"""The benchmark scripts run end to end on a very small model (no timings are asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_bench_power(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_power

    assert (
        bench_power.main(["--d-model", "32", "--layers", "3", "--seq", "6", "--pairs", "0:2"]) == 0
    )
    out = capsys.readouterr().out
    assert "L0 -> L2" in out and "median speed-up over the reference" in out
    assert "met the accuracy targets on every pair: True" in out


def test_bench_products(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_products

    assert bench_products.main(["--d-model", "32", "--layers", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward-mode / reverse-over-reverse matvec" in out
    agree = float(out.split("methods agree to ")[1].split()[0])
    assert agree < 1e-4


def test_bench_atlas(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    assert bench_atlas.main(["--d-model", "16", "--layers", "3", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference (pair by pair, to 1e-3):" in out
    exact_row = next(line for line in out.splitlines() if line.strip().startswith("exact"))
    assert "1.00x" in exact_row and exact_row.split()[-5:-3] == ["0.00e+00", "0.00e+00"]
    assert any(line.strip().startswith("sketch") for line in out.splitlines())
