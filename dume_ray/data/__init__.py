"""Data formats: character tokenizer, example encoding, the soft-target Parquet schema."""
