"""PaLM's parallel block and GPT-3's banded layers under tensor parallelism (TP=2, with and without
sequence parallelism) against the one-process model: the harness of test_tensor_parallel.py (loss within
1e-5 relative, every gathered gradient within 1e-5 of its largest entry) on a preset written here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.distributed.test_tensor_parallel import _spawn

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def test_parallel_block_with_banded_layers_tp2_matches_one_process(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "models" / "palm-tiny.yaml").read_text())
    # Two key/value heads so they split over two ranks (PaLM's single one cannot); a band of 4 inside the
    # harness's 16-token sequences, on the odd layer.
    cfg.update(num_kv_heads=2, local_attention_window=4, num_layers=2)
    preset = tmp_path / "palm-banded-tiny.yaml"
    preset.write_text(yaml.safe_dump(cfg))
    _spawn("model", str(preset), timeout=300.0)
