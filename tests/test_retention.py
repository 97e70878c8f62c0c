"""What grows over weeks stays bounded: Flower process logs rotate, the round log keeps its newest
lines, the coordinator keeps its newest runs and the ones it needs."""

from __future__ import annotations

import json
import sys

from flwr.common.config import parse_config_args

from agent.supernode import ROUNDS_LOG, NodeSettings, SuperNodeSettings
from coordinator.fleet_status import fleet_status
from coordinator.registry import RunDirectory, prune_runs
from fedbot.policy_io import load_policy
from fedbot.process_group import start_group, stop_group
from fedbot.retention import MIB, LogRotation
from fedbot.run_config import RunConfig

# A child that logs like a Flower process: 3000 numbered lines, then dies with a message on stderr.
CHATTY = "for i in range(3000): print(f'INFO line {i:05d} ' + 'x' * 80, flush=True)\nraise SystemExit('bye')"


def test_a_process_groups_log_is_rotated_by_size_and_keeps_the_newest_output(tmp_path):
    log = tmp_path / "superlink.log"
    rotation = LogRotation(max_mb=0.02, backups=2)  # 20 KiB files; the output is ~290 KiB
    process = start_group([sys.executable, "-c", CHATTY], {}, log, rotation)
    process.wait(timeout=60)
    stop_group(process, timeout=10)  # returns once the last output is in the log
    files = sorted(tmp_path.glob("superlink.log*"))
    assert [f.name for f in files] == ["superlink.log", "superlink.log.1", "superlink.log.2"]
    assert all(f.stat().st_size <= rotation.max_mb * MIB for f in files)
    newest = log.read_text()
    assert "INFO line 02999" in newest and newest.rstrip().endswith("bye")  # stderr too, to the end
    assert not any("INFO line 00000" in f.read_text() for f in files)  # the oldest output is gone


def test_the_round_log_keeps_the_newest_rounds_the_agent_config_asks_for(tmp_path):
    agent_side = SuperNodeSettings("lab:9092", tmp_path / "d", tmp_path / "i", tmp_path / "out", "r1", keep_rounds=3)
    node = NodeSettings.from_configs(parse_config_args([agent_side.node_config()]), "")  # as the ClientApp gets it
    assert node.keep_rounds == 3
    for server_round in range(1, 11):
        node.note_round({"run": 7, "round": server_round})
    rounds = [json.loads(line)["round"] for line in (tmp_path / "out" / ROUNDS_LOG).read_text().splitlines()]
    assert len(rounds) < 6 and rounds[-3:] == [8, 9, 10] and rounds == sorted(rounds)


def test_pruning_keeps_the_newest_runs_the_unfinished_one_and_the_fleets_model(untrained_policy, tmp_path):
    loaded = load_policy(untrained_policy, "cpu")
    other_settings = RunConfig(output_dir=str(tmp_path), preset="so-arm-image")
    RunDirectory.open(other_settings).write_state(other_settings, finished=False)  # old, unfinished
    run = RunConfig(output_dir=str(tmp_path))
    names = []
    for published in [True, True, False, False, False]:  # oldest first; the last one stays unfinished
        directory = RunDirectory.open(run)
        if published:
            directory.save_model(1, loaded, {"success-rate": 0.1})
        names.append(directory.root.name)
        if len(names) < 5:
            directory.write_state(run, finished=True, skipped=not published)

    assert prune_runs(tmp_path, keep=2) == [names[0], names[2]]
    # kept: the fleet's model (names[1]), the unfinished runs and the newest two
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(kept) == 4 and kept[1:] == [names[1], names[3], names[4]]  # kept[0]: the other settings' run
    latest = RunDirectory.open(run).latest_published(run.preset)  # resumes names[4]
    assert latest is not None and latest.path.parent.parent.name == names[1]
    assert fleet_status(tmp_path)["latest-published"] == {"run": names[1], "round": 1}
    assert prune_runs(tmp_path, keep=2) == []  # nothing more to delete
