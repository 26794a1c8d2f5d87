"""MoELayer: router -> capacity dropping -> token dispatcher + grouped experts -> combine,
plus optional shared experts (y = routed(x) + shared(x)).

`forward(x_bsh)` takes this rank's local tokens (under TP-SP its sequence shard, under CP
its CP shard). Submodule names (`router`, `experts`, `shared_experts`, `dispatcher`) are
part of the checkpoint/init contract. Parallelism is installed from outside by
`engine.moe.parallelize.parallelize_moe` (expert slices, dispatcher, statistics groups);
the layer itself holds no process group unless given one.

Aux/z losses are injected into backward (see aux_loss.py for the layout-invariant
semantics). Statistics are recorded once per micro-batch: a forward re-run by activation
checkpointing happens inside the backward pass and is detected as such (`is_recomputing`),
so it neither records statistics nor counts tokens for the expert-bias update twice.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config.model import MoEConfig
from engine.layers import SwiGLU

from .assignment import Assignments, build_assignments
from .aux_loss import (GlobalRoutingStats, attach_aux_loss, collect_routing_stats, seq_aux_loss,
                       switch_aux_loss, z_loss)
from .dispatcher_local import LocalDispatcher
from .experts import GroupedExperts
from .router import Routing, TopKRouter


def is_recomputing() -> bool:
    """True while the autograd engine runs a backward pass, i.e. when a forward is a
    checkpoint recomputation (reentrant or not). Eval and first-pass forwards are not."""
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(hidden_size, cfg)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, cfg.ffn_hidden_size)
        self.shared_experts = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SwiGLU(hidden_size, cfg.num_shared_experts * cfg.shared_ffn_hidden_size)
        # Qwen2-MoE: y = routed(x) + sigmoid(g . x) * shared(x), one scalar gate per token.
        self.shared_expert_gate = None
        if cfg.shared_expert_gate and self.shared_experts is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.dispatcher: nn.Module = LocalDispatcher()
        self.aux_loss_scale = 1.0      # the trainer sets 1 / num_microbatches
        self.stage_group = None        # mesh "stage" group: statistics of one micro-batch
        self.seq_group = None          # mesh "tp_cp" group: ranks that share a sequence
        self.last_stats: dict = {}
        self.reset_stats()
        self.reset_bias_counts()

    # ---- forward -------------------------------------------------------------------
    def forward(self, x_bsh: torch.Tensor, token_groups_bs: torch.Tensor | None = None) -> torch.Tensor:
        """token_groups_bs: optional capacity-group id per token (single-process reference
        of a distributed dropping run: the rank owning each token); default one group."""
        batch, seq, hidden = x_bsh.shape
        x_th = x_bsh.reshape(batch * seq, hidden)
        routing = self.router(x_th)
        assign = self._assign(routing, token_groups_bs)
        stats = collect_routing_stats(
            routing, batch, assign.num_kept, with_seq=self.cfg.aux_loss_type == "seq",
            stage_group=self.stage_group, seq_group=self.seq_group)
        y_bsh = self.dispatcher(x_th, assign, self.experts).view(batch, seq, hidden).to(x_bsh.dtype)
        if self.shared_experts is not None:
            shared_bsh = self.shared_experts(x_bsh)
            if self.shared_expert_gate is not None:
                shared_bsh = torch.sigmoid(self.shared_expert_gate(x_bsh)) * shared_bsh
            y_bsh = y_bsh + shared_bsh
        weighted, values = self._aux_losses(routing, batch, stats)
        if weighted is not None:
            y_bsh = attach_aux_loss(y_bsh, weighted)
        if not is_recomputing():
            self._record(stats, values)
        return y_bsh

    def _assign(self, routing: Routing, token_groups_bs: torch.Tensor | None) -> Assignments:
        groups_t = None if token_groups_bs is None else token_groups_bs.reshape(-1).long()
        return build_assignments(routing.probs_tk, routing.experts_tk, self.cfg.num_experts,
                                 self.cfg.capacity_factor, self.cfg.drop_policy,
                                 self.cfg.pad_to_capacity, groups_t)

    def _aux_losses(self, routing: Routing, batch: int, stats: GlobalRoutingStats):
        """(coeff-weighted, scaled local loss to inject or None, logged global values)."""
        cfg, k = self.cfg, self.cfg.top_k
        terms, values = [], {"aux_loss": 0.0}
        if cfg.aux_loss_type != "none":
            loss_fn = switch_aux_loss if cfg.aux_loss_type == "switch" else seq_aux_loss
            args = (routing.scores_te, stats, k) if loss_fn is switch_aux_loss else (
                routing.scores_te, batch, stats, k)
            local, values["aux_loss"] = loss_fn(*args)
            if cfg.aux_loss_coeff > 0:
                terms.append(cfg.aux_loss_coeff * local)
        local_z, values["z_loss"] = z_loss(routing.logits_te, stats)
        if cfg.z_loss_coeff > 0:
            terms.append(cfg.z_loss_coeff * local_z)
        weighted = sum(terms) * self.aux_loss_scale if terms else None
        return weighted, values

    # ---- statistics ----------------------------------------------------------------
    def reset_stats(self) -> None:
        """Clears the accumulators read by `moe_stats` (the trainer does this per step)."""
        num_experts = self.cfg.num_experts
        self.stats_acc = {"forwards": 0, "tokens_per_expert": torch.zeros(num_experts, dtype=torch.float64, device="cpu"),
                          "routed": 0.0, "kept": 0.0, "aux_loss": 0.0, "z_loss": 0.0}

    def reset_bias_counts(self) -> None:
        # On the CPU explicitly, like the counts added to it: the layer is built under a
        # meta-device context (engine.compose), and a meta accumulator cannot be updated.
        self.bias_counts_e = torch.zeros(self.cfg.num_experts, dtype=torch.float64, device="cpu")

    @torch.no_grad()
    def _record(self, stats: GlobalRoutingStats, values: dict) -> None:
        counts_e = stats.counts_e.cpu()
        dropped = 1.0 - stats.num_kept / stats.num_routed if stats.num_routed else 0.0
        self.last_stats = {"tokens_per_expert": counts_e.clone(), "num_tokens": stats.num_tokens,
                           "dropped_token_fraction": dropped, **values}
        acc = self.stats_acc
        acc["forwards"] += 1
        acc["tokens_per_expert"] += counts_e
        acc["routed"] += stats.num_routed
        acc["kept"] += stats.num_kept
        acc["aux_loss"] += values["aux_loss"]
        acc["z_loss"] += values["z_loss"]
        if self.training and self.router.expert_bias is not None:
            # Already summed over the stage group, so the bias update needs no collective.
            self.bias_counts_e += counts_e

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """bias += rate * sign(mean_count - count) (DeepSeek-V3 aux-loss-free balancing)."""
        bias = self.router.expert_bias
        if bias is None:
            return
        counts = self.bias_counts_e
        bias += self.cfg.bias_update_rate * torch.sign(counts.mean() - counts).to(bias)
        self.reset_bias_counts()
