"""The DeepSpeed engine wrapper: one pipeline stage of one pool.

``model/gpt.py`` knows nothing of parallelism; this file maps its layer list
onto DeepSpeed's ``PipelineModule`` (``LayerSpec`` per layer, ``TiedLayerSpec``
for a tied embedding), cuts it where ``model/partition.py`` says, builds the
DeepSpeed config (FP16 with dynamic loss scaling and FP32 master weights on
GPU; fp32 or bf16 on CPU; ZeRO-1; AdamW with warm-up and cosine decay;
gradient clipping; activation checkpointing) and joins the pool's DeepSpeed
world with the rank, world size and master address handed over from code.

It exposes what a node needs: a train step, an eval step, and get/set of the
stage's weights. Setting weights writes the module's parameters *and* the
optimizer's FP32 master copy; DeepSpeed would otherwise copy its stale master
back over the module at the next step (FACTS.md).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as tdist

from model.config import GPTConfig, ModelConfigError
from model.gpt import Block, Embedding, FinalNorm, LMHead, loss_fn
from model.partition import pipeline_parts

Precision = Literal["fp16", "bf16", "fp32"]
Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids (B, T), labels (B, T)), int64


class EngineError(ModelConfigError):
    """The engine cannot be built or used as asked; the message names the fix."""


def default_precision() -> Precision:
    return "fp16" if torch.cuda.is_available() else "fp32"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How one pool trains: the optimizer, schedule, precision and batch shape."""

    total_steps: int
    micro_batch: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step (and per pipeline flush)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.02
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: Precision = field(default_factory=default_precision)
    zero_stage: int = 1
    activation_checkpointing: bool = False
    # Keep the checkpointed activations in host memory (what the planner asks for when a
    # stage does not fit otherwise, e.g. the 1t preset on A100-80GB).
    cpu_checkpointing: bool = False
    # The embedding refuses ids outside the vocabulary; on a GPU that costs a host sync per
    # micro-batch, so a data path that already checked its ids may turn it off.
    check_token_ids: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("total_steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise EngineError(f"precision {self.precision!r} is not one of fp16, bf16, fp32")
        if self.zero_stage not in (0, 1):
            raise EngineError(
                f"zero_stage {self.zero_stage} is incompatible with pipeline parallelism "
                "(DeepSpeed asserts on ZeRO-2/3 with pipelines); use zero_stage 1"
            )
        if self.precision != "fp32" and self.zero_stage == 0:
            raise EngineError(
                f"{self.precision} with ZeRO stage 0 is not supported (fp16 never scales the loss "
                "there, FACTS.md); use zero_stage 1"
            )
        if self.cpu_checkpointing and not self.activation_checkpointing:
            raise EngineError("cpu_checkpointing needs activation_checkpointing; turn both on")
        if not 0 <= self.warmup_frac < 1:
            raise EngineError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")

    @property
    def warmup_steps(self) -> int:
        return max(1, math.ceil(self.warmup_frac * self.total_steps))


def deepspeed_config(tc: TrainConfig, *, dp: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict for a TrainConfig (a plain function: tests read it)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch * tc.grad_accum * dp,
        # torch_adam: the fused kernels compile for minutes on first use (FACTS.md).
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tc.lr,
                "betas": list(tc.betas),
                "eps": 1e-8,
                "weight_decay": tc.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": tc.total_steps,
                "warmup_num_steps": tc.warmup_steps,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": tc.min_lr_ratio,
            },
        },
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if tc.activation_checkpointing:
        cfg["activation_checkpointing"] = {
            "partition_activations": False,
            "cpu_checkpointing": tc.cpu_checkpointing,
            "contiguous_memory_optimization": False,
            "synchronize_checkpoint_boundary": False,
        }
    if tc.precision == "fp16":
        # Dynamic loss scaling; FP32 master weights live in the ZeRO-1 optimizer.
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif tc.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


@dataclass(frozen=True, kw_only=True)
class World:
    """A pool's DeepSpeed world as a coordinator hands it to a node."""

    rank: int
    world_size: int
    stages: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = field(default_factory=lambda: "nccl" if torch.cuda.is_available() else "gloo")
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.stages < 1 or self.world_size % self.stages:
            raise EngineError(
                f"world size {self.world_size} is not a multiple of {self.stages} pipeline stages; "
                "use world_size = stages × data-parallel degree"
            )
        if not 0 <= self.rank < self.world_size:
            raise EngineError(f"rank {self.rank} is outside the world of {self.world_size}")

    @property
    def dp(self) -> int:
        return self.world_size // self.stages


