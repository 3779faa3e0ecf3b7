"""Every claim of the two texts the lab follows, with the experiment and checks that decide it.

The report opens with this index: each claim of Lesson 14.1 (“数据归一化与Batch Normalization理论基础”)
and of the survey “Norm相关总结”, where it is made (by title and section), the checks of the
experiments that test it, and its verdict, computed from those checks as an experiment's verdict
is (:func:`normlab.lab.records.verdict`). A claim that cannot be tested here says why.

A claim names its checks as ``(experiment, words)``: every check of that experiment whose name
contains ``words`` (``None``: all of its checks).

>>> [c.number for c in CLAIMS][:3]
[1, 2, 3]
>>> decide(CLAIMS[0], {})["status"]
'not run'
"""

from __future__ import annotations

from dataclasses import dataclass

from . import records

__all__ = ["Claim", "CLAIMS", "decide"]

LESSON = "Lesson 14.1"
SURVEY = "the survey “Norm相关总结”"


@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    source: str
    tests: tuple[tuple[str, str | None], ...] = ()
    note: str = ""  # why it cannot be tested here, or what differs from the original setting


CLAIMS: tuple[Claim, ...] = (
    Claim(1, "Min-Max maps each column to [0, 1]; Z-Score gives each column mean 0 and standard deviation 1.",
          f"{LESSON} §一.1.1–1.2", (("identities", "Min-Max"), ("identities", "Z-Score column"))),
    Claim(2, "Scaling statistics are part of the model: fitted on the training split and applied unchanged to the "
             "test split; a test batch scaled by its own statistics, or a single example, goes wrong.",
          f"{LESSON} §一.2", (("scaling-stats", None),)),
    Claim(3, "Standardizing the labels of a regression does not change the model's errors (in the labels' units).",
          f"{LESSON} §一.2", (("label-scaling", None),)),
    Claim(4, "A network on Z-Score inputs converges faster and sometimes ends better than on raw inputs.",
          f"{LESSON} §一.2 (Z-Score modelling experiment)",
          (("zscore", "test MSE"), ("zscore", "breast_cancer"))),
    Claim(5, "With Z-Score inputs the per-layer gradients are steadier in the first epochs.",
          f"{LESSON} §一.2", (("zscore", "gradient spread"),)),
    Claim(6, "With Z-Score alone the zero-centred property fades: a tanh network's gradients, steady at epoch 5, "
             "are unsteady by epoch 40.", f"{LESSON} §一.3.1", (("drift", "Z-Score only"),)),
    Claim(7, "Zero-centred inputs alone cannot keep gradients steady; the Glorot condition (equal variance forward "
             "and backward) is what matters.", f"{LESSON} §一.3.2; Glorot & Bengio (2010)", (("glorot", None),)),
    Claim(8, "Shifting and scaling the data do not change its distribution, only its coordinates.",
          f"{LESSON} §二.1", (("identities", "distribution"),)),
    Claim(9, "Normalization is an affine map, x·diag(1/σ) − μ/σ: a special linear layer.",
          f"{LESSON} §二.2", (("identities", "Linear layer"),)),
    Claim(10, "BN has two stages; γ = 1, β = 0 gives Z-Score, γ = √(σ²+ε), β = μ gives back the input.",
          f"{LESSON} §二.2–二.3", (("affine", None),)),
    Claim(11, "Stage 1 (standardizing) gives stage 2 a good starting point that speeds convergence: BN against a "
              "learnable per-feature affine alone.", f"{LESSON} §二.3 (benefit 1)", (("bn-affine", "BN − affine"),)),
    Claim(12, "BN learns the distribution that suits the loss, not necessarily mean 0 and variance 1.",
          f"{LESSON} §二.4", (("bn-affine", "learned"),)),
    Claim(13, "BN moves the layers towards the Glorot condition: steadier per-layer gradients than without.",
          f"{LESSON} §二.4", (("compare", "batch − none gradient"), ("drift", "BN − Z-Score only"))),
    Claim(14, "Training normalizes with the batch's statistics, testing with the running (moving-average) ones.",
          f"{LESSON} §二.5; {SURVEY} (batch normalization)", (("train-eval", None),)),
    Claim(15, "BN does not help by reducing internal covariate shift, which it may even increase.",
          f"{LESSON} §二.4; {SURVEY} (batch normalization); Santurkar et al. (2018)", (("ics", None),)),
    Claim(16, "The backward pass of a normalization is eq. (4)–(9).", f"{SURVEY} eq. (4)–(9)",
          (("identities", "backward"),)),
    Claim(17, "BN needs batches distributed like the whole data: batches that differ (sorted by class) make training "
              "harder; shuffle the data.", f"{SURVEY} (batch normalization)", (("shuffle", None),)),
    Claim(18, "The batch must not be too small (its mean and variance fluctuate); GN does not depend on the batch size.",
          f"{SURVEY} (batch normalization, group normalization); Wu & He (2018)", (("batch-size", None),)),
    Claim(19, "BN smooths the loss surface: training converges faster, larger learning rates do no harm, and although "
              "a step costs more, reaching a given loss takes less time.",
          f"{SURVEY} (batch normalization); Santurkar et al. (2018)", (("learning-rate", None),)),
    Claim(20, "BN suits images and tabular features, not sentences of different lengths, where LN is used.",
          f"{SURVEY} (layer normalization)", (("sequences", None),)),
    Claim(21, "LN needs no batch and stores no statistics: its output is the same in training and testing.",
          f"{SURVEY} (layer normalization)", (("identities", "LayerNorm"),)),
    Claim(22, "GN lies between LN and IN: one group is LN, one channel per group is IN.",
          f"{SURVEY} (group normalization)", (("identities", "GroupNorm"),)),
    Claim(23, "Weight Norm normalizes the weights: WN(Wx) = v·g·x/‖v‖, eq. (3) with μ = 0, σ = ‖v‖.",
          f"{SURVEY} eq. (19)", (("identities", "Weight Norm"),)),
    Claim(24, "Cosine Norm's output is bounded in [−1, 1]; its centred form eq. (21) equals eq. (26).",
          f"{SURVEY} eq. (20)–(26)", (("identities", "Cosine Norm"),)),
    Claim(25, "The papers' headline figures: Ioffe & Szegedy Fig. 1, Wu & He Fig. 1, Glorot & Bengio's variances.",
          "Ioffe & Szegedy (2015); Wu & He (2018); Glorot & Bengio (2010)",
          (("batchnorm", None), ("batch-size", None), ("glorot", None)),
          note="reproduced in small: MLPs of 4–100 units on 8×8 digits and 2-feature data for seconds, where the "
               "papers train Inception on ImageNet (millions of images, days), ResNet-50 with GN on ImageNet and "
               "5-layer networks on Shapeset and CIFAR; the shapes of the curves are compared, not their values."),
)


def decide(claim: Claim, by_name: dict[str, dict]) -> dict:
    """The claim's verdict from the records at hand (``{experiment name: record}``).

    ``{"status", "summary", "experiments"}``: ``status`` as :func:`records.verdict`'s, or
    ``"not run"`` when none of its experiments is in the report, or ``"not testable"``.
    """
    names = list(dict.fromkeys(e for e, _ in claim.tests))
    if not names:
        return {"status": "not testable", "summary": claim.note, "experiments": []}
    ran = [n for n in names if n in by_name]
    if not ran:
        return {"status": "not run", "summary": f"run {', '.join(names)} to decide it", "experiments": names}
    checks = [c for e, words in claim.tests if e in by_name
              for c in by_name[e]["checks"] if words is None or words in c["name"]]
    if not checks:
        return {"status": "inconclusive", "summary": "none of its checks was computed", "experiments": ran}
    verdict = records.verdict(checks)
    missing = [n for n in names if n not in by_name]
    if missing:
        verdict["summary"] += f" (not run here: {', '.join(missing)})"
    return {**verdict, "experiments": ran}
