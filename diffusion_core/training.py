"""Training configuration and the pure-PyTorch training state and step (no Ray, no MLflow).

The distributed wiring lives in `adapters/ray_train.py`; this module holds everything that can be
tested in one process: the typed `TrainConfig`, the optimiser and its learning-rate schedule, one
optimisation step with non-finite protection, EMA, the data position of a step, and the training
state's save/load.

Optimisation: AdamW (Loshchilov & Hutter 2019) on the denoising loss of Ho et al. 2020, with linear
warm-up and cosine decay of the learning rate (Loshchilov & Hutter 2017, SGDR):

    lr(s) = lr * (s + 1) / W                                          s < W
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2)    W <= s < S

(W = warmup_steps, S = steps, r = min_lr_ratio). The learning rate is a pure function of the step,
so the step counter is the whole scheduler state.

Classifier-free guidance training (Ho & Salimans 2022): each label is replaced by NULL_LABEL with
probability `label_dropout`, so one network learns both eps(x_t, t, y) and eps(x_t, t, null).
The null path gets `label_dropout` of the training signal, yet on the digits budget the
null-label FD does not follow that share: trained on the Ray Train worker's exact rows
(benchmarks/train_sweep.py, 1400 steps of the two-block U-Net, two seeds each) it averaged 11.1
at 0.25 and 11.2 at 0.4, the marginal FD was equal and the labelled FD 0.4 better at 0.25. The
number of training steps moved it far more (results/train_sweep.json). The default is 0.25
(Ho & Salimans try 0.1 and 0.2). Unlabelled requests do not use the null path by default
(`class_prior`).

Reproducibility: every random draw of step s on rank k comes from generators seeded by
(seed, k, s, stream) (`seeds.derived_seed`): one stream for noise, timesteps and label dropout,
another for the dropout layers. The rows a worker trains on are a function of its position in its
data stream (`data_order`). A resumed run therefore needs only the step counter to continue exactly
where an uninterrupted run would be; no generator state is saved.

Checkpoints: a diffusion_core checkpoint plus `training_state/`, written inside the checkpoint's temp
directory (save_checkpoint's `extra` hook) so that weights and training state are published together
or not at all.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffusion_core.checkpoint import (
    EMA_FILE,
    ModelSpec,
    load_checkpoint,
    read_ema_state,
    save_checkpoint,
)
from diffusion_core.data_order import (
    ROW_OVERHEAD_BYTES,
    Window,
    chunk_rows_for,
    chunk_split,
    window_rows_for,
    worker_windows,
)
from diffusion_core.ema import EMA, unwrap_model
from diffusion_core.errors import CheckpointError, ConfigError, DiffusionPipelineError
from diffusion_core.objective import ObjectiveConfig, training_loss
from diffusion_core.samplers import get_sampler, sampling_timesteps
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, NULL_LABEL, SamplerName
from diffusion_core.schedule import NoiseSchedule, ScheduleConfig
from diffusion_core.seeds import Stream, derived_seed
from diffusion_core.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

TRAINING_STATE_DIR = "training_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "train_config.json"
# Ray Train run names become directory names and MLflow filter-string literals: no quotes, no slashes.
RUN_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


class FaultInjection(BaseModel):
    """Test hook: raise once at `at_step` on rank `rank`, unless `marker_path` exists (it is created
    just before raising, so the retry runs through)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at_step: int = Field(ge=1)
    marker_path: str
    rank: int = Field(0, ge=0)


