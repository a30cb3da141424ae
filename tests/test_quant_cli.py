"""`hub-dfq quantize` in-process: summary, JSON keys, one-line errors."""

from __future__ import annotations

import json

import pytest

from hub_dfq.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantize_prints_summary_and_writes_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["quantize", "default", "--weights", "8", "--activations", "8", "--calibration", "gaussian",
                 "--calibration-size", "16", "--eval-limit", "200", "--json", str(out), "--out", str(tmp_path / "q"),
                 "--override", "layer3.*:weights=6", "--algorithm", "calibrate"])
    assert code == 0
    text = capsys.readouterr().out
    assert "W8A8" in text and "full precision" in text and "quantized" in text and "time:" in text
    result = json.loads(out.read_text())
    for key in ("fp_top1", "quant_top1", "weights", "activations", "calibration", "algorithm", "seconds"):
        assert key in result
    assert result["weights"] == 8 and result["calibration"] == "gaussian" and result["algorithm"] == "calibrate"
    assert result["eval_n"] == 200 and abs(result["fp_top1"] - result["quant_top1"]) < 3.0
    assert any(f.suffix == ".safetensors" for f in (tmp_path / "q").iterdir())


def test_settings_from_the_command_line_reach_the_algorithm_and_the_checkpoint(tmp_path):
    code = main(["quantize", "default", "--weights", "4", "--activations", "4", "--calibration", "gaussian",
                 "--calibration-size", "8", "--eval", "none", "--algorithm", "reconstruct",
                 "--out", str(tmp_path / "q"),
                 "--setting", "reconstruct.iters=3", "--setting", "reconstruct.batch_size=4",
                 "--setting", "reconstruct.lr_bias=0.002", "--setting", "reconstruct.init=nearest",
                 "--setting", "reconstruct.beta=(10, 2)", "--json", str(tmp_path / "r.json")])
    assert code == 0
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["algorithm_config"]
    assert (recorded["iters"], recorded["batch_size"], recorded["lr_bias"]) == (3, 4, 0.002)
    assert recorded["init"] == "nearest" and tuple(recorded["beta"]) == (10, 2) and "gptq" not in recorded
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["reconstruct"]["iters"] == 3


@pytest.mark.parametrize("argv,message", [
    (["--weights", "9"], "2 to 8"),
    (["--activations", "1"], "2 to 8"),
    (["--method", "qat"], "unknown algorithm 'qat': use one of auto, calibrate, gptq, reconstruct, distill"),
    (["--preset", "slow"], "unknown preset"),
    (["--calibration", "/no/such/folder/"], "does not exist"),
    (["--setting", "reconstruct.lr=0.1"], "lr_round"),
    (["--setting", "reconstruct=3"], "must look like 'reconstruct.iters=500'"),
    (["--setting", "qat.iters=3"], "qat"),
    (["--setting", "reconstruct.iters=many"], "setting 'iters' of algorithm 'reconstruct' must be int, got 'many'"),
    (["--setting", "reconstruct.beta=3"], "must be tuple[float, float]"),
], ids=["weights", "activations", "method", "preset", "missing-data", "setting-name", "setting-form",
        "setting-algorithm", "setting-type", "setting-tuple"])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code = main(["quantize", "default", "--calibration", "gaussian", "--calibration-size", "8", "--eval", "none",
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
