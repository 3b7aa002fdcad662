"""The planner: parameters, FLOPs and memory per GPU of a model on a parallel layout.

A layout is one pool: ``stages`` pipeline stages × ``dp`` data-parallel replicas =
``gpus`` GPUs, DeepSpeed's 1F1B pipeline schedule, ZeRO stage 0/1 (2/3 only without a
pipeline), FP16/BF16 with FP32 master weights (or plain FP32), optional activation
checkpointing of every block.

Parameters are counted exactly, from the model built on the meta device (no memory).

Memory of stage s, with P_s its parameters, w = 2 bytes (fp16/bf16) or 4 (fp32),
b the micro-batch, T the sequence length, C = d_model, F = d_ff, V = vocab_size, and
n_s = min(S − s, M) micro-batches in flight (1F1B: stage s runs S − s forwards before
its first backward):

- weights P·w; gradients P·w (ZeRO-2 shards them over dp, ZeRO-3 the weights too);
- optimizer states: FP32 master + Adam m and v = 12 B/param (8 B in fp32 training),
  sharded over the dp ranks under ZeRO ≥ 1;
- FP32 gradient copy 4 B/param (mixed precision; sharded under ZeRO ≥ 1): made at the
  optimizer step, when activations are gone, so only the larger of the two counts;
- activations per token, in w-byte elements: a block keeps 9C + 2F (GELU; SwiGLU 9C + 4F;
  = Korthikanti et al.'s 34·C bytes for F = 4C without the T² term, as the fused SDPA
  kernel stores no score matrix), + 2C one-byte dropout masks if dropout > 0.
  Checkpointing keeps only each block's input (C) per micro-batch in flight, plus one
  block's full activations while it is recomputed; CPU checkpointing (DeepSpeed's
  ``activation_checkpointing.cpu_checkpointing``) parks those inputs in host memory.
  Each micro-batch in flight also keeps the stage's output (C) until its backward. The
  last stage adds the head: 2C + V elements plus the FP32 log-softmax and its FP32 input
  (8V bytes);
- the weight-gradient temporary: when a micro-batch's backward adds into gradients that
  earlier micro-batches left, autograd first materialises the new gradient of each
  weight, so the largest weight of the stage (w bytes each) is briefly there twice;
- overhead: 2 GiB fixed (CUDA context, NCCL, DeepSpeed bucket buffers of ≤ 2·10⁸
  elements) + 10 % of the activations for the caching allocator's fragmentation (the
  states are flat buffers allocated once).

Checked on an H200 (torch 2.11, fp16, micro-batch 1, seq 2048): the backward of one block
of the 1T width peaks 6.8 GiB (checkpointed) to 7.0 GiB above its weights and gradients;
this model says 1.7 GiB of activations + 4.9 GiB of weight-gradient temporary + 10 %.

FLOPs per token (training, PaLM's convention): 6·N + 12·L·C·T, with N the parameters that
take part in a matmul (blocks, final norm, the V × C output projection; not the embedding
lookups). Recomputing checkpointed blocks adds a forward: + 2·N_blocks + 4·L·C·T.

Pipeline bubble: (S − 1)/(M + S − 1) of each step is idle, M micro-batches per step.

Choosing a layout when only ``gpus`` is given: stage counts S that divide the GPU count
(dp = gpus / S) and are ≤ n_layer, ZeRO-1, the other settings as given; the fitting
layout with the fewest stages wins: it has the smallest bubble for a given global batch,
the least point-to-point traffic, and the most data-parallel ranks to shard optimizer
states over. At each stage count checkpoints stay in GPU memory if they fit there, else
(unless CPU checkpointing was turned off) they go to host memory. With no GPU count at
all the planner finds the smallest power-of-two count that fits, by the same rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from model.config import GPTConfig, ModelConfigError
from model.gpt import Block, Embedding, FinalNorm, LMHead
from model.partition import partition_layers, pipeline_parts

GiB = 1 << 30
MiB = 1 << 20

PRECISIONS: tuple[str, ...] = ("fp16", "bf16", "fp32")
DEFAULT_GLOBAL_BATCH_TOKENS = 1 << 22  # ≈ 4 M tokens per optimizer step (LLaMA; GPT-3: 3.2 M)
FIXED_OVERHEAD_BYTES = 2 * GiB
FRAGMENTATION = 0.10
ASSUMED_MFU = 0.40  # FACTS.md measured 38 % on an H200 for a 406 M model
MAX_SEARCH_GPUS = 1 << 16


class PlanError(ModelConfigError):
    """A layout that cannot be planned (bad combination of options); names the fix."""


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int  # what nvidia-smi reports as total
    peak_tflops: dict[str, float]  # dense tensor-core peak per precision (fp32: TF32)


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("A100-80GB", 81920 * MiB, {"fp16": 312.0, "bf16": 312.0, "fp32": 156.0}),
        GpuType("H100-80GB", 81559 * MiB, {"fp16": 989.0, "bf16": 989.0, "fp32": 494.0}),
        GpuType("H200-141GB", 143771 * MiB, {"fp16": 989.0, "bf16": 989.0, "fp32": 494.0}),
    )
}
DEFAULT_GPU_TYPE = "A100-80GB"


def get_gpu_type(name: str) -> GpuType:
    """A GPU type by name, case-insensitive; 'a100', 'h100', 'h200' work too."""
    for g in GPU_TYPES.values():
        if name.lower() in (g.name.lower(), g.name.split("-")[0].lower()):
            return g
    raise PlanError(f"unknown GPU type {name!r}; known types: {', '.join(GPU_TYPES)}")


# --- parameters ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Exact parameter counts, per kind of layer (each weight counted once)."""

    embedding: int  # token + position embeddings
    per_block: int
    n_layer: int
    final_norm: int
    lm_head: int  # 0 when tied: the head uses the embedding's weight
    head_matrix: int  # V × C, the output projection's size, tied or not (for FLOPs)
    largest_in_block: int  # elements of a block's biggest weight (its gradient temporary)

    @property
    def blocks(self) -> int:
        return self.per_block * self.n_layer

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.final_norm + self.lm_head

    @property
    def matmul(self) -> int:
        """N of the FLOPs formula: parameters that take part in a matmul."""
        return self.blocks + self.final_norm + self.head_matrix

    def to_dict(self) -> dict[str, int]:
        return {
            "embedding": self.embedding,
            "per_block": self.per_block,
            "blocks": self.blocks,
            "final_norm": self.final_norm,
            "lm_head": self.lm_head,
            "total": self.total,
        }


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(config: GPTConfig) -> ParamCounts:
    """Count by building each kind of layer once on the meta device (no memory used).

    All blocks have the same shapes, so n_layer × one block is exact.
    """
    with torch.device("meta"):
        embedding = Embedding(config)
        block = Block(config)
        final_norm = FinalNorm(config)
        head = LMHead(config, embedding=embedding if config.tied_embeddings else None)
    return ParamCounts(
        embedding=_numel(embedding),
        per_block=_numel(block),
        n_layer=config.n_layer,
        final_norm=_numel(final_norm),
        lm_head=_numel(head),
        head_matrix=config.vocab_size * config.d_model,
        largest_in_block=max(p.numel() for p in block.parameters()),
    )


