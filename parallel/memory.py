"""Per-rank memory and step-time estimates for a tp/pp/dp/ZeRO layout, and a search over layouts.

Plain numbers in, plain numbers out: this module never imports `pretrain` (DESIGN.md); the glue from a
model config lives in `pretrain/planning.py`.

Model states (Rajbhandari et al. 2019, "ZeRO", §5): with p, g, k bytes per parameter for parameters,
gradients and optimizer states (mixed-precision Adam: 2, 2, 12 → 16 bytes; fp32 Adam: 4, 4, 8) and Ψ
parameters on a rank's stage, a rank holds
    stage 0: (p + g + k)·Ψ     stage 1: (p + g)·Ψ + k·Ψ/dp
    stage 2: p·Ψ + (g + k)·Ψ/dp  stage 3: (p + g + k)·Ψ/dp
Optimizer offload (ZeRO-Offload, Ren et al. 2021; `parallel.offload_optimizer=cpu`) moves the k·Ψ/dp
optimizer partition to host memory together with the gradient partition: DeepSpeed 0.19.8 keeps on the
host, per rank, the k·Ψ/dp states, an fp32 copy of the gradient partition (4·Ψ/dp) and a p·Ψ/dp buffer
that carries the updated parameters back (stages 1-2; at stage 3 the g·Ψ/dp gradient partition buffer
itself sits on the host instead), so host = (k + 4 + p)·Ψ/dp (p = g in every precision here). The device
then keeps no gradient between steps at stages 2-3 (only the reduce buckets); at stage 1 the full
gradient is still accumulated on the device before it is reduced. Parameter offload (ZeRO-Infinity,
stage 3, `parallel.offload_param=cpu`) moves the p·Ψ/dp parameter partition to the host as well.
(Measured: tests/distributed/test_memory_measured.py.)

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", §4, 16-bit activations with
dropout, s sequence, b micro batch, h hidden, a heads, t = tp), bytes per layer (fp32 training and
dropout-free models scale these: see activation_bytes_per_layer):
    no recompute:        s·b·h·(10 + 24/t + 5·a·s/(h·t))       with SP: s·b·h/t·(34 + 5·a·s/h)
    selective recompute: s·b·h·(10 + 24/t)                      with SP: 34·s·b·h/t
    full recompute:      2·s·b·h                               with SP: 2·s·b·h/t
Full recompute also needs one layer's un-recomputed activations while that layer is recomputed (added
as `recompute_working`). The last stage keeps the output layer's 4·s·b·h/t·(1 + v/h) (final norm,
logits, cross-entropy; §4.3: the norm's and the head's 16-bit inputs, 2·2·s·b·h, and the fp32 logits;
fp32 training keeps those inputs at 4 bytes). With the LM head fused into the loss (`loss_chunk_size`
c > 0, tp = 1), the s·b·v fp32 logits give way to one chunk's, 4·c·v (plus the 16-bit product they are
rounded from, 2·c·v), and to the gradients the fused loss forms in its forward and keeps for the
backward: dhidden (s·b·h values, in place of the head's input, which it does not keep) and dweight in
fp32 (4·v·h, plus a 16-bit product buffer, 2·v·h, while the loss runs). With 1F1B pipelining the first stage holds min(pp, m) micro-batches in
flight (§4.2.3: p micro-batches); without pipelining, one.

Step time is a coarse model for ranking layouts, not a prediction: compute at `efficiency`·peak, the
pipeline bubble (p − 1)/m (Narayanan et al. 2021), ring collectives moving 2(n−1)/n of a buffer
(tensor-parallel all-reduces: 4 per layer per micro-batch, 6 with full recompute; data-parallel gradient
reduction; ZeRO-3 parameter gathers), pipeline point-to-point sends and offload PCIe traffic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

GB = 1e9
Recompute = Literal["none", "selective", "full"]
Precision = Literal["bf16", "fp16", "fp32"]

# Bytes per parameter for (parameters, gradients, optimizer states) with Adam (ZeRO paper, §3.1).
STATE_BYTES: dict[str, tuple[int, int, int]] = {
    "bf16": (2, 2, 12),  # 16-bit params and grads; fp32 master copy, momentum, variance
    "fp16": (2, 2, 12),
    "fp32": (4, 4, 8),  # fp32 params and grads; momentum, variance
}


class PlanError(ValueError):
    """A request the planner refuses, with the reason."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a decoder-only Transformer."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    seq_len: int
    params_per_layer: int  # one Transformer block (attention + MLP + its norms)
    embedding_params: int  # token (+ learned position) embeddings, first stage
    head_params: int = 0  # an untied LM head (0 when tied), last stage
    final_norm_params: int = 0  # last stage
    dropout: bool = True  # dropout on: masks (and attention-dropout outputs) are kept for the backward

    @property
    def total_params(self) -> int:
        return (
            self.num_layers * self.params_per_layer
            + self.embedding_params
            + self.head_params
            + self.final_norm_params
        )

    @property
    def non_embedding_params(self) -> int:
        """The N of the FLOP convention (docs/mfu.md): blocks, final norm and the LM-head matmul."""
        return (
            self.num_layers * self.params_per_layer
            + self.final_norm_params
            + self.hidden_size * self.vocab_size
        )

    def model_flops_per_token(self) -> float:
        """6·N + 12·L·H·d·T (PaLM appendix B; attention not halved for causal)."""
        return 6.0 * self.non_embedding_params + 12.0 * self.num_layers * self.hidden_size * self.seq_len

    def hardware_flops_per_token(self, recompute: Recompute) -> float:
        """Model FLOPs plus the recomputed forward work (HFU counts it, MFU does not)."""
        attn_fwd = 4.0 * self.num_layers * self.hidden_size * self.seq_len  # scores + values, forward
        if recompute == "full":
            extra = 2.0 * self.num_layers * self.params_per_layer + attn_fwd
        elif recompute == "selective":
            extra = attn_fwd
        else:
            extra = 0.0
        return self.model_flops_per_token() + extra


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 1
    num_micro_batches: int = 1  # per step per data-parallel rank (gradient accumulation / pipeline m)
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    offload_optimizer: bool = False
    offload_params: bool = False
    loss_chunk_size: int = 0  # > 0: the LM head fused into the loss, this many tokens a chunk (tp = 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        extras = ["sp" if self.sequence_parallel else "", f"recompute={self.recompute}"]
        if self.loss_chunk_size:
            extras.append(f"loss-chunk={self.loss_chunk_size}")
        if self.offload_optimizer:
            extras.append("offload-opt")
        if self.offload_params:
            extras.append("offload-param")
        return (
            f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage} mbs={self.micro_batch_size} "
            f"m={self.num_micro_batches} " + " ".join(e for e in extras if e)
        )


