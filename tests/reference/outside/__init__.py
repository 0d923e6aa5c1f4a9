"""Reference-side modules: the only code of the test suite that imports transformers, bitsandbytes or Hugging Face
peft. They run in the reference process of `tests/reference/isolation.py`, never in the test process (where our
`kernels` and `peft` packages would shadow Hugging Face's), and import nothing from this repository."""
