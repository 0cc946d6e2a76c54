"""A first sweep: submit a job, wait for it, read the result as a pandas table, plot where the repair happens.

Start the service in one terminal (`hydra-ablate serve`), then run, from the repository's virtual environment:

    python docs/examples/first_sweep.py                      # SmolLM2-135M, the first 20 known_1000 prompts
    python docs/examples/first_sweep.py --limit 100 --samples 15 --out sweep.png
    python docs/examples/first_sweep.py --job ID --out again.png   # plot a finished job again

Needs the client with pandas (`pip install './clients/python[pandas]'`) and matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw to a file; no display needed
import matplotlib.pyplot as plt

from hydra_ablate_client import HydraClient
from hydra_ablate_client.wire import JobResult, JobStatus

MEASURES = ["direct_effect", "total_effect", "compensation"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="API base URL (default: HYDRA_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--model", default="smollm2-135m", help="a model id from GET /v1/models")
    parser.add_argument("--limit", type=int, default=20, help="known_1000 prompts to measure")
    parser.add_argument("--samples", type=int, default=3, help="resample sources per prompt (the paper: 15)")
    parser.add_argument("--job", help="plot this finished job instead of submitting a new one")
    parser.add_argument("--out", type=Path, default=Path("first_sweep.png"), help="where to save the figure")
    return parser.parse_args(argv)


def show_progress(status: JobStatus) -> None:
    print(f"\r{status.status}: {status.progress.done}/{status.progress.total} ablations", end="", flush=True)


def run_sweep(client: HydraClient, args: argparse.Namespace) -> str:
    """Submit the sweep and follow it to the end; returns the job id."""
    # The paper's setup (every attention and MLP layer, final token, resample ablation, centred logit), on the
    # first prompts of known_1000, measuring all of them: `only_correct` (the preset's default) would keep only
    # the prompts the model answers correctly.
    request = {
        "preset": "hydra",
        "model": args.model,
        "dataset": {"name": "known_1000", "limit": args.limit},
        "resample_samples": args.samples,
        "only_correct": False,
    }
    job = client.submit(request)
    print(f"job {job.id} queued")
    final = client.wait(job.id, on_progress=show_progress)
    print()
    if final.status != "succeeded":
        raise SystemExit(f"job {job.id} {final.status}: {final.error}")
    return job.id


def plot(result: JobResult, out: Path) -> None:
    # One row per prompt × component: kind ("attn", "mlp"), layer, and every measure.
    table = result.to_pandas()
    per_layer = table.groupby(["kind", "layer"])[MEASURES].mean()
    print(per_layer.round(3).to_string())

    spec = result.provenance.spec
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, kind in zip(axes, ("attn", "mlp"), strict=True):
        rows = per_layer.loc[kind]
        layers, de, te = rows.index, rows["direct_effect"], rows["total_effect"]
        ax.axhline(0, color="0.6", linewidth=0.8)
        # Compensation = DE − TE: positive where the rest of the network repaired part of what the layer wrote,
        # negative where it amplified the ablation.
        ax.fill_between(layers, te, de, where=de >= te, interpolate=True, color="tab:green", alpha=0.25,
                        label="repaired (DE > TE)")
        ax.fill_between(layers, te, de, where=de < te, interpolate=True, color="tab:red", alpha=0.2,
                        label="amplified (TE > DE)")
        ax.plot(layers, de, marker="o", markersize=3, label="direct effect (DE)")
        ax.plot(layers, te, marker="o", markersize=3, label="total effect (TE)")
        ax.set_title(f"{kind} layers ablated")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean over prompts ({spec.metric})")
    axes[0].legend(loc="upper left")
    n_prompts = table["prompt_index"].nunique()
    fig.suptitle(f"{result.model}: {spec.ablation} ablation ({spec.resample_samples} sources per prompt), "
                 f"{n_prompts} prompts")
    fig.savefig(out, dpi=100)
    print(f"figure saved to {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with HydraClient(args.url) as client:
        job_id = args.job or run_sweep(client, args)
        result = client.result(job_id)
    plot(result, args.out)


if __name__ == "__main__":
    main()
