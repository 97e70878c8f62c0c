"""Test-wide settings: offline, quiet video encoder, a small thread pool."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SVT_LOG", "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
