"""The VMM shim (issue 12, not built yet): a KVM virtual machine whose RAM is the image's pages.

Planned rooms, after Firecracker's ``vstate``: ``kvm`` (one thin wrapper per
KVM ioctl), ``memory`` (``GuestMemory``: the guest-RAM file's extents mapped
``MAP_SHARED | MAP_FIXED`` into one range), ``vm`` and ``vcpu`` (the VM, its
vCPU threads and their saved state), and the live-update side that talks to
the daemon through ``pkfuse.uapi``. Nothing here writes IOMMU tables: only
the daemon does.
"""
