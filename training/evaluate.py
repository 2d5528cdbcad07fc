"""``reid evaluate``: mAP/CMC of a checkpoint, an exported model or stored embeddings, with and
without k-reciprocal re-ranking, plus the CMC curve and sampled-matches figures."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from retrieval.distance import compute_distance, l2_normalize
from retrieval.metrics import evaluate_rank
from retrieval.rerank import k_reciprocal_rerank
from training.checkpoint import model_required
from training.data.market1501 import load_query_gallery, protocol_ids, require_matches, warn_of_training_images
from training.data.transforms import check_images
from training.devices import cuda_or_cpu
from training.embed import nonfinite_rows
from training.embedders import open_embedder
from training.errors import ConfigError, ReidError
from training.outputs import writable_output
from training.plots import plot_cmc, plot_matches
from training.progress import progress

log = logging.getLogger(__name__)


def _rank(dist: np.ndarray, ids: tuple) -> tuple[dict, np.ndarray]:
    """Summary figures (mAP, mINP, rank-1/5/10) and the CMC curve of one distance matrix."""
    try:
        cmc, m_ap, m_inp = evaluate_rank(dist, *ids, max_rank=50, return_minp=True)
    except ValueError as exc:
        raise ReidError(str(exc)) from None
    summary = {"mAP": m_ap, "mINP": m_inp, **{f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}}
    return summary, cmc


def score(qf: np.ndarray, gf: np.ndarray, query, gallery, rerank_cfg, device: str = "auto") -> tuple[dict, dict, dict]:
    """Metrics, CMC curves and distance matrices for plain cosine ranking and (if enabled) re-ranking.

    Features are L2-normalized first; re-ranking then works on squared Euclidean distances of unit
    vectors, which rank like cosine distances.
    """
    if qf.shape[1] != gf.shape[1]:
        raise ReidError(f"query embeddings are {qf.shape[1]}-d but gallery embeddings {gf.shape[1]}-d")
    bad_q, bad_g = nonfinite_rows(qf), nonfinite_rows(gf)
    if bad_q or bad_g:
        raise ReidError(f"{bad_q} of {len(qf)} query and {bad_g} of {len(gf)} gallery embeddings are not finite (NaN or "
                        f"inf): the model gives invalid outputs (an FP16 export can overflow); nothing was scored")
    qf, gf = l2_normalize(qf), l2_normalize(gf)
    ids = protocol_ids(query, gallery)
    dists = {"without re-ranking": compute_distance(qf, gf, "cosine")}
    if rerank_cfg.re_ranking:
        dists["with re-ranking"] = k_reciprocal_rerank(qf, gf, rerank_cfg.k1, rerank_cfg.k2, rerank_cfg.lambda_value,
                                                       device=device)
    results, curves = {}, {}
    for label, dist in dists.items():
        results[label], curves[label] = _rank(dist, ids)
    return results, curves, dists


# Hits one Search may return. A hit takes about 26 bytes on the wire (id, score, distance, person
# and camera ids), so this keeps an answer near 40 MB, under the server's default 64 MiB message
# limit; every query asks for the whole gallery, so at Market-1501's 19,732 images a single call
# for all 3,368 queries would have been about 1.7 GB.
_HITS_PER_SEARCH = 1_500_000


def score_via_server(target: str, query, gallery, rerank_cfg, chunk: int = 64) -> tuple[dict, dict, dict, int]:
    """Enroll the gallery into a temporary gallery on a running server, search every query, score.

    Hits come back as distances (1 - cosine, or re-ranked); the Market-1501 protocol (same person
    and camera removed) is applied to the returned ranking by ``evaluate_rank``, as offline. A
    server with tokens or TLS takes ``REID_TOKEN`` (a write token: a gallery is made and dropped)
    and ``REID_TLS_CA`` (with ``REID_TLS_CERT``/``REID_TLS_KEY`` under mutual TLS, and
    ``REID_TLS_SERVER_NAME``), as reid-client does.
    """
    import uuid

    import grpc

    from serving.client import GalleryClient, ReidClient, metadata_message
    from serving.security import SecurityError, client_tls

    name = f"eval-{uuid.uuid4().hex[:12]}"
    try:
        connection = {"token": os.environ.get("REID_TOKEN") or None, **client_tls()}
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    try:
        client, gallery_client = ReidClient(target, timeout=300, **connection), GalleryClient(target, timeout=600, **connection)
    except ValueError as exc:  # an address that is not a gRPC target
        raise ConfigError(f"evaluate.server: {exc}") from None
    try:
        qf = []
        # ``with``: each bar is cleared however its loop ends, before a stop's or an error's line is printed
        with progress(range(0, len(query), chunk), desc="query (server)", unit="batch", leave=False) as bar:
            for start in bar:
                for rec, out in zip(query[start:start + chunk], client.embed([r.path for r in query[start:start + chunk]])):
                    if not out.ok:
                        raise ReidError(f"the server could not embed {rec.path}: {out.error}")
                    qf.append(out.embedding)
        qf = np.stack(qf)
        gallery_client.create(name)
        try:
            with progress(range(0, len(gallery), chunk), desc="gallery (server)", unit="batch", leave=False) as bar:
                for start in bar:
                    part = gallery[start:start + chunk]
                    gallery_client.add(name, images=[r.path for r in part], ids=range(start + 1, start + len(part) + 1),
                                       metadata=[metadata_message(str(r.pid), str(r.camid)) for r in part])
            ids = protocol_ids(query, gallery)
            variants = {"without re-ranking": None}
            if rerank_cfg.re_ranking:
                # joint: the call's queries re-ranked together, as offline (the server's default
                # re-ranks each query alone, which a live caller wants)
                variants["with re-ranking"] = {"k1": rerank_cfg.k1, "k2": rerank_cfg.k2, "joint": True,
                                               "lambda_value": rerank_cfg.lambda_value, "pool": len(gallery)}
            results, curves, dists = {}, {}, {}
            per_call = max(1, _HITS_PER_SEARCH // len(gallery))
            if per_call < len(query) and rerank_cfg.re_ranking:
                # k-reciprocal neighbourhoods span the queries of one call as well as the gallery
                log.info("re-ranking %d queries per search call (the answers would exceed the message limit): the "
                         "re-ranked figures can differ slightly from offline, which re-ranks all queries together", per_call)
            for label, rerank in variants.items():
                dist = np.full((len(query), len(gallery)), np.inf, dtype=np.float32)
                with progress(range(0, len(query), per_call), desc=f"search {label} (server)", unit="call", leave=False) as bar:
                    for start in bar:
                        answers = gallery_client.search(name, embeddings=qf[start:start + per_call], top_k=len(gallery),
                                                        rerank=rerank)
                        for qi, answer in enumerate(answers, start):
                            for hit in answer.hits:
                                dist[qi, hit.id - 1] = hit.distance
                results[label], curves[label] = _rank(dist, ids)
                dists[label] = dist
            return results, curves, dists, qf.shape[1]
        finally:
            gallery_client.drop(name)
    except grpc.RpcError as exc:
        raise ReidError(f"server {target}: {exc.code().name}: {exc.details()}") from None
    finally:
        client.close()
        gallery_client.close()


def run_evaluate(spec) -> dict:
    e = spec.evaluate
    if not e.checkpoint and not e.server:
        raise model_required("evaluate.checkpoint", "a .pth checkpoint, .onnx, .engine or embeddings file; or "
                             "evaluate.server to evaluate through a running server", spec.results_dir)
    if e.checkpoint and not e.server and not Path(e.checkpoint).exists():
        raise ConfigError(f"evaluate.checkpoint={e.checkpoint} does not exist")
    if e.checkpoint and e.server:  # a spec file's checkpoint, with a server given on the command line
        log.warning("evaluate.checkpoint=%s is not used: evaluate.server=%s embeds with the model it serves",
                    e.checkpoint, e.server)
    out_dir = Path(spec.results_dir) / "evaluate"
    json_path = writable_output(out_dir / "results.json", "results_dir")
    cmc_path = writable_output(e.output_cmc_curve_plot or out_dir / "cmc_curve.png",
                               "evaluate.output_cmc_curve_plot" if e.output_cmc_curve_plot else "results_dir")
    matches_path = writable_output(e.output_sampled_matches_plot or out_dir / "sampled_matches.png",
                                   "evaluate.output_sampled_matches_plot" if e.output_sampled_matches_plot else "results_dir")
    query_dir, test_dir = e.query_dataset or spec.dataset.query_dataset_dir, e.test_dataset or spec.dataset.test_dataset_dir
    query, gallery = load_query_gallery(query_dir, test_dir, "evaluate")
    require_matches(query, gallery, query_dir, test_dir, "the evaluation", "check the folders")
    warn_of_training_images(spec.dataset.train_dataset_dir, query, gallery, "the evaluation")
    device = None if e.server else cuda_or_cpu(e.gpu_id, "evaluate.gpu_id")  # embeds, and re-ranks
    embedder = None if device is None else open_embedder(e.checkpoint, spec, device, e.batch_size or spec.dataset.val_batch_size)
    if embedder is None or embedder.reads_images:  # a server is sent the images too
        check_images([r.path for r in query + gallery], spec.dataset.num_workers)
    if embedder is None:
        source = f"server {e.server}"
        log.info("evaluating through %s on %d query and %d gallery images", e.server, len(query), len(gallery))
        results, curves, dists, dim = score_via_server(e.server, query, gallery, spec.re_ranking)
    else:
        source = embedder.description
        log.info("evaluating %s on %d query and %d gallery images", embedder.description, len(query), len(gallery))
        qf = embedder.embed(query, "query")
        gf = embedder.embed(gallery, "gallery")
        results, curves, dists = score(qf, gf, query, gallery, spec.re_ranking, str(device))
        dim = int(qf.shape[1])
    report = {
        "model": str(e.checkpoint or e.server), "source": source,
        "num_query": len(query), "num_gallery": len(gallery), "embedding_dim": dim,
        "results": results,
        "re_ranking": {"k1": spec.re_ranking.k1, "k2": spec.re_ranking.k2, "lambda_value": spec.re_ranking.lambda_value}
        if spec.re_ranking.re_ranking else None,
        "cmc_curve_plot": str(cmc_path), "sampled_matches_plot": str(matches_path),
    }
    json_path.write_text(json.dumps(report, indent=2))  # the figures first: a failed plot does not lose them
    report["results_file"] = str(json_path)
    plot_cmc(curves, cmc_path)
    plot_matches(query, gallery, dists.get("with re-ranking", dists["without re-ranking"]), matches_path)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['source']}: {report['num_query']} queries, {report['num_gallery']} gallery images"]
    for label, r in report["results"].items():
        lines.append(f"  {label:20s} mAP {r['mAP'] * 100:5.1f}  rank-1 {r['rank1'] * 100:5.1f}  "
                     f"rank-5 {r['rank5'] * 100:5.1f}  rank-10 {r['rank10'] * 100:5.1f}")
    lines += [f"wrote {report['results_file']}", f"wrote {report['cmc_curve_plot']}", f"wrote {report['sampled_matches_plot']}"]
    return "\n".join(lines)
