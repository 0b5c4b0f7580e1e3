"""Embedded synthetic scene: a procedural aerial "city" seen from a drone.

A textured ground plane (grass blocks, asphalt streets) and axis-aligned boxes
("buildings") are rendered by an exact analytic ray caster in numpy, from a
lawnmower flight with nadir and oblique views. Poses are exact and the sparse
points are exact surface hits, so the scene is a ground-truth test bed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.errors import MgsError
from mgs.scene import SCENE_JSON, Camera, Scene, save_scene, split_every

log = logging.getLogger("mgs.synthetic")

SKY_RGB = np.array([0.62, 0.74, 0.90])
WINDOW_RGB = np.array([0.16, 0.20, 0.27])
STREET_WIDTH = 8.0     # metres of asphalt between city blocks
FLOOR_HEIGHT = 3.2
WINDOW_SPACING = 2.6
TEXTURE_SIZE = 128     # textures are box-filtered to this size to limit aliasing


@dataclass
class SyntheticConfig:
    seed: int = 0
    num_views: int = 80
    width: int = 200
    height: int = 150
    num_buildings: int = 16
    extent: float = 120.0        # side of the square city, metres, centred on the origin
    altitude: float = 90.0       # flight height above the ground plane
    min_height: float = 6.0      # building heights
    max_height: float = 32.0
    hfov_deg: float = 60.0
    oblique_deg: float = 30.0    # tilt of oblique views away from nadir
    num_passes: int = 4          # lawnmower rows
    num_points: int = 4000       # sparse points sampled on visible surfaces
    supersample: int = 2         # rays per pixel side (anti-aliasing)
    sun_azimuth_deg: float = 135.0
    sun_elevation_deg: float = 50.0
    shadows: bool = True

    def validate(self) -> None:
        if self.num_views < 1 or self.width < 8 or self.height < 8 or self.num_passes < 1:
            raise MgsError(f"synthetic config needs num_views >= 1, num_passes >= 1 and images "
                           f"of at least 8x8 pixels, got {self}")
        if self.altitude <= self.max_height + 5.0:
            raise MgsError(f"synthetic altitude {self.altitude} must exceed the tallest building "
                           f"({self.max_height}) by more than 5 m")
        if not 0.0 <= self.oblique_deg < 60.0 or not 10.0 <= self.hfov_deg < 150.0:
            raise MgsError("synthetic oblique_deg must be in [0, 60) and hfov_deg in [10, 150)")


@dataclass
class City:
    box_min: np.ndarray      # (B, 3)
    box_max: np.ndarray      # (B, 3)
    facade_tint: np.ndarray  # (B, 3)
    roof_tint: np.ndarray    # (B, 3)
    tex_offset: np.ndarray   # (B, 2) per-building texture offset, metres
    textures: dict           # name -> (T, T) float32, mean ~1
    block_size: float
    extent: float
    sun_dir: np.ndarray      # unit vector pointing towards the sun
    shadows: bool


# ---------------------------------------------------------------- textures

def _normalise(texture: np.ndarray) -> np.ndarray:
    t = texture.astype(np.float32)
    side = min(t.shape) // TEXTURE_SIZE * TEXTURE_SIZE
    t = t[:side, :side]
    block = side // TEXTURE_SIZE
    t = t.reshape(TEXTURE_SIZE, block, TEXTURE_SIZE, block).mean(axis=(1, 3))
    t = (t - t.mean()) / (t.std() + 1e-6)
    return np.clip(1.0 + 0.22 * t, 0.45, 1.55).astype(np.float32)


def _procedural_texture(rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise, used when scikit-image's bundled photos are unavailable."""
    texture = np.zeros((TEXTURE_SIZE, TEXTURE_SIZE), np.float32)
    for cells in (4, 8, 16, 32):
        grid = rng.random((cells, cells)).astype(np.float32)
        reps = TEXTURE_SIZE // cells
        texture += np.kron(grid, np.ones((reps, reps), np.float32)) / cells ** 0.5
    return texture


