"""sekft: fine-tune small open LLMs to operate a POSIX shell."""

__version__ = "0.1.0"
