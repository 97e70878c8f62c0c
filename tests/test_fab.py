"""The app package (FAB): fedbot finds its files without walking what Flower's rules exclude, and
the FAB is byte for byte the one Flower builds from the whole directory (robots compare its hash)."""

from __future__ import annotations

import hashlib
import zipfile
from io import BytesIO

from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from fedbot.flower_processes import PROJECT, app_files, installed_app_sha256, staged_app


def _app(root):
    """An app with files Flower keeps and every kind of file or directory it leaves out."""
    for relative, text in {
        "pyproject.toml": (PROJECT / "pyproject.toml").read_text(),
        ".gitignore": "outputs/\ndata/\n*.pyc\n",
        "pkg/module.py": "x = 1\n",
        "pkg/data/kept_out.py": "y = 2\n",  # `data/` matches at any depth
        "pkg/__pycache__/module.cpython-312.pyc": "",
        "outputs/run/metrics.json": "{}",
        ".venv/lib/site.py": "z = 3\n",
        "docs/notes.md": "# notes\n",
        "docs/picture.png": "not text",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "module.py")
    return root


def test_the_fab_is_flowers_own_build_without_the_walk(tmp_path):
    app = _app(tmp_path / "app")
    assert not any(path.startswith((".venv/", "outputs/", "pkg/data/")) for path in app_files(app))
    fab = build_fab_from_disk(app)
    assert build_fab_from_files(app_files(app))[0] == fab
    assert build_fab_from_disk(staged_app(tmp_path / "staged", app)) == fab  # what `flwr run` submits
    assert {"pkg/module.py", "docs/notes.md", "pyproject.toml"} <= set(zipfile.ZipFile(BytesIO(fab)).namelist())

    # fedbot itself, its venv beside it: the hash robots check runs against
    assert installed_app_sha256() == hashlib.sha256(build_fab_from_disk(PROJECT)).hexdigest()
