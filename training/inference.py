"""``reid inference``: embeddings of every query and gallery image, in TAO's JSON or a compact .npz."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from training.checkpoint import model_required
from training.data.market1501 import load_query_gallery
from training.data.transforms import check_images
from training.devices import cuda_or_cpu
from training.embedders import open_embedder
from training.errors import ConfigError
from training.outputs import replaced_on_success, writable_output

log = logging.getLogger(__name__)


def run_inference(spec) -> Path:
    i = spec.inference
    if not i.checkpoint:
        raise model_required("inference.checkpoint", "a .pth checkpoint, .onnx or .engine file", spec.results_dir)
    out = Path(i.output_file or Path(spec.results_dir) / "inference" / "embeddings.json")
    if out.suffix not in (".json", ".npz"):
        raise ConfigError(f"inference.output_file={out} must end in .json (TAO format) or .npz (compact)")
    if not Path(i.checkpoint).exists():
        raise ConfigError(f"inference.checkpoint={i.checkpoint} does not exist")
    writable_output(out, "inference.output_file" if i.output_file else "results_dir")
    query, gallery = load_query_gallery(i.query_dataset or spec.dataset.query_dataset_dir,
                                        i.test_dataset or spec.dataset.test_dataset_dir, "inference")
    embedder = open_embedder(i.checkpoint, spec, cuda_or_cpu(i.gpu_id, "inference.gpu_id"),
                             i.batch_size or spec.dataset.val_batch_size)
    records = query + gallery
    if embedder.reads_images:
        check_images([r.path for r in records], spec.dataset.num_workers)
    log.info("embedding %d query and %d gallery images with %s", len(query), len(gallery), embedder.description)
    feats = np.concatenate([embedder.embed(query, "query"), embedder.embed(gallery, "gallery")])
    paths = [str(Path(r.path).resolve()) for r in records]  # absolute: the file is usable from any folder
    finite = np.isfinite(feats)
    if not finite.all():  # kept, so that nothing is lost, but said: no distance to them means anything
        bad = np.flatnonzero(~finite.all(axis=1))
        log.warning("%d of %d embeddings are not finite (NaN or inf), e.g. %s; %s", len(bad), len(feats), paths[bad[0]],
                    "written as null (JSON has no NaN)" if out.suffix == ".json" else "written as they are")
    # an interrupted write leaves the previous file whole, not a truncated one `reid evaluate` would refuse
    with replaced_on_success(out) as tmp, open(tmp, "wb") as f:
        if out.suffix == ".npz":
            np.savez(f, img_path=np.array(paths), pid=np.array([r.pid for r in records]),
                     camid=np.array([r.camid for r in records]),
                     split=np.array(["query"] * len(query) + ["gallery"] * len(gallery)),
                     embedding=feats.astype(np.float32))
        else:
            rows = [e.tolist() if ok.all() else [v if k else None for v, k in zip(e.tolist(), ok)]
                    for e, ok in zip(feats, finite)]
            f.write(json.dumps([{"img_path": p, "embedding": e} for p, e in zip(paths, rows)], allow_nan=False).encode())
    return out
