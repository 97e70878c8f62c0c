"""The operator's dataset tools (`fedbot dataset`): what a robot recorded and which runs trained on
it; a dropped episode is left out of all future training (`fedbot train` and the ClientApp),
statistics included, and comes back when undropped; bad input names what is wrong."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, Metadata, RecordDict
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from test_cli import run_in_process

import fedbot.dataset_usage as dataset_usage
from agent.client_app import app
from fedbot.dataset_usage import from_ranges, note_use, to_ranges, uses
from fedbot.episode_store import NOTES_FILE
from fedbot.policy_io import load_policy
from fedbot.presets import get_preset
from fedbot.run_config import RunConfig
from fedbot.training import InMemoryFrames, open_dataset, open_metadata, training_episodes
from fedbot.transfer import record_to_stats, stats_to_record, weights_to_record
from fedbot.typed_config import to_mapping


def copy_dataset(source: Path, root: Path) -> Path:
    """The recording of `source` without its drop list and training log (other tests train on it)."""
    shutil.copytree(source, root, symlinks=True, ignore=shutil.ignore_patterns(".fedbot"))
    return root


def fedbot_dataset(capsys, *args) -> tuple[int, str, str]:
    """`fedbot dataset ARGS` through its main(): exit code, stdout, stderr."""
    from cli.main import main

    try:
        code = main(["dataset", *map(str, args)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def show(capsys, root: Path) -> dict:
    from cli.main import main

    assert main(["dataset", "show", "--root", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def coordinator_message(content: RecordDict, message_type: str) -> Message:
    """A message as the coordinator's Grid sends it to robot node 1 of run 7."""
    metadata = Metadata(7, "m", 0, 1, "", "", time.time(), DEFAULT_TTL, message_type)
    return Message(content, metadata=metadata)


def actions_by_episode(root: Path) -> dict[int, np.ndarray]:
    table = LeRobotDataset(f"fedbot/{root.name}", root=root).hf_dataset.with_format(None).data.table
    actions = np.asarray(table.column("action").to_pylist())
    episodes = np.asarray(table.column("episode_index").to_pylist())
    return {int(e): actions[episodes == e] for e in np.unique(episodes)}


@pytest.mark.parametrize("preset", ["pusht-state", "pusht-image"])
def test_a_dropped_episode_is_left_out_of_training_and_of_its_statistics(tmp_path, capsys, small_dataset, preset):
    root = copy_dataset(small_dataset, tmp_path / "robot0")
    actions = actions_by_episode(root)
    # drop the episode with the largest action: the kept statistics must then differ from the file's
    bad = max(actions, key=lambda e: actions[e][:, 0].max())
    kept = [e for e in actions if e != bad]
    code, out, err = fedbot_dataset(capsys, "drop", "--root", root, bad, "--reason", "the T fell off")
    assert code == 0, err
    assert f"episodes dropped from future training: {bad}" in out

    dataset = open_dataset(root)
    assert training_episodes(dataset) == kept
    kept_actions = np.concatenate([actions[e] for e in kept])
    stats = dataset.meta.stats["action"]
    np.testing.assert_allclose(stats["max"], kept_actions.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], kept_actions.mean(0), rtol=1e-5)
    assert int(np.asarray(stats["count"]).item()) == len(kept_actions)
    assert stats["max"][0] < actions[bad][:, 0].max()
    meta, kept_by_meta = open_metadata(root)  # what the ClientApp reports to the coordinator
    assert kept_by_meta == kept
    np.testing.assert_array_equal(meta.stats["action"]["max"], stats["max"])

    # The training frames are the kept episodes', windows and padding as lerobot builds them on the kept ones.
    config = get_preset(preset).make_config(dataset.meta.features, device="cpu")
    frames = InMemoryFrames(dataset, config)
    assert frames.num_frames == len(kept_actions)
    assert all(tensor.shape[0] == frames.num_frames for tensor in frames.tensors.values())
    reference = LeRobotDataset(
        dataset.repo_id, root=root, episodes=kept, delta_timestamps=resolve_delta_timestamps(config, dataset.meta)
    )
    length = len(actions[kept[0]])
    for index in [0, length - 1, length, length + 1, frames.num_frames - 1]:
        frames.sample_indices = torch.tensor([index])
        batch = frames.batch(1, torch.Generator())
        item = reference[index]
        assert int(item["episode_index"]) in kept
        for key in [*config.input_features, "action"]:
            assert torch.allclose(batch[key][0], item[key], atol=1e-6), (index, key)
            assert torch.equal(batch[f"{key}_is_pad"][0], item[f"{key}_is_pad"]), (index, key)

    code, out, err = fedbot_dataset(capsys, "undrop", "--root", root, bad)
    assert code == 0 and "episodes dropped from future training: none" in out, err
    dataset = open_dataset(root)
    assert dataset.episodes is None
    np.testing.assert_array_equal(dataset.meta.stats["action"]["max"], np.concatenate(list(actions.values())).max(0))


