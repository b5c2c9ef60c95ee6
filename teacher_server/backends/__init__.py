"""Where the teacher's body runs. The transformers backend is the engine's default; ``vllm_body`` runs it in vLLM."""
