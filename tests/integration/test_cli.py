"""The command line, in-process through main(argv), on a tiny local model."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.browse import AtlasServer
from tl_powersteer.cli import build_parser, main


def vectors_args(gpt2_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        "vectors", "--prompt", "the cat sat on the mat", "--prompt", "i liked it",
        "--source", "0", "--target", "2", "--k", "3", "--model", gpt2_dir,
        "--dtype", "float64", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def test_vectors(gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.safetensors"
    assert main(vectors_args(gpt2_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "L0 hook_mlp_out -> L2 hook_mlp_out" in printed and "converged" in printed
    assert "singular_value" in printed and f"saved {out}" in printed
    saved = tps.load(out)
    model = tps.load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    direct = tps.power_steer(model, ["the cat sat on the mat", "i liked it"], 0, 2, k=3)
    torch.testing.assert_close(saved.vectors, direct.vectors, atol=1e-12, rtol=0)
    assert saved.prompts == ["the cat sat on the mat", "i liked it"]
    for line, sigma in zip(printed.splitlines()[3:6], direct.singular_values, strict=True):
        assert f"{sigma:.4f}" in line


def test_former_option_name_still_works(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    assert main(vectors_args(gpt2_dir, out, "--positions", "2")) == 0
    assert "--positions is now --target-positions" in capsys.readouterr().err
    assert tps.load(out).target_positions == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--k", "0"], "--k must be at least 1"),
        (["--target-positions", "0"], "--target-positions must be at least 1"),
        (["--target", "0"], r"--target \(0\) must come after --source \(0\)"),
        (["--tol", "0"], "--tol must be positive"),
        (["--source", "x"], "argument --source: invalid int value: 'x'"),
        (["--kind", "other"], "argument --kind: invalid choice"),
        (["--source-site", "hook_mlp"], "unknown site 'hook_mlp'"),
        (["--target", "9"], "target=9 is out of range"),
        (["--prompt", " "], "--prompt must not be empty"),
    ],
)
def test_bad_arguments_one_line_exit_2_no_file(
    gpt2_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    message: str,
) -> None:
    out = tmp_path / "v.safetensors"
    assert main(vectors_args(gpt2_dir, out, *change)) == 2
    err = capsys.readouterr().err
    assert err.count("tl-powersteer: error: ") == 1 and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith("tl-powersteer: error: ") and re.search(message, line), err
    assert list(tmp_path.iterdir()) == []


def test_bad_out_paths(gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(vectors_args(gpt2_dir, tmp_path / "v.pt")) == 2
    assert main(vectors_args(gpt2_dir, tmp_path / "nope" / "v.safetensors")) == 2
    err = capsys.readouterr().err
    assert "--out must be a file ending in .safetensors" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vectors", "--prompt", "hi"]) == 2
    assert "required: --source, --target" in capsys.readouterr().err
    assert main([]) == 2


def test_unreachable_model_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["vectors", "--prompt", "hi", "--source", "0", "--target", "1",
            "--model", "no-such-org/none", "--out", str(tmp_path / "v.safetensors")]  # fmt: skip
    assert main(args) == 1
    assert "gemma-3-270m" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_writes_and_replaces_its_folder(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--model", gpt2_dir, "--source", "0", "--target", "3", "--k", "2",
            "--prompt", "the movie was not very good but so", "--answers", "good", "bad",
            "--scale-mode", "absolute", "--scales", "0,5", "--max-new-tokens", "4",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "effects.csv",
        "generations.csv",
        "summary.md",
        "vectors.csv",
        "vectors.safetensors",
    ]
    generations = pd.read_csv(out / "generations.csv", keep_default_na=False)
    assert len(generations) == 1 + 2 * 2 * 2  # baseline, then 2 vectors x 2 signs x 2 scales
    effects = pd.read_csv(out / "effects.csv")
    assert set(effects["method"]) == {"power_steering", "random"}
    assert effects[effects["scale"] == 0]["delta"].abs().max() == 0
    assert f"demo outputs written to {out.resolve()}" in capsys.readouterr().out
    first = tps.load(out / "vectors.safetensors")
    assert (first.source, first.target, first.k) == (0, 3, 2)
    assert "the movie was not very good but so" in (out / "summary.md").read_text()
    assert main([*args[:-1], str(out), "--seed", "1"]) == 0  # a previous demo is replaced
    assert tps.load(out / "vectors.safetensors").seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    assert "not a previous output folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_every_option_is_explained() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"vectors", "atlas", "merge", "browse", "steer", "demo", "doctor"}
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.dest}"
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0


def test_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tl_powersteer", "vectors", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "--source" in done.stdout and "--out" in done.stdout


def test_atlas(gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "atlas"
    args = ["atlas", "--prompt", "the cat sat on the mat", "--sources", "0:2", "--targets",
            "2,3", "--k", "2", "--model", gpt2_dir, "--dtype", "float64", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["atlas.csv", "atlas.html", "atlas.safetensors"]
    assert "atlas of 4 pairs (exact)" in capsys.readouterr().out
    atlas = tps.load(out / "atlas.safetensors")
    assert atlas.pairs() == [(0, 2), (0, 3), (1, 2), (1, 3)] and atlas.is_complete()
    assert len((out / "atlas.csv").read_text().splitlines()) == 1 + 4 * 2
    assert main(args) == 0  # a rerun resumes from the finished checkpoint
    # A damaged checkpoint: one line naming it, exit 2, no traceback.
    capsys.readouterr()
    data = (out / "atlas.safetensors").read_bytes()
    (out / "atlas.safetensors").write_bytes(data[: len(data) // 2])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "atlas.safetensors" in err and "Traceback" not in err, err


def test_atlas_with_answers_maps_effects_onto_the_page(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "atlas"
    # The tiny random model saturates well below 0.05 nats of next-token KL.
    plain = ["atlas", "--prompt", "i watched the movie last night", "--sources", "0:2", "--k",
             "2", "--model", gpt2_dir, "--dtype", "float64", "--kl", "1e-3", "--out", str(out)]  # fmt: skip
    args = [*plain, "--answers", "good", "bad", "--controls", "2", "--generate-tokens", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"atlas of 5 pairs \(exact\) in [0-9.]+ s; [0-9] of 5 pairs beat random "
                     r"directions at 0.001 nats; open ", printed), printed  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == ["atlas.csv", "atlas.html", "atlas.safetensors", "effects.csv",
                     "effects.safetensors"]  # fmt: skip
    found = tps.load(out / "effects.safetensors")
    model = tps.load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    again = tps.atlas_effects(model, tps.load(out / "atlas.safetensors"), answers=("good", "bad"),
                              kl=1e-3, top=2, controls=2, generate=3, progress=False)  # fmt: skip
    pd.testing.assert_frame_equal(found.to_pandas(), again.to_pandas())
    assert found.generations == again.generations and len(found.generations) == 1 + 5 * 4 + 2 * 4
    table = pd.read_csv(out / "effects.csv")
    assert list(table.source) == [0, 0, 0, 1, 1] and "beats_random" in table.columns
    html = (out / "atlas.html").read_text()
    data = json.loads(html.split('<script id="atlas-data" type="application/json">')[1]
                      .split("</script>")[0].replace("<\\/", "</"))  # fmt: skip
    assert data["map"]["texts"] == {k: v for k, v in found.generations.items() if k != "baseline"}
    assert data["tokens"]["kl"] == 1e-3 and data["map"]["kl"] == 1e-3
    # Without --answers the same folder gets a page without the map, and no stale map.
    assert main(plain) == 0
    assert not (out / "effects.safetensors").exists() and not (out / "effects.csv").exists()
    assert '"map": null' in (out / "atlas.html").read_text()


def test_browse_serves_the_atlas_and_its_effect_map(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "atlas"
    assert main(["atlas", "--prompt", "the cat sat on the mat", "--sources", "0:2", "--k", "2",
                 "--model", gpt2_dir, "--dtype", "float64", "--answers", "good", "bad", "--kl",
                 "1e-3", "--generate-tokens", "2", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    seen: dict[str, Any] = {}

    def serve_until_ctrl_c(self: AtlasServer) -> None:
        self.start()  # serves in a thread, so that this one can ask it for the page
        status, page = _get(self.url)
        seen.update(status=status, page=page, server=self)
        os.kill(os.getpid(), signal.SIGTERM)  # stops it as Ctrl-C would
        time.sleep(10)  # the handler interrupts this

    monkeypatch.setattr(AtlasServer, "serve_forever", serve_until_ctrl_c)
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    assert main(["browse", str(out), "--model", gpt2_dir, "--dtype", "float64"]) == 0
    printed = capsys.readouterr().out
    server = seen["server"]
    assert f"serving the atlas of 5 pairs at {server.url} (Ctrl-C stops)" in printed
    assert printed.rstrip().endswith("stopped") and opened == [server.url]
    assert seen["status"] == 200 and '"live": {' in seen["page"]
    assert '"map": {' in seen["page"]  # the effect map beside the atlas is on the page
    assert server.url.startswith("http://127.0.0.1:") and len(server.token) >= 32
    with pytest.raises(OSError):
        _get(server.url)  # shut down


def _get(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.status, answer.read().decode()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["nowhere"], "'nowhere' is neither an atlas file nor a folder holding atlas.safetensors"),
        (["ATLAS", "--port", "70000"], "--port must be 0 (a free port) to 65535"),
        (["ATLAS", "--effects", "missing.safetensors"], "is no file"),
        (["EFFECTS"], "is no atlas (it holds AtlasEffects)"),
        (["ATLAS", "--effects", "ATLAS"], "is no effect map (it holds SensitivityAtlas)"),
    ],
)
def test_browse_refuses_bad_arguments_before_serving(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str],
    message: str,
) -> None:  # fmt: skip
    out = tmp_path / "atlas"
    assert main(["atlas", "--prompt", "the cat sat", "--sources", "2:", "--k", "1", "--model",
                 gpt2_dir, "--answers", "good", "bad", "--kl", "1e-3", "--generate-tokens",
                 "0", "--out", str(out)]) == 0  # fmt: skip
    paths = {"ATLAS": str(out / "atlas.safetensors"), "EFFECTS": str(out / "effects.safetensors")}
    capsys.readouterr()
    args = ["browse", *[paths.get(a, a) for a in change], "--model", gpt2_dir, "--no-browser"]
    assert main(args) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("tl-powersteer: error: ") and message in line, line


def _atlas_shard(gpt2_dir: str, out: Path, *extra: str) -> list[str]:
    return ["atlas", "--prompt", "the cat sat on the mat", "--k", "2", "--method", "exact",
            "--model", gpt2_dir, "--dtype", "float64", "--out", str(out), *extra]  # fmt: skip


def test_merge_shards_into_the_whole_atlas(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_atlas_shard(gpt2_dir, tmp_path / "whole")) == 0
    assert main(_atlas_shard(gpt2_dir, tmp_path / "a", "--sources", "0:2")) == 0
    assert main(_atlas_shard(gpt2_dir, tmp_path / "b", "--sources", "2:")) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    model = ["--model", gpt2_dir, "--dtype", "float64"]
    # A folder and a file, in either order.
    shards = [str(tmp_path / "b" / "atlas.safetensors"), str(tmp_path / "a")]
    assert main(["merge", *shards, *model, "--out", str(out)]) == 0
    assert (
        "merged 2 shards into an atlas of 6 pairs (exact, sources 0..2)" in capsys.readouterr().out
    )
    assert sorted(p.name for p in out.iterdir()) == ["atlas.csv", "atlas.html", "atlas.safetensors"]
    merged, whole = (
        tps.load(out / "atlas.safetensors"),
        tps.load(tmp_path / "whole" / "atlas.safetensors"),
    )
    assert merged.sources == whole.sources == [0, 1, 2] and merged.is_complete()
    assert torch.equal(merged.singular_values.nan_to_num(), whole.singular_values.nan_to_num())
    assert (out / "atlas.csv").read_text() == (tmp_path / "whole" / "atlas.csv").read_text()
    html = (out / "atlas.html").read_text()
    assert "L0 -> L3" in html or "0,3" in html
    assert main(["merge", *shards, *model, "--out", str(out)]) == 0  # a previous output is replaced
    # With --answers the merged page gets the effect map of the whole atlas.
    answers = ["--answers", "good", "bad", "--kl", "1e-3", "--generate-tokens", "2"]
    assert main(["merge", *shards, *model, *answers, "--out", str(out)]) == 0
    assert "pairs beat random directions at 0.001 nats" in capsys.readouterr().out
    found = tps.load(out / "effects.safetensors")
    assert found.pairs() == tps.load(out / "atlas.safetensors").pairs()
    assert '"map": {' in (out / "atlas.html").read_text()


def test_merge_refuses_before_writing(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_atlas_shard(gpt2_dir, tmp_path / "a", "--sources", "0:2")) == 0
    assert main(_atlas_shard(gpt2_dir, tmp_path / "k3", "--sources", "2:", "--k", "3")) == 0
    assert main(_atlas_shard(gpt2_dir, tmp_path / "b", "--sources", "2:")) == 0
    (tmp_path / "notes.txt").write_text("mine")
    model = ["--model", gpt2_dir, "--dtype", "float64"]
    out = str(tmp_path / "merged")
    cases = [
        ([str(tmp_path / "a"), str(tmp_path / "k3"), *model], "shard 1 was computed with another k"),
        ([str(tmp_path / "a"), str(tmp_path / "nope"), *model], "is neither an atlas file nor a folder"),
        ([str(tmp_path / "a"), str(tmp_path / "notes.txt"), *model], "is not a readable safetensors file"),
        ([str(tmp_path / "a"), str(tmp_path / "b"), "--model", gpt2_dir, "--dtype", "float32"],
         "weights are not those the atlas was computed on"),
    ]  # fmt: skip
    capsys.readouterr()
    for args, message in cases:
        assert main(["merge", *args, "--out", out]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "merged").exists()
    shard_folder = str(tmp_path / "a")
    assert main(["merge", shard_folder, str(tmp_path / "b"), *model, "--out", shard_folder]) == 2
    assert "holds the shard" in capsys.readouterr().err
    assert tps.load(tmp_path / "a" / "atlas.safetensors").sources == [0, 1]


@pytest.mark.parametrize(("matmuls", "recorded"), [("full", "float64"), ("bfloat16", "bfloat16")])
def test_atlas_sketch_options(
    gpt2_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    matmuls: str,
    recorded: str,
) -> None:
    out = tmp_path / "atlas"
    args = ["atlas", "--prompt", "the cat sat on the mat", "--sources", "0:2", "--k", "2",
            "--method", "sketch", "--sketch-rank", "5", "--sketch-matmuls", matmuls,
            "--model", gpt2_dir, "--dtype", "float64", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert f"pairs (sketch (r = 5, {recorded} products))" in capsys.readouterr().out
    atlas = tps.load(out / "atlas.safetensors")
    assert (atlas.method, atlas.sketch_rank, atlas.sketch_matmul_dtype) == ("sketch", 5, recorded)
    assert atlas.is_complete()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--method", "sketch", "--sketch-rank", "2"], "sketch_rank must be an int between"),
        (["--method", "exact", "--sketch-rank", "8"], "apply to --method sketch (or auto)"),
        (["--method", "power", "--sketch-matmuls", "full"], "not power; drop them"),
        (["--sketch-matmuls", "float16"], "invalid choice"),
        (["--sources", "a:b"], "expected start:stop or a comma list"),
        (["--sources", "3:3"], "selects no layer"),
        (["--sources", "3", "--targets", "1"], "no pair with target > source"),
        (["--target-site", "nope"], "unknown site 'nope'"),
        (["--k", "0"], "--k must be at least 1"),
        (["--method", "fastest"], "invalid choice"),
        (["--top", "2"], "--top apply to the effect map, which --answers A B asks for"),
        (["--answers", "good", "bad", "--k", "2", "--top", "3"], "--top must be between 1 and"),
        (["--answers", "good", "bad", "--controls", "0"], "--controls must be at least 1"),
        (["--answers", "good", "bad", "--generate-tokens", "-1"], "must be 0 or more"),
        (["--kl", "0"], "--kl must be a positive number of nats"),
        (["--answers", "good", "cat sat"], "is 2 tokens"),
    ],
)
def test_atlas_bad_arguments_leave_nothing(
    gpt2_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    message: str,
) -> None:
    args = [
        "atlas",
        "--prompt",
        "the cat sat",
        "--model",
        gpt2_dir,
        "--out",
        str(tmp_path / "a"),
        *change,
    ]
    assert main(args) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("tl-powersteer: error: ") and message in line
    assert list(tmp_path.iterdir()) == []


def steer_args(gpt2_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        "steer", "--prompt", "the movie was not very good but so", "--prompt", "i liked it",
        "--source", "1", "--target", "3", "--k", "2", "--model", gpt2_dir, "--dtype", "float64",
        "--positive", "the movie was good", "--negative", "the movie was bad",
        "--melbo-steps", "10", "--scale-mode", "absolute", "--scales", "3",
        "--answers", "good", "bad", "--max-new-tokens", "3", "--controls", "1",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_steer_compares_methods(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "steer"
    assert main(steer_args(gpt2_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "power_steering: 2 vectors" in printed and "melbo: 2 vectors" in printed
    assert "caa: 1 vector from 1 prompt pairs" in printed
    names = sorted(p.name for p in (out / "vectors").iterdir())
    assert names == [
        "00_power_steering.safetensors", "01_power_steering.safetensors",
        "02_melbo.safetensors", "03_melbo.safetensors", "04_caa.safetensors",
    ]  # fmt: skip
    model = tps.load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    caa = tps.caa_vector(
        model, ["the movie was good"], ["the movie was bad"], 1, site="hook_mlp_out"
    )
    torch.testing.assert_close(
        tps.load(out / "vectors" / "04_caa.safetensors").direction, caa.direction
    )
    effects = pd.read_csv(out / "effects.csv")
    # 5 vectors and 1 random control, 2 signs, 1 scale, 2 prompts.
    assert len(effects) == 6 * 2 * 2 and set(effects["prompt"]) == {0, 1}
    direct = tps.effect(model, ["the movie was not very good but so", "i liked it"], caa, [3.0],
                        metric="logit_diff", answers=("good", "bad"))  # fmt: skip
    rows = effects[effects["method"] == "caa"]
    assert rows["delta"].to_numpy() == pytest.approx(direct["delta"].to_numpy(), abs=1e-9)
    generations = pd.read_csv(out / "generations.csv", keep_default_na=False)
    assert len(generations) == 1 + 5 * 2 and generations.loc[0, "vector"] == "baseline"
    assert "## Generations from" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--negative", "x"], "got 1 --positive and 2 --negative"),
        (["--methods", "caa,lasso"], "unknown method"),
        (["--scales", "1,inf"], "finite and non-negative"),
        (["--scales", "-1"], "finite and non-negative"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--melbo-radius", "0"], "--melbo-radius must be positive"),
        (["--scale-mode", "big"], "invalid choice"),
        (["--answers", "good", "very good"], "not one"),
        (["--answers", "good", "good"], "are the same token"),
        (["--answers", "zzz", "bad"], "'zzz' is not in the model's vocabulary"),
        (["--source-site", "attn.hook_q"], "holds activations of shape"),
        (["--k", "17"], "k must be between 1 and 16"),
    ],
)
def test_steer_bad_arguments(
    gpt2_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    message: str,
) -> None:
    assert main(steer_args(gpt2_dir, tmp_path / "steer", *change)) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("tl-powersteer: error: ") == 1 and re.search(message, err), err
    assert "power_steering:" not in captured.out  # refused before any computation
    assert list(tmp_path.iterdir()) == []


def test_steer_caa_needs_pairs(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["steer", "--prompt", "the cat", "--source", "0", "--target", "1", "--model", gpt2_dir,
            "--methods", "caa", "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 2
    assert "needs --positive and --negative" in capsys.readouterr().err


def test_vectors_out_that_is_a_folder(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "v.safetensors").mkdir()
    assert main(vectors_args(gpt2_dir, tmp_path / "v.safetensors")) == 2
    captured = capsys.readouterr()
    assert "is a folder: choose a file path ending in .safetensors" in captured.err
    assert "converged" not in captured.out  # refused before any computation
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["notes.txt"], r"not a previous output folder \(it holds notes.txt\)"),
        (["atlas.csv"], r"\(it has no atlas.safetensors\)"),
    ],
)
def test_atlas_refuses_a_foreign_folder(
    gpt2_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entries: list[str],
    message: str,
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    for name in entries:
        (out / name).write_text("keep me")
    args = ["atlas", "--prompt", "the cat sat", "--model", gpt2_dir, "--out", str(out)]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == entries
    assert all((out / name).read_text() == "keep me" for name in entries)


def test_atlas_ignores_and_removes_a_killed_runs_temporary_files(
    gpt2_dir: str, tmp_path: Path
) -> None:
    out = tmp_path / "atlas"
    out.mkdir()
    stale = out / ".atlas.safetensors.4999999-zz.tmp"  # beyond the largest pid, 2**22
    stale.write_bytes(b"half a checkpoint")
    args = ["atlas", "--prompt", "the cat sat on the mat", "--sources", "0", "--targets", "1",
            "--k", "1", "--model", gpt2_dir, "--dtype", "float64", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["atlas.csv", "atlas.html", "atlas.safetensors"]


def test_steer_refuses_a_previous_output_with_other_files(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "steer"
    out.mkdir()
    (out / "summary.md").write_text("# Steering")
    (out / "my_analysis.ipynb").write_text("{}")
    assert main(steer_args(gpt2_dir, out)) == 2
    assert "(it holds my_analysis.ipynb)" in capsys.readouterr().err
    assert (out / "my_analysis.ipynb").read_text() == "{}"


@pytest.mark.parametrize("content", [None, "{not json", '{"model_type": "no-such-architecture"}'])
def test_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    if content is not None:
        (folder / "config.json").write_text(content)
    assert main(vectors_args(str(folder), tmp_path / "v.safetensors")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"could not load the model folder {str(folder)!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_chat_prompts_on_the_command_line(
    gpt2_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--chat, --system and --assistant-prefix render each prompt through the model's own
    template; a model without one is refused with one line."""
    out = tmp_path / "v.safetensors"
    plain = vectors_args(gpt2_dir, out, "--chat")
    assert main(plain) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert not out.exists()
    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat-model"
    shutil.copytree(gpt2_dir, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}i {% endif %}"
    )
    tokenizer.save_pretrained(chat_dir)
    args = vectors_args(str(chat_dir), out, "--system", "the movie was good",
                        "--assistant-prefix", "liked")  # fmt: skip
    assert main(args) == 0
    saved = tps.load(out).prompts
    assert saved == [
        "system the movie was good <eos> user the cat sat on the mat <eos> i liked",
        "system the movie was good <eos> user i liked it <eos> i liked",
    ]


def testdemo_settings_follow_the_model() -> None:
    """Each embedded model has its own demo fork; options given on the line win."""
    from tl_powersteer.cli.commands import demo_settings
    from tl_powersteer.cli.parser import DEMOS

    parser = build_parser()
    args = parser.parse_args(["demo", "--model", "smollm2-135m-instruct"])
    demo_settings(args)
    demo = DEMOS["smollm2-135m-instruct"]
    assert (args.source, args.target, args.answers, args.scales) == (6, 18, ["Yes", "No"], [0.5])
    assert (args.target_positions, args.system, args.chat) == (1, demo.system, True)
    assert args.prompt == list(demo.prompts)
    args = parser.parse_args(["demo", "--model", "smollm2-135m-instruct", "--source", "3",
                              "--scales", "1", "--prompt", "Is it cold?"])  # fmt: skip
    demo_settings(args)
    assert (args.source, args.target, args.scales, args.prompt) == (3, 18, [1.0], ["Is it cold?"])
    args = parser.parse_args(["demo", "--model", "/some/folder"])
    demo_settings(args)
    assert (args.source, args.target, args.system, args.chat) == (8, 16, None, False)
    assert args.answers == [" great", " terrible"] and args.target_positions == 4
