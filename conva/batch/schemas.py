"""Every Arrow schema the jobs write, in one place and versioned (:data:`SCHEMA_VERSION`).

A stage's committed shards all carry its schema; the commit log records the schema hash and the
version, so a rerun with code that writes another layout is refused rather than mixed in. Bump
:data:`SCHEMA_VERSION` whenever a schema here changes.

* Job stages: :data:`EXTRACTION_INPUT_SCHEMA` → :func:`activation_schema` (``activations/``),
  :data:`BUNDLE_PROBE_SCHEMA` (``bundles/part-*.parquet``, beside each value's files),
  :data:`STEERING_INPUT_SCHEMA` → :data:`GENERATION_SCHEMA` (``generations/``).
* A study's stages and tables: :data:`STUDY_STEERING_SCHEMA` (its steering input: cells × prompts),
  :data:`JUDGED_SCHEMA`, :data:`UTILITY_INPUT_SCHEMA` → :data:`UTILITY_SCHEMA`, :data:`AGREEMENT_SCHEMA`,
  and the tables a reader opens: :data:`RESULT_SCHEMA` (``results.parquet``), :data:`SUMMARY_SCHEMA`,
  :data:`POOLED_SCHEMA`, :data:`MATCHED_SCHEMA`, :data:`STUDY_PROBE_SCHEMA` (``probes.parquet``).
"""

from __future__ import annotations

import json

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "nullable_in_pandas",
    "EXTRACTION_INPUT_SCHEMA",
    "STEERING_INPUT_SCHEMA",
    "GENERATION_SCHEMA",
    "PROVENANCE_SCHEMA",
    "activation_schema",
    "BUNDLE_PROBE_SCHEMA",
    "STUDY_STEERING_SCHEMA",
    "UTILITY_INPUT_SCHEMA",
    "RESULT_SCHEMA",
    "JUDGED_SCHEMA",
    "UTILITY_SCHEMA",
    "AGREEMENT_SCHEMA",
    "SUMMARY_SCHEMA",
    "POOLED_SCHEMA",
    "MATCHED_SCHEMA",
    "STUDY_PROBE_SCHEMA",
    "CHOICE_INPUT_SCHEMA",
    "CHOICE_SCHEMA",
    "SPECIFICITY_SCHEMA",
    "CROSS_VALUE_SCHEMA",
    "COSINE_SCHEMA",
]

# --- the job's stages ------------------------------------------------------------------------------------

# 3: generations carry ``context``; gate texts cover every value (value-specific gate); outputs committed
# through a commit log (conva.batch.store), shards written by the workers.
# 4: the agreement stage also validates the judge on labelled answers (kappa, AUC; a "*" row over values);
# generation files carry PROVENANCE_SCHEMA's columns after GENERATION_SCHEMA's (conva.batch.provenance).
SCHEMA_VERSION = 4

EXTRACTION_INPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("dataset", pa.string()),
        ("value", pa.string()),
        ("label", pa.int8()),
        ("group", pa.int64()),
        ("text", pa.string()),
        ("chat_template", pa.bool_()),
    ]
)
STEERING_INPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("value", pa.string()),
        ("prompt", pa.string()),
        ("error", pa.string()),
    ]
)


def nullable_in_pandas(schema: pa.Schema) -> pa.Schema:
    """``schema`` with pandas metadata that reads its integer and boolean columns as nullable ``Int32``/``boolean``.

    Error rows leave ``n_prompt_tokens`` null; without this, pandas would read the column as float64 (and
    ``gate_open`` as object). pyarrow, DuckDB and Spark ignore the metadata; pandas gives ``pd.NA`` for nulls.
    """
    kinds = {
        f.name: "boolean" if pa.types.is_boolean(f.type) else str(f.type).capitalize()
        for f in schema
        if pa.types.is_integer(f.type) or pa.types.is_boolean(f.type)
    }
    columns = [
        {
            "name": name,
            "field_name": name,
            "pandas_type": str(schema.field(name).type),
            "metadata": None,
            "numpy_type": kind,
        }
        for name, kind in kinds.items()
    ]
    meta = {"index_columns": [], "column_indexes": [], "columns": columns}
    return schema.with_metadata({b"pandas": json.dumps(meta).encode()})


