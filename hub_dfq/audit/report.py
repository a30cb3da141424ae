"""Audit reports: ``audit.json`` (machine-readable), ``audit.md`` (for people), ``audit_layers.png``."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Protocol, Sequence

from ..outputs import reserve_folder, staged
from .registry import DIVERGENCES
from .scores import SPAN_DECADES

__all__ = ["ReportData", "write_report", "json_safe", "to_json", "to_markdown", "plot_layers", "plot_images"]


class _Candidate(Protocol):
    dataset: str
    layers: dict[str, float]
    image_scores: dict[str, Any] | None


class ReportData(Protocol):
    """What the writers read of an :class:`~hub_dfq.audit.results.AuditReport`.

    A protocol rather than the class, because ``AuditReport.save`` calls :func:`write_report`: the report's
    module imports this one, not the other way round.
    """

    model: dict[str, Any]
    settings: dict[str, Any]
    references: dict[str, Any]

    def ranking(self) -> Sequence[_Candidate]: ...

    def to_dict(self) -> dict[str, Any]: ...

HOW_TO_READ = """\
## How to read it

- **divergence** (lower = closer): at the input of every BatchNorm layer, the candidate's per-channel
  mean and variance (accumulated over all its images) are compared with the running statistics the
  layer kept from the training data, as Gaussians: `{metric_doc}` per channel, averaged over channels,
  then the geometric mean over layers (each layer weighs the same in log terms). 0 would mean the BN
  layers see exactly the statistics they were trained on.
- **similarity** puts the divergence `d` on the model's own scale: {normalisation_doc}
  The references are measured on the same model: *far* = Gaussian noise in the model's input space
  (it ignores everything the model learnt), *near* = the model's own BNS synthetic data (inputs
  optimised to match its BN statistics, as close as data-free inputs get). A similarity near or
  above 1 means "as close as the model's own synthetic data"; near 0 means "no closer than noise";
  negative means farther than noise. It is not clipped. Real in-distribution data usually lands
  somewhat below 1, because the synthetic data is optimised for exactly these statistics (the
  CIFAR-10 ResNet-20 on 2,000 images of its own test split: about 0.78).