def _attend(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return embedding.attend(x)


def layer_specs(config: GPTConfig, seed: int, check_token_ids: bool = True) -> list[Any]:
    """``build_layers`` as DeepSpeed layer specs: the same classes, arguments and init."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs: list[Any] = []
    if config.tied_embeddings:
        specs.append(
            TiedLayerSpec(
                "embed",
                Embedding,
                config,
                seed=seed,
                check_token_ids=check_token_ids,
                tied_weight_attr="wte.weight",
            )
        )
    else:
        specs.append(LayerSpec(Embedding, config, seed=seed, check_token_ids=check_token_ids))
    specs += [LayerSpec(Block, config, i, seed=seed) for i in range(config.n_layer)]
    specs.append(LayerSpec(FinalNorm, config))
    if config.tied_embeddings:
        # The last stage holds its own copy of the embedding; DeepSpeed keeps the two equal.
        specs.append(
            TiedLayerSpec(
                "embed", Embedding, config, seed=seed, forward_fn=_attend, tied_weight_attr="wte.weight"
            )
        )
    else:
        specs.append(LayerSpec(LMHead, config, seed=seed))
    return specs


def _pipeline_module(config: GPTConfig, tc: TrainConfig, stages: int) -> torch.nn.Module:
    from deepspeed.pipe import PipelineModule

    class PanalPipeline(PipelineModule):  # type: ignore[misc]
        """PipelineModule cut where model/partition.py says (what the planner sized)."""

        def _partition_layers(self, method: str = "panal") -> None:
            self.parts = pipeline_parts(config.n_layer, stages)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return PanalPipeline(
        layers=layer_specs(config, tc.seed, tc.check_token_ids),
        num_stages=stages,
        loss_fn=loss_fn,
        partition_method="panal",
        activation_checkpoint_interval=1 if tc.activation_checkpointing else 0,
        checkpointable_layers=["Block"],
    )


def join_world(world: World) -> None:
    """Join the pool's process group with rank and world size given from code (FACTS.md)."""
    import deepspeed

    if tdist.is_initialized():
        return
    os.environ["LOCAL_RANK"] = os.environ.get("PANAL_LOCAL_RANK", "0")
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.world_size))
    deepspeed.init_distributed(
        dist_backend=world.backend,
        auto_mpi_discovery=False,
        init_method=f"tcp://{world.master_addr}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
        timeout=dt.timedelta(seconds=world.timeout_s),
    )


