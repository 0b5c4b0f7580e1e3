"""World orientation of a reconstruction: up from the camera geometry, then heading and metric
scale from GPS east/north when it fits (the final frame has +z up).

Plain NumPy, no pycolmap: the SfM pipeline (mgs.ingest.sfm) and the dataset ingest
(mgs.ingest.datasets) share it.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("mgs.ingest.orientation")


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True):
    """Least-squares similarity (s, R, t) with dst ≈ s·R·src + t (Umeyama 1991), any dimension."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.eye(src.shape[1])
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1, -1] = -1.0  # reflection → nearest proper rotation
    rotation = u @ sign @ vt
    var_s = (xs ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sv) @ sign) / var_s) if with_scale and var_s > 0 else 1.0
    return scale, rotation, mu_d - scale * rotation @ mu_s


def wgs84_to_enu(lat_lon_alt: np.ndarray, origin=None) -> np.ndarray:
    """Local east-north-up metres around `origin` (default: the mean position)."""
    lla = np.asarray(lat_lon_alt, np.float64).reshape(-1, 3)
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)

    def ecef(p):
        lat, lon = np.radians(p[..., 0]), np.radians(p[..., 1])
        n = a / np.sqrt(1 - e2 * np.sin(lat) ** 2)
        return np.stack([(n + p[..., 2]) * np.cos(lat) * np.cos(lon),
                         (n + p[..., 2]) * np.cos(lat) * np.sin(lon),
                         (n * (1 - e2) + p[..., 2]) * np.sin(lat)], -1)

    origin = lla.mean(0) if origin is None else np.asarray(origin, np.float64)
    lat, lon = np.radians(origin[0]), np.radians(origin[1])
    to_enu = np.array([[-np.sin(lon), np.cos(lon), 0],
                       [-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)],
                       [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)]])
    return (ecef(lla) - ecef(origin)) @ to_enu.T


def rotation_to_z(up: np.ndarray) -> np.ndarray:
    """Smallest rotation taking the unit vector `up` to +z."""
    up = np.asarray(up, np.float64) / np.linalg.norm(up)
    axis, cos = np.cross(up, [0.0, 0.0, 1.0]), float(up[2])
    if np.linalg.norm(axis) < 1e-12:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + k + k @ k / (1 + cos)


def estimate_up(world_to_cams: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """Up direction from camera geometry alone, and how it was found.

    Aerial sets look mostly one way (down): up = −mean viewing direction, refined by the normal
    of the camera-centre plane when the flight is planar. Ground-level sets: photos are taken
    upright, so up = mean of the cameras' −y axes.
    """
    rotations = np.stack([p[:3, :3] for p in world_to_cams])
    centres = np.stack([-p[:3, :3].T @ p[:3, 3] for p in world_to_cams])
    view = rotations[:, 2, :].mean(0)      # camera z axes in world coordinates
    cam_up = -rotations[:, 1, :].mean(0)
    if np.linalg.norm(view) > 0.5:
        up, method = -view / np.linalg.norm(view), "viewing direction"
        if len(centres) >= 4:
            # Survey flights keep their altitude: the centres span a horizontal plane or line.
            _, sv, vt = np.linalg.svd(centres - centres.mean(0))
            normal = vt[2] * np.sign(vt[2] @ up)
            planar = sv[1] > 0.2 * sv[0] and sv[2] < 0.25 * sv[1]
            if planar and normal @ up > np.cos(np.radians(30)):
                up, method = normal, "camera-centre plane"
            elif sv[1] <= 0.2 * sv[0] and abs(vt[0] @ up) < np.sin(np.radians(30)):
                up = up - (vt[0] @ up) * vt[0]
                up, method = up / np.linalg.norm(up), "viewing direction, level flight line"
        return up, method
    if np.linalg.norm(cam_up) > 0.1:
        return cam_up / np.linalg.norm(cam_up), "camera up vectors"
    log.warning("cannot tell the up direction from the camera geometry; keeping −y of the "
                "reconstruction as up")
    return np.array([0.0, -1.0, 0.0]), "none (−y)"


def orientation(world_to_cams, gps_enu=None):
    """Similarity (s, R, t) taking the SfM frame to a z-up frame, and the method used.

    Up always comes from the camera geometry: consumer GPS altitude drifts (on the Caliterra
    flight it climbs 110 m while the cameras fly level). Horizontal GPS (east, north), when
    it fits, sets metric scale and heading (x east, y north); else the main flight direction
    becomes x and the SfM scale is kept.
    """
    centres = np.stack([-p[:3, :3].T @ p[:3, 3] for p in world_to_cams])
    up, method = estimate_up(world_to_cams)
    rot = rotation_to_z(up)
    xy = (centres @ rot.T)[:, :2]
    if gps_enu is not None and np.isfinite(gps_enu).all(1).sum() >= 3:
        valid = np.isfinite(gps_enu).all(1)
        en, sfm_xy = gps_enu[valid, :2], xy[valid]
        s, r2, t2 = umeyama(sfm_xy, en)
        resid = np.sqrt(((s * sfm_xy @ r2.T + t2 - en) ** 2).sum(1).mean())
        spread = np.sqrt(((en - en.mean(0)) ** 2).sum(1).mean())
        # Camera GPS is often 10–20 m off (Caliterra: 17 m rms over a 44 m flight); that still
        # gives a rough metric scale and heading, better than arbitrary SfM units.
        if spread > 5.0 and resid < 0.5 * spread:
            (log.info if resid < 0.1 * spread else log.warning)(
                "GPS east/north fit: %.4g m per SfM unit, rms residual %.1f m over %.0f m%s", s,
                resid, spread, "" if resid < 0.1 * spread else " (noisy GPS: approximate)")
            r3 = np.eye(3)
            r3[:2, :2] = r2
            return (s, r3 @ rot, np.array([*t2, 0.0]),
                    f"{method}; east-north metres from GPS (rms {resid:.1f} m)")
        log.warning("GPS positions do not fit the reconstruction (rms %.1f m over %.1f m); "
                    "ignoring GPS for the orientation", resid, spread)
    if len(xy) >= 2:
        _, _, vt = np.linalg.svd(xy - xy.mean(0))
        yaw = -np.arctan2(vt[0, 1], vt[0, 0])  # main flight direction → x
        rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        rot = rz @ rot
    return 1.0, rot, np.zeros(3), method
