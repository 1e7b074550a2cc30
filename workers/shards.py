"""What a model worker does with one shard of each stage: read its own input, compute, write, return the record.

Every function here takes the worker running it (a :class:`~conva.workers.tasks.ShardWorker`, for its
loaded model, bundles and judge: a :class:`~conva.workers.worker.ModelWorker`) and a
:class:`~conva.workers.tasks.ShardTask`, and returns a :class:`~conva.batch.store.ShardRecord`. The
shard's rows are read from storage (a slice of an input file, committed objects of an earlier stage)
and written to the attempt's folder; only the record goes back to the driver. Each checks the row
contract (:func:`conva.workers.contract.check_rows`) before it writes: exactly one output row per input row
(``len(layers)`` per text for activations), so a lost or duplicated row fails loudly, naming the shard.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from conva.batch.badrows import RowTally
from conva.batch.extraction import extract_table, fit_bundles, probe_rows, value_activations
from conva.batch.inputs import read_slice, read_table_slice
from conva.batch.provenance import with_provenance
from conva.batch.steer_rows import row_spec, steering_rows_from_records
from conva.batch.store import ShardRecord, write_files_shard, write_table_shard
from conva.bundle import encode_bundle
from conva.fit import ModelInfo
from conva.metrics import answer_perplexities
from conva.workers.contract import check_rows
from conva.workers.tasks import ShardTask, ShardWorker, required

__all__ = ["extract", "fit", "steer", "evaluate", "utility", "choice", "agreement", "MODEL_META_KEY"]

# Every activation shard carries the model it was recorded with (also in its commit record).
MODEL_META_KEY = b"conva.model"


def extract(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """Activations of one slice of the extraction texts: one row group per layer, layer-major."""
    rows = read_table_slice(task.input())
    model, tok = worker.hf()
    info, e = worker.model_info(), worker.cfg.extract
    out = extract_table(model, tok, rows, info["layers"], e.position, task.batch(e.batch_size))
    check_rows("extract", task.ref.shard, rows, out, per_row=len(info["layers"]))
    out = out.replace_schema_metadata({MODEL_META_KEY: json.dumps(info).encode()})
    return write_table_shard(
        task.ref,
        out,
        row_group_size=max(1, rows.num_rows),
        extra={"model": info, **_error_rows(out.filter(pc.field("layer") == info["layers"][0]))},
    )


def _error_rows(table: pa.Table) -> dict:
    """A shard record's error-row facts: ``errors`` (count), ``inputs`` (input rows), ``reasons`` (a RowTally)."""
    tally = RowTally()
    tally.add_table(table)
    return {"errors": tally.bad, "inputs": table.num_rows, "reasons": tally.to_json()}


