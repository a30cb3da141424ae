"""Dataset card (README.md) and preview grid of a synthetic dataset, built from ``generation.json``."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData, constants
from PIL import Image

from ..outputs import write_file, write_text
from .registry import BN_LOSSES, SYNTH_METHODS

__all__ = ["render_card", "write_card", "write_preview", "size_category"]

# how the card names each field of a stored "priors" mapping (the Regularizers and the warm-up)
_HYPERPARAMETER_LABELS = {"tv_weight": "total variation weight", "l2_weight": "L2 weight",
                          "jitter": "jitter (pixels)", "flip": "random flips", "ce_weight": "cross-entropy weight",
                          "warmup": "warm-up fraction"}


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def write_preview(folder: Path, manifest: dict[str, Any], *, count: int = 64, scale: int | None = None) -> Path:
    """A grid of the first ``count`` images (read back from the shards) as ``preview.png``."""
    images: list[Image.Image] = []
    for record in sorted(manifest["shards"], key=lambda r: r["index"]):
        table = pq.read_table(folder / record["file"], columns=["image"])
        for cell in table.column("image").to_pylist():
            images.append(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
            if len(images) >= count:
                break
        if len(images) >= count:
            break
    width, height = images[0].size
    scale = scale or max(1, 64 // max(width, height))  # small images are enlarged (nearest) to stay visible
    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    pad = 2
    cell_w, cell_h = width * scale + pad, height * scale + pad
    grid = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    for i, image in enumerate(images):
        if scale != 1:
            image = image.resize((width * scale, height * scale), Image.NEAREST)
        grid.paste(image, (pad + (i % cols) * cell_w, pad + (i // cols) * cell_h))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", compress_level=6, optimize=False)
    return write_file(folder / "preview.png", lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _class_label_info(names: list[str]) -> dict[str, Any]:
    return {"class_label": {"names": {str(i): name for i, name in enumerate(names)}}}


def render_card(manifest: dict[str, Any], *, repo_id: str | None = None, model_repo: str | None = None):
    """The :class:`huggingface_hub.DatasetCard` of a finished run.

    Args:
        manifest: the run's ``generation.json`` content.
        repo_id: Hub id the card is written for (used in the loading snippet); the local folder otherwise.
        model_repo: Hub id of a quantized model calibrated with this data, linked from the card.
    """
    args = manifest["arguments"]
    model = manifest["model"]
    names = manifest["label_names"]
    divergence = manifest.get("bn_divergence") or {}
    n = manifest["num_rows"]
    shard_bytes = sum(r["bytes"] for r in manifest["shards"])
    model_name = model.get("repo_id") or model.get("spec")
    card_data = DatasetCardData(
        license=model.get("license") or "unknown",
        pretty_name=f"Synthetic {args['method']} images from {model_name}",
        size_categories=size_category(n),
        task_categories=["image-classification"],
        tags=["synthetic", "data-free-quantization", "hub-dfq", f"method-{args['method'].replace('+', '-plus-')}"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        dataset_info={
            "features": [{"name": "image", "dtype": "image"}, {"name": "label", **_class_label_info(names)}],
            "splits": [{"name": "train", "num_bytes": shard_bytes, "num_examples": n}],
            "download_size": shard_bytes,
            "dataset_size": shard_bytes,
        },
    )
    method = SYNTH_METHODS.get(args["method"])
    priors = args["priors"]
    if method.optimised:
        loss = BN_LOSSES.get(args["loss"]) if args["loss"] in BN_LOSSES else None
        hyper = [("images", n), ("iterations per batch", args["iters"]), ("batch size", args["batch_size"])]
        if method.needs_bn:
            hyper.append(("BN loss", f"{args['loss']}: {loss.summary if loss else 'not registered here'}"))
        hyper += [("learning rate (Adam, peak)", args["lr"]),
                  ("schedule", f"linear warm-up {priors['warmup']:.0%}, cosine decay"),
                  ("precision", args["precision"]), ("rows per shard", args["shard_size"])]
        for field in method.hyperparameters:
            value = manifest.get("jitter") if field == "jitter" else priors.get(field)
            hyper.append((_HYPERPARAMETER_LABELS.get(field, field), value))
    else:
        hyper = [("images", n), ("precision", args["precision"]), ("rows per shard", args["shard_size"])]
    hyper.append(("initial noise", priors.get("noise", "white")))  # not stored when white (SynthConfig.to_dict)
    label_note = ("the target class each image was optimised towards (class-balanced)." if method.class_targets else
                  "the model's prediction on the stored image.")
    spec = model.get("repo_id") or model.get("spec")
    command = (f"hub-dfq synth {spec} --method {args['method']} --num-images {n} --iters {args['iters']} "
               f"--batch-size {args['batch_size']} --loss {args['loss']} --lr {args['lr']:g} "
               f"--noise {priors.get('noise', 'white')} --seed {args['seed']} "
               f"--shard-size {args['shard_size']} --precision {args['precision']} --out DIR")
    c, h, w = manifest["input_size"]
    wall = manifest.get("wall_time_s")
    return DatasetCard.from_template(
        card_data,
        template_path=str(resources.files("hub_dfq") / "model_cards" / "dataset_card.md"),
        pretty_name=card_data.pretty_name,
        num_rows=n,
        image_size=f"{w}x{h} {'RGB' if c == 3 else 'grayscale'}",
        hub_dfq_version=manifest["hub_dfq_version"],
        model_name=model_name,
        model_url=model.get("url"),
        model_commit=model.get("commit"),
        model_spec=spec,
        weights_sha256=model.get("weights_sha256"),
        method=args["method"],
        method_description=method.description,
        fingerprint=manifest.get("fingerprint", "n/a"),
        hyperparameters=hyper,
        seed=args["seed"],
        metric=divergence.get("metric", args["loss"]),
        num_bn_layers=len((divergence.get("end") or {}).get("layers", {})),
        start_divergence=_fmt((divergence.get("start") or {}).get("total")),
        end_divergence=_fmt((divergence.get("end") or {}).get("total")),
        wall_time=f"{wall:.1f} s ({manifest.get('device', 'cpu')})" if wall is not None else "n/a",
        label_note=label_note,
        preview="preview.png",
        load_path=repo_id or "PATH/TO/THIS/FOLDER",
        command=command,
        license=model.get("license") or "unknown",
        model_repo=model_repo,
        model_repo_url=_model_url(model_repo) if model_repo else None,
    )


def _model_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/{repo_id}"


def write_card(folder: Path, manifest: dict[str, Any], *, repo_id: str | None = None,
               model_repo: str | None = None) -> Path:
    card = render_card(manifest, repo_id=repo_id, model_repo=model_repo)
    return write_text(folder / "README.md", str(card))
