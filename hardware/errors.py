"""Errors the hardware layer raises that the agent handles by kind, whatever the robot."""


class HardwareFault(ConnectionError):
    """A serial port or a camera stopped answering mid-session; the agent reconnects when it returns."""


class CalibrationMissing(RuntimeError):
    """An arm has no calibration file; the message names the command that makes one."""
