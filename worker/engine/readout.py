"""The metric and the linear direct-effect map at the final position (docs/definitions.md, "Metric and readout")."""

from __future__ import annotations

import torch

from hydra_ablate_client.vocabulary import MetricName
from worker.engine.architecture import Architecture, weight_of
from worker.engine.errors import InputError


class Readout:
    """Reads a metric off final residual vectors, and maps component outputs to direct effects."""

    def __init__(self, arch: Architecture, metric: MetricName) -> None:
        self.arch = arch
        self.metric = metric
        weight = weight_of(arch.unembed)
        bias = getattr(arch.unembed, "bias", None)
        self.unembed_weight = weight
        zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.unembed_bias = bias if bias is not None else zeros
        self.mean_row = weight.mean(dim=0) if metric == "centered_logit" else None
        self.eps = arch.norm_eps()
        self.gain = arch.norm_weight()
        self.centred = arch.family.norm_kind == "layer"
        self.softcap = arch.final_logit_softcap  # Gemma 2: the model's logits are cap · tanh(z / cap)

    def direction(self, target: int, counterfactual: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The vocabulary-space direction w of the metric and its constant bias term."""
        w = self.unembed_weight[target]
        b = self.unembed_bias[target]
        if self.metric == "centered_logit":
            assert self.mean_row is not None
            w = w - self.mean_row
            b = b - self.unembed_bias.mean()
        elif self.metric == "logit_diff":
            if counterfactual is None:
                raise InputError("metric logit_diff needs a counterfactual token per prompt")
            w = w - self.unembed_weight[counterfactual]
            b = b - self.unembed_bias[counterfactual]
        return w, b

    def direct_map(self, w: torch.Tensor) -> torch.Tensor:
        """u with f(v) = u · v: the gain (and, for LayerNorm, the centring) folded into w (rows of w: one u each)."""
        u = self.gain.float() * w.float()
        return u - u.mean(dim=-1, keepdim=True) if self.centred else u

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's divisor s(x) for each row of x (…, d), in float32."""
        x = x.float()
        if self.centred:
            return torch.sqrt(x.var(dim=-1, unbiased=False) + self.eps)
        return torch.sqrt(x.pow(2).mean(dim=-1) + self.eps)

    def value(self, x: torch.Tensor, target: int, counterfactual: int | None) -> torch.Tensor:
        """The metric for each row of final residual vectors x (B, d), through the model's own final norm.

        The norm and unembedding run in the model's dtype; the result is float32 whatever that dtype is.
        """
        normed = self.arch.final_norm(x.to(self.gain.dtype))
        if self.metric == "logprob":  # a log-probability exists only for the model's own (capped) distribution
            logits = self.capped(self.arch.unembed(normed).float())
            return torch.log_softmax(logits, dim=-1)[:, target]
        w, b = self.direction(target, counterfactual)
        return normed.float() @ w.float() + b.float()

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's output logits from pre-cap logits (unchanged for models without final-logit soft-capping)."""
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def capped_value(self, x: torch.Tensor, target: int, counterfactual: int | None) -> torch.Tensor:
        """The metric read on the model's soft-capped logits (docs/definitions.md, "Final-logit soft-capping")."""
        normed = self.arch.final_norm(x.to(self.gain.dtype)).float()
        if self.metric in ("logit", "logit_diff"):
            rows = [target] if self.metric == "logit" else [target, counterfactual]
            if None in rows:
                raise InputError("metric logit_diff needs a counterfactual token per prompt")
            picked = self.capped(normed @ self.unembed_weight[rows].float().T + self.unembed_bias[rows].float())
            return picked[:, 0] if self.metric == "logit" else picked[:, 0] - picked[:, 1]
        logits = self.capped(self.arch.unembed(normed.to(self.gain.dtype)).float())
        if self.metric == "centered_logit":
            return logits[:, target] - logits.mean(dim=-1)
        return torch.log_softmax(logits, dim=-1)[:, target]