class TrainRecipe(BaseModel):
    """What the trained model is: the optimisation, the network, its noise schedule and objective,
    the seed, and the sample grids recorded with it. With the dataset's fingerprint these fields are
    the identity of a training run (`TrainConfig.recipe`): two runs that agree on them train the
    same model, up to what placement changes (which rows meet in a batch, the hardware's arithmetic).

    `batch_size` is global (all workers together). `precision`: "bf16" runs the forward pass under
    bf16 autocast (weights, gradients and optimiser stay fp32), "fp32" does not, "auto" is bf16 on a
    CUDA device that supports it and fp32 elsewhere (so off on CPU).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.25, ge=0, le=1, description="share of labels replaced by the null "
                                 "label (see the module docstring)")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    sampler: SamplerName = DEFAULT_SAMPLER
    sample_steps: int = Field(DEFAULT_STEPS, ge=1)
    max_consecutive_nonfinite: int = Field(5, ge=1)

    unet: UNetConfig = Field(default_factory=UNetConfig.digits_default)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @model_validator(mode="after")
    def _check_warmup(self) -> Self:
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"warmup_steps: {self.warmup_steps} must be below steps={self.steps} (the learning rate "
                "would never leave its warm-up)"
            )
        return self

    @model_validator(mode="after")
    def _check_sampling(self) -> Self:
        """Settings that would otherwise fail only inside the Ray workers, at the first sample grid
        (after the run has started, and before that step's checkpoint is written)."""
        get_sampler(self.sampler)
        schedule = NoiseSchedule.from_config(self.schedule)
        try:
            schedule.validate_prediction(self.objective.prediction)
        except ConfigError as err:
            raise ConfigError(f"objective.{err}") from err
        try:
            sampling_timesteps(schedule, self.sampler, self.sample_steps, self.objective.prediction)
        except ConfigError as err:
            raise ConfigError(f"sample_steps: {str(err).removeprefix('steps: ')}") from err
        return self


class TrainPlacement(BaseModel):
    """Where and how the run executes: the Ray cluster, the workers and their resources, how they
    stream the data, failure handling and execution-only switches. None of these is part of what
    the model learns (TrainRecipe); `num_workers` and `shuffle_window_mib` do change which rows meet
    in a batch (data_order).

    Each worker runs torch with floor(cpus_per_worker) threads; leave at least one CPU of the
    cluster free for Ray Data's reads. The default, one CPU a worker, is Ray's own; the pipeline
    gives a worker on this machine's own Ray every core (pipeline_config.train_defaults_for). A
    worker's stream holds windows of `shuffle_window_mib` of stored images, a bounded number at a
    time (ray_data.stream_batches), whatever the dataset's size.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ray_address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(1, ge=-1)
    shuffle_window_mib: float = Field(
        64.0, gt=0, le=4096, description="stored images shuffled together (MiB; at least one batch)")
    compile: bool = False
    channels_last: bool = Field(False, description="NHWC memory format for the UNet and its inputs")
    fault_injection: FaultInjection | None = None


class TrainTracking(BaseModel):
    """Where the run records what it does: checkpoints, the MLflow experiment, and how often it
    logs, samples and checkpoints."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    storage_path: str = Field("ray_results", description="checkpoint root: local path or URI")
    num_to_keep: int | None = Field(2, ge=1)
    checkpoint_every: int = Field(400, ge=1)
    experiment_name: str = "diffusion"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = MLflow's default")
    artifact_location: str | None = Field(None, description="artifact root of a new MLflow experiment")
    log_every: int = Field(50, ge=1)
    sample_every: int | None = Field(400, ge=1, description="sample grids every N steps and at the end")
    num_sample_images: int = Field(64, ge=1)


class TrainConfig(TrainRecipe, TrainPlacement, TrainTracking):
    """Everything a training run needs, as one flat set of fields (the config file's `train:`
    section, the CLI flags, MLflow params, train_config.json): the recipe (what the model learns),
    the placement (where and how it runs), the tracking, and this run's inputs (dataset, run name,
    warm start). Saved with every checkpoint.

    The defaults train the digits model (UNetConfig.digits_default) to recognisable, class-balanced
    samples: 2000 steps of 64 images, about three minutes for one worker on both cores of a 2-core
    CPU (`run`'s placement; benchmarks/results/quality.json). For the same training time that beats
    1200 steps of 128 images by 2 FD on the null label, mean of two seeds, and ties on labelled and
    marginal requests (benchmarks/results/train_sweep.json).
    """

    dataset: str = Field(description="prepared dataset directory or URI (manifest.json + train/*.parquet)")
    run_name: str | None = Field(None, pattern=RUN_NAME_PATTERN,
                                description="Ray Train run name ([A-Za-z0-9_.-]+); reusing a name resumes")
    warm_start: str | None = Field(None, description="diffusion_core checkpoint to start the weights from")

    @model_validator(mode="after")
    def _check_batch_split(self) -> Self:
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by num_workers={self.num_workers}"
            )
        return self

    @property
    def recipe(self) -> TrainRecipe:
        """This run's recipe alone (already validated as part of this config)."""
        return TrainRecipe.model_construct(**{name: getattr(self, name) for name in TrainRecipe.model_fields})

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers


