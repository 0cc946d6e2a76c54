"""Reproduce the paper's setup (the `hydra` preset) on SmolLM2-135M over all 1,209 known_1000 prompts, through the
service itself, and write the per-layer table, the summary and the figures to docs/reproduction/.

    python bench/reproduce_hydra.py [--url http://127.0.0.1:8000] [--limit N]

Without --url it starts its own stack (embedded Redis, API, one worker) on a free port.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.http import FIGURE_NAMES, HydraClient
from client.stack import Stack
from service.embedded_redis import free_port
from service.schemas import JobResult

OUT = ROOT / "docs" / "reproduction"
FIGURES = FIGURE_NAMES  # service/schemas.py: FigureName


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def layer_table(result: JobResult) -> str:
    """One row per layer: attention and MLP side by side (means over prompts)."""
    by_name = {c.component: c for c in result.summary.components}
    basis = result.response_basis
    clean = dict(zip(basis, result.summary.clean_direct_effect_mean, strict=True))
    lines = [
        "| layer | attn DE | attn TE | attn comp. | of which attn / mlp / norm | attn slope (R²) "
        "| mlp DE | mlp TE | mlp comp. | of which attn / mlp / norm | mlp slope (R²) | clean DE attn / mlp |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---|---|---|",
    ]
    n_layers = len(basis) // 2
    for layer in range(n_layers):
        cells = [str(layer)]
        for kind in ("attn", "mlp"):
            c = by_name[f"{kind}.{layer}"]
            fit = c.compensation_vs_direct
            cells += [
                fmt(c.direct_effect_mean),
                fmt(c.total_effect_mean),
                fmt(c.compensation_mean),
                f"{fmt(c.compensation_attn_mean)} / {fmt(c.compensation_mlp_mean)} / {fmt(c.norm_response_mean)}",
                f"{fmt(fit.slope)} ({fmt(fit.r2)})",
            ]
        cells.append(f"{fmt(clean[f'attn.{layer}'])} / {fmt(clean[f'mlp.{layer}'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only (default: all 1,209)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    stack = None
    url = args.url
    if url is None:
        stack = Stack(port=free_port())
        stack.start()
        stack.wait_ready()
        url = stack.api_url
    try:
        request: dict[str, object] = {"preset": "hydra"}
        if args.limit:
            request["dataset"] = {"name": "known_1000", "limit": args.limit}
        with HydraClient(url, timeout=600) as client:
            started = time.perf_counter()
            job = client.submit(request)
            logging.info("job %s submitted: %s", job.id, request)
            last = {"t": 0.0}

            def report(status: object) -> None:
                if time.monotonic() - last["t"] > 30:
                    last["t"] = time.monotonic()
                    logging.info("progress %s/%s", status.progress.done, status.progress.total)  # type: ignore[attr-defined]

            final = client.wait(job.id, poll_s=2.0, on_progress=report)
            if final.status != "succeeded":
                raise SystemExit(f"job ended {final.status}: {final.error}")
            elapsed = time.perf_counter() - started
            result = client.result(job.id)
            OUT.mkdir(parents=True, exist_ok=True)
            for name in FIGURES:
                (OUT / f"{name}.png").write_bytes(client.figure(job.id, name, "png"))
    finally:
        if stack is not None:
            stack.stop()

    summary = {
        "job": result.id,
        "elapsed_s": elapsed,
        "n_prompts": result.summary.n_prompts,
        "spec": msgspec.to_builtins(result.provenance.spec),
        "provenance": {k: v for k, v in msgspec.to_builtins(result.provenance).items() if k != "spec"},
        "summary": msgspec.to_builtins(result.summary),
        "components": result.components,
        "response_basis": result.response_basis,
    }
    summary["spec"].pop("prompts", None)
    (OUT / "hydra_smollm2_summary.json").write_text(json.dumps(summary, indent=1))
    (OUT / "layer_table.md").write_text(layer_table(result) + "\n")
    print(layer_table(result))
    print(f"\n{result.summary.n_prompts} prompts, {len(result.components)} components, {elapsed:.0f} s")


if __name__ == "__main__":
    main()
