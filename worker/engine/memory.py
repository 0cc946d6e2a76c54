"""How many rows × tokens an ablated batch may hold: from the device's free memory on CUDA, and what to do when a
batch runs out of memory anyway (halve it) or when not even one row fits (fail with the reason).

On a CPU the budget stays the fixed `DEFAULT_BATCH_TOKENS` (host memory is large, and throughput no longer grows
beyond it). On CUDA it is derived, at the start of each sweep, from `torch.cuda.mem_get_info` after the model and
the clean runs are resident, and from what one row-token of a batch costs for this model (below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.architecture import Architecture

DEFAULT_BATCH_TOKENS = 8192
# Leave this share of the free memory unused: the allocator's fragmentation and the readout's transient tensors.
HEADROOM = 0.25
MAX_BATCH_TOKENS = 1 << 20  # past this, batches are bound by the GPU's arithmetic, not its memory


class BatchDoesNotFit(ValueError):
    """Not even one ablated run fits in the device's memory; the job fails with this reason."""


def bytes_per_row_token(arch: Architecture, dtype: torch.dtype, longest: int, all_positions: bool) -> int:
    """A conservative estimate of the memory one row-token of an ablated batch holds at its peak layer.

    Per recomputed token: the residual stream, the norm's and attention's outputs (a few d_model vectors), the
    MLP's hidden activations (gated MLPs hold two of them; MoE MLPs no more than that per routed expert, counted
    the same), this layer's keys and values for the row (the clean prefix is copied per row: 2·kv·hd per key), and
    attention scores (heads per key; SDPA's math path materialises them). Per row: the outputs of every layer
    component at the final position (2·N·d), counted per token as a bound.
    """
    element = torch.finfo(dtype).bits // 8
    intermediate = int(getattr(arch.mlp(0), "intermediate_size", 0) or 4 * arch.d_model)
    keys = longest if not all_positions else 1
    per_token = 6 * arch.d_model + 3 * intermediate + 2 * arch.n_kv_heads * arch.head_dim * (1 + keys)
    per_token += arch.n_heads * longest
    per_row = 2 * arch.n_layers * arch.d_model + 2 * arch.n_kv_heads * arch.head_dim * arch.n_layers
    return element * (per_token + per_row // max(1, longest))


def device_batch_tokens(
    arch: Architecture, device: torch.device, dtype: torch.dtype, longest: int, all_positions: bool
) -> int:
    """The batch budget in rows × tokens for this device: fixed on CPU, from free memory on CUDA."""
    if device.type != "cuda":
        return DEFAULT_BATCH_TOKENS
    free, _total = torch.cuda.mem_get_info(device)
    usable = int(free * (1 - HEADROOM))
    cost = bytes_per_row_token(arch, dtype, longest, all_positions)
    tokens = usable // cost
    if tokens < longest * (2 if all_positions else 1):
        raise BatchDoesNotFit(
            f"one ablated run of a {longest}-token prompt needs about {cost * longest / 2**20:.0f} MiB, but only "
            f"{usable / 2**20:.0f} MiB of {device} are free after the model and the clean runs; use a GPU with more "
            "memory, fewer prompts per chunk (HYDRA_CHUNK_PROMPTS) or a smaller dtype (HYDRA_DTYPE=bfloat16)"
        )
    return min(tokens, MAX_BATCH_TOKENS)


@dataclass
class BatchBudget:
    """The rows × tokens a batch may hold; halved for the rest of the sweep when a batch runs out of memory."""

    tokens: int
    halvings: int = 0

    def halve(self, per_row: int, rows: int, error: BaseException) -> None:
        """After a batch of `rows` rows ran out of memory: half as many rows per batch from now on, or fail with the
        reason when a single row did not fit."""
        if rows <= 1:
            raise BatchDoesNotFit(
                f"one ablated run of a {per_row}-token batch row ran out of memory even alone: {error}"
            ) from error
        self.tokens = (rows // 2) * per_row
        self.halvings += 1


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error, so that the retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
