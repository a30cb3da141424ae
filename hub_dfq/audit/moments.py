"""Streaming moments of every BatchNorm input over a dataset, with batch-level scores on the fly.

One forward pre-hook per BN layer reduces its input to per-image, per-channel float32 sums of ``x``
and ``x**2`` (one cheap pass over the activation, no host sync); after each forward pass those are
converted to float64 once and added to accumulators that stay on the model's device. Rows are
grouped into fixed-size *score batches* by their index in the dataset (rows ``[b * S, (b + 1) * S)``
form score batch ``b``; ``S`` = 64 by default, independent of the forward batch size): each score
batch whose ``S`` rows were all readable gets its own divergence (the batch-level score
distribution). The confidence interval comes from an online Poisson bootstrap over *images*: row
``r`` of score batch ``b`` weighs ``w[:, r % S]`` in every replicate, with ``w ~ Poisson(1)`` of shape
``(replicates, S)`` drawn from a generator seeded by ``(seed, b)`` alone, so the interval needs no
second pass and no per-image storage. (Resampling whole score batches left a 200-image candidate
with 3-4 units, and intervals that were degenerate or clamped at 0.)

Because a score batch and its weights depend only on row indices, processes that each read whole
score batches of a dataset (:mod:`hub_dfq.partition`) compute exactly the single-process batches;
:meth:`MomentAccumulator.merge` then sums the float64 accumulators over the processes and collects
the batch scores in data order.

With ``per_image=True`` the same captured sums also give every image its own score
(:func:`image_layer_divergences`: the image's per-channel spatial mean and variance against the running
statistics), which :func:`hub_dfq.audit.images.score_images` writes per row and the audit summarises.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import nn

from ..bnstats import running_moments
from ..distributed import Distributed
from .registry import divergence_fn
from .scores import LayerMoments, aggregate_layers

__all__ = ["LayerMoments", "MomentAccumulator", "bootstrap_seed", "per_image_sums", "image_layer_divergences",
           "IMAGE_METRIC"]

# The per-image divergence by default: one image's spatial variance is narrow, and KL(running || image) inflates it
# at every layer; KL(image || running) separated noise, blur and contrast from clean images best (issue 21).
IMAGE_METRIC = "reverse_kl"


BNLayers = Sequence[tuple[str, nn.Module]]


def per_image_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C)`` float32 sums of ``x`` and ``x**2`` over every dimension but batch and channel."""
    x = x.detach()
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    flat = x.reshape(x.shape[0], x.shape[1], -1).float()
    # ||x||^2 is one fused reduction (~2x faster than x.square().sum() and no temporary tensor).
    return flat.sum(-1), torch.linalg.vector_norm(flat, dim=-1).square()


