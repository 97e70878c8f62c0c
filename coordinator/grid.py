"""Talking to the robots through Flower's Grid: waiting for them, messages in the wire form, exchanges.

What the ServerApp sends goes through here (coordinator/server_app.py decides what and when): wait
until enough robots are connected and fit the strategy's node minimums to them, put the strategy's
messages in the transfer dtype with the global statistics, push them and poll for the replies faster
than `Grid.send_and_receive` does, log the robots that failed or did not answer, and audit every
reply in the run directory (replies.jsonl).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.registry import RunDirectory
from fedbot.run_config import RunConfig
from fedbot.transfer import cast_record, describe_content

log = logging.getLogger("fedbot.coordinator")
NODE_WAIT_LOG_S = 10.0
REPLY_POLL_S = 0.25


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The connected robots once `count` are (robots join when they are idle), or after `timeout`
    seconds those there are then; raises NoRobots if none is."""
    deadline, last_log = time.monotonic() + timeout, 0.0
    while len(nodes := list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        if time.monotonic() - last_log > NODE_WAIT_LOG_S:
            log.info(
                "waiting for robots: %d of %d connected (up to %.0f s more)",
                len(nodes),
                count,
                deadline - time.monotonic(),
            )
            last_log = time.monotonic()
        time.sleep(1.0)  # polling the SuperLink; Flower's Grid offers no wait
    if not nodes:
        raise NoRobots(
            f"no robot connected within {timeout:.0f} s (robot-wait-seconds); the run stops here "
            "and continues from its last saved round when the coordinator runs it again"
        )
    if len(nodes) < count:
        log.warning("waited %.0f s (robot-wait-seconds): going on with %d of %d robots", timeout, len(nodes), count)
    return nodes


class NoRobots(RuntimeError):
    """No robot came within the run's robot-wait-seconds."""


def fit_to_live_nodes(strategy: Strategy, run: RunConfig, nodes: list[int]) -> None:
    """Lower the strategy's node minimums to the robots connected now.

    `min-nodes` robots must be there when a coordinator (re)starts its rounds; after that a robot
    that drops out must not stall the others, but Flower's `configure_*` would wait forever for it.
    """
    if len(nodes) < run.min_nodes:
        log.warning("continuing with %d of %d robots (min-nodes)", len(nodes), run.min_nodes)
    live = max(1, min(run.min_nodes, len(nodes)))
    strategy = base_strategy(strategy)
    strategy.min_available_nodes = strategy.min_train_nodes = strategy.min_evaluate_nodes = live


def base_strategy(strategy: Strategy) -> Strategy:
    """The strategy itself, inside a differential-privacy wrapper if there is one (the wrapper
    delegates node selection and keeps no optimizer state of its own)."""
    return getattr(strategy, "strategy", strategy)


def messages_to(nodes: list[int], content: RecordDict, message_type: str) -> list[Message]:
    """The same content for each of `nodes`."""
    return [Message(content, dst_node_id=node, message_type=message_type) for node in nodes]


def for_transfer(messages: Iterable[Message], run: RunConfig, stats_record: ArrayRecord) -> list[Message]:
    """The strategy's messages with the global statistics and the weights in the transfer dtype."""
    messages = list(messages)
    if not messages:
        return []
    sent = cast_record(messages[0].content["arrays"], run.weights_dtype)  # the same global model for all
    for message in messages:
        message.content["arrays"] = sent
        message.content["stats"] = stats_record
    return messages


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive`, but polling for replies every REPLY_POLL_S instead of Flower's fixed
    3 s: that sleep came on top of every exchange (bench/bench_round_overhead.py)."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        if pending:
            time.sleep(REPLY_POLL_S)
    return replies


def exchange(
    grid: Grid, messages: list[Message], run: RunConfig, what: str, directory: RunDirectory
) -> tuple[list[Message], int]:
    """Send, receive within the round timeout, log failures, audit what every robot sent back.
    Returns the good replies and how many robots failed or did not answer."""
    replies = send_and_receive(grid, messages, run.round_timeout)
    good = [r for r in replies if not r.has_error()]
    for reply in replies:
        if reply.has_error():
            log.warning("%s: a robot failed (code %s): %s", what, reply.error.code, reply.error.reason)
        else:
            directory.audit(what, reply.metadata.src_node_id, describe_content(reply.content))
    missing = len(messages) - len(replies)
    if missing:
        log.warning("%s: %d robots did not answer within %.0f s", what, missing, run.round_timeout)
    return good, len(messages) - len(good)