GENERATION_SCHEMA = nullable_in_pandas(
    pa.schema(
        [
            ("row_id", pa.string()),
            ("prompt", pa.string()),
            ("context", pa.string()),
            ("output", pa.string()),
            ("n_prompt_tokens", pa.int32()),
            ("n_output_tokens", pa.int32()),
            ("model", pa.string()),
            ("value", pa.string()),
            ("method", pa.string()),
            ("setting", pa.string()),
            ("p0", pa.float64()),
            ("strength", pa.float64()),
            ("gate_score", pa.float64()),
            ("gate_open", pa.bool_()),
            ("layers", pa.list_(pa.int32())),
            ("eps", pa.list_(pa.float64())),
            ("p_before", pa.list_(pa.float64())),
            ("p_after", pa.list_(pa.float64())),
            ("error", pa.string()),
        ]
    )
)


# Appended to every generation shard by the worker that writes it: the job config's hash and the code version.
PROVENANCE_SCHEMA = pa.schema([("config_sha256", pa.string()), ("conva_version", pa.string())])


def activation_schema(hidden: int) -> pa.Schema:
    """The activations stage's schema for a model of width ``hidden``."""
    return pa.schema(
        [
            ("row_id", pa.string()),
            ("dataset", pa.string()),
            ("value", pa.string()),
            ("label", pa.int8()),
            ("group", pa.int64()),
            ("text_hash", pa.string()),
            ("layer", pa.int32()),
            ("position", pa.string()),
            ("activation", pa.list_(pa.float32(), hidden)),
            ("error", pa.string()),
        ]
    )


BUNDLE_PROBE_SCHEMA = pa.schema(
    [
        ("value", pa.string()),
        ("layer", pa.int32()),
        ("train_acc", pa.float64()),
        ("test_acc", pa.float64()),
        ("in_band", pa.bool_()),
        ("fingerprint", pa.string()),
        ("gate_kind", pa.string()),
        ("gate_layer", pa.int32()),
        ("gate_threshold", pa.float64()),
    ]
)


# --- a study's stages and tables -------------------------------------------------------------------------


def _override_columns() -> list[tuple[str, pa.DataType]]:
    return [
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("setting", pa.string()),
        ("band", pa.list_(pa.int32())),
        ("cell_id", pa.string()),
    ]


STUDY_STEERING_SCHEMA = pa.schema([*STEERING_INPUT_SCHEMA, *(pa.field(n, t) for n, t in _override_columns())])


UTILITY_INPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("cell_id", pa.string()),
        ("value", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("band", pa.list_(pa.int32())),
        ("item", pa.int32()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
    ]
)


RESULT_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("row_id", pa.string()),
        ("model", pa.string()),
        ("value", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("band", pa.string()),
        ("setting", pa.string()),
        ("strength", pa.float64()),
        ("prompt", pa.string()),
        ("context", pa.string()),
        ("output", pa.string()),
        ("n_output_tokens", pa.int32()),
        ("gate_open", pa.bool_()),
        ("gate_score", pa.float64()),
        ("eps_mean", pa.float64()),
        ("judge", pa.string()),
        ("judge_score", pa.float64()),
        ("judge_prob", pa.float64()),
        ("judge_raw", pa.string()),
        ("ppl", pa.float64()),
        ("ppl_plain", pa.float64()),
        ("fluency", pa.float64()),
        ("error", pa.string()),
    ]
)