def load_textures(rng: np.random.Generator) -> dict:
    textures = {}
    for name in ("brick", "grass", "gravel"):
        try:
            import skimage.data

            textures[name] = _normalise(getattr(skimage.data, name)())
        except Exception as exc:  # offline install without data files, or no scikit-image
            log.info("texture %s unavailable (%s); using procedural noise", name, exc)
            textures[name] = _normalise(_procedural_texture(rng))
    return textures


def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray, metres: float) -> np.ndarray:
    """Bilinear, wrapping lookup; `metres` is the world size one texture tile covers."""
    size = texture.shape[0]
    x, y = u * (size / metres), v * (size / metres)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0 = x0.astype(np.int64) % size
    y0 = y0.astype(np.int64) % size
    x1, y1 = (x0 + 1) % size, (y0 + 1) % size
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


# ------------------------------------------------------------------- world

def build_city(config: SyntheticConfig) -> City:
    """Buildings on a square grid of blocks separated by streets; deterministic in the seed."""
    rng = np.random.default_rng(config.seed)
    per_side = max(1, math.ceil(math.sqrt(config.num_buildings)))
    block = config.extent / per_side
    lot = block - STREET_WIDTH  # buildable square inside each block
    if lot < 3.0:
        raise MgsError(f"synthetic extent {config.extent} is too small for "
                       f"{config.num_buildings} buildings; raise extent")
    cells = rng.permutation(per_side * per_side)[:config.num_buildings]
    box_min, box_max = [], []
    for cell in cells:
        row, col = divmod(int(cell), per_side)
        size = rng.uniform(0.4, 1.0, size=2) * lot
        lot_x0 = -config.extent / 2 + col * block + STREET_WIDTH / 2
        lot_y0 = -config.extent / 2 + row * block + STREET_WIDTH / 2
        x0 = lot_x0 + rng.uniform(0, lot - size[0])
        y0 = lot_y0 + rng.uniform(0, lot - size[1])
        # Heights skew low, with a few towers, like a real downtown.
        height = config.min_height + (config.max_height - config.min_height) * rng.random() ** 1.6
        box_min.append((x0, y0, 0.0))
        box_max.append((x0 + size[0], y0 + size[1], height))
    count = len(box_min)
    hue = rng.random(count)
    facade_tint = 0.55 + 0.35 * np.stack([np.cos(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5
                                          for k in range(3)], axis=1)
    roof_grey = rng.uniform(0.35, 0.75, size=(count, 1))
    roof_tint = roof_grey * np.array([1.0, 0.95, 0.9]) + rng.uniform(-0.06, 0.06, (count, 3))
    azimuth, elevation = np.radians(config.sun_azimuth_deg), np.radians(config.sun_elevation_deg)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                    np.sin(elevation)])
    return City(box_min=np.array(box_min).reshape(-1, 3), box_max=np.array(box_max).reshape(-1, 3),
                facade_tint=facade_tint, roof_tint=np.clip(roof_tint, 0, 1),
                tex_offset=rng.uniform(0, 50, size=(count, 2)), textures=load_textures(rng),
                block_size=block, extent=config.extent, sun_dir=sun, shadows=config.shadows)


def look_at_pose(center: np.ndarray, tilt_deg: float, azimuth_deg: float) -> np.ndarray:
    """World-to-camera (OpenCV) looking down, tilted `tilt_deg` from nadir towards `azimuth_deg`.

    The image's "up" points along the azimuth, so oblique views show the horizon side on top.
    """
    tilt, azimuth = np.radians(tilt_deg), np.radians(azimuth_deg)
    heading = np.array([np.cos(azimuth), np.sin(azimuth), 0.0])
    forward = np.array([np.sin(tilt) * heading[0], np.sin(tilt) * heading[1], -np.cos(tilt)])
    right = np.cross(forward, heading)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = -rotation @ center
    return pose


