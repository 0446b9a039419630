"""Stage 3, use a trained adapter: :mod:`.convert` (PiSSA → LoRA on the original model), :mod:`.merge`
(one standalone checkpoint), :mod:`.evaluate` (GSM8K accuracy, perplexity; :mod:`.answers` scores)."""
