"""A named registry of functions: the extension points (quantizer scales, merge methods) are each one."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict[str, F]):
    """``name -> function``, filled with the :meth:`register` decorator; ``kind`` names it in errors."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self[name] = fn
            return fn

        return add

    def lookup(self, name: str) -> F:
        """The function registered as ``name``, or an error listing the known names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self)}")
        return self[name]
