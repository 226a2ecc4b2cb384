"""Images -> token shards -> batches: the demo dataset, the tokenize pipeline and shard writer,
and the loader every rank uses (exact resume, corrupt-input accounting)."""
