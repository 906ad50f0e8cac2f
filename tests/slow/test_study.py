"""The held-out study script end to end, on a tiny random copy of the embedded model: every
part measured, the summary written, a rerun that reads what was measured, and one part
measured alone beside the default part's file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tl_powersteer as tps

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_study_writes_every_configuration_and_reruns_from_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import study_transfer
    import tiny_model

    tiny_model.main(str(tmp_path / "tiny"))
    out = tmp_path / "study"
    argv = ["--model", str(tmp_path / "tiny"), "--families", "sentiment", "--quick",
            "--out", str(out)]  # fmt: skip
    assert study_transfer.main(argv) == 0
    printed = capsys.readouterr().out
    assert "== sentiment (" in printed and "== sentiment, lean (" in printed
    assert "== sentiment, control (" in printed
    assert printed.count("best Power Steering-derived:") == 2
    assert "refined_random_subspace: each subspace's vector on the held-out prompts" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "steerability-sentiment.html", "summary.md", "transfer-sentiment-control.safetensors",
        "transfer-sentiment-lean.safetensors", "transfer-sentiment.safetensors",
    ]  # fmt: skip
    lean = tps.load(out / "transfer-sentiment-lean.safetensors")
    assert lean.complete and lean.methods == [
        "power_steering", "refined_power_steering", "refined_random_subspace", "random",
    ]  # fmt: skip
    # 2 block iterations with a block of 8: 16 JVPs and 16 VJPs, then the refinement's own.
    assert lean.passes["power_steering"] == 32 < lean.passes["refined_power_steering"]
    assert sum(label == "refined_random_subspace" for label in lean.labels) == 2
    control = tps.load(out / "transfer-sentiment-control.safetensors")
    assert control.complete and control.methods == ["refined_random_subspace", "random"]
    # The same subspaces as the lean part's control, refined the full way: more passes.
    assert control.passes["refined_random_subspace"] > lean.passes["refined_random_subspace"]
    assert control.names == [n for n in lean.names if n.startswith("refined random subspace")]
    # The same random controls as the default part, so the ratios compare.
    default = tps.load(out / "transfer-sentiment.safetensors")
    assert torch.allclose(
        control.control_eval_effects, default.control_eval_effects, rtol=1e-2, equal_nan=True
    )
    summary = (out / "summary.md").read_text()
    assert "### sentiment: lean Power Steering (2 block iterations, block 8)" in summary
    assert "### sentiment: the full refinement inside random subspaces (control)" in summary
    assert "refined_power_steering (the converged subspace, refined the same way)" in summary
    # A rerun reads both results instead of measuring again, and writes the same summary.
    (out / "summary.md").unlink()

    def measured_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rerun measured again")

    for name in ("steerability", "transfer"):
        monkeypatch.setattr(tps, name, measured_again)
    monkeypatch.setattr(study_transfer, "lean_run", measured_again)
    monkeypatch.setattr(study_transfer, "random_subspaces", measured_again)
    assert study_transfer.main(argv) == 0
    assert (out / "summary.md").read_text() == summary

    # One part alone, beside the default part's file: only that part is measured; the
    # default part is read and reported, and the control compared with its refined vector.
    monkeypatch.undo()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "transfer-sentiment.safetensors", alone)
    monkeypatch.setattr(tps, "steerability", measured_again)
    monkeypatch.setattr(study_transfer, "lean_run", measured_again)
    assert study_transfer.main([*argv[:-1], str(alone), "--parts", "control"]) == 0
    assert sorted(p.name for p in alone.iterdir()) == [
        "steerability-sentiment.html", "summary.md", "transfer-sentiment-control.safetensors",
        "transfer-sentiment.safetensors",
    ]  # fmt: skip
    assert tps.load(alone / "transfer-sentiment-control.safetensors").directions.allclose(
        control.directions
    )
    text = (alone / "summary.md").read_text()
    assert "## sentiment\n" in text and "(control)" in text and "refined the same way" in text
    assert "lean Power Steering" not in text
