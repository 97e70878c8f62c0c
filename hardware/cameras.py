"""Cameras for the arms: lerobot's OpenCVCamera for devices, and a video file played as a live camera.

A video file is what a lab uses to dry-run a robot config without the camera, and what the tests
feed the agent. OpenCV decodes a file as fast as it is read, and lerobot's capture thread reads
without pause, so a file would be used up in a moment; `VideoFileCamera` hands out its frames at
the file's own frame rate, from the start again at the end (`loop`) or not (then it stops
delivering frames, as an unplugged camera does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
from lerobot.cameras.opencv import OpenCVCamera, OpenCVCameraConfig


@dataclass(frozen=True)
class CameraSettings:
    """One camera of a robot, as the agent TOML names it (`[robot.cameras.<name>]`)."""

    index_or_path: int | str  # a device index (0), a device path (/dev/video0) or a video file
    width: int = 640
    height: int = 480
    fps: int = 30
    loop: bool = True  # video files only: start again at the end


def make_camera(settings: CameraSettings) -> OpenCVCamera:
    source = settings.index_or_path
    path = Path(source) if isinstance(source, str) else None
    config = OpenCVCameraConfig(
        index_or_path=path if path is not None else source,
        fps=settings.fps,
        width=settings.width,
        height=settings.height,
    )
    if path is not None and path.is_file():
        return VideoFileCamera(config, loop=settings.loop)
    return OpenCVCamera(config)


class VideoFileCamera(OpenCVCamera):
    """lerobot's OpenCV camera on a video file, delivering frames at the file's frame rate."""

    def __init__(self, config: OpenCVCameraConfig, loop: bool = True):
        super().__init__(config)
        self.loop = loop
        self._next_frame = 0.0

    def _configure_capture_settings(self) -> None:
        # A file cannot be asked for another size or rate (lerobot would try and fail): check instead.
        capture = self.videocapture
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = capture.get(cv2.CAP_PROP_FPS)
        if (width, height) != (self.width, self.height) or not math.isclose(fps, self.fps, rel_tol=1e-3):
            raise ValueError(
                f"{self.index_or_path} is {width}x{height} at {fps:g} fps; the camera config asks "
                f"for {self.width}x{self.height} at {self.fps} fps"
            )
        self.capture_width, self.capture_height = width, height
        self._next_frame = time.perf_counter()

    def _read_from_hardware(self):
        wait = self._next_frame - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self._next_frame = max(self._next_frame + 1.0 / self.fps, time.perf_counter() - 1.0 / self.fps)
        ok, frame = self.videocapture.read()
        if not ok and self.loop:
            self.videocapture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.videocapture.read()
        if not ok:
            raise RuntimeError(f"{self}: no more frames in {self.index_or_path}")
        return frame
