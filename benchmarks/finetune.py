"""Fine-tuning a pretrained pipeline's transformer (`tubelet train --init FOLDER`, full and
LoRA) against the same step written as a plain diffusers + torch loop (same run), and the
memory a worker holds for the published Wan 2.1 T2V 1.3B config.

    python benchmarks/finetune.py [--steps N] [--threads T] [--lora-rank R]
                                  [--skip-speed] [--skip-memory]

1. Speed, on this machine: benchmarks/pretrained.py's small random Wan 2.1 folder (a 6-layer
   transformer of 6 x 32 heads on 4 latent channels) and tests/pretrained.py's caption latent
   set (three buckets, global batch 4) with the folder's own caption features. The batches of
   `--steps` steps are made once (PlanLoader + the trainee's collate) and held in memory; both
   loops take them in the same order, with the same torch threads:
   - tubelet: `train_loop` in one process without Ray, as a Ray Train worker runs it (1-rank
     gloo FSDP2, per-sample seeded noise, flow loss, AdamW, grad clip 1.0, EMA update); its
     metrics.jsonl `step_s` (the final checkpoint and export come after the last step's time);
   - plain: `WanTransformer3DModel.from_pretrained` in float32 (LoRA: peft adapters on
     to_q/to_k/to_v/to_out.0 through `add_adapter`, the rest frozen), logit-normal t shifted
     by the scheduler's flow shift, x_t = (1 - t) x0 + t noise, MSE to noise - x0, backward,
     clip_grad_norm_(1.0), AdamW step, zero_grad; no EMA.
   Printed per loop and mode: median s/step after the warm-up steps, tokens/s (tokens of
   those steps over their summed time; tokens = B * T * H/2 * W/2) and the ratio
   plain / tubelet of s/step (> 1: tubelet is faster).
2. Memory per worker, computed (`--skip-speed`): the transformer built on the meta device
   (nothing downloaded), its LoRA adapters added there by peft. Full fine-tuning sharded by
   FSDP2 over N workers keeps fp32 params, fp32 grads, AdamW's two fp32 moments and the fp32
   EMA: 20 P / N bytes; LoRA keeps the frozen base in fp32 (FSDP2 shards one dtype per group)
   and 20 bytes per adapter parameter: (4 P + 20 A) / N. Activations and the gathered block
   of the forward and backward come on top.
3. Memory per worker, measured (tiny config, 1 worker): the loop's own `train_state` after an
   optimizer step, then a second backward: the bytes of the parameters, their gradients,
   AdamW's state and the EMA's shadow (local shards), against part 2's formula.
Not a test; a shared 2-core box is noisy (run twice).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from benchmarks.pretrained import WAN_TRANSFORMERS, params_on_meta, small_wan_pipeline  # noqa: E402
from models.finetune import LoraConfig  # noqa: E402

TARGETS = LoraConfig().targets  # the attention projections tubelet's LoRA adapts


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def tune_config(folder: Path, lora: int, steps: int):
    from pipeline.config import load_config
    from pipeline.train import TrainConfig

    return load_config(TrainConfig, ROOT / "configs/train/debug.yaml", [
        f"steps={steps}", "checkpoint_every=100000", "log_every=100000",
        "optim.warmup_steps=0", "optim.lr=0.0001", f"finetune.init={folder}",
        f"finetune.lora.rank={lora}"])


def planned(folder: Path, latents: Path, lora: int, steps: int):
    """(cfg as `tubelet train` resolves it, its trainee, the StepBatch of each step)."""
    import pyarrow as pa

    from actors.workers.train_data import PlanLoader, data_columns
    from actors.workers.train_dit import trainee_of
    from pipeline.train import planned_data

    with contextlib.redirect_stdout(io.StringIO()):  # its "[train] fine-tuning ..." line
        cfg, index, _ = planned_data(tune_config(folder, lora, steps), latents, 1)
    trainee = trainee_of(cfg)
    loader = PlanLoader(index, cfg.data, 1, 0, columns=data_columns(cfg))
    collate = trainee.collate()
    return cfg, trainee, [collate(loader(pa.table({"step": [s]}))) for s in range(steps)]


def tokens_of(batch) -> int:
    B, _, T, H, W = batch.x.shape
    return B * T * (H // 2) * (W // 2)


def tubelet_steps(cfg, trainee, batches, run: Path) -> list[tuple[float, float]]:
    """(seconds, tokens) of each step of tubelet's loop."""
    from actors.workers.toolkit import LocalBackend
    from actors.workers.train_dit import train_loop
    from pipeline.config import to_dict

    with contextlib.redirect_stdout(io.StringIO()):  # its progress line at the last step
        train_loop(cfg, LocalBackend(run), lambda start: iter(batches[start:]), run,
                   to_dict(cfg), trainee=trainee)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step_s"], r["tokens_per_s"] * r["step_s"]) for r in rows]


