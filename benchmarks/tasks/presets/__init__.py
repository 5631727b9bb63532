"""Package data: benchmark task protocols as JSON (segmentation.json: linear-probe presets)."""