@dataclass(frozen=True)
class Hardware:
    """A GPU type and its network; defaults are an A100-80GB DGX node (bf16 peak 312 TFLOP/s)."""

    gpu_memory_gb: float = 80.0
    peak_tflops: float = 312.0
    gpus_per_node: int = 8
    intra_node_gbps: float = 150.0  # GB/s a ring collective sustains inside a node (NVLink)
    inter_node_gbps: float = 25.0  # GB/s per GPU between nodes (200 Gb/s InfiniBand per GPU)
    pcie_gbps: float = 20.0  # GB/s host<->device for offload
    efficiency: float = 0.5  # fraction of peak the matmuls reach
    reserve: float = 0.1  # fraction of memory kept free (CUDA context, allocator, comm buffers)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GB * (1.0 - self.reserve)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank (first or last pipeline stage, whichever is larger)."""

    stage: str
    params: float
    grads: float
    optimizer: float
    activations: float
    recompute_working: float
    output_layer: float
    host: float  # offloaded to CPU memory

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.recompute_working + self.output_layer

    def breakdown(self) -> dict[str, float]:
        return {
            "params_gb": self.params / GB,
            "grads_gb": self.grads / GB,
            "optimizer_gb": self.optimizer / GB,
            "activations_gb": (self.activations + self.recompute_working + self.output_layer) / GB,
            "total_gb": self.total / GB,
            "host_gb": self.host / GB,
        }