def flight_cameras(config: SyntheticConfig, image_dir: Path) -> list[Camera]:
    """Lawnmower flight over ground targets: rows along x, alternating direction.

    Views cycle nadir / oblique / opposite oblique (a cycle of 3, so the every-10th test split
    gets both kinds). An oblique camera is moved back so its optical axis still hits the row's
    ground target, as oblique survey rigs do. Oblique azimuths run along x on even rows and
    along y on odd rows, so all four facade sides are seen.
    """
    focal = config.width / (2 * math.tan(math.radians(config.hfov_deg) / 2))
    K = np.array([[focal, 0, config.width / 2], [0, focal, config.height / 2], [0, 0, 1.0]])
    per_row = math.ceil(config.num_views / config.num_passes)
    half = 0.4 * config.extent  # the image footprint covers the remaining margin
    rows_y = np.linspace(-half, half, config.num_passes) if config.num_passes > 1 else [0.0]
    cameras = []
    for index in range(config.num_views):
        row, step = divmod(index, per_row)
        fraction = step / max(per_row - 1, 1)
        x = -half + 2 * half * (fraction if row % 2 == 0 else 1 - fraction)
        mode = index % 3
        azimuth = (90.0 if row % 2 else 0.0) + (180.0 if mode == 2 else 0.0)
        tilt = 0.0 if mode == 0 else config.oblique_deg
        heading = np.array([math.cos(math.radians(azimuth)), math.sin(math.radians(azimuth)), 0])
        center = (np.array([x, rows_y[row], config.altitude])
                  - heading * config.altitude * math.tan(math.radians(tilt)))
        name = f"view_{index:04d}.png"
        cameras.append(Camera(name=name, K=K, width=config.width, height=config.height,
                              world_to_camera=look_at_pose(center, tilt, azimuth),
                              image_path=image_dir / name))
    return cameras


# ----------------------------------------------------------------- rendering

def _cast(city: City, origins: np.ndarray, dirs: np.ndarray):
    """Nearest hit along each ray: (t, box index or -1 for ground / -2 for sky, hit axis)."""
    # Per-axis 1-D arrays: numpy reductions over a length-3 axis are several times slower.
    o = [np.ascontiguousarray(origins[:, k]) for k in range(3)]
    d = [np.ascontiguousarray(dirs[:, k]) for k in range(3)]
    inv = [1.0 / np.where(np.abs(dk) < 1e-12, 1e-12, dk) for dk in d]
    t_ground = np.where(d[2] < 0, -o[2] * inv[2], np.inf)
    t_best = np.where(t_ground > 1e-9, t_ground, np.inf)
    hit = np.where(np.isfinite(t_best), -1, -2)
    axis = np.full(len(dirs), 2)
    for b in range(len(city.box_min)):
        near, far = [], []
        for k in range(3):
            t0 = (city.box_min[b, k] - o[k]) * inv[k]
            t1 = (city.box_max[b, k] - o[k]) * inv[k]
            near.append(np.minimum(t0, t1))
            far.append(np.maximum(t0, t1))
        t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
        t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
        closer = (t_near <= t_far) & (t_near > 1e-9) & (t_near < t_best)
        if not closer.any():
            continue
        t_best[closer] = t_near[closer]
        hit[closer] = b
        entry_axis = np.where(near[0] == t_near, 0, np.where(near[1] == t_near, 1, 2))
        axis[closer] = entry_axis[closer]
    return t_best, hit, axis


