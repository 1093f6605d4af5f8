"""Training: data pipeline (text/jsonl/json.gz, BPE tokenizer, packing, resumable batches)."""
