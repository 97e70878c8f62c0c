"""A scripted PushT operator behind lerobot's `Teleoperator` interface, standing in for a person.

This module owns the sim "demonstrator": `PushTExpert` watches a `PushTSim` robot (`attach`) and,
once per 10 Hz control tick, returns the next target position for the agent, the way a person
moving a mouse would. It never touches the robot's environment: it plans on a private gym-pusht
environment whose state it copies from the robot's.

How it plans (re-planned after every push):
1. Screen contact points around the T: on the private sim, push the T from each point straight
   along the inward normal and keep the push length that best reduces the pose error to the goal.
2. For the best few, simulate the full plan from the robot's real state (go around the T without
   touching it, push, pause) with the same target generator that will drive the robot, and keep
   the plan with the best outcome (reaching the goal coverage first of all).
Targets move smoothly: bounded speed and acceleration, never more than `MAX_TARGET_STEP` per tick,
never more than `MAX_REACH` from the agent, always inside [0, 512]^2.

Named styles (`STYLES`) are different simulated people: pace, clearance kept around the T, which way
they go around it and which part of the T they like to push. Each gives its own data distribution.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
import gymnasium as gym
import numpy as np
from lerobot.teleoperators.config import TeleoperatorConfig
from lerobot.teleoperators.teleoperator import Teleoperator
from lerobot.utils.constants import ACTION

from hardware.pusht_sim import PushTSim

MAX_TARGET_STEP = 25.0  # px between consecutive targets (one tick)
MAX_REACH = 60.0  # px between a target and the agent position when it is sent
WORKSPACE = (0.0, 512.0)

AGENT_RADIUS = 15.0
# The T in its body frame: bar [-60, 60] x [0, 30], stem [-15, 15] x [30, 120].
_BAR = (-60.0, 0.0, 60.0, 30.0)
_STEM = (-15.0, 30.0, 15.0, 120.0)
_AREAS = (3600.0, 2700.0)
_CY = (_AREAS[0] * 15.0 + _AREAS[1] * 75.0) / sum(_AREAS)  # area centroid (0, _CY)
# Mean squared distance of the T's area to its centroid: the angle part of the pose error.
_J = (
    _AREAS[0] * ((120.0**2 + 30.0**2) / 12 + (15.0 - _CY) ** 2)
    + _AREAS[1] * ((30.0**2 + 90.0**2) / 12 + (75.0 - _CY) ** 2)
) / sum(_AREAS)
_SLANTS = (0.0, 0.35, -0.35, 0.7, -0.7)  # rad off the normal, for pushes on a face
_SUCCESS_MARGIN = 0.002  # plan for coverage a little above the env's threshold
_NO_GAIN = 1e6  # plan scores: below -_NO_GAIN/2 reach the goal, above _NO_GAIN bring no gain


@dataclass(frozen=True)
class Style:
    """How one simulated person moves."""

    travel_speed: float  # px/tick when moving around the T
    push_speed: float  # px/tick when pushing
    accel: float  # px/tick^2
    clearance: float  # px kept between the agent's rim and the T when going around it
    route: str = "shortest"  # "shortest", "cw" or "ccw": which way it likes to go around the T
    prefer: str = ""  # "", "bar" or "stem": the part of the T it likes to push
    pause_ticks: int = 1  # ticks it holds still after a push
    time_weight: float = 0.15  # px of pose error one tick is worth


STYLES: dict[str, Style] = {
    "default": Style(travel_speed=18.0, push_speed=8.0, accel=6.0, clearance=8.0),
    "swift": Style(travel_speed=24.0, push_speed=12.0, accel=10.0, clearance=7.0, pause_ticks=0, time_weight=0.3),
    "careful": Style(travel_speed=15.0, push_speed=6.0, accel=5.0, clearance=12.0, pause_ticks=2),
    "clockwise": Style(travel_speed=17.0, push_speed=8.0, accel=6.0, clearance=10.0, route="cw", prefer="bar"),
}


@TeleoperatorConfig.register_subclass("pusht_expert")
@dataclass(kw_only=True)
class PushTExpertConfig(TeleoperatorConfig):
    """Settings of the scripted PushT operator."""

    style: str = "default"
    seed: int = 0


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"Unknown PushT expert style {name!r}; known styles: {sorted(STYLES)}")
    return STYLES[name]


# ---------------------------------------------------------------- geometry (T body frame)


def _rot(v: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return (c * v[0] - s * v[1], s * v[0] + c * v[1])


def _inside(p: tuple[float, float], rect: tuple[float, float, float, float]) -> bool:
    return rect[0] < p[0] < rect[2] and rect[1] < p[1] < rect[3]


def _hits(a: tuple[float, float], b: tuple[float, float], rect: tuple[float, float, float, float]) -> bool:
    """Whether segment a-b passes through the open interior of an axis-aligned rectangle."""
    t0, t1 = 0.0, 1.0
    for k in (0, 1):
        d = b[k] - a[k]
        lo, hi = rect[k] + 1e-6, rect[k + 2] - 1e-6
        if abs(d) < 1e-12:
            if not lo < a[k] < hi:
                return False
            continue
        ta, tb = (lo - a[k]) / d, (hi - a[k]) / d
        t0, t1 = max(t0, min(ta, tb)), min(t1, max(ta, tb))
        if t0 >= t1:
            return False
    return True


def _distance_to_t(p: tuple[float, float]) -> float:
    return min(
        math.hypot(max(r[0] - p[0], 0.0, p[0] - r[2]), max(r[1] - p[1], 0.0, p[1] - r[3])) for r in (_BAR, _STEM)
    )


@dataclass(frozen=True)
class _Contact:
    point: tuple[float, float]  # on the T's boundary (body frame)
    push: tuple[float, float]  # unit push direction, into the T (body frame)
    part: str  # "bar" or "stem"
    start: tuple[float, float]  # agent position just before touching the T on the push line (body frame)
    standoff: tuple[float, float]  # where the push starts, clear of the T (body frame)


class _Geometry:
    """Contact points and collision-free routes around the T, in its body frame, for one style."""

    def __init__(self, style: Style):
        r = AGENT_RADIUS + style.clearance
        self.obstacles = [
            (_BAR[0] - r, _BAR[1] - r, _BAR[2] + r, _BAR[3] + r),
            (_STEM[0] - r, _STEM[1] - r, _STEM[2] + r, _STEM[3] + r),
        ]
        self.route = style.route
        e = 0.5
        self.nodes = (
            [(s * (60.0 + r + e), -r - e) for s in (-1, 1)]
            + [(s * (60.0 + r + e), 30.0 + r + e) for s in (-1, 1)]
            + [(s * (15.0 + r + e), 120.0 + r + e) for s in (-1, 1)]
        )
        self.contacts = self._make_contacts()
        n = len(self.nodes)
        inf = math.inf
        # Shortest routes between nodes (Floyd-Warshall on a handful of nodes).
        self.dist = [
            [0.0 if i == j else self._edge_cost(a, b) for j, b in enumerate(self.nodes)]
            for i, a in enumerate(self.nodes)
        ]
        self.next = [[j if self.dist[i][j] < inf else -1 for j in range(n)] for i in range(n)]
        for k in range(n):
            for i in range(n):
                for j in range(n):
                    if self.dist[i][k] + self.dist[k][j] < self.dist[i][j]:
                        self.dist[i][j] = self.dist[i][k] + self.dist[k][j]
                        self.next[i][j] = self.next[i][k]
        # Edges from every node to every contact's standoff, computed once.
        self.to_contact = [[self._edge_cost(nd, c.standoff) for c in self.contacts] for nd in self.nodes]

    def blocked(self, p: tuple[float, float]) -> bool:
        return any(_inside(p, o) for o in self.obstacles)

    def _edge_cost(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        if any(_hits(a, b, o) for o in self.obstacles):
            return math.inf
        length = math.dist(a, b)
        if self.route != "shortest":
            # Turning sense about the T's centroid; the body frame has y pointing down on screen.
            cross = (a[0]) * (b[1] - _CY) - (a[1] - _CY) * (b[0])
            against = cross < 0 if self.route == "cw" else cross > 0
            if against and length > 20.0:
                length *= 2.5
        return length

    def _make_contacts(self) -> list[_Contact]:
        faces: list[tuple[tuple[float, float], tuple[float, float], str]] = []
        for x in np.arange(-55.0, 56.0, 10.0):  # top of the bar
            faces.append(((x, 0.0), (0.0, 1.0), "bar"))
        for s in (-1.0, 1.0):
            for y in (5.0, 15.0, 25.0):  # bar ends
                faces.append(((s * 60.0, y), (-s, 0.0), "bar"))
            for x in (32.0, 40.0, 48.0, 56.0):  # underside of the bar, beside the stem
                faces.append(((s * x, 30.0), (0.0, -1.0), "bar"))
            for y in np.arange(48.0, 117.0, 12.0):  # stem sides
                faces.append(((s * 15.0, float(y)), (-s, 0.0), "stem"))
            q = 1.0 / math.sqrt(2.0)
            faces.append(((s * 60.0, 0.0), (-s * q, q), "bar"))  # corners
            faces.append(((s * 60.0, 30.0), (-s * q, -q), "bar"))
            faces.append(((s * 15.0, 120.0), (-s * q, -q), "stem"))
        for x in (-10.0, 0.0, 10.0):  # end of the stem
            faces.append(((x, 120.0), (0.0, -1.0), "stem"))
        contacts = []
        # Pushes on a face may come in slanted; the agent then slides along it, turning the T more.
        faces = [
            (p, _rot(d, a), part)
            for p, d, part in faces
            for a in (_SLANTS if abs(d[0] * d[1]) < 0.1 else (0.0,))  # corners: straight only
        ]
        for p, d, part in faces:

            def at(u: float, p=p, d=d) -> tuple[float, float]:
                return (float(p[0] - d[0] * u), float(p[1] - d[1] * u))

            start = AGENT_RADIUS + 0.5  # where the agent is about to touch the T
            while _distance_to_t(at(start)) < AGENT_RADIUS + 0.25:
                start += 0.5
            t = start + 1.0
            while self.blocked(at(t)) and t < 200.0:
                t += 1.0
            # The agent must reach the contact along the push line without touching the T first,
            # and the line must not start far out (deep in a pocket narrower than the clearance).
            line = [at(u) for u in np.arange(start, t, 1.0)] + [at(t)]
            if t <= AGENT_RADIUS + 2.0 * (self.obstacles[0][2] - 60.0) and all(
                _distance_to_t(q) >= AGENT_RADIUS + 0.25 for q in line
            ):
                contacts.append(_Contact((float(p[0]), float(p[1])), d, part, at(start), at(t)))
        return contacts

    def exit_point(self, p: tuple[float, float]) -> tuple[float, float]:
        """Nearest point clear of the inflated T, for a start inside it."""
        best, best_d = p, math.inf
        for o in self.obstacles:
            if not _inside(p, o):
                continue
            for q in ((o[0] - 0.5, p[1]), (o[2] + 0.5, p[1]), (p[0], o[1] - 0.5), (p[0], o[3] + 0.5)):
                d = math.dist(p, q)
                if d < best_d and not self.blocked(q):
                    best, best_d = q, d
        if best_d == math.inf:  # deep in a corner: step out diagonally from the centroid
            v = (p[0], p[1] - _CY)
            n = math.hypot(*v) or 1.0
            best = (p[0] + v[0] / n * 150.0, p[1] + v[1] / n * 150.0)
        return best

    def route_to(self, start: tuple[float, float], k: int) -> tuple[float, list[tuple[float, float]]]:
        """Cost and waypoints (excluding `start`) from a clear `start` to contact k's standoff."""
        goal = self.contacts[k].standoff
        best = self._edge_cost(start, goal)
        path: list[tuple[float, float]] = [goal]
        first = [self._edge_cost(start, nd) for nd in self.nodes]
        n = len(self.nodes)
        for i in range(n):
            if first[i] == math.inf:
                continue
            for j in range(n):
                c = first[i] + self.dist[i][j] + self.to_contact[j][k]
                if c < best:
                    best, path = c, self._node_path(i, j) + [goal]
        return best, path

    def _node_path(self, i: int, j: int) -> list[tuple[float, float]]:
        out = [self.nodes[i]]
        while i != j:
            i = self.next[i][j]
            out.append(self.nodes[i])
        return out


