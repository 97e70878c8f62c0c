"""The `fedbot` command line: record, train, eval, the agent's commands, `dataset`, `hardware check`, and
the `sim` dry run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedbot.control_client import DEFAULT_SOCKET

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Only light imports here: `fedbot status` must not wait for torch. Presets and operator styles
    # are checked where they are used (fedbot/presets.py, hardware/pusht_expert.py), naming the known ones.
    from fedbot.scenes import DEFAULT_TASK, EVAL_SEED_START

    parser = argparse.ArgumentParser(prog="fedbot", description="Federated learning for robot fleets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = argparse.ArgumentParser(add_help=False)
    agent.add_argument(
        "--socket",
        type=Path,
        default=Path(os.environ.get("FEDBOT_AGENT_SOCKET", DEFAULT_SOCKET)),
        help=f"the agent's control socket (default: $FEDBOT_AGENT_SOCKET or {DEFAULT_SOCKET})",
    )

    scenes = argparse.ArgumentParser(add_help=False)
    scenes.add_argument(
        "--scene-part",
        type=_non_negative,
        default=0,
        help="the simulator's scenes restricted to this part (the T's starting angle in sector PART of --scene-parts)",
    )
    scenes.add_argument(
        "--scene-parts",
        type=_positive,
        default=1,
        help="equal sectors of the T's starting angle (default 1: the whole distribution)",
    )

    rec = sub.add_parser(
        "record",
        parents=[agent, scenes],
        help="record teleoperated episodes into a LeRobot dataset",
        description="A teleop session on the running agent (which owns the robot and its "
        "dataset), or with --sim --root, directly into a dataset directory. A session that was "
        "interrupted (a crash, a reboot, a stop) is continued for its remaining episodes with --resume; "
        "nothing resumes by itself.",
    )
    rec.add_argument("--sim", action="store_true", help="record in the PushT simulator without an agent (needs --root)")
    rec.add_argument("--root", type=Path, help="with --sim: dataset directory (created or appended)")
    rec.add_argument("--episodes", type=_positive, help="number of episodes to attempt")
    rec.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted session for its remaining episodes, as it was planned (instead of --episodes)",
    )
    rec.add_argument(
        "--operator",
        choices=["expert", "mouse"],
        help="scripted expert or a person with the mouse (default: expert)",
    )
    rec.add_argument(
        "--style",
        help="expert operator style: default, swift, careful, clockwise (default: default; hardware/pusht_expert.py)",
    )
    rec.add_argument(
        "--seed",
        type=_non_negative,
        help=f"first scene seed; episodes use seed, seed+1, ... (< {EVAL_SEED_START}; default 0)",
    )
    rec.add_argument("--task", default=None, help=f"task stored with every frame (default: {DEFAULT_TASK!r})")
    rec.add_argument("--keep-failed", action="store_true", help="also keep failed demonstrations")

    tr = sub.add_parser("train", help="train a DiffusionPolicy on one dataset (resumes from --out)")
    tr.add_argument("--dataset", type=Path, required=True, help="dataset directory")
    tr.add_argument(
        "--preset",
        default="pusht-state",
        help="policy preset: pusht-state, pusht-image, so-arm-image (fedbot/presets.py)",
    )
    tr.add_argument("--steps", type=_non_negative, required=True, help="total optimizer steps")
    tr.add_argument("--out", type=Path, required=True, help="run directory (checkpoints/ inside)")
    tr.add_argument("--save-every", type=_positive, default=1000, help="checkpoint period in steps")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    ev = sub.add_parser("eval", parents=[scenes], help="evaluate a saved policy in the PushT simulator")
    ev.add_argument("--policy", type=Path, required=True, help="saved policy directory")
    ev.add_argument("--episodes", type=_positive, required=True)
    ev.add_argument(
        "--seed-start", type=int, default=EVAL_SEED_START, help=f"first held-out seed (>= {EVAL_SEED_START})"
    )
    ev.add_argument("--out", type=Path, required=True, help="directory for eval.json and rollout videos")
    ev.add_argument("--videos", type=_non_negative, default=2, help="episodes to save as mp4")
    ev.add_argument("--device", default=None)

    sub.add_parser("status", parents=[agent], help="the agent's state, live model, control timing, federation")
    run = sub.add_parser("run", parents=[agent], help="run the live policy on the agent's robot")
    run.add_argument("--episodes", type=_positive, help="sim robots: run this many episodes, report, then hold")
    sub.add_parser("stop", parents=[agent], help="stop the policy: the robot holds")
    sub.add_parser("models", parents=[agent], help="the agent's kept models (live marked) and rejected ones")
    sub.add_parser("rollback", parents=[agent], help="make the previously live model live again")

    sign = sub.add_parser(
        "sign-model",
        help="sign a saved policy for hand delivery (robots must trust the key)",
        description="Writes manifest.json and manifest.sig into MODEL, a saved policy directory, signed with "
        "an operator's Ed25519 key. Robots take it once its public line is in their [checks] trusted-keys: "
        "copy it into the robot's inbox under a hidden name, then `mv` it to its final name.",
    )
    sign.add_argument("model", type=Path, help="a saved policy directory (config.json, model.safetensors, ...)")
    sign.add_argument("--key", type=Path, required=True, help="the operator's private key")
    sign.add_argument("--new-key", action="store_true", help="make the key first if it does not exist")
    sign.add_argument("--round", type=_non_negative, default=0, help="the round recorded in the manifest")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--root", type=Path, help="the dataset directory (default: the dataset of the agent --config)")
    where.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/fedbot/agent.toml"),
        help="the agent TOML whose dataset is meant (default: /etc/fedbot/agent.toml)",
    )
    ds = sub.add_parser(
        "dataset",
        help="a robot's episodes; drop a bad one from future training",
        description="Shows a robot's recorded episodes and which training runs used them; drops an episode from "
        "future training (`fedbot train` and federated rounds) without touching the recording, or gives it back.",
    ).add_subparsers(dest="action", required=True)
    show = ds.add_parser(
        "show",
        parents=[where],
        help="episodes (frames, date, seed, task, dropped or not) and the training runs that used them",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    drop = ds.add_parser("drop", parents=[where], help="leave episodes out of all future training")
    drop.add_argument("episodes", type=_non_negative, nargs="+", metavar="EPISODE", help="episode index")
    drop.add_argument("--reason", default="", help="why, shown by `fedbot dataset show`")
    undrop = ds.add_parser("undrop", parents=[where], help="give dropped episodes back to training")
    undrop.add_argument("episodes", type=_non_negative, nargs="+", metavar="EPISODE", help="episode index")

    hw = sub.add_parser("hardware", help="check the robot's devices").add_subparsers(dest="action", required=True)
    check = hw.add_parser(
        "check",
        help="list serial ports, ping every motor, read a frame from each camera",
        description="Checks every device of the agent config; run it while the agent is "
        "stopped (two processes on one serial port corrupt each other).",
    )
    check.add_argument("--config", type=Path, default=Path("/etc/fedbot/agent.toml"), help="the agent TOML")

    sim = sub.add_parser(
        "sim",
        help="the fleet dry run: a coordinator and simulated robot agents on localhost",
        description="A coordinator and N `fedbot-agent --sim` robots over the real Flower "
        "deployment engine: record, federate, deploy, hot-swap, run the policy.",
    )
    sim.add_argument("--robots", type=_positive, default=2, help="simulated robots (agents)")
    sim.add_argument("--episodes", type=_positive, default=16, help="demonstrations each robot records")
    sim.add_argument("--rounds", type=_positive, default=4, help="federated rounds")
    sim.add_argument("--local-steps", type=_positive, default=250, help="training steps per robot per round")
    sim.add_argument(
        "--policy-episodes",
        type=_non_negative,
        default=3,
        help="episodes each robot runs with the deployed model at the end (0: none)",
    )
    sim.add_argument(
        "--eval-episodes",
        type=_positive,
        default=5,
        help="held-out scenes the global model is evaluated on after each round (the same each round)",
    )
    sim.add_argument(
        "--split-scenes",
        action="store_true",
        help="non-IID scenes: robot i records only scene part i of --robots (the T's starting angle "
        "in its own sector); held-out evaluation still draws from every scene",
    )
    sim.add_argument("--out", type=Path, default=Path("outputs"), help="parent of the run directory")
    return parser


def cmd_record(args) -> int:
    if args.sim != (args.root is not None):
        raise ValueError("recording without an agent needs both --sim and --root DIR")
    plan = _session_plan(args)
    if args.root is None:
        if plan is None:
            return _agent_command(args, "record", resume=True)
        return _agent_command(args, "record", episodes=plan.episodes, task=args.task)
    if plan is None:
        plan = _interrupted_sim_session(args.root)
    report = _record(args.root, plan)
    console.print(
        f"kept {report.kept} of {report.attempted} episodes ({report.successes} successful); "
        f"{args.root} now holds {report.total_episodes} episodes"
    )
    return 0


def _session_plan(args):
    """The plan of a new session from the arguments, or None with --resume (which takes no others)."""
    from fedbot.scenes import DEFAULT_TASK
    from fedbot.session_plan import SessionPlan, SimSettings

    if args.resume:
        options = {"--episodes": args.episodes, "--operator": args.operator, "--style": args.style}
        options |= {"--seed": args.seed, "--task": args.task, "--keep-failed": args.keep_failed or None}
        given = [name for name, value in options.items() if value is not None]
        given += ["--scene-part(s)"] * ((args.scene_part, args.scene_parts) != (0, 1))
        if given:
            raise ValueError(f"--resume continues the session as it was planned; it takes no {', '.join(given)}")
        return None
    if args.episodes is None:
        raise ValueError("how many episodes? --episodes N (or --resume an interrupted session)")
    sim = SimSettings(args.operator or "expert", args.style or "default", args.scene_part, args.scene_parts)
    return SessionPlan(args.episodes, args.seed or 0, args.task or DEFAULT_TASK, args.keep_failed, sim=sim)


def _interrupted_sim_session(root: Path):
    from fedbot.session_plan import interrupted_session

    plan = interrupted_session(root)
    if plan is None:
        raise ValueError(f"{root} has no interrupted recording session to resume")
    if plan.sim is None:
        raise ValueError(
            f"the interrupted session in {root} is the robot agent's: resume it there (fedbot record --resume)"
        )
    return plan


def _record(root: Path, plan):
    """Record the plan's remaining episodes in the sim with its operator; prints one line per episode."""
    from fedbot.recording import record_session
    from hardware.factory import make_robot, make_teleop

    sim = plan.sim
    robot = make_robot("pusht_sim", root.name, scene_part=sim.scene_part, scene_parts=sim.scene_parts)
    operator = make_teleop(sim.operator, plan.seed_start, style=sim.style)
    robot.connect()
    try:
        return record_session(
            robot,
            operator,
            root,
            plan,
            on_episode=lambda s, status: console.print(
                f"seed {s}: {'success' if status.success else 'failed'} (coverage {status.coverage:.2f})"
            ),
        )
    finally:
        robot.disconnect()


