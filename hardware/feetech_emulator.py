"""An emulated Feetech STS3215 servo bus served on a pseudo-terminal, for tests and dry runs.

lerobot's real `FeetechMotorsBus` (scservo_sdk over pyserial) talks to it through the device path, as
it would to the USB adapter of an SO-100/SO-101 arm. It speaks Feetech protocol 0: ping (also
broadcast), read, write, sync read and sync write, on a 256-byte register table per servo laid out
as lerobot's STS control table. Joint dynamics are simple: with torque on, a joint moves to its goal
(clamped to the position limits) at a fixed speed; with torque off it stays where it is, unless a
`hand` moves it (a leader arm being guided by a person).

Real servos answer within microseconds whatever the host does. So the servos answer from a process
of their own (one per plugged bus), never from a thread of the process under test: there a reply
would wait for that process's GIL, whose holder may be off the CPU on a loaded host, past lerobot's
50 ms packet timeout. `EmulatedBus` is the handle a test holds; it asks that process for the state.

The device path is a symlink (`link`) to the current pty, like /dev/serial/by-id/... for a real
adapter. `unplug()` closes the pty and removes the link (the USB cable pulled); `plug()` serves a new
pty behind the same link, with the servos as they were.
"""

from __future__ import annotations

import math
import os
import select
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

BROADCAST = 0xFE
PING, READ, WRITE, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x82, 0x83
RESOLUTION = 4096
SPEED = 3000.0  # steps per second with torque on (an STS3215 at 7.4 V: ~0.2 s per 60 degrees)
Table = dict[str, tuple[int, int]]  # register name -> (address, length), lerobot's control table


# The servo process must start in a fraction of a second, and any lerobot.motors import pulls in torch
# (~3 s): these are lerobot's encoding_utils sign-magnitude functions, restated.
def _encode_sign_magnitude(value: int, sign_bit: int) -> int:
    if abs(value) >= 1 << sign_bit:
        raise ValueError(f"magnitude {abs(value)} does not fit below bit {sign_bit}")
    return (int(value < 0) << sign_bit) | abs(value)


def _decode_sign_magnitude(encoded: int, sign_bit: int) -> int:
    magnitude = encoded & ((1 << sign_bit) - 1)
    return -magnitude if (encoded >> sign_bit) & 1 else magnitude


@dataclass(frozen=True)
class WavingHand:
    """A person moving every joint (ids 1..6) of a leader arm slowly back and forth between `low` and
    `high` raw steps: present positions {id: steps} at `t` seconds after plugging in."""

    low: int
    high: int

    def __call__(self, t: float) -> dict[int, int]:
        middle, amplitude = (self.low + self.high) / 2, (self.high - self.low) / 4
        return {i: int(middle + amplitude * math.sin(1.5 * t + i)) for i in range(1, 7)}


@dataclass
class Servo:
    """One STS3215: its register table and its shaft position (raw steps, before the homing offset)."""

    id: int
    table: Table
    model_number: int
    position: float = RESOLUTION / 2
    registers: bytearray = field(default_factory=lambda: bytearray(256))

    def __post_init__(self) -> None:
        self.set("Firmware_Major_Version", 3)
        self.set("Firmware_Minor_Version", 10)
        self.set("Model_Number", self.model_number)
        self.set("ID", self.id)
        self.set("Max_Position_Limit", RESOLUTION - 1)
        self.set("Lock", 1)
        self.set("Goal_Position", int(self.position))

    def get(self, name: str) -> int:
        address, length = self.table[name]
        return int.from_bytes(self.registers[address : address + length], "little")

    def set(self, name: str, value: int) -> None:
        address, length = self.table[name]
        self.registers[address : address + length] = value.to_bytes(length, "little")

    @property
    def offset(self) -> int:
        return _decode_sign_magnitude(self.get("Homing_Offset"), 11)

    @property
    def torque(self) -> bool:
        return bool(self.get("Torque_Enable"))

    def goal(self) -> int:
        """The goal in present-position units, clamped to the limits as the firmware does."""
        goal = _decode_sign_magnitude(self.get("Goal_Position"), 15)
        return min(max(goal, self.get("Min_Position_Limit")), self.get("Max_Position_Limit"))

    def present(self) -> int:
        """Present_Position = shaft position - Homing_Offset (lerobot's feetech convention)."""
        return int(round(self.position)) - self.offset

    def step(self, dt: float) -> None:
        if self.torque:
            target = self.goal() + self.offset
            delta = max(-SPEED * dt, min(SPEED * dt, target - self.position))
            self.position += delta
        self.set("Present_Position", _encode_sign_magnitude(self.present(), 15))