class StageEngine:
    """One rank of a pool: a pipeline stage (and a data-parallel replica of it)."""

    def __init__(self, config: GPTConfig, tc: TrainConfig, world: World) -> None:
        import deepspeed

        if world.stages > config.n_layer:
            raise EngineError(
                f"{world.stages} pipeline stages for {config.n_layer} layers: use at most "
                f"{config.n_layer} stages"
            )
        if tc.precision == "fp16" and not torch.cuda.is_available():
            raise EngineError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use --precision fp32 or bf16")
        self.config = config
        self.tc = tc
        self.world = world
        join_world(world)
        torch.manual_seed(tc.seed)
        module = _pipeline_module(config, tc, world.stages)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            config=deepspeed_config(tc, dp=world.dp),
            model_parameters=[p for p in module.parameters() if p.requires_grad],
        )
        self.module: torch.nn.Module = self.engine.module
        self.stage_id: int = self.engine.stage_id
        self.layer_range = range(self.module._local_start, self.module._local_stop)
        self.dp_rank: int = self.engine.grid.get_data_parallel_rank()

    # ---------------------------------------------------------------- topology

    @property
    def is_first(self) -> bool:
        return bool(self.engine.is_first_stage())

    @property
    def is_last(self) -> bool:
        return bool(self.engine.is_last_stage())

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------- steps

    def train_step(self, micro_batches: Iterator[Batch]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; the mean loss (on every stage)."""
        loss = self.engine.train_batch(data_iter=micro_batches)
        return float(loss)

    def eval_step(self, micro_batches: Iterator[Batch], n: int | None = None) -> float:
        """Mean loss over ``n`` micro-batches (default grad_accum), without gradients."""
        loss = self.engine.eval_batch(data_iter=micro_batches, num_micro_batches=n or self.tc.grad_accum)
        return float(loss)

    # ---------------------------------------------------------------- weights

    def stage_names(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()]

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The stage's weights in FP32, read from the optimizer's master copy (exact, unrounded)."""
        params = dict(self.module.named_parameters())
        flats = self._master_flats()
        if flats is None:  # fp32 without ZeRO: the module's parameters are the master weights
            return {n: p.detach().float().clone() for n, p in params.items()}
        names = {id(p): n for n, p in params.items()}
        out: dict[str, torch.Tensor] = {}
        for group, bit16_flat, full in flats:
            for p in group:
                off = self._offset(p, bit16_flat)
                out[names[id(p)]] = full[off : off + p.numel()].view(p.shape).clone()
        return out

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load FP32 weights into the module *and* the optimizer's FP32 master copy."""
        params = dict(self.module.named_parameters())
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        if missing or extra:
            raise EngineError(
                f"weights do not fit stage {self.stage_id}: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, p in params.items():
            if tuple(weights[name].shape) != tuple(p.shape):
                raise EngineError(
                    f"weight {name!r} has shape {list(weights[name].shape)}, the stage has {list(p.shape)}"
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(dtype=p.dtype, device=p.device))
            opt = self.engine.optimizer
            partitions = getattr(opt, "single_partition_of_fp32_groups", None)
            if partitions is None:
                self._check_plain_optimizer()
                return
            names = {id(p): n for n, p in params.items()}
            pid = tdist.get_rank(group=opt.dp_process_group)
            for i, bit16_flat in enumerate(opt.bit16_groups_flat):
                full = torch.zeros(bit16_flat.numel(), dtype=torch.float32)
                for p in opt.bit16_groups[i]:
                    off = self._offset(p, bit16_flat)
                    full[off : off + p.numel()] = weights[names[id(p)]].reshape(-1).float()
                part = partitions[i]
                part.data.copy_(full.narrow(0, pid * part.numel(), part.numel()).to(part.device))

    def _check_plain_optimizer(self) -> None:
        # Only a plain torch optimizer (fp32, ZeRO-0) has no separate master copy.
        opt = self.engine.optimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise EngineError(f"cannot update the master weights of {type(opt).__name__}; use ZeRO stage 1")

    @staticmethod
    def _offset(p: torch.Tensor, flat: torch.Tensor) -> int:
        return (p.data_ptr() - flat.data_ptr()) // flat.element_size()

    def _master_flats(self) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] | None:
        """Per param group: (params, bit16 flat buffer, the whole FP32 master flat gathered over dp)."""
        opt = self.engine.optimizer
        partitions = getattr(opt, "single_partition_of_fp32_groups", None)
        if partitions is None:
            self._check_plain_optimizer()
            return None
        out = []
        for i, bit16_flat in enumerate(opt.bit16_groups_flat):
            part = partitions[i].detach().float().cpu()
            world = tdist.get_world_size(group=opt.dp_process_group)
            if world > 1:
                pieces = [torch.empty_like(part) for _ in range(world)]
                tdist.all_gather(pieces, part.to(partitions[i].device), group=opt.dp_process_group)
                full = torch.cat([x.cpu() for x in pieces])
            else:
                full = part
            out.append((list(opt.bit16_groups[i]), bit16_flat, full))
        return out

    # ---------------------------------------------------------------- optimizer state

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's share of the optimizer state (Adam moments, step) and the schedule position."""
        opt = self.engine.optimizer
        state: dict[str, torch.Tensor] = {}
        partitions = getattr(opt, "single_partition_of_fp32_groups", None)
        if partitions is not None:
            tensors = list(partitions)
            inner = opt.optimizer
        else:
            self._check_plain_optimizer()
            tensors = [p for g in opt.param_groups for p in g["params"]]
            inner = opt
        for i, t in enumerate(tensors):
            st = inner.state.get(t, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    state[f"{i}.{key}"] = st[key].detach().cpu().clone()
            if "step" in st:
                state[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1).cpu()
            if partitions is not None:
                state[f"{i}.master"] = t.detach().float().cpu().clone()
        state["global_steps"] = torch.tensor([self.engine.global_steps], dtype=torch.int64)
        state["global_samples"] = torch.tensor([self.engine.global_samples], dtype=torch.int64)
        if self.scheduler is not None:
            state["scheduler_iteration"] = torch.tensor(
                [self.scheduler.last_batch_iteration], dtype=torch.int64
            )
        return state

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        opt = self.engine.optimizer
        partitions = getattr(opt, "single_partition_of_fp32_groups", None)
        if partitions is not None:
            tensors = list(partitions)
            inner = opt.optimizer
        else:
            self._check_plain_optimizer()
            tensors = [p for g in opt.param_groups for p in g["params"]]
            inner = opt
        with torch.no_grad():
            for i, t in enumerate(tensors):
                if f"{i}.master" in state:
                    t.data.copy_(state[f"{i}.master"].to(t.device))
                if f"{i}.exp_avg" not in state:
                    continue
                st = inner.state[t]
                st["exp_avg"] = state[f"{i}.exp_avg"].to(t.device).clone()
                st["exp_avg_sq"] = state[f"{i}.exp_avg_sq"].to(t.device).clone()
                st["step"] = torch.tensor(float(state[f"{i}.step"].item()))
            if partitions is not None:
                # The module's (bit16) weights are the master partitions, all-gathered.
                for i, bit16_flat in enumerate(opt.bit16_groups_flat):
                    part = partitions[i]
                    world = tdist.get_world_size(group=opt.dp_process_group)
                    pieces = [torch.empty_like(part) for _ in range(world)]
                    tdist.all_gather(pieces, part.data, group=opt.dp_process_group)
                    bit16_flat.data.copy_(torch.cat(pieces)[: bit16_flat.numel()].to(bit16_flat.dtype))
        self.engine.global_steps = int(state["global_steps"].item())
        self.engine.global_samples = int(state["global_samples"].item())
        if self.scheduler is not None and "scheduler_iteration" in state:
            self.scheduler.step(int(state["scheduler_iteration"].item()))


def micro_batch_iter(make: Callable[[int, int], Batch], step: int, grad_accum: int) -> Iterator[Batch]:
    """The micro-batches of optimizer step ``step``: ``make(step, i)`` for i < grad_accum."""
    for i in range(grad_accum):
        yield make(step, i)