class TrainingDivergedError(DiffusionPipelineError):
    """Too many consecutive non-finite losses or gradients."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rate at `step` (module docstring: warm-up + cosine)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def training_windows(config: TrainConfig, image_bytes: int, row_groups: list[list[int]], rank: int,
                     world: int, start_step: int) -> list[Window]:
    """The windows (data_order) that worker `rank` of `world` reads from step `start_step` to the end:
    its stream rows [start_step * b, steps * b), b = per_worker_batch_size. `image_bytes` is the
    stored size of one image; `row_groups` the split's row-group sizes (Parquet footers)."""
    batch = config.per_worker_batch_size
    window_bytes = config.shuffle_window_mib * 2**20
    window_rows = window_rows_for(image_bytes + ROW_OVERHEAD_BYTES, window_bytes, batch)
    total = sum(map(sum, row_groups))
    largest_group = max((rows for groups in row_groups for rows in groups), default=1)
    chunks = chunk_split(row_groups, chunk_rows_for(total, world, window_rows, largest_group))
    return worker_windows(chunks, seed=config.seed, rank=rank, world=world, window_rows=window_rows,
                          start_row=start_step * batch, num_rows=(config.steps - start_step) * batch)


def drop_labels(labels: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Replace each label by NULL_LABEL with probability p (classifier-free guidance training)."""
    if p == 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)


@dataclass
class TrainState:
    """What a checkpoint restores: weights, EMA, optimiser moments and counters."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: NoiseSchedule
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    autocast: torch.dtype | None = None  # the forward pass's autocast dtype; None = fp32
    memory_format: torch.memory_format = torch.contiguous_format


def build_train_state(config: TrainConfig, device: torch.device | str = "cpu") -> TrainState:
    """A freshly initialised model (seeded by config.seed) on `device` in the configured memory
    format, its EMA and AdamW optimiser. ConfigError when the device cannot run `precision` or
    `channels_last`."""
    device = torch.device(device)
    autocast, memory_format = autocast_dtype(config.precision, device), memory_format_for(config, device)
    torch.manual_seed(config.seed)
    model = UNet(config.unet).to(device, memory_format=memory_format)
    return TrainState(
        model=model,
        ema=EMA(model, decay=config.ema_decay),
        optimizer=make_optimizer(model, config),
        schedule=NoiseSchedule.from_config(config.schedule),
        autocast=autocast,
        memory_format=memory_format,
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype for `precision` on `device` (TrainRecipe.precision); None
    means fp32. An explicit "bf16" that the device cannot run is a ConfigError, never a silent fp32."""
    if precision == "fp32":
        return None
    supported = bf16_autocast_supported(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and supported else None
    if not supported:
        raise ConfigError(
            f"precision: bf16 autocast is not supported on this {device.type} device",
            hint="set precision to fp32 (or auto, which uses bf16 only where it is supported)",
        )
    return torch.bfloat16


def bf16_autocast_supported(device: torch.device) -> bool:
    """CUDA: the GPU has bf16 arithmetic (Ampere and later). Other devices: torch offers autocast
    for them (on CPU it does, with bf16 kernels where the CPU has them)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.amp.is_autocast_available(device.type)


def memory_format_for(config: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) when configured, on the devices whose convolutions have NHWC kernels."""
    if not config.channels_last:
        return torch.contiguous_format
    if device.type not in CHANNELS_LAST_DEVICES:
        raise ConfigError(
            f"channels_last: not supported on {device.type} devices; accepted on "
            f"{', '.join(CHANNELS_LAST_DEVICES)}",
            hint="set channels_last to false",
        )
    return torch.channels_last


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    lr = config.lr * lr_factor(step, config.warmup_steps, config.steps, config.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass(frozen=True)
class StepResult:
    """Outcome of one step: `loss` is the mean over ranks; a skipped step changed nothing."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def _identity(t: Tensor) -> Tensor:
    return t


def train_step(
    state: TrainState,
    config: TrainConfig,
    images: Tensor,
    labels: Tensor | None,
    *,
    rank: int = 0,
    reduce_mean: Callable[[Tensor], Tensor] = _identity,
    model: nn.Module | None = None,
) -> StepResult:
    """One AdamW step on the batch `images` (N, C, H, W) in [-1, 1], `labels` (N,) int64 or None.

    `model` is the module to call (a DDP / compiled wrapper of state.model); `reduce_mean` averages a
    tensor over ranks, so every rank sees the same loss and takes the same skip decision. A
    non-finite loss or gradient norm skips the update (weights, EMA and moments untouched) and is
    counted; `max_consecutive_nonfinite` skips in a row raise TrainingDivergedError.
    """
    if model is None:
        model = state.model
    # Dropout layers draw from the global generator; noise, timesteps and label dropout from `gen`.
    torch.manual_seed(derived_seed(config.seed, rank, state.step, Stream.DROPOUT))
    gen = torch.Generator(device=images.device).manual_seed(
        derived_seed(config.seed, rank, state.step, Stream.NOISE)
    )
    lr = set_learning_rate(state.optimizer, config, state.step)
    if labels is not None:
        labels = drop_labels(labels, config.label_dropout, gen)
    images = images.contiguous(memory_format=state.memory_format)
    loss = _loss(model, state, config, images, labels, gen)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = _grad_norm(state.model, config.grad_clip)
    mean_loss = reduce_mean(loss.detach().float()).item()
    skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
    if skipped:
        _record_nonfinite(state, config)
        state.optimizer.zero_grad(set_to_none=True)
    else:
        state.optimizer.step()
        state.ema.update(state.model)
        state.nonfinite_streak = 0
    state.step += 1
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, skipped=skipped)


def _loss(model: nn.Module, state: TrainState, config: TrainConfig, images: Tensor, labels: Tensor | None,
          gen: torch.Generator) -> Tensor:
    dtype = state.autocast
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return training_loss(model, images, state.schedule, config.objective, labels=labels, generator=gen)


def _grad_norm(model: nn.Module, clip: float | None) -> float:
    """Global L2 norm of the gradients (already averaged over ranks by DDP), clipped to `clip`."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip if clip is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _record_nonfinite(state: TrainState, config: TrainConfig) -> None:
    state.nonfinite_total += 1
    state.nonfinite_streak += 1
    if state.nonfinite_streak >= config.max_consecutive_nonfinite:
        raise TrainingDivergedError(
            f"training diverged: {state.nonfinite_streak} consecutive non-finite losses or gradients "
            f"at step {state.step}",
            hint="resume from the last good checkpoint with a lower lr or grad_clip",
        )


# --- checkpoints -------------------------------------------------------------------------------


def save_training_checkpoint(directory: str | Path, state: TrainState, config: TrainConfig,
                             spec: ModelSpec) -> Path:
    """A diffusion_core checkpoint (weights, EMA, spec; loadable by load_checkpoint) plus
    `training_state/`: optimiser tensors (safetensors), counters (JSON) and the config. Atomic: the
    training state is written inside the temp directory before the checkpoint is published, so a
    failure leaves any previous checkpoint at `directory` complete. The EMA's update count lives in
    ema.safetensors' metadata only. (save_checkpoint flushes every file of the temp directory to
    disk before the rename that publishes it: atomic_io.replace_directory.)"""

    def write_training_state(tmp: Path) -> None:
        train_dir = tmp / TRAINING_STATE_DIR
        train_dir.mkdir()
        counters = {"step": state.step, "nonfinite_total": state.nonfinite_total,
                    "nonfinite_streak": state.nonfinite_streak,
                    "optimizer": write_optimizer_state(train_dir, state.optimizer)}
        (train_dir / STATE_FILE).write_text(json.dumps(counters, indent=2))
        (train_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2))

    net = unwrap_model(state.model)
    return save_checkpoint(directory, net, spec, ema=state.ema, extra=write_training_state)


def write_optimizer_state(train_dir: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Write the optimiser's tensors as safetensors; returns the JSON-able rest (param groups and
    scalars), which goes into state.json."""
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(train_dir / OPTIMIZER_FILE))
    return meta


