"""`python -m llama.convert`: the command-line converter between Meta's and Hugging Face's layouts.

The converter lives with the other checkpoint formats, in `llama/formats/convert.py`; this module is its entry point.
"""

from .formats.convert import cli

if __name__ == "__main__":
    cli()
