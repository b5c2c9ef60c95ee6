"""The GenRecal student trainer: DeepSpeed training of the small VLM against a remote teacher."""