# --- layouts ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LayoutRequest:
    """What the operator asked for; None lets the planner choose."""

    gpus: int | None = None
    stages: int | None = None
    dp: int | None = None
    zero: int | None = None  # None: 1
    precision: str = "fp16"
    checkpointing: bool = True
    cpu_checkpointing: bool | None = None  # None: only where checkpoints do not fit on GPU
    micro_batch: int = 1
    seq_len: int | None = None  # None: the model's context
    global_batch_tokens: int | None = None  # None: ≈ DEFAULT_GLOBAL_BATCH_TOKENS
    gpu_type: str = DEFAULT_GPU_TYPE


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A complete, valid layout of one pool."""

    gpu_type: str
    stages: int
    dp: int
    zero: int
    precision: str
    checkpointing: bool
    cpu_checkpointing: bool  # checkpointed block inputs live in host memory
    micro_batch: int
    seq_len: int
    micro_batches: int  # M: micro-batches per optimizer step, per pipeline

    @property
    def gpus(self) -> int:
        return self.stages * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches * self.dp * self.micro_batch * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, **dataclasses.asdict(self), "tokens_per_step": self.tokens_per_step}


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise PlanError(f"{name} must be a positive whole number, got {value}")


def _micro_batches(req: LayoutRequest, dp: int, seq_len: int) -> int:
    per_micro_step = dp * req.micro_batch * seq_len  # tokens in one micro-batch of every replica
    if req.global_batch_tokens is None:
        return max(1, round(DEFAULT_GLOBAL_BATCH_TOKENS / per_micro_step))
    if req.global_batch_tokens % per_micro_step:
        lo = max(1, req.global_batch_tokens // per_micro_step) * per_micro_step
        raise PlanError(
            f"--global-batch-tokens {req.global_batch_tokens} is not a multiple of dp {dp} × "
            f"micro-batch {req.micro_batch} × seq-len {seq_len} = {per_micro_step}; use "
            f"{lo} or {lo + per_micro_step}"
        )
    return req.global_batch_tokens // per_micro_step


def resolve_layout(config: GPTConfig, req: LayoutRequest) -> Layout:
    """Fill in and check a layout; every error says what to change."""
    _validate_common(config, req)
    gpu = get_gpu_type(req.gpu_type)
    seq_len = req.seq_len or config.seq_len
    stages, dp = req.stages, req.dp
    if req.gpus is not None:
        if stages is not None and dp is not None and stages * dp != req.gpus:
            raise PlanError(
                f"--gpus {req.gpus} but --stages {stages} × --dp {dp} = {stages * dp}; give "
                f"--gpus {stages * dp}, or stages and dp whose product is {req.gpus}"
            )
        if stages is not None and req.gpus % stages:
            raise PlanError(
                f"--gpus {req.gpus} is not a multiple of --stages {stages}: dp = gpus / stages "
                f"must be whole; choose stages dividing {req.gpus}"
            )
        if dp is not None and req.gpus % dp:
            raise PlanError(
                f"--gpus {req.gpus} is not a multiple of --dp {dp}: stages = gpus / dp must "
                f"be whole; choose dp dividing {req.gpus}"
            )
        if stages is None and dp is None:
            stages = 1
        if stages is None:
            stages = req.gpus // (dp or 1)
        if dp is None:
            dp = req.gpus // stages
    stages, dp = stages or 1, dp or 1
    partition_layers(config.n_layer, stages)  # raises when stages > n_layer
    zero = 1 if req.zero is None else req.zero
    if zero >= 2 and stages > 1:
        raise PlanError(
            f"ZeRO stage {zero} shards {'gradients' if zero == 2 else 'gradients and weights'}"
            f" across data-parallel ranks, which DeepSpeed's pipeline engine does not support "
            f"(ZeRO-2/3 are incompatible with pipeline parallelism); use --zero 1 with "
            f"--stages {stages}, or --stages 1 for plain data parallelism"
        )
    return Layout(
        gpu_type=gpu.name,
        stages=stages,
        dp=dp,
        zero=zero,
        precision=req.precision,
        checkpointing=req.checkpointing,
        cpu_checkpointing=bool(req.cpu_checkpointing),
        micro_batch=req.micro_batch,
        seq_len=seq_len,
        micro_batches=_micro_batches(req, dp, seq_len),
    )


# --- memory ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Bytes on one GPU of a stage."""

    weights: int
    gradients: int
    optimizer_states: int
    fp32_grad_copy: int  # alive at the optimizer step only, when activations are freed
    activations: int
    fragmentation: int
    weight_grad_temporary: int  # during backward, with the activations
    fixed_overhead: int
    host_checkpoints: int = 0  # in host memory (CPU checkpointing), not in the GPU total

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        backward = self.activations + self.fragmentation + self.weight_grad_temporary
        return self.states + max(backward, self.fp32_grad_copy) + self.fixed_overhead

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    index: int
    blocks: range  # block indices
    layers: range  # indices into build_layers(config)
    params: int  # held by this stage (a tied embedding's replica included)
    in_flight: int  # micro-batches whose activations it holds at once
    memory: Memory

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index,
            "blocks": [self.blocks.start, self.blocks.stop],
            "layers": [self.layers.start, self.layers.stop],
            "params": self.params,
            "in_flight": self.in_flight,
            "bytes": self.memory.total,
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stage_memory(
    config: GPTConfig,
    counts: ParamCounts,
    layout: Layout,
    *,
    params: int,
    n_blocks: int,
    in_flight: int,
    first: bool,
    last: bool,
) -> Memory:
    """Bytes on one GPU of a stage holding `params` parameters and `n_blocks` blocks."""
    w = 4 if layout.precision == "fp32" else 2
    shard = layout.dp if layout.zero >= 1 else 1
    weights = params * w
    if layout.zero >= 3:  # own shard + the gathered layer in use + the one prefetched
        largest = max(counts.embedding, counts.per_block, counts.lm_head)
        weights = _ceil_div(params * w, layout.dp) + 2 * largest * w
    gradients = _ceil_div(params * w, layout.dp) if layout.zero >= 2 else params * w
    optimizer = _ceil_div(params * (8 if layout.precision == "fp32" else 12), shard)
    fp32_copy = 0 if layout.precision == "fp32" else _ceil_div(params * 4, shard)

    C, F, V = config.d_model, config.ff_dim, config.vocab_size
    tokens = layout.micro_batch * layout.seq_len
    block_full = tokens * w * (9 * C + (4 if config.mlp == "swiglu" else 2) * F)
    if config.dropout > 0:
        block_full += tokens * 2 * C  # one-byte masks of the two residual dropouts
    hidden = tokens * C * w  # one (b, T, C) tensor
    out_buffer = 0 if last else hidden  # kept for the backward of each micro-batch in flight
    host = 0
    if layout.checkpointing:
        checkpoints = in_flight * n_blocks * hidden
        if layout.cpu_checkpointing:
            host, checkpoints = checkpoints, 0
        acts = checkpoints + in_flight * out_buffer + block_full
    else:
        acts = in_flight * (n_blocks * block_full + out_buffer)
    if last:
        acts += tokens * (2 * C * w + V * w + 8 * V)
    largest = counts.largest_in_block
    if first:
        largest = max(largest, counts.head_matrix)  # wte: a dense V × C gradient
    if last:
        largest = max(largest, counts.head_matrix)
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer,
        fp32_grad_copy=fp32_copy,
        activations=acts,
        fragmentation=int(FRAGMENTATION * acts),
        weight_grad_temporary=largest * w,
        fixed_overhead=FIXED_OVERHEAD_BYTES,
        host_checkpoints=host,
    )