def fit(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """One value's bundle from the committed activations: probes per layer, band, CAA vector, gate.

    Reads only the activation files and row groups holding the value's (and the gate's) texts.
    """
    value, cfg = task.params["value"], worker.cfg
    info, layers = ModelInfo(**task.params["model"]), list(task.params["layers"])
    files = task.files
    dataset = ds.dataset([f.path for f in files], format="parquet", filesystem=files[0].fs)
    meta, read_layer = value_activations(dataset, value, layers, info.hidden_size)
    one = cfg.model_copy(update={"data": cfg.data.model_copy(update={"values": (value,)})})
    bundle = fit_bundles(meta, read_layer, layers, one, info, dataset_hash=task.params["dataset_hash"])[value]
    skipped = dataset.to_table(
        columns=["row_id", "error"],
        filter=(pc.field("layer") == layers[0]) & pc.field("error").is_valid() & (pc.field("value") == value),
    )
    extra = {
        "value": value,
        "band": list(bundle.band),
        "best_test_acc": float(np.nanmax(bundle.test_acc)),
        "gate": bundle.gate.kind,
        # the share of held-out rows of each kind the gate opens on, at its threshold (own, other, neutral, mc)
        "gate_open": {
            k.removeprefix("open_rate_"): v
            for k, v in bundle.gate.heldout.items()
            if k.startswith("open_rate_")
        },
        "skipped": skipped.num_rows,
        "skipped_examples": skipped.slice(0, 3).to_pylist(),
    }
    files_out = {f"{value}/{name}": data for name, data in encode_bundle(bundle).items()}
    return write_files_shard(task.ref, files_out, probe_rows(bundle), extra=extra)


def _steering_input(worker: ShardWorker, task: ShardTask) -> pa.Table:
    if task.params.get("input") == "records":  # a user's file: bad rows become error rows
        return steering_rows_from_records(task.input().name, read_slice(task.input()), worker.cfg.data.values)
    return read_table_slice(task.input())


def steer(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """Steered generations for one slice of prompts (per-row overrides of a study applied)."""
    rows = _steering_input(worker, task)
    bundles = worker.bundles(task.bundles)
    out = worker.steerer().steer(rows, bundles, batch_size=task.batch(worker.cfg.steer.batch_size))
    check_rows("steer", task.ref.shard, rows, out)
    return write_table_shard(task.ref, with_provenance(out, worker.cfg), extra=_error_rows(out))


def evaluate(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """The judge's verdict, the answer's perplexity and (optionally) an LLM fluency rating per generation."""
    from conva.batch.schemas import JUDGED_SCHEMA

    generations = _read_parquet(task.files[0])
    spec, cfg = worker.spec, worker.cfg
    fluency, judging = (
        required(spec.fluency, "the study's [fluency]"),
        required(spec.judge, "the study's [judge]"),
    )
    rows = generations.to_pylist()
    good = [i for i, r in enumerate(rows) if r["error"] is None and r["output"] is not None]
    values, prompts, contexts, answers = (
        [rows[i][k] for i in good] for k in ("value", "prompt", "context", "output")
    )
    bundles = worker.bundles(task.bundles) if task.bundles else {}
    verdicts = worker.judge(bundles).judge(values, prompts, answers) if good else []
    ppl: list[float | None] = [None] * len(good)
    plain: list[float | None] = [None] * len(good)
    if good and fluency.perplexity:
        steerer, size = worker.steerer(), task.batch(fluency.batch_size)

        def score(p: list[str], a: list[str]) -> list[float]:
            return steerer.perplexity(p, a, bundles, chat_template=cfg.steer.chat_template, batch_size=size)

        # Under the context the answer was generated from (a prefixed prompt for prompting or the opposite
        # setting), and under the plain prompt as a second column.
        ppl[:], plain[:] = answer_perplexities(score, prompts, contexts, answers)
    rating = _fluency(worker, answers) if good and fluency.llm else [None] * len(good)
    done = {i: (v, p, q, f) for i, v, p, q, f in zip(good, verdicts, ppl, plain, rating)}
    out = []
    for i, r in enumerate(rows):
        v, p, q, f = done.get(i, (None, None, None, None))
        out.append(
            dict(
                row_id=r["row_id"],
                judge=judging.kind,
                judge_score=v and v.score,
                judge_prob=v and v.prob,
                judge_raw=v and v.raw,
                ppl=p,
                ppl_plain=q,
                fluency=f,
                error=None if i in done else (r["error"] or "no output"),
            )
        )
    table = check_rows(
        "evaluate", task.ref.shard, generations, pa.Table.from_pylist(out, schema=JUDGED_SCHEMA)
    )
    return write_table_shard(task.ref, table)


def _fluency(worker: ShardWorker, answers: list[str]) -> list[float | None]:
    return worker.fluency_judge().fluency(answers)


def utility(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """Multiple-choice answers by the letter logits, with each row's steering and gate active."""
    from conva.batch.schemas import UTILITY_SCHEMA
    from conva.models import model_name

    rows = read_table_slice(task.input())
    bundles, records, cfg = worker.bundles(task.bundles), rows.to_pylist(), worker.cfg
    specs = [row_spec(cfg, bundles.get(r["value"]) if r["value"] else None, r) for r in records]
    scored = worker.steerer().score_mc(
        [r["prompt"] for r in records],
        [r["answer"] for r in records],
        specs,
        bundles,
        chat_template=cfg.steer.chat_template,
        positions=cfg.steer.positions,
        batch_size=task.batch(required(worker.spec.utility, "the study's [utility]").batch_size),
    )
    name = model_name(cfg.model.name)
    out = [
        dict(
            row_id=r["row_id"],
            cell_id=r["cell_id"],
            model=name,
            value=r["value"],
            method=r["method"],
            item=r["item"],
            answer=r["answer"],
            pred=s.pred,
            correct=s.correct,
            gate_open=s.gate_open,
            gate_score=s.gate_score,
        )
        for r, s in zip(records, scored)
    ]
    table = check_rows("utility", task.ref.shard, rows, pa.Table.from_pylist(out, schema=UTILITY_SCHEMA))
    return write_table_shard(task.ref, table)


def choice(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """Forced choice: each yes/no prompt's log-odds of the value's side under its row's steering (one pass each)."""
    from conva.batch.cells import choice_spec
    from conva.batch.schemas import CHOICE_SCHEMA
    from conva.models import model_name

    rows = read_table_slice(task.input())
    bundles, records, cfg = worker.bundles(task.bundles), rows.to_pylist(), worker.cfg
    scored = worker.steerer().score_choice(
        [r["prompt"] for r in records],
        [r["value_side"] for r in records],
        [choice_spec(r, bundles, cfg) for r in records],
        bundles,
        chat_template=cfg.steer.chat_template,
        positions=cfg.steer.positions,
        batch_size=task.batch(cfg.steer.batch_size),
    )
    name = model_name(cfg.model.name)
    keep = ("row_id", "cell_id", "value", "vector", "method", "p0", "strength", "item", "value_side")
    out = [
        dict(
            **{k: r[k] for k in keep},
            model=name,
            log_odds_yes=s.log_odds_yes,
            value_log_odds=s.value_log_odds,
            gate_open=s.gate_open,
            gate_score=s.gate_score,
            eps_norm=float(np.sqrt(np.sum(np.square(s.eps)))) if s.eps else None,
            error=None,
        )
        for r, s in zip(records, scored)
    ]
    table = check_rows("choice", task.ref.shard, rows, pa.Table.from_pylist(out, schema=CHOICE_SCHEMA))
    return write_table_shard(task.ref, table)


def agreement(worker: ShardWorker, task: ShardTask) -> ShardRecord:
    """The judge's agreement per value on its held-out labelled pairs (the same split for every judge), and its
    validity on the labelled model answers (``judge.labels``): per value, and over every value as value ``*``.

    A model-specific judge (``probe``) is validated on this model's answers only.
    """
    from conva.batch.cells import pair_prompts
    from conva.batch.schemas import AGREEMENT_SCHEMA
    from conva.judge_validation import labelled_for, validate_per_value
    from conva.judges import heldout_pairs
    from conva.models import model_name

    judging, values = required(worker.spec.judge, "the study's [judge]"), worker.cfg.data.values
    bundles = worker.bundles(task.bundles) if task.bundles else {}
    judge, out, name = worker.judge(bundles), [], model_name(worker.cfg.model.name)
    labelled = labelled_for(judging.labels)
    validity = (
        validate_per_value(judge, labelled, kind=judging.kind, values=values, model=name) if labelled else {}
    )
    for value in values:
        _, test = heldout_pairs(judging, value)
        stats = judge.agreement(test, pair_prompts(judging, value, test))
        out.append(
            dict(
                model=name,
                judge=judging.kind,
                value=value,
                agreement=stats["agreement"],
                pairwise=stats["pairwise"],
                n_pairs=int(stats["n_pairs"]),
                **_validity_columns(validity.get(value)),
            )
        )
    if validity:
        row = dict(model=name, judge=judging.kind, value="*", agreement=None, pairwise=None, n_pairs=None)
        out.append({**row, **_validity_columns(validity["*"])})
    return write_table_shard(task.ref, pa.Table.from_pylist(out, schema=AGREEMENT_SCHEMA))


def _validity_columns(v) -> dict:
    """A :class:`~conva.judge_validation.JudgeValidity` as the agreement table's columns (all null for None)."""
    keys = (
        "scope",
        "n_unclear",
        "kappa",
        "auc",
        "judge_yes_rate",
        "reader_yes_rate",
        "judge_unclear",
        "kappa_ab",
        "n_ab",
    )
    if v is None:
        return dict.fromkeys(("n_labelled", *keys))
    return dict(n_labelled=v.n, **{k: getattr(v, k) for k in keys})


def _read_parquet(where) -> pa.Table:
    with where.fs.open_input_file(where.path) as handle:
        return pq.read_table(handle)
