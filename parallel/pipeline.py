"""Pipeline parallelism through DeepSpeed's `PipelineModule`: a model becomes a list of layers, split
into `parallel.pp` stages; `engine.train_batch` runs DeepSpeed's 1F1B schedule over the step's
micro-batches (the gradient-accumulation steps) and one optimizer update.

The layers are thin adapters around the modules of the already built (and, with tp > 1, already
tensor-parallel) model, never copies of its code: the token embedding, the positions, each
`TransformerBlock`, the final norm and the LM head of `pretrain.models.gpt.GPT`; for BERT its
embeddings, blocks (the padding mask travels with the activations), MLM transform and output bias; for
the encoder-decoders (T5, BART: `pretrain.models.t5.T5`) the encoder stack, then the decoder stack, with
the encoder output, the encoder padding mask and the decoder ids travelling through the encoder stages
and the encoder output on through the decoder stages, where every block cross-attends to it (its
gradient, summed over the decoder blocks, flows back to the encoder stages). T5's relative-position
table (one per stack, read by each of its blocks) travels with the activations too, so its gradient is
summed over stages by the pipeline itself and the table lives on one stage. The token embedding is used
three times (encoder input, decoder input, tied head), all under the tied key "embed". Every rank builds the whole model once with the
run's seed, so the pipelined model starts from exactly the one-process weights, and each stage trains
and saves only its own layers (the full model's memory is still spent once per rank at start-up:
building only the local stage is future work, as for tensor parallelism in `parallel.layers`).
With tied input/output embeddings the embedding is a `TiedLayerSpec`
held by the first and the last stage: DeepSpeed broadcasts it from the first stage at start and after
loading, and sums its two gradients before each update (`ReduceTiedGrads`).

What DeepSpeed's pipeline engine provides and what Tandem adds (read from deepspeed/runtime/pipe/):

* Topology: `PipelineModule(topology=...)` takes the same `PipeModelDataParallelTopology` that
  `parallel.topology.Topology` built (axes pipe, data, model; tp fastest), so DeepSpeed's pipeline grid
  and Tandem's tp/dp/pp groups agree on every rank's coordinates. The engine refuses `mpu=` with a
  PipelineModule; it uses the module's grid instead.
* Activations and gradients travel between stages by point-to-point send/recv (gloo on CPU). DeepSpeed
  "partitions" them over the tensor-parallel ranks by default, which assumes they are identical on
  every TP rank; under sequence parallelism they are not, so Tandem turns partitioning off.
* Data: only the first stage (inputs) and the last stage (labels) read batches, as `(inputs, labels)`
  tuples; Tandem's loader still draws the step's micro-batches on every rank so the loader position in
  every rank's checkpoint is the same.
* Gradient norm: DeepSpeed's fp32 (ZeRO-0) clipping counts parameters without Megatron's attributes on
  the first pipeline stage only, so with pp > 1 Tandem measures the norm itself (tensor-parallel shards
  summed over tp, each stage's part summed over pp, the tied embedding's second copy skipped) and clips
  with DeepSpeed's formula. Under ZeRO-1 DeepSpeed's own norm is correct (it skips the pipeline-replicated
  copy and sums over the pipe and tp ranks).
* Step guard: the verdict (non-finite or spiking loss) is taken inside the engine's optimizer-step
  instruction, after the gradients are reduced and before the update, with the last stage's micro-batch
  losses broadcast to the whole pipeline.
* Activation checkpointing wraps the blocks of the full model (`apply_activation_checkpointing`) before
  the layers are taken, so the pipeline's own checkpoint interval stays 0.
* Checkpoints: the engine writes one `layer_XX-model_NN-model_states.pt` file per layer (tied copies on
  later stages are not written; they are re-broadcast after loading) plus its optimizer and counter files.
  Loading needs the same tp and pp; other layouts are refused by `pretrain.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PARTITION_METHODS = ("parameters", "uniform", "blocks")
ENCODER_DECODER = ("t5", "bart")  # families built by pretrain.models.t5.T5


# ----------------------------------------------------------------------------- layer adapters
class TokenEmbedding(nn.Module):
    """The model's token embedding (plain or vocab-parallel): ids (B, T) -> (B, T, C). Tied with the LM
    head under the key "embed"; `lm_logits` is the head's forward on the last stage."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def lm_logits(tied: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied LM head, as `GPT.forward` computes it: (B, T, C) -> (B, T, V) (V/tp under TP)."""
    weight: torch.Tensor = tied.embed.weight  # type: ignore[assignment]
    return F.linear(x, weight)