# ---------------------------------------------------------------- private simulator


@dataclass
class _State:
    agent_pos: tuple[float, float]
    agent_vel: tuple[float, float]
    block_pos: tuple[float, float]
    block_angle: float


def _read_state(env) -> _State:
    return _State(
        tuple(env.agent.position),
        tuple(env.agent.velocity),
        tuple(env.block.position),
        float(env.block.angle),
    )


class _Sim:
    """A private gym-pusht environment the operator sets to a state and steps, as the robot's would."""

    def __init__(self) -> None:
        self.env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
        self.env.reset(seed=0)
        # The env counts contacts in a Python callback; the planner needs no count (saves ~15% CPU).
        self.env.collision_handeler._post_solve = lambda *args: None
        self.set_goal(self.env.goal_pose)

    def set_goal(self, goal: np.ndarray) -> None:
        self.goal = np.array(goal, dtype=np.float64)
        self.goal_angle = float(goal[2])
        c = _rot((0.0, _CY), self.goal_angle)
        self.goal_centroid = (float(goal[0]) + c[0], float(goal[1]) + c[1])

    def set(self, s: _State) -> None:
        env = self.env
        for body in (env.block, env.agent):  # re-adding drops contacts cached by an earlier rollout
            env.space.remove(body, *body.shapes)
            env.space.add(body, *body.shapes)
        env.goal_pose = self.goal
        env.block.velocity, env.block.angular_velocity = (0.0, 0.0), 0.0
        env.block.angle = s.block_angle  # angle first: it turns the body about its centre of gravity
        env.block.position = s.block_pos
        env.agent.position = s.agent_pos
        env.agent.velocity = s.agent_vel

    def step(self, target: np.ndarray) -> None:
        """One control tick, the same arithmetic as PushTEnv.step (without coverage and observation)."""
        env = self.env
        action = np.asarray(target, dtype=np.float32)
        # Plain floats, in the env's order of operations, give the env's numbers bit for bit.
        ax, ay = float(action[0]), float(action[1])
        agent, kp, kv, dt = env.agent, float(env.k_p), float(env.k_v), env.dt
        for _ in range(int(1 / (env.dt * env.control_hz))):
            (px, py), (vx, vy) = agent.position, agent.velocity
            agent.velocity = (
                vx + (kp * (ax - px) + kv * (0.0 - vx)) * dt,
                vy + (kp * (ay - py) + kv * (0.0 - vy)) * dt,
            )
            env.space.step(dt)

    def error(self) -> float:
        """Pose error to the goal: RMS displacement of the T's area, in px."""
        b = self.env.block
        a = b.angle
        x = b.position.x - math.sin(a) * _CY - self.goal_centroid[0]
        y = b.position.y + math.cos(a) * _CY - self.goal_centroid[1]
        return math.sqrt(x * x + y * y + 2.0 * _J * (1.0 - math.cos(a - self.goal_angle)))

    def coverage(self) -> float:
        return float(self.env._get_coverage())