def plain_transformer(folder: Path, lora: int) -> torch.nn.Module:
    import diffusers
    import peft

    model = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer",
                                                            torch_dtype=torch.float32)
    if lora:
        model.add_adapter(peft.LoraConfig(r=lora, lora_alpha=lora, target_modules=TARGETS))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model.train()


def plain_steps(folder: Path, lora: int, batches, shift: float,
                seed: int = 0) -> list[tuple[float, float]]:
    """(seconds, tokens) of each step of the plain diffusers + torch loop."""
    torch.manual_seed(seed)
    model = plain_transformer(folder, lora)
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trained, lr=1e-4)
    out = []
    for batch in batches:
        t0 = time.perf_counter()
        x0, text = batch.x, batch.text
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(x0.shape[0]))
        t = shift * t / (1 + (shift - 1) * t)
        tt = t.view(-1, 1, 1, 1, 1)
        pred = model(hidden_states=(1 - tt) * x0 + tt * noise, timestep=t * 1000,
                     encoder_hidden_states=text, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred, noise - x0).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        out.append((time.perf_counter() - t0, tokens_of(batch)))
    return out


def summary(steps: list[tuple[float, float]], warm: int) -> tuple[float, float]:
    """(median s/step, tokens/s) over the steps after `warm`."""
    timed = steps[warm:]
    return (statistics.median(s for s, _ in timed),
            sum(n for _, n in timed) / sum(s for s, _ in timed))


def bench_speed(args, folder: Path, latents: Path, root: Path) -> None:
    warm = min(5, args.steps - 1)
    results = {}
    for mode, rank in (("full", 0), (f"LoRA r{args.lora_rank}", args.lora_rank)):
        cfg, trainee, batches = planned(folder, latents, rank, args.steps)
        ours = tubelet_steps(cfg, trainee, batches, root / f"run-{rank}")
        plain = plain_steps(folder, rank, batches, cfg.flow.shift_scale)
        results[mode] = summary(ours, warm), summary(plain, warm)
    n = params_on_meta(lambda: transformer_on_meta(folder, 0))
    print(f"fine-tune step, small random Wan 2.1 transformer ({n / 1e6:.2f}M params, 6 layers, "
          f"6 x 32 heads),\n  {args.threads} thread(s), global batch 4 over 3 buckets, "
          f"{args.steps} steps, medians after {warm}:")
    print(f"  {'loop':26s} {'mode':9s} {'s/step':>8s} {'tokens/s':>9s}  plain / tubelet")
    for mode, ((t_ours, tok_ours), (t_plain, tok_plain)) in results.items():
        print(f"  {'tubelet train_loop (FSDP2)':26s} {mode:9s} {t_ours:8.3f} {tok_ours:9.0f}")
        print(f"  {'diffusers + torch loop':26s} {mode:9s} {t_plain:8.3f} {tok_plain:9.0f}  "
              f"{t_plain / t_ours:.2f}x")


def transformer_on_meta(folder_or_name, lora: int) -> torch.nn.Module:
    """A published config (WAN_TRANSFORMERS name) or a folder's transformer, on the meta
    device, with peft LoRA adapters of rank `lora` (0: none)."""
    import diffusers
    import peft

    cls = diffusers.WanTransformer3DModel
    with torch.device("meta"):
        if isinstance(folder_or_name, Path):
            model = cls.from_config(cls.load_config(folder_or_name / "transformer"))
        else:
            model = cls(**WAN_TRANSFORMERS[folder_or_name])
        if lora:
            model.add_adapter(peft.LoraConfig(r=lora, lora_alpha=lora, target_modules=TARGETS))
    return model