# What the study's workers write: a judged row per generation, an MC answer per utility row, agreement per value.
JUDGED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("judge", pa.string()),
        ("judge_score", pa.float64()),
        ("judge_prob", pa.float64()),
        ("judge_raw", pa.string()),
        ("ppl", pa.float64()),
        ("ppl_plain", pa.float64()),
        ("fluency", pa.float64()),
        ("error", pa.string()),
    ]
)
UTILITY_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("cell_id", pa.string()),
        ("model", pa.string()),
        ("value", pa.string()),
        ("method", pa.string()),
        ("item", pa.int32()),
        ("answer", pa.string()),
        ("pred", pa.string()),
        ("correct", pa.bool_()),
        ("gate_open", pa.bool_()),
        ("gate_score", pa.float64()),
    ]
)
AGREEMENT_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("judge", pa.string()),
        ("value", pa.string()),
        ("agreement", pa.float64()),
        ("pairwise", pa.float64()),
        ("n_pairs", pa.int32()),
        # The judge against reader A on labelled model answers (conva.judge_validation); the row with value
        # "*" covers every value of the study at once. Null where no labelled answers were given.
        ("scope", pa.string()),
        ("n_labelled", pa.int32()),
        ("n_unclear", pa.int32()),
        ("kappa", pa.float64()),
        ("auc", pa.float64()),
        ("judge_yes_rate", pa.float64()),
        ("reader_yes_rate", pa.float64()),
        ("judge_unclear", pa.int32()),
        ("kappa_ab", pa.float64()),
        ("n_ab", pa.int32()),
    ]
)


SUMMARY_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("model", pa.string()),
        ("value", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("band", pa.string()),
        ("setting", pa.string()),
        ("strength", pa.float64()),
        ("n", pa.int32()),
        ("n_error", pa.int32()),
        ("csr", pa.float64()),
        ("csr_lo", pa.float64()),
        ("csr_hi", pa.float64()),
        ("gate_open_rate", pa.float64()),
        ("eps_mean", pa.float64()),
        ("ppl", pa.float64()),
        ("ppl_ratio", pa.float64()),
        ("ppl_plain_ratio", pa.float64()),
        ("fluency", pa.float64()),
        ("mc_acc", pa.float64()),
        ("mc_acc_none", pa.float64()),
        ("utility_ratio", pa.float64()),
        ("mc_gate_open_rate", pa.float64()),
        ("judge", pa.string()),
        ("judge_agreement", pa.float64()),
        # The judge's kappa and AUC on the labelled answers of every value (the judges table's "*" row).
        ("judge_kappa", pa.float64()),
        ("judge_auc", pa.float64()),
    ]
)
POOLED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("band", pa.string()),
        ("strength", pa.float64()),
        ("setting", pa.string()),
        ("values", pa.int32()),
        ("n", pa.int32()),
        ("n_error", pa.int32()),
        ("csr", pa.float64()),
        ("csr_lo", pa.float64()),
        ("csr_hi", pa.float64()),
        ("csr_diff", pa.float64()),
        ("csr_diff_lo", pa.float64()),
        ("csr_diff_hi", pa.float64()),
        ("ppl_ratio", pa.float64()),
        ("ppl_ratio_lo", pa.float64()),
        ("ppl_ratio_hi", pa.float64()),
        ("ppl_plain_ratio", pa.float64()),
        ("utility_ratio", pa.float64()),
        ("gate_open_rate", pa.float64()),
        ("mc_gate_open_rate", pa.float64()),
        ("eps_mean", pa.float64()),
        ("judge_agreement", pa.float64()),
        ("judge_kappa", pa.float64()),
        ("judge_auc", pa.float64()),
    ]
)
MATCHED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("setting", pa.string()),
        ("p0", pa.float64()),
        ("band", pa.string()),
        ("other", pa.string()),
        ("other_strength", pa.float64()),
        ("other_band", pa.string()),
        ("n_pairs", pa.int32()),
        ("csr_conva", pa.float64()),
        ("csr_other", pa.float64()),
        ("csr_diff", pa.float64()),
        ("csr_diff_lo", pa.float64()),
        ("csr_diff_hi", pa.float64()),
        ("ppl_ratio_conva", pa.float64()),
        ("ppl_conva_lo", pa.float64()),
        ("ppl_conva_hi", pa.float64()),
        ("ppl_ratio_other", pa.float64()),
        ("ppl_other_lo", pa.float64()),
        ("ppl_other_hi", pa.float64()),
        ("verdict", pa.string()),
    ]
)
STUDY_PROBE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("value", pa.string()),
        ("layer", pa.int32()),
        ("train_acc", pa.float64()),
        ("val_acc", pa.float64()),
        ("test_acc", pa.float64()),
        ("converged", pa.bool_()),
        ("in_band", pa.bool_()),
        ("gate_kind", pa.string()),
        ("gate_layer", pa.int32()),
        ("gate_threshold", pa.float64()),
        ("gate_target_met", pa.bool_()),
        ("gate_precision", pa.float64()),
        ("gate_recall", pa.float64()),
        ("gate_accuracy", pa.float64()),
        ("gate_n", pa.float64()),
        ("gate_open_neutral", pa.float64()),
        ("gate_open_other", pa.float64()),
        ("gate_open_own", pa.float64()),  # held-out: the value's own prompts the threshold never saw
        ("gate_open_mc", pa.float64()),  # held-out multiple-choice questions
        ("gate_not_converged", pa.float64()),
    ]
)