def test_show_lists_each_episode_and_the_runs_that_trained_on_it(tmp_path, capsys, small_dataset):
    root = copy_dataset(small_dataset, tmp_path / "robot0")
    assert fedbot_dataset(capsys, "drop", "--root", root, 2, "--reason", "hand in view")[0] == 0
    run = tmp_path / "run"
    code, err = run_in_process(capsys, "train", "--dataset", root, "--steps", 0, "--out", run)
    assert code == 0, err

    description = show(capsys, root)
    episodes = description["episodes"]
    assert [e["index"] for e in episodes] == [0, 1, 2]
    assert [e["seed"] for e in episodes] == [0, 1, 2]  # the scenes they were recorded on
    assert all(e["frames"] == 40 and e["seconds"] == 4.0 for e in episodes)
    assert all(e["recorded-from"] == "commit" and e["recorded"].startswith("20") for e in episodes)
    assert all(e["task"] == "Push the T-shaped block onto the T-shaped target." for e in episodes)
    assert [e["dropped"] is None for e in episodes] == [True, True, False]
    assert episodes[2]["dropped"]["reason"] == "hand in view"
    name = f"train {run.resolve()}"
    assert [e["runs"] for e in episodes] == [[name], [name], []]
    assert [(r["run"], r["episodes"]) for r in description["runs"]] == [(name, [0, 1])]

    code, out, err = fedbot_dataset(capsys, "show", "--root", root)
    assert code == 0, err
    assert "3 episodes, 1 dropped from training, 120 frames at 10 fps" in out
    assert "dropped: hand" in out and "training runs that used it" in out

    # A dataset fedbot's recorder did not note: the date of each episode's data file stands in.
    (root / "meta" / NOTES_FILE).unlink()
    episodes = show(capsys, root)["episodes"]
    assert all(e["recorded-from"] == "file time" and e["seed"] is None for e in episodes)


def test_the_client_app_trains_and_reports_without_the_dropped_episodes(
    tmp_path, capsys, small_dataset, untrained_policy
):
    fleet = tmp_path / "fleet"
    root = copy_dataset(small_dataset, fleet / "robot0")
    assert fedbot_dataset(capsys, "drop", "--root", root, 1)[0] == 0
    run = RunConfig(local_steps=1, batch_size=4, eval_episodes=1, sim_data_dir=str(fleet), output_dir=str(tmp_path))
    context = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=to_mapping(run)
    )

    reply = app(coordinator_message(RecordDict({"config": ConfigRecord({})}), "query.stats"), context)
    info = reply.content["info"]
    assert (info["episodes"], info["frames"]) == (2, 80)
    stats = record_to_stats(reply.content["stats"])
    np.testing.assert_array_equal(stats["action"]["max"], open_dataset(root).meta.stats["action"]["max"])

    loaded = load_policy(untrained_policy, "cpu")
    content = RecordDict(
        {
            "arrays": weights_to_record(loaded.policy),
            "stats": stats_to_record(stats, list(stats)),
            "config": ConfigRecord({"server-round": 3}),
        }
    )
    reply = app(coordinator_message(content, "train"), context)
    assert reply.content["metrics"]["num-examples"] == 80
    assert [(u["run"], u["round"], u["episodes"]) for u in uses(root)] == [("flower run 7", 3, [0, 2])]


def test_bad_input_names_what_is_wrong(tmp_path, capsys, small_dataset):
    root = copy_dataset(small_dataset, tmp_path / "robot0")
    code, _, err = fedbot_dataset(capsys, "show", "--root", tmp_path / "nowhere")
    assert code == 2 and "nowhere holds no LeRobot dataset" in err
    (tmp_path / "notes").mkdir()
    code, _, err = fedbot_dataset(capsys, "drop", "--root", tmp_path / "notes", 0)
    assert code == 2 and "notes holds no LeRobot dataset" in err
    code, _, err = fedbot_dataset(capsys, "drop", "--root", root, 1, 7)
    assert code == 2 and "has no episode 7 (it holds episodes 0 to 2)" in err
    code, _, err = fedbot_dataset(capsys, "drop", "--root", root, -1)
    assert code == 2 and "must be >= 0" in err
    code, _, err = fedbot_dataset(capsys, "undrop", "--root", root, 1)
    assert code == 2 and "episode 1 of" in err and "is not dropped (dropped: none)" in err
    code, _, err = fedbot_dataset(capsys, "drop", "--root", root, 1, "--reason", "x" * 300)
    assert code == 2 and "at most 200" in err
    assert fedbot_dataset(capsys, "drop", "--root", root, 0, 1, 2)[0] == 0
    with pytest.raises(ValueError, match="every episode of .* is dropped"):
        open_dataset(root)
    (root / ".fedbot" / "dropped.json").write_text('{"dropped": [1, 2')
    code, _, err = fedbot_dataset(capsys, "show", "--root", root)
    assert code == 2 and "dropped.json is damaged" in err
    code, _, err = fedbot_dataset(capsys, "show", "--config", tmp_path / "agent.toml")
    assert code == 2 and "agent.toml" in err


def test_the_training_log_keeps_its_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_usage, "MAX_ENTRIES", 5)
    for round_number in range(1, 13):
        note_use(tmp_path, "flower run 1", [0, 1, 2, 4, 7, 8], round=round_number)
    logged = uses(tmp_path)
    assert 5 <= len(logged) < 10 and logged[-1]["round"] == 12
    assert [entry["round"] for entry in logged] == list(range(13 - len(logged), 13))
    assert logged[0]["episodes"] == [0, 1, 2, 4, 7, 8]
    assert to_ranges([8, 0, 1, 2, 4, 7]) == "0-2,4,7-8" and from_ranges("0-2,4,7-8") == [0, 1, 2, 4, 7, 8]
    with open(tmp_path / ".fedbot" / dataset_usage.LOG_FILE, "a") as f:
        f.write('{"run": "cut sh')  # a crash while a line was written
    assert len(uses(tmp_path)) == len(logged)
