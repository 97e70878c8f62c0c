"""Automatic rollback, on a real fedbot-agent process: a signed model that passes every check on arrival
but drives the robot out of its bounds fails at its first chunk; the robot gets none of its actions,
the agent rolls back to the model before it, shows it in the status, and refuses the model again.
With no model to roll back to, the failing model stays live, the robot holds and the fault shows."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from fedbot.control_client import request
from fedbot.policy_io import POST_STATE

from agent_bench import start_agent, status_until, stop, write_config
from helpers import deliver_model
from processes import NotifySocket


def _actions_off_the_table(directory):
    """Unnormalization statistics that put every action near (1e6, 1e6): finite, but far beyond PushT's
    [0, 512]. The weights stay those of the good model: only running the model shows the fault."""
    stats = load_file(directory / POST_STATE)
    stats["action.min"] = torch.full_like(stats["action.min"], 1e6)
    stats["action.max"] = torch.full_like(stats["action.max"], 2e6)
    save_file(stats, directory / POST_STATE)


def _actions_overflow(directory):
    """Statistics whose range overflows float32 when actions are unnormalized: every action is inf or NaN."""
    stats = load_file(directory / POST_STATE)
    stats["action.min"] = torch.full_like(stats["action.min"], -3e38)
    stats["action.max"] = torch.full_like(stats["action.max"], 3e38)
    save_file(stats, directory / POST_STATE)


def test_a_model_with_out_of_range_actions_is_rolled_back_automatically_and_refused_again(
    tmp_path, untrained_policy, lab_key
):
    write_config(tmp_path, trusted=lab_key)
    sock, models = tmp_path / "agent.sock", tmp_path / "data" / "models"
    inbox = models / "inbox"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent.log")
    try:
        notify.wait_for("READY", "1")
        deliver_model(untrained_policy, inbox, "round_0001-good", lab_key, 1)
        agent.wait_for(r"model round_0001-good is live", timeout=120)
        deliver_model(untrained_policy, inbox, "round_0002-bad", lab_key, 2, edit=_actions_off_the_table)
        agent.wait_for(r"model round_0002-bad is live", timeout=120)  # it passes every check on arrival

        assert request(sock, "run") == {"running": True}
        agent.wait_for(r"ERROR .*model round_0002-bad failed at run time: .* out of range: .*holding", timeout=60)
        agent.wait_for(
            r"ERROR .*automatic rollback: model round_0002-bad failed at run time: .* out of range: .*; "
            r"round_0001-good is live again",
            timeout=60,
        )
        status = status_until(sock, lambda s: s["activity"] == "idle")
        assert status["state"] == "idle" and status["faults"] == []
        assert status["live-model"]["name"] == status["control"]["model"] == "round_0001-good"
        assert status["control"]["actions"] == 0  # not one action of the failing model reached the robot
        assert status["control"]["policy-error"].startswith("model round_0002-bad failed at run time: ")
        rollback = status["last-auto-rollback"]
        assert rollback["model"] == "round_0002-bad" and rollback["rolled-back-to"] == "round_0001-good"
        assert rollback["reason"].startswith("failed at run time: ") and "out of range" in rollback["reason"]
        assert status["rejected"] == [{"name": "round_0002-bad", "reason": rollback["reason"]}]
        assert json.loads((models / "store" / "history.json").read_text()) == ["round_0001-good"]
        listed = request(sock, "models")
        assert [(m["name"], m["live"]) for m in listed["models"]] == [("round_0001-good", True)]

        # The same model is refused again, by name and, under another name, by content; neither goes live.
        deliver_model(untrained_policy, inbox, "round_0002-bad", lab_key, 2, edit=_actions_off_the_table)
        agent.wait_for(r"model round_0002-bad rejected: refused: model round_0002-bad .*failed at run time", 120)
        deliver_model(untrained_policy, inbox, "round_0003-same", lab_key, 3, edit=_actions_off_the_table)
        agent.wait_for(r"model round_0003-same rejected: refused: model round_0002-bad .*failed at run time", 120)
        assert request(sock, "status")["live-model"]["name"] == "round_0001-good"

        # The good model runs again, and its actions reach the robot.
        assert request(sock, "run") == {"running": True}
        status_until(sock, lambda s: s["control"]["actions"] > 0, timeout=60)
        assert request(sock, "status")["control"]["policy-error"] is None
        stop(agent)
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        notify.close()


def test_a_failing_model_with_none_to_roll_back_to_stays_live_with_the_fault_shown_until_a_new_one(
    tmp_path, untrained_policy, lab_key
):
    write_config(tmp_path, trusted=lab_key)
    sock, inbox = tmp_path / "agent.sock", tmp_path / "data" / "models" / "inbox"
    notify = NotifySocket(tmp_path / "notify")
    agent = start_agent(tmp_path, notify.path, "agent.log")
    try:
        notify.wait_for("READY", "1")
        deliver_model(untrained_policy, inbox, "round_0001-nan", lab_key, 1, edit=_actions_overflow)
        agent.wait_for(r"model round_0001-nan is live", timeout=120)
        assert request(sock, "run") == {"running": True}
        agent.wait_for(r"ERROR .*model round_0001-nan failed at run time: 16 of 16 action values are not finite", 60)
        agent.wait_for(
            r"FAULT in the models thread \(auto-rollback\): RuntimeError: model round_0001-nan failed at run time: "
            r".*; no rollback: there is no previous model; it stays live, the robot holds",
            timeout=60,
        )
        status = status_until(sock, lambda s: s["activity"] == "idle")
        assert status["state"] == "fault" and status["control"]["actions"] == 0
        assert [(f["thread"], f["task"]) for f in status["faults"]] == [("models", "auto-rollback")]
        assert status["live-model"]["name"] == status["control"]["model"] == "round_0001-nan"
        assert status["last-auto-rollback"] is None and status["rejected"] == []

        deliver_model(untrained_policy, inbox, "round_0002-good", lab_key, 2)
        agent.wait_for(r"model round_0002-good is live", timeout=120)
        agent.wait_for(r"the models thread \(auto-rollback\) recovered", timeout=30)
        status = request(sock, "status")
        assert status["state"] == "idle" and status["faults"] == []
        stop(agent)
    finally:
        if agent.process.poll() is None:
            agent.kill_group()
        notify.close()
