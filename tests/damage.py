"""Ways a part file goes wrong on disk, for the tests of verified reads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import write_table


def flip_bit_in_values(path: Path, column: str) -> int:
    """Flip one bit in the middle of the page holding ``column``'s values; return its offset.

    The values of a dictionary-encoded column sit in its dictionary page (before the
    data page of indices); otherwise in its data page. Nothing else of the file changes,
    so its footer, metadata and fingerprint still read as before.
    """
    metadata = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        metadata.column(i)
        for i in range(metadata.num_columns)
        if metadata.column(i).path_in_schema.split(".")[0] == column
    )
    if chunk.dictionary_page_offset:
        start, end = chunk.dictionary_page_offset, chunk.data_page_offset
    else:
        start = chunk.data_page_offset
        end = start + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    offset = (start + end) // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return offset


def rewrite(path: Path, table: pa.Table | None = None, **metadata: str) -> None:
    """Write ``table`` (default: the part's own) back to ``path`` as a valid file.

    Keeps the part's metadata, with ``metadata`` replacing fields (e.g. a fingerprint):
    a file that is sound as Parquet, with valid checksums, but says or holds something
    else.
    """
    original = pq.read_table(path)
    fields = {k.decode(): v.decode() for k, v in (original.schema.metadata or {}).items()}
    fields.pop("schema_version")  # write_table stamps it
    fields.update(metadata)
    write_table(original if table is None else table, path, fields)