def stage_plans(config: GPTConfig, counts: ParamCounts, layout: Layout) -> list[StagePlan]:
    """Parameters and memory of every stage of the layout's pipeline."""
    S = layout.stages
    ranges = partition_layers(config.n_layer, S)
    parts = pipeline_parts(config.n_layer, S)
    plans = []
    for s, blocks in enumerate(ranges):
        params = len(blocks) * counts.per_block
        if s == 0:
            params += counts.embedding
        if s == S - 1:
            params += counts.final_norm + counts.lm_head
            if config.tied_embeddings and S > 1:
                params += counts.embedding  # the last stage's replica of the tied Embedding
        in_flight = min(S - s, layout.micro_batches)
        memory = stage_memory(
            config,
            counts,
            layout,
            params=params,
            n_blocks=len(blocks),
            in_flight=in_flight,
            first=s == 0,
            last=s == S - 1,
        )
        plans.append(
            StagePlan(
                index=s,
                blocks=blocks,
                layers=range(parts[s], parts[s + 1]),
                params=params,
                in_flight=in_flight,
                memory=memory,
            )
        )
    return plans


# --- compute ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Compute:
    model_flops_per_token: int  # 6·N + 12·L·C·T
    hardware_flops_per_token: int  # + the recomputed forward under checkpointing
    flops_per_step: int  # model FLOPs of one optimizer step
    bubble_fraction: float  # (S − 1)/(M + S − 1)
    step_seconds: float  # estimate at ASSUMED_MFU of peak while busy, bubble included
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "assumed_mfu": ASSUMED_MFU,
            "formula": "6*N + 12*n_layer*d_model*seq_len per token (N: matmul parameters); "
            "checkpointing adds 2*N_blocks + 4*n_layer*d_model*seq_len",
        }


