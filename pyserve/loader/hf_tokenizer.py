"""The tokenizer of a Hugging Face folder (tokenizer.json + tokenizer_config.json),
through the `tokenizers` library directly: transformers costs seconds to import."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from pyserve.loader.gguf_tokenizer import GGUFTokenizer
from pyserve.loader.hf import ModelLoadError, read_json


def _token_text(value) -> str | None:
    # tokenizer_config.json spells special tokens as "text" or {"content": "text", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(folder: Path, eos_token_ids: tuple[int, ...] = ()) -> GGUFTokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found (pyserve needs a fast tokenizer's tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ModelLoadError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.exists() else {}

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key))
        return tokenizer.token_to_id(text) if text is not None else None

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text()
    eos = token_id("eos_token")
    return GGUFTokenizer(
        tokenizer=tokenizer,
        bos_token_id=token_id("bos_token"),
        eos_token_id=eos if eos is not None else (eos_token_ids[0] if eos_token_ids else None),
        unk_token_id=token_id("unk_token"),
        pad_token_id=token_id("pad_token"),
        add_bos_token=bool(config.get("add_bos_token", False)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        chat_template=template,
    )
