"""Loading models from GGUF files: reader, dequantizer, weights as torch tensors, tokenizer."""

from pyserve.loader.gguf_dequant import dequantize
from pyserve.loader.gguf_reader import GGUFFile, TensorInfo, read_gguf
from pyserve.loader.gguf_tokenizer import GGUFTokenizer, load_tokenizer
from pyserve.loader.gguf_types import GGMLType, GGUFError
from pyserve.loader.gguf_weights import default_gguf_path, load_tensors

__all__ = [
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFTokenizer",
    "TensorInfo",
    "default_gguf_path",
    "dequantize",
    "load_tensors",
    "load_tokenizer",
    "read_gguf",
]