def estimate_compute(config: GPTConfig, counts: ParamCounts, layout: Layout) -> Compute:
    L, C, T = config.n_layer, config.d_model, layout.seq_len
    model = 6 * counts.matmul + 12 * L * C * T
    hardware = model + (2 * counts.blocks + 4 * L * C * T if layout.checkpointing else 0)
    S, M = layout.stages, layout.micro_batches
    bubble = (S - 1) / (M + S - 1)
    peak = GPU_TYPES[layout.gpu_type].peak_tflops[layout.precision] * 1e12
    busy = hardware * layout.tokens_per_step / (layout.gpus * peak * ASSUMED_MFU)
    step = busy / (1 - bubble)
    return Compute(
        model_flops_per_token=model,
        hardware_flops_per_token=hardware,
        flops_per_step=model * layout.tokens_per_step,
        bubble_fraction=bubble,
        step_seconds=step,
        tokens_per_second=layout.tokens_per_step / step,
    )


# --- plans -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Plan:
    name: str
    config: GPTConfig
    counts: ParamCounts
    layout: Layout
    stages: tuple[StagePlan, ...]
    compute: Compute
    capacity_bytes: int
    fits: bool
    reason: str
    chosen_by: str
    warnings: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return self.counts.total

    @property
    def worst(self) -> StagePlan:
        """The stage whose GPUs need the most memory (the first such, on a tie)."""
        return max(self.stages, key=lambda s: s.memory.total)

    @property
    def per_gpu_bytes(self) -> int:
        return self.worst.memory.total

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "model": self.name,
            "config": self.config.to_dict(),
            "params": self.params,
            "params_breakdown": self.counts.to_dict(),
            "layout": self.layout.to_dict(),
            "chosen_by": self.chosen_by,
            "fits": self.fits,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "per_gpu_bytes": self.per_gpu_bytes,
            "gpu_memory_bytes": self.capacity_bytes,
            "worst_stage": worst.index,
            "memory": worst.memory.to_dict(),
            "micro_batches": self.layout.micro_batches,
            "tokens_per_step": self.layout.tokens_per_step,
            "bubble_fraction": self.compute.bubble_fraction,
            "flops": self.compute.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
        }


