"""Tokenized webdataset shards: the entry points kept where users import them from.

``shard_corpus`` runs the staged job of :mod:`data_pipeline.pipeline` (one task per input file or
piece; local processes here, Slurm job arrays through ``pretrain data shard --executor slurm``).

Layout of ``out_dir``::

    train-FFFFF-PPPP-KKKK.tar  shards of input file FFFFF, piece PPPP (0 unless the file was cut), KKKK-th
    val-FFFFF-PPPP-KKKK.tar    of that piece's split
    manifest.json              written last by the merge; its presence means the job finished
    .shard_options.json        the options, inputs and tokenizer hash of the job that owns this directory
    .work/                     the job file, per-task markers, and scratch files while stages run

One sample per document: ``__key__`` is ``FFFFF-PPPP-NNNNNNNNN`` (file, piece, position of the record in
the piece), ``tokens.npy`` its token ids without ``</s>`` (the loader adds the separator), ``meta.json``
its url, timestamp, source file and line. Shards are objective-agnostic: GPT, BERT and T5 all read them.

Every input record is accounted for in the manifest: ``documents_in`` (records read) equals
``documents_written`` + the ``rejected`` counts (malformed input, by reason) + the documents removed
by cleaning (``page_*`` counts in ``cleaning``) + ``filtered`` (``too_short``) - the extra pieces of
records split for size (``oversize_split``).
"""

from __future__ import annotations

from data_pipeline.jobs import ShardingError, shard_corpus
from data_pipeline.pipeline import assign_split

__all__ = ["ShardingError", "assign_split", "shard_corpus"]
