"""Tenants as boundaries: the tenants file (``KIE_TENANTS_FILE``) and who its tokens act for.

- ``registry.py``: the parsed file: :class:`~kie_extend.tenants.registry.Tenant` (its tokens and
  settings) and :class:`~kie_extend.tenants.registry.Registry` (token lookup in constant time).
- ``settings.py``: run-time settings (weight, rate, budget) an admin changes in Redis, and
  :func:`~kie_extend.tenants.settings.effective`, the settings in force now.
- ``scope.py``: what one tenant's token may see (its batches, the system view cut to it).
- ``audit.py``: audit lines for admin actions (pause, resume, tenant set).
"""
