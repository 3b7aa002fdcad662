"""GPU training-step benchmark, baselines measured in the same run.

    python bench/train_step.py [--steps 30] [--warmup 5] [--micro-batch 8] [--seq-len 1024]

1. A ~400M-parameter GPT through panal's engine (DeepSpeed PipelineModule, one
   stage, FP16 with dynamic loss scaling, ZeRO-1) vs the same model in plain
   PyTorch AMP (fp16 autocast, GradScaler, fused AdamW): tokens/s and MFU.
   Target: engine >= 0.95x AMP.
2. One layer of the `1t` preset (d_model 25600, 160 heads, seq 2048), forward +
   backward in FP16, in TFLOP/s relative to this GPU's measured 8192^3 FP16
   matmul peak. Target: >= 0.75x.

Needs a CUDA GPU. Ratios are the figures; absolute numbers are context.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.config import GPTConfig  # noqa: E402
from model.gpt import GPT, Block, loss_fn  # noqa: E402
from model.plan import count_params  # noqa: E402
from model.presets import get_preset  # noqa: E402

CONFIG_400M = GPTConfig(vocab_size=50_000, seq_len=1024, n_layer=24, n_head=16, d_model=1024)


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    t0 = sync_time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (sync_time() - t0)


def batches(
    cfg: GPTConfig, micro: int, accum: int, count: int
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` steps of ``accum`` micro-batches each, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(count):
        step = []
        for _ in range(accum):
            seq = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len + 1), device="cuda", generator=g)
            step.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
        out.append(step)
    return out


def bench_amp(cfg: GPTConfig, data: list, warmup: int, steps: int) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    model = GPT(cfg, seed=0, check_token_ids=False).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    losses = []

    def step(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for x, y in micro_batches:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            scaler.scale(loss / len(micro_batches)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(warmup):
        step(data[i])
    t0 = sync_time()
    for i in range(warmup, warmup + steps):
        losses.append(step(data[i]))
    seconds = sync_time() - t0
    tokens = steps * sum(x.numel() for x, _ in data[0])
    return tokens / seconds, [float(x) for x in losses]


def bench_engine(
    cfg: GPTConfig, data: list, warmup: int, steps: int, micro: int, accum: int
) -> tuple[float, list[float], float]:
    from model.engine import StageEngine, TrainConfig, World

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tc = TrainConfig(
        total_steps=10_000,
        micro_batch=micro,
        grad_accum=accum,
        precision="fp16",
        warmup_frac=0.0,
        check_token_ids=False,  # as in the AMP baseline: the data path checks ids on the host
    )
    eng = StageEngine(cfg, tc, World(rank=0, world_size=1, stages=1, master_port=port, backend="nccl"))
    losses = []
    for i in range(warmup):
        eng.train_step(iter(data[i]))
    t0 = sync_time()
    for i in range(warmup, warmup + steps):
        losses.append(eng.train_step(iter(data[i])))
    seconds = sync_time() - t0
    tokens = steps * sum(x.numel() for x, _ in data[0])
    scale = (
        float(eng.engine.optimizer.cur_scale) if hasattr(eng.engine.optimizer, "cur_scale") else float("nan")
    )
    return tokens / seconds, losses, scale


def bench_1t_layer(batch: int = 1, reps: int = 5) -> tuple[float, float, float]:
    cfg = get_preset("1t")
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        block = Block(cfg, 0, seed=0)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in block.parameters())
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, device="cuda", dtype=torch.float16, requires_grad=True)
    grad = torch.randn_like(x)

    def once() -> None:
        y = block(x)
        y.backward(grad)

    for _ in range(2):
        once()
    torch.cuda.reset_peak_memory_stats()
    t0 = sync_time()
    for _ in range(reps):
        once()
    seconds = (sync_time() - t0) / reps
    return seconds, params, batch * cfg.seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--skip-1t", action="store_true", help="only the 400M comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train_step.py needs a CUDA GPU")
    os.environ.setdefault("PANAL_LOCAL_RANK", "0")
    torch.backends.cuda.matmul.allow_tf32 = True

    peak = matmul_peak()
    print(f"GPU: {torch.cuda.get_device_name()}; measured 8192^3 fp16 matmul: {peak / 1e12:.0f} TFLOP/s")

    cfg = CONFIG_400M.replace(seq_len=args.seq_len)
    counts = count_params(cfg)
    flops_per_token = 6 * counts.matmul + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
    data = batches(cfg, args.micro_batch, args.grad_accum, args.warmup + args.steps)
    amp_tps, amp_losses = bench_amp(cfg, data, args.warmup, args.steps)
    torch.cuda.empty_cache()  # the AMP model is gone with bench_amp's frame
    eng_tps, eng_losses, scale = bench_engine(
        cfg, data, args.warmup, args.steps, args.micro_batch, args.grad_accum
    )
    print(
        f"\n{counts.total / 1e6:.0f}M-parameter GPT, {args.grad_accum} micro-batches of "
        f"{args.micro_batch} x {cfg.seq_len} tokens per step, fp16"
    )
    print(f"{'':28} {'tokens/s':>10} {'MFU':>7}")
    for name, tps in (("plain PyTorch AMP", amp_tps), ("panal engine (DS fp16 Z1)", eng_tps)):
        print(f"{name:28} {tps:10,.0f} {tps * flops_per_token / peak:7.1%}")
    print(f"ratio engine / AMP: {eng_tps / amp_tps:.3f}  (target >= 0.95); loss scale {scale:.0f}")
    print(f"final losses: AMP {amp_losses[-1]:.4f}, engine {eng_losses[-1]:.4f}")

    if args.skip_1t:
        return
    seconds, params, tokens = bench_1t_layer()
    cfg1t = get_preset("1t")
    layer_flops = 6 * params * tokens + 12 * cfg1t.d_model * cfg1t.seq_len * tokens
    tflops = layer_flops / seconds
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"\none 1t layer (d_model {cfg1t.d_model}, {params / 1e9:.2f} B params), seq {cfg1t.seq_len}, fwd+bwd fp16:"
    )
    print(f"{seconds:.3f} s, {tflops / 1e12:.0f} TFLOP/s, peak memory {mem:.1f} GiB")
    print(f"ratio to measured matmul peak: {tflops / peak:.3f}  (target >= 0.75)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "matmul_peak_tflops": peak / 1e12,
                    "amp_tokens_per_s": amp_tps,
                    "engine_tokens_per_s": eng_tps,
                    "engine_over_amp": eng_tps / amp_tps,
                    "amp_mfu": amp_tps * flops_per_token / peak,
                    "engine_mfu": eng_tps * flops_per_token / peak,
                    "layer_1t_seconds": seconds,
                    "layer_1t_tflops": tflops / 1e12,
                    "layer_1t_over_peak": tflops / peak,
                    "layer_1t_peak_gib": mem,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
