"""Inference front ends on top of the core: terminal chat, and evaluation of saved modules."""
