"""Measure one accuracy point: fine-tune a (pretrained) base with one method at one lr and seed; one results row.

Steps of a point (it runs in the worker subprocess, like a layer point; any failure is one error row):
1. the corpus (falqon_bench.measure.corpora) and the base: a named config with random init, pretrained in fp32 on the
   corpus's pretrain part for `pretrain_steps` (AdamW, `pretrain_lr`) once per (model, corpus, layers, seed,
   steps) and cached as a state dict under <run dir>/base/, or a local model directory as it is;
2. the method's conversion of the bf16 base (LLaMA attention and MLP projections, rank r);
3. `steps` AdamW steps on the task (finetune part), the method's after-step hook (FALQON's proxy update)
   after each; held-out loss (nats/token) and next-token accuracy at step 0, every `eval_every` steps and at
   the end, on the same fixed held-out batches for every method;
4. tokens/s from the median wall time of a training step of this same run (evaluation excluded);
   for falqon: the lost-update fraction of every step (merged entries with a nonzero delta whose fp8 value
   did not change, pooled over layers; counted on the device, read once at the end) and k.

Row keys beyond schema.REQUIRED_KEYS: kind, label, lr, seed, corpus, loss_floor, start_loss, final_loss,
final_acc, heldout_curve [{step, loss, acc}], train_loss (per step), diverged, tokens_per_s, trainable_params,
lost_fraction (per step, falqon), lost_fraction_mean, merged_rows_per_update, k, adapter_gain {min, median, max} and
adapter_capped_layers (falqon's a_scale option), grid_lrs, best_of_grid.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from falqon_bench.measure import envinfo, timing
from falqon_bench.measure.corpora import Corpus, make_corpus
from falqon_bench.data.schema import new_row
from falqon_bench.measure.worker import MeasureContext, record_failure
from falqon_bench.suites.accuracy_suite import identify_accuracy_row

WARMUP_STEPS_UNTIMED = 3


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a causal LM on batch x seq_len tokens."""
    return model(input_ids=tokens, labels=tokens).loss


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(held-out loss in nats per token, next-token accuracy) over fixed batches."""
    total_loss, total_hits, total = 0.0, 0.0, 0
    for tokens in batches:
        tokens = tokens.to(device)
        logits = model(input_ids=tokens).logits[:, :-1].float()
        target = tokens[:, 1:]
        total_loss += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        total_hits += float((logits.argmax(dim=-1) == target).sum())
        total += target.numel()
    return total_loss / total, total_hits / total


def base_cache_path(run_dir: str | None, point: dict[str, Any]) -> Path | None:
    o = point["options"]
    if run_dir is None:
        return None
    name = f"{point['layer']}-{o['corpus']}-L{o.get('layers')}-s{o['seed']}-p{o['pretrain_steps']}-{point['pretrain_lr']:g}.pt"
    return Path(run_dir) / "base" / name


def pretrained_base(point: dict[str, Any], corpus: Corpus, device: torch.device, run_dir: str | None) -> dict[str, torch.Tensor] | None:
    """The base's state dict after pretraining (cached per run), or None when there is nothing to pretrain."""
    from falqon_bench.suites.models import make_model

    o = point["options"]
    if not o["pretrain_steps"] or not corpus.can_pretrain:
        return None
    path = base_cache_path(run_dir, point)
    if path is not None and path.is_file():
        return torch.load(path, map_location=device, weights_only=True)
    model = make_model(point["model"], device, torch.float32, num_layers=o.get("layers"), seed=o["seed"], allow_pickle=point["allow_pickle"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=point["pretrain_lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(10_000 + o["seed"])
    for _ in range(o["pretrain_steps"]):
        loss = lm_loss(model, corpus.sample("pretrain", g, o["batch"], o["seq_len"]).to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # another worker (shard) finds a whole file or none
    return state


def measure_accuracy_point(point: dict[str, Any], ctx: MeasureContext) -> dict[str, Any]:
    """Fine-tune and evaluate one point; never raises (except Ctrl-C): a failure is an error row."""

    device = torch.device(ctx.device)
    row = new_row(point, envinfo.device_name(device))
    row.update(identify_accuracy_row(point))
    t0 = time.perf_counter()
    try:
        _fine_tune(point, ctx, device, row)
        row.update(status="ok", error=None)
    except Exception as e:  # one method's failure must not stop the sweep
        record_failure(row, e)
    finally:
        row["duration_s"] = round(time.perf_counter() - t0, 4)
    if row["status"] == "ok":
        row["best_of_grid"] = best_of_grid_so_far(row, ctx.run_dir)
    return row


def _fine_tune(point: dict[str, Any], ctx: MeasureContext, device: torch.device, row: dict[str, Any]) -> None:
    from falqon_core.convert import convert_model, projection_targets
    from falqon_core.methods import AdapterConfig
    from falqon_core.methods.falqon import falqon_layers

    from falqon_bench.suites.models import make_model

    o = point["options"]
    corpus = make_corpus(o["corpus"], o["seed"], point.get("corpus_path"), point["model"])
    row["loss_floor"] = corpus.loss_floor
    state = pretrained_base(point, corpus, device, ctx.run_dir)
    model = make_model(point["model"], device, torch.bfloat16, num_layers=o.get("layers"), seed=o["seed"], allow_pickle=point["allow_pickle"])
    vocab = int(model.config.vocab_size)
    if corpus.vocab_size > vocab:
        raise ValueError(f"corpus {corpus.name} has {corpus.vocab_size} token ids, the model's vocabulary only {vocab}")
    if state is not None:
        model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = AdapterConfig(rank=point["rank"], target_modules=projection_targets(model), options=dict(point["method_options"]), seed=o["seed"])
    torch.manual_seed(o["seed"])
    model, method = convert_model(model, point["method"], adapter)
    params = method.trainable_parameters(model)
    if not params:
        raise ValueError(f"{point['method']} has no trainable parameters")
    row["trainable_params"] = sum(p.numel() for p in params)
    layers = [layer for _, layer in falqon_layers(model)]
    if point.get("track_lost") and layers:
        for layer in layers:
            layer.track_lost = True
    optimizer = torch.optim.AdamW(params, lr=o["lr"], weight_decay=0.0)
    heldout = corpus.heldout_batches(point["eval_batches"], o["batch"], o["seq_len"])
    g = torch.Generator().manual_seed(20_000 + o["seed"])

    curve = []
    loss0, acc0 = evaluate(model, heldout, device)
    curve.append({"step": 0, "loss": loss0, "acc": acc0})
    train_losses: list[torch.Tensor] = []
    step_ms: list[float] = []
    snapshots: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    def train_step(tokens: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        return loss

    for step in range(1, o["steps"] + 1):
        tokens = corpus.sample("finetune", g, o["batch"], o["seq_len"]).to(device)
        loss, _, wall_ms = timing.timed_call(lambda: train_step(tokens), device)
        if step > WARMUP_STEPS_UNTIMED:
            step_ms.append(wall_ms)
        train_losses.append(loss.detach())
        if layers and point.get("track_lost"):
            snapshots.append(torch.stack([layer.lost_stats for layer in layers]).sum(dim=0))
        if step % point["eval_every"] == 0 or step == o["steps"]:
            loss_s, acc_s = evaluate(model, heldout, device)
            curve.append({"step": step, "loss": loss_s, "acc": acc_s})
    final = curve[-1]
    diverged = not math.isfinite(final["loss"])
    row.update(
        start_loss=loss0, final_loss=None if diverged else final["loss"], final_acc=final["acc"], diverged=diverged,
        heldout_curve=[{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in c.items()} for c in curve],
        train_loss=[float(v) if math.isfinite(float(v)) else None for v in train_losses],
        wall_ms=statistics.median(step_ms) if step_ms else None, wall_samples_ms=step_ms,
    )
    row["tokens_per_s"] = point["tokens"] / (row["wall_ms"] / 1e3) if row["wall_ms"] else None
    row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    if layers:
        row.update(lost_update_stats(snapshots, len(layers), o["steps"]))
        row["k"] = sorted({layer.last_k for layer in layers if layer.last_k is not None})
        gains = sorted(layer.adapter_gain for layer in layers)
        # the a_scale option's rescale of A (1.0 for the reference's SVD rows) and how many layers hit its cap
        row["adapter_gain"] = {"min": gains[0], "median": gains[len(gains) // 2], "max": gains[-1]}
        row["adapter_capped_layers"] = sum(layer.adapter_capped for layer in layers)


def lost_update_stats(snapshots: list[torch.Tensor], n_layers: int, steps: int) -> dict[str, Any]:
    """Per-step lost-update fraction from cumulative [lost, counted, rows] snapshots (one host read here)."""
    if not snapshots:
        return {"lost_fraction": None, "lost_fraction_mean": None, "merged_rows_per_update": None}
    cumulative = torch.stack(snapshots).cpu().double()
    per_step = torch.diff(cumulative, dim=0, prepend=torch.zeros(1, 3, dtype=torch.float64))
    fractions = [float(lost / counted) if counted > 0 else None for lost, counted, _ in per_step.tolist()]
    totals = cumulative[-1]
    return {
        "lost_fraction": fractions,
        "lost_fraction_mean": float(totals[0] / totals[1]) if totals[1] > 0 else None,
        # no row counted: the update's merges are not in lost_stats (flush_every = 1), not "no row merged"
        "merged_rows_per_update": float(totals[2]) / (n_layers * steps) if totals[2] > 0 else None,
    }


def best_of_grid_so_far(row: dict[str, Any], run_dir: str | None) -> dict[str, Any] | None:
    """The best lr of this row's label (lowest final held-out loss, mean over seeds) among the rows already in
    the run plus this one; `complete` when every lr of the grid is in. The report recomputes it from the file."""
    from falqon_bench.readers.accuracy_summary import best_of_grid

    rows = [row]
    if run_dir is not None and (Path(run_dir) / "points.jsonl").is_file():
        for line in (Path(run_dir) / "points.jsonl").read_text().splitlines():
            try:
                other = json.loads(line)
            except json.JSONDecodeError:
                continue
            if other.get("kind") == "accuracy" and other.get("label") == row["label"] and other.get("point_id") != row["point_id"]:
                rows.append(other)
    best = best_of_grid(rows).get(row["label"])
    if best is None:
        return None
    return {**best, "complete": set(row.get("grid_lrs") or []) <= set(best["lrs_seen"])}
