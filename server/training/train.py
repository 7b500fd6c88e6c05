"""Training of the severity network on cached face crops (the paper's recipe).

Loss = cross-entropy + λ · center loss (Wen et al. 2016). As in that paper the
class centers are not moved by the optimiser but by their own rule with rate
α: c_j ← c_j − α · Σ_{i∈j}(c_j − x_i) / (1 + n_j), so λ weighs how hard the
embeddings are pulled to their centers and α how fast the centers follow.
Defaults λ = 0.003 and α = 0.5 (Wen et al.'s values).

Augmentation follows the paper: brightness, saturation, Gaussian noise and
horizontal flip, applied in torch on whole batches on the training device; a
small random shift stands in for landmark jitter between video frames.

With `distill` (a descriptor file from `training.descriptors`), a linear head on the
512-d embedding is also trained to point where dlib's face-recognition descriptor of the
same crop points (loss weight `distill_weight` on 1 − cosine similarity): features learnt
from millions of faces, which the few hundred training people cannot teach. The head is
used only in training; the saved network is the serving architecture.

With `ema_decay` > 0, validation, early stopping and the saved weights use an
exponential moving average of the weights (and BatchNorm statistics): on a few
hundred identities the raw weights' validation accuracy swings by several points
from epoch to epoch, and the average does not.

Validation uses whole source identities (a phantom subject `<identity>-L<k>`
belongs to the group `<identity>`), so no person is on both sides. Early stopping
watches validation accuracy; a temperature fitted on validation logits (LBFGS on
the NLL) makes the probabilities honest.

Only torch, numpy and safetensors are needed here when DATA is a crop cache
(.npz): dlib and the Haar cascade are imported only to build crops.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..runtime.model import EMBEDDING_SIZE, SeverityNet, center_loss
from ..runtime.card import KINDS, ModelCard, Preprocessing
from ..runtime.weights import load_weights, read_facenet_checkpoint, save_weights
from .crops import CropSet, load_or_build_crops, training_preprocessing

_PHANTOM_SUFFIX = re.compile(r"-L[123]$")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run depends on; saved as JSON next to the weights."""

    data: Path
    out: Path
    cache: Path | None = None  # crop cache for DATA (built once); ignored when DATA is an .npz
    kind: str = "phantom-demo"
    name: str = "acroscreen-phantom-demo"
    version: str = "0.1.0"
    backbone_weights: Path | None = None  # facenet-pytorch InceptionResnetV1 state dict (.pt)
    init_weights: Path | None = None  # acroscreen .safetensors to fine-tune from (all layers and centers)
    seed: int = 0
    batch_size: int = 96
    max_samples: int = 300_000  # training samples seen (epochs × crops), before early stopping
    max_minutes: float = 0.0  # wall-clock cap for the loop; 0 = none. The LR schedule shrinks to fit (resumes keep it)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.03
    dropout: float = 0.2
    ema_decay: float = 0.0  # 0 = off; else validated and saved weights are this EMA of the trained ones
    center_weight: float = 0.003  # λ
    center_lr: float = 0.5  # α
    distill: Path | None = None  # dlib face descriptors of the training crops (training.descriptors); None = off
    distill_weight: float = 1.0  # weight of 1 − cosine(head(embedding), descriptor) in the loss
    val_fraction: float = 0.15  # share of identities held out for early stopping and temperature
    val_groups: tuple[str, ...] | None = None  # the validation people (split_group names); None: drawn by seed
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    patience: int = 10  # validations without improvement before stopping
    brightness: float = 0.2  # ± fraction of the full range
    saturation: float = 0.4  # factor drawn from [1 - s, 1 + s]
    noise_std: float = 6.0  # max σ of the Gaussian pixel noise, in 0..255 units
    shift_px: int = 4  # max random translation
    device: str | None = None  # default: cuda if available
    amp: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    workers: int | None = None  # crop-building processes
    landmark_points: int = 5  # 68: crops also undo yaw ("frontal-3d-v1"); dlib's 68-point model is research-only
    checkpoint: Path | None = None  # resumable training state, written every checkpoint_every steps
    checkpoint_every: int = 200
    int8_calibration_crops: int = 512  # training crops the int8 CPU scales are measured on (beside the weights); 0 = none
    log_every: int = 20
    notices: tuple[str, ...] = field(default=(
        "Demonstration and pipeline validation only: trained on synthetic morphs, not on patients; not for diagnosis.",
    ))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.landmark_points not in (5, 68):
            raise ValueError(f"landmark_points must be 5 or 68, not {self.landmark_points}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.init_weights is not None and self.backbone_weights is not None:
            raise ValueError("give init_weights or backbone_weights, not both")


@dataclass(frozen=True, slots=True)
class TrainResult:
    path: Path
    steps: int
    samples: int
    seconds: float
    best_val_accuracy: float
    temperature: float
    losses: tuple[float, ...]  # training loss at every log_every-th step


def split_group(subject_id: str) -> str:
    """The person a subject belongs to: phantom subjects `<identity>-L<k>` group by identity."""
    return _PHANTOM_SUFFIX.sub("", subject_id)


def split_by_group(subjects: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: whole groups (people), never single images."""
    groups = np.array([split_group(s) for s in subjects.tolist()])
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    count = max(1, round(val_fraction * len(names))) if len(names) > 1 else 0
    val_names = rng.choice(names, size=count, replace=False)
    return np.isin(groups, val_names)


def rows_of(subjects: np.ndarray, people: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows whose subject belongs to one of `people` (`split_group` names)."""
    return np.isin([split_group(s) for s in subjects.tolist()], list(people))


def validation_mask(subjects: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Validation rows: those of the people in ``config.val_groups`` when given, else `split_by_group`
    of these subjects with the config's val_fraction and seed.

    Given people stay out of training whoever else is in the data, so runs on different data
    (scripts/device_train.py's variants) can share one validation set without leaking it.
    """
    if config.val_groups is None:
        return split_by_group(subjects, config.val_fraction, config.seed)
    mask = rows_of(subjects, config.val_groups)
    if not mask.any():
        raise ValueError("none of the val_groups people are in the data")
    return mask


def augment(batch: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Paper augmentations on a float N×3×H×W batch in 0..255 (brightness, saturation, noise, flip) + shift."""
    n = batch.shape[0]
    dev = batch.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev) * (high - low) + low

    flip = uniform(0, 1, n) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if config.shift_px:
        dx, dy = (torch.randint(-config.shift_px, config.shift_px + 1, (2,), generator=generator, device=dev)
                  .tolist())
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
    grey = (batch * torch.tensor([0.299, 0.587, 0.114], device=dev)[None, :, None, None]).sum(1, keepdim=True)
    sat = uniform(1 - config.saturation, 1 + config.saturation, n, 1, 1, 1)
    batch = grey + (batch - grey) * sat
    batch = batch + uniform(-config.brightness, config.brightness, n, 1, 1, 1) * 255.0
    sigma = uniform(0, config.noise_std, n, 1, 1, 1)
    batch = batch + torch.randn(batch.shape, generator=generator, device=dev) * sigma
    return batch.clamp(0, 255)


def to_input(pixels_nhwc: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 N×H×W×3 (RGB) → float N×3×H×W in 0..255, channel order as the card says."""
    x = pixels_nhwc.permute(0, 3, 1, 2).float()
    return x.flip(1) if prep.channel_order == "BGR" else x


def update_centers(centers: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, alpha: float) -> None:
    """Wen et al.'s center update: c_j -= α · Σ_{i∈j}(c_j − x_i) / (1 + n_j)."""
    with torch.no_grad():
        diff = centers[labels] - embedding.float()
        delta = torch.zeros_like(centers).index_add_(0, labels, diff)
        counts = torch.bincount(labels, minlength=centers.shape[0]).float()[:, None]
        centers -= alpha * delta / (1.0 + counts)


def evaluate_logits(net: SeverityNet, pixels: torch.Tensor, prep: Preprocessing, device: torch.device,
                    amp: bool, batch_size: int = 256) -> torch.Tensor:
    """Float32 logits of every crop (eval mode), on the CPU."""
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = (to_input(pixels[i:i + batch_size].to(device), prep) - prep.mean) / prep.std
            with _autocast(device, amp):
                out.append(net(x.contiguous(memory_format=_memory_format(device))).logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 3)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def config_json(config: TrainConfig) -> str:
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}, indent=2)


def run_train(config: TrainConfig) -> Path:
    """Body of `acroscreen train DATA --out M.safetensors`; returns the weights path."""
    preprocessing = training_preprocessing(config.landmark_points)
    return train(config, load_or_build_crops(config.data, config.cache, config.workers, preprocessing)).path


def train(config: TrainConfig, crops: CropSet) -> TrainResult:
    """The training loop over cached crops; writes weights and the resolved config."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = replace(config, device=str(device))
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".config.json").write_text(config_json(config) + "\n", encoding="utf-8")
    prep = Preprocessing(**crops.preprocessing)  # type: ignore[arg-type]

    val_mask = validation_mask(crops.subjects, config)
    train_set, val_set = crops.subset(~val_mask), crops.subset(val_mask)
    if len(train_set) == 0:
        raise ValueError("no training crops left after the validation split")
    print(f"{len(train_set)} training crops ({len(np.unique(train_set.subjects))} subjects), "
          f"{len(val_set)} validation crops ({len(np.unique(val_set.subjects))} subjects); device {device}",
          flush=True)
    train_pixels = torch.from_numpy(train_set.pixels).to(device)
    train_labels = torch.from_numpy(train_set.scores.astype(np.int64) - 1).to(device)
    val_pixels = torch.from_numpy(val_set.pixels).to(device)
    val_labels = torch.from_numpy(val_set.scores.astype(np.int64) - 1)

    net = SeverityNet(dropout=config.dropout)
    if config.init_weights is not None:
        start_from = load_weights(config.init_weights)
        if start_from.card.preprocessing != prep:
            raise ValueError(f"{config.init_weights} was trained with {start_from.card.preprocessing}, "
                             f"the crops were made with {prep}")
        net.load_state_dict(start_from.net.state_dict(), strict=True)
    elif config.backbone_weights is not None:
        from ..runtime.model import load_facenet_backbone

        load_facenet_backbone(net.backbone, read_facenet_checkpoint(config.backbone_weights))
    net.centers.requires_grad_(False)
    net = net.to(device, memory_format=_memory_format(device))
    targets, head = None, None
    if config.distill is not None:
        from .descriptors import load_descriptors

        targets = torch.from_numpy(load_descriptors(config.distill, crops)[~val_mask]).to(device)
        head = torch.nn.Linear(EMBEDDING_SIZE, targets.shape[1]).to(device)  # training only, never saved
    params = [p for p in net.parameters() if p.requires_grad] + (list(head.parameters()) if head is not None else [])
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = max(1, len(train_set) // config.batch_size)
    planned = max(1, config.max_samples // config.batch_size)
    eval_every = config.eval_every or steps_per_epoch
    # fitted: the schedule was shrunk to the wall-clock cap (a resumed run keeps it).
    state = {"step": 0, "best_acc": -1.0, "best_loss": math.inf, "stale": 0, "planned": planned, "fitted": 0}
    best_state = copy.deepcopy(net.state_dict())
    averaged = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
                if config.ema_decay else None)
    judged = averaged.module if averaged is not None else net  # the weights validated and saved
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order_rng = np.random.default_rng(config.seed)
    order = np.empty(0, dtype=np.int64)  # the rest of the current epoch's order, then the next epoch's

    if config.checkpoint is not None and Path(config.checkpoint).is_file():
        saved = torch.load(config.checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(saved["net"])
        if head is not None:
            head.load_state_dict(saved["distill_head"])
        if averaged is not None:
            averaged.load_state_dict(saved["averaged"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state = saved["best"]
        state.update({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in saved["state"].items()})
        if "rng" in saved:  # a continuation: the same batches, augmentation and dropout as without the stop
            order = saved["order"].cpu().numpy()
            if len(order) and order.max() >= len(train_set):
                raise ValueError(f"{config.checkpoint} was made with other training data")
            _restore_rng(saved["rng"], order_rng, generator, device)
        else:  # an older checkpoint, without random states
            order_rng = np.random.default_rng([config.seed, int(state["step"])])
            generator.manual_seed(config.seed + int(state["step"]))
        print(f"resumed from {config.checkpoint} at step {state['step']}", file=sys.stderr, flush=True)
    refit = bool(config.max_minutes) and not state["fitted"]

    def lr_at(step: int) -> float:
        warm = max(1, int(config.warmup_fraction * state["planned"]))
        if step < warm:
            return config.lr * (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, state["planned"] - warm))
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    loop_start = time.monotonic()
    start_step = int(state["step"])
    stop_reason = "sample budget"
    losses: list[float] = []
    steady_from = loop_start
    while state["step"] < state["planned"]:
        if len(order) < config.batch_size:
            order = np.concatenate([order, order_rng.permutation(len(train_set))])
        index = torch.from_numpy(order[:config.batch_size]).to(device)
        order = order[config.batch_size:]
        net.train()
        x = augment(to_input(train_pixels[index], prep), config, generator)
        x = ((x - prep.mean) / prep.std).contiguous(memory_format=_memory_format(device))
        y = train_labels[index]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(int(state["step"]))
        with _autocast(device, config.amp):
            output = net(x)
        ce = F.cross_entropy(output.logits.float(), y)
        embedding = output.embedding.float()
        c_loss = center_loss(embedding, y, net.centers.detach())
        loss = ce + config.center_weight * c_loss
        if head is not None and targets is not None:
            d_loss = 1.0 - F.cosine_similarity(head(embedding), targets[index], dim=1).mean()
            loss = loss + config.distill_weight * d_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_centers(net.centers, embedding.detach(), y, config.center_lr)
        if averaged is not None:
            averaged.update_parameters(net)
        state["step"] += 1
        step = int(state["step"])
        if step % config.log_every == 0:
            elapsed = time.monotonic() - loop_start
            losses.append(loss.item())
            rate = (step - start_step) * config.batch_size / max(elapsed, 1e-6)
            distilled = f"  distill {d_loss.item():.3f}" if head is not None else ""
            print(f"step {step}/{state['planned']}  loss {losses[-1]:.4f}  ce {ce.item():.4f}  "
                  f"center {c_loss.item():.2f}{distilled}  lr {lr_at(step):.2e}  {rate:.0f} img/s  {elapsed:.0f} s",
                  file=sys.stderr, flush=True)
            if config.max_minutes and step - start_step == config.log_every:
                steady_from = time.monotonic()  # after cuDNN autotuning and warm-up
            if refit and (step - start_step) in (config.log_every * 3, config.log_every * 10):
                # Twice: early, and again once cuDNN autotuning of the validation shapes is over.
                state["planned"] = _fit_schedule(config, planned, step, started,
                                                 (time.monotonic() - steady_from) / (step - start_step
                                                                                     - config.log_every),
                                                 _eval_share(len(val_set), config.batch_size, eval_every))
                state["fitted"] = 1
        if step % eval_every == 0 or step == state["planned"]:
            logits = evaluate_logits(judged, val_pixels, prep, device, config.amp)
            if len(val_labels):
                val_loss = float(F.cross_entropy(logits, val_labels))
                val_acc = float((logits.argmax(1) == val_labels).float().mean())
            else:
                val_loss, val_acc = float(loss.item()), 0.0
            better = val_acc > state["best_acc"] or (val_acc == state["best_acc"] and val_loss < state["best_loss"])
            if better:
                state.update(best_acc=val_acc, best_loss=val_loss, stale=0)
                best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
            else:
                state["stale"] += 1
            print(f"validation at step {step} (epoch {step / steps_per_epoch:.1f}): accuracy {val_acc:.4f}  "
                  f"nll {val_loss:.4f}{'  *best' if better else ''}", file=sys.stderr, flush=True)
            if state["stale"] >= config.patience:
                stop_reason = f"early stop: no better validation accuracy in {config.patience} validations"
                break
        if config.max_minutes and time.monotonic() - started > config.max_minutes * 60.0:
            stop_reason = "wall-clock cap"
            break
        if config.checkpoint is not None and step % config.checkpoint_every == 0:
            _save_checkpoint(config.checkpoint, net, averaged, head, optimizer, best_state, state,
                             _rng_state(order_rng, generator, device), order)
    print(f"stopped at step {state['step']}: {stop_reason}", file=sys.stderr, flush=True)
    if config.checkpoint is not None:
        _save_checkpoint(config.checkpoint, net, averaged, head, optimizer, best_state, state,
                         _rng_state(order_rng, generator, device), order)

    net.load_state_dict(best_state)
    val_logits = evaluate_logits(net, val_pixels, prep, device, config.amp)
    temperature = fit_temperature(val_logits, val_labels)
    val_nll = float(F.cross_entropy(val_logits / temperature, val_labels)) if len(val_labels) else float("nan")
    seconds = time.monotonic() - started
    samples = int(state["step"]) * config.batch_size
    summary = {
        "data": str(config.data),
        "training_crops": len(train_set), "validation_crops": len(val_set),
        "training_subjects": len(np.unique(train_set.subjects)),
        "validation_subjects": len(np.unique(val_set.subjects)),
        "crops_per_score": {str(s): int((crops.scores == s).sum()) for s in (1, 2, 3)},
        "rejected_images": crops.rejected,
        "steps": int(state["step"]), "samples": samples, "batch_size": config.batch_size,
        "stop_reason": stop_reason, "seconds": round(seconds, 1), "device": str(device),
        "validation_accuracy": round(state["best_acc"], 4), "validation_nll_calibrated": round(val_nll, 4),
        "temperature": round(temperature, 4), "center_loss_weight": config.center_weight,
        "center_lr": config.center_lr, "ema_decay": config.ema_decay, "seed": config.seed,
        "distill": str(config.distill) if config.distill else None, "distill_weight": config.distill_weight,
        "backbone_weights": str(config.backbone_weights) if config.backbone_weights else None,
        "init_weights": str(config.init_weights) if config.init_weights else None,
    }
    card = ModelCard(
        name=config.name, version=config.version, kind=config.kind, preprocessing=prep,
        temperature=temperature, dropout=config.dropout, training_summary=json.dumps(summary, sort_keys=True),
        notices=config.notices,
    )
    save_weights(out, net.cpu().float(), card)
    print(f"wrote {out}: validation accuracy {state['best_acc']:.4f}, temperature {temperature:.3f}, "
          f"{samples} samples in {seconds:.0f} s", file=sys.stderr, flush=True)
    _write_int8_scales(config, out, train_set)
    return TrainResult(out, int(state["step"]), samples, seconds, float(state["best_acc"]), temperature,
                       tuple(losses))


def _write_int8_scales(config: TrainConfig, out: Path, train_set: CropSet) -> None:
    """Int8 scales for the new weights, from training crops; a file left by earlier weights goes."""
    from ..runtime.int8 import int8_available, scales_path
    from .calibrate import calibrate_weights

    scales_path(out).unlink(missing_ok=True)
    if not config.int8_calibration_crops:
        return
    if not int8_available():
        print("no int8 scales: this PyTorch build has no x86 int8 quantization", file=sys.stderr, flush=True)
        return
    report = calibrate_weights(out, train_set, f"the training split of {Path(config.data).name}",
                               crops=config.int8_calibration_crops, seed=config.seed)
    print(f"wrote {report.scales_file}: on {report.check_crops} other training crops int8 picks float32's score for "
          f"{report.argmax_agreement:.1%}", file=sys.stderr, flush=True)


def _fit_schedule(config: TrainConfig, limit: int, step: int, started: float, per_step: float,
                  eval_share: float) -> int:
    """Cosine schedule length that ends inside the wall-clock cap (5 % kept for the tail), at most `limit`."""
    budget = config.max_minutes * 60.0 * 0.95 - (time.monotonic() - started)
    fits = max(step + 1, min(limit, step + int(budget / (per_step * (1.0 + eval_share)))))
    print(f"wall-clock cap: schedule set to {fits} steps ({per_step * 1000:.0f} ms per step)", file=sys.stderr, flush=True)
    return fits


def _eval_share(val_count: int, batch_size: int, eval_every: int) -> float:
    """Rough extra cost of validation per training step (a forward costs ~1/3 of a training step)."""
    return (val_count / batch_size) / 3.0 / max(1, eval_every)


def _rng_state(order_rng: np.random.Generator, generator: torch.Generator,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Every random state the loop draws from, as byte tensors: batch order (numpy's state as JSON),
    augmentation, and torch's global generator (dropout; on CUDA, the device's)."""
    order_state = json.dumps(order_rng.bit_generator.state).encode()
    states = {"order": torch.tensor(list(order_state), dtype=torch.uint8),
              "augment": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: dict[str, torch.Tensor], order_rng: np.random.Generator, generator: torch.Generator,
                 device: torch.device) -> None:
    order_rng.bit_generator.state = json.loads(bytes(states["order"].cpu().tolist()))
    generator.set_state(states["augment"].cpu())
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def _save_checkpoint(path: Path, net: SeverityNet, averaged: AveragedModel | None, head: torch.nn.Module | None,
                     optimizer: torch.optim.Optimizer, best_state: dict[str, torch.Tensor],
                     state: dict[str, float], rng: dict[str, torch.Tensor], order: np.ndarray) -> None:
    """Everything needed to resume as if never stopped (weights_only-loadable): weights, optimiser,
    loop state, random states and the rest of the batch order; written atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    saved = {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "best": best_state,
             "state": {k: torch.tensor(v) for k, v in state.items()}, "rng": rng,
             "order": torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))}
    if averaged is not None:
        saved["averaged"] = averaged.state_dict()
    if head is not None:
        saved["distill_head"] = head.state_dict()
    torch.save(saved, tmp)
    tmp.replace(path)
