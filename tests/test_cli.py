"""The `fedbot` command line through its main(): record -> train -> eval, and bad input. (The agent
and fleet tests run the console scripts as real processes.)"""

import json

import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def run_in_process(capsys, *args) -> tuple[int, str]:
    """`fedbot ARGS` through its main() (what the console script calls): exit code and stderr."""
    from cli.main import main

    try:
        code = main([*map(str, args)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def test_record_train_eval(tmp_path, capsys):
    root, run, out = tmp_path / "robot0", tmp_path / "run", tmp_path / "eval"
    code, err = run_in_process(capsys, "record", "--sim", "--root", root, "--episodes", 2, "--style", "default")
    assert code == 0, err
    dataset = LeRobotDataset("fedbot/robot0", root=root)
    assert dataset.meta.total_episodes == 2  # the expert succeeds on these seeds

    code, err = run_in_process(
        capsys, "train", "--dataset", root, "--preset", "pusht-state", "--steps", 2, "--out", run
    )
    assert code == 0, err
    policy = run / "checkpoints" / "last" / "pretrained_model"
    assert (policy / "model.safetensors").is_file()

    from cli.main import main

    assert main(["eval", "--policy", str(policy), "--episodes", "1", "--videos", "0", "--out", str(out)]) == 0
    assert "success rate" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["episodes"][0]["seed"] == 100_000


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    code, err = run_in_process(
        capsys, "train", "--dataset", tmp_path / "nowhere", "--steps", 1, "--out", tmp_path / "r"
    )
    assert code == 2 and "holds no LeRobot dataset" in err
    code, err = run_in_process(capsys, "record", "--sim", "--root", tmp_path / "d", "--episodes", 2, "--seed", 99_999)
    assert code == 2 and "held out" in err
    code, err = run_in_process(
        capsys, "record", "--sim", "--root", tmp_path / "d", "--episodes", 1, "--style", "sideways"
    )
    assert code == 2 and "known styles: ['careful', 'clockwise', 'default', 'swift']" in err
    code, err = run_in_process(
        capsys, "train", "--dataset", tmp_path / "d", "--preset", "pusht-tiny", "--steps", 1, "--out", tmp_path / "r"
    )
    assert code == 2 and "unknown preset 'pusht-tiny'" in err
    code, err = run_in_process(capsys, "record", "--root", tmp_path / "d", "--episodes", 1)
    assert code == 2 and "needs both --sim and --root" in err
    code, err = run_in_process(capsys, "status", "--socket", tmp_path / "no-agent.sock")
    assert code == 2 and "no agent is listening" in err
    assert not (tmp_path / "d" / "meta" / "info.json").exists()


def test_help_names_every_style_and_preset(capsys):
    """The parser lists them without importing torch (fedbot status must start fast), so a test keeps
    the lists true."""
    from cli.main import main
    from fedbot.presets import PRESETS
    from hardware.pusht_expert import STYLES

    for command, names in (("record", STYLES), ("train", PRESETS)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert all(name in help_text for name in names), (command, help_text)


def test_an_operator_signs_a_model_for_hand_delivery(tmp_path, capsys, untrained_policy):
    """`fedbot sign-model`: robots that trust the operator's key take the model, others refuse it."""
    import shutil

    from agent.model_store import CheckRules, ModelRejected, check_model
    from fedbot.model_manifest import parse_public_key
    from hardware.pusht_sim import PushTSim, PushTSimConfig

    model, key = tmp_path / "handmade", tmp_path / "operator.key"
    shutil.copytree(untrained_policy, model)
    code, err = run_in_process(capsys, "sign-model", model, "--key", key, "--new-key", "--round", 7)
    assert code == 0, err
    trusted = parse_public_key(key.with_name("operator.key.pub").read_text())
    robot = PushTSim(PushTSimConfig(id="r"))
    features = {**robot.observation_features, **robot.action_features}
    check_model(model, features, CheckRules(trusted_keys=(trusted,), device="cpu"))
    stranger = tmp_path / "stranger.key"
    assert run_in_process(capsys, "sign-model", model, "--key", stranger, "--new-key")[0] == 0  # re-signed
    with pytest.raises(ModelRejected, match="does not trust"):
        check_model(model, features, CheckRules(trusted_keys=(trusted,), device="cpu"))
    code, err = run_in_process(capsys, "sign-model", tmp_path / "not-a-model", "--key", key)
    assert code == 2 and "config.json is missing" in err  # nobody vouches for what a robot cannot load