- **95% CI**: bootstrap interval (Poisson weights per image, {bootstrap} replicates, seed {seed}):
  per layer the basic bootstrap `2 d - d*` (a correction removes at most 75% of a layer's value),
  aggregated over layers per replicate; the interval is `estimate * exp(+-1.96 sd)` of those
  aggregates in log space, so it is always above 0 and centred on the estimate.
  Non-overlapping intervals mean the ranking is not a fluke of which images were drawn.
- Sampling noise in the moments adds a positive bias that shrinks as images are added; the
  **divergence** shown is bias-corrected with the same bootstrap (per layer `2 d - mean d*`),
  `divergence_plugin` in `audit.json` is the raw pooled value. Still, compare candidates audited on
  similar numbers of images (`--limit`).
- **batch-level scores**: the divergence of each batch of {score_batch} images on its own. Small
  batches score higher than the pooled divergence (their moments are noisier), so compare batch
  scores with batch scores, e.g. to flag drifting batches in deployment.
- The divergence depends on the model: compare candidates on one model, not across models. Data
  that differs from the training data in ways the BN statistics do not capture (e.g. a different
  label mix with the same low-level statistics) can score close; a low divergence is evidence,
  not proof, that the data resembles the training data.
"""



def json_safe(value: Any) -> Any:
    """JSON-safe copy: tuples become lists, NaN and infinities become ``null``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(report: ReportData) -> str:
    return json.dumps(json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def _row(rank: Any, c: dict[str, Any]) -> str:
    ci = c.get("ci")
    sim_ci = c.get("similarity_ci")
    batches = c.get("batch_summary") or {}
    return (f"| {rank} | `{c['dataset']}` | {c.get('n_images', '–')} | {c.get('n_skipped', 0)} | "
            f"{_fmt(c.get('divergence'))} | {'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']' if ci else '–'} | "
            f"{_fmt(c.get('similarity'), 3)} | "
            f"{'[' + _fmt(sim_ci[0], 3) + ', ' + _fmt(sim_ci[1], 3) + ']' if sim_ci else '–'} | "
            f"{_fmt(batches.get('median'))} [{_fmt(batches.get('p05'))}, {_fmt(batches.get('p95'))}] |")


def to_markdown(report: ReportData) -> str:
    data = json_safe(report.to_dict())
    s = data["settings"]
    model = data["model"]
    lines = [f"# BN-statistics audit of `{model['spec']}`", ""]
    if model.get("url"):
        lines += [f"Model: [{model.get('repo_id')}]({model['url']})", ""]
    lines += [f"{len(model['bn_layers'])} BatchNorm layers, metric `{s['metric']}`, batches of {s['score_batch']} "
              f"images" + (f", at most {s['limit']} images per dataset" if s.get("limit") else "") + ".", "",
              "## Ranking (closest first)", "",
              "| rank | dataset | images | skipped | divergence | 95% CI | similarity | similarity CI | "
              "batch-level median [p5, p95] |",
              "|---:|---|---:|---:|---:|---|---:|---|---|"]
    by_name = {c["dataset"]: c for c in data["candidates"]}
    for name in data["ranking"]:
        lines.append(_row(by_name[name]["rank"], by_name[name]))
    for c in data["candidates"]:
        if c["rank"] is None:
            lines.append(_row("–", c) + " no readable image")
    lines += ["", "## Reference points", "", "| reference | method | images | divergence | similarity | cached |",
              "|---|---|---:|---:|---:|---|"]
    for kind in ("near", "far"):
        r = data["references"].get(kind)
        if r and r.get("skipped"):
            lines.append(f"| {kind} | {r.get('method', '–')}: {r.get('error')} | – | – | – | – |")
        elif r and r.get("failed"):
            lines.append(f"| {kind} | {r.get('method', '–')}: **failed** ({r.get('error')}) | – | – | – | – |")
        elif r:
            lines.append(f"| {kind} | {r.get('method', '–')} | {r.get('n_images', '–')} | "
                         f"{_fmt(r.get('divergence'))} | {_fmt(r.get('similarity'), 3)} | {r.get('cached', '–')} |")
        else:
            lines.append(f"| {kind} | not measured | – | – | – | – |")
    normalisation = s.get("normalisation")
    if normalisation and normalisation.startswith("two-point"):
        norm_doc = "`similarity = log(far / d) / log(far / near)` (1 at *near*, 0 at *far*, linear in log d)."
    elif normalisation:
        near = data["references"].get("near") or {}
        why = (f"because the synthetic *near* reference {'was skipped' if near.get('skipped') else 'failed'}: "
               f"{near['error']}" if near.get("error") else "no synthetic *near* reference was measured")
        norm_doc = (f"`similarity = log10(far / d) / {SPAN_DECADES:g}` (one-point scale, {why}; 0 is noise, 1 is "
                    f"{SPAN_DECADES:g} decades closer than noise, about where clean real data lands).")
    else:
        norm_doc = "not computed (no reference points were measured)."
    metric_doc = DIVERGENCES.get(s["metric"]).formula if s["metric"] in DIVERGENCES else s["metric"]
    lines += ["", HOW_TO_READ.format(metric_doc=metric_doc, normalisation_doc=norm_doc, score_batch=s["score_batch"],
                                     bootstrap=s["bootstrap"], seed=s["seed"])]
    lines += ["## Most divergent layers", "", "| dataset | top layers (divergence) |", "|---|---|"]
    for c in data["candidates"]:
        top = sorted(((v if v is not None else math.inf, k) for k, v in c["layers"].items()), reverse=True)[:3]
        lines.append(f"| `{c['dataset']}` | " + ", ".join(f"`{k}` ({_fmt(v, 3)})" for v, k in top) + " |")
    skipped = [c for c in data["candidates"] if c["n_skipped"]]
    lines += ["", "## Skipped images", ""]
    if not skipped:
        lines.append("None: every image was readable.")
    for c in skipped:
        listed = c["skipped"]
        lines.append(f"- `{c['dataset']}`: {c['n_skipped']} unreadable image(s) skipped"
                     + (f" (first {len(listed)} listed)" if len(listed) < c["n_skipped"] else "") + ":")
        lines += [f"  - row {item['index']}: {item['error']}" for item in listed]
    lines += _image_section(data)
    lines += ["", "Per-layer divergences: `audit_layers.png` and `layers` in `audit.json`.", ""]
    return "\n".join(lines)


def _image_section(data: dict[str, Any]) -> list[str]:
    """Each candidate's per-image score distribution and its most atypical rows."""
    views = [(c["dataset"], c["image_scores"]) for c in data["candidates"] if c.get("image_scores")]
    if not views:
        return []
    metric = views[0][1]["metric"]
    formula = DIVERGENCES.get(metric).formula if metric in DIVERGENCES else metric
    lines = ["", "## Per-image scores", "",
             f"Each image's own score (`hub-dfq score`): per BN layer the channel mean of `{formula}` between the "
             "image's per-channel spatial moments and the running statistics, geometric mean over layers; higher = "
             "less like the training data. Compare candidates' distributions (`audit_images.png`); the rows are "
             "those of each dataset.", "",
             "| dataset | images | p1 | p5 | median | p95 | p99 | most atypical rows (score) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, view in views:
        q = view["quantiles"]
        top = ", ".join(f"{item['index']} ({_fmt(item['score'], 3)})" for item in view["most_atypical"][:5])
        lines.append(f"| `{name}` | {view['n']} | {_fmt(q['p01'])} | {_fmt(q['p05'])} | {_fmt(q['p50'])} | "
                     f"{_fmt(q['p95'])} | {_fmt(q['p99'])} | {top} |")
    return lines


def plot_images(report: ReportData, path: str | os.PathLike[str]) -> bool:
    """Box plot (from stored quantiles: box p25-p75, whiskers p5-p95) of each candidate's per-image scores.

    Returns ``False`` (and writes nothing) when no candidate has per-image scores.
    """
    from matplotlib.figure import Figure  # why: half a second to import, and only the plot needs it

    views = [(c.dataset, c.image_scores) for c in report.ranking() if c.image_scores]
    if not views:
        return False
    stats = [{"label": name[:40], "med": v["quantiles"]["p50"], "q1": v["quantiles"]["p25"],
              "q3": v["quantiles"]["p75"], "whislo": v["quantiles"]["p05"], "whishi": v["quantiles"]["p95"],
              "fliers": []} for name, v in views]
    fig = Figure(figsize=(max(5.0, 0.5 * len(views) + 3), 4.2), dpi=110)
    ax = fig.subplots()
    ax.bxp(stats, showfliers=False)
    ax.set_yscale("log")
    ax.set_ylabel(f"per-image score ({views[0][1]['metric']})")
    ax.set_title(f"Per-image scores (closest dataset first): {report.model['spec']}", fontsize=9)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.grid(True, which="both", axis="y", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_layers(report: ReportData, path: str | os.PathLike[str]) -> None:
    """Per-layer divergence of every candidate (and the references), log scale, layers in forward order."""
    # A bare Figure renders with Agg and leaves pyplot's global backend (a notebook's) alone.
    # why: matplotlib takes half a second to import and only the plot needs it
    import matplotlib
    from matplotlib.figure import Figure

    names = report.model["bn_layers"]
    series = [(c.dataset, c.layers, "-") for c in report.ranking()]
    for kind, style in (("near", ":"), ("far", "--")):
        r = report.references.get(kind)
        if r and r.get("layers"):
            series.append((f"{kind} reference ({r.get('method')})", r["layers"], style))
    many = len(series) > 10
    # Many candidates: distinct colours from a 20-colour map and the legend beside the axes.
    colors = matplotlib.colormaps["tab20" if many else "tab10"].colors
    width = max(6.0, 0.28 * len(names) + 3) + (3.0 if many else 0.0)
    fig = Figure(figsize=(width, 4.8), dpi=110)
    ax = fig.subplots()
    x = list(range(len(names)))
    for i, (label, layers, style) in enumerate(series):
        ys = [max(layers.get(n, math.nan) or math.nan, 1e-8) for n in names]
        ax.plot(x, ys, style, marker="." if style == "-" else None, label=label, linewidth=1.2,
                color="black" if style != "-" else colors[i % len(colors)])
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel(f"divergence ({report.settings['metric']}, channel mean)")
    ax.set_title(f"BN-input divergence per layer: {report.model['spec']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    if many:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(series) <= 30 else 2)
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: ReportData, out_dir: str | os.PathLike[str], *, plot: bool = True,
                 overwrite: bool = False) -> dict[str, str]:
    """Write ``audit.json``, ``audit.md`` and (with ``plot``) ``audit_layers.png`` and ``audit_images.png`` (the
    per-image scores) as the folder ``out_dir``.

    The folder is new or empty, or (with ``overwrite``) an earlier audit report hub-dfq wrote; it is
    written beside its target and swapped in whole (:mod:`hub_dfq.outputs`), and files hub-dfq did
    not write in an earlier report folder are kept.

    Raises:
        OutputExistsError: ``out_dir`` is a file, holds files hub-dfq did not write, or holds a report and
            ``overwrite`` is false.
        OutputWriteError: the folder cannot be written; nothing was changed.
    """
    names = {"json": "audit.json", "markdown": "audit.md"} | ({"plot": "audit_layers.png"} if plot else {})
    with reserve_folder(out_dir, kind="audit", overwrite=overwrite) as out:
        with staged(out) as folder:
            (folder / names["json"]).write_text(to_json(report))
            (folder / names["markdown"]).write_text(to_markdown(report))
            if plot:
                plot_layers(report, folder / names["plot"])
                if plot_images(report, folder / "audit_images.png"):
                    names["images_plot"] = "audit_images.png"
        return {kind: str(out.path / name) for kind, name in names.items()}
