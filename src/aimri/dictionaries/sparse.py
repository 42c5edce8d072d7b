"""TopK encode + decode with a sparse backward: the CPU cost of training a TopK dictionary.

Forward: pre = x_c @ W_enc + b_enc (dense: the top-k needs every pre-activation), top-k, then a decoder
that gathers only the k active rows of W_dec per token (embedding_bag). Backward: every gradient goes
through the k active latents only, k x d per token, where dense autograd would spend d_in x d_sae per
token on each of three products (~150x more at k = 32, d_sae = 4608). The two weight gradients are one
sparse [d_sae, batch] x dense [batch, d] product each, with the sparsity pattern (sorted by latent) built
once per step.

Width: the pre-activations are computed a block of rows at a time into a workspace of at most
WORKSPACE_ELEMENTS floats, so a batch of 4,096 rows over 1M latents needs 256 MB here, not 16 GB.

Devices: every tensor is made on the input's device. The two weight gradients (a sum over tokens of
code x row per latent) take the kernel that suits the device: a CSR sparse x dense product on the CPU
(MKL's, cache-friendly), and on CUDA an `index_add_` of the k scaled rows per token into the gradient (one
atomic scatter, no sort of the pattern; the way sparsify's and the circuit-tracer's PyTorch fallbacks do
it). `kernel_for(device)` chooses; both give the same gradients to float rounding (tested on the CPU).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

WORKSPACE_ELEMENTS = 1 << 26  # pre-activations held at once (256 MB at fp32)
KERNELS = ("csr", "index_add")
FORCE_KERNEL: str | None = None  # tests set this to run the other device's kernel on the CPU


def kernel_for(device: torch.device) -> str:
    """The weight-gradient kernel for `device`: "csr" on the CPU, "index_add" elsewhere (or FORCE_KERNEL)."""
    return FORCE_KERNEL or ("csr" if device.type == "cpu" else "index_add")


def workspace_rows(batch: int, d_sae: int) -> int:
    """Rows per block of the encoder GEMM: the whole batch unless that exceeds WORKSPACE_ELEMENTS."""
    return max(1, min(batch, WORKSPACE_ELEMENTS // d_sae))


class LatentIndex:
    """The batch's (token, latent) pairs grouped by latent: a CSR pattern of the [d_sae, batch] code matrix
    ("csr" kernel), or the pairs as they are ("index_add" kernel, see kernel_for)."""

    def __init__(self, idx: Tensor, d_sae: int) -> None:
        self.kernel = kernel_for(idx.device)
        self.idx, self.d_sae = idx, d_sae
        self.shape = (d_sae, idx.shape[0])
        if self.kernel == "index_add":
            return
        flat = idx.reshape(-1)
        self.order = torch.argsort(flat)
        self.tokens = torch.div(self.order, idx.shape[1], rounding_mode="floor")
        self.crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=self.crow[1:])

    def matmul(self, values: Tensor, dense: Tensor, into: Tensor | None = None) -> Tensor:
        """sum over tokens of values[token, j] * dense[token], per latent: [d_sae, d]; added in place to
        `into` when given (no fresh [d_sae, d] result: 8x faster than allocating one at 16k latents)."""
        if self.kernel == "index_add":
            out = into if into is not None else dense.new_zeros(self.d_sae, dense.shape[1])
            k = self.idx.shape[1]
            rows = max(1, WORKSPACE_ELEMENTS // max(1, k * dense.shape[1]))  # bounded [rows * k, d] temporary
            for start in range(0, dense.shape[0], rows):
                block = slice(start, start + rows)
                scaled = values[block].reshape(-1, 1) * dense[block].repeat_interleave(k, dim=0)
                out.index_add_(0, self.idx[block].reshape(-1), scaled.to(out.dtype))
            return out
        with warnings.catch_warnings():  # "CSR support is in beta": the product used here is well covered
            warnings.simplefilter("ignore")
            codes_t = torch.sparse_csr_tensor(
                self.crow, self.tokens, values.reshape(-1)[self.order], self.shape, check_invariants=False
            )
            return codes_t @ dense if into is None else into.addmm_(codes_t, dense)


def _row_dots(idx: Tensor, rows: Tensor, other: Tensor) -> Tensor:
    """[batch, k]: dot(rows[idx[b, j]], other[b]) without materialising the gathered rows: embedding_bag's
    per-sample-weight gradient is exactly this product, in one fused kernel."""
    with torch.enable_grad():
        w = torch.ones(idx.shape, dtype=rows.dtype, device=idx.device, requires_grad=True)
        out = F.embedding_bag(idx, rows.detach(), per_sample_weights=w, mode="sum")
        (dots,) = torch.autograd.grad(out, w, other)
    return dots


class TopKAutoencode(torch.autograd.Function):
    """recon = decode(topk(encode(x))); returns (recon, vals, idx, pre).

    W_enc is best stored as the transpose of a contiguous [d_sae, d_in] tensor (Dictionary does): the
    forward GEMM is faster that way and the backward's per-latent rows need no copy."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, centre: bool,
                workspace: Tensor | None, grad_buffers: tuple[Tensor, Tensor] | None,
                candidates: Tensor | None):  # type: ignore[override]  # fmt: skip
        ctx.set_materialize_grads(False)  # no zero-filled [batch, d_sae] gradients for `pre`
        ctx.grad_buffers = grad_buffers
        xc = x - b_dec if centre else x
        # choose among `candidates` only (AuxK's dead latents): their encoder columns, gathered once
        enc, bias = (W_enc, b_enc) if candidates is None else (W_enc[:, candidates], b_enc[candidates])
        width = enc.shape[1]
        rows = workspace.shape[0] if workspace is not None else workspace_rows(x.shape[0], width)
        if workspace is None:
            workspace = torch.empty(rows, width, dtype=x.dtype, device=x.device)
        elif width != workspace.shape[1]:  # fewer columns: the same memory, viewed narrower
            workspace = workspace.view(-1)[: rows * width].view(rows, width)
        vals = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        idx = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
        low = workspace.dtype
        enc_low, b_low = (enc, bias) if low == x.dtype else (enc.to(low), bias.to(low))
        pre = workspace
        for start in range(0, x.shape[0], rows):  # one block of rows at a time: bounded memory at any width
            block = xc[start : start + rows]
            pre = workspace[: len(block)]
            torch.addmm(b_low, block.to(low), enc_low, out=pre)  # a reused buffer: no fresh pages to fault in
            top = pre.topk(k, dim=-1, sorted=False)
            idx[start : start + rows] = top.indices
            if low == x.dtype:
                vals[start : start + rows] = top.values
        if candidates is not None:
            idx = candidates[idx]
        if low != x.dtype:  # chosen at low precision: their values computed exactly
            vals = _row_dots(idx, W_enc.t(), xc) + b_enc[idx]
        vals = vals.relu()
        recon = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
        ctx.save_for_backward(xc, W_enc, W_dec, vals, idx)
        ctx.centre = centre
        ctx.mark_non_differentiable(vals, idx, pre)
        return recon, vals, idx, pre

    @staticmethod
    def backward(ctx, grad_recon: Tensor | None, *_unused: Tensor):  # type: ignore[override]
        xc, W_enc, W_dec, vals, idx = ctx.saved_tensors
        if grad_recon is None:
            return (None,) * 10
        grad_recon = grad_recon.contiguous()
        grad_pre_vals = _row_dots(idx, W_dec, grad_recon) * (vals > 0)
        pattern = LatentIndex(idx, W_dec.shape[0])
        if ctx.grad_buffers is not None:  # added in place into the caller's [d_sae, d] buffers
            enc_buf, dec_buf = ctx.grad_buffers
            pattern.matmul(vals, grad_recon, into=dec_buf)
            pattern.matmul(grad_pre_vals, xc, into=enc_buf)
            grad_W_dec = grad_enc = None
        else:
            grad_W_dec = pattern.matmul(vals, grad_recon) if ctx.needs_input_grad[3] else None
            grad_enc = pattern.matmul(grad_pre_vals, xc).t()
        grad_b_enc = torch.zeros(W_dec.shape[0], dtype=vals.dtype, device=vals.device).index_add_(
            0, idx.reshape(-1), grad_pre_vals.reshape(-1)
        )
        grad_b_dec = grad_recon.sum(0)
        if ctx.centre:  # xc = x - b_dec: the encoder's input gradient, summed over tokens, is W_enc @ grad_b_enc
            grad_b_dec = grad_b_dec - W_enc @ grad_b_enc
        grad_x = None
        if ctx.needs_input_grad[0]:
            enc_t = W_enc.t().contiguous()  # free when W_enc is stored latent-major
            grad_x = F.embedding_bag(idx, enc_t, per_sample_weights=grad_pre_vals, mode="sum")
        return grad_x, grad_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None, None, None, None