@dataclass
class Servos:
    """Everything behind the cable: the servos, the logs of what they received, the time they move
    with. It lives in the servo process while the bus is plugged in, in the handle otherwise."""

    servos: dict[int, Servo]
    hand: Callable[[float], dict[int, int]] | None
    still: bool  # the joints move only with `advance` (a test holding time still), not with the clock
    goals: list[tuple[int, int, int]] = field(default_factory=list)
    torque_writes: list[tuple[int, int]] = field(default_factory=list)
    still_time: float = 0.0
    replies_to_lose: int = 0
    started: float = 0.0
    last: float = 0.0

    def clock(self) -> float:
        return self.still_time if self.still else time.monotonic()

    def plugged(self) -> None:
        self.started = self.last = self.clock()

    def advance(self) -> None:
        now = self.clock()
        dt, self.last = now - self.last, now
        imposed = self.hand(now - self.started) if self.hand is not None else {}
        for servo in self.servos.values():
            if servo.id in imposed:
                servo.position = imposed[servo.id] + servo.offset
            servo.step(dt)

    def answer(self, target: int, instruction: int, params: bytes) -> bytes:
        self.advance()
        reply = self._answer(target, instruction, params)
        if reply and self.replies_to_lose > 0:
            self.replies_to_lose -= 1
            return b""
        return reply

    def _answer(self, target: int, instruction: int, params: bytes) -> bytes:
        if instruction == PING:
            ids = sorted(self.servos) if target == BROADCAST else [target]
            return b"".join(_status(i) for i in ids if i in self.servos)
        if instruction == READ and target in self.servos:
            address, length = params[0], params[1]
            return _status(target, self.servos[target].registers[address : address + length])
        if instruction == WRITE and target in self.servos:
            self._write(self.servos[target], params[0], params[1:])
            return _status(target)
        if instruction == SYNC_READ:
            address, length = params[0], params[1]
            return b"".join(
                _status(i, self.servos[i].registers[address : address + length]) for i in params[2:] if i in self.servos
            )
        if instruction == SYNC_WRITE:
            address, length = params[0], params[1]
            for start in range(2, len(params), length + 1):
                servo_id = params[start]
                if servo_id in self.servos:
                    self._write(self.servos[servo_id], address, params[start + 1 : start + 1 + length])
        return b""

    def _write(self, servo: Servo, address: int, data: bytes) -> None:
        servo.registers[address : address + len(data)] = data
        if address == servo.table["Goal_Position"][0]:
            self.goals.append((servo.id, _decode_sign_magnitude(servo.get("Goal_Position"), 15), servo.present()))
        if address == servo.table["Torque_Enable"][0]:
            self.torque_writes.append((servo.id, data[0]))
            servo.set("Goal_Position", _encode_sign_magnitude(servo.present(), 15))  # servos hold where they are

    # -- what a test asks the servo process (see EmulatedBus) -----------------------------------------
    def handle(self, request: str, *args):
        if request == "present":
            self.advance()
            return {i: s.present() for i, s in self.servos.items()}
        if request == "register":
            servo_id, name = args
            return self.servos[servo_id].get(name)
        if request == "logs":
            return self.goals, self.torque_writes
        if request == "lose_replies":
            (self.replies_to_lose,) = args
        elif request == "advance":
            self.still_time += args[0]
        elif request == "place":
            (steps,) = args
            for servo in self.servos.values():
                servo.position = steps
        else:
            raise ValueError(f"unknown request {request!r}")
        return None


