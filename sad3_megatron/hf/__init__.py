"""The transformers config and model classes of an exported SAD3-LM. They import `core/` only;
`sad3 export` ships them with the core files they use (engine/export.py)."""