def adapter_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def analytic_adapter_params(model: torch.nn.Module, rank: int) -> int:
    """r * (in + out) over the targeted nn.Linear modules (peft's suffix match)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)
               and any(name == t or name.endswith("." + t) for t in TARGETS))


def gib(n: float) -> str:
    return f"{n / 2**30:9.3f}"


def bench_memory_computed(args, folder: Path) -> None:
    workers = (1, 2, 8)
    print(f"memory per worker, computed (GiB): full 20 P / N, LoRA r{args.lora_rank} "
          "(4 P + 20 A) / N;\n  P params, A adapter params; activations and the gathered "
          "block come on top:")
    print(f"  {'model':22s} {'P':>13s} {'A':>11s} {'mode':5s}"
          + "".join(f"{f'N={n}':>10s}" for n in workers))
    for name in ("Wan 2.1 T2V 1.3B", folder):
        P = params_on_meta(lambda name=name: transformer_on_meta(name, 0))
        A = adapter_params(transformer_on_meta(name, args.lora_rank))
        check = analytic_adapter_params(transformer_on_meta(name, 0), args.lora_rank)
        label = name if isinstance(name, str) else "tiny (speed's folder)"
        for mode, total in (("full", 20 * P), ("LoRA", 4 * P + 20 * A)):
            print(f"  {label:22s} {P:13,d} {A:11,d} {mode:5s}"
                  + "".join(f" {gib(total / n)}" for n in workers))
            label = ""
        if check != A:
            print(f"  warning: peft added {A:,d} adapter params, r * (in + out) gives {check:,d}")


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def held_bytes(folder: Path, latents: Path, lora: int, root: Path) -> dict[str, int]:
    """The bytes tubelet's train state holds after one optimizer step and one more backward
    (its gradients), in this process (1 worker)."""
    from actors.workers.toolkit import LocalBackend, optimizer_step, process_group, train_state
    from actors.workers.train_dit import draw
    from models.flow import flow_loss

    cfg, trainee, batches = planned(folder, latents, lora, 2)
    cpu = torch.device("cpu")
    with process_group(cpu):
        state = train_state(lambda: trainee.build(cpu), cfg.optim, cfg.seed,
                            LocalBackend(root / f"held-{lora}"), "bench")
        for batch in batches:
            noise, t, drop = draw(batch, cfg, trainee.patch, trainee.text_dropout)
            loss = flow_loss(state.model, batch.x, t, noise, weight=batch.weight,
                             drop_text=drop, **trainee.inputs(batch))
            if batch is batches[0]:
                optimizer_step(state, loss, batch.weight.sum().reshape(1), 1, 1.0)
            else:
                loss.backward()
        params = list(state.model.parameters())
        return {"params": local_bytes(params),
                "grads": local_bytes(p.grad for p in params if p.grad is not None),
                "AdamW": local_bytes(v for s in state.optim.state.values() for v in s.values()
                                     if torch.is_tensor(v)),
                "EMA": local_bytes(state.ema.shadow.values())}


def computed_bytes(P: int, A: int) -> dict[str, int]:
    """Part 2's formula for 1 worker; LoRA: A > 0 (the base P frozen)."""
    trained = A or P
    return {"params": 4 * (P + A), "grads": 4 * trained, "AdamW": 8 * trained,
            "EMA": 4 * trained}


def bench_memory_measured(args, folder: Path, latents: Path, root: Path) -> None:
    P = params_on_meta(lambda: transformer_on_meta(folder, 0))
    A = adapter_params(transformer_on_meta(folder, args.lora_rank))
    print("memory held by tubelet's train state, tiny config, 1 worker (bytes; AdamW counts "
          "its step counters too):")
    print(f"  {'mode':8s} {'part':7s} {'measured':>12s} {'computed':>12s}  measured / computed")
    for mode, rank, adapters in (("full", 0, 0), (f"LoRA r{args.lora_rank}", args.lora_rank, A)):
        held, want = held_bytes(folder, latents, rank, root), computed_bytes(P, adapters)
        held["total"], want["total"] = sum(held.values()), sum(want.values())
        for part in held:
            print(f"  {mode:8s} {part:7s} {held[part]:12,d} {want[part]:12,d}  "
                  f"{held[part] / want[part]:.4f}")
            mode = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both loops")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.steps < 2 or args.lora_rank < 1:
        parser.error("--steps must be >= 2 and --lora-rank >= 1")
    torch.set_num_threads(args.threads)
    if args.skip_speed and args.skip_memory:
        return
    quiet()
    from tests.pretrained import write_caption_latents

    with tempfile.TemporaryDirectory(prefix="tubelet-bench-") as tmp:
        root = Path(tmp)
        folder = small_wan_pipeline(root / "wan")
        if not args.skip_memory:
            bench_memory_computed(args, folder)
        latents = write_caption_latents(folder, root / "latents")
        if not args.skip_speed:
            bench_speed(args, folder, latents, root)
        if not args.skip_memory:
            bench_memory_measured(args, folder, latents, root)


if __name__ == "__main__":
    main()