# ---------------------------------------------------------------- target generation


def _project(p: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    d = p - center
    n = float(np.hypot(*d))
    return p if n <= radius else center + d * (radius / n)


def limit_target(desired: np.ndarray, previous: np.ndarray, agent: np.ndarray) -> np.ndarray:
    """The point nearest `desired` within MAX_TARGET_STEP of `previous` and MAX_REACH of `agent`,
    inside the workspace."""
    p = np.asarray(desired, dtype=np.float64)
    for _ in range(4):  # alternating projections onto the two discs
        p = _project(_project(p, agent, MAX_REACH), previous, MAX_TARGET_STEP)
    p = _project(p, previous, MAX_TARGET_STEP)
    return np.clip(p, *WORKSPACE)


def _follow(
    sim: _Sim,
    pos: np.ndarray,
    waypoints: list[np.ndarray],
    vmax: list[float],
    accel: float,
    corner_speed: float,
    hold: int,
):
    """Drive `sim` by a target moving from `pos` along the waypoints, leg i at most vmax[i] px/tick,
    with bounded acceleration, stopping at the last one and holding there `hold` ticks.
    Yields (leg index, target) per tick, after stepping `sim` with it; the index is len(waypoints)
    once the target has arrived."""
    pts = [np.asarray(pos, dtype=np.float64)] + [np.asarray(w, dtype=np.float64) for w in waypoints]
    lengths = [float(np.hypot(*(pts[i + 1] - pts[i]))) for i in range(len(waypoints))]
    # Speed allowed when passing the end of leg i: slow at corners, zero at the end.
    corner = [min(vmax[i] * 0.5, vmax[i + 1] * 0.5, corner_speed) for i in range(len(vmax) - 1)] + [0.0]
    leg, along, speed = 0, 0.0, 0.0
    prev = pts[0]
    while leg < len(lengths):
        # Fastest speed from which the target can still slow down for every corner ahead.
        limit, ahead = vmax[leg], lengths[leg] - along
        for j in range(leg, len(lengths)):
            limit = min(limit, math.sqrt(2.0 * accel * ahead) + corner[j])
            if j + 1 < len(lengths):
                ahead += lengths[j + 1]
        speed = max(min(speed + accel, limit, MAX_TARGET_STEP), min(accel, ahead))
        along += speed
        while leg < len(lengths) and along >= lengths[leg]:
            along -= lengths[leg]
            leg += 1
        if leg < len(lengths):
            desired = pts[leg] + (pts[leg + 1] - pts[leg]) * (along / max(lengths[leg], 1e-9))
        else:
            desired = pts[-1]
        target = limit_target(desired, prev, np.asarray(sim.env.agent.position))
        prev = target
        t32 = target.astype(np.float32)
        sim.step(t32)
        yield leg, t32
    for _ in range(hold):
        t32 = prev.astype(np.float32)
        sim.step(t32)
        yield leg, t32


# ---------------------------------------------------------------- the operator


@dataclass
class _Plan:
    targets: list[np.ndarray]
    score: float  # lower is better; plans that bring the T no nearer its goal come last


class PushTExpert(Teleoperator):
    """A scripted person pushing the T onto its goal in a `PushTSim`, one target position per tick."""

    config_class = PushTExpertConfig
    name = "pusht_expert"

    def __init__(self, config: PushTExpertConfig):
        super().__init__(config)
        self.config = config
        self.style = get_style(config.style)
        self._robot: PushTSim | None = None
        self._sim: _Sim | None = None
        self._geometry = _Geometry(self.style)
        self._queue: list[np.ndarray] = []
        self._target: np.ndarray | None = None
        self._speed_scale = 1.0

    @cached_property
    def action_features(self) -> dict:
        return {ACTION: (2,)}

    @cached_property
    def feedback_features(self) -> dict:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._sim is not None

    def connect(self, calibrate: bool = True) -> None:
        if self._sim is None:
            self._sim = _Sim()

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """A scripted operator needs no calibration."""

    def configure(self) -> None:
        """A scripted operator needs no configuration."""

    def attach(self, robot: PushTSim) -> None:
        """Watch this robot's scene; its env is only read, never changed."""
        self._robot = robot

    def start_episode(self) -> None:
        """Forget the last episode; call after `robot.reset(seed)`, before the first `get_action`."""
        if self._robot is None:
            raise RuntimeError("attach(robot) before start_episode()")
        self.connect()
        s = _read_state(self._robot.env)
        self._sim.set_goal(self._robot.env.goal_pose)
        self._queue = []
        self._target = np.asarray(s.agent_pos, dtype=np.float64)
        # A person's pace varies a little from one episode to the next: seeded by config + scene.
        key = f"{self.config.seed}:{s.agent_pos}:{s.block_pos}:{s.block_angle}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        self._speed_scale = float(rng.uniform(0.9, 1.1))

    def get_action(self) -> dict[str, np.ndarray]:
        if self._robot is None or self._sim is None or self._target is None:
            raise RuntimeError("connect(), attach(robot) and start_episode() before get_action()")
        if not self._queue:
            self._queue = self._plan()
        agent = np.asarray(self._robot.env.agent.position, dtype=np.float64)
        target = limit_target(self._queue.pop(0), self._target, agent)
        self._target = target
        return {ACTION: target.astype(np.float32)}

    def send_feedback(self, feedback: dict) -> None:
        """Nothing to feel."""

    def disconnect(self) -> None:
        self._sim = None
        self._queue = []

    # ------------------------------------------------------------ planning

    def _plan(self) -> list[np.ndarray]:
        state = _read_state(self._robot.env)
        self._sim.set(state)
        e0 = self._sim.error()
        candidates = self._screen(state)
        best: _Plan | None = None
        # The screen is rough near the goal: simulate more plans there, and all when none helps.
        first = 4 if e0 > 10.0 else 10
        for i, (k, _, stop) in enumerate(candidates):
            if i >= first and best is not None and best.score < _NO_GAIN:
                break  # a plan that helps is in hand
            plan = self._simulate(state, k, stop)
            if plan is not None and (best is None or plan.score < best.score):
                best = plan
        start = self._to_body(self._target, state)
        if (best is None or best.score >= _NO_GAIN) and self._geometry.blocked(start):
            # Nothing helps from here, in contact: back off from the T, then think again.
            out = self._geometry.exit_point(start)
            away = (out[0] + (out[0] - start[0]) * 0.5, out[1] + (out[1] - start[1]) * 0.5)
            self._sim.set(state)
            retreat = [np.asarray(self._to_world(away, state))]
            speed = [self.style.push_speed]
            moves = _follow(self._sim, self._target, retreat, speed, self.style.accel, 0.0, 1)
            return [target for _, target in moves]
        if best is None:  # nothing to do at all: hold still for a tick
            return [self._target.astype(np.float32)]
        return best.targets

    def _screen(self, state: _State) -> list[tuple[int, float, tuple[float, float]]]:
        """Score each contact by a quick straight push on the private sim: (contact, score, push end)."""
        sim, geo, style = self._sim, self._geometry, self.style
        sim.set(state)
        e0 = sim.error()
        start = self._to_body(self._target, state)
        if geo.blocked(start):
            ex = geo.exit_point(start)
            start_cost = math.dist(start, ex)
            start = ex
        else:
            start_cost = 0.0
        step_px = min(3.0, max(0.4, e0 / 6.0))  # push resolution, finer near the goal
        travel = style.travel_speed * self._speed_scale
        out = []
        for k, c in enumerate(geo.contacts):
            cost, _ = geo.route_to(start, k)
            if cost == math.inf:
                continue
            standoff_w = self._to_world(c.standoff, state)
            if not all(10.0 <= v <= 502.0 for v in standoff_w):
                continue
            d_w = _rot(c.push, state.block_angle)
            p0 = c.start
            sim.set(state)
            env = sim.env
            env.agent.position = self._to_world(p0, state)
            env.agent.velocity = (d_w[0] * step_px / env.dt, d_w[1] * step_px / env.dt)
            best_e, best_n = e0, 0
            max_n = int(100.0 / step_px)
            for n in range(1, max_n + 1):
                env.space.step(env.dt)
                e = sim.error()
                if e < best_e - 1e-9:
                    best_e, best_n = e, n
                elif e > best_e + 10.0 or (n - best_n) * step_px > 30.0:
                    break
            if best_n == 0:
                continue
            ticks = (start_cost + cost) / travel + best_n * step_px / style.push_speed + 3
            score = best_e + self._time_weight(e0) * ticks
            if best_e < 1.5:  # likely over the success threshold: worth a detour
                score -= 100.0
            if style.prefer and c.part != style.prefer:
                score += 0.15 * e0 + 1.0
            stop = (p0[0] + c.push[0] * best_n * step_px, p0[1] + c.push[1] * best_n * step_px)
            out.append((k, score, stop))
        out.sort(key=lambda t: t[1])
        return out

    def _simulate(self, state: _State, k: int, stop: tuple[float, float]) -> _Plan | None:
        """Run one plan (around the T to contact k, push to `stop`, pause) from the real state."""
        sim, geo, style = self._sim, self._geometry, self.style
        travel = style.travel_speed * self._speed_scale
        sim.set(state)
        e_start = sim.error()
        # Fine adjustments are slow, as a person's would be.
        push = min(style.push_speed, max(2.5, 0.6 * e_start)) * self._speed_scale
        start = self._to_body(self._target, state)
        body_pts: list[tuple[float, float]] = []
        if geo.blocked(start):
            start = geo.exit_point(start)
            body_pts.append(start)
        body_pts += geo.route_to(start, k)[1]
        waypoints = [np.asarray(self._to_world(p, state)) for p in body_pts + [stop]]
        speeds = [travel] * (len(waypoints) - 1) + [push]
        sim.set(state)
        targets: list[np.ndarray] = []
        best_score, best_n = math.inf, 0
        last_leg = len(waypoints) - 1
        # The agent lags its target and cuts corners: slow down there so it stays clear of the T.
        accel = style.accel * self._speed_scale
        corner = 0.7 * style.clearance
        moves = _follow(sim, self._target, waypoints, speeds, accel, corner, style.pause_ticks + 2)
        for leg, target in moves:
            targets.append(target)
            if leg < last_leg:
                continue
            e = sim.error()
            if e < 8.0 and sim.coverage() > sim.env.success_threshold + _SUCCESS_MARGIN:
                return _Plan(targets, -_NO_GAIN + len(targets))
            if leg == last_leg:  # still pushing: the agent would carry on past a stop here
                continue
            score = e + self._time_weight(e_start) * len(targets)
            if score < best_score:
                best_score, best_n, best_e = score, len(targets), e
        if best_n == 0:
            return None
        if best_e > e_start - 0.05:  # no better than standing still
            return _Plan(targets[:best_n], _NO_GAIN + best_score)
        return _Plan(targets[:best_n], best_score)

    def _time_weight(self, error: float) -> float:
        """Px of pose error one tick is worth; near the goal, precision matters more."""
        return self.style.time_weight * min(1.0, error / 10.0)

    @staticmethod
    def _to_body(p, s: _State) -> tuple[float, float]:
        v = _rot((float(p[0]) - s.block_pos[0], float(p[1]) - s.block_pos[1]), -s.block_angle)
        return v

    @staticmethod
    def _to_world(p: tuple[float, float], s: _State) -> tuple[float, float]:
        v = _rot(p, s.block_angle)
        return (v[0] + s.block_pos[0], v[1] + s.block_pos[1])
