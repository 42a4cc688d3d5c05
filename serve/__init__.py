"""Serving: generation's host side above vlm and data (prompts, Generator, chat CLI, server)."""
