"""Add-ons for other tools: ``contrib.pytest`` is the pytest plugin of the testing kit.

Nothing here is imported by the rest of the package.
"""
