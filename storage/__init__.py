"""Storage (imported as ``opsd.storage``), the bottom floor: artifact layout, Parquet schemas,
the DuckDB catalog and MLflow helpers. Imports nothing else of opsd."""
