"""What the two model-ablation test files share: a small synthetic corpus."""


def toy_docs(n: int) -> list[str]:
    """n tiny Python-source documents (docstrings included), so no test depends on the stdlib's text."""
    return [f"def f{i}(x):\n    '''Return x plus {i}, the {i}-th helper of this module.'''\n    return x + {i}\n" * 3
            for i in range(n)]
