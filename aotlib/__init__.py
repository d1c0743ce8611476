"""aotlib: a companion to two ICML 2024 papers.

- Arrows of Time for Large Language Models (Papadopoulos, Wenger, Hongler)
- Transformers are SSMs / Mamba-2 (Dao, Gu)

Modules are named after the papers' own concepts; ``ls aotlib`` explains the package.
"""

__version__ = "0.1.0"
