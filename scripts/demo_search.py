"""Demo step: enroll the synthetic gallery into a running reid-serve and ask who some queries are.

Waits for the server's health check, creates (or replaces) gallery "demo", adds every
bounding_box_test image with its person and camera, then runs a re-ranked search for every query
image that excludes the query's own camera, prints who was found where for a few of them, and how
many of all the queries found the right person first.
Usage: python scripts/demo_search.py DATA_DIR --server 127.0.0.1:50051 [--examples 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.client import GalleryClient, metadata_message  # noqa: E402
from serving.healthcheck import wait_serving  # noqa: E402
from serving.proto import reid_pb2  # noqa: E402
from training.data.market1501 import load_gallery, load_query  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data", type=Path)
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--examples", type=int, default=5, help="queries whose hits are printed")
    args = p.parse_args()
    if not wait_serving(args.server):
        raise SystemExit(f"server {args.server} did not become SERVING")
    gallery = load_gallery(args.data / "bounding_box_test")
    queries = load_query(args.data / "query")
    with GalleryClient(args.server) as g:
        if "demo" in [i.name for i in g.list()]:
            g.drop("demo")
        g.create("demo")
        for start in range(0, len(gallery), 64):
            part = gallery[start:start + 64]
            g.add("demo", images=[r.path for r in part],
                  metadata=[metadata_message(f"{r.pid:04d}", f"c{r.camid}", float(start + i)) for i, r in enumerate(part)])
        print(f"enrolled {g.info('demo').size} gallery images over gRPC")
        results = []
        for start in range(0, len(queries), 64):  # within the server's default per-request limits
            part = queries[start:start + 64]
            results += g.search("demo", images=[q.path for q in part], top_k=3,
                                filters=[reid_pb2.SearchFilter(exclude_camera_id=f"c{q.camid}") for q in part],
                                rerank={"k1": 20, "k2": 6, "lambda_value": 0.3, "pool": 100})
    right = [r.hits[0].metadata.person_id == f"{q.pid:04d}" for q, r in zip(queries, results)]
    step = max(1, len(queries) // max(1, args.examples))
    for q, r, ok in list(zip(queries, results, right))[::step][: args.examples]:
        # Hits come in re-ranked order, so their cosine scores need not fall; the distance does not rise.
        found = ", ".join(f"person {h.metadata.person_id} on camera {h.metadata.camera_id} "
                          f"(distance {h.distance:.2f}, cosine {h.score:.2f})" for h in r.hits)
        print(f"query person {q.pid:04d} seen by camera c{q.camid} -> {found} {'[correct]' if ok else '[wrong]'}")
    print(f"{sum(right)} of {len(queries)} queries ({100 * sum(right) / len(queries):.1f} %) found the right person first "
          f"(re-ranked, other cameras only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
