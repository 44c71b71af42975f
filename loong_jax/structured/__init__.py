"""Structured outputs: constraints compiled into grammars whose matchers give each step the tokens allowed."""

from loong_jax.structured.grammar import GrammarCompiler, Matcher

__all__ = ["GrammarCompiler", "Matcher"]