def load_training_checkpoint(directory: str | Path, state: TrainState, config: TrainConfig) -> None:
    """Resume: restore weights, EMA (with its update count), optimiser and counters from
    `save_training_checkpoint` output. The checkpoint's UNet, schedule and objective must equal the
    config's: the optimiser moments and the EMA belong to that exact training problem."""
    directory = Path(directory)
    train_dir = directory / TRAINING_STATE_DIR
    if not (train_dir / STATE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint: {directory} has no {TRAINING_STATE_DIR}/{STATE_FILE}; it is not a training "
            "checkpoint", hint="to start new training from its weights, pass it as warm_start",
        )
    raw = _load_matching_weights(directory, config, resume=True)
    counters = json.loads((train_dir / STATE_FILE).read_text())
    _load_raw_weights(state, raw)
    state.ema.load_state_dict(read_ema_state(directory))
    # Loaded on the CPU: load_state_dict moves moments to the parameters and keeps "step" on the CPU.
    tensors = load_file(str(train_dir / OPTIMIZER_FILE))
    state.optimizer.load_state_dict(_unflatten_optimizer(tensors, counters["optimizer"]))
    state.step = int(counters["step"])
    state.nonfinite_total = int(counters["nonfinite_total"])
    state.nonfinite_streak = int(counters["nonfinite_streak"])


