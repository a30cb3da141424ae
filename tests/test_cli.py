"""The CLI in-process: help, info, eval, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from hub_dfq.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "eval" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: hub-dfq" in capsys.readouterr().out


def test_info_default(capsys):
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    assert "timm (resnet20_cifar)" in out and "BN layers      19" in out and "conv / linear  19 / 1" in out
    assert "airplane" in out and "269,722" in out


def test_info_json(capsys, tmp_path):
    assert main(["info", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bn_layers"] == 19 and info["input_size"] == [3, 32, 32] and info["num_classes"] == 10
    assert main(["info", "default", "--json", str(tmp_path / "info.json")]) == 0  # --json PATH, as everywhere
    assert json.loads((tmp_path / "info.json").read_text()) == info


def test_every_command_takes_json_and_the_progress_switch(capsys):
    from hub_dfq.cli import COMMANDS, build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        leaves = sub._subparsers._group_actions[0].choices.values() if sub._subparsers else [sub]
        for leaf in leaves:
            flags = {flag for action in leaf._actions for flag in action.option_strings}
            assert {"--json", "--progress", "--no-progress"} <= flags, name
    assert len(commands) == len(COMMANDS)


def test_library_messages_name_the_cli_flags(capsys, tmp_path):
    argv = ["synth", "default", "--method", "gaussian", "--num-images", "4", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "--out" in err and "`" not in err


def test_synth_noise_flag_reaches_the_images_the_card_and_the_manifest(tmp_path):
    """`--noise pink` with the unoptimised method writes the pink start itself: smooth images (neighbouring pixels
    correlated, where white noise has none), recorded in generation.json and on the card with the command to redo it."""
    import json

    import numpy as np
    from datasets import load_dataset

    for noise in ("white", "pink"):
        out = tmp_path / noise
        assert main(["synth", "default", "--method", "gaussian", "--noise", noise, "--num-images", "4",
                     "--out", str(out)]) == 0
        pixels = np.stack([np.asarray(row["image"], dtype=np.float64)
                           for row in load_dataset(str(out), split="train")])
        lag1 = np.corrcoef(pixels[:, :, 1:].ravel(), pixels[:, :, :-1].ravel())[0, 1]
        assert (lag1 > 0.5) if noise == "pink" else (abs(lag1) < 0.1), (noise, lag1)
        stored = json.loads((out / "generation.json").read_text())["arguments"]["priors"]
        assert stored.get("noise", "white") == noise
        card = (out / "README.md").read_text()
        assert f"| initial noise | `{noise}` |" in card and f"--noise {noise}" in card


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path))
    assert main(["synth", "default", "--num-images", "4", "--method", "gaussian", "--out", str(tmp_path / "x")]) == 0
    import hub_dfq

    hub_dfq.synthesize("default", "gaussian", 4, progress=False)  # a cache entry
    (tmp_path / "synth" / "notes.txt").write_text("not ours")
    capsys.readouterr()
    assert main(["cache", "list", "--json", str(tmp_path / "list.json")]) == 0
    entries = json.loads((tmp_path / "list.json").read_text())["entries"]
    assert [e["kind"] for e in entries] == ["synth"] and "gaussian x 4 images of default" in entries[0]["description"]
    assert main(["cache", "clear", "--kind", "synth"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert (tmp_path / "synth" / "notes.txt").read_text() == "not ours"  # only what hub-dfq wrote goes
    assert not list((tmp_path / "synth").glob("gaussian-*")) and (tmp_path / "x" / "README.md").is_file()


def test_eval_takes_a_quantized_checkpoint(tmp_path, capsys):
    assert main(["quantize", "default", "--weights", "8", "--activations", "8", "--calibration", "default",
                 "--calibration-images", "32", "--eval", "none", "--out", str(tmp_path / "q")]) == 0
    assert main(["eval", str(tmp_path / "q"), "--limit", "100", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] > 70
    assert main(["info", str(tmp_path / "q")]) == 0
    assert "W8A8 (calibrate, real: default" in capsys.readouterr().out


def test_eval_default_writes_json(tmp_path, capsys):
    target = tmp_path / "sub" / "eval.json"
    assert main(["eval", "default", "--limit", "200", "--json", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["n"] == 200 and 80 <= result["top1"] <= 95 and result["top5"] >= result["top1"]
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "no such model"], "unknown model"),
        (["info", "local-dir:/nope"], "does not exist"),
        (["eval", "default", "--dataset", "parquet:/nope.parquet"], "does not exist"),
        (["eval", "default", "--split", "dev"], "no split 'dev'"),
        (["eval", "default", "--image-column", "pixels"], "no column 'pixels'"),
    ],
    ids=["unknown-model", "missing-folder", "missing-parquet", "bad-split", "bad-column"],
)
def test_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("hub-dfq ")


def test_eval_without_labels_says_so(tmp_path, capsys):
    import datasets
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    ds.remove_columns([c for c in ds.column_names if c != "image"]).to_parquet(tmp_path / "nolabel.parquet")
    assert main(["eval", "default", "--dataset", str(tmp_path / "nolabel.parquet")]) == 2
    assert "no label column" in capsys.readouterr().err
