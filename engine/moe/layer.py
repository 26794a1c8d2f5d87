"""MoELayer: router -> capacity dropping -> token dispatcher + grouped experts -> combine,
plus optional shared experts (y = routed(x) + shared(x)).

`forward(x_bsh)` takes this rank's local tokens (under TP-SP its sequence shard, under CP
its CP shard). Submodule names (`router`, `experts`, `shared_experts`, `dispatcher`) are
part of the checkpoint/init contract. Parallelism is installed from outside by
`engine.moe.parallelize.parallelize_moe` (expert slices, dispatcher, statistics groups);
the layer itself holds no process group unless given one.

Aux/z losses are injected into backward (see aux_loss.py for the layout-invariant
semantics). Routing statistics stay on the device (routing_stats.py): one record per
micro-batch, read and reset once per step by engine.moe.tracking. A forward re-run by
activation checkpointing happens inside the backward pass and is detected as such
(`is_recomputing`), so it neither records statistics nor counts tokens for the
expert-bias update twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config.model import MoEConfig
from engine.layers import SwiGLU

from .assignment import Assignments, build_assignments
from .aux_loss import attach_aux_loss, seq_aux_loss, switch_aux_loss, z_loss
from .dispatcher_local import LocalDispatcher
from .experts import GroupedExperts
from .router import Routing, TopKRouter
from .routing_stats import PendingStats, StatsLayout, local_routing_stats, seq_slot


def is_recomputing() -> bool:
    """True while the autograd engine runs a backward pass, i.e. when a forward is a
    checkpoint recomputation (reentrant or not). Eval and first-pass forwards are not."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class RoutingRecord:
    """The statistics of one recorded forward (one micro-batch of this layer)."""
    pending: PendingStats
    training: bool
    bias_counted: bool = False


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
        self.step_records: list[RoutingRecord] = []
        # fp64 [E] selections of this step's finalised training records (expert bias only);
        # None until the first one, so a meta-device build allocates nothing here.
        self.bias_counts_e: torch.Tensor | None = None

    # ---- forward -------------------------------------------------------------------
    def forward(self, x_bsh: torch.Tensor, token_groups_bs: torch.Tensor | None = None) -> torch.Tensor:
        """token_groups_bs: optional capacity-group id per token (single-process reference
        of a distributed dropping run: the rank owning each token); default one group."""
        batch, seq, hidden = x_bsh.shape
        x_th = x_bsh.reshape(batch * seq, hidden)
        routing = self.router(x_th)
        assign = self._assign(routing, token_groups_bs)
        objective = self._objective(batch) if torch.is_grad_enabled() else None
        # Started before the dispatch so that the reduction overlaps the expert compute.
        pending = self._start_stats(routing, batch, assign, reduce_now=objective is not None)
        y_bsh = self.dispatcher(x_th, assign, self.experts).view(batch, seq, hidden).to(x_bsh.dtype)
        if self.shared_experts is not None:
            shared_bsh = self.shared_experts(x_bsh)
            if self.shared_expert_gate is not None:
                shared_bsh = torch.sigmoid(self.shared_expert_gate(x_bsh)) * shared_bsh
            y_bsh = y_bsh + shared_bsh
        if objective is not None:
            y_bsh = attach_aux_loss(y_bsh, routing.scores_te, routing.logits_te, objective, pending)
        if not is_recomputing():
            self.step_records.append(RoutingRecord(pending, self.training))
        return y_bsh

    def _assign(self, routing: Routing, token_groups_bs: torch.Tensor | None) -> Assignments:
        groups_t = None if token_groups_bs is None else token_groups_bs.reshape(-1).long()
        return build_assignments(routing.probs_tk, routing.experts_tk, self.cfg.num_experts,
                                 self.cfg.capacity_factor, self.cfg.drop_policy,
                                 self.cfg.pad_to_capacity, groups_t)

    def _seq_slot(self) -> tuple[int, int]:
        return seq_slot(self.stage_group, self.seq_group)

    def stats_layout(self, batch: int) -> StatsLayout:
        seq_rows = self._seq_slot()[1] * batch if self.cfg.aux_loss_type == "seq" else 0
        return StatsLayout(self.cfg.num_experts, seq_rows)

    def _start_stats(self, routing: Routing, batch: int, assign: Assignments, reduce_now: bool) -> PendingStats:
        slot, num_slots = self._seq_slot()
        flat = local_routing_stats(routing, batch, assign.num_kept, self.stats_layout(batch), slot, num_slots)
        return PendingStats(flat, self.stats_layout(batch), self.stage_group, reduce_now)

    def _objective(self, batch: int):
        """objective(scores, logits, global stats) -> coefficient-weighted, scaled local
        loss, or None when no aux/z term has a coefficient."""
        cfg, k, scale = self.cfg, self.cfg.top_k, self.aux_loss_scale
        aux_coeff = cfg.aux_loss_coeff if cfg.aux_loss_type != "none" else 0.0
        if aux_coeff <= 0 and cfg.z_loss_coeff <= 0:
            return None
        slot = self._seq_slot()[0]

        def objective(scores_te, logits_te, stats):
            total = scores_te.new_zeros(())
            if aux_coeff > 0 and cfg.aux_loss_type == "switch":
                total = total + aux_coeff * switch_aux_loss(scores_te, stats, k)
            elif aux_coeff > 0:
                total = total + aux_coeff * seq_aux_loss(scores_te, batch, slot, stats, k)
            if cfg.z_loss_coeff > 0:
                total = total + cfg.z_loss_coeff * z_loss(logits_te, stats)
            return total * scale
        return objective

    # ---- statistics ----------------------------------------------------------------
    def reset_stats(self) -> None:
        """Drops the records of this step (engine.moe.tracking.moe_stats does this)."""
        self.step_records = []

    def reset_bias_counts(self) -> None:
        self.bias_counts_e = None     # created on the device of the first counts (update_expert_bias)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """bias += rate * sign(mean_count - count) (DeepSeek-V3 aux-loss-free balancing),
        with the counts of the finalised training records of this step."""
        bias = self.router.expert_bias
        if bias is None or self.bias_counts_e is None:
            return
        counts = self.bias_counts_e.to(bias.device)
        bias += self.cfg.bias_update_rate * torch.sign(counts.mean() - counts).to(bias)
        self.reset_bias_counts()