def _gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"


def _advice(config: GPTConfig, layout: Layout, stage: StagePlan) -> str:
    """What to change when `stage` does not fit: aimed at its largest component."""
    m = stage.memory
    parts = {
        "weights": m.weights,
        "gradients": m.gradients,
        "optimizer states (FP32 master weights + Adam m, v)": m.optimizer_states,
        "activations": m.activations + m.fragmentation,
    }
    biggest = max(parts, key=lambda k: parts[k])
    size = f"the largest part is {biggest} at {_gib(parts[biggest])}"
    if biggest.startswith("optimizer"):
        if layout.zero == 0 and layout.dp > 1:
            return f"{size}: use --zero 1 to shard them over the {layout.dp} data-parallel ranks"
        return (
            f"{size}: shard them over more data-parallel ranks (--dp) or spread the layers "
            f"over more pipeline stages (--stages); both take more GPUs"
        )
    if biggest == "activations":
        if not layout.checkpointing:
            return f"{size}: turn on --checkpointing (keeps one (b, T, C) tensor per block)"
        if layout.micro_batch > 1:
            return f"{size}: lower --micro-batch (now {layout.micro_batch})"
        offload = "" if layout.cpu_checkpointing else "--cpu-checkpointing, "
        return (
            f"{size} for {stage.in_flight} micro-batches in flight (1F1B): use {offload}fewer "
            f"pipeline stages or a shorter --seq-len"
        )
    if layout.stages < config.n_layer:
        fix = "spread the layers over more pipeline stages (--stages), each GPU then holds fewer"
    else:
        fix = "every stage already holds one block: use GPUs with more memory (--gpu-type)"
    if layout.precision == "fp32":
        fix += ", or train in --fp16/--bf16 (half the bytes per weight)"
    return f"{size}: {fix}"


