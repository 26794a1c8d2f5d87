"""Analytic communication volume per rank per transformer layer: CP ring / a2a / hybrid vs TP+SP.

Bytes *sent by one rank*, forward and backward, matching what the cores count in `bytes_sent`:
- ring (LightSeq): K/V of the local s/cp tokens, kv heads only, make cp-1 hops in forward and
  again in backward; the fp32 dK/dV accumulators make cp hops in backward.
- a2a (Ulysses): one packed all-to-all of q, k, v (kv heads repeated when fewer than the group)
  and one of out; a rank keeps its own 1/P block. Backward moves the same tensors' gradients.
- hybrid: a2a inside groups of P, then a ring of cp/P over P*s/cp tokens with n_kv/P heads.
- Megatron TP+SP: 2 all-gathers + 2 reduce-scatters of s*b*h per layer in forward (attention and
  MLP), the same in backward; a ring collective sends (tp-1)/tp of the full tensor per rank.
CP moves nothing for the MLP (besides the gradient all-reduce, which TP+SP also has).
"""
from __future__ import annotations

from dataclasses import dataclass

from .ulysses import kv_replication

MIB = 1 << 20


@dataclass(frozen=True)
class LayerShape:
    seq_len: int
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    elem_bytes: int = 2        # activations (bf16)
    grad_acc_bytes: int = 4    # ring dK/dV accumulators travel in fp32

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim


def cp_bytes(shape: LayerShape, cp: int, a2a_size: int = 1) -> dict[str, int]:
    """{'forward', 'backward'} bytes sent per rank; a2a_size 1 = ring, cp = pure a2a, else hybrid."""
    if shape.seq_len % (2 * cp) or cp % a2a_size:
        raise ValueError(f"seq_len {shape.seq_len} / cp {cp} / a2a_size {a2a_size} do not divide")
    local_tokens = shape.seq_len // cp
    kv_heads = shape.num_kv_heads * (kv_replication(shape.num_heads, shape.num_kv_heads, a2a_size)
                                     if a2a_size > 1 else 1)
    token_row = shape.batch * local_tokens * shape.head_dim  # elements of one head of the local tokens
    a2a = (a2a_size - 1) * token_row * (2 * shape.num_heads + 2 * kv_heads) // a2a_size * shape.elem_bytes
    ring_size = cp // a2a_size
    kv_message = 2 * token_row * kv_heads  # elements; after the a2a: a2a_size x tokens, / a2a_size heads
    ring_fwd = (ring_size - 1) * kv_message * shape.elem_bytes
    ring_bwd = ring_fwd + (ring_size * kv_message * shape.grad_acc_bytes if ring_size > 1 else 0)
    return {"forward": a2a + ring_fwd, "backward": a2a + ring_bwd}


def ring_bytes(shape: LayerShape, cp: int) -> dict[str, int]:
    return cp_bytes(shape, cp, 1)


def a2a_bytes(shape: LayerShape, cp: int) -> dict[str, int]:
    return cp_bytes(shape, cp, cp)


def tp_sp_bytes(shape: LayerShape, tp: int) -> dict[str, int]:
    """Megatron TP with sequence parallelism: 4 ring collectives of s*b*h per layer per pass."""
    full = shape.seq_len * shape.batch * shape.hidden * shape.elem_bytes
    per_pass = 4 * (tp - 1) * full // tp
    return {"forward": per_pass, "backward": per_pass}


def volume_rows(shape: LayerShape, degrees=(2, 4, 8)) -> list[dict]:
    rows = []
    for degree in degrees:
        candidates = {"ring": ring_bytes(shape, degree), "tp+sp": tp_sp_bytes(shape, degree)}
        if shape.num_heads % degree == 0:
            candidates["a2a"] = a2a_bytes(shape, degree)
        baseline = sum(candidates["tp+sp"].values())
        for scheme, volume in candidates.items():
            total = sum(volume.values())
            rows.append({"degree": degree, "scheme": scheme, "forward_mib": volume["forward"] / MIB,
                         "backward_mib": volume["backward"] / MIB, "total_mib": total / MIB,
                         "vs_tp_sp": baseline / total})
    return rows


def format_table(shape: LayerShape, rows: list[dict]) -> str:
    lines = [f"s={shape.seq_len} b={shape.batch} heads={shape.num_heads} kv_heads={shape.num_kv_heads} "
             f"head_dim={shape.head_dim} act={shape.elem_bytes}B dKdV={shape.grad_acc_bytes}B "
             "(MiB sent per rank per layer)",
             f"{'deg':>3} {'scheme':<6} {'fwd':>9} {'bwd':>9} {'total':>9} {'TP+SP/x':>8}"]
    for r in rows:
        lines.append(f"{r['degree']:>3} {r['scheme']:<6} {r['forward_mib']:>9.1f} {r['backward_mib']:>9.1f} "
                     f"{r['total_mib']:>9.1f} {r['vs_tp_sp']:>8.2f}")
    return "\n".join(lines)


def llama7b_tables(seq_len: int = 32768) -> str:
    """Llama-7B-shaped layer (h 4096, 32 heads, head dim 128), MHA and an 8-kv-head GQA variant."""
    tables = []
    for kv_heads in (32, 8):
        for grad_bytes in (4, 2):
            shape = LayerShape(seq_len, 1, 32, kv_heads, 128, elem_bytes=2, grad_acc_bytes=grad_bytes)
            tables.append(format_table(shape, volume_rows(shape)))
    return "\n\n".join(tables)


if __name__ == "__main__":
    print(llama7b_tables())
