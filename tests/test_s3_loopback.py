"""The S3 endpoint the storage tests use: pyarrow finds it from the standard AWS variables alone.

What reaches the server is checked by listing it over plain HTTP, not through pyarrow.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests.s3server import S3Server


def _table(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "row_id": [f"r{i:04d}" for i in range(start, start + n)],
            "x": pa.array([i * 0.5 for i in range(start, start + n)], pa.float32()),
        }
    )


def test_parquet_round_trip_through_from_uri_with_only_the_env(s3_env: S3Server) -> None:
    uri = s3_env.bucket()
    fs, path = pafs.FileSystem.from_uri(f"{uri}/x")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{uri[len('s3://') :]}/x"
    table = _table(0, 7)
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/part-0.parquet", filesystem=fs).equals(table)
    assert s3_env.list(uri) == ["x/part-0.parquet"]


def test_dataset_over_an_s3_folder_reads_exactly_what_was_written(s3_env: S3Server) -> None:
    uri = s3_env.bucket()
    fs, path = pafs.FileSystem.from_uri(f"{uri}/gens")
    parts = [_table(0, 5), _table(5, 3)]
    for i, part in enumerate(parts):
        pq.write_table(part, f"{path}/part-{i}.parquet", filesystem=fs)
    got = ds.dataset(f"{uri}/gens", format="parquet").to_table().sort_by("row_id")
    assert got.equals(pa.concat_tables(parts))
    assert s3_env.list(f"{uri}/gens") == ["gens/part-0.parquet", "gens/part-1.parquet"]
    assert s3_env.list(uri) == ["gens/part-0.parquet", "gens/part-1.parquet"]  # nothing else in the bucket
