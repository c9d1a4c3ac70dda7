"""migrate: userfaultfd live migration for Linux, and a simulated x86-64 MMU/IOMMU lab."""

__version__ = "0.1.0"
