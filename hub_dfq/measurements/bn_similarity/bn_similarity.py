"""BN similarity: how close a set of images is to what a model's BatchNorm layers remember.

An ``evaluate`` measurement over :func:`hub_dfq.audit`: it streams the images through the model's
preprocessing and forward pass, compares the per-channel moments at every BatchNorm input with the
running statistics, and returns the same numbers as the API (divergence, similarity, interval).
"""

import datasets
import evaluate

import hub_dfq
from hub_dfq.distributed import single_process

_CITATION = """\
@inproceedings{haroush2020knowledge,
  title={The Knowledge Within: Methods for Data-Free Model Compression},
  author={Haroush, Matan and Hubara, Itay and Hoffer, Elad and Soudry, Daniel},
  booktitle={CVPR},
  year={2020}
}
"""

_DESCRIPTION = """\
BN similarity compares images with the statistics a model's BatchNorm layers kept from its training
data (running mean and variance per channel), without access to that data. Per layer, the Gaussian
KL divergence KL(N(running) || N(images)) is averaged over channels, then geometrically over layers
(`divergence`, bias-corrected with a bootstrap over images; lower = closer). `similarity` puts it on
the model's own scale: 1 at the model's BNS synthetic data, 0 at Gaussian noise
(log(far / d) / log(far / near)), or log10(far / d) / 3 (1 = three decades closer than noise, about
where clean real data lands) when only the noise reference is measured.
"""

_KWARGS_DESCRIPTION = """
Args:
    images (`list` of PIL images, paths or image bytes): the data to score; labels are not needed.
    model (`str` or `hub_dfq.VisionModel`, default `"default"`): the model whose BN statistics are used.
    metric (`str`, default `"kl"`): `"kl"`, `"symmetric_kl"`, `"reverse_kl"` or `"w2"`.
    reference_points (`str`, default `"auto"`): `"auto"`, `"gaussian"` or `"none"`, the `references`
        argument of `hub_dfq.audit` (renamed: `references` is reserved by `evaluate`).
    batch_size (`int`, default 64): images per forward pass.
    score_batch (`int`, default 64): images per batch-level score (the bootstrap resamples images).
    seed (`int`, default 0): seed of the references and the bootstrap.
Returns:
    divergence (`float`): aggregate divergence, lower = closer.
    similarity (`float` or `None`): normalised similarity.
    ci (`list`): 95% bootstrap interval of the divergence (over images, log-normal around it).
    n_images (`int`), n_skipped (`int`): images scored and unreadable images skipped.
    layers (`dict`): per-layer divergence.
Examples:
    >>> import evaluate, hub_dfq
    >>> from hub_dfq.audit import measurement_path
    >>> bn = evaluate.load(measurement_path())
    >>> bn.compute(images=pil_images, model="default")["similarity"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BnSimilarity(evaluate.Measurement):
    """BN-statistics similarity of images to a model's training data."""

    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"images": datasets.Image(decode=False)}),
            reference_urls=["https://arxiv.org/abs/1912.01274"],
        )

    def _compute(self, images, model="default", metric="kl", reference_points="auto", batch_size=64, score_batch=64,
                 seed=0, bootstrap=200):
        data = datasets.Dataset.from_dict({"images": list(images)},
                                          features=datasets.Features({"images": datasets.Image(decode=False)}))
        # evaluate shares work between processes its own way (it may compute on one process only): the audit
        # here is this process's alone, never split with the others of a launch
        with single_process():
            report = hub_dfq.audit(model, {"images": data}, batch_size=batch_size, score_batch=score_batch,
                                   metric=metric, references=reference_points, seed=seed, bootstrap=bootstrap,
                                   progress=False)
        result = report.candidates[0]
        return {"divergence": result.divergence, "similarity": result.similarity,
                "ci": list(result.ci) if result.ci else None, "n_images": result.n_images,
                "n_skipped": result.n_skipped, "layers": result.layers}
