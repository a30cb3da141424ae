#!/usr/bin/env python
"""Low-level statistics of synthetic image sets next to real photographs (issue #18).

For each set: the grey-level power spectrum in octave bands of spatial frequency (cycles per pixel; all sets
at the model's input size), the correlation of the colour channels, and the mean absolute difference of
horizontal neighbours. Real images are resized and centre-cropped like timm's eval transform (shorter side
256/224 of the crop, bicubic); synthetic images are stored at the input size already.

    python scripts/diag_synth_spectrum.py --sets SYNTH_FOLDER [SYNTH_FOLDER ...]

A folder is a hub-dfq synthetic dataset (`data/*.parquet` and `generation.json`, e.g. from the cache under
`$HUB_DFQ_CACHE/synth/`). Writes scripts/results/diag_synth_spectrum.json.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BANDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.71)


def load_images(files: list[Path], limit: int | None, size: int) -> torch.Tensor:
    images = []
    for file in files:
        for record in pq.read_table(file, columns=["image"]).column("image").to_pylist():
            image = Image.open(io.BytesIO(record["bytes"])).convert("RGB")
            if image.size != (size, size):
                scale = size * 256 / 224 / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                left, top = (image.width - size) // 2, (image.height - size) // 2
                image = image.crop((left, top, left + size, top + size))
            images.append(np.asarray(image, dtype=np.float32) / 255.0)
            if limit is not None and len(images) == limit:
                return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def statistics(images: torch.Tensor) -> dict:
    grey = images.mean(1)
    power = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().square().mean(0)
    h, w = power.shape
    radius = (torch.fft.fftfreq(h)[:, None].square() + torch.fft.fftfreq(w)[None, :].square()).sqrt()
    bands = [float(power[(radius >= lo) & (radius < hi)].mean()) for lo, hi in zip(BANDS, BANDS[1:])]
    correlation = torch.corrcoef(images.permute(1, 0, 2, 3).reshape(3, -1))
    return {"n": len(images), "band_power": bands,
            "colour_correlation": {"RG": float(correlation[0, 1]), "RB": float(correlation[0, 2]),
                                   "GB": float(correlation[1, 2])},
            "neighbour_difference": float((images[..., 1:] - images[..., :-1]).abs().mean())}


def describe(folder: Path) -> str:
    info = json.loads((folder / "generation.json").read_text())["arguments"]
    return f"{info['method']} {info['num_images']} x {info['iters']}, seed {info['seed']}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", default=str(SHARED / "data" / "imagenet-sample" / "even-classes.parquet"))
    p.add_argument("--real-images", type=int, default=128, help="how many real images to read")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sets", nargs="+", required=True, help="synthetic dataset folders")
    p.add_argument("--names", nargs="+", help="a name per set for the table (default: method, size and seed)")
    p.add_argument("--json", default=str(ROOT / "scripts" / "results" / "diag_synth_spectrum.json"))
    args = p.parse_args(argv)
    rows = {f"real ({Path(args.real).name})": statistics(load_images([Path(args.real)], args.real_images, args.size))}
    if args.names and len(args.names) != len(args.sets):
        p.error(f"--names gives {len(args.names)} names for {len(args.sets)} sets")
    for i, folder in enumerate(map(Path, args.sets)):
        name = args.names[i] if args.names else describe(folder)
        rows[name] = statistics(load_images(sorted((folder / "data").glob("*.parquet")), None, args.size))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bands": BANDS, "rows": rows}, indent=2) + "\n")
    bands = " | ".join(f"{lo:g}-{hi:g}" for lo, hi in zip(BANDS, BANDS[1:]))
    print(f"| images | {bands} | colour correlation RG, RB, GB | neighbour difference |")
    print("|---|" + "---:|" * (len(BANDS) - 1) + "---|---:|")
    for name, row in rows.items():
        power = " | ".join(f"{v:.3g}" for v in row["band_power"])
        corr = ", ".join(f"{v:.2f}" for v in row["colour_correlation"].values())
        print(f"| {name} | {power} | {corr} | {row['neighbour_difference']:.3f} |")


if __name__ == "__main__":
    main()