def _street_mask(city: City, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    def near_street(c):
        offset = np.mod(c + city.extent / 2 + STREET_WIDTH / 2, city.block_size)
        return offset < STREET_WIDTH

    reach = city.extent / 2 + STREET_WIDTH
    inside = (np.abs(x) < reach) & (np.abs(y) < reach)
    return inside & (near_street(x) | near_street(y))


def _shade(city: City, points: np.ndarray, dirs: np.ndarray, hit: np.ndarray,
           axis: np.ndarray) -> np.ndarray:
    """Surface colour at hit points: texture x tint x (ambient + sun), view independent."""
    colour = np.tile(SKY_RGB, (len(points), 1))
    normal = np.zeros_like(points)
    tex = city.textures
    ground = hit == -1
    if ground.any():
        x, y = points[ground, 0], points[ground, 1]
        grass = _sample(tex["grass"], x, y, 24.0)[:, None] * np.array([0.36, 0.50, 0.24])
        # Low-frequency variation so large lawns are not a repeating tile.
        patches = 1.0 + 0.15 * np.sin(x / 7.3 + 1.1) * np.cos(y / 5.9 + 0.4)
        grass *= patches[:, None]
        asphalt = _sample(tex["gravel"], x, y, 12.0)[:, None] * np.array([0.30, 0.30, 0.32])
        street = _street_mask(city, x, y)
        colour[ground] = np.where(street[:, None], asphalt, grass)
        normal[ground] = (0, 0, 1)
    building = hit >= 0
    if building.any():
        b, ax, p = hit[building], axis[building], points[building]
        p_local = p[:, :2] + city.tex_offset[b]
        sign = -np.sign(dirs[building, :][np.arange(len(b)), ax])
        n = np.zeros_like(p)
        n[np.arange(len(b)), ax] = sign
        normal[building] = n
        roof = ax == 2
        # Facades: u runs along the wall, v is height.
        u = np.where(ax == 0, p_local[:, 1], p_local[:, 0])
        wall = _sample(tex["brick"], u, p[:, 2], 8.0)[:, None] * city.facade_tint[b]
        in_floor = np.mod(p[:, 2], FLOOR_HEIGHT)
        in_window = ((np.mod(u, WINDOW_SPACING) > 0.8) & (in_floor > 1.0) & (in_floor < 2.4)
                     & (p[:, 2] > FLOOR_HEIGHT * 0.9))
        wall = np.where(in_window[:, None], WINDOW_RGB, wall)
        top = _sample(tex["gravel"], p_local[:, 0], p_local[:, 1], 16.0)[:, None]
        top = top * city.roof_tint[b]
        colour[building] = np.where(roof[:, None], top, wall)
    surface = hit >= -1
    lambert = np.clip(normal @ city.sun_dir, 0.0, 1.0)
    if city.shadows and surface.any():
        lit = np.zeros(len(points), bool)
        idx = np.flatnonzero(surface & (lambert > 0))
        starts = points[idx] + normal[idx] * 1e-6
        _, blocker, _ = _cast(city, starts, np.tile(city.sun_dir, (len(idx), 1)))
        lit[idx] = blocker < 0
        lambert = lambert * lit
    light = np.where(surface, 0.42 + 0.75 * lambert, 1.0)
    return np.clip(colour * light[:, None], 0.0, 1.0)


def _pixel_rays(camera: Camera, u: np.ndarray, v: np.ndarray):
    """World-space unit rays through continuous pixel coordinates (u, v)."""
    rotation = camera.world_to_camera[:3, :3]
    K = camera.K
    cam_dirs = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    dirs = cam_dirs @ rotation  # rows of R^T applied: R^T d for each ray
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.tile(camera.center, (len(dirs), 1)), dirs


def _hits(city: City, camera: Camera, u: np.ndarray, v: np.ndarray):
    origins, dirs = _pixel_rays(camera, u.astype(np.float64), v.astype(np.float64))
    t, hit, axis = _cast(city, origins, dirs)
    points = origins + dirs * np.where(np.isfinite(t), t, 0.0)[:, None]
    return points, dirs, hit, axis


def trace(city: City, camera: Camera, u: np.ndarray, v: np.ndarray):
    """Colour (N,3) in [0,1], hit points (N,3) and hit flags for rays through pixels (u, v)."""
    points, dirs, hit, axis = _hits(city, camera, u, v)
    return _shade(city, points, dirs, hit, axis), points, hit >= -1


def render_view(city: City, camera: Camera, supersample: int = 2) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]; each pixel averages a supersample^2 grid of rays."""
    s = supersample
    offsets = (np.arange(s) + 0.5) / s
    rows, cols = np.mgrid[0:camera.height, 0:camera.width]
    u = (cols[..., None, None] + offsets[None, None, None, :]).repeat(s, axis=2)
    v = (rows[..., None, None] + offsets[None, None, :, None]).repeat(s, axis=3)
    colour, _, _ = trace(city, camera, u.ravel(), v.ravel())
    return colour.reshape(camera.height, camera.width, s * s, 3).mean(axis=2)


def render_depth(city: City, camera: Camera) -> np.ndarray:
    """(H, W) camera-z depth of the pixel-centre rays (inf for sky)."""
    rows, cols = np.mgrid[0:camera.height, 0:camera.width]
    points, _, hit, _ = _hits(city, camera, cols.ravel() + 0.5, rows.ravel() + 0.5)
    z = points @ camera.world_to_camera[2, :3] + camera.world_to_camera[2, 3]
    return np.where(hit >= -1, z, np.inf).reshape(camera.height, camera.width)


def to_uint8(colour: np.ndarray) -> np.ndarray:
    return np.clip(np.round(colour * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------- scene

def make_synthetic_scene(out_dir, config: SyntheticConfig | None = None) -> Scene:
    """Render the city into a scene folder (images/, sparse/0/, scene.json) and return it.

    scene.json is removed first and written last, so it only exists for a complete scene.
    """
    config = config or SyntheticConfig()
    config.validate()
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir)
    (out_dir / SCENE_JSON).unlink(missing_ok=True)
    image_dir = ensure_writable_dir(out_dir / "images")
    log.info("synthetic city: %d buildings over %.0f m, %d views of %dx%d at %.0f m altitude",
             config.num_buildings, config.extent, config.num_views, config.width,
             config.height, config.altitude)
    from PIL import Image

    city = build_city(config)
    cameras = flight_cameras(config, image_dir)
    rng = np.random.default_rng(config.seed + 1)
    per_view = math.ceil(config.num_points / config.num_views)
    point_xyz, point_rgb = [], []
    for camera in tqdm(cameras, desc="rendering synthetic views", unit="view", leave=False):
        image = render_view(city, camera, config.supersample)
        with atomic_path(camera.image_path) as tmp:
            Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
        # Exact surface points: pixel-centre rays of random pixels, coloured by the surface.
        u = rng.integers(0, camera.width, per_view) + 0.5
        v = rng.integers(0, camera.height, per_view) + 0.5
        colour, points, hit = trace(city, camera, u, v)
        point_xyz.append(points[hit])
        point_rgb.append(to_uint8(colour[hit]))
    xyz = np.concatenate(point_xyz)[:config.num_points]
    rgb = np.concatenate(point_rgb)[:config.num_points]
    train, test = split_every([c.name for c in cameras], every=10)
    aabb = np.array([[-config.extent / 2, -config.extent / 2, 0.0],
                     [config.extent / 2, config.extent / 2, float(city.box_max[:, 2].max())]])
    source = "synthetic " + " ".join(f"{k}={v}" for k, v in asdict(config).items())
    scene = Scene(cameras=cameras, train_names=train, test_names=test, points_xyz=xyz,
                  points_rgb=rgb, up=np.array([0.0, 0.0, 1.0]), scene_dir=out_dir, aabb=aabb,
                  source=source)
    save_scene(scene, out_dir)
    log.info("wrote %d images, %d points, %d train / %d test views to %s",
             len(cameras), len(xyz), len(train), len(test), out_dir)
    return scene
