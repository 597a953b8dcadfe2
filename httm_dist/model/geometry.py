"""Camera geometry, matching the official VGGT utilities (``vggt/utils/{pose_enc,rotation,geometry}.py``).

Conventions (OpenCV axes): an extrinsic ``[R | t]`` [..., 3, 4] maps world to camera,
``x_cam = R X + t``; an intrinsic [..., 3, 3] has focal lengths ``fx, fy`` and principal point
``(W/2, H/2)``. The pose encoding "absT_quaR_FoV" is ``[t (3), quaternion xyzw (4), fov_h,
fov_w]`` [..., 9]; the quaternion need not be unit.

Every function takes torch tensors or numpy arrays and returns the same kind; all are batched
over leading dimensions (no per-frame or per-pixel Python loops).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]
SizeHW = Union[Sequence[int], np.ndarray, torch.Tensor]

POSE_ENCODING_TYPE = "absT_quaR_FoV"


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _size_hw(image_size_hw: SizeHW) -> tuple[float, float]:
    values = [float(v) for v in (image_size_hw.tolist() if hasattr(image_size_hw, "tolist") else image_size_hw)]
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"image_size_hw must be (height, width) with positive sides, got {values}")
    return values[0], values[1]


def _check_pose_type(pose_encoding_type: str) -> None:
    if pose_encoding_type != POSE_ENCODING_TYPE:
        raise ValueError(
            f"pose_encoding_type {pose_encoding_type!r} is not supported; use {POSE_ENCODING_TYPE!r}"
        )


def quat_to_mat(quaternions: torch.Tensor) -> torch.Tensor:
    """Quaternions xyzw [..., 4] (any norm) to rotation matrices [..., 3, 3]."""
    i, j, k, r = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    o = torch.stack(
        (
            1 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
            two_s * (i * j + k * r),
            1 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1 - two_s * (i * i + j * j),
        ),
        -1,
    )
    return o.reshape(quaternions.shape[:-1] + (3, 3))


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] to unit quaternions xyzw [..., 4] with w >= 0.

    Of the four algebraically equivalent candidates, the one with the largest denominator
    (best conditioned) is taken, as pytorch3d and the official code do.
    """
    batch = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(matrix.reshape(batch + (9,)), -1)
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack(
                [
                    1.0 + m00 + m11 + m22,
                    1.0 + m00 - m11 - m22,
                    1.0 - m00 + m11 - m22,
                    1.0 - m00 - m11 + m22,
                ],
                -1,
            ),
            min=0.0,
        )
    )
    candidates = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
        ],
        -2,
    )  # rows: candidates in (r, i, j, k) order
    floor = torch.tensor(0.1, dtype=q_abs.dtype, device=q_abs.device)
    candidates = candidates / (2.0 * q_abs[..., None].maximum(floor))
    best = q_abs.argmax(-1)[..., None, None].expand(batch + (1, 4))
    rijk = torch.gather(candidates, -2, best).squeeze(-2)
    xyzw = rijk[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def pose_encoding_to_extri_intri(
    pose_encoding: ArrayLike,
    image_size_hw: SizeHW,
    pose_encoding_type: str = POSE_ENCODING_TYPE,
    build_intrinsics: bool = True,
) -> tuple[ArrayLike, ArrayLike | None]:
    """Pose encodings [..., 9] to extrinsics [..., 3, 4] and intrinsics [..., 3, 3].

    ``fx = (W/2) / tan(fov_w/2)``, ``fy = (H/2) / tan(fov_h/2)``, principal point (W/2, H/2).
    Returns ``(extrinsic, None)`` when ``build_intrinsics`` is false.
    """
    _check_pose_type(pose_encoding_type)
    is_numpy = isinstance(pose_encoding, np.ndarray)
    enc = _as_tensor(pose_encoding, "pose_encoding")
    if enc.shape[-1] != 9:
        raise ValueError(f"pose_encoding must have 9 values in its last dimension, got shape {tuple(enc.shape)}")
    R = quat_to_mat(enc[..., 3:7])
    extrinsic = torch.cat([R, enc[..., :3, None]], dim=-1)
    intrinsic = None
    if build_intrinsics:
        H, W = _size_hw(image_size_hw)
        fy = (H / 2.0) / torch.tan(enc[..., 7] / 2.0)
        fx = (W / 2.0) / torch.tan(enc[..., 8] / 2.0)
        intrinsic = torch.zeros(enc.shape[:-1] + (3, 3), dtype=enc.dtype, device=enc.device)
        intrinsic[..., 0, 0] = fx
        intrinsic[..., 1, 1] = fy
        intrinsic[..., 0, 2] = W / 2
        intrinsic[..., 1, 2] = H / 2
        intrinsic[..., 2, 2] = 1.0
    if is_numpy:
        return extrinsic.numpy(), None if intrinsic is None else intrinsic.numpy()
    return extrinsic, intrinsic


def extri_intri_to_pose_encoding(
    extrinsic: ArrayLike,
    intrinsic: ArrayLike,
    image_size_hw: SizeHW,
    pose_encoding_type: str = POSE_ENCODING_TYPE,
) -> ArrayLike:
    """Extrinsics [..., 3, 4] and intrinsics [..., 3, 3] to pose encodings [..., 9] (float32).

    ``fov = 2 atan((size/2) / focal)``; the rotation becomes a unit quaternion with w >= 0.
    """
    _check_pose_type(pose_encoding_type)
    is_numpy = isinstance(extrinsic, np.ndarray)
    ext = _as_tensor(extrinsic, "extrinsic")
    intr = _as_tensor(intrinsic, "intrinsic")
    if ext.shape[-2:] not in ((3, 4), (4, 4)) or intr.shape[-2:] != (3, 3):
        raise ValueError(
            f"extrinsic must be [..., 3, 4] and intrinsic [..., 3, 3], got {tuple(ext.shape)} "
            f"and {tuple(intr.shape)}"
        )
    H, W = _size_hw(image_size_hw)
    quat = mat_to_quat(ext[..., :3, :3])
    fov_h = 2 * torch.atan((H / 2) / intr[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intr[..., 0, 0])
    enc = torch.cat([ext[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()
    return enc.numpy() if is_numpy else enc


def closed_form_inverse_se3(se3: ArrayLike) -> ArrayLike:
    """Invert rigid transforms [..., 3, 4] or [..., 4, 4]; returns [..., 4, 4].

    ``[R | t]^-1 = [R^T | -R^T t]``, exact and cheaper than a general matrix inverse.
    """
    is_numpy = isinstance(se3, np.ndarray)
    m = _as_tensor(se3, "se3")
    if m.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"se3 must be [..., 3, 4] or [..., 4, 4], got {tuple(m.shape)}")
    R_t = m[..., :3, :3].transpose(-1, -2)
    top_right = -(R_t @ m[..., :3, 3:])
    out = torch.zeros(m.shape[:-2] + (4, 4), dtype=m.dtype, device=m.device)
    out[..., :3, :3] = R_t
    out[..., :3, 3:] = top_right
    out[..., 3, 3] = 1.0
    return out.numpy() if is_numpy else out


def unproject_depth_map_to_point_map(
    depth_map: ArrayLike, extrinsic: ArrayLike, intrinsic: ArrayLike
) -> ArrayLike:
    """Depth maps [..., S, H, W(, 1)] and cameras [..., S, 3, 4] / [..., S, 3, 3] to world points [..., H, W, 3].

    Pixel grid u = 0..W-1, v = 0..H-1 (no half-pixel offset, as the official code);
    camera point ``((u - cx) d / fx, (v - cy) d / fy, d)``, then to world with the inverse
    extrinsic. numpy inputs are computed and returned in float64 (as the official numpy code
    returns); torch inputs keep their (promoted) floating dtype and device.
    """
    is_numpy = isinstance(depth_map, np.ndarray)
    depth = _as_tensor(depth_map, "depth_map")
    ext = _as_tensor(extrinsic, "extrinsic")
    intr = _as_tensor(intrinsic, "intrinsic")
    if depth.ndim >= 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim < 3 or ext.shape[-2:] != (3, 4) and ext.shape[-2:] != (4, 4) or intr.shape[-2:] != (3, 3):
        raise ValueError(
            "unproject_depth_map_to_point_map needs depth [S, H, W] or [S, H, W, 1], extrinsic "
            f"[S, 3, 4] and intrinsic [S, 3, 3]; got {tuple(depth.shape)}, {tuple(ext.shape)}, "
            f"{tuple(intr.shape)}"
        )
    if ext.shape[:-2] != depth.shape[:-2] or intr.shape[:-2] != depth.shape[:-2]:
        raise ValueError(
            f"depth has {tuple(depth.shape[:-2])} frames but extrinsic has {tuple(ext.shape[:-2])} "
            f"and intrinsic {tuple(intr.shape[:-2])}: give one camera per depth map"
        )
    if is_numpy:
        dtype = torch.float64
    else:
        dtype = torch.promote_types(torch.promote_types(depth.dtype, ext.dtype), intr.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
    depth, ext, intr = depth.to(dtype), ext.to(dtype=dtype, device=depth.device), intr.to(dtype=dtype, device=depth.device)
    H, W = depth.shape[-2:]
    u = torch.arange(W, dtype=dtype, device=depth.device)
    v = torch.arange(H, dtype=dtype, device=depth.device)
    fx, fy = intr[..., 0, 0, None, None], intr[..., 1, 1, None, None]
    cx, cy = intr[..., 0, 2, None, None], intr[..., 1, 2, None, None]
    x = (u - cx) * depth / fx
    y = (v[:, None] - cy) * depth / fy
    cam = torch.stack([x, y, depth], dim=-1)  # [..., H, W, 3]
    R = ext[..., :3, :3]
    t = ext[..., :3, 3]
    # world = R^T (cam - t), as row vectors: (cam - t) @ R
    world = (cam - t[..., None, None, :]).flatten(-3, -2) @ R
    world = world.reshape(cam.shape)
    return world.numpy() if is_numpy else world


__all__ = [
    "closed_form_inverse_se3",
    "extri_intri_to_pose_encoding",
    "mat_to_quat",
    "pose_encoding_to_extri_intri",
    "quat_to_mat",
    "unproject_depth_map_to_point_map",
]
