"""An emulated Feetech STS3215 servo bus served on a pseudo-terminal, for tests and dry runs.

lerobot's real `FeetechMotorsBus` (scservo_sdk over pyserial) talks to it through the device path, as
it would to the USB adapter of an SO-100/SO-101 arm. It speaks Feetech protocol 0: ping (also
broadcast), read, write, sync read and sync write, on a 256-byte register table per servo laid out
as lerobot's STS control table. Joint dynamics are simple: with torque on, a joint moves to its goal
(clamped to the position limits) at a fixed speed; with torque off it stays where it is, unless a
`hand` moves it (a leader arm being guided by a person).

The device path is a symlink (`link`) to the current pty, like /dev/serial/by-id/... for a real
adapter. `unplug()` closes the pty and removes the link (the USB cable pulled); `plug()` serves a new
pty behind the same link.
"""

from __future__ import annotations

import gc
import os
import select
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lerobot.motors.encoding_utils import decode_sign_magnitude, encode_sign_magnitude
from lerobot.motors.feetech.tables import MODEL_NUMBER_TABLE
from lerobot.motors.feetech.tables import STS_SMS_SERIES_CONTROL_TABLE as TABLE

BROADCAST = 0xFE
PING, READ, WRITE, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x82, 0x83
RESOLUTION = 4096
SPEED = 3000.0  # steps per second with torque on (an STS3215 at 7.4 V: ~0.2 s per 60 degrees)


def _address(name: str) -> tuple[int, int]:
    return TABLE[name]


@dataclass
class Servo:
    """One STS3215: its register table and its shaft position (raw steps, before the homing offset)."""

    id: int
    position: float = RESOLUTION / 2
    registers: bytearray = field(default_factory=lambda: bytearray(256))

    def __post_init__(self) -> None:
        self.set("Firmware_Major_Version", 3)
        self.set("Firmware_Minor_Version", 10)
        self.set("Model_Number", MODEL_NUMBER_TABLE["sts3215"])
        self.set("ID", self.id)
        self.set("Max_Position_Limit", RESOLUTION - 1)
        self.set("Lock", 1)
        self.set("Goal_Position", int(self.position))

    def get(self, name: str) -> int:
        address, length = _address(name)
        return int.from_bytes(self.registers[address : address + length], "little")

    def set(self, name: str, value: int) -> None:
        address, length = _address(name)
        self.registers[address : address + length] = value.to_bytes(length, "little")

    @property
    def offset(self) -> int:
        return decode_sign_magnitude(self.get("Homing_Offset"), 11)

    @property
    def torque(self) -> bool:
        return bool(self.get("Torque_Enable"))

    def goal(self) -> int:
        """The goal in present-position units, clamped to the limits as the firmware does."""
        goal = decode_sign_magnitude(self.get("Goal_Position"), 15)
        return min(max(goal, self.get("Min_Position_Limit")), self.get("Max_Position_Limit"))

    def present(self) -> int:
        """Present_Position = shaft position - Homing_Offset (lerobot's feetech convention)."""
        return int(round(self.position)) - self.offset

    def step(self, dt: float) -> None:
        if self.torque:
            target = self.goal() + self.offset
            delta = max(-SPEED * dt, min(SPEED * dt, target - self.position))
            self.position += delta
        self.set("Present_Position", encode_sign_magnitude(self.present(), 15))


class EmulatedBus:
    """Six STS3215 servos (ids 1..6, an SO arm) behind a pty; see the module docstring.

    `hand(t)`, if given, returns present positions {id: steps} that a person's hand imposes on the
    joints at `t` seconds after plugging in, whatever the torque (a leader arm).
    Logs for tests: `goals` holds every goal position received (id, raw value, present position at
    that moment), `torque_writes` every Torque_Enable write (id, value), in order.
    """

    def __init__(
        self,
        link: Path,
        ids=range(1, 7),
        hand: Callable[[float], dict[int, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.link = Path(link)
        self.clock = clock  # the joints move with its seconds: a test can hold time still
        self.servos = {i: Servo(i) for i in ids}
        self.hand = hand
        self.goals: list[tuple[int, int, int]] = []
        self.torque_writes: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fds: tuple[int, int] | None = None
        self._replies_to_lose = 0

    # -- the cable ----------------------------------------------------------------------------------------
    def plug(self) -> EmulatedBus:
        # The servos answer from a thread of the host process. A full garbage collection of a large heap
        # (a test process, ~200 ms) holds the GIL past lerobot's 50 ms packet timeout, which real servos
        # never see: collect once and freeze what is left, as the agent does at start.
        gc.collect()
        gc.freeze()
        master, slave = os.openpty()
        tty.setraw(slave)
        self._fds = (master, slave)
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link)
        self._stop.clear()
        self._started = self.clock()
        self._thread = threading.Thread(target=self._serve, args=(master,), name=f"bus {self.link.name}", daemon=True)
        self._thread.start()
        return self

    def unplug(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.link.unlink(missing_ok=True)
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    def __enter__(self) -> EmulatedBus:
        return self.plug()

    def __exit__(self, *exc) -> None:
        self.unplug()

    # -- state for tests ----------------------------------------------------------------------------------
    def present(self) -> dict[int, int]:
        with self._lock:
            self._advance()
            return {i: s.present() for i, s in self.servos.items()}

    def lose_replies(self, count: int) -> None:
        """The next `count` status packets never reach the host (the instructions still take effect)."""
        with self._lock:
            self._replies_to_lose = count

    def register(self, servo_id: int, name: str) -> int:
        with self._lock:
            return self.servos[servo_id].get(name)

    # -- serving ------------------------------------------------------------------------------------------
    def _serve(self, master: int) -> None:
        # Real servos answer within microseconds whatever the host does; on a loaded host this thread
        # waits for a core. Where the host allows it (CAP_SYS_NICE, e.g. root in CI), it gets a higher
        # priority than the processes under test, so the 50 ms packet timeout measures them, not it.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except PermissionError:
            pass
        buffer = bytearray()
        self._last = self.clock()
        while not self._stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.02)
            if not ready:
                continue
            try:
                buffer += os.read(master, 4096)
            except OSError:  # the client side went away; wait for a new one
                time.sleep(0.01)
                continue
            while (packet := _take_packet(buffer)) is not None:
                with self._lock:
                    self._advance()
                    reply = self._answer(*packet)
                    if reply and self._replies_to_lose > 0:
                        self._replies_to_lose -= 1
                        reply = b""
                if reply:
                    os.write(master, reply)

    def _advance(self) -> None:
        now = self.clock()
        dt, self._last = now - self._last, now
        imposed = self.hand(now - self._started) if self.hand is not None else {}
        for servo in self.servos.values():
            if servo.id in imposed:
                servo.position = imposed[servo.id] + servo.offset
            servo.step(dt)

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
        if address == _address("Goal_Position")[0]:
            self.goals.append((servo.id, decode_sign_magnitude(servo.get("Goal_Position"), 15), servo.present()))
        if address == _address("Torque_Enable")[0]:
            self.torque_writes.append((servo.id, data[0]))
            servo.set("Goal_Position", encode_sign_magnitude(servo.present(), 15))  # servos hold where they are


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
