"""Training: AdamW with warmup + schedule, a jitted gradient-accumulating step sharded by the
logical axis rules, orbax checkpoints with bit-exact resume, metrics and a progress bar.

    from lcinfer.train import TrainConfig, SyntheticCopySource, train
    result = train(TrainConfig(...), model, data_source, mesh=None)

The base of later training recipes (SwiftKV distillation, DuoAttention gates): they bring a loss
(`loss_fn(model, batch, rng) -> (loss_sum, sums)`) and a `trainable` filter.
"""

from lcinfer.train.config import SCHEDULES, TrainConfig
from lcinfer.train.data import (CallableSource, DataSource, SyntheticCopySource, check_batch, split_micro_batches,
                                step_key, step_rng)
from lcinfer.train.loss import evaluate, mean_metrics, next_token_loss, token_cross_entropy
from lcinfer.train.metrics import read_metrics
from lcinfer.train.optim import decay_mask, make_optimizer, make_schedule
from lcinfer.train.step import TRACES, train_step
from lcinfer.train.trainer import Trainer, TrainResult, train

__all__ = ["SCHEDULES", "TrainConfig", "CallableSource", "DataSource", "SyntheticCopySource", "check_batch",
           "split_micro_batches", "step_key", "step_rng", "evaluate", "mean_metrics", "next_token_loss",
           "token_cross_entropy", "read_metrics", "decay_mask", "make_optimizer", "make_schedule", "TRACES",
           "train_step", "Trainer", "TrainResult", "train"]