class GPTPositions(nn.Module):
    """Learned positions added to the token embeddings, then embedding dropout (GPT.forward)."""

    def __init__(self, pos_embed: nn.Module | None, drop: nn.Module):
        super().__init__()
        self.pos_embed, self.drop = pos_embed, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


class GPTBlockPipe(nn.Module):
    """One causal `TransformerBlock` (with the model's rotary table, if any): (B, T, C) -> (B, T, C)."""

    def __init__(self, block: nn.Module, rope: nn.Module | None):
        super().__init__()
        self.block = block
        self.rope = rope  # the model's one table, shared by every block (buffers only, never saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.rope, None)


class Apply(nn.Module):
    """A module of the model applied as one pipeline layer (final norm, untied LM head)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class UntiedHead(nn.Module):
    """An untied LM head (`lm_head`): logits = x W^T, as GPT.forward computes them."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.head.weight  # type: ignore[assignment]
        return F.linear(x, weight)


class BERTTokens(nn.Module):
    """BERT's token embedding (tied with the MLM output projection under the key "embed"), passing the
    padding mask and token types on: (ids, mask, types) -> (token embeddings, mask, types)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, mask, types = inputs
        return self.embed(input_ids), mask, types


class BERTEmbeddings(nn.Module):
    """The rest of BERT.encode before the blocks (positions, token types, norm, dropout, ALBERT's E -> H
    projection): (token embeddings, mask, types) -> (x, mask)."""

    def __init__(self, model: Any):
        super().__init__()
        self.pos_embed, self.type_embed = model.pos_embed, model.type_embed
        self.embed_norm, self.drop = model.embed_norm, model.drop
        self.embed_proj = getattr(model, "embed_proj", None)
        self.position_offset = int(getattr(model.config, "position_offset", 0))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask, types = inputs
        positions = torch.arange(x.shape[1], device=x.device) + self.position_offset
        x = x + self.pos_embed(positions)
        if self.type_embed is not None:
            x = x + self.type_embed(types)
        x = self.drop(self.embed_norm(x))
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return x, mask


class BERTBlockPipe(nn.Module):
    """One bidirectional block with the padding mask carried along: (x, mask) -> (x, mask)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = inputs
        return self.block(x, None, mask.bool()), mask


class BERTHead(nn.Module):
    """Final norm (pre-norm stacks) and the MLM transform: (x, mask) -> the output projection's input.
    Also holds the pooler, which MLM never uses, so that it is saved with the last stage."""

    def __init__(self, model: Any):
        super().__init__()
        self.final_norm, self.mlm_dense, self.mlm_norm = model.final_norm, model.mlm_dense, model.mlm_norm
        self.approximate = str(getattr(model, "mlm_act", "none"))
        self.pooler = model.pooler

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = inputs[0]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.mlm_norm(F.gelu(self.mlm_dense(x), approximate=self.approximate))


class OutputBias(nn.Module):
    """BERT's MLM output bias, added to the logits of the (tied or untied) output projection."""

    def __init__(self, model: Any):
        super().__init__()
        self.mlm_bias = model.mlm_bias

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.mlm_bias


def bert_logits(tied: BERTTokens, h: torch.Tensor) -> torch.Tensor:
    """The tied MLM output projection on the last stage (bias added by the next layer)."""
    weight: torch.Tensor = tied.embed.weight  # type: ignore[assignment]
    return F.linear(h, weight)


class T5Tokens(nn.Module):
    """The shared token embedding of an encoder-decoder (T5, BART), tied under the key "embed" with the
    decoder's input embedding and the LM head: (ids, mask, decoder ids) -> (token embeddings, mask,
    decoder ids)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, mask, decoder_ids = inputs
        return self.embed(input_ids), mask, decoder_ids


def t5_decoder_tokens(tied: T5Tokens, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The decoder's input embedding through the tied table: (memory, mask, decoder ids) -> (memory, mask,
    decoder token embeddings)."""
    memory, mask, decoder_ids = inputs
    return memory, mask, tied.embed(decoder_ids)