class EmulatedBus:
    """Six STS3215 servos (ids 1..6, an SO arm) behind a pty; see the module docstring.

    `hand(t)`, if given, returns present positions {id: steps} that a person's hand imposes on the
    joints at `t` seconds after plugging in, whatever the torque (a leader arm); it must be picklable
    and cheap to import (`WavingHand`). With `still`, the joints move only when `advance` says so.
    Logs for tests: `goals` holds every goal position received (id, raw value, present position at
    that moment), `torque_writes` every Torque_Enable write (id, value), in order.
    """

    def __init__(
        self,
        link: Path,
        ids=range(1, 7),
        hand: Callable[[float], dict[int, int]] | None = None,
        still: bool = False,
    ):
        # Here, in the test's process, lerobot is loaded anyway; the servo process gets the table.
        from lerobot.motors.feetech.tables import MODEL_NUMBER_TABLE
        from lerobot.motors.feetech.tables import STS_SMS_SERIES_CONTROL_TABLE as TABLE

        self.link = Path(link)
        model = MODEL_NUMBER_TABLE["sts3215"]
        self._servos = Servos({i: Servo(i, dict(TABLE), model) for i in ids}, hand, still)
        self._process: subprocess.Popen | None = None
        self._control: Connection | None = None

    # -- the cable ----------------------------------------------------------------------------------------
    def plug(self) -> EmulatedBus:
        ours, theirs = socket.socketpair()
        # A fresh interpreter that imports only this module (no fork of a test process and its threads,
        # no re-import of its main module as multiprocessing's spawn would do).
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from hardware.feetech_emulator import serve; serve({theirs.fileno()})"],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._control = Connection(ours.detach())
        self._control.send((self.link, self._servos))
        self._reply()  # the link is in place
        return self

    def unplug(self) -> None:
        if self._process is None:
            return
        self._servos = self._ask("unplug")
        self._process.wait(timeout=10)
        self._control.close()
        self._process = self._control = None

    def __enter__(self) -> EmulatedBus:
        return self.plug()

    def __exit__(self, *exc) -> None:
        self.unplug()

    # -- state for tests ----------------------------------------------------------------------------------
    @property
    def goals(self) -> list[tuple[int, int, int]]:
        return self._ask("logs")[0] if self._process else self._servos.goals

    @property
    def torque_writes(self) -> list[tuple[int, int]]:
        return self._ask("logs")[1] if self._process else self._servos.torque_writes

    def present(self) -> dict[int, int]:
        return self._ask("present")

    def register(self, servo_id: int, name: str) -> int:
        return self._ask("register", servo_id, name)

    def lose_replies(self, count: int) -> None:
        """The next `count` status packets never reach the host (the instructions still take effect)."""
        self._ask("lose_replies", count)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass for the joints of a `still` bus."""
        self._ask("advance", seconds)

    def place(self, steps: int) -> None:
        """Move every shaft to `steps` raw steps by hand (before the arm connects)."""
        self._ask("place", steps)

    def _ask(self, request: str, *args):
        if self._control is None:
            raise RuntimeError(f"the bus {self.link} is unplugged")
        self._control.send((request, *args))
        return self._reply()

    def _reply(self):
        try:
            ok, value = self._control.recv()
        except EOFError:
            raise RuntimeError(f"the servo process of {self.link} ended; see its traceback above") from None
        if not ok:
            raise RuntimeError(f"the servo process of {self.link} failed: {value}")
        return value


def serve(control_fd: int) -> None:
    """The servo process: take the link and the servos from the handle on `control_fd`, serve a new pty
    behind the link until the handle says unplug (or goes away), then give the servos back."""
    control = Connection(control_fd)
    link, servos = control.recv()
    # Where the host allows it (CAP_SYS_NICE), the servos get a higher priority than the processes
    # under test, so the 50 ms packet timeout measures them, not the servos.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except PermissionError:
        pass
    master, slave = os.openpty()
    tty.setraw(slave)
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.ttyname(slave))
    tmp.replace(link)
    servos.plugged()
    control.send((True, None))
    buffer = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master, control], [], [])
            if control in ready:
                try:
                    request, *args = control.recv()
                except EOFError:  # the test's process is gone
                    return
                if request == "unplug":
                    break
                try:
                    control.send((True, servos.handle(request, *args)))
                except (KeyError, ValueError) as error:
                    control.send((False, repr(error)))
            if master in ready:
                try:
                    buffer += os.read(master, 4096)
                except OSError:  # the client side went away; wait for a new one
                    time.sleep(0.01)
                    continue
                while (packet := _take_packet(buffer)) is not None:
                    if reply := servos.answer(*packet):
                        os.write(master, reply)
    finally:
        link.unlink(missing_ok=True)
        os.close(master)
        os.close(slave)
    control.send((True, servos))


def _take_packet(buffer: bytearray) -> tuple[int, int, bytes] | None:
    """Remove and return the next valid instruction packet (id, instruction, params) from `buffer`."""
    while True:
        start = buffer.find(b"\xff\xff")
        if start < 0:
            del buffer[:-1]
            return None
        del buffer[:start]
        if len(buffer) < 4:
            return None
        length = buffer[3]
        if len(buffer) < 4 + length:
            return None
        packet = bytes(buffer[: 4 + length])
        del buffer[: 4 + length]
        if (~sum(packet[2:-1])) & 0xFF == packet[-1] and length >= 2:
            return packet[2], packet[4], packet[5:-1]


def _status(servo_id: int, params: bytes = b"") -> bytes:
    body = bytes([servo_id, len(params) + 2, 0]) + bytes(params)
    return b"\xff\xff" + body + bytes([(~sum(body)) & 0xFF])
