"""The IOMMU tests' shared fixtures (``store``, ``io``: see ``iommu_helpers``), provided here so
that the test modules need not import them (ruff F811 at every use as a parameter)."""

from __future__ import annotations

from iommu_helpers import io, store  # noqa: F401  (fixtures)
