"""How validation batches and fine-tuning batches are shared out over data-parallel ranks
(pretrain/evaluate.py `validation_batches`, pretrain/finetune.py `rank_share`, `epoch_batches`): together
the ranks see exactly the one-process batches, bit for bit, and each rank the same number of them."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.manifest import load_manifest
from data_pipeline.objectives import build_objective
from pretrain.evaluate import validation_batches
from pretrain.finetune import epoch_batches, rank_share


@pytest.mark.parametrize("objective_name", ["gpt", "bert", "t5"])
@pytest.mark.parametrize(("num_batches", "dp"), [(4, 2), (3, 2), (5, 4), (2, 4)])
def test_ranks_together_read_the_one_process_batches(shards_dir, objective_name, num_batches, dp):
    tok = load_manifest(shards_dir)["tokenizer"]
    objective = build_objective(objective_name, seq_len=32, tokenizer=tok, seed=3)
    kw = {"split": "val", "micro_batch_size": 2, "num_batches": num_batches, "eos_id": int(tok["eos_id"])}
    one, counted = validation_batches(shards_dir, objective, **kw)
    assert counted == [True] * num_batches
    seen: dict[int, dict[str, torch.Tensor]] = {}
    per_rank = []
    for rank in range(dp):
        batches, counted = validation_batches(shards_dir, objective, dp_rank=rank, dp_size=dp, **kw)
        per_rank.append(len(batches))
        for k, (batch, keep) in enumerate(zip(batches, counted)):
            assert keep == (k * dp + rank < num_batches)
            if keep:
                seen[k * dp + rank] = batch
    assert len(set(per_rank)) == 1  # the same number of forward passes on every rank
    assert sorted(seen) == list(range(num_batches))
    for q, batch in seen.items():
        assert batch.keys() == one[q].keys()
        assert all(torch.equal(batch[key], one[q][key]) for key in batch), f"batch {q}"


def test_rank_shares_cover_the_global_batch_in_order():
    for size in range(1, 10):
        rows = list(range(100, 100 + size))
        for dp in (1, 2, 3, 4):
            shares = [rank_share(rows, r, dp) for r in range(dp)]
            assert [x for share, _ in shares for x in share] == rows
            for share, first in shares:
                assert not share or rows[first : first + len(share)] == share


def test_epoch_batches_are_seeded_permutations():
    batches = epoch_batches(17, 8, 2, seed=5)
    assert [len(b) for b in batches] == [8, 8, 1, 8, 8, 1]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(x for b in epoch for x in b) == list(range(17))
    assert batches == epoch_batches(17, 8, 2, seed=5) != epoch_batches(17, 8, 2, seed=6)
