"""The held-out study script end to end, on a tiny random copy of the embedded model: every
configuration measured, the summary written, and a rerun that reads what was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert printed.count("best Power Steering-derived:") == 2
    assert "refined_random_subspace: each subspace's vector on the held-out prompts" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "steerability-sentiment.html", "summary.md", "transfer-sentiment-lean.safetensors",
        "transfer-sentiment.safetensors",
    ]  # fmt: skip
    lean = tps.load(out / "transfer-sentiment-lean.safetensors")
    assert lean.complete and lean.methods == [
        "power_steering", "refined_power_steering", "refined_random_subspace", "random",
    ]  # fmt: skip
    # 2 block iterations with a block of 8: 16 JVPs and 16 VJPs, then the refinement's own.
    assert lean.passes["power_steering"] == 32 < lean.passes["refined_power_steering"]
    assert sum(label == "refined_random_subspace" for label in lean.labels) == 2
    summary = (out / "summary.md").read_text()
    assert "### sentiment: lean Power Steering (2 block iterations, block 8)" in summary
    # A rerun reads both results instead of measuring again, and writes the same summary.
    (out / "summary.md").unlink()

    def measured_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rerun measured again")

    for name in ("steerability", "transfer"):
        monkeypatch.setattr(tps, name, measured_again)
    monkeypatch.setattr(study_transfer, "lean_run", measured_again)
    assert study_transfer.main(argv) == 0
    assert (out / "summary.md").read_text() == summary