def evaluate(
    config: GPTConfig,
    layout: Layout,
    *,
    name: str = "custom",
    chosen_by: str = "explicit layout",
    counts: ParamCounts | None = None,
) -> Plan:
    """Parameters, memory per GPU, FLOPs and the verdict for one resolved layout."""
    counts = counts or count_params(config)
    stages = tuple(stage_plans(config, counts, layout))
    gpu = GPU_TYPES[layout.gpu_type]
    worst = max(stages, key=lambda s: s.memory.total)
    need = worst.memory.total
    fits = need <= gpu.memory_bytes
    where = f"a GPU of stage {worst.index} (the fullest)" if layout.stages > 1 else "each GPU"
    if fits:
        reason = (
            f"fits: {where} needs {_gib(need)} of the {gpu.name}'s "
            f"{_gib(gpu.memory_bytes)} ({_gib(gpu.memory_bytes - need)} to spare)"
        )
    else:
        reason = (
            f"does not fit: {where} needs {_gib(need)} but the {gpu.name} has "
            f"{_gib(gpu.memory_bytes)}; {_advice(config, layout, worst)}"
        )
    warnings = []
    if layout.precision == "fp16" and layout.zero == 0:
        warnings.append(
            "DeepSpeed 0.19.8 never scales the loss with fp16 and ZeRO stage 0 (PR #8393): use --zero 1"
        )
    S, M = layout.stages, layout.micro_batches
    if S > 1 and M < 4 * S:
        warnings.append(
            f"{M} micro-batches per step for {S} stages: the pipeline idles "
            f"{(S - 1) / (M + S - 1):.0%} of each step; --global-batch-tokens "
            f"{4 * S * layout.dp * layout.micro_batch * layout.seq_len} (M = 4·S) brings it "
            f"under 20%"
        )
    if config.tied_embeddings and S > 1:
        warnings.append(
            "tied embeddings: the last stage holds a replica of the Embedding (counted in its "
            "parameters); the engine keeps the two wte.weight copies equal"
        )
    if layout.cpu_checkpointing:
        host = max(s.memory.host_checkpoints for s in stages)
        warnings.append(
            f"CPU checkpointing: the engine must turn on DeepSpeed's activation_checkpointing."
            f"cpu_checkpointing (deepspeed.checkpointing.configure); a GPU of stage 0 parks "
            f"{_gib(host)} of checkpoints in host memory ({_gib(8 * host)} per 8-GPU host)"
        )
    if fits and gpu.memory_bytes - need < 2 * GiB:
        warnings.append(
            f"little headroom ({_gib(gpu.memory_bytes - need)}): keep DeepSpeed's "
            f"reduce/allgather bucket sizes ≤ 2e8 elements and watch the first step's peak"
        )
    return Plan(
        name=name,
        config=config,
        counts=counts,
        layout=layout,
        stages=stages,
        compute=estimate_compute(config, counts, layout),
        capacity_bytes=gpu.memory_bytes,
        fits=fits,
        reason=reason,
        chosen_by=chosen_by,
        warnings=tuple(warnings),
    )


def _fit(
    config: GPTConfig,
    req: LayoutRequest,
    layout: Layout,
    *,
    name: str,
    counts: ParamCounts,
    chosen_by: str,
) -> Plan:
    """Evaluate `layout`; where the request leaves CPU checkpointing open, use it if only
    that makes the layout fit."""
    p = evaluate(config, layout, name=name, chosen_by=chosen_by, counts=counts)
    if p.fits or req.cpu_checkpointing is not None or not layout.checkpointing:
        return p
    offloaded = evaluate(
        config,
        dataclasses.replace(layout, cpu_checkpointing=True),
        name=name,
        chosen_by=f"{chosen_by}; checkpoints in host memory, as they do not fit on the GPUs",
        counts=counts,
    )
    return offloaded if offloaded.fits else p


def _validate_common(config: GPTConfig, req: LayoutRequest) -> None:
    """The checks that do not depend on stages × dp (so a search can report them at once)."""
    get_gpu_type(req.gpu_type)
    if req.precision not in PRECISIONS:
        raise PlanError(f"precision {req.precision!r} is not one of {list(PRECISIONS)}")
    for name in ("gpus", "stages", "dp", "micro_batch", "seq_len", "global_batch_tokens"):
        _positive(name, getattr(req, name))
    config.check_seq_len(req.seq_len or config.seq_len)
    if req.zero is not None and req.zero not in (0, 1, 2, 3):
        raise PlanError(f"--zero {req.zero} is not a ZeRO stage; use 0, 1, 2 or 3")
    if req.cpu_checkpointing and not req.checkpointing:
        raise PlanError(
            "--cpu-checkpointing moves the checkpoints of activation checkpointing to host "
            "memory: it needs --checkpointing"
        )


