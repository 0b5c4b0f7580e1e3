"""A bounded walk over COLMAP binary model files before pycolmap reads them.

pycolmap trusts the counts inside the files: a truncated images.bin or points3D.bin can make it
loop for minutes or fail with only "vector::reserve". Walking the records and checking that
every declared count fits in the bytes left takes milliseconds and names the damaged file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from mgs.errors import InputError

# parameters per camera model id (COLMAP's camera_models.h)
_CAMERA_PARAMS = {0: 3, 1: 4, 2: 4, 3: 5, 4: 8, 5: 8, 6: 12, 7: 5, 8: 4, 9: 5, 10: 12, 11: 16}


class _Reader:
    def __init__(self, path: Path):
        self.path, self.data, self.pos = path, path.read_bytes(), 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            self.fail(f"ends inside a record at byte {self.pos}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, count: int, size: int, what: str) -> None:
        if count * size > len(self.data) - self.pos:
            self.fail(f"declares {count} {what} but only {len(self.data) - self.pos} bytes "
                      "remain")
        self.pos += count * size

    def name(self) -> None:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            self.fail("ends inside an image name")
        self.pos = end + 1

    def fail(self, why: str):
        raise InputError(f"COLMAP model file {self.path} is truncated or damaged (it {why}); "
                         "re-export the model")


def check_binary_model(model_dir: Path) -> None:
    """Raise InputError naming the file if a .bin file's counts do not fit its size."""
    if (path := model_dir / "cameras.bin").is_file():
        reader = _Reader(path)
        (count,) = reader.take("<Q")
        reader.skip(count, 24, "cameras")  # at least the fixed part of each record
        reader.pos = 8
        for _ in range(count):
            _, model, _, _ = reader.take("<iiQQ")
            if model not in _CAMERA_PARAMS:
                break  # a model this check does not know: leave the rest to pycolmap
            reader.skip(_CAMERA_PARAMS[model], 8, "camera parameters")
    if (path := model_dir / "images.bin").is_file():
        reader = _Reader(path)
        (count,) = reader.take("<Q")
        reader.skip(count, 73, "images")
        reader.pos = 8
        for _ in range(count):
            reader.take("<I7dI")
            reader.name()
            (points,) = reader.take("<Q")
            reader.skip(points, 24, "image points")
    if (path := model_dir / "points3D.bin").is_file():
        reader = _Reader(path)
        (count,) = reader.take("<Q")
        reader.skip(count, 51, "points")
        reader.pos = 8
        for _ in range(count):
            *_, track = reader.take("<Q3d3BdQ")
            reader.skip(track, 8, "track entries")
