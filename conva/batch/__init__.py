"""The batch plumbing around the method: what turns a config into committed Parquet, and a study into a report.

* :mod:`~conva.batch.config` (+ :mod:`~conva.batch.configdoc`): the job config, every key documented.
* :mod:`~conva.batch.storage`: a local path or an object-store URI (``pyarrow.fs``), written atomically.
* :mod:`~conva.batch.store`: per-stage append-only commit log; :mod:`~conva.batch.lease`: one driver per output.
* :mod:`~conva.batch.inputs`: input files planned into slices workers read themselves;
  :mod:`~conva.batch.badrows`: bad rows counted by reason.
* :mod:`~conva.batch.schemas`: every Arrow schema the jobs write, versioned.
* :mod:`~conva.batch.sources`, :mod:`~conva.batch.extraction`, :mod:`~conva.batch.steer_rows`: the stages'
  tables (the config's data sources; extraction texts, activations and bundles; steering rows and generations).
* :mod:`~conva.batch.study`, :mod:`~conva.batch.summary`, :mod:`~conva.batch.report`: studies, their
  tables and the HTML report; :mod:`~conva.batch.llm_client`: the LLM judge's HTTP client.

Nothing here imports Ray; the Ray side is :mod:`conva.workers` and :mod:`conva.jobs`.
"""
