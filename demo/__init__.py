"""The one-command demo: real offline data (easy-VQA), a teacher that sees and a base student of another
family and tokenizer, both pre-trained here (shipped weights), and GenRecal's three stages between them."""
