"""The words shared by the library, the CLI, the tables and the Snakemake rules: one home each.

Every value is a ``StrEnum``, so it is the plain string in Parquet, file names and command lines
(``Mode.QAT == "qat"``), and a typo in code is an ``AttributeError`` instead of an empty filter.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How a training run treats the quantized weights."""

    FT = "ft"  # plain fine-tuning of one task
    QAT = "qat"  # fine-tuning with fake quantization in the forward pass (straight-through gradient)
    PRETRAIN = "pretrain"  # the demo backbone, all parameters, trainable head


FINETUNE_MODES: tuple[Mode, ...] = (Mode.FT, Mode.QAT)


class Variant(StrEnum):
    """The models of one task that ``baselines.parquet`` scores (column ``model``)."""

    FT = "ft"  # full-precision FT
    PTQ = "ptq"  # FT, post-training quantized: the receiver's baseline for every gain
    QAT = "qat"  # QAT weights in full precision
    QAT_PTQ = "qat_ptq"  # QAT weights quantized: what the receiver's own QAT achieves


QUANTIZED_VARIANTS: tuple[Variant, ...] = (Variant.PTQ, Variant.QAT_PTQ)
# What each model of ``baselines.parquet`` is, in words: the headers of every table that shows them.
VARIANT_LABELS: dict[Variant, str] = {
    Variant.FT: "FT (full precision)",
    Variant.PTQ: "PTQ (FT quantized)",
    Variant.QAT: "QAT (full precision)",
    Variant.QAT_PTQ: "QAT quantized",
}


class Control(StrEnum):
    """What the vector added to a receiver is (column ``control`` of the transfer tables)."""

    DONOR = "none"  # a real donor's quantization vector
    RANDOM = "random"  # a random direction with the donor vector's per-tensor norms
    SELF = "self"  # the receiver's own vector: at lambda = 1 exactly its QAT model (scope all: with the FT head)


class Precision(StrEnum):
    """Arithmetic of training and evaluation forwards on a GPU (the CPU always runs fp32)."""

    BF16 = "bf16"  # autocast to bfloat16: fast; what qvlib did before the switch existed
    FP32 = "fp32"  # full precision: what the paper's code does


class Split(StrEnum):
    """Evaluation splits; ``calib`` is carved from the training set and never trained on."""

    TEST = "test"
    CALIB = "calib"


class Search(StrEnum):
    """How the lambdas of a row were picked (column ``search``)."""

    SWEEP = "sweep"  # the config's fixed lambda list
    ADAPTIVE = "adaptive"  # the golden-section oracle search on test
    RACING = "racing"  # the sweep raced on nested subsamples of a split: ``n`` is the images that lambda saw
    DATAFREE = "datafree"  # the sweep's lambda a data-free criterion picks (column ``criterion``), scored on test


class SweepMethod(StrEnum):
    """How a cell scores the lambda sweep on each split (config ``lambda_search: {method}``)."""

    DENSE = "dense"  # every lambda on every image: the reference
    RACING = "racing"  # successive halving (qvlib.racing): every lambda on a subsample, the best on the whole split


class LambdaTies(StrEnum):
    """Which of several lambdas with the same best accuracy a pick keeps (config ``lambda_ties``)."""

    NEAREST_ONE = "nearest_one"  # the lambda nearest 1, then the smaller: the patch that changes least
    SMALLEST = "smallest"  # the smallest lambda: the authors' pick_best_alpha (first strict maximum, ascending)


class Rule(StrEnum):
    """How lambda is chosen for a pair before its gain is read (column ``rule`` of summaries)."""

    LAMBDA1 = "lambda=1"  # fixed at 1: the paper's Fig. 2 left
    ORACLE = "oracle"  # best lambda on the test split itself: the paper's Fig. 2 right, optimistic
    CALIB = "calib"  # best lambda on the calib split, scored on test: what a user can deploy


# Column of pairs() that holds the gain under each rule.
RULE_COLUMNS: dict[Rule, str] = {Rule.LAMBDA1: "gain_lambda1", Rule.ORACLE: "gain_oracle", Rule.CALIB: "gain_calib"}
# Rules chosen without receiver data: one per criterion of qvlib.datafree, named ``datafree:<criterion>``.
DATAFREE_RULE_PREFIX = "datafree:"
DATAFREE_GAIN_PREFIX = "gain_datafree_"


def datafree_rule(criterion: str) -> str:
    return f"{DATAFREE_RULE_PREFIX}{criterion}"


def rule_columns(columns) -> dict[str, str]:
    """Every rule whose gain column is among ``columns``: the fixed rules, then one per data-free criterion."""
    out = {str(rule): col for rule, col in RULE_COLUMNS.items() if col in columns}
    out.update({datafree_rule(c.removeprefix(DATAFREE_GAIN_PREFIX)): c for c in columns if c.startswith(DATAFREE_GAIN_PREFIX)})
    return out


# A donor built from several tasks' vectors is named ``merged:<method>``: per receiver, the merge of every
# task's vector except the receiver's own (leave-one-out).
MERGED_PREFIX = "merged:"


def merged_donor(method: str) -> str:
    return f"{MERGED_PREFIX}{method}"


class DonorKind(StrEnum):
    """Whether a pair's donor is one task's vector or a merge of several (column ``kind``)."""

    SINGLE = "single"
    MERGED = "merged"


class Verdict(StrEnum):
    """Whether donors beat their random controls, from a 95% interval of the specific gain."""

    YES = "yes"  # the whole interval is above 0
    NO = "no"  # the whole interval is below 0: random directions do better
    INCONCLUSIVE = "inconclusive"  # the interval contains 0
