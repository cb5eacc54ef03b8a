"""Modality adapters for msar: each subpackage implements the pyramid tokenizer protocol."""