def search_layout(
    config: GPTConfig,
    req: LayoutRequest,
    *,
    name: str = "custom",
    counts: ParamCounts | None = None,
) -> Plan:
    """The fitting layout of `req.gpus` GPUs with the fewest stages (see the module doc).

    When none fits, the plan of the layout that needs the least memory, with fits False.
    """
    if req.gpus is None:
        raise PlanError("a layout search needs --gpus N")
    _validate_common(config, req)
    counts = counts or count_params(config)
    gpus = req.gpus
    stage_counts = [s for s in range(1, min(gpus, config.n_layer) + 1) if gpus % s == 0]
    if req.zero is not None and req.zero >= 2:
        stage_counts = [1]  # ZeRO-2/3 need a pipeline of one stage
    closest: Plan | None = None
    skipped: list[str] = []
    for stages in stage_counts:
        try:
            layout = resolve_layout(config, dataclasses.replace(req, stages=stages, dp=gpus // stages))
        except PlanError as e:  # e.g. a global batch that this dp does not divide
            skipped.append(str(e))
            continue
        rule = f"search: of the stage counts {stage_counts} for {gpus} GPUs, the fewest that fit"
        p = _fit(config, req, layout, name=name, counts=counts, chosen_by=rule)
        if p.fits:
            return p
        if closest is None or p.per_gpu_bytes < closest.per_gpu_bytes:
            closest = p
    if closest is None:
        raise PlanError(f"no valid layout of {gpus} GPUs: {'; '.join(skipped)}")
    lay = closest.layout
    return dataclasses.replace(
        closest,
        chosen_by=f"search: no layout of {gpus} GPUs fits; the one needing the least memory",
        reason=f"no layout of {gpus} {lay.gpu_type} fits; the closest, {lay.stages} stages × "
        f"{lay.dp} data-parallel, {closest.reason.removeprefix('does not fit: ')}",
    )


def search_min_gpus(
    config: GPTConfig,
    req: LayoutRequest,
    *,
    name: str = "custom",
    counts: ParamCounts | None = None,
) -> Plan:
    """The smallest power-of-two GPU count with a fitting layout, and that layout."""
    _validate_common(config, req)
    counts = counts or count_params(config)
    last: Plan | None = None
    gpus = 1
    while gpus <= MAX_SEARCH_GPUS:
        try:
            p = search_layout(config, dataclasses.replace(req, gpus=gpus), name=name, counts=counts)
        except PlanError:
            p = None
        if p is not None and p.fits:
            return dataclasses.replace(
                p,
                chosen_by=f"search: {gpus} GPUs is the smallest power of two that fits; "
                f"of its layouts, the fewest stages"
                + ("; checkpoints in host memory" if p.layout.cpu_checkpointing else ""),
            )
        last = p or last
        gpus *= 2
    if last is None:
        raise PlanError(f"no valid layout for any power-of-two GPU count up to {MAX_SEARCH_GPUS}")
    return dataclasses.replace(
        last,
        chosen_by=f"search: nothing fits on up to {MAX_SEARCH_GPUS} GPUs",
        reason=f"nothing fits on up to {MAX_SEARCH_GPUS} {req.gpu_type}: {last.reason}",
    )


def plan(config: GPTConfig, req: LayoutRequest, *, name: str = "custom") -> Plan:
    """The planner's entry point (what `panal plan` calls).

    stages or dp given: that layout, checked. Only gpus: the best layout of that many GPUs.
    Nothing: the smallest power-of-two GPU count that fits. A plan that does not fit says
    in its reason how many GPUs would do.
    """
    counts = count_params(config)
    if req.stages is None and req.dp is None:
        if req.gpus is None:
            return search_min_gpus(config, req, name=name, counts=counts)
        result = search_layout(config, req, name=name, counts=counts)
    else:
        layout = resolve_layout(config, req)
        result = _fit(config, req, layout, name=name, counts=counts, chosen_by="explicit layout")
    if result.fits:
        return result
    hint_req = dataclasses.replace(req, gpus=None, stages=None, dp=None, zero=None)
    hint = search_min_gpus(config, hint_req, name=name, counts=counts)
    if hint.fits:
        h = hint.layout
        result = dataclasses.replace(
            result,
            reason=f"{result.reason}; this model fits on {h.gpus} {h.gpu_type} "
            f"({h.stages} stages × {h.dp} data-parallel, ZeRO-{h.zero}"
            f"{', CPU checkpointing' if h.cpu_checkpointing else ''})",
        )
    return result
