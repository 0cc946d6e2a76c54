"""Reproduction of Rushing & Nanda 2024 (self-repair of single heads) on a built-in model (SmolLM2-135M by
default, or Gemma-3-270M) with the rushing_nanda preset on the built-in corpus: summary JSON, and
the self_repair figure into docs/results/reproduction/, named by the model (rushing_nanda_<model>_*).

    python bench/reproduce_rushing_nanda.py [--model gemma-3-270m] [--documents 8] [--max-tokens 32]

The job is the preset exactly (every head, resample at every position, next-token target, clean norm scale, head
response basis), resolved by the service and run by the worker's own code path in one piece.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "results" / "reproduction"
RAW = ROOT / ".bench-out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT, help="where the summary, table and figure go")
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model alias")
    args = parser.parse_args()
    out: Path = args.out
    slug = args.model.split("-")[0]

    import msgspec

    from hydra_ablate_client.wire import CorpusRef, JobRequest
    from service.core.resolve import resolve
    from service.core.settings import Settings
    from service.rendering.figures import render
    from worker.chunk_execution import execute
    from worker.model_cache import load_model, model_info
    from worker.model_sources import parse_source

    source = parse_source(args.model)
    loaded = load_model(source)
    info = model_info(source)
    request = JobRequest(
        preset="rushing_nanda",
        model=info.id,
        corpus=CorpusRef(name="known_1000_text", limit=args.documents),
        max_tokens=args.max_tokens,
    )
    spec = resolve(request, {info.id: info}, Settings())
    started = time.perf_counter()
    result = execute(f"rushing-nanda-{slug}", spec, loaded)
    elapsed = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)  # the whole result (large, not committed): figures can be redrawn from it
    (RAW / f"rushing_nanda_{slug}_result.json").write_bytes(msgspec.json.encode(result))
    document = {
        "model": info.id,
        "documents": args.documents,
        "max_tokens": args.max_tokens,
        "elapsed_s": elapsed,
        "provenance": {k: v for k, v in msgspec.to_builtins(result.provenance).items() if k != "spec"},
        "summary": msgspec.to_builtins(result.summary),
    }
    (out / f"rushing_nanda_{slug}_summary.json").write_text(json.dumps(document, indent=1))
    (out / f"self_repair_{slug}.png").write_bytes(render(result, "self_repair", "png"))
    print(json.dumps({"elapsed_s": elapsed, "pairs": result.summary.n_pairs}))
    # The page (docs/results/rushing-nanda-<model>.md) is written from this summary by bench/reproduction_report.py.


if __name__ == "__main__":
    main()