def _agent_command(args, command: str, **arguments) -> int:
    """One request to the running agent; prints its answer."""
    from fedbot.control_client import request

    reply = request(args.socket, command, **{k: v for k, v in arguments.items() if v is not None})
    if command == "models":
        _print_models(reply)
    else:
        console.print_json(data=reply)
    return 0


def _print_models(reply: dict) -> None:
    table = Table(title="models")
    for column in ("", "name", "round", "sha256"):
        table.add_column(column)
    for model in reply["models"]:
        table.add_row("live" if model["live"] else "", model["name"], str(model["round"]), model["sha256"][:16])
    console.print(table)
    for rejected in reply["rejected"]:
        console.print(f"rejected {rejected['name']}: {rejected['reason']}")


def cmd_train(args) -> int:
    from fedbot.presets import get_preset
    from fedbot.training import train

    policy_dir = train(
        args.dataset,
        get_preset(args.preset),
        args.steps,
        args.out,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
    )
    console.print(f"policy: {policy_dir}")
    return 0


def cmd_eval(args) -> int:
    from fedbot.evaluation import evaluate, print_report
    from fedbot.policy_io import load_policy

    report = evaluate(
        load_policy(args.policy, args.device),
        args.episodes,
        args.out,
        seed_start=args.seed_start,
        videos=args.videos,
        policy_name=str(args.policy),
        scenes=(args.scene_part, args.scene_parts),
    )
    print_report(report)
    console.print(f"results: {args.out / 'eval.json'}")
    return 0


