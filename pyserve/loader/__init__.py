"""Loading models from GGUF files: reader, dequantizer, tokenizer."""
