"""sekft: fine-tune small open LLMs to operate a POSIX shell."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `sekft.load_base` without importing torch for every `import sekft.<module>`.
    if name == "load_base":
        from sekft.base import load_base

        return load_base
    raise AttributeError(f"module 'sekft' has no attribute {name!r}")
