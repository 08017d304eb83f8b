"""A real library for the `clipsearch web` tests: photos on disk, indexed and labelled by the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from e2e_helpers import REPO, make_photo_folder, make_tiny_model, run_cli, scene, write_photo

HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"
LATIN1_NAME = b"caf\xe9.jpg"  # "café.jpg" in Latin-1: not UTF-8 (Python holds it as "caf\udce9.jpg")
LATIN1_BROKEN = b"cass\xe9.jpg"  # "cassé.jpg", not a picture
N_EXTRA = 70  # with the format samples: more than one page of 60 tiles


@dataclass
class Site:
    root: Path
    home: Path
    db: Path
    photos: Path
    model: Path

    @property
    def env(self) -> dict:
        return {"CLIPSEARCH_HOME": str(self.home)}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        result = run_cli("--db", str(self.db), *args, env=self.env)
        assert result.returncode == 0, result.stderr
        return result


def build_site(root: Path) -> Site:
    """Photos in several formats (one with a hostile name), indexed with a tiny model and labelled."""
    site = Site(root, root / "home", root / "lib.db", root / "photos", root / "model")
    make_tiny_model(site.model)
    make_photo_folder(site.photos)
    for i in range(N_EXTRA):
        write_photo(site.photos / "more" / f"p{i:03d}.jpg", 100 + i, size=(200, 150))
    write_photo(site.photos / HOSTILE_NAME, 99)
    write_camera_photo(site.photos / "camera.jpg")
    (site.photos / "copies").mkdir()
    shutil.copyfile(site.photos / "more" / "p000.jpg", site.photos / "copies" / "p000 copy.jpg")
    (site.photos / "latin1").mkdir()
    shutil.copyfile(site.photos / "beach.jpg", latin1_photo(site))  # a copy: on the duplicates page too
    with open(latin1_photo(site, LATIN1_BROKEN), "wb") as f:  # a file that cannot be indexed, on /status
        f.write(b"not a JPEG")
    site.cli("index", str(site.photos), "--model", str(site.model), "--backend", "torch-fp32")
    site.cli("label", "--classes", "red,green,blue", "--template", "a {} photo.")
    return site


def latin1_photo(site: Site, name: bytes = LATIN1_NAME) -> Path:
    """A file whose name is not UTF-8, in the folder ``latin1`` (the one photo there, and a broken file)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(site.photos / "latin1"), name)))


CAMERA = ("Canon", "Canon EOS R5", "2023:07:14 18:30:00")


def write_camera_photo(path: Path) -> Path:
    """A JPEG whose EXIF names its camera and the time it was taken (see CAMERA)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = CAMERA[0], CAMERA[1]  # Make, Model
    exif.get_ifd(0x8769)[0x9003] = CAMERA[2]  # Exif IFD: DateTimeOriginal
    Image.fromarray(scene(777, (120, 90))).save(path, exif=exif.tobytes())
    return path


class ServerProcess:
    """``clipsearch web --port 0`` in a real subprocess; ``url`` once it printed its address."""

    def __init__(self, site: Site, *args: str):
        env = {**os.environ, **site.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipsearch", "--db", str(site.db), "web", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.started = time.monotonic()
        line = self.proc.stdout.readline()  # blocks until the server is bound (or died)
        match = re.search(r"at (http://\S+) ", line)
        if match is None:
            self.stop()
            raise AssertionError(f"no address printed: {line!r} {self.proc.stderr.read()}")
        self.url = match.group(1)
        self.ready_s = time.monotonic() - self.started

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
