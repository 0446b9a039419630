"""``qpissa train --objective dpo|simpo``: read and check the pairs, load the starting policy, build the task.

The start is a decompose OUT (residual + OUT/adapter) or a finished SFT run RUN (RUN/adapter on the OUT/residual
it trained on; :func:`qpissa.train.model.start_dirs`), or ``--method lora|full`` on an HF checkpoint. Every row
is checked before any weights are read (a missing field, an empty completion, chosen == rejected: one line
naming the file, row and field); rows are tokenized as :mod:`qpissa.preference` says.
"""
from __future__ import annotations

import random
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from qpissa import distributed
from qpissa.data import load_records
from qpissa.errors import UserError
from qpissa.preference import build_pairs, check_record
from qpissa.train.config import TrainConfig
from qpissa.train.preference import PreferenceTask


def prepare_preference(cfg: TrainConfig) -> tuple[TrainConfig, Any, Any, PreferenceTask]:
    """Data, model and task of a preference run for :func:`qpissa.train.loop.fit`."""
    from qpissa.train import fsdp
    from qpissa.train.model import load_model

    names = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    if cfg.max_prompt_length is not None and cfg.max_prompt_length < 0:
        raise UserError(f"--max-prompt-length {cfg.max_prompt_length}: pass 0 or more tokens")
    records = load_records(cfg.data, cfg.data_split, cfg.data_config, cfg.data_limit)
    eval_records = (load_records(cfg.eval_data, cfg.eval_split, cfg.data_config,
                                 flags=("--eval-split", "--data-config"))[:cfg.eval_examples] if cfg.eval_data else [])
    for source, rows in ((str(cfg.data), records), (str(cfg.eval_data), eval_records)):
        for i, rec in enumerate(rows):  # one line before any weights are read
            check_record(rec, names, f"{source} row {i}")
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    model, tokenizer = load_model(cfg)
    if cfg.fsdp:
        model = fsdp.shard(model, cfg.device, cfg.fsdp_offload)
    dc = cfg.data_cfg
    pairs = build_pairs(records, tokenizer, names, dc.max_length, cfg.max_prompt_length, dc.skip_long_prompts,
                        str(cfg.data))
    held = (build_pairs(eval_records, tokenizer, names, dc.max_length, cfg.max_prompt_length, dc.skip_long_prompts,
                        str(cfg.eval_data)) if eval_records else [])
    for source, kept in ((cfg.data, pairs), (cfg.eval_data, held)):
        same = sum(p.chosen == p.rejected for p in kept)
        if same and distributed.detect().is_main:  # truncation cut both before they differ: Δ ≡ 0, no signal
            print(f"{source}: {same} of {len(kept)} pairs have identical completions after truncation to "
                  f"--max-length {dc.max_length} (no signal; their rewards tie); raise --max-length or lower "
                  "--max-prompt-length", file=sys.stderr)
    if check_record(records[0], names, str(cfg.data)) == "chat":  # eval/generate prompt as trained
        cfg = replace(cfg, data_cfg=replace(dc, template="chat"))
    task = PreferenceTask(pairs, held, tokenizer.pad_token_id, cfg.batch_size, cfg.precision, cfg.objective,
                          float(cfg.beta), cfg.dpo_loss, cfg.simpo_gamma, cfg.reference)
    return cfg, model, tokenizer, task
