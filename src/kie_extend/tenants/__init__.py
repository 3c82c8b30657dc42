"""Tenants as boundaries: the tenants file (``KIE_TENANTS_FILE``) and who its tokens act for.

- ``registry.py``: the parsed file: :class:`~kie_extend.tenants.registry.Tenant` (its tokens and
  settings) and :class:`~kie_extend.tenants.registry.Registry` (token lookup in constant time).
"""