def cmd_sign_model(args) -> int:
    from datetime import datetime

    from fedbot.model_manifest import generate_key, load_private_key, public_line, sign_model_dir
    from fedbot.policy_io import load_policy

    if args.new_key:
        generate_key(args.key, "operator")
    key = load_private_key(args.key)
    load_policy(args.model, "cpu")  # what a robot will load: refuse to vouch for a directory it cannot
    fields = {"round": args.round, "created": datetime.now().isoformat(timespec="seconds"), "signed-by": "operator"}
    manifest = sign_model_dir(args.model, key, fields)
    console.print(f"signed {len(manifest['files'])} files of {args.model}; robots that trust this key take it:")
    console.print(public_line(key, "operator"), soft_wrap=True)
    return 0


def cmd_hardware(args) -> int:
    from agent.config import load_config
    from hardware.check import check_hardware

    findings = check_hardware(load_config(args.config))
    table = Table(title=f"hardware of {args.config}")
    for column in ("part", "", "detail", "what to do"):
        table.add_column(column)
    for finding in findings:
        table.add_row(finding.part, "[green]ok[/]" if finding.ok else "[red]MISSING[/]", finding.detail, finding.fix)
    console.print(table)
    return 0 if all(finding.ok for finding in findings) else 1


def cmd_dataset(args) -> int:
    from cli.dataset import cmd_dataset as dataset_command

    return dataset_command(args, console)


def cmd_sim(args) -> int:
    from cli.fleet import FleetSettings, run_fleet

    settings = FleetSettings(
        robots=args.robots,
        episodes=args.episodes,
        rounds=args.rounds,
        local_steps=args.local_steps,
        policy_episodes=args.policy_episodes,
        eval_episodes=args.eval_episodes,
        split_scenes=args.split_scenes,
        out=args.out,
    )
    run_fleet(settings, console)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handlers = {
        "record": cmd_record,
        "train": cmd_train,
        "eval": cmd_eval,
        "sim": cmd_sim,
        "hardware": cmd_hardware,
        "sign-model": cmd_sign_model,
        "dataset": cmd_dataset,
    }
    handlers.update(
        {
            name: lambda a, name=name: _agent_command(a, name, episodes=getattr(a, "episodes", None))
            for name in ("status", "run", "stop", "models", "rollback")
        }
    )
    handler = handlers[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        errors.print(f"[red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