def model_state_bytes(
    num_params: float,
    *,
    zero_stage: int,
    dp: int,
    precision: Precision = "bf16",
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> tuple[float, float, float, float]:
    """(params, grads, optimizer, host) bytes per rank for Ψ = num_params (ZeRO paper, §5)."""
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage={zero_stage}: must be 0, 1, 2 or 3")
    if dp < 1:
        raise PlanError(f"dp={dp}: must be >= 1")
    p, g, k = STATE_BYTES[precision]
    if precision == "fp32" and zero_stage >= 1:
        # DeepSpeed's ZeRO optimizers keep an fp32 partition of the parameters even when they are fp32
        # already: 4 more bytes per parameter, sharded (measured: tests/distributed/test_memory_measured.py).
        k += 4
    psi = float(num_params)
    params = psi * p / dp if zero_stage == 3 else psi * p
    grads = psi * g / dp if zero_stage >= 2 else psi * g
    optim = psi * k / dp if zero_stage >= 1 else psi * k
    host = 0.0
    if offload_optimizer:
        if zero_stage == 0:
            raise PlanError("offload_optimizer with zero_stage=0: DeepSpeed offloads only with ZeRO >= 1")
        # The optimizer partition, an fp32 copy of the gradient partition and a p-byte parameter (stages
        # 1-2) or g-byte gradient (stage 3) partition buffer: see the module docstring.
        host += optim + psi * (4 + (p if zero_stage < 3 else g)) / dp
        optim = 0.0
        if zero_stage >= 2:
            grads = 0.0
    if offload_params:
        if zero_stage != 3:
            raise PlanError(f"offload_params with zero_stage={zero_stage}: parameter offload needs ZeRO-3")
        host += params
        params = 0.0
    return params, grads, optim, host


def activation_bytes_per_layer(
    *,
    seq_len: int,
    micro_batch_size: int,
    hidden_size: int,
    num_heads: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Recompute = "none",
    bytes_per_value: int = 2,
    dropout: bool = True,
) -> float:
    """Korthikanti et al. 2022, table 2 (bytes, one micro-batch, one layer), generalized to the activation
    width and to dropout being off.

    The paper's 34·s·b·h with 16-bit activations is 16·s·b·h saved values of 2 bytes (4 outside the
    tensor-parallel region: two norm inputs, the attention and MLP inputs; 12 inside: Q, K, V, the
    projection input, the GELU input and the fc2 input) plus two 1-byte residual-dropout masks; its
    5·a·s/h per s·b·h is per score element the softmax output (2), the attention-dropout mask (1) and
    its output (2). Here a value takes `bytes_per_value` bytes (4 for fp32 training) and, with
    `dropout=False`, no mask or dropout output is kept: the scores keep only the softmax output.
    bytes_per_value=2 and dropout=True give the paper's formulas exactly."""
    s, b, h, a, t = seq_len, micro_batch_size, hidden_size, num_heads, tp
    sbh = float(s) * b * h
    v = float(bytes_per_value)
    if recompute == "full":  # only each layer's input
        return v * sbh / t if sequence_parallel else v * sbh
    masks = 2.0 if dropout else 0.0
    per_score = v + (1.0 + v if dropout else 0.0)
    scores = 0.0 if recompute == "selective" else per_score * a * s / h
    if sequence_parallel:
        return sbh / t * (16.0 * v + masks + scores)
    return sbh * (4.0 * v + masks + 12.0 * v / t + scores / t)


def estimate_memory(shape: ModelShape, layout: Layout, *, precision: Precision = "bf16") -> MemoryEstimate:
    """Per-rank bytes of the busiest pipeline stage (see the module docstring for the formulas)."""
    t, p = layout.tp, layout.pp
    if shape.num_layers % p:
        raise PlanError(f"pp={p} does not divide num_layers={shape.num_layers}")
    layers = shape.num_layers // p
    block_params = layers * shape.params_per_layer / t
    # Tied embeddings with pp > 1: the last stage keeps its own copy of the (vocab-split) embedding.
    tied_copy = shape.embedding_params if shape.head_params == 0 and p > 1 else 0
    stage_params = {
        "first": block_params
        + shape.embedding_params / t
        + (0 if p > 1 else (shape.head_params + shape.final_norm_params) / t),
        "last": block_params + (shape.head_params + tied_copy + shape.final_norm_params) / t,
    }
    value_bytes = 4 if precision == "fp32" else 2  # fp32 training keeps fp32 activations
    per_layer = activation_bytes_per_layer(
        seq_len=shape.seq_len,
        micro_batch_size=layout.micro_batch_size,
        hidden_size=shape.hidden_size,
        num_heads=shape.num_heads,
        tp=t,
        sequence_parallel=layout.sequence_parallel,
        recompute=layout.recompute,
        bytes_per_value=value_bytes,
        dropout=shape.dropout,
    )
    sbh = float(shape.seq_len) * layout.micro_batch_size * shape.hidden_size
    working = 0.0
    if layout.recompute == "full":
        working = activation_bytes_per_layer(
            seq_len=shape.seq_len,
            micro_batch_size=layout.micro_batch_size,
            hidden_size=shape.hidden_size,
            num_heads=shape.num_heads,
            tp=t,
            sequence_parallel=layout.sequence_parallel,
            recompute="none",
            bytes_per_value=value_bytes,
            dropout=shape.dropout,
        )
    if layout.loss_chunk_size > 0:
        if t > 1 or p > 1:
            raise PlanError(f"loss_chunk_size={layout.loss_chunk_size} needs tp=1 and pp=1 (tp={t}, pp={p})")
        chunk = min(layout.loss_chunk_size, shape.seq_len * layout.micro_batch_size)
        # An fp32 buffer and, with 16-bit operands, a 16-bit one of the same shape: for one chunk's logits
        # (the product they are rounded from) and for dweight (the buffer each chunk's product lands in).
        fp32_and_16bit = 4.0 + (value_bytes if value_bytes < 4 else 0)
        output = (
            2.0 * value_bytes * sbh  # the final norm's input, and dhidden in place of the head's input
            + fp32_and_16bit * chunk * shape.vocab_size
            + fp32_and_16bit * shape.vocab_size * shape.hidden_size
        )
    else:  # the final norm's and the head's inputs, and the fp32 logits
        output = (2.0 * value_bytes * sbh + 4.0 * sbh * shape.vocab_size / shape.hidden_size) / t
    in_flight = {"first": min(p, layout.num_micro_batches) if p > 1 else 1, "last": 1}
    best: MemoryEstimate | None = None
    for stage in ("first", "last") if p > 1 else ("first",):
        params, grads, optim, host = model_state_bytes(
            stage_params[stage],
            zero_stage=layout.zero_stage,
            dp=layout.dp,
            precision=precision,
            offload_optimizer=layout.offload_optimizer,
            offload_params=layout.offload_params,
        )
        est = MemoryEstimate(
            stage=stage,
            params=params,
            grads=grads,
            optimizer=optim,
            activations=per_layer * layers * in_flight[stage],
            recompute_working=working,
            output_layer=output if stage == "last" or p == 1 else 0.0,
            host=host,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    dp_comm_s: float
    pp_comm_s: float
    offload_s: float

    @property
    def total_s(self) -> float:
        return (
            self.compute_s + self.bubble_s + self.tp_comm_s + self.dp_comm_s + self.pp_comm_s + self.offload_s
        )


def estimate_step_time(
    shape: ModelShape, layout: Layout, hw: Hardware, *, precision: Precision = "bf16"
) -> StepTime:
    t, p, d, m, b = layout.tp, layout.pp, layout.dp, layout.num_micro_batches, layout.micro_batch_size
    s, h = shape.seq_len, shape.hidden_size
    tokens = float(d) * m * b * s
    compute = (
        tokens
        * shape.hardware_flops_per_token(layout.recompute)
        / (layout.world_size * hw.peak_tflops * 1e12 * hw.efficiency)
    )
    # Megatron TP: 2 all-reduces forward + 2 backward per layer (+2 when the forward is recomputed), each of
    # s·b·h 16-bit values; with SP the all-gather/reduce-scatter pairs move the same volume.
    per_gpu = hw.intra_node_gbps if t <= hw.gpus_per_node else hw.inter_node_gbps
    n_collectives = 6 if layout.recompute == "full" else 4
    tp_bytes = (shape.num_layers / p) * m * n_collectives * 2 * (t - 1) / t * 2.0 * s * b * h
    tp_comm = tp_bytes / (per_gpu * GB) if t > 1 else 0.0
    bubble = (compute + tp_comm) * (p - 1) / m
    # Rank order tp fastest, then dp: a dp group stays inside a node when tp·dp fits in one.
    dp_bw = hw.intra_node_gbps if t * d <= hw.gpus_per_node else hw.inter_node_gbps
    psi = (shape.num_layers / p * shape.params_per_layer + shape.embedding_params) / t
    grad_bytes = STATE_BYTES[precision][1] * psi
    ring = (d - 1) / d if d > 1 else 0.0
    if layout.zero_stage <= 1:
        dp_bytes = 2 * ring * grad_bytes  # one all-reduce per step
    elif layout.zero_stage == 2:
        dp_bytes = m * ring * grad_bytes  # a reduce-scatter per micro-batch
    else:
        dp_bytes = m * 3 * ring * grad_bytes  # reduce-scatter + forward and backward all-gathers
    dp_comm = dp_bytes / (dp_bw * GB)
    pp_comm = 2 * m * 2.0 * s * b * h / t / (hw.inter_node_gbps * GB) if p > 1 else 0.0
    offload = 0.0
    if layout.offload_optimizer:
        # gradients down and updated 16-bit parameters up, plus a CPU Adam at ~1e9 parameters/s.
        offload = 4.0 * psi / d / (hw.pcie_gbps * GB) + psi / d / 1e9
    return StepTime(compute, bubble, tp_comm, dp_comm, pp_comm, offload)


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "dp": lay.dp,
            "zero_stage": lay.zero_stage,
            "micro_batch_size": lay.micro_batch_size,
            "num_micro_batches": lay.num_micro_batches,
            "sequence_parallel": lay.sequence_parallel,
            "recompute": lay.recompute,
            "offload_optimizer": lay.offload_optimizer,
            "offload_params": lay.offload_params,
            "loss_chunk_size": lay.loss_chunk_size,
            "memory": self.memory.breakdown(),
            "step_s": self.time.total_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "fits": self.fits,
            "reasons": self.reasons,
        }


def evaluate_layout(
    shape: ModelShape, layout: Layout, hw: Hardware, *, precision: Precision = "bf16"
) -> Candidate:
    mem = estimate_memory(shape, layout, precision=precision)
    st = estimate_step_time(shape, layout, hw, precision=precision)
    tokens = layout.dp * layout.num_micro_batches * layout.micro_batch_size * shape.seq_len
    tps = tokens / st.total_s
    mfu = tps * shape.model_flops_per_token() / (layout.world_size * hw.peak_tflops * 1e12)
    fits = mem.total <= hw.usable_bytes
    total = st.total_s
    reasons = [
        f"{mem.total / GB:.1f} GB of {hw.usable_bytes / GB:.1f} GB usable on the {mem.stage} stage "
        f"(states {mem.model_states / GB:.1f}, activations "
        f"{(mem.activations + mem.recompute_working + mem.output_layer) / GB:.1f})",
    ]
    if layout.pp > 1:
        reasons.append(
            f"bubble {100 * st.bubble_s / total:.1f}% ((p-1)/m = {layout.pp - 1}/{layout.num_micro_batches})"
        )
    if layout.tp > 1:
        reasons.append(f"TP comm {100 * st.tp_comm_s / total:.1f}%")
    if layout.dp > 1:
        reasons.append(f"DP comm {100 * st.dp_comm_s / total:.1f}%")
    if layout.recompute != "none":
        extra = shape.hardware_flops_per_token(layout.recompute) / shape.model_flops_per_token() - 1
        reasons.append(f"{layout.recompute} recompute +{100 * extra:.0f}% FLOPs")
    if st.offload_s:
        reasons.append(f"offload {100 * st.offload_s / total:.1f}%")
    if layout.loss_chunk_size:
        reasons.append(f"loss fused with the LM head, {layout.loss_chunk_size} tokens a chunk")
    return Candidate(layout, mem, st, tps, mfu, fits, reasons)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class SearchResult:
    candidates: list[Candidate]  # fitting layouts, best first
    closest: Candidate | None  # the smallest-memory layout when none fits
    skipped: Counter  # layouts not considered, by rule
    considered: int


def search_layouts(
    shape: ModelShape,
    hw: Hardware,
    *,
    num_gpus: int,
    global_batch_size: int,
    precision: Precision = "bf16",
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    recompute: tuple[Recompute, ...] = ("none", "selective", "full"),
    allow_offload: bool = False,
    allow_zero_with_pp: bool = False,
    loss_chunk_size: int = 0,
) -> SearchResult:
    """Every valid layout that fits, ranked by estimated tokens/s. Raises PlanError, with the reason,
    when the request is impossible (bad numbers, no valid layout, or nothing fits). `loss_chunk_size` > 0
    (train.loss_chunk_size): the layouts that can fuse the LM head into the loss (tp = pp = 1) hold one
    chunk's logits instead of all of them; the others keep the full logits."""
    problems = []
    if loss_chunk_size < 0:
        problems.append(f"loss_chunk_size={loss_chunk_size}: must be >= 0 (0 = full logits)")
    if num_gpus < 1:
        problems.append(f"gpus={num_gpus}: must be >= 1")
    if hw.gpu_memory_gb <= 0:
        problems.append(f"gpu_memory={hw.gpu_memory_gb} GB: must be > 0")
    if global_batch_size < 1:
        problems.append(f"global_batch_size={global_batch_size}: must be >= 1")
    if problems:
        raise PlanError("; ".join(problems))
    skipped: Counter = Counter()
    fitting: list[Candidate] = []
    closest: Candidate | None = None
    considered = 0
    tps_options = [k for k in _divisors(min(hw.gpus_per_node, num_gpus)) if shape.num_heads % k == 0]
    for tp in tps_options:
        for pp in _divisors(shape.num_layers):
            if num_gpus % (tp * pp):
                skipped["tp*pp does not divide the GPU count"] += 1
                continue
            dp = num_gpus // (tp * pp)
            for mbs in micro_batch_sizes:
                if global_batch_size % (mbs * dp):
                    skipped["global batch not a multiple of micro batch x dp"] += 1
                    continue
                m = global_batch_size // (mbs * dp)
                for zero in zero_stages:
                    if zero >= 2 and pp > 1 and not allow_zero_with_pp:
                        skipped["ZeRO >= 2 with pp > 1 (DeepSpeed's pipeline engine allows ZeRO 0/1)"] += 1
                        continue
                    if zero > 0 and dp == 1:
                        skipped["ZeRO with dp=1 shards nothing"] += 1
                        continue
                    offloads = [(False, False)]
                    if allow_offload and zero >= 1:
                        offloads.append((True, False))
                        if zero == 3:
                            offloads.append((True, True))
                    for sp in (False, True) if tp > 1 else (False,):
                        for rc in recompute:
                            for off_opt, off_par in offloads:
                                chunk = loss_chunk_size if tp == 1 and pp == 1 else 0
                                layout = Layout(tp, pp, dp, zero, mbs, m, sp, rc, off_opt, off_par, chunk)
                                cand = evaluate_layout(shape, layout, hw, precision=precision)
                                considered += 1
                                if cand.fits:
                                    fitting.append(cand)
                                elif closest is None or cand.memory.total < closest.memory.total:
                                    closest = cand
    if considered == 0:
        rules = "; ".join(f"{k} ({v}x)" for k, v in skipped.most_common())
        raise PlanError(
            f"no valid layout for {num_gpus} GPU(s), global batch {global_batch_size}, "
            f"{shape.num_layers} layers, {shape.num_heads} heads: {rules}"
        )
    if not fitting:
        assert closest is not None
        floor = model_state_bytes(shape.total_params, zero_stage=3, dp=num_gpus, precision=precision)
        raise PlanError(
            f"nothing fits in {hw.gpu_memory_gb:g} GB per GPU ({hw.usable_bytes / GB:.1f} GB usable after "
            f"{100 * hw.reserve:.0f}% reserve): the smallest layout, {closest.layout.describe()}, needs "
            f"{closest.memory.total / GB:.1f} GB per GPU; {shape.total_params / 1e9:.2f}B parameters need "
            f"{sum(floor[:3]) / GB:.1f} GB per GPU of model states even fully sharded over {num_gpus} GPU(s)"
            + ("" if allow_offload else "; more GPUs, a smaller global batch, or offload could help")
        )
    fitting.sort(key=lambda c: (-c.tokens_per_s, c.memory.total))
    return SearchResult(fitting, closest, skipped, considered)
