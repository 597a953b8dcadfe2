"""Synthetic scenes with exact ground truth: a closed, textured room with boxes, seen along a
smooth camera path.

Why: evaluation (and training the small model) needs images whose depth, cameras and world
points are known exactly. Everything here is vectorised numpy ray casting over all frames and
pixels at once; the only Python loops run over the handful of scene objects.

Conventions (those of VGGT, see docs/evaluation.md):
- ``extrinsic`` is camera-from-world ``[R|t]`` with OpenCV axes (x right, y down, z forward).
- ``intrinsic`` has ``fx = fy`` and the principal point at ``(W/2, H/2)``.
- Pixel ``(u, v)`` with ``u = 0..W-1``, ``v = 0..H-1`` (no +0.5) looks along
  ``R^T ((u-cx)/fx, (v-cy)/fy, 1)``, so ``depth`` is the z-depth and
  ``world_points = C + depth * R^T ((u-cx)/fx, (v-cy)/fy, 1)``, exactly.
- The world frame is the room's (origin at its centre, y pointing down: the floor is the
  plane ``y = +half_y``), or the first camera's with ``world_frame="first_camera"``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import gt_loader

logger = logging.getLogger(__name__)

TEXTURE_KINDS = ("checker", "stripes", "noise")
PATHS = ("orbit", "dolly", "random")
WORLD_FRAMES = ("room", "first_camera")

# Default scene options; ``render_scene(**options)`` overrides them. A tuple ``(lo, hi)`` is a
# range drawn uniformly per scene; a number is used as is.
DEFAULT_OPTIONS: dict[str, Any] = {
    "room_half_xz": (2.5, 4.0),  # half width / depth of the room, metres
    "room_half_y": (1.2, 1.7),  # half height
    "num_boxes": (2, 5),  # inclusive range of boxes standing on the floor
    "box_half_size": (0.2, 0.6),  # horizontal half extent of a box
    "box_half_height": (0.2, 0.9),
    "texture_kinds": TEXTURE_KINDS,  # drawn per surface
    "texture_scale": (1.5, 5.0),  # checker cells / stripes per metre
    "detail_scale": (6.0, 12.0),  # fine noise overlaid on every surface (for matching)
    "detail_amplitude": (0.10, 0.25),
    "fov_deg": (50.0, 70.0),  # horizontal field of view
    "path": "orbit",  # "orbit", "dolly" or "random" (one of the two per scene)
    "step_deg": (2.0, 6.0),  # orbit: degrees of arc between consecutive frames
    "step_m": (0.05, 0.15),  # dolly: metres between consecutive frames
    "pitch_deg": (-5.0, 25.0),  # positive looks down
    "yaw_offset_deg": (-25.0, 25.0),  # look away from the room centre by this much
    "roll_deg": 3.0,  # amplitude of the smooth roll wobble
    "wobble": 0.05,  # amplitude (metres) of the smooth position / target wobble
    "jitter": 0.002,  # i.i.d. per-frame position noise (metres)
    "supersample": 1,  # k: average k x k rays per pixel (antialiasing); depth stays at the centre
    "image_noise": 0.0,  # std of Gaussian pixel noise, in [0, 255] units
    "world_frame": "room",  # or "first_camera": camera 0 has the identity extrinsic
}


@dataclass
class Texture:
    """A procedural texture on surface coordinates (s, t) in metres."""

    kind: str
    colors: np.ndarray  # [2, 3] in [0, 1]
    scale: float  # pattern frequency, per metre
    angle: float  # stripes orientation, radians
    grid: np.ndarray  # [n, n, 3] random values for value noise (pattern and detail)
    detail_scale: float
    detail_amplitude: float


@dataclass
class Box:
    """An oriented box standing on the floor: rotated by ``yaw`` about the vertical y axis."""

    center: np.ndarray  # [3]
    half: np.ndarray  # [3]
    yaw: float
    texture: Texture


@dataclass
class Room:
    """A closed axis-aligned room centred at the origin (y down), with boxes inside."""

    half: np.ndarray  # [3] half extents
    faces: list[Texture]  # 6 textures: x-, x+, y- (ceiling), y+ (floor), z-, z+
    boxes: list[Box]
    light: np.ndarray  # [3] unit direction for the simple Lambert shading


@dataclass
class SyntheticScene:
    """One rendered scene with exact ground truth (see the module docstring for conventions)."""

    images: np.ndarray  # uint8 [S, H, W, 3]
    depth: np.ndarray  # float32 [S, H, W], z-depth, > 0 everywhere
    extrinsic: np.ndarray  # float32 [S, 3, 4], camera-from-world
    intrinsic: np.ndarray  # float32 [S, 3, 3]
    world_points: np.ndarray  # float32 [S, H, W, 3]
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    room: Room | None = None  # the geometry, to render more views with render_views()

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    def model_input(self) -> np.ndarray:
        """Images as float32 [S, 3, H, W] in [0, 1], the layout the model takes."""
        return np.ascontiguousarray(self.images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- options


def _draw(rng: np.random.Generator, value: Any, name: str) -> float:
    """A number as is, or uniform in a ``(lo, hi)`` range."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"option {name!r}: expected a number or a (lo, hi) range, got {value!r}")
        return float(rng.uniform(value[0], value[1]))
    return float(value)


