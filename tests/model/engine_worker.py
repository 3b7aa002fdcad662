"""One rank of a DeepSpeed pool for the engine tests, run as its own OS process.

    python -m tests.model.engine_worker SCENARIO RANK WORLD STAGES PORT OUT_DIR [STORE]

Writes OUT_DIR/rank{RANK}.json with what the scenario observed.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

from model.engine import StageEngine, TrainConfig, World, micro_batch_iter  # noqa: E402
from model.presets import get_preset  # noqa: E402

MICRO, ACCUM, STEPS = 2, 2, 20


def config():
    return get_preset("tiny")


def make_batch(step: int, i: int, vocab: int, seq: int):
    """A learnable stream: arithmetic progressions mod vocab (the next token is predictable)."""
    g = torch.Generator().manual_seed(10_000 * step + i)
    start = torch.randint(0, vocab, (MICRO, 1), generator=g)
    stride = torch.randint(1, 7, (MICRO, 1), generator=g)
    seqs = (start + stride * torch.arange(seq + 1)) % vocab  # (B, T+1)
    return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()


def engine(rank, world, stages, port, total_steps=STEPS, lr=6e-4):
    cfg = config()
    tc = TrainConfig(total_steps=total_steps, micro_batch=MICRO, grad_accum=ACCUM, precision="fp32", lr=lr)
    return StageEngine(
        cfg, tc, World(rank=rank, world_size=world, stages=stages, master_port=port, timeout_s=60)
    )


def batches(eng, step):
    cfg = eng.config
    return micro_batch_iter(lambda s, i: make_batch(s, i, cfg.vocab_size, cfg.seq_len), step, ACCUM)


def train(eng, steps, first=0):
    losses, lrs = [], []
    for step in range(first, first + steps):
        lrs.append(eng.lr)
        losses.append(eng.train_step(batches(eng, step)))
    return losses, lrs


def main() -> None:
    scenario, rank, world, stages, port, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
    result: dict = {"rank": rank}
    if scenario == "parity":
        eng = engine(rank, world, stages, port)
        import hashlib

        result["initial"] = {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in eng.get_weights().items()
        }
        result["losses"], result["lrs"] = train(eng, STEPS)
        result["stage"] = eng.stage_id
        result["names"] = eng.stage_names()
    elif scenario == "master":
        eng = engine(rank, world, stages, port, lr=1e-6)
        train(eng, 2)
        before = eng.get_weights()
        shifted = {k: v + 0.5 for k, v in before.items()}
        # Writing only the module's parameters is undone by the optimizer's master copy ...
        with torch.no_grad():
            for name, p in eng.module.named_parameters():
                p.copy_(shifted[name])
        train(eng, 1, first=2)
        after_module_only = eng.get_weights()
        result["module_only_max_dev_from_old"] = max(
            float((after_module_only[k] - before[k]).abs().max()) for k in before
        )
        # ... set_weights writes both, so the change survives the next inner step.
        target = {k: v + 0.5 for k, v in after_module_only.items()}
        eng.set_weights(target)
        roundtrip = eng.get_weights()
        result["roundtrip_exact"] = all(torch.equal(roundtrip[k], target[k]) for k in target)
        train(eng, 1, first=3)
        after = eng.get_weights()
        result["set_max_dev_from_target"] = max(float((after[k] - target[k]).abs().max()) for k in target)
        module = dict(eng.module.named_parameters())
        result["module_matches_master"] = all(
            torch.equal(module[k].detach().float(), after[k]) for k in after
        )
    elif scenario in ("resume-straight", "resume-save", "resume-load"):
        from model.checkpoint import load_checkpoint, save_checkpoint
        from protocol.identity import Identity
        from storage.local import LocalStore

        store = LocalStore(sys.argv[7])
        eng = engine(rank, world, stages, port, total_steps=8)
        ident = Identity(bytes(32))
        if scenario == "resume-straight":
            result["losses"], result["lrs"] = train(eng, 8)
        elif scenario == "resume-save":
            result["losses"], _ = train(eng, 4)
            result["cid"] = save_checkpoint(eng, store, ident, job="test", round=0)
        else:
            cid = open(os.path.join(out, "cid")).read().strip()
            body = load_checkpoint(eng, store, cid, trusted={ident.public_key})
            result["step"] = body.step
            result["losses"], result["lrs"] = train(eng, 4, first=4)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
