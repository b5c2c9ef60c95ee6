"""The one-command demo: real offline data (easy-VQA), a CPU-trained demo teacher and an untrained student."""