def _draw_int(rng: np.random.Generator, value: Any, name: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"option {name!r}: expected an int or a (lo, hi) range, got {value!r}")
        return int(rng.integers(int(value[0]), int(value[1]) + 1))
    return int(value)


def _resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown synthetic scene option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    kinds = tuple(opts["texture_kinds"])
    if not kinds or any(k not in TEXTURE_KINDS for k in kinds):
        raise ValueError(f"option 'texture_kinds': each must be one of {TEXTURE_KINDS}, got {kinds!r}")
    if opts["path"] not in PATHS:
        raise ValueError(f"option 'path': must be one of {PATHS}, got {opts['path']!r}")
    if opts["world_frame"] not in WORLD_FRAMES:
        raise ValueError(f"option 'world_frame': must be one of {WORLD_FRAMES}, got {opts['world_frame']!r}")
    if int(opts["supersample"]) < 1:
        raise ValueError(f"option 'supersample' must be >= 1, got {opts['supersample']!r}")
    return opts


# ----------------------------------------------------------------------------- scene


def _make_texture(rng: np.random.Generator, opts: dict[str, Any]) -> Texture:
    kinds = tuple(opts["texture_kinds"])
    kind = kinds[int(rng.integers(len(kinds)))]
    c0 = rng.uniform(0.05, 0.95, 3)
    c1 = rng.uniform(0.05, 0.95, 3)
    # Keep the two colours clearly apart so the pattern is visible.
    if np.abs(c0 - c1).sum() < 0.6:
        c1 = 1.0 - c0
    return Texture(
        kind=kind,
        colors=np.stack([c0, c1]),
        scale=_draw(rng, opts["texture_scale"], "texture_scale"),
        angle=float(rng.uniform(0, np.pi)),
        grid=rng.random((32, 32, 3)),
        detail_scale=_draw(rng, opts["detail_scale"], "detail_scale"),
        detail_amplitude=_draw(rng, opts["detail_amplitude"], "detail_amplitude"),
    )


def make_room(rng: np.random.Generator, **options: Any) -> Room:
    """A random room with textured faces and boxes kept inside the central region, so that
    cameras on the paths of :func:`camera_path` are never inside a box."""
    opts = _resolve_options(options)
    hxz = _draw(rng, opts["room_half_xz"], "room_half_xz")
    hx = hxz * rng.uniform(0.85, 1.15)
    hz = hxz * rng.uniform(0.85, 1.15)
    hy = _draw(rng, opts["room_half_y"], "room_half_y")
    half = np.array([hx, hy, hz])
    faces = [_make_texture(rng, opts) for _ in range(6)]
    box_region = 0.5 * min(hx, hz)
    boxes = []
    for _ in range(_draw_int(rng, opts["num_boxes"], "num_boxes")):
        bh = np.array(
            [
                _draw(rng, opts["box_half_size"], "box_half_size"),
                min(_draw(rng, opts["box_half_height"], "box_half_height"), hy * 0.9),
                _draw(rng, opts["box_half_size"], "box_half_size"),
            ]
        )
        reach = float(np.hypot(bh[0], bh[2]))
        radius = max(box_region - reach, 0.0) * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        center = np.array([radius * np.cos(phi), hy - bh[1], radius * np.sin(phi)])
        boxes.append(Box(center=center, half=bh, yaw=float(rng.uniform(0, np.pi)), texture=_make_texture(rng, opts)))
    light = np.array([0.4, 1.0, 0.6]) + rng.normal(0, 0.2, 3)
    return Room(half=half, faces=faces, boxes=boxes, light=light / np.linalg.norm(light))


