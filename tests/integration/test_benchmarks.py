"""The benchmark scripts run end to end on a very small model (no timings are asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    assert "L0 -> L2" in out and "speed-up over the reference: median" in out
    assert "power_steer met the accuracy targets on every pair: True" in out
    assert "the bound covered power_steer's σ error on every pair: True" in out


def test_bench_products(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_products

    assert bench_products.main(["--d-model", "32", "--layers", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward-mode / reverse-over-reverse matvec" in out
    assert "reverse matvec, frozen / trainable weights" in out
    agree = float(out.split("methods agree to ")[1].split()[0])
    assert agree < 1e-4


def test_bench_atlas(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    assert bench_atlas.main(["--d-model", "16", "--layers", "3", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference (pair by pair, to 1e-3):" in out
    exact_row = next(line for line in out.splitlines() if line.split()[:1] == ["exact"])
    assert "1.00x" in exact_row and exact_row.split()[-5:-3] == ["0.00e+00", "0.00e+00"]
    assert any(line.strip().startswith("sketch") for line in out.splitlines())
    assert "matrix products of exact alone, at this CPU's fp32 GEMM rate" in out
    assert "power iterations it needed per pair: median" in out


def test_bench_atlas_sketch_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    argv = ["--d-model", "16", "--layers", "3", "--k", "2", "--no-reference"]
    assert bench_atlas.main([*argv, "--sketch-ranks", "3", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines() if line.strip().startswith("sketch")]
    assert rows == [["sketch", "r=3"], ["sketch", "r=8"]]
    tail = next(line for line in out.splitlines() if line.startswith("spectrum of L"))
    # σ_{k+1} and σ_{4r+1} for r = 3 (4r + 1 = 33 is past d_model 16 for r = 8).
    assert [part.split()[0] for part in tail.split(": ", 1)[1].split(", ")] == [
        "σ3/σ1", "σ13/σ1",
    ]  # fmt: skip


def test_bench_atlas_sketch_matmuls(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    argv = ["--d-model", "16", "--layers", "3", "--k", "2", "--no-reference", "--methods"]
    argv += ["sketch", "--sketch-ranks", "16", "--sketch-matmuls", "float32", "bfloat16"]
    assert bench_atlas.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("sketch")]
    assert [row[:3] for row in rows] == [
        ["sketch", "r=16", "float32"],
        ["sketch", "r=16", "bfloat16"],
    ]
    # At full rank only the rounded products err (the worst error, before the worst pair).
    assert float(rows[0][-4]) < 1e-5 < float(rows[1][-4]) < 2e-2


def test_peak_growth_is_each_runs_own() -> None:
    import time

    import bench_atlas

    def hold(mb: int) -> None:
        block = torch.ones(mb * 2**20 // 4)  # written, so resident
        time.sleep(0.05)  # long enough to be sampled
        del block

    cpu = torch.device("cpu")
    with bench_atlas.peak_growth(cpu) as first:
        hold(256)
    with bench_atlas.peak_growth(cpu) as second:
        hold(64)
    # The second run's peak is its own, not the process's (still the first one's).
    assert 240 < first[0] < 300 and 56 < second[0] < 100


def test_matmul_floor_counts_every_block_crossed() -> None:
    from types import SimpleNamespace

    import bench_atlas

    cfg = SimpleNamespace(
        d_model=4, d_head=2, n_heads=2, n_key_value_heads=None, d_mlp=8, gated_mlp=False
    )
    seconds, rate = bench_atlas.matmul_floor(cfg, [(0, 1), (0, 2), (1, 2)], 5, 1, chunk=2)
    # Per token and block: Q, K, V, O (4 x 4 x 2 x 2) + MLP (2 x 4 x 8) = 128 multiply-adds;
    # source 0 crosses block 1 and the read positions of block 2, source 1 only the latter.
    blocks = (1 + 1 / 5) + (0 + 1 / 5)
    assert seconds * rate == pytest.approx(2 * 128 * 5 * 4 * blocks)
    assert rate > 0


def test_bench_atlas_sources_and_chunk(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    argv = ["--d-model", "16", "--layers", "3", "--k", "2", "--no-reference", "--methods", "exact"]
    assert bench_atlas.main([*argv, "--sources", "0", "--chunk-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 layers, d_model 16, 2 pairs, top-2, CPU threads" in out
    exact_row = next(line for line in out.splitlines() if line.split()[:1] == ["exact"])
    assert exact_row.split()[-3:] == ["L0", "->", "L1"]
    assert not any(line.strip().startswith("sketch") for line in out.splitlines())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sources", "9"], "sources=9 is out of range"),
        (["--chunk-size", "0"], "chunk_size must be a positive int (or None"),
        (["--sketch-ranks", "1"], "sketch_rank must be an int between k + 1 = 3"),
    ],
)
def test_bench_atlas_bad_options(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    import bench_atlas

    argv = ["--d-model", "16", "--layers", "3", "--k", "2", *extra]
    with pytest.raises(SystemExit) as exit_info:
        bench_atlas.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_bench_atlas_cuda_needs_a_device(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_atlas

    with pytest.raises(SystemExit) as exit_info:
        bench_atlas.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err


def test_tiny_model_leaves_no_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import bench_power

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = bench_power.tiny_gpt2(16, 2)
    assert [p for p in tmp_path.iterdir() if p.name.startswith("bench_gpt2_")] == []
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1000)


def test_bench_effects(gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_effects

    argv = ["--model", gpt2_dir, "--prompt", "the cat sat on the mat", "--answers", "good",
            "bad", "--kl", "1e-3", "--top", "2", "--controls", "2",
            "--atlas", str(tmp_path / "atlas.safetensors")]  # fmt: skip
    assert bench_effects.main(argv) == 0
    out = capsys.readouterr().out
    assert "atlas (exact, k=2):" in out and (tmp_path / "atlas.safetensors").exists()
    assert "6 pairs x top 2 + 2 random controls per source = 18 vectors" in out
    assert "speed-up of the map:" in out and "same top-10 (vector and sign): True" in out
    gap = float(out.split("largest effect difference: ")[1].split()[0])
    assert gap < 1e-3
    # A second run reads the atlas, and compares on some source layers only.
    assert bench_effects.main([*argv, "--reference-sources", "1:3"]) == 0
    out = capsys.readouterr().out
    assert "atlas (exact" not in out and "source layers [1, 2]: 3 pairs" in out


def test_bench_generation(gpt2_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_generation

    argv = ["--model", gpt2_dir, "--prompt", "the cat sat on the mat", "--source", "1",
            "--rows", "6", "--tokens", "4", "--reference-rows", "3", "--relative", "2"]  # fmt: skip
    assert bench_generation.main(argv) == 0
    out = capsys.readouterr().out
    assert "6 rows at blocks.1.hook_mlp_out, 4 new tokens" in out
    assert "batch_generations, up to 256 rows a batch:" in out
    assert "generate_steered, one row at a time:" in out and "speed-up per row" in out
    assert "same texts (reference rows, and both batch sizes): True" in out
