"""The use cases, as library functions: ``save``, ``load``, ``arm`` (with ``exec`` and the
shutdown save), ``capture``, ``convert``, ``doctor``; ``source`` resolves a SOURCE argument,
``build`` turns a read host into a state, ``check`` compares a state with a host.

They return reports (dicts) or raise :class:`~handover.errors.HandoverError`; they never
print and never import click (progress, where there is any, is a callback).
"""