class T5StackIn(nn.Module):
    """The rest of `T5._embed` for one stack (embedding scale, absolute positions, embedding norm,
    dropout), plus the stack's relative-position table, which every block of the stack reads: it travels
    with the activations as a tensor (buckets, H/tp), so its gradient comes back through the pipeline to
    the one stage that holds it. Encoder: (tokens, mask, decoder ids) -> (x, mask, decoder ids[, table]);
    decoder: (memory, mask, tokens) -> (memory, mask, y[, table])."""

    def __init__(self, model: Any, stack: str):
        super().__init__()
        self.stack = stack
        self.pos = getattr(model, f"{stack}_pos")
        self.embed_norm = getattr(model, f"{stack}_embed_norm")
        self.bias = getattr(model, f"{stack}_bias")
        self.drop = model.drop
        self.embed_scale = float(model.embed_scale)
        self.max_seq_len = int(model.config.max_seq_len)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0] if self.stack == "encoder" else inputs[2]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos is not None:
            t = x.shape[1]
            if t > self.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.max_seq_len}")
            x = x + self.pos(torch.arange(t, device=x.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        # `* 1` makes the table an activation (a new tensor in the graph), not the parameter itself.
        table = () if self.bias is None else (self.bias.table.weight * 1,)
        if self.stack == "encoder":
            return (x, inputs[1], inputs[2], *table)
        return (inputs[0], inputs[1], x, *table)


class T5EncoderBlockPipe(nn.Module):
    """One encoder block: (x, mask, decoder ids[, table]) -> the same with x updated. The stack's last
    block leaves the table out of its output: no later layer reads it, and every floating-point tensor a
    stage receives must get a gradient."""

    def __init__(self, block: nn.Module, bias: nn.Module | None, last: bool):
        super().__init__()
        self.block, self.last = block, last
        self.bias_source: nn.Module | None
        object.__setattr__(self, "bias_source", bias)  # not a submodule: its table is held by T5StackIn

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, mask, decoder_ids, *table = inputs
        bias = _t5_bias(self.bias_source, table)
        x = self.block(x, None, mask.bool(), bias)
        return (x, mask, decoder_ids) if self.last else (x, mask, decoder_ids, *table)


class T5EncoderOut(nn.Module):
    """The encoder's final norm and dropout (pre-norm stacks): (x, mask, decoder ids) -> (memory, mask,
    decoder ids)."""

    def __init__(self, model: Any):
        super().__init__()
        self.norm, self.drop = model.encoder_norm, model.drop

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, mask, decoder_ids = inputs
        if self.norm is not None:
            x = self.drop(self.norm(x))
        return x, mask, decoder_ids


class T5DecoderBlockPipe(nn.Module):
    """One decoder block, cross-attending to the encoder output carried along: (memory, mask, y[, table])
    -> the same with y updated; the stack's last block outputs y alone (memory and table are read by no
    later layer)."""

    def __init__(self, block: nn.Module, bias: nn.Module | None, last: bool):
        super().__init__()
        self.block, self.last = block, last
        self.bias_source: nn.Module | None
        object.__setattr__(self, "bias_source", bias)  # not a submodule: its table is held by T5StackIn

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        memory, mask, y, *table = inputs
        bias = _t5_bias(self.bias_source, table)
        y = self.block(y, None, None, bias, memory, mask.bool())
        return y if self.last else (memory, mask, y, *table)


class T5DecoderOut(nn.Module):
    """The decoder's final norm and dropout, and T5's d_model^-0.5 rescale before a tied head: y -> the
    LM head's input."""

    def __init__(self, model: Any):
        super().__init__()
        self.norm, self.drop = model.decoder_norm, model.drop
        tied = model.lm_head is None and model.rescale_tied_head
        self.scale = float(model.config.hidden_size) ** -0.5 if tied else 1.0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            y = self.drop(self.norm(y))
        return y * self.scale if self.scale != 1.0 else y


class FinalLogitsBias(nn.Module):
    """BART's learned output bias over the vocabulary (transformers' final_logits_bias)."""

    def __init__(self, model: Any):
        super().__init__()
        self.final_logits_bias = model.final_logits_bias

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.final_logits_bias


def t5_logits(tied: T5Tokens, y: torch.Tensor) -> torch.Tensor:
    """The tied LM head of an encoder-decoder on the last stage."""
    weight: torch.Tensor = tied.embed.weight  # type: ignore[assignment]
    return F.linear(y, weight)


def _t5_bias(source: nn.Module | None, table: list[torch.Tensor]) -> Any:
    """The stack's `RelativePositionBias` output (its bucketing rules) over the table that travelled with
    the activations, or None for stacks with absolute positions."""
    if source is None:
        return None
    return dataclasses.replace(source(), table=table[0])


# ----------------------------------------------------------------------------- layer lists
def pipeline_layers(model: nn.Module) -> list[Any]:
    """The model as a list of `LayerSpec`/`TiedLayerSpec` for `PipelineModule`, built from its own modules."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    # `parallel` never imports `pretrain` (DESIGN.md): GPT is recognized by its config and modules. What an
    # adapter would miss is caught by tests/unit/test_pipeline_layers.py (layers == GPT.forward, bitwise).
    if getattr(getattr(model, "config", None), "family", None) == "gpt" and all(
        hasattr(model, a) for a in ("embed", "pos_embed", "rope", "drop", "blocks", "final_norm", "lm_head")
    ):
        tied = model.lm_head is None
        specs: list[Any] = [
            TiedLayerSpec("embed", TokenEmbedding, model.embed, tied_weight_attr=["embed.weight"])
            if tied
            else LayerSpec(TokenEmbedding, model.embed),
            LayerSpec(GPTPositions, model.pos_embed, model.drop),
        ]
        blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
        specs += [LayerSpec(GPTBlockPipe, block, model.rope) for block in blocks]
        specs.append(LayerSpec(Apply, model.final_norm))
        if tied:
            specs.append(
                TiedLayerSpec(
                    "embed",
                    TokenEmbedding,
                    model.embed,
                    forward_fn=lm_logits,
                    tied_weight_attr=["embed.weight"],
                )
            )
        else:
            specs.append(LayerSpec(UntiedHead, model.lm_head))
        return specs
    if getattr(getattr(model, "config", None), "family", None) == "bert" and all(
        hasattr(model, a)
        for a in ("embed", "blocks", "mlm_dense", "mlm_norm", "mlm_bias", "lm_head", "pooler")
    ):
        tied = model.lm_head is None
        specs = [
            TiedLayerSpec("embed", BERTTokens, model.embed, tied_weight_attr=["embed.weight"])
            if tied
            else LayerSpec(BERTTokens, model.embed),
            LayerSpec(BERTEmbeddings, model),
        ]
        bert_blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
        specs += [LayerSpec(BERTBlockPipe, block) for block in bert_blocks]
        specs.append(LayerSpec(BERTHead, model))
        if tied:
            specs.append(
                TiedLayerSpec(
                    "embed",
                    BERTTokens,
                    model.embed,
                    forward_fn=bert_logits,
                    tied_weight_attr=["embed.weight"],
                )
            )
        else:
            specs.append(LayerSpec(UntiedHead, model.lm_head))
        specs.append(LayerSpec(OutputBias, model))
        return specs
    if getattr(getattr(model, "config", None), "family", None) in ENCODER_DECODER and all(
        hasattr(model, a) for a in ("embed", "encoder_blocks", "decoder_blocks", "encoder_bias", "lm_head")
    ):
        return _encoder_decoder_layers(model)
    raise NotImplementedError(
        f"pipeline parallelism for {type(model).__name__}: available for GPT, BERT and the encoder-decoders "
        "(model.family gpt, bert, t5, bart)"
    )


def _encoder_decoder_layers(model: Any) -> list[Any]:
    """T5 and BART: encoder embedding, encoder blocks, encoder output; the decoder's embedding (the same
    tied table), decoder blocks cross-attending to the carried encoder output, decoder output, LM head."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = model.lm_head is None
    embed = ["embed.weight"]
    specs: list[Any] = [
        TiedLayerSpec("embed", T5Tokens, model.embed, tied_weight_attr=embed),
        LayerSpec(T5StackIn, model, "encoder"),
    ]
    n = len(model.encoder_blocks)
    specs += [
        LayerSpec(T5EncoderBlockPipe, block, model.encoder_bias, i == n - 1)
        for i, block in enumerate(model.encoder_blocks)
    ]
    specs += [
        LayerSpec(T5EncoderOut, model),
        TiedLayerSpec("embed", T5Tokens, model.embed, forward_fn=t5_decoder_tokens, tied_weight_attr=embed),
        LayerSpec(T5StackIn, model, "decoder"),
    ]
    n = len(model.decoder_blocks)
    specs += [
        LayerSpec(T5DecoderBlockPipe, block, model.decoder_bias, i == n - 1)
        for i, block in enumerate(model.decoder_blocks)
    ]
    specs.append(LayerSpec(T5DecoderOut, model))
    if tied:
        specs.append(
            TiedLayerSpec("embed", T5Tokens, model.embed, forward_fn=t5_logits, tied_weight_attr=embed)
        )
    else:
        specs.append(LayerSpec(UntiedHead, model.lm_head))
    if model.final_logits_bias is not None:
        specs.append(LayerSpec(FinalLogitsBias, model))
    return specs


def pipeline_inputs(family: str, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """An objective's batch dict -> the `(inputs, labels)` pair the pipeline engine reads."""
    if family == "gpt":
        extra = sorted(set(batch) - {"input_ids", "labels"})
        if extra:
            raise ValueError(f"pipelined GPT takes input_ids and labels only; the batch also has {extra}")
        return batch["input_ids"], batch["labels"]
    if family == "bert":
        extra = sorted(set(batch) - {"input_ids", "attention_mask", "token_type_ids", "labels"})
        if extra:
            raise ValueError(
                f"pipelined BERT takes ids, mask, token types and labels; the batch also has {extra}"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        types = batch.get("token_type_ids", torch.zeros_like(ids))
        return (ids, mask.long(), types.long()), batch["labels"]
    if family in ENCODER_DECODER:
        extra = sorted(set(batch) - {"input_ids", "attention_mask", "decoder_input_ids", "labels"})
        if extra:
            raise ValueError(
                f"pipelined {family} takes ids, mask, decoder input ids and labels; the batch also has {extra}"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        return (ids, mask.long(), batch["decoder_input_ids"]), batch["labels"]
    raise NotImplementedError(f"model.family={family!r}: no pipeline input mapping")


# ----------------------------------------------------------------------------- engine
def pipeline_engine(
    model: nn.Module,
    *,
    topology: Any,
    ds_config: dict[str, Any],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    partition_method: str = "parameters",
) -> Any:
    """Builds the PipelineModule and DeepSpeed's PipelineEngine. `loss_fn(logits, labels)` is the last
    stage's loss (the training loop passes the token cross-entropy, vocab-parallel under tp).
    `engine.tandem_clip` is the clipping threshold Tandem applies itself (> 0 when DeepSpeed's own fp32
    clipping is bypassed, see above)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"parallel.pp_partition={partition_method!r}: must be one of {PARTITION_METHODS}")
    method = "type:BlockPipe" if partition_method == "blocks" else partition_method
    # no_grad: the module broadcasts the tied embedding from the first stage in place, which must not be
    # recorded by autograd (torch warns at the first backward otherwise).
    with torch.no_grad():
        module = PipelineModule(
            layers=pipeline_layers(model),
            topology=topology.ds_topology,
            loss_fn=loss_fn,
            partition_method=method,
            activation_checkpoint_interval=0,
        )
    ds_config = dict(ds_config)
    # Activations differ across TP ranks under sequence parallelism: never split them over tp in transit.
    ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    own_clip = 0.0
    plain_fp32 = not ds_config.get("bf16", {}).get("enabled") and not ds_config.get("fp16", {}).get("enabled")
    if ds_config["zero_optimization"]["stage"] == 0 and plain_fp32:
        own_clip = float(ds_config.get("gradient_clipping", 0.0))
        ds_config["gradient_clipping"] = 0.0
    optimizer = make_optimizer(module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    engine.tandem_clip = own_clip
    return engine


@torch.no_grad()
def pipeline_grad_norm(module: nn.Module, topology: Any) -> float:
    """Global L2 gradient norm of a pipelined (and possibly tensor-parallel) model, after the engine has
    reduced the gradients: TP shards summed over tp, stages summed over pp, replicated tied copies once."""
    from parallel.tensor import is_tensor_parallel

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if is_tensor_parallel(p):
            sharded += sq
        else:
            replicated += sq
    if topology.dims.tp > 1:
        torch.distributed.all_reduce(sharded, group=topology.tp_group)
    total = sharded + replicated
    torch.distributed.all_reduce(total, group=topology.pp_group)
    return total.sqrt().item()


class PipelineStep:
    """One training step of a pipeline engine with Tandem's step guard inside it.

    `__call__(batches)` runs `engine.train_batch` over the step's micro-batches; at the engine's
    optimizer-step instruction (gradients reduced, update not yet applied) it broadcasts the last stage's
    micro-batch losses over the pipeline, measures the gradient norm (when Tandem clips), takes the guard's
    collective verdict and closes the optimizer gate for a skipped step. Returns (skip reason or None,
    mean loss, gradient norm or None)."""

    def __init__(
        self,
        engine: Any,
        *,
        topology: Any,
        family: str,
        guard: Any,
        gate: Any,
        world_size: int,
        own_clip: float,
        measure_norm: bool,
    ):
        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        self.engine, self.topo, self.family = engine, topology, family
        self.guard, self.gate, self.world_size = guard, gate, world_size
        self.own_clip, self.measure_norm = own_clip, measure_norm
        self.fault: str | None = None
        self.outcome: tuple[str | None, float, float | None] | None = None
        original = PipelineEngine._exec_optimizer_step

        def guarded_optimizer_step(eng: Any, lr_kwargs: Any = None) -> None:
            self._before_update()
            original(eng, lr_kwargs)

        # The engine dispatches instructions through self._INSTRUCTION_MAP: an instance attribute wins.
        engine._INSTRUCTION_MAP = {
            **PipelineEngine._INSTRUCTION_MAP,
            schedule.OptimizerStep: guarded_optimizer_step,
        }

    def _micro_losses(self) -> list[float]:
        eng = self.engine
        n = eng.micro_batches
        t = torch.zeros(n, dtype=torch.float64)
        if eng.is_last_stage():
            t.copy_(torch.stack([x.detach().double().reshape(()) for x in eng.fwd_outputs]))
        torch.distributed.broadcast(t, src=eng._loss_stage_global_rank(), group=self.topo.pp_group)
        return t.tolist()

    def _before_update(self) -> None:
        losses = self._micro_losses()
        if self.fault:
            losses = [x * (float("nan") if self.fault == "nan" else 100.0) for x in losses]
        grad_norm = pipeline_grad_norm(self.engine.module, self.topo) if self.measure_norm else None
        reason, mean = self.guard.verdict(losses, grad_norm, world_size=self.world_size)
        if reason is None and self.own_clip > 0 and grad_norm is not None:
            # DeepSpeed's clip_grad_norm_ formula, applied to every copy (tied copies hold the same sum).
            coef = self.own_clip / (grad_norm + 1e-6)
            if coef < 1.0:
                for p in self.engine.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        self.gate.closed = reason is not None
        self.outcome = (reason, mean, grad_norm)

    def __call__(
        self, batches: list[dict[str, torch.Tensor]], fault: str | None = None
    ) -> tuple[str | None, float, float | None]:
        self.fault, self.outcome = fault, None
        pairs = [pipeline_inputs(self.family, b) for b in batches]
        try:
            self.engine.train_batch(iter(pairs))
        finally:
            self.gate.closed = False
        assert self.outcome is not None, "the pipeline schedule ran no optimizer step"
        return self.outcome


@torch.no_grad()
def evaluate_pipeline(engine: Any, family: str, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Each of `batches`' mean loss (this dp rank's own batches, not averaged over dp), on every stage of
    the pipeline (broadcast from the last stage). Collective over the world: DeepSpeed's eval_batch starts
    with a world barrier, so every rank calls it the same number of times."""
    pairs = [pipeline_inputs(family, b) for b in batches]
    losses = engine.eval_batch(
        iter(pairs), num_micro_batches=len(pairs), reduce_output=None, bcast_loss=False
    )
    t = torch.zeros(len(pairs), dtype=torch.float64)
    if engine.is_last_stage():
        t.copy_(torch.stack([x.detach().double().reshape(()) for x in losses]))
    torch.distributed.broadcast(
        t, src=engine._loss_stage_global_rank(), group=engine.grid.get_pipe_parallel_group()
    )
    return t.tolist()
