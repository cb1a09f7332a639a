"""Stacked expert weights and the three ways to run them (reference, grouped, capacity).

Shape legend (used in every name below):
    T  tokens (flattened over all leading dims)
    D  model dim (``d_model``)
    F  expert FFN hidden dim (``d_ff``)
    H  width of the expert input projection: 2F for SwiGLU (gate ‖ up, gate first), F for GELU
    E  routed experts
    K  routing slots per token (top-k; see ``RoutingDecision`` for the -1 padding)
    S  token-expert assignments kept after routing (≤ T·K), sorted by expert
    C  per-expert capacity (capacity path)

Weight layout (``Experts``): ``w_in_EDH [E, D, H]`` and ``w_out_EFD [E, F, D]``, i.e. expert e
computes ``act(x @ w_in_EDH[e]) @ w_out_EFD[e]``. Both are stored "input-major" so that
``grouped_mm(x_SD, w_in_EDH)`` needs no transpose. Mixtral/Qwen-MoE checkpoints store the
transposes (``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``); see ``vlmoe.moe.hf``.

Semantics shared by all paths: ``y[t] = Σ_k weights[t, k] · FFN_{indices[t, k]}(x[t])`` where
slots with ``indices[t, k] == -1`` (dropped / padding) contribute nothing. The reference loop
below *is* that formula; every fast path is tested against it.

Paths:
    reference_experts  loop over experts with boolean masks (short, obviously right, slow)
    grouped_experts    dropless: stable argsort of the T·K assignments by expert, then the
                       fused node ``_RoutedFFN`` — gather rows, grouped matmul (gate‖up in one
                       GEMM), activation, routing weight, grouped matmul, scatter-add — with a
                       hand-written backward that keeps only ``h_SH`` alive
    capacity_experts   the same node over E fixed C-row slot buffers (static shapes; empty
                       slots read a zero row with weight 0)
    grouped_ffn        the node without gather/scatter/weights, for tokens already sorted by
                       expert (what an expert-parallel rank runs on the tokens it received)
Grouped matmuls use ``torch.nn.functional.grouped_mm`` where its kernel accepts the operands
(CPU fp32/bf16 with 16-byte-aligned strides, CUDA bf16 on SM80+) and a loop of ``torch.mm``
over experts otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("swiglu", "gelu")


def ffn_act(h_SH: Tensor, activation: str) -> Tensor:
    """Hidden activation of one expert FFN: ``[S, H] -> [S, F]``.

    SwiGLU: ``silu(gate) * up`` with ``h = [gate ‖ up]``; GELU: ``gelu(h)`` (tanh-free, exact).
    """
    if activation == "swiglu":
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        return F.silu(gate_SF) * up_SF
    if activation == "gelu":
        return F.gelu(h_SH)
    raise ValueError(f"activation: unknown {activation!r}, expected one of {ACTIVATIONS}")


def dense_ffn(
    x_TD: Tensor, w_in_DH: Tensor, w_out_FD: Tensor, activation: str = "swiglu"
) -> Tensor:
    """One dense FFN ``act(x @ w_in) @ w_out``: ``[T, D] -> [T, D]``.

    Used for shared experts and as the dense-equivalent baseline in tests and benchmarks.
    """
    return ffn_act(x_TD @ w_in_DH, activation) @ w_out_FD


@torch.no_grad()
def init_ffn_(w_in_xDH: Tensor, w_out_xFD: Tensor) -> None:
    """The one initialisation rule for every FFN weight, dense FFNs and experts alike.

    Fan-in scaled normal: ``w_in ~ N(0, 1/D)``, ``w_out ~ N(0, 1/F)`` (the scale of
    ``nn.Linear``'s default), so a token's FFN output has the same scale whether it passes a
    dense FFN of hidden k·F or k experts of hidden F. Works on ``[D, H]`` and stacked
    ``[E, D, H]`` weights alike (the fan-in is the second-to-last dimension).
    """
    nn.init.normal_(w_in_xDH, std=w_in_xDH.shape[-2] ** -0.5)
    nn.init.normal_(w_out_xFD, std=w_out_xFD.shape[-2] ** -0.5)


class DenseFFN(nn.Module):
    """A dense FFN with the same layout as one expert: ``w_in_DH [D, H]``, ``w_out_FD [F, D]``.

    With ``d_ff = k·F`` this is the dense-equivalent of a top-k MoE (same active FLOPs per token).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        h = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_DH = nn.Parameter(torch.empty(d_model, h))
        self.w_out_FD = nn.Parameter(torch.empty(d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_ffn_(self.w_in_DH, self.w_out_FD)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> [..., D]``."""
        return dense_ffn(x, self.w_in_DH, self.w_out_FD, self.activation)


# --------------------------------------------------------------------------------------------
# grouped matmul with a fallback
# --------------------------------------------------------------------------------------------


def _gmm_ok(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can run on these operands.

    CPU kernels in torch 2.13 take fp32/bf16 and need every non-unit stride and the base
    pointer 16-byte aligned; CUDA needs bf16 on SM80+. Anything else takes the loop fallback.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    if a.device.type != "cpu":
        return False
    es = a.element_size()
    for t in (a, b):
        if t.data_ptr() % 16:
            return False
        if any(st != 1 and (st * es) % 16 for st in t.stride()):
            return False
    return True


def _gmm_loop(a_SK: Tensor, b_EKN: Tensor, counts: list[int]) -> Tensor:
    out_SN = a_SK.new_empty(a_SK.shape[0], b_EKN.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_SK[start : start + n], b_EKN[e], out=out_SN[start : start + n])
        start += n
    return out_SN


def _gmm_loop_wgrad(a_SK: Tensor, g_SN: Tensor, counts: list[int], E: int) -> Tensor:
    """``Σ_{rows of group e} a^T g`` per group: ``[E, K, N]``; zero for empty groups."""
    out_EKN = a_SK.new_zeros(E, a_SK.shape[1], g_SN.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a_SK[start : start + n].t(), g_SN[start : start + n], out=out_EKN[e])
        start += n
    return out_EKN


def _mm_grouped(a_SK: Tensor, b_EKN: Tensor, offs_E: Tensor, counts_E: Tensor) -> Tensor:
    """Raw (no autograd) grouped matmul ``[S, K] × [E, K, N] -> [S, N]``."""
    if a_SK.shape[0] == 0:
        return a_SK.new_zeros(0, b_EKN.shape[-1])
    if _gmm_ok(a_SK, b_EKN):
        return F.grouped_mm(a_SK, b_EKN, offs=offs_E)
    return _gmm_loop(a_SK, b_EKN, counts_E.tolist())


def _mm_grouped_wgrad(a_SK: Tensor, g_SN: Tensor, offs_E: Tensor, counts_E: Tensor) -> Tensor:
    """Raw per-group ``a_e^T g_e``: ``[S, K], [S, N] -> [E, K, N]``, zero for empty groups."""
    E = counts_E.shape[0]
    aT_KS = a_SK.t()
    if a_SK.shape[0] > 0 and _gmm_ok(aT_KS, g_SN):
        out_EKN = F.grouped_mm(aT_KS, g_SN, offs=offs_E)
        empty_E = counts_E == 0
        if bool(empty_E.any()):  # the CPU kernel zero-fills them, but that is not documented
            out_EKN[empty_E] = 0
        return out_EKN
    return _gmm_loop_wgrad(a_SK, g_SN, counts_E.tolist(), E)


def gmm(a_SK: Tensor, b_EKN: Tensor, counts_E: Tensor, offs_E: Tensor | None = None) -> Tensor:
    """Grouped matmul: rows ``offs[e-1]:offs[e]`` of ``a`` times ``b[e]``. ``[S,K]×[E,K,N] -> [S,N]``.

    ``counts_E`` are the per-group row counts (long or int), ``offs_E`` their int32 cumulative
    sum (computed when not given). Uses ``torch.nn.functional.grouped_mm`` when the operands
    suit its kernel, else a loop of ``torch.mm`` over groups. Differentiable in ``a`` and ``b``
    (the incoming gradient is made contiguous: the CPU kernel rejects zero strides).
    """
    if offs_E is None:
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return _GroupedMM.apply(a_SK, b_EKN, offs_E, counts_E)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_SK: Tensor, b_EKN: Tensor, offs_E: Tensor, counts_E: Tensor) -> Tensor:
        ctx.save_for_backward(a_SK, b_EKN, offs_E, counts_E)
        return _mm_grouped(a_SK, b_EKN, offs_E, counts_E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_SN: Tensor):
        a_SK, b_EKN, offs_E, counts_E = ctx.saved_tensors
        g_SN = g_SN.contiguous()
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _mm_grouped(g_SN, b_EKN.transpose(1, 2), offs_E, counts_E)
        if ctx.needs_input_grad[1]:
            gb = _mm_grouped_wgrad(a_SK, g_SN, offs_E, counts_E)
        return ga, gb, None, None


def _act_fwd(h_SH: Tensor, activation: str) -> Tensor:
    """``ffn_act`` into a fresh buffer with no other temporaries (SwiGLU: silu in place × up)."""
    if activation == "gelu":
        return F.gelu(h_SH)
    g_SF, u_SF = h_SH.chunk(2, dim=-1)
    return F.silu(g_SF).mul_(u_SF)


class _RoutedFFN(torch.autograd.Function):
    """Gather → grouped FFN → weight → scatter-add, as one autograd node.

    Why one node: autograd would otherwise keep the gathered input ``x_SD``, both activation
    halves, the activation output and the expert outputs ``y_SD`` alive until backward — about
    3× the activation memory of the dense FFN with the same FLOPs — and would add a ``cat`` and
    several elementwise passes. Here only ``h_SH`` is kept; the gather is redone in backward
    (cheap next to the GEMMs) and the activation recomputed from ``h``. Every large temporary
    is updated in place where the math allows, because on CPU each fresh large buffer costs
    page faults. The routing weight multiplies the activation (``[S, F]``) before the down
    projection rather than the output, so its gradient needs no saved output:
    ``∂L/∂w_s = ⟨act(h_s), ∂L/∂(w_s·act(h_s))⟩``.
    """

    @staticmethod
    def forward(ctx, x_TD, w_S, w_in_EDH, w_out_EFD, tok_S, counts_E, offs_E, activation, T):
        x_SD = x_TD if tok_S is None else x_TD.index_select(0, tok_S)
        h_SH = _mm_grouped(x_SD, w_in_EDH, offs_E, counts_E)
        del x_SD
        a_SF = _act_fwd(h_SH, activation)
        if w_S is not None:
            a_SF.mul_(w_S[:, None].to(a_SF.dtype))
        y_SD = _mm_grouped(a_SF, w_out_EFD, offs_E, counts_E)
        del a_SF
        ctx.activation = activation
        # an intermediate, so kept on ctx (not save_for_backward) and freed mid-backward
        ctx.h_SH = h_SH
        ctx.save_for_backward(x_TD, w_S, w_in_EDH, w_out_EFD, tok_S, counts_E, offs_E)
        if tok_S is None:
            return y_SD
        acc = torch.float32 if y_SD.dtype in (torch.bfloat16, torch.float16) else y_SD.dtype
        # low-precision outputs are summed over the k experts in fp32
        out_TD = torch.zeros(T, y_SD.shape[1], dtype=acc, device=y_SD.device)
        out_TD.index_add_(0, tok_S, y_SD if acc == y_SD.dtype else y_SD.to(acc))
        return out_TD.to(y_SD.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x_TD, w_S, w_in_EDH, w_out_EFD, tok_S, counts_E, offs_E = ctx.saved_tensors
        h_SH, act = ctx.h_SH, ctx.activation
        del ctx.h_SH
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        gout = gout.contiguous()
        gy_SD = gout if tok_S is None else gout.index_select(0, tok_S)
        # ga = ∂L/∂(weighted activation)
        ga_SF = _mm_grouped(gy_SD, w_out_EFD.transpose(1, 2), offs_E, counts_E)
        if act == "swiglu":
            g_SF, u_SF = h_SH.chunk(2, dim=-1)
            s_SF = F.silu(g_SF)  # reused by the up-half gradient below
            a_SF = s_SF * u_SF
        else:
            a_SF = F.gelu(h_SH)
        g_wS = None
        if w_S is not None:
            w_S1 = w_S[:, None].to(a_SF.dtype)
            if need_w:
                g_wS = torch.linalg.vecdot(a_SF, ga_SF).to(w_S.dtype)
            a_SF.mul_(w_S1)  # now the weighted activation that fed the down projection
            ga_SF.mul_(w_S1)  # now ∂L/∂act
        g_out = _mm_grouped_wgrad(a_SF, gy_SD, offs_E, counts_E) if need_out else None
        del a_SF, gy_SD
        if act == "swiglu":
            gh_SH = torch.empty_like(h_SH)
            Fh = g_SF.shape[-1]
            gg_SF, gu_SF = gh_SH[:, :Fh], gh_SH[:, Fh:]
            torch.mul(ga_SF, s_SF, out=gu_SF)
            del s_SF
            torch.mul(ga_SF, u_SF, out=gg_SF)
            torch.ops.aten.silu_backward(gg_SF, g_SF, grad_input=gg_SF)
            del g_SF, u_SF
        else:
            gh_SH = torch.ops.aten.gelu_backward(ga_SF, h_SH)
        del h_SH, ga_SF
        g_in = g_x = None
        if need_in:
            x_SD = x_TD if tok_S is None else x_TD.index_select(0, tok_S)
            g_in = _mm_grouped_wgrad(x_SD, gh_SH, offs_E, counts_E)
            del x_SD
        if need_x:
            gx_SD = _mm_grouped(gh_SH, w_in_EDH.transpose(1, 2), offs_E, counts_E)
            del gh_SH
            if tok_S is None:
                g_x = gx_SD
            else:
                g_x = torch.zeros_like(x_TD).index_add_(0, tok_S, gx_SD)
        return g_x, g_wS, g_in, g_out, None, None, None, None, None


def grouped_ffn(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str = "swiglu",
) -> Tensor:
    """Run expert e's FFN on its contiguous block of tokens: ``[S, D] -> [S, D]``.

    ``x_SD`` must already be sorted by expert, with ``counts_E[e]`` rows for expert e (so
    ``S == counts_E.sum()``). No routing weights are applied. This is the building block for
    expert parallelism: after an all_to_all, a rank sorts its received tokens by local expert
    and calls this with its local slice of the weights. Differentiable in all tensors.
    """
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return _RoutedFFN.apply(
        x_SD, None, w_in_EDH, w_out_EFD, None, counts_E, offs_E, activation, x_SD.shape[0]
    )


# --------------------------------------------------------------------------------------------
# the three execution paths
# --------------------------------------------------------------------------------------------


def reference_experts(
    x_TD: Tensor,
    indices_TK: Tensor,
    weights_TK: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str = "swiglu",
) -> Tensor:
    """The obviously-right loop over experts: ``y[t] = Σ_k w[t,k]·FFN_{idx[t,k]}(x[t])``.

    Slots with index -1 never match an expert and so contribute nothing.
    """
    y_TD = torch.zeros_like(x_TD)
    for e in range(w_in_EDH.shape[0]):
        tok, slot = torch.where(indices_TK == e)
        if tok.numel() == 0:
            continue
        y_ND = dense_ffn(x_TD[tok], w_in_EDH[e], w_out_EFD[e], activation)
        y_TD = y_TD.index_add(0, tok, y_ND * weights_TK[tok, slot, None].to(y_ND.dtype))
    return y_TD


def sort_by_expert(indices_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order the kept assignments by expert.

    Returns ``(order_S, counts_E, n_kept)`` where ``order_S`` indexes the flattened ``[T·K]``
    slots (token = ``order // K``), grouped by expert in increasing order and, inside an
    expert, in increasing slot order (stable), and slots with index -1 are left out.
    """
    flat_A = indices_TK.reshape(-1)
    # -1 (dropped) sorts last when mapped to E; a stable sort keeps token order within experts
    key_A = torch.where(flat_A < 0, num_experts, flat_A)
    order_A = torch.argsort(key_A, stable=True)
    counts_E = torch.bincount(key_A, minlength=num_experts + 1)[:num_experts]
    n_kept = flat_A.numel() if not bool((flat_A < 0).any()) else int(counts_E.sum())
    return order_A[:n_kept], counts_E, n_kept


def grouped_experts(
    x_TD: Tensor,
    indices_TK: Tensor,
    weights_TK: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str = "swiglu",
) -> Tensor:
    """Dropless fast path: sort assignments by expert, one grouped matmul per projection.

    Same contract as ``reference_experts``; no Python loop over experts (unless
    ``grouped_mm`` cannot run and the loop fallback takes over). Gather, FFN, weighting and
    scatter-add form one autograd node (``_RoutedFFN``) to keep activation memory near the
    dense FFN's.
    """
    T, K = indices_TK.shape
    E = w_in_EDH.shape[0]
    order_S, counts_E, _ = sort_by_expert(indices_TK, E)
    tok_S = order_S // K
    w_S = weights_TK.reshape(-1).index_select(0, order_S)
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return _RoutedFFN.apply(x_TD, w_S, w_in_EDH, w_out_EFD, tok_S, counts_E, offs_E, activation, T)


def capacity_of(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard/Switch capacity ``C = ceil(capacity_factor · T · K / E)``, at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_experts(
    x_TD: Tensor,
    indices_TK: Tensor,
    weights_TK: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str = "swiglu",
    capacity: int | None = None,
) -> Tensor:
    """Capacity path (GShard/Switch): every expert gets a fixed ``[C, D]`` slot buffer.

    Static-shape by construction (what compilers and fixed-size all_to_all want): the expert
    FFNs run over ``E·C`` rows whatever the routing, empty slots holding a zero token with
    weight 0. Expects the routing to have been passed through ``routing.apply_capacity`` with
    the same ``capacity``; if an expert still holds more than C assignments, the extra ones
    (in slot order) are dropped here too. ``capacity=None`` uses the largest expert load.
    """
    T, K = indices_TK.shape
    E, D = w_in_EDH.shape[0], x_TD.shape[-1]
    order_S, counts_E, _ = sort_by_expert(indices_TK, E)
    e_S = indices_TK.reshape(-1).index_select(0, order_S)
    C = max(1, int(counts_E.max()) if capacity is None else capacity)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_S = torch.arange(order_S.numel(), device=x_TD.device) - starts_E.index_select(0, e_S)
    keep_S = pos_S < C
    order_S, e_S, pos_S = order_S[keep_S], e_S[keep_S], pos_S[keep_S]
    slot_S = e_S * C + pos_S
    # slot → token; empty slots point at an extra all-zero row T
    tok_X = torch.full((E * C,), T, dtype=torch.long, device=x_TD.device)
    tok_X[slot_S] = order_S // K
    w_X = weights_TK.new_zeros(E * C).index_put((slot_S,), weights_TK.reshape(-1)[order_S])
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])
    counts_C = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
    offs_E = torch.cumsum(counts_C, 0, dtype=torch.int32)
    out = _RoutedFFN.apply(
        x_pad, w_X, w_in_EDH, w_out_EFD, tok_X, counts_C, offs_E, activation, T + 1
    )
    return out[:T]


class Experts(nn.Module):
    """E routed expert FFNs stored stacked: ``w_in_EDH [E, D, H]``, ``w_out_EFD [E, F, D]``.

    ``forward(x_TD, indices_TK, weights_TK, impl=...)`` is the whole routed-expert
    computation (no router): it is what expert-parallel code replaces by
    dispatch → ``grouped_ffn`` on local experts → combine.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        h = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, h))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_ffn_(self.w_in_EDH, self.w_out_EFD)

    def forward(
        self,
        x_TD: Tensor,
        indices_TK: Tensor,
        weights_TK: Tensor,
        impl: str = "grouped",
        capacity: int | None = None,
    ) -> Tensor:
        """``y_TD = Σ_k weights_TK[:, k] · FFN_{indices_TK[:, k]}(x_TD)``; -1 slots skipped.

        ``impl``: ``"reference"`` (loop over experts), ``"grouped"`` (sort + grouped matmul),
        ``"capacity"`` (fixed ``[C, D]`` slot buffer per expert, ``capacity`` C, static shapes).
        """
        args = (x_TD, indices_TK, weights_TK, self.w_in_EDH, self.w_out_EFD, self.activation)
        if impl == "reference":
            return reference_experts(*args)
        if impl == "grouped":
            return grouped_experts(*args)
        if impl == "capacity":
            return capacity_experts(*args, capacity=capacity)
        raise ValueError(f"impl: unknown {impl!r}")
