"""The GenRecal teacher service: a frozen teacher VLM behind gRPC (engine, config, errors, servicer)."""
