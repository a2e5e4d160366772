"""Loss functions to pass as `loss_fn` to `lmc.compile_training` (or to call in a model's
forward). They are plain torch code, so torch.export traces them into the train step like the
model; torch's own F.cross_entropy, F.mse_loss, F.kl_div, F.l1_loss and
F.binary_cross_entropy_with_logits are understood as they are."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: logits [..., V] against integer targets [...] (mean over the
    targets that are not `ignore_index`)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def kl_divergence(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) averaged over the batch (dim 0): Σ p·(log p − log q) / N."""
    return F.kl_div(torch.log_softmax(logits, -1), target_probs, reduction="batchmean")


def load_balancing_loss(router_logits: torch.Tensor, num_experts: int,
                        top_k: int = 1) -> torch.Tensor:
    """The Switch Transformer auxiliary loss N·Σᵢ fᵢ·Pᵢ (Fedus et al. 2021, eq. 4), with top-k
    routing: fᵢ = the share of the (token, choice) pairs routed to expert i (Mixtral's count
    divided by k, so that the loss is 1.0 for uniform routing at every k),
    Pᵢ = the mean router probability of expert i. 1.0 when routing is uniform. Only Pᵢ carries a
    gradient (fᵢ counts discrete choices)."""
    probs = torch.softmax(router_logits.reshape(-1, num_experts), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    experts = torch.arange(num_experts, device=router_logits.device)
    dispatch = (chosen.unsqueeze(-1) == experts).to(probs.dtype)     # [N, k, E]
    fraction = dispatch.mean(dim=(0, 1))                              # fᵢ
    return num_experts * (fraction * probs.mean(dim=0)).sum()