# ----------------------------------------------------------------------------- cameras


def look_at(center: np.ndarray, target: np.ndarray, roll: np.ndarray | float = 0.0) -> np.ndarray:
    """Camera-from-world rotations [..., 3, 3] (OpenCV axes, world y down) looking from
    ``center`` to ``target`` with a roll (radians) about the optical axis."""
    z = target - center
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    down = np.broadcast_to(np.array([0.0, 1.0, 0.0]), z.shape)
    x = np.cross(down, z)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)
    roll = np.asarray(roll, dtype=np.float64)
    c, s = np.cos(roll)[..., None], np.sin(roll)[..., None]
    x, y = c * x + s * y, -s * x + c * y
    return np.stack([x, y, z], axis=-2)


def _smooth(rng: np.random.Generator, s: np.ndarray, amplitude: float, dims: int = 1) -> np.ndarray:
    """A smooth random signal over the normalised path parameter s in [0, 1]: two sinusoids."""
    out = np.zeros((s.shape[0], dims))
    for _ in range(2):
        freq = rng.uniform(0.3, 1.2, dims)
        phase = rng.uniform(0, 2 * np.pi, dims)
        out += np.sin(2 * np.pi * freq * s[:, None] + phase)
    return amplitude * 0.5 * out.squeeze(-1) if dims == 1 else amplitude * 0.5 * out


def camera_path(room: Room, num_frames: int, rng: np.random.Generator, **options: Any) -> np.ndarray:
    """Camera-from-world extrinsics [S, 3, 4] along a smooth path inside ``room``.

    ``orbit``: an arc around the room's centre (radius outside the boxes' region) looking
    inward; ``dolly``: a straight track tangent to that circle. Both add smooth wobble of the
    position, target and roll, and a little i.i.d. jitter, so consecutive frames overlap
    like video.
    """
    opts = _resolve_options(options)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    hx, hy, hz = room.half
    rmin = min(hx, hz)
    s = np.linspace(0.0, 1.0, num_frames)
    idx = np.arange(num_frames, dtype=np.float64)
    r_cam = rmin * rng.uniform(0.62, 0.75)
    theta0 = rng.uniform(0, 2 * np.pi)
    direction = 1.0 if rng.random() < 0.5 else -1.0
    path = opts["path"]
    if path == "random":
        path = "orbit" if rng.random() < 0.5 else "dolly"
    if path == "orbit":
        theta = theta0 + direction * np.deg2rad(_draw(rng, opts["step_deg"], "step_deg")) * idx
        radius = r_cam + _smooth(rng, s, 0.06 * rmin)
        pos = np.stack([radius * np.cos(theta), np.zeros_like(theta), radius * np.sin(theta)], -1)
    else:
        start = np.array([r_cam * np.cos(theta0), 0.0, r_cam * np.sin(theta0)])
        tangent = direction * np.array([-np.sin(theta0), 0.0, np.cos(theta0)])
        # Keep the whole track away from the walls.
        max_off = np.sqrt(max((rmin - 0.35) ** 2 - r_cam**2, 0.0))
        step = _draw(rng, opts["step_m"], "step_m")
        offsets = (idx - (num_frames - 1) / 2) * step
        if num_frames > 1 and np.abs(offsets).max() > max_off:
            offsets *= max_off / np.abs(offsets).max()
        pos = start + offsets[:, None] * tangent
        theta = np.full(num_frames, theta0)
    eye_y = rng.uniform(-0.45, 0.1) * hy  # above the middle, below the ceiling
    pos[:, 1] = eye_y + _smooth(rng, s, opts["wobble"])
    pos += _smooth(rng, s, opts["wobble"], dims=3) * np.array([1.0, 0.0, 1.0])
    pos += rng.normal(0.0, opts["jitter"], pos.shape)
    # Look towards the centre, turned by a yaw offset and pitched down a little.
    yaw = np.deg2rad(_draw(rng, opts["yaw_offset_deg"], "yaw_offset_deg")) + _smooth(rng, s, 0.1)
    pitch = np.deg2rad(_draw(rng, opts["pitch_deg"], "pitch_deg")) + _smooth(rng, s, 0.05)
    heading = theta + np.pi + yaw  # from the camera towards (rotated) centre
    fwd = np.stack([np.cos(heading) * np.cos(pitch), np.sin(pitch), np.sin(heading) * np.cos(pitch)], -1)
    roll = _smooth(rng, s, np.deg2rad(opts["roll_deg"]))
    R = look_at(pos, pos + fwd, roll)
    t = -np.einsum("sij,sj->si", R, pos)
    # Keep every camera strictly inside the room.
    margin = 0.1
    if np.any(np.abs(pos) > room.half - margin):
        raise AssertionError("camera path left the room; report this seed")  # pragma: no cover
    return np.concatenate([R, t[..., None]], axis=-1)