def image_layer_divergences(sums: Sequence[tuple[torch.Tensor, torch.Tensor]], values_per_image: Sequence[int],
                            running: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            metric: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``(N, layers)`` float64: per image and BN layer, the channel mean of ``metric(running, image moments)``.

    An image's moments at a layer are the per-channel mean and (biased) variance of its own activation
    over the spatial positions (``sums`` from :func:`per_image_sums`, ``values_per_image`` positions each).
    """
    out = []
    for (s, q), count, (mu_p, var_p) in zip(sums, values_per_image, running):
        s, q = s.to(torch.float64), q.to(torch.float64)
        mean = s / max(count, 1)
        var = (q / max(count, 1) - mean.square()).clamp_min(0.0)
        out.append(metric(mu_p.to(s.device)[None], var_p.to(s.device)[None], mean, var).mean(-1))
    return torch.stack(out, dim=1)


def bootstrap_seed(seed: int, batch: int) -> int:
    """Seed of the bootstrap weights of score batch ``batch``: a function of the run seed and the index only."""
    return int.from_bytes(hashlib.sha256(f"hub-dfq/audit/bootstrap/{seed}/{batch}".encode()).digest()[:8],
                          "little") >> 1


class MomentAccumulator:
    """Accumulate BN-input moments of everything forwarded inside ``with acc:``.

    Args:
        layers: ``(name, bn)`` pairs, each with running statistics.
        device: where the accumulators live (the model's device).
        score_batch: rows per batch-level score (and per draw of bootstrap weights).
        metric: divergence of the batch-level scores (see :mod:`hub_dfq.audit.registry`).
        bootstrap: number of Poisson-bootstrap replicates over images (0 disables the interval).
        seed: seed of the bootstrap weights.
        per_image: also keep every image's own per-layer divergence (:meth:`image_scores`).
        image_metric: the divergence of the per-image scores (default: ``metric``).

    Call :meth:`step` after every forward pass (it consumes what the hooks captured), then
    :meth:`finish`, then (in a multi-process run) :meth:`merge`.
    """

    def __init__(self, layers: BNLayers, *, device: torch.device, score_batch: int = 64, metric: str = "kl",
                 bootstrap: int = 200, seed: int = 0, per_image: bool = False,
                 image_metric: str | None = None) -> None:
        self.layers = list(layers)
        self.device = device
        self.score_batch = int(score_batch)
        self.metric = divergence_fn(metric)
        self.bootstrap = int(bootstrap)
        self.running = running_moments(self.layers, device=device)
        widths = [bn.running_mean.numel() for _, bn in self.layers]
        f64 = dict(dtype=torch.float64, device=device)
        self.sum = [torch.zeros(c, **f64) for c in widths]
        self.sumsq = [torch.zeros(c, **f64) for c in widths]
        self.values_per_image = [0] * len(widths)  # spatial size of each BN input
        self.n_images = 0
        self.seed = int(seed)
        self._captured: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(widths)
        self._open: int | None = None  # the score batch being filled
        self._pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in widths]
        self._pending_images = 0
        self._next_row = 0
        self._batch_scores: list[tuple[int, torch.Tensor | float]] = []  # (score batch, divergence)
        # Poisson bootstrap over images: replicate j weighs row r of score batch b by w[j, r % S], drawn from (seed, b).
        self._weights_of: int | None = None
        self._weights_draw: torch.Tensor | None = None
        self._boot_sum = [torch.zeros(self.bootstrap, c, **f64) for c in widths]
        self._boot_sumsq = [torch.zeros(self.bootstrap, c, **f64) for c in widths]
        self._boot_images = torch.zeros(self.bootstrap, **f64)
        self._handles: list = []
        self.per_image = bool(per_image)
        self.image_metric = divergence_fn(image_metric) if image_metric else self.metric
        self._image_rows: list[int] = []
        self._image_layers: list[torch.Tensor] = []  # (n, layers) float64 on the CPU, per forward pass

    # ---- hooks ----------------------------------------------------------------------------------
    def _hook(self, i: int) -> Callable:
        def hook(_module, args):
            x = args[0]
            self.values_per_image[i] = x[0, 0].numel() if x.dim() > 2 else 1
            self._captured[i] = per_image_sums(x)

        return hook

    def __enter__(self) -> "MomentAccumulator":
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, (_, bn) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- accumulation ---------------------------------------------------------------------------
    def add(self, sums: Sequence[tuple[torch.Tensor, torch.Tensor]], values_per_image: Sequence[int],
            rows: Sequence[int] | None = None) -> None:
        """Fold per-image sums computed elsewhere, as :meth:`step` folds what the hooks captured.

        Lets a benchmark reuse one forward pass for many resampled candidates (the CI coverage check).

        Args:
            sums: per layer ``(N, C)`` sums of ``x`` and ``x**2`` per image (:func:`per_image_sums`).
            values_per_image: per layer, the spatial size those sums run over.
            rows: as in :meth:`step`.
        """
        if len(sums) != len(self.layers) or len(values_per_image) != len(self.layers):
            raise ValueError(f"expected sums of {len(self.layers)} layers, got {len(sums)}")
        self.values_per_image = [int(v) for v in values_per_image]
        self._captured = [(s.to(self.device), q.to(self.device)) for s, q in sums]
        self.step(rows)

    def step(self, rows: Sequence[int] | None = None) -> None:
        """Fold the sums captured by the last forward pass into the accumulators.

        Args:
            rows: the dataset row index of each image of the batch, increasing (unreadable rows are
                simply absent); ``None``: the rows after the previous batch's.
        """
        if any(c is None for c in self._captured):
            missing = [self.layers[i][0] for i, c in enumerate(self._captured) if c is None]
            raise RuntimeError(f"BN layers {missing} were not called by the forward pass")
        n = self._captured[0][0].shape[0]
        rows = list(range(self._next_row, self._next_row + n)) if rows is None else list(rows)
        if len(rows) != n or any(b <= a for a, b in zip(rows, rows[1:])) or (rows and rows[0] < self._next_row):
            raise ValueError(f"`rows` must be {n} increasing row indices from {self._next_row} on, got {rows[:8]}...")
        captured = []
        for i, (s, q) in enumerate(self._captured):
            s, q = s.to(torch.float64), q.to(torch.float64)
            self.sum[i] += s.sum(0)
            self.sumsq[i] += q.sum(0)
            captured.append((s, q))
        self._captured = [None] * len(self.layers)
        self.n_images += n
        if self.per_image:
            self._image_rows += rows
            self._image_layers.append(
                image_layer_divergences(captured, self.values_per_image, self.running, self.image_metric).cpu())
        first = 0
        while first < n:  # runs of images of one score batch
            batch = rows[first] // self.score_batch
            last = first
            while last < n and rows[last] // self.score_batch == batch:
                last += 1
            if self._open is not None and batch != self._open:
                self._flush()
            self._open = batch
            weights = self._weights(batch, rows[first:last]) if self.bootstrap else None
            if weights is not None:
                self._boot_images += weights.sum(1)
            for i, (s, q) in enumerate(captured):
                self._pending[i].append((s[first:last], q[first:last]))
                if weights is not None:  # (replicates, k) @ (k, C): one small matmul per layer
                    self._boot_sum[i] += weights @ s[first:last]
                    self._boot_sumsq[i] += weights @ q[first:last]
            self._pending_images += last - first
            first = last
        if rows:
            self._next_row = rows[-1] + 1
        if self._open is not None and self._next_row >= (self._open + 1) * self.score_batch:
            self._flush()  # its last row has been seen

    def _weights(self, batch: int, rows: Sequence[int]) -> torch.Tensor:
        """Bootstrap weights ``(replicates, len(rows))`` of ``rows`` (all in score batch ``batch``).

        A function of ``(seed, batch, row)`` alone, so a process that reads only some score batches
        draws exactly the single-process weights; the score batch's draw is kept while it is open.
        """
        if self._weights_of != batch:
            generator = torch.Generator(device="cpu").manual_seed(bootstrap_seed(self.seed, batch))
            draw = torch.poisson(torch.ones(self.bootstrap, self.score_batch), generator=generator)
            self._weights_of, self._weights_draw = batch, draw.to(self.device, torch.float64)
        columns = torch.tensor([r - batch * self.score_batch for r in rows], device=self.device)
        return self._weights_draw.index_select(1, columns)

    def _flush(self) -> None:
        """Close the open score batch."""
        batch, size = self._open, self._pending_images
        scores = []
        for i in range(len(self.layers)):
            bs = torch.cat([p[0] for p in self._pending[i]]).sum(0)
            bq = torch.cat([p[1] for p in self._pending[i]]).sum(0)
            self._pending[i] = []
            if size == self.score_batch:
                count = size * self.values_per_image[i]
                mean = bs / count
                var = (bq / count - mean.square()).clamp_min(0.0)
                scores.append(self.metric(*self.running[i], mean, var).mean())
        self._pending_images = 0
        self._open = None
        if scores:  # the same aggregate as the pooled score: geometric mean over layers
            self._batch_scores.append((batch, aggregate_layers(torch.stack(scores))))

    def finish(self) -> None:
        """Close the last score batch (a partial one counts in the bootstrap, not as a batch-level score)."""
        if self._open is not None:
            self._flush()

    def merge(self, dist: Distributed) -> None:
        """Combine the accumulators of every process (after :meth:`finish`): sums are all-reduced in
        float64, batch scores gathered in data order. Every process ends with the same totals."""
        if not dist.enabled:
            return
        k = len(self.layers)
        count = torch.tensor([float(self.n_images)], dtype=torch.float64)
        reduced = dist.all_reduce(self.sum + self.sumsq + self._boot_sum + self._boot_sumsq
                                  + [self._boot_images, count])
        self.sum, self.sumsq = reduced[:k], reduced[k:2 * k]
        self._boot_sum, self._boot_sumsq = reduced[2 * k:3 * k], reduced[3 * k:4 * k]
        self._boot_images, self.n_images = reduced[4 * k], int(reduced[4 * k + 1].item())
        if self.per_image:  # every process ends with every image's scores, in row order
            parts = dist.all_gather(self.image_layer_scores())
            self._image_rows = [r for rows, _ in parts for r in rows]
            self._image_layers = [layers for _, layers in parts]
        mine = [(batch, float(score)) for batch, score in self._batch_scores]
        everyone = dist.all_gather((self.values_per_image, mine))
        # a process that saw no image never learnt the layers' spatial sizes
        self.values_per_image = [max(sizes[i] for sizes, _ in everyone) for i in range(k)]
        self._batch_scores = sorted((pair for _, scores in everyone for pair in scores), key=lambda p: p[0])

    # ---- results --------------------------------------------------------------------------------
    def moments(self) -> list[LayerMoments]:
        """Pooled moments per layer (float64, on the CPU)."""
        return [LayerMoments(name, self.n_images * self.values_per_image[i], self.sum[i].cpu(), self.sumsq[i].cpu())
                for i, (name, _) in enumerate(self.layers)]

    def image_layer_scores(self) -> tuple[list[int], torch.Tensor]:
        """``(rows, (N, layers) float64)``: each scored image's row and per-layer divergence, in row order."""
        if not self.per_image:
            raise RuntimeError("per-image scores were not kept: create the accumulator with per_image=True")
        layers = (torch.cat(self._image_layers) if self._image_layers
                  else torch.zeros(0, len(self.layers), dtype=torch.float64))
        order = sorted(range(len(self._image_rows)), key=self._image_rows.__getitem__)
        return [self._image_rows[i] for i in order], layers[order]

    def image_scores(self) -> tuple[list[int], torch.Tensor]:
        """``(rows, (N,) float64)``: each image's score, the geometric mean of its layer divergences (as the
        dataset-level divergence aggregates layers)."""
        rows, layers = self.image_layer_scores()
        return rows, aggregate_layers(layers.T) if len(rows) else torch.zeros(0, dtype=torch.float64)

    def batch_scores(self) -> list[float]:
        """Divergence of each full score batch alone, in data order."""
        return [float(score) for _, score in sorted(self._batch_scores, key=lambda p: p[0])]

    def bootstrap_moments(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(mean, var)`` of shape ``(replicates, C)``; replicates that drew no image are dropped."""
        if not self.bootstrap or self.n_images == 0:
            return None
        keep = self._boot_images > 0
        out = []
        for i in range(len(self.layers)):
            count = (self._boot_images[keep] * self.values_per_image[i])[:, None]
            mean = self._boot_sum[i][keep] / count
            var = (self._boot_sumsq[i][keep] / count - mean.square()).clamp_min(0.0)
            out.append((mean.cpu(), var.cpu()))
        return out
