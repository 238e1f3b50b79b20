"""Deterministic loading of packed samples from webdataset shards, split across dp ranks and workers.

The train split is one token stream per epoch: the shards in a seeded order (a new order each epoch when
`shuffle_shards`), each shard's documents in order, every document followed by <eos>. Sample j of an epoch is
the slice [j*S, (j+1)*S) of that stream, S being the objective's sample length (packing: documents run
across sample boundaries, nothing is padded, the stream's tail that does not fill a sample is dropped).

Global batch b holds samples [b*G, (b+1)*G); with a batch-size ramp (data_pipeline/batch_ramp.py), step t
holds [consumed(t), consumed(t) + batch(t)), batch(t) a function of consumed(t). Data-parallel rank r takes
its contiguous share of the step's samples (G/dp), in micro batches of `micro_batch_size`; DataLoader
worker w of that rank produces every W-th micro batch, so the DataLoader's round-robin returns them in
order. Because a sample's contents depend only on its global
index, the batches are the same for every dp size, worker count and resume point: the loader's whole state
is `consumed_samples` (the packer's leftovers and the objective's RNG are functions of it) plus a
fingerprint of the data it refers to. Restoring seeks straight to the shard that holds the position, using
the per-shard token counts of the manifest.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batch_ramp import BatchSchedule, BatchSizeRamp
from data_pipeline.manifest import iter_shard_documents, load_manifest


@dataclass(frozen=True)
class SplitStream:
    """The shards of one split and their lengths in stream tokens (tokens + one <eos> per document)."""

    paths: tuple[Path, ...]
    lengths: tuple[int, ...]
    fingerprint: str

    @classmethod
    def from_manifest(cls, shards_dir: str | Path, split: str) -> SplitStream:
        shards_dir = Path(shards_dir)
        manifest = load_manifest(shards_dir)
        entries = [s for s in manifest["shards"] if s["split"] == split]
        if not entries:
            splits = sorted({s["split"] for s in manifest["shards"]})
            raise ValueError(
                f"{shards_dir / 'manifest.json'}: no shards in split {split!r} (splits: {splits})"
            )
        digest = hashlib.sha256()
        for s in entries:
            digest.update(f"{s['name']}:{s['sha256']}\n".encode())
        return cls(
            paths=tuple(shards_dir / s["name"] for s in entries),
            lengths=tuple(int(s["tokens"]) + int(s["documents"]) for s in entries),
            fingerprint=digest.hexdigest(),
        )

    @property
    def total(self) -> int:
        return sum(self.lengths)


class _StreamReader:
    """Reads slices of one epoch's token stream; sequential reads never reopen a shard."""

    def __init__(self, stream: SplitStream, order: np.ndarray, eos_id: int):
        self.stream, self.order, self.eos_id = stream, order, eos_id
        lengths = [stream.lengths[i] for i in order]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()  # stream offset of each shard
        self.shard = -1
        self.docs: Iterator[tuple[str, np.ndarray]] | None = None
        self.doc = np.empty(0, dtype=np.int64)  # current document + <eos>
        self.doc_start = 0  # stream offset of self.doc[0]

    def _open(self, i: int) -> None:
        self.shard = i
        self.docs = iter_shard_documents(self.stream.paths[self.order[i]])
        self.doc = np.empty(0, dtype=np.int64)
        self.doc_start = self.starts[i]

    def _next_doc(self) -> None:
        path = self.stream.paths[self.order[self.shard]]
        self.doc_start += len(self.doc)
        try:
            _, tokens = next(self.docs)  # type: ignore[arg-type]
        except StopIteration:
            raise RuntimeError(
                f"{path}: ended at stream offset {self.doc_start}, before the {self.stream.lengths[self.order[self.shard]]}"
                " tokens the manifest promises; re-verify the shards (`verify_shards`)"
            ) from None
        doc = np.empty(len(tokens) + 1, dtype=np.int64)
        doc[:-1] = tokens
        doc[-1] = self.eos_id
        self.doc = doc

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            pos = start + filled
            i = bisect.bisect_right(self.starts, pos) - 1
            if i != self.shard or pos < self.doc_start:
                self._open(i)
            while self.doc_start + len(self.doc) <= pos:
                self._next_doc()
            lo = pos - self.doc_start
            take = min(n - filled, len(self.doc) - lo)
            out[filled : filled + take] = self.doc[lo : lo + take]
            filled += take
        return out


