"""`fedbot sim`, the README's main job, end to end with tiny settings: real coordinator, real agents,
real SuperLink and SuperNodes; every robot ends up running the final global model."""

from __future__ import annotations

import json
import subprocess

from agent.config import load_config
from fedbot.flower_processes import BIN
from fedbot.model_manifest import sha256_file


def test_fleet_dry_run(tmp_path):
    command = [
        str(BIN / "fedbot"),
        "sim",
        "--robots",
        "2",
        "--episodes",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--policy-episodes",
        "0",
        "--eval-episodes",
        "1",
        "--split-scenes",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fleet summary" in result.stdout

    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    (federation,) = [path for path in (run_dir / "federation").iterdir() if path.is_dir()]
    registry = json.loads((federation / "registry.json").read_text())
    final = federation / "global_model" / "round_1"
    assert (final / "manifest.json").is_file() and (federation / "metrics.png").is_file()
    final_sha = sha256_file(final / "model.safetensors")
    assert [r["robot"] for r in summary["robots"]] == ["robot0", "robot1"]
    (round_1,) = summary["rounds"]  # the global model after each round, as the table shows it
    assert round_1["round"] == 1 and round_1["robots"] == 2 and 0.0 <= round_1["coverage"] <= 1.0
    assert "global model per round" in result.stdout
    for row in summary["robots"]:
        assert row["episodes"] == 2 and row["rounds-joined"] == 1
        assert row["live-model-sha256"] == final_sha  # the deployed global model, checked and live
        assert row["policy-episodes"] == 0 and row["success-after"] is None  # policy runs: test_agent_daemon
        robot = run_dir / "robots" / row["robot"]
        part = load_config(robot / "agent.toml").robot  # --split-scenes: robot i records scene part i of 2
        assert (part.scene_part, part.scene_parts) == (int(row["robot"][-1]), 2)
        assert "state: recording -> idle" in (robot / "agent.log").read_text()
        assert "federating" in (robot / "agent.log").read_text()
    assert registry["latest"] == 1 and registry["models"][-1]["sha256"] == final_sha
    assert list((federation / "evaluate" / "round_1" / "server").glob("rollout_*.mp4"))
