"""The CLI in-process: help, info, eval, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from hub_dfq.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
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


def test_info_json(capsys):
    assert main(["info", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bn_layers"] == 19 and info["input_size"] == [3, 32, 32] and info["num_classes"] == 10


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
