"""Data preparation: image checks and buckets, captions and tags, LLM JSONL records."""