def load_weights(directory: str | Path, state: TrainState, config: TrainConfig) -> None:
    """Warm start: raw weights into the model and EMA weights into the EMA, counters untouched (a
    checkpoint without EMA weights starts the EMA from the raw ones). The checkpoint's UNet, noise
    schedule and prediction target must equal the config's; min_snr_gamma (a loss weight) may differ."""
    directory = Path(directory)
    raw = _load_matching_weights(directory, config, resume=False)
    _load_raw_weights(state, raw)
    if (directory / EMA_FILE).is_file():
        shadow = read_ema_state(directory)["shadow"]
    else:
        logger.warning("warm_start: %s has no %s; the EMA starts from the raw weights", directory, EMA_FILE)
        shadow = raw
    state.ema.load_state_dict({"shadow": shadow, "num_updates": state.ema.num_updates})


def _load_matching_weights(directory: Path, config: TrainConfig, resume: bool) -> dict[str, Tensor]:
    """The checkpoint's raw weights (CPU), after checking that its spec fits this run."""
    loaded = load_checkpoint(directory, use_ema=False)
    mismatches = spec_mismatches(loaded.spec, config, compare_loss_weighting=resume)
    if mismatches:
        field = "checkpoint" if resume else "warm_start"
        action = "resume" if resume else "warm-start"
        raise CheckpointError(
            f"{field}: cannot {action} from {directory}: " + "; ".join(mismatches),
            hint="set these fields to the checkpoint's values"
            + (", or start a new run_name" if resume else ", or drop warm_start"),
        )
    return loaded.model.state_dict()


def spec_mismatches(spec: ModelSpec, config: TrainConfig, compare_loss_weighting: bool = True) -> list[str]:
    """'field: checkpoint has X, this run has Y' for each of unet, schedule.* and objective.* that
    differ (objective.min_snr_gamma only when `compare_loss_weighting`)."""
    found: list[str] = []
    if spec.unet != config.unet:
        found.append(f"unet: the checkpoint has {spec.unet!r}, this run has {config.unet!r}")
    pairs = [("schedule", spec.schedule, config.schedule), ("objective", spec.objective, config.objective)]
    for prefix, ours, theirs in pairs:
        for name in type(ours).model_fields:
            if prefix == "objective" and name == "min_snr_gamma" and not compare_loss_weighting:
                continue
            a, b = getattr(ours, name), getattr(theirs, name)
            if a != b:
                found.append(f"{prefix}.{name}: the checkpoint has {a!r}, this run has {b!r}")
    return found


def _load_raw_weights(state: TrainState, raw: dict[str, Tensor]) -> None:
    with torch.no_grad():
        unwrap_model(state.model).load_state_dict(raw, strict=True)


def read_training_step(directory: str | Path) -> int:
    """The step counter stored in a training checkpoint."""
    counters = json.loads((Path(directory) / TRAINING_STATE_DIR / STATE_FILE).read_text())
    return int(counters["step"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state_dict -> ({"state.<param>.<name>": tensor}, JSON-able param groups + scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
