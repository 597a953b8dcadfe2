"""Reading committed scenes for export, and the export job itself (:func:`export_scenes`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from httm_dist import results
from httm_dist.errors import ConfigError, SceneError, StorageError
from httm_dist.export.cameras import SceneGeometry, derive_geometry, image_names, resolve_mode, stored_geometry
from httm_dist.export.colmap import MODEL_FILES, colmap_files, require_pycolmap
from httm_dist.export.nerfstudio import nerfstudio_files
from httm_dist.export.points import ScenePoints, scene_points
from httm_dist.results import column_matrices
from httm_dist.storage import error_text, get_fs, join_url, read_bytes, redact, retry, write_bytes_atomic

log = logging.getLogger(__name__)

FORMATS = ("colmap", "nerfstudio")


@dataclass(frozen=True)
class ExportScene:
    """Everything an exporter needs of one committed scene of S frames.

    ``extrinsic`` [S, 3, 4] float32 camera-from-world (OpenCV axes) and ``intrinsic`` [S, 3, 3]
    (model input size) as stored; ``intrinsic_original`` [S, 3, 3] float64 at the original
    photo's size; ``geometry`` the input->original mapping (stored, or derived with ``mode``
    for a format-1 scene; ``mode`` is None when stored); ``uris`` / ``names`` /
    ``frame_index`` per frame; ``points`` the selected coloured points.
    """

    scene_id: str
    uris: list[str]
    names: list[str]
    frame_index: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray
    intrinsic_original: np.ndarray
    geometry: SceneGeometry
    mode: str | None
    points: ScenePoints

    @property
    def num_frames(self) -> int:
        return len(self.uris)


def photo_colours(
    uris: Sequence[str],
    geometry: SceneGeometry,
    frame: np.ndarray,
    xy_original: np.ndarray,
    storage_options: dict | None = None,
) -> np.ndarray:
    """uint8 [M, 3] colours of the original photos' pixels under positions ``xy_original``
    [M, 2] (corner convention) of frames ``frame`` [M].

    Each photo is decoded as the job decoded it (:func:`httm_dist.model.preprocess.decode_image`,
    with the frame's EXIF orientation applied exactly when the job applied it). Raises
    ``SceneError`` naming a photo that is gone, cannot be read (e.g. an HTTP 403), cannot be
    decoded, or no longer has the stored size (it changed since the job ran); ``StorageError``
    when the storage stays unreachable after retries.
    """
    from httm_dist.model.preprocess import decode_image  # deferred (torch)

    out = np.zeros((len(frame), 3), dtype=np.uint8)
    for i in np.unique(frame).tolist():  # one decode per frame that has points
        uri = str(uris[i])
        try:
            data = read_bytes(uri, storage_options)
            photo = decode_image(data, exif_orientation=bool(geometry.orientation_applied[i]), max_pixels=None)
        except StorageError:  # unreachable after retries: not this scene's fault
            raise
        except OSError as exc:  # gone, forbidden (an HTTP 403 too), unreadable
            raise SceneError(f"photo {redact(uri)} is needed for the point colours: {error_text(exc)}") from None
        except SceneError as exc:  # not an image Pillow decodes
            raise SceneError(f"photo {redact(uri)} is needed for the point colours: {exc}") from None
        rgb = np.asarray(photo.image)
        h, w = (int(v) for v in geometry.original_hw[i])
        if rgb.shape[:2] != (h, w):
            raise SceneError(
                f"photo {redact(uri)} is {rgb.shape[1]}x{rgb.shape[0]}, not the {w}x{h} the job "
                "stored: it changed since the job ran"
            )
        mine = frame == i
        xy = np.floor(xy_original[mine]).astype(np.int64)
        out[mine] = rgb[np.clip(xy[:, 1], 0, h - 1), np.clip(xy[:, 0], 0, w - 1)]
    return out


def load_scene(
    reader: Any,
    scene_id: str,
    *,
    record: Mapping[str, Any] | None = None,
    runs: Sequence[Mapping[str, Any]] = (),
    image_mode: str | None = None,
    conf_percentile: float = 50.0,
    max_points: int = 200_000,
    seed: int = 0,
    storage_options: dict | None = None,
) -> ExportScene:
    """One committed scene of ``reader`` (a :class:`httm_dist.results.ResultsReader`) ready to
    export. Its frame geometry is the frame table's (format 2), else derived (format 1; see
    :func:`httm_dist.export.cameras.resolve_mode` for ``record`` (default: read from
    ``reader``), ``runs`` and ``image_mode``).

    Raises ``KeyError`` if the scene is not committed and ``SceneError`` when its data cannot
    be exported (inconsistent sizes, unreadable photos).
    """
    table = reader.frames([scene_id])
    arrays = reader.arrays(scene_id)
    if record is None:
        record = reader.records().get(scene_id) or {}
    uris = [str(u) for u in table.column("image_uri").to_pylist()]
    stored_uris = arrays.get("frame_uris")
    if stored_uris is not None and [str(u) for u in np.asarray(stored_uris).reshape(-1)] != uris:
        raise SceneError(f"scene '{scene_id}': its frame table and arrays list different frames")
    original_hw = np.stack([table.column("orig_height").to_numpy(), table.column("orig_width").to_numpy()], -1)
    input_hw = np.stack([table.column("input_height").to_numpy(), table.column("input_width").to_numpy()], -1)
    depth = np.asarray(arrays["depth"])
    if depth.shape[0] != len(uris) or (input_hw != depth.shape[1:3]).any():
        raise SceneError(f"scene '{scene_id}': depth maps {depth.shape} do not match its frame table")
    geometry, mode = stored_geometry(table), None
    if geometry is None:
        mode = resolve_mode(scene_id, original_hw, input_hw, record, runs, image_mode)
        try:
            geometry = derive_geometry(original_hw, input_hw, mode)
        except ValueError as exc:
            raise SceneError(f"scene '{scene_id}': {exc}") from None
    if geometry.orientation_applied.any():
        log.warning(
            "scene '%s': %d photo(s) carry an EXIF orientation that the job applied; the exported "
            "cameras are for the upright images, so give COLMAP/nerfstudio upright copies "
            "(PIL.ImageOps.exif_transpose)", scene_id, int(geometry.orientation_applied.sum()),
        )
    extrinsic, intrinsic = column_matrices(table, "extrinsic"), column_matrices(table, "intrinsic")
    frame, pixel, xyz = scene_points(
        depth, arrays.get("depth_conf"), extrinsic, intrinsic, geometry.valid_box,
        conf_percentile=conf_percentile, max_points=max_points, seed=seed,
    )
    original = geometry.to_original(frame, pixel)
    rgb = photo_colours(uris, geometry, frame, original, storage_options)
    return ExportScene(
        scene_id=scene_id, uris=uris, names=image_names(uris),
        frame_index=table.column("frame_index").to_numpy(), extrinsic=extrinsic, intrinsic=intrinsic,
        intrinsic_original=geometry.original_intrinsics(intrinsic), geometry=geometry, mode=mode,
        points=ScenePoints(xyz=xyz, rgb=rgb, frame=frame, pixel=pixel, original=original),
    )


def _check_options(format: str, conf_percentile: float, max_points: int, text: bool, image_mode: str | None) -> None:
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {format!r}")
    if not 0 <= float(conf_percentile) < 100:
        raise ConfigError(f"conf percentile must be in [0, 100), got {conf_percentile!r}")
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 1:
        raise ConfigError(f"max points must be an integer >= 1, got {max_points!r}")
    if text and format != "colmap":
        raise ConfigError("text output is a COLMAP option; nerfstudio's transforms.json is always text")
    if image_mode is not None and image_mode not in ("crop", "pad"):
        raise ConfigError(f"image mode must be 'crop' or 'pad', got {image_mode!r}")


def _selected_ids(
    reader: Any, records: Mapping[str, Mapping[str, Any]], scene_ids: Sequence[str] | None, url: str
) -> list[str]:
    """The committed scenes to export; ``ConfigError`` naming any asked-for scene that is not."""
    committed = list(reader.scene_ids)
    if scene_ids is None:
        if not committed:
            raise ConfigError(f"nothing to export: {redact(url)} has no committed scenes")
        return committed
    for sid in scene_ids:
        if sid in committed:
            continue
        rec = records.get(sid)
        why = ("it has no record (never run, or still being written)" if rec is None
               else f"its record is '{rec.get('status')}': {rec.get('error')}")
        raise ConfigError(f"scene '{sid}' is not committed in {redact(url)}: {why}; only committed scenes are exported")
    return list(dict.fromkeys(scene_ids))


def _write_files(folder: str, files: Mapping[str, bytes], stale: Sequence[str], storage_options: dict | None) -> None:
    """Remove ``stale`` names from ``folder``, then write ``files`` whole, in order."""
    fs, root = get_fs(folder, storage_options)
    for name in stale:
        path = join_url(root, name)
        if retry(lambda p=path: fs.exists(p), what=f"check {redact(join_url(folder, name))}"):
            retry(lambda p=path: fs.rm_file(p), what=f"remove {redact(join_url(folder, name))}")
    for name, data in files.items():
        write_bytes_atomic(join_url(folder, name), data, storage_options)


def export_scenes(
    output_url: str,
    to: str,
    format: str,
    *,
    scene_ids: Sequence[str] | None = None,
    conf_percentile: float = 50.0,
    max_points: int = 200_000,
    text: bool = False,
    image_mode: str | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    to_storage_options: dict | None = None,
) -> dict[str, dict[str, str]]:
    """Export committed scenes of the results at ``output_url`` to ``to`` (any fsspec URL).

    ``format`` ``"colmap"``: ``TO/<scene_id>/sparse/0/`` (binary; ``text=True`` for ``.txt``),
    needs pycolmap. ``"nerfstudio"``: ``TO/<scene_id>/transforms.json`` + ``sparse_pc.ply``.
    ``scene_ids`` default to every committed scene; points keep pixels at or above each frame's
    ``conf_percentile``-th confidence percentile, at most ``max_points`` per scene (seeded).
    ``image_mode`` overrides the preprocessing mode of format-1 outputs (see
    :func:`httm_dist.export.cameras.resolve_mode`). ``storage_options`` are for the results
    and the source images, ``to_storage_options`` (default: the same) for the destination.

    Returns ``{"exported": {scene_id: folder URL}, "failed": {scene_id: error}}``; a scene
    that cannot be exported (``SceneError``) is reported there and the others go on. Raises
    ``ConfigError`` for bad options, a scene that is not committed, or no scene to export.
    """
    _check_options(format, conf_percentile, max_points, text, image_mode)
    if format == "colmap":
        require_pycolmap()
    dest_options = storage_options if to_storage_options is None else to_storage_options
    reader = results.open(output_url, storage_options=storage_options)
    records = reader.records()  # read once: an output may hold many thousand scenes
    ids = _selected_ids(reader, records, scene_ids, output_url)
    runs = reader.runs()
    exported: dict[str, str] = {}
    failed: dict[str, str] = {}
    for sid in ids:
        try:
            scene = load_scene(
                reader, sid, record=records.get(sid) or {}, runs=runs, image_mode=image_mode, conf_percentile=conf_percentile,
                max_points=max_points, seed=seed, storage_options=storage_options,
            )
            if format == "colmap":
                folder = join_url(to, sid, "sparse", "0")
                files = colmap_files(scene, text)
                other = ".bin" if text else ".txt"
                _write_files(folder, files, [f"{n}{other}" for n in MODEL_FILES], dest_options)
            else:
                folder = join_url(to, sid)
                _write_files(folder, nerfstudio_files(scene), [], dest_options)
        except SceneError as exc:
            failed[sid] = redact(str(exc))
            log.warning("scene '%s' not exported: %s", sid, failed[sid])
            continue
        exported[sid] = folder
        log.info("exported scene '%s' (%d frames, %d points) to %s", sid, scene.num_frames,
                 len(scene.points), redact(folder))
    return {"exported": exported, "failed": failed}