def make_intrinsic(height: int, width: int, fov_deg: float) -> np.ndarray:
    """Pinhole intrinsic [3, 3] with square pixels, horizontal FoV ``fov_deg`` and the principal
    point at (W/2, H/2), as VGGT's pose encoding produces."""
    fx = (width / 2.0) / np.tan(np.deg2rad(fov_deg) / 2.0)
    return np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- rendering


def _value_noise(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth periodic value noise: bilinear (smoothstep) interpolation of a random grid
    [n, n, C] at real coordinates; returns [N, C] in [0, 1]."""
    n = grid.shape[0]
    x0f, y0f = np.floor(x), np.floor(y)
    fx, fy = x - x0f, y - y0f
    fx, fy = (fx * fx * (3 - 2 * fx))[:, None], (fy * fy * (3 - 2 * fy))[:, None]
    x0, y0 = x0f.astype(np.int64) % n, y0f.astype(np.int64) % n
    x1, y1 = (x0 + 1) % n, (y0 + 1) % n
    top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
    bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _eval_texture(tex: Texture, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """RGB [N, 3] in [0, 1] of ``tex`` at surface coordinates (s, t) in metres."""
    f = tex.scale
    if tex.kind == "checker":
        w = ((np.floor(s * f) + np.floor(t * f)) % 2)[:, None]
    elif tex.kind == "stripes":
        w = (((s * np.cos(tex.angle) + t * np.sin(tex.angle)) * f) % 1.0 < 0.5)[:, None].astype(np.float64)
    else:  # noise: blotches between the two colours
        w = _value_noise(tex.grid[..., :1], s * f, t * f)
        w = np.clip((w - 0.5) * 2.5 + 0.5, 0.0, 1.0)
    rgb = tex.colors[0] * (1 - w) + tex.colors[1] * w
    d = tex.detail_scale
    detail = _value_noise(tex.grid, s * d + 7.3, t * d + 3.1) + 0.5 * _value_noise(tex.grid, s * 2.1 * d, t * 2.1 * d)
    return rgb + tex.detail_amplitude * (detail / 1.5 - 0.5)


def _yaw_matrix(yaw: float) -> np.ndarray:
    """World-from-box rotation about the vertical y axis."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _cast(room: Room, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour [N, 3] and ray parameter t [N] of the first hit of rays ``origins + t * dirs``
    (origins inside the room, so every ray hits something)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(dirs == 0, 1e-30, dirs)
        # Room interior: exit through the face with the smallest positive t.
        wall = (np.sign(safe) * room.half - origins) / safe  # [N, 3]
        axis = np.argmin(wall, axis=1)
        t_hit = np.take_along_axis(wall, axis[:, None], 1)[:, 0]
        face = 2 * axis + (np.take_along_axis(dirs, axis[:, None], 1)[:, 0] > 0)
        obj = face.astype(np.int64)  # 0..5 room faces, 6 + i box i
        box_axis = np.zeros_like(axis)
        box_sign = np.zeros(len(axis))
        for i, box in enumerate(room.boxes):
            rot = _yaw_matrix(box.yaw)
            o = (origins - box.center) @ rot  # box-local = rot^T (p - c)
            d = dirs @ rot
            d = np.where(d == 0, 1e-30, d)
            t1, t2 = (-box.half - o) / d, (box.half - o) / d
            tmin3 = np.minimum(t1, t2)
            tnear, tfar = tmin3.max(axis=1), np.maximum(t1, t2).min(axis=1)
            hit = (tnear <= tfar) & (tnear > 1e-6) & (tnear < t_hit)
            t_hit = np.where(hit, tnear, t_hit)
            obj = np.where(hit, 6 + i, obj)
            a = np.argmax(tmin3, axis=1)
            box_axis = np.where(hit, a, box_axis)
            box_sign = np.where(hit, -np.sign(np.take_along_axis(d, a[:, None], 1)[:, 0]), box_sign)
    points = origins + t_hit[:, None] * dirs
    color = np.zeros((len(t_hit), 3))
    normal = np.zeros((len(t_hit), 3))
    other = np.array([[1, 2], [0, 2], [0, 1]])  # surface coordinates for each face axis
    for f in range(6):
        m = obj == f
        if not m.any():
            continue
        a = f // 2
        p = points[m]
        color[m] = _eval_texture(room.faces[f], p[:, other[a, 0]], p[:, other[a, 1]])
        normal[m, a] = -1.0 if f % 2 else 1.0  # pointing into the room
    for i, box in enumerate(room.boxes):
        m = obj == 6 + i
        if not m.any():
            continue
        rot = _yaw_matrix(box.yaw)
        p = (points[m] - box.center) @ rot
        a = box_axis[m]
        uv = np.take_along_axis(p, other[a], 1)
        color[m] = _eval_texture(box.texture, uv[:, 0] + 13.7 * a, uv[:, 1])
        n_local = np.zeros((int(m.sum()), 3))
        n_local[np.arange(len(a)), a] = box_sign[m]
        normal[m] = n_local @ rot.T
    shade = 0.55 + 0.45 * np.abs(normal @ room.light)
    return color * shade[:, None], t_hit


def _pixel_rays(intrinsic: np.ndarray, height: int, width: int, offsets: np.ndarray) -> np.ndarray:
    """Camera-frame directions [S, K, H*W, 3] with z = 1 for pixels (u + du, v + dv), where
    ``offsets`` [K, 2] are sub-pixel offsets (0, 0 = the pixel's own sample point)."""
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    u = u.reshape(-1)[None, None] + offsets[None, :, 0:1]
    v = v.reshape(-1)[None, None] + offsets[None, :, 1:2]
    fx, fy = intrinsic[:, 0, 0, None, None], intrinsic[:, 1, 1, None, None]
    cx, cy = intrinsic[:, 0, 2, None, None], intrinsic[:, 1, 2, None, None]
    x = (u - cx) / fx
    y = (v - cy) / fy
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def render_views(
    room: Room,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    height: int,
    width: int,
    supersample: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``room`` from cameras ``extrinsic`` [S,3,4] / ``intrinsic`` [S,3,3].

    Returns float images [S,H,W,3] in [0,1] (unclipped), z-depth [S,H,W] and world points
    [S,H,W,3], all float64. Depth and points are those of each pixel's own sample point;
    ``supersample`` = k averages k x k colour samples spread over the pixel footprint.
    """
    extrinsic = np.asarray(extrinsic, dtype=np.float64)
    intrinsic = np.asarray(intrinsic, dtype=np.float64)
    S = extrinsic.shape[0]
    if extrinsic.shape != (S, 3, 4) or intrinsic.shape != (S, 3, 3):
        raise ValueError(f"extrinsic must be [S,3,4] and intrinsic [S,3,3]; got {extrinsic.shape}, {intrinsic.shape}")
    k = int(supersample)
    grid = (np.arange(k) + 0.5) / k - 0.5
    offsets = np.stack(np.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    if k > 1:  # the centre sample first: depth and points come from it
        offsets = np.concatenate([np.zeros((1, 2)), offsets])
    R, t = extrinsic[:, :, :3], extrinsic[:, :, 3]
    centers = -np.einsum("sji,sj->si", R, t)  # C = -R^T t
    rays_cam = _pixel_rays(intrinsic, height, width, offsets)  # [S, K, HW, 3]
    rays = np.einsum("sji,skpj->skpi", R, rays_cam)  # R^T d
    K = rays.shape[1]
    origins = np.broadcast_to(centers[:, None, None, :], rays.shape).reshape(-1, 3)
    color, t_hit = _cast(room, origins, rays.reshape(-1, 3))
    color = color.reshape(S, K, height, width, 3)
    t_hit = t_hit.reshape(S, K, height, width)
    image = color[:, 1:].mean(axis=1) if K > 1 else color[:, 0]
    depth = t_hit[:, 0]  # rays have z = 1 in the camera frame: t is the z-depth
    points = centers[:, None, None, :] + depth[..., None] * rays[:, 0].reshape(S, height, width, 3)
    return image, depth, points


def _to_first_camera(extrinsic: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-express cameras and points in camera 0's frame (camera 0 becomes [I|0])."""
    R0, t0 = extrinsic[0, :, :3], extrinsic[0, :, 3]
    R = extrinsic[:, :, :3] @ R0.T
    t = extrinsic[:, :, 3] - np.einsum("sij,j->si", R, t0)
    return np.concatenate([R, t[..., None]], -1), points @ R0.T + t0


def render_scene(num_frames: int = 8, height: int = 126, width: int = 168, seed: int = 0, **options: Any) -> SyntheticScene:
    """A random room seen along a smooth camera path, with exact depth, cameras and points.

    Fully determined by ``seed`` and ``options`` (see ``DEFAULT_OPTIONS``; ranges are drawn per
    scene). About 0.1 s for 8 frames of 126x168 at ``supersample=1``.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be >= 1; got {num_frames}, {height}, {width}")
    opts = _resolve_options(options)
    rng = np.random.default_rng(seed)
    room = make_room(rng, **options)
    extrinsic = camera_path(room, num_frames, rng, **options)
    fov = _draw(rng, opts["fov_deg"], "fov_deg")
    intrinsic = np.broadcast_to(make_intrinsic(height, width, fov), (num_frames, 3, 3)).copy()
    image, depth, points = render_views(room, extrinsic, intrinsic, height, width, opts["supersample"])
    if opts["image_noise"] > 0:
        image = image + rng.normal(0.0, opts["image_noise"] / 255.0, image.shape)
    images = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if opts["world_frame"] == "first_camera":
        extrinsic, points = _to_first_camera(extrinsic, points)
    return SyntheticScene(
        images=images,
        depth=depth.astype(np.float32),
        extrinsic=extrinsic.astype(np.float32),
        intrinsic=intrinsic.astype(np.float32),
        world_points=points.astype(np.float32),
        seed=seed,
        options=dict(options),
        room=room if opts["world_frame"] == "room" else None,
    )


# ----------------------------------------------------------------------------- writing


def write_scene_folder(
    scene: SyntheticScene,
    path_or_url: str,
    storage_options: dict[str, Any] | None = None,
    image_format: str = "png",
) -> str:
    """Write ``scene`` as a ground-truth scene folder (format: docs/evaluation.md):
    ``frame_0000.png ...``, ``cameras.json`` (per-frame extrinsic, intrinsic, file names) and
    ``depth/frame_0000.npy`` (float32 z-depth). Works on any fsspec URL; returns the URL."""
    return gt_loader.write_gt_scene(
        path_or_url,
        images=scene.images,
        depth=scene.depth,
        extrinsic=scene.extrinsic,
        intrinsic=scene.intrinsic,
        storage_options=storage_options,
        image_format=image_format,
        extra={"source": "httm_dist.eval.synthetic", "seed": scene.seed, "world_frame": scene.options.get("world_frame", "room")},
    )


def make_synthetic_dataset(
    root: str,
    num_scenes: int = 3,
    num_frames: int = 8,
    height: int = 126,
    width: int = 168,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[str]:
    """Render ``num_scenes`` scenes (seeds ``seed, seed+1, ...``) into ``root/scene_000`` ...;
    returns the scene folder URLs. Used by ``httm-dist demo``."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    root = str(root).rstrip("/")
    out = []
    for i in range(num_scenes):
        scene = render_scene(num_frames, height, width, seed=seed + i, **options)
        out.append(write_scene_folder(scene, posixpath.join(root, f"scene_{i:03d}"), storage_options))
    logger.info("wrote %d synthetic scenes (%d frames of %dx%d) under %s", num_scenes, num_frames, width, height, root)
    return out


def iter_scenes(seeds: Sequence[int], num_frames: int = 8, height: int = 126, width: int = 168, **options: Any):
    """Yield :func:`render_scene` for each seed (convenience for training loops)."""
    for s in seeds:
        yield render_scene(num_frames, height, width, seed=int(s), **options)