# --- forced choice and specificity (conva.choice, conva.batch.specificity) ---------------------------------

# A study's forced-choice rows: one per (cell, yes/no prompt). ``value`` is the prompts' value, ``vector``
# the value whose bundle steers (another value's for the cross-value matrix; null when unsteered).
CHOICE_INPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("cell_id", pa.string()),
        ("value", pa.string()),
        ("vector", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("band", pa.list_(pa.int32())),
        ("item", pa.int32()),
        ("prompt", pa.string()),
        ("value_side", pa.string()),
    ]
)
CHOICE_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("cell_id", pa.string()),
        ("model", pa.string()),
        ("value", pa.string()),
        ("vector", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("item", pa.int32()),
        ("value_side", pa.string()),
        ("log_odds_yes", pa.float64()),
        ("value_log_odds", pa.float64()),
        ("gate_open", pa.bool_()),
        ("gate_score", pa.float64()),
        ("eps_norm", pa.float64()),  # the norm of the per-layer scales: ConVA's ε (a step), CAA's strength
        ("error", pa.string()),
    ]
)


def _CI(name: str) -> list[tuple[str, pa.DataType]]:
    """A figure and its 95 % interval: ``name``, ``name_lo``, ``name_hi``."""
    return [(name, pa.float64()), (f"{name}_lo", pa.float64()), (f"{name}_hi", pa.float64())]


# ``specificity.parquet``: per model and steering setting, the paired shifts in the value's log-odds.
SPECIFICITY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("n", pa.int32()),
        ("fc_csr_none", pa.float64()),
        *_CI("fc_csr"),
        *_CI("own"),
        *_CI("other"),
        *_CI("specific"),
        *_CI("random"),
        *_CI("gated"),
        *_CI("yes_push"),
        ("gate_open", pa.float64()),
        ("eps_norm", pa.float64()),
    ]
)
# ``cross_value.parquet``: the matrix, one cell per (model, setting, vector's value, prompts' value).
CROSS_VALUE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("method", pa.string()),
        ("p0", pa.float64()),
        ("strength", pa.float64()),
        ("vector", pa.string()),
        ("value", pa.string()),
        ("n", pa.int32()),
        *_CI("shift"),
    ]
)
# ``cosines.parquet``: cosine between two values' vectors at one layer (probe ``w`` and CAA).
COSINE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("value_a", pa.string()),
        ("value_b", pa.string()),
        ("cosine", pa.float64()),
    ]
)
