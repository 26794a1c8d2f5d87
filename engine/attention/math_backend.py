"""Reference attention in plain torch ops (fp32 internally): the backend every other one is tested against.

Formulas are the flash-attention ones (Dao, arXiv 2307.08691): lse = logsumexp(S), P = exp(S - lse),
dS = P * (dP - rowsum(dO * O)). K/V must already have as many heads as Q (the block layer expands GQA).
"""
from __future__ import annotations

import torch

NAME = "math"
NATIVE_GQA = False


def causal_mask(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    """True where masked; bottom-right aligned: query i sees keys j <= i + (s_k - s_q)."""
    return torch.ones(s_q, s_k, dtype=torch.bool, device=device).triu(s_k - s_q + 1)


def _scores_bnqk(q_bsnd, k_bsnd, causal: bool, scale: float) -> torch.Tensor:
    scores = torch.einsum("bqnd,bknd->bnqk", q_bsnd.float(), k_bsnd.float()) * scale
    if causal:
        scores = scores.masked_fill(causal_mask(q_bsnd.shape[1], k_bsnd.shape[1], q_bsnd.device),
                                    float("-inf"))
    return scores


def forward(q_bsnd, k_bsnd, v_bsnd, causal: bool, scale: float):
    scores = _scores_bnqk(q_bsnd, k_bsnd, causal, scale)
    lse_bns = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse_bns.unsqueeze(-1))
    out_bsnd = torch.einsum("bnqk,bknd->bqnd", probs, v_bsnd.float())
    return out_bsnd.to(q_bsnd.dtype), lse_bns


def backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, causal: bool, scale: float):
    # P is recomputed from the given (global) lse, so a block of keys gets its exact share.
    probs = torch.exp(_scores_bnqk(q_bsnd, k_bsnd, causal, scale) - lse_bns.float().unsqueeze(-1))
    dout = dout_bsnd.float()
    dv = torch.einsum("bnqk,bqnd->bknd", probs, dout)
    dprobs = torch.einsum("bqnd,bknd->bnqk", dout, v_bsnd.float())
    delta_bns = (dout * out_bsnd.float()).sum(-1).transpose(1, 2)
    dscores = probs * (dprobs - delta_bns.unsqueeze(-1))
    dq = torch.einsum("bnqk,bknd->bqnd", dscores, k_bsnd.float()) * scale
    dk = torch.einsum("bnqk,bqnd->bknd", dscores, q_bsnd.float()) * scale
    return dq.to(q_bsnd.dtype), dk.to(k_bsnd.dtype), dv.to(v_bsnd.dtype)
