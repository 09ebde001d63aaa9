"""Language-model generation engine: paged KV cache, continuous batching, sampling, streaming."""
