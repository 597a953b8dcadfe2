"""Where the ``tiny-synthetic`` model's camera knowledge stops (the analysis in docs/training.md).

On held-out scenes (seeds ``HELD_OUT_SEED_BASE + 200 + i``) it measures, for the trained and
the untrained weights:

- ``head rot°``: the camera head's mean relative rotation error over frame pairs, next to
  ``identity rot°``, the error of predicting the first camera for every frame;
- ``points rot°``: the rotation recovered from the model's own outputs, a Sim(3) (Umeyama) from
  frame i's predicted depth unprojected in its own camera (ground-truth intrinsics) to frame
  i's predicted point map, which VGGT expresses in the first camera's frame. If the trunk knew
  the relative pose, the point head would carry it even where the camera head does not;
- ``token var``: how much the camera token fed to the camera head varies across the frames
  of a scene (standard deviation across frames over mean norm, last aggregator layer).

Usage: ``.venv/bin/python jobs/camera_probe.py [--weights-dir DIR] [--scenes 6] [--frames 6]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from httm_dist.eval.metrics import relative_pose_errors, rotation_angle_deg, umeyama_sim3
from httm_dist.model.geometry import pose_encoding_to_extri_intri, unproject_depth_map_to_point_map
from httm_dist.train.data import SceneBatch, held_out_scenes
from httm_dist.train.loop import build_model, load_checkpoint


@torch.no_grad()
def probe(model: torch.nn.Module, batch: SceneBatch) -> dict[str, float]:
    """The four numbers of the module docstring for one scene (a batch of one)."""
    tokens, _ = model.aggregator(batch.images)
    cam = tokens[-1][0, :, 0]  # [S, 2C]: the camera token of each frame, as the head reads it
    token_var = float(cam.std(0).norm() / cam.norm(dim=-1).mean())
    out = model(batch.images)
    gt = batch.extrinsic[0].double().numpy()
    pred, _ = pose_encoding_to_extri_intri(out["pose_enc"][0].double(), batch.image_size)
    head_rot, _ = relative_pose_errors(pred.numpy(), gt)
    identity = np.repeat(np.concatenate([np.eye(3), np.zeros((3, 1))], 1)[None], len(gt), 0)
    identity_rot, _ = relative_pose_errors(identity, gt)

    # each frame's predicted depth in its own camera (identity extrinsic, ground-truth intrinsics)
    own = unproject_depth_map_to_point_map(out["depth"][0].double().numpy(), identity, batch.intrinsic[0].double().numpy())
    points = out["world_points"][0].double().numpy()
    errors = []
    for i in range(1, len(own)):
        _, R, _ = umeyama_sim3(own[i].reshape(-1, 3), points[i].reshape(-1, 3))
        # GT: camera i -> first camera is the inverse rotation of the (camera-from-first) extrinsic.
        errors.append(float(rotation_angle_deg(R, gt[i, :, :3].T)))
    return {"head_rot": float(head_rot.mean()), "identity_rot": float(identity_rot.mean()),
            "points_rot": float(np.mean(errors)), "token_var": token_var}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-dir", default=str(Path(__file__).resolve().parents[1] / "httm_dist" / "weights"))
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--frames", type=int, default=6)
    args = p.parse_args(argv)
    trained, meta = load_checkpoint(args.weights_dir)
    models = {
        "tiny-synthetic": trained,
        "untrained": build_model(meta["config"], seed=0).eval(),
    }
    h, w = meta["training"]["height"], meta["training"]["width"]
    scenes = held_out_scenes(args.scenes, args.frames, h, w, first_seed_offset=200)
    print(f"{args.scenes} held-out scenes of {args.frames} frames at {h}x{w}; weights trained for "
          f"{meta['steps_done']} steps\n")
    print("| weights | head rot° | identity rot° | points rot° | token var |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        rows = [probe(model, batch) for batch in scenes]
        m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f"| {name} | {m['head_rot']:.2f} | {m['identity_rot']:.2f} | {m['points_rot']:.2f} | "
              f"{m['token_var']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