class PackedSamples:
    """Global sample index -> (sample_len,) tokens. Epoch e visits the shards in order `shard_order(e)`."""

    def __init__(self, stream: SplitStream, *, sample_len: int, eos_id: int, seed: int, shuffle: bool):
        self.stream, self.sample_len, self.eos_id, self.seed, self.shuffle = (
            stream,
            sample_len,
            eos_id,
            seed,
            shuffle,
        )
        self.samples_per_epoch = stream.total // sample_len
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"the split holds {stream.total} stream tokens, fewer than one sample of {sample_len}; "
                "shard more text or shorten data.seq_len"
            )
        self._epoch = -1
        self._reader: _StreamReader | None = None

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.stream.paths)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, k = divmod(index, self.samples_per_epoch)
        if epoch != self._epoch or self._reader is None:
            self._epoch = epoch
            self._reader = _StreamReader(self.stream, self.shard_order(epoch), self.eos_id)
        return self._reader.read(k * self.sample_len, self.sample_len)


class BlendedSamples:
    """A weighted mixture of several sources' sample streams, exactly reproducible and resumable.

    Global samples come in blocks of `block` samples. Each block holds exactly round(weight x block)
    samples of each source (largest remainders settle the rounding), in an order shuffled by
    (seed, block index). So sample j's source, and its index within that source, follow from j alone —
    no history, no index arrays — and any prefix of the run matches the weights to within one block."""

    def __init__(self, sources: list[PackedSamples], weights: list[float], *, seed: int, block: int = 1000):
        if len(sources) != len(weights) or not sources:
            raise ValueError("blending needs one weight per source and at least one source")
        if any(w <= 0 for w in weights):
            raise ValueError(f"data.sources weights must be > 0, got {weights}")
        total = sum(weights)
        exact = [w / total * block for w in weights]
        quota = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: exact[i] - quota[i], reverse=True)[
            : block - sum(quota)
        ]:
            quota[i] += 1
        if any(q == 0 for q in quota):
            raise ValueError(
                f"data.sources weights {weights}: a source would get no sample in a block of {block}"
            )
        self.sources, self.quota, self.seed, self.block = sources, quota, seed, block
        self.samples_per_epoch = sum(s.samples_per_epoch for s in sources)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, index of that position among its source's samples in the block)."""
        if self._cache is None or self._cache[0] != b:
            ids = np.repeat(np.arange(len(self.quota)), self.quota)
            order = np.random.default_rng([self.seed, 0xB1E4D, b]).permutation(ids)
            rank = np.empty(self.block, dtype=np.int64)
            for s in range(len(self.quota)):
                where = order == s
                rank[where] = np.arange(int(where.sum()))
            self._cache = (b, order, rank)
        return self._cache[1], self._cache[2]

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (source, sample index within that source)."""
        b, r = divmod(index, self.block)
        order, rank = self._block(b)
        s = int(order[r])
        return s, b * self.quota[s] + int(rank[r])

    def counts(self, consumed: int) -> list[int]:
        """Samples drawn from each source among the first `consumed`."""
        b, r = divmod(consumed, self.block)
        order, _ = self._block(b)
        return [b * q + int((order[:r] == s).sum()) for s, q in enumerate(self.quota)]

    def __getitem__(self, index: int) -> np.ndarray:
        s, k = self.locate(index)
        return self.sources[s][k]


class MicroBatches(IterableDataset):
    """Yields this rank's micro batches from micro-batch number `start_micro` on (infinite).

    Step t holds the global samples [first(t), first(t) + batch(t)) of `BatchSchedule` (a fixed batch:
    [t*G, (t+1)*G)); rank r takes its contiguous batch(t)/dp of them, in micro batches of `micro_batch_size`.
    """

    def __init__(
        self,
        samples: PackedSamples | BlendedSamples,
        objective: Any,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        start_micro: int = 0,
        ramp: BatchSizeRamp | None = None,
    ):
        super().__init__()
        self.schedule = BatchSchedule(global_batch_size, ramp)
        for seg in self.schedule.segments:
            if seg.batch % (dp_size * micro_batch_size):
                raise ValueError(
                    f"global batch {seg.batch} does not split into dp={dp_size} ranks x micro batches "
                    f"of {micro_batch_size}"
                )
        self.samples, self.objective = samples, objective
        self.micro, self.global_batch, self.dp_rank, self.dp_size = (
            micro_batch_size,
            global_batch_size,
            dp_rank,
            dp_size,
        )
        # This rank's number of the first micro batch of each segment of the schedule.
        self._seg_micro = [0]
        for seg in self.schedule.segments[:-1]:
            self._seg_micro.append(self._seg_micro[-1] + seg.steps * self.gas_of(seg.batch))  # type: ignore[operator]
        self.start_micro = start_micro

    def gas_of(self, batch: int) -> int:
        """Micro batches per rank in a step of `batch` samples."""
        return batch // (self.dp_size * self.micro)

    def step_of_micro(self, q: int) -> tuple[int, int]:
        """(step number, index within the step) of this rank's micro batch number q."""
        i = bisect.bisect_right(self._seg_micro, q) - 1
        seg = self.schedule.segments[i]
        k, m = divmod(q - self._seg_micro[i], self.gas_of(seg.batch))
        return seg.first_step + k, m

    def first_micro(self, step: int) -> int:
        """This rank's number of the first micro batch of step `step`."""
        i = self.schedule.segment_index(step)
        seg = self.schedule.segments[i]
        return self._seg_micro[i] + (step - seg.first_step) * self.gas_of(seg.batch)

    def first_sample(self, q: int) -> int:
        """Global index of the first sample of this rank's micro batch number q."""
        step, m = self.step_of_micro(q)
        first, batch = self.schedule.step_start(step)
        return first + self.dp_rank * (batch // self.dp_size) + m * self.micro

    def batch(self, q: int) -> dict[str, torch.Tensor]:
        first = self.first_sample(q)
        idx = np.arange(first, first + self.micro)
        block = np.stack([self.samples[int(i)] for i in idx])  # (micro, sample_len)
        out = self.objective(block, idx)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        q = self.start_micro + w
        while True:
            yield self.batch(q)
            q += nw


class TrainLoader:
    """Iterator over this rank's micro batches with a checkpointable position.

    `state_dict()` counts only micro batches handed to the caller, not those prefetched by workers.
    """

    def __init__(
        self,
        shards_dir: str | Path | list[tuple[str | Path, float]],
        objective: Any,
        *,
        split: str,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_shards: bool = True,
        eos_id: int,
        num_workers: int = 0,
        consumed_samples: int = 0,
        batch_size_ramp: BatchSizeRamp | None = None,
    ):
        self.objective = objective
        self.ramp = batch_size_ramp
        self.global_batch, self.num_workers = global_batch_size, num_workers
        self.seed, self.shuffle = seed, shuffle_shards
        # One source (a shards directory) or a weighted blend of several: [(directory, weight), ...].
        blend = list(shards_dir) if isinstance(shards_dir, (list, tuple)) else [(shards_dir, 1.0)]
        self.source_names = [
            f"{i}:{path}" for i, (path, _) in enumerate(blend)
        ]  # unique even if a path repeats
        streams = [SplitStream.from_manifest(path, split) for path, _ in blend]
        parts = [
            PackedSamples(
                stream, sample_len=objective.sample_len, eos_id=eos_id, seed=seed + i, shuffle=shuffle_shards
            )
            for i, stream in enumerate(streams)
        ]
        samples: PackedSamples | BlendedSamples
        if len(blend) == 1:
            samples, self.blend = parts[0], None
            self.fingerprint = streams[0].fingerprint
        else:
            samples = self.blend = BlendedSamples(parts, [float(w) for _, w in blend], seed=seed)
            digest = hashlib.sha256()
            for stream, (_, weight) in zip(streams, blend):
                digest.update(f"{stream.fingerprint}:{float(weight)!r}\n".encode())
            self.fingerprint = digest.hexdigest()
        self.samples_per_epoch = samples.samples_per_epoch
        self.dataset = MicroBatches(
            samples,
            objective,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            ramp=batch_size_ramp,
        )
        # ValueError unless consumed_samples ends a step (of the ramp, if there is one).
        self.dataset.start_micro = self.dataset.first_micro(self.dataset.schedule.step_of(consumed_samples))
        self.micro_batches_returned = 0
        self._iter: Iterator | None = None

    def _position(self) -> tuple[int, int]:
        """(step, micro batch within it) of the next micro batch to hand out."""
        return self.dataset.step_of_micro(self.dataset.start_micro + self.micro_batches_returned)

    @property
    def batch_size(self) -> int:
        """Global batch of the step the next micro batch belongs to (with a ramp it changes over the run)."""
        return self.dataset.schedule.step_start(self._position()[0])[1]

    @property
    def gas(self) -> int:
        """Micro batches per rank in the step the next micro batch belongs to."""
        return self.dataset.gas_of(self.batch_size)

    def source_samples(self) -> dict[str, int] | None:
        """Samples drawn from each blended source so far, keyed "INDEX:PATH" (None without blending)."""
        if self.blend is None:
            return None
        return dict(zip(self.source_names, self.blend.counts(self.consumed_samples)))

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4 if self.num_workers else None,
                # Its own generator: creating the iterator draws a base seed, which must not advance the
                # global torch RNG that dropout uses (a resumed run creates its iterator at another point).
                generator=torch.Generator().manual_seed(self.seed),
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.micro_batches_returned += 1
        return batch

    @property
    def consumed_samples(self) -> int:
        """Samples of whole global batches handed out so far (all ranks together)."""
        return self.dataset.schedule.step_start(self._position()[0])[0]

    def state_dict(self) -> dict[str, Any]:
        if self._position()[1]:
            raise RuntimeError("loader state taken in the middle of a global batch (not at a step boundary)")
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.consumed_samples // self.samples_per_epoch,
            "fingerprint": self.fingerprint,
            "sample_len": self.objective.sample_len,
            "global_batch_size": self.global_batch,
            "batch_size_ramp": self.ramp.as_dict() if self.ramp else None,
            "seed": self.seed,
            "shuffle_shards": self.shuffle,
        }

    @staticmethod
    def check_resumable(
        state: dict[str, Any],
        *,
        fingerprint: str,
        sample_len: int,
        global_batch_size: int,
        seed: int,
        shuffle_shards: bool,
        batch_size_ramp: BatchSizeRamp | None = None,
    ) -> list[str]:
        """What differs between a saved loader state and the current run (empty = exact continuation).
        A state saved before ramps existed has no `batch_size_ramp`: it reads as no ramp."""
        now = {
            "fingerprint": fingerprint,
            "sample_len": sample_len,
            "global_batch_size": global_batch_size,
            "batch_size_ramp": batch_size_ramp.as_dict() if batch_size_ramp else None,
            "seed": seed,
            "shuffle_shards": shuffle_shards,
        }
        return [
            f"{k}: checkpoint has {state.get(k)!r}, this run has {v!r}"
            for k, v in now.items()
            if state.get(k) != v
        ]


def eval_batches(
    shards_dir: str | Path,
    objective: Any,
    *,
    split: str,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    eos_id: int,
    num_batches: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """The first `num_batches` micro batches of rank `dp_rank` of a held-out split (same every call)."""
    stream = SplitStream.from_manifest(shards_dir, split)
    samples = PackedSamples(stream, sample_len=objective.sample_len, eos_id=eos_id, seed=0, shuffle=False)
    data = MicroBatches(
        samples,
        objective,
        micro_batch_size=micro_batch_size,
        global_batch_size=micro_batch_size * dp_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    for q in range(num_batches):
        yield data.batch(q)