def topk_autoencode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, centre: bool = True,
    workspace: Tensor | None = None, grad_buffers: tuple[Tensor, Tensor] | None = None,
    candidates: Tensor | None = None,
):  # fmt: skip
    """`workspace`: a [rows, d_sae] buffer the pre-activations are written into, `rows` at a time (default:
    `workspace_rows`), reused across steps by a trainer; the returned `pre` is its last block — the whole
    batch's pre-activations only when rows >= batch (and overwritten by the next call). A bfloat16
    workspace selects the top k from a bfloat16 GEMM (2.5x faster than fp32 on CPUs with AVX512-BF16 or
    AMX) and recomputes the chosen k values exactly in fp32, so codes, reconstruction and gradients are
    exact for the chosen latents; only near-ties at the k-th place can differ from the fp32 choice.

    `grad_buffers` (W_enc's gradient latent-major [d_sae, d_in], W_dec's [d_sae, d]): the two weight
    gradients are added into these instead of returned, so a trainer holds one copy of each however many
    passes feed them (the main loss and AuxK) — at 1M latents each fresh copy would be 2.4 GB.

    `candidates`: latent indices the top k is chosen among (AuxK's dead latents); codes keep global indices."""
    return TopKAutoencode.apply(x, W_enc, b_enc, W_dec, b_dec, k, centre, workspace, grad_buffers, candidates)
